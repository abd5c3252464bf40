#!/usr/bin/env python3
"""Compile every kernel variant with NVRTC, as CuPy does at run time, without a GPU.

nvcc accepts things NVRTC rejects (NVRTC has no <math.h>, different default headers), so CI
checks the real path too. Uses libnvrtc from the pip package nvidia-cuda-nvrtc (or the CUDA
toolkit). Exit 1 on any compile error; 0 with a message when no libnvrtc is found.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def find_libnvrtc():
    cands = []
    for p in sys.path:
        cands += glob.glob(os.path.join(p, "nvidia", "cu1*", "lib", "libnvrtc.so*"))
        cands += glob.glob(os.path.join(p, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    cands += glob.glob("/usr/local/cuda/lib64/libnvrtc.so*")
    cands = [c for c in cands if "builtins" not in c]
    return cands[0] if cands else None


def cuda_include_dirs(libnvrtc_path: str) -> list:
    """Folders holding cuda_fp16.h / cuda_bf16.h (CuPy finds them in the CUDA headers; here the
    toolkit beside nvcc, or the pip package beside libnvrtc)."""
    cands = glob.glob("/usr/local/cuda*/include") + glob.glob(os.path.join(os.path.dirname(libnvrtc_path), "..",
                                                                           "include"))
    return [d for d in cands if os.path.exists(os.path.join(d, "cuda_fp16.h"))]


def compile_nvrtc(lib, src: str, names, arch="compute_90", options=()):
    prog = ctypes.c_void_p()
    check = lambda rc, what: rc == 0 or (_ for _ in ()).throw(RuntimeError(f"{what} failed: {rc}"))  # noqa: E731
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None), "nvrtcCreateProgram")
    for n in names:
        check(lib.nvrtcAddNameExpression(prog, n.encode()), "nvrtcAddNameExpression")
    opts = [f"-arch={arch}".encode()] + [o.encode() for o in options]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace")


def main() -> int:
    from cpattn import kernels

    path = find_libnvrtc()
    if path is None:
        print("libnvrtc not found (pip install nvidia-cuda-nvrtc): NVRTC compile check skipped")
        return 0
    lib = ctypes.CDLL(path)
    incs = cuda_include_dirs(path)
    if not incs:
        print("cuda_fp16.h not found (no CUDA headers): NVRTC compile check skipped")
        return 0
    opts = tuple(kernels.NVRTC_OPTIONS) + (f"-I{incs[0]}",)
    failed = 0
    for (f, dt, d, c) in kernels.all_variants():
        names = list(kernels.name_expressions(f, dt, d, c).values())
        arch = "compute_90"
        if f in kernels.ARCH:  # e.g. sm_90a: wgmma needs the arch-specific target
            arch = kernels.ARCH[f].replace("sm_", "compute_")
        rc, log = compile_nvrtc(lib, kernels.source(f), names, arch=arch, options=opts)
        key = kernels.variant_key(f, dt, d, c)
        if rc != 0:
            failed += 1
            print(f"NVRTC FAILED {key}:\n{log[-4000:]}")
    n = len(kernels.all_variants())
    print(f"NVRTC ({os.path.basename(path)}): {n - failed}/{n} variants compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
