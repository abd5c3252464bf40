"""Storage dtypes: float16 and bfloat16 (kept as raw 16-bit patterns in a uint16 array).

NumPy and CuPy have no bfloat16 dtype, so a bf16 array is a ``uint16`` array of bit patterns
and the storage dtype travels as a *name* ("float16" or "bfloat16") next to it. Everything
here works on NumPy and CuPy arrays alike (the array module is taken from the input).
"""
from __future__ import annotations

import numpy as np

STORAGE_DTYPES = ("float16", "bfloat16")


def array_module(x):
    """NumPy for NumPy arrays, CuPy for CuPy arrays (without importing CuPy eagerly)."""
    mod = type(x).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    return np


def as_numpy(x) -> np.ndarray:
    """``x`` as a NumPy array: NumPy arrays as they are (no copy), CuPy arrays copied to the host.
    (``cpattn.arrays.to_host`` is the copying version for any GPU array.)"""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def storage_view(x):
    """``x`` as the array cpattn stores, without a copy: a NumPy ``ml_dtypes.bfloat16`` array as
    its uint16 bit patterns, a CPU torch tensor as a NumPy array (bfloat16 through int16 to
    uint16 bits). Everything else (NumPy storage arrays, CuPy arrays, GPU tensors, garbage the
    checks will refuse) is returned as it is."""
    if isinstance(x, np.ndarray):
        return x.view(np.uint16) if x.dtype.name == "bfloat16" and x.dtype.itemsize == 2 else x
    if type(x).__module__.startswith("torch") and getattr(getattr(x, "device", None), "type", None) == "cpu":
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16)
        return x.numpy()
    return x


def check_dtype_name(dtype, argument: str = "dtype") -> str:
    """Normalise a storage dtype given as a name, a NumPy dtype or scalar type (``numpy.float16``,
    ``ml_dtypes.bfloat16``). Something that names no dtype (``123``, None, an object): TypeError;
    a dtype that is not a storage dtype ("float32"): ValueError."""
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        name = np.dtype(dtype).name
    else:
        raise TypeError(f"{argument}: expected a storage dtype name {STORAGE_DTYPES} or a NumPy dtype, "
                        f"got {dtype!r} ({type(dtype).__name__})")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"{argument}: expected one of {STORAGE_DTYPES}, got {dtype!r}")
    return name


def storage_numpy_dtype(dtype: str):
    """The array dtype that holds values of storage dtype ``dtype``."""
    return np.float16 if dtype == "float16" else np.uint16


def to_storage(x, dtype: str):
    """float32/float64 values -> storage array (float16, or bf16 bits rounded to nearest even).
    ``dtype`` must be a storage dtype: "float32" is refused (ValueError), not bf16 bits."""
    dtype = check_dtype_name(dtype)
    xp = array_module(x)
    if dtype == "float16":
        return x.astype(xp.float16)
    u = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    # round to nearest even on the 16 dropped bits; NaN stays NaN (quiet bit survives)
    rounded = (u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))) >> 16
    nan = (u & xp.uint32(0x7FFFFFFF)) > xp.uint32(0x7F800000)
    rounded = xp.where(nan, (u >> 16) | xp.uint32(0x40), rounded)
    return rounded.astype(xp.uint16)


def to_float32(x, dtype: str):
    """storage array -> float32 values (``dtype``: the storage dtype the array holds)."""
    dtype = check_dtype_name(dtype)
    x = storage_view(x)
    xp = array_module(x)
    if dtype == "float16":
        return x.astype(xp.float32)
    return (xp.ascontiguousarray(x).astype(xp.uint32) << 16).view(xp.float32)


def round_to_storage(x, dtype: str):
    """Values as float32 after one round trip through the storage dtype."""
    return to_float32(to_storage(x, dtype), dtype)


def unit_roundoff(dtype: str) -> float:
    """Half an ulp at 1.0: the relative error of one rounding to ``dtype``."""
    return {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
