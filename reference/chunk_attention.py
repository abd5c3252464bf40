"""ChunkAttention decode in NumPy: the dense oracle and the two-phase partition over a plan.

Both take ``q [batch, num_q_heads, head_dim]`` (storage dtype, one query token per sequence,
whose K/V is already in the cache) and return ``o [batch, num_q_heads, head_dim]`` float32 in
the batch order the caller gave. GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``.

The two-phase partition (``decode``) is written as the GPU runs it:

    phase 1 (chunk-first)    per (piece, kv head): rows = sequences of the piece x the query
                             heads of that kv head, attending once to the piece's chunks
    phase 2 (sequence-first) per (private item, kv head): one sequence's private chunks
    merge                    per sequence: its phase-1 states and phase-2 states, merged

A partial result is an attention state ``(o, lse)``; ``merge_states`` is the only way two are
combined, in this file and in the CUDA kernels.
"""
from __future__ import annotations

import numpy as np

from .dtypes import to_float32
from .plan import DecodePlan
from .chunk_cache import CacheError, ChunkCache


def _host(x):
    """A NumPy array of ``x`` (a GPU cache's CuPy pool is copied to the host)."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def merge_states(o1, lse1, o2, lse2):
    """Merge two attention states over disjoint key sets.

    o: [..., D] softmax-weighted value sums; lse: [...] log-sum-exp of the scaled scores.
    An empty state is (anything finite, -inf); merging two empty states gives an empty state.
    """
    lse = np.logaddexp(lse1, lse2)
    safe = np.where(np.isneginf(lse), 0.0, lse)
    w1 = np.where(np.isneginf(lse1), 0.0, np.exp(lse1 - safe))
    w2 = np.where(np.isneginf(lse2), 0.0, np.exp(lse2 - safe))
    return w1[..., None] * o1 + w2[..., None] * o2, lse


def attention_state(q, k, v, scale, dtype=np.float32):
    """State of queries q [M, D] over keys k [N, D], values v [N, D]: (o [M, D], lse [M])."""
    q, k, v = (np.asarray(x, dtype) for x in (q, k, v))
    if k.shape[0] == 0:
        return np.zeros((q.shape[0], v.shape[1]), dtype), np.full(q.shape[0], -np.inf, dtype)
    s = (q @ k.T) * dtype(scale)
    m = s.max(axis=1, keepdims=True)
    p = np.exp(s - m)
    l = p.sum(axis=1, keepdims=True)
    return (p @ v) / l, (m + np.log(l))[:, 0]


def _check_q(cache: ChunkCache, q, batch: int, num_q_heads: int | None = None):
    from .dtypes import storage_numpy_dtype

    want = storage_numpy_dtype(cache.dtype)
    if not hasattr(q, "shape") or q.ndim != 3:
        raise ValueError(f"q: expected an array [batch, num_q_heads, head_dim], got "
                         f"{getattr(q, 'shape', type(q).__name__)}")
    b, hq, d = q.shape
    if b != batch:
        raise ValueError(f"q: expected batch {batch} (one row per sequence), got {b}")
    if d != cache.head_dim:
        raise ValueError(f"q: expected head_dim {cache.head_dim}, got {d}")
    if hq < 1 or hq % cache.num_kv_heads:  # 0 heads would make the GQA group size 0
        raise ValueError(f"q: expected num_q_heads a positive multiple of num_kv_heads "
                         f"{cache.num_kv_heads}, got {hq}")
    if np.dtype(q.dtype) != np.dtype(want):
        raise TypeError(f"q: expected dtype {np.dtype(want).name} for {cache.dtype} storage, got {q.dtype}")
    return hq // cache.num_kv_heads


def dense_decode(cache: ChunkCache, seqs, q, layer: int = 0, scale: float | None = None,
                 return_lse: bool = False):
    """float64 oracle: each query over every token of its own sequence, K/V read back through
    the tree. Returns o [batch, Hq, D] float64 (and lse [batch, Hq])."""
    ids = cache.check_batch(seqs)
    group = _check_q(cache, q, len(ids))
    scale = 1.0 / np.sqrt(cache.head_dim) if scale is None else float(scale)
    qf = to_float32(_host(q), cache.dtype).astype(np.float64)
    B, Hq, D = q.shape
    o = np.zeros((B, Hq, D))
    lse = np.zeros((B, Hq))
    for b, sid in enumerate(ids):
        k, v = (to_float32(_host(x), cache.dtype).astype(np.float64) for x in cache.read_kv(sid, layer))
        for h in range(Hq):
            ob, lb = attention_state(qf[b, h][None], k[:, h // group], v[:, h // group], scale, np.float64)
            o[b, h], lse[b, h] = ob[0], lb[0]
    return (o, lse) if return_lse else o


def decode(cache: ChunkCache, plan: DecodePlan, q, layer: int = 0, scale: float | None = None,
           return_lse: bool = False):
    """Two-phase partition decode (float32 states), the semantics the CUDA kernels implement."""
    if plan.version != cache.version:
        raise CacheError(f"plan: expected a plan for cache version {cache.version}, got one built for "
                         f"version {plan.version} (the tree changed); build a new plan")
    group = _check_q(cache, q, plan.batch_size)
    cache.check_layer(layer)
    scale = 1.0 / np.sqrt(cache.head_dim) if scale is None else float(scale)
    c, Hkv = cache.chunk_size, cache.num_kv_heads
    B, Hq, D = q.shape
    qf = to_float32(_host(q), cache.dtype)[plan.order]  # [B, Hq, D] in DFS order
    kp, vp = _host(cache.k_pool[layer]), _host(cache.v_pool[layer])  # [N, Hkv, c, D]

    def keys(chunks, n_last=c):
        """[n_keys, Hkv, D] float32 of a chunk list whose last chunk holds n_last tokens."""
        k = to_float32(kp[chunks], cache.dtype).transpose(0, 2, 1, 3).reshape(-1, Hkv, D)
        v = to_float32(vp[chunks], cache.dtype).transpose(0, 2, 1, 3).reshape(-1, Hkv, D)
        n = len(chunks) * c - (c - n_last)
        return k[:n], v[:n]

    # phase 1: per (piece, kv head), rows = (sequence in range) x (query head in group)
    S = plan.num_state_rows
    o1 = np.zeros((S, Hq, D), np.float32)
    lse1 = np.full((S, Hq), -np.inf, np.float32)
    for p in range(plan.num_pieces):
        b0, b1 = plan.piece_begin[p], plan.piece_end[p]
        k, v = keys(plan.piece_chunks[plan.piece_chunk_indptr[p]: plan.piece_chunk_indptr[p + 1]])
        rows = slice(plan.piece_state_offset[p], plan.piece_state_offset[p + 1])
        for h in range(Hkv):
            heads = slice(h * group, (h + 1) * group)
            qm = qf[b0:b1, heads].reshape(-1, D)  # [(b1-b0)*group, D]
            om, lm = attention_state(qm, k[:, h], v[:, h], scale)
            o1[rows, heads] = om.reshape(b1 - b0, group, D)
            lse1[rows, heads] = lm.reshape(b1 - b0, group)

    # phase 2: per (private item, kv head); only the sequence's last chunk is partial
    lens = cache.slot_lens[plan.slots]
    n_last = lens - c * (plan.path_len - 1)
    o2 = np.zeros((plan.num_items, Hq, D), np.float32)
    lse2 = np.full((plan.num_items, Hq), -np.inf, np.float32)
    for i in range(plan.num_items):
        pos = plan.item_pos[i]
        last = plan.item_end[i] == plan.private_indptr[pos + 1]
        k, v = keys(plan.private_chunks[plan.item_begin[i]: plan.item_end[i]], n_last[pos] if last else c)
        for h in range(Hkv):
            heads = slice(h * group, (h + 1) * group)
            o2[i, heads], lse2[i, heads] = attention_state(qf[pos, heads], k[:, h], v[:, h], scale)

    # merge: each sequence's phase-1 states (pieces on its path) and phase-2 states (its items)
    o = np.zeros((B, Hq, D), np.float32)
    lse = np.full((B, Hq), -np.inf, np.float32)
    for pos in range(B):
        for p in plan.seq_pieces[plan.seq_piece_indptr[pos]: plan.seq_piece_indptr[pos + 1]]:
            row = plan.piece_state_offset[p] + pos - plan.piece_begin[p]
            o[pos], lse[pos] = merge_states(o[pos], lse[pos], o1[row], lse1[row])
        for i in range(plan.seq_item_indptr[pos], plan.seq_item_indptr[pos + 1]):
            o[pos], lse[pos] = merge_states(o[pos], lse[pos], o2[i], lse2[i])

    out, out_lse = np.empty_like(o), np.empty_like(lse)
    out[plan.order], out_lse[plan.order] = o, lse  # back to the caller's batch order
    return (out, out_lse) if return_lse else out
