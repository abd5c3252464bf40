"""cpattn: prefix-aware KV cache, ChunkAttention decode and CompactAttention prefill.

``import cpattn`` works without CuPy or a GPU: the NumPy reference (``cpattn.reference``) is
always there; the CUDA backend loads on first use.
"""
from . import reference
from .reference import CacheError, CacheFullError, ChunkCache, build_decode_plan
from .chunk_attention import ChunkAttentionDecode  # dispatches on the cache: NumPy -> the reference
from .compact_attention import BatchedPrefill, BlockMeans, compact_prefill, dense_prefill  # the same dispatch

__version__ = "0.1.0"


def gpu_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy
    except Exception:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:
        return False


__all__ = ["reference", "ChunkCache", "CacheError", "CacheFullError", "build_decode_plan", "ChunkAttentionDecode",
           "gpu_available"]
__all__ += ["BlockMeans", "BatchedPrefill", "compact_prefill", "dense_prefill"]
