"""NumPy/CuPy storage-dtype arrays and torch tensors, exchanged by DLPack without copies.

bfloat16 travels as int16 bits: NumPy and CuPy have no bfloat16 dtype (cpattn keeps bf16 as
uint16 bit patterns).
"""
from __future__ import annotations

import numpy as np


def to_torch(x, dtype: str):
    """A storage-dtype NumPy/CuPy array as a torch tensor, zero copy through DLPack (bf16 bits travel
    as int16: NumPy and CuPy have no bfloat16)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if dtype == "bfloat16":
        return torch.from_dlpack(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(x)


def from_torch(t, xp, dtype: str):
    """A torch tensor as an ``xp`` (NumPy or CuPy) array of the storage dtype, zero copy (DLPack)."""
    import torch

    if dtype == "bfloat16":
        return xp.from_dlpack(t.view(torch.int16)).view(np.uint16)
    return xp.from_dlpack(t)
