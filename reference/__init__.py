"""NumPy reference of cpattn: the exact semantics of the chunk tree and both algorithms.

Installed as ``cpattn.reference``. Readable first, fast second.
"""
from .chunk_attention import (ChunkAttentionDecode, DecodePlan, attention_state, build_decode_plan, decode,
                              merge_states, oracle_decode, split_plan)
from .dtypes import STORAGE_DTYPES, round_to_storage, to_float32, to_storage
from .chunk_cache import CacheError, CacheFullError, ChunkCache, DecodeBatch, Slots

__all__ = [
    "ChunkCache", "CacheError", "CacheFullError", "DecodeBatch", "Slots", "DecodePlan", "build_decode_plan",
    "split_plan", "ChunkAttentionDecode", "decode", "oracle_decode", "merge_states", "attention_state", "STORAGE_DTYPES",
    "to_storage", "to_float32", "round_to_storage",
]

# CompactAttention chunked prefill (reference/compact_attention.py)
from .compact_attention import (BlockMeans, BlockSelection, BlockTables, CompactPrefill,  # noqa: E402
                                attention_mass, build_block_tables, chunked_prefill, compact_prefill,
                                dense_prefill, mass_recall, needle_recall, oracle_prefill,
                                relative_error, select_blocks, sparse_prefill)

__all__ += [
    "BlockMeans", "BlockSelection", "BlockTables", "CompactPrefill", "select_blocks",
    "build_block_tables", "sparse_prefill", "compact_prefill", "dense_prefill", "chunked_prefill",
    "oracle_prefill", "attention_mass", "mass_recall", "relative_error", "needle_recall",
]
