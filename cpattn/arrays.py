"""Array interop: CuPy arrays, ``__cuda_array_interface__`` and DLPack producers, zero copy;
and ``host_jit``, the numba compilation of host loops (planners, the decode batch)."""
from __future__ import annotations

import functools

import numpy as np

from .reference.dtypes import check_dtype_name, storage_numpy_dtype, storage_view



def host_jit(fn):
    """``fn`` compiled with numba on its first call, so ``import cpattn`` stays cheap; the
    machine code is cached on disk, so a later process only loads it. With NUMBA_DISABLE_JIT=1
    it runs as plain Python (same results, slow). For host loops only, never GPU code."""
    compiled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled
        if compiled is None:
            import numba

            try:
                compiled = numba.njit(cache=True, nogil=True)(fn)
            except RuntimeError:  # no writable cache directory: compile in every process
                compiled = numba.njit(nogil=True)(fn)
        return compiled(*args)

    return call


CUPY_EXTRA = "pip install 'cpattn[cuda13x]'"  # or cpattn[cuda12x] for a CUDA 12 driver


def import_cupy(what: str = "the GPU backend"):
    """The ``cupy`` module, or a ModuleNotFoundError that says which extra installs it."""
    try:
        import cupy
    except ModuleNotFoundError as e:
        if e.name != "cupy":
            raise
        raise ModuleNotFoundError(f"{what} needs CuPy, which is not installed: {CUPY_EXTRA} (CUDA 13 "
                                  f"drivers) or pip install 'cpattn[cuda12x]' (CUDA 12); the NumPy "
                                  f"reference (a ChunkCache) needs neither", name="cupy") from None
    return cupy


def as_cupy(x, name: str, dtype: str | None = None, shape=None, contiguous: bool = True):
    """View ``x`` as a CuPy array without copying; check dtype (storage name), shape, layout.

    torch bfloat16 tensors are viewed as int16 first (CuPy has no bf16), then as uint16.
    """
    cupy = import_cupy("a GPU array argument")

    if isinstance(x, np.ndarray) and not isinstance(x, cupy.ndarray):  # (the CPU stand-in's arrays are both)
        raise TypeError(f"{name}: expected a GPU array (CuPy, __cuda_array_interface__ or DLPack), "
                        f"got a NumPy array on the host")
    if not isinstance(x, cupy.ndarray):
        if type(x).__module__.startswith("torch") and str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.view(getattr(__import__("torch"), "int16"))
        if hasattr(x, "__cuda_array_interface__"):
            x = cupy.asarray(x)
        elif hasattr(x, "__dlpack__"):
            x = cupy.from_dlpack(x)
        else:
            raise TypeError(f"{name}: expected a GPU array (CuPy, __cuda_array_interface__ or DLPack), "
                            f"got {type(x).__name__}")
        if x.dtype == np.int16:
            x = x.view(np.uint16)
    if dtype is not None:
        want = np.dtype(storage_numpy_dtype(dtype))
        if x.dtype != want:
            raise TypeError(f"{name}: expected dtype {want.name} ({dtype} storage), got {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if contiguous and not x.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {x.strides}")
    if x.device.id != cupy.cuda.Device().id:
        raise ValueError(f"{name}: expected an array on the current device {cupy.cuda.Device().id}, "
                         f"got device {x.device.id}")
    return x



def to_host(x) -> np.ndarray:
    """A NumPy copy of ``x``: a NumPy array, a CuPy array (anything with ``get()``), or a GPU
    array CuPy can view (``__cuda_array_interface__``, torch ``bfloat16`` as uint16 bits).
    Synchronises with the device."""
    if type(x) is np.ndarray:
        return x.copy()
    if type(x).__module__.startswith("torch") and getattr(getattr(x, "device", None), "type", None) == "cpu":
        return storage_view(x).copy()  # bfloat16 as uint16 bits, like every storage array
    if hasattr(x, "__cuda_array_interface__") and not hasattr(x, "get"):
        x = as_cupy(x, "x", contiguous=False)
    if hasattr(x, "get"):
        return np.asarray(x.get())
    return np.array(x, copy=True)


def as_torch(x, dtype: str):
    """A storage array (NumPy or CuPy, what cpattn returns) as a torch tensor of the storage
    dtype, without a copy: ``torch.bfloat16`` for bf16 bits (uint16), ``torch.float16`` for
    float16; on the array's device (CuPy through DLPack). ``dtype`` is the cache's storage
    dtype (``cache.dtype``). Float32 arrays (``lse``) come back as float32 tensors."""
    import torch

    dtype = check_dtype_name(dtype)
    bits = dtype == "bfloat16" and np.dtype(x.dtype) == np.uint16
    if bits:
        x = x.view(np.int16)  # DLPack and from_numpy know int16; the bits are reinterpreted below
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.from_dlpack(x)
    return t.view(torch.bfloat16) if bits else t


def as_ml_dtypes(x, dtype: str) -> np.ndarray:
    """A NumPy storage array as a NumPy array of its real dtype, without a copy: bf16 bits
    (uint16) as ``ml_dtypes.bfloat16`` (needs the ml_dtypes package), float16 as it is."""
    if check_dtype_name(dtype) == "float16" or np.dtype(x.dtype) != np.uint16:
        return x
    import ml_dtypes

    return x.view(ml_dtypes.bfloat16)

