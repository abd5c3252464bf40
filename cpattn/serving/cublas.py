"""Half-precision matrix products through cuBLAS directly (ctypes), for CUDA graph capture.

CuPy refuses every cuBLAS call while a stream captures ("calling cuBLAS API during stream
capture is currently unsupported"), though cuBLAS itself records into graphs when it has a
workspace of its own. ``CublasGemm`` owns a cuBLAS handle with such a workspace and calls
``cublasGemmEx`` on the library CuPy already loaded:

    gemm = CublasGemm()
    gemm(x, w, out, stream)      # out[M, N] = x[M, K] @ w[N, K].T, float16, float32 accumulation

The call is the one CuPy makes for ``x @ w.T`` on float16 (``CUBLAS_COMPUTE_32F``), so the
products round as the eager model's do, up to the algorithm cuBLAS picks for the handle.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_16F = 2
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
WORKSPACE_BYTES = 32 << 20  # what cuBLAS asks for on Hopper at most


def load_cublas() -> ctypes.CDLL:
    """The cuBLAS library of this process (the one CuPy loaded), by soname or from the wheel folders."""
    import cupy

    cupy.cuda.device.get_cublas_handle()  # makes CuPy load its cuBLAS first
    names = ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    import site

    roots = site.getsitepackages() + [os.environ.get("CUDA_PATH", "/usr/local/cuda")]
    for root in roots:
        for hit in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcublas.so*")) +
                          glob.glob(os.path.join(root, "lib64", "libcublas.so*"))):
            try:
                return ctypes.CDLL(hit)
            except OSError:
                pass
    raise OSError(f"cuBLAS: expected one of {names} loadable (CuPy's own), found none")


class CublasGemm:
    """``out = x @ w.T`` for float16 CuPy arrays on a given stream, capturable into a CUDA graph."""

    def __init__(self):
        import cupy

        lib = self.lib = load_cublas()
        vp, i = ctypes.c_void_p, ctypes.c_int
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
        lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
        lib.cublasDestroy_v2.argtypes = [vp]
        self.handle = vp()
        self._check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cupy.empty(WORKSPACE_BYTES, np.uint8)
        self._check(lib.cublasSetWorkspace_v2(self.handle, self.workspace.data.ptr, WORKSPACE_BYTES),
                    "cublasSetWorkspace")
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what}: cuBLAS status {status}")

    def __call__(self, x, w, out, stream) -> None:
        """x [M, K], w [N, K] (rows of K contiguous), out [M, N] C-contiguous, all float16."""
        M, K = x.shape
        N = w.shape[0]
        for name, a, shape in (("x", x, (M, K)), ("w", w, (N, K)), ("out", out, (M, N))):
            if a.dtype != np.float16 or a.shape != shape or a.strides[1] != 2:
                raise ValueError(f"{name}: expected float16 {shape} with contiguous rows, got {a.dtype} {a.shape} "
                                 f"strides {a.strides}")
        if not out.flags.c_contiguous:
            raise ValueError("out: expected a C-contiguous array")
        lib = self.lib
        self._check(lib.cublasSetStream_v2(self.handle, stream.ptr), "cublasSetStream")
        # row-major out[M, N] is column-major out^T [N, M] = w (col-major K x N, transposed) @ x^T
        self._check(lib.cublasGemmEx(
            self.handle, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, ctypes.addressof(self.one),
            w.data.ptr, CUDA_R_16F, w.strides[0] // 2, x.data.ptr, CUDA_R_16F, x.strides[0] // 2,
            ctypes.addressof(self.zero), out.data.ptr, CUDA_R_16F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "cublasGemmEx")

    def __del__(self):
        h = getattr(self, "handle", None)
        if h is not None and h.value:
            self.lib.cublasDestroy_v2(h)
            self.handle = None


__all__ = ["CublasGemm", "load_cublas"]
