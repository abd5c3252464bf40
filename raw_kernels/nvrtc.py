"""NVRTC without a GPU or CuPy: find libnvrtc and the CUDA headers, compile one program.

CuPy compiles the kernels with NVRTC at run time, and NVRTC rejects things nvcc accepts (it has
no <math.h>, other default headers), so the offline checks (tools/nvrtc_check.py,
tools/probe_wgmma.py) compile through the same library: the pip package nvidia-cuda-nvrtc or
the CUDA toolkit's.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys


def find_libnvrtc():
    """Path of a libnvrtc shared library, or None."""
    cands = []
    for p in sys.path:
        cands += glob.glob(os.path.join(p, "nvidia", "cu1*", "lib", "libnvrtc.so*"))
        cands += glob.glob(os.path.join(p, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    cands += glob.glob("/usr/local/cuda/lib64/libnvrtc.so*")
    cands = [c for c in cands if "builtins" not in c]
    return cands[0] if cands else None


def load_libnvrtc(path: str) -> ctypes.CDLL:
    """``ctypes.CDLL`` of the libnvrtc at ``path``, its builtins library (beside it in the pip
    packages, which put no folder on the loader's search path) loaded first, globally, so that
    libnvrtc finds it when it compiles."""
    for b in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
        if ".alt." not in b:
            ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(path)


def cuda_include_dirs(libnvrtc_path: str) -> list:
    """Folders holding cuda_fp16.h / cuda_bf16.h (CuPy finds them in the CUDA headers; here the
    toolkit beside nvcc, or the pip package beside libnvrtc)."""
    cands = glob.glob("/usr/local/cuda*/include") + glob.glob(os.path.join(os.path.dirname(libnvrtc_path), "..",
                                                                           "include"))
    return [d for d in cands if os.path.exists(os.path.join(d, "cuda_fp16.h"))]


def compile_program(lib, src: str, names, options=()):
    """Compile ``src`` with libnvrtc (a ``ctypes.CDLL``), adding each C++ name expression in
    ``names``; ``options`` as NVRTC takes them (-arch=..., -D..., -I...). Returns (rc, log):
    rc 0 on success."""
    prog = ctypes.c_void_p()

    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed: {rc}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None), "nvrtcCreateProgram")
    for n in names:
        check(lib.nvrtcAddNameExpression(prog, n.encode()), "nvrtcAddNameExpression")
    opts = [o.encode() for o in options]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")
