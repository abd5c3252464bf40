"""ChunkAttention decode on the GPU: plan on the host, run only launches.

    dec = ChunkAttentionDecode(cache)          # cache: GpuChunkCache
    dec.plan(seq_ids, num_q_heads=32)          # host work + one upload; may sync
    for layer in range(L):
        o = dec.run(q[layer], layer)           # two launches on the current stream, no sync

``run`` is CUDA-graph capturable: it allocates nothing once the output buffer exists (pass
``out=``) and reads sequence lengths from the cache's device table, so the same plan serves
every layer and every decode step until the tree changes (a new chunk, a new or released
sequence); ``run`` then raises instead of computing with a stale plan.
"""
from __future__ import annotations

import math

import numpy as np

from .arrays import as_cupy
from .kernels import get_kernels
from .reference.plan import DecodePlan, build_decode_plan, split_plan
from .reference.tree import CacheError

ROWS_PER_UNIT = 64
THREADS = 128


def _smem_bytes(head_dim: int, chunk_size: int) -> int:
    ld = head_dim + 8
    tiles = (ROWS_PER_UNIT * ld + 4 * chunk_size * ld) * 2
    reduce = 4 * (16 * head_dim + 32) * 4 if chunk_size >= 32 else 0
    return max(tiles, reduce)


def build_units(plan: DecodePlan, num_kv_heads: int, group: int):
    """Work units of the fused attend launch (see raw_kernels/chunk_attention.cu).

    Returns (units int32 [U, 9], chunk_list int32): phase-1 units for every (piece, 64-row tile
    of range x group, kv head) and phase-2 units for every (private item, tile, kv head),
    largest first so the long ones start early.
    """
    c, H = plan.chunk_size, num_kv_heads
    chunk_list = np.concatenate([plan.piece_chunks, plan.private_chunks]).astype(np.int32)
    off2 = len(plan.piece_chunks)

    def expand(n_rows, cols):
        """One row per (entry, 64-row tile, kv head); cols: per-entry columns (tile/head filled in)."""
        tiles = -(-n_rows // ROWS_PER_UNIT)
        e = np.repeat(np.arange(len(n_rows)), tiles * H)
        k = np.arange(len(e)) - np.repeat(np.cumsum(tiles * H) - tiles * H, tiles * H)
        r0 = (k // H) * ROWS_PER_UNIT
        out = np.empty((len(e), 9), np.int64)
        for f, col in cols.items():
            out[:, f] = col[e]
        out[:, 5] = r0
        out[:, 6] = np.minimum(ROWS_PER_UNIT, n_rows[e] - r0)
        out[:, 7] = k % H
        return out

    P, I = plan.num_pieces, plan.num_items
    n1 = (plan.piece_end - plan.piece_begin).astype(np.int64) * group
    u1 = expand(n1, {0: plan.piece_chunk_indptr[:-1], 1: plan.piece_chunk_indptr[1:], 2: np.full(P, -1),
                     3: np.zeros(P, np.int64), 4: plan.piece_begin, 8: plan.piece_state_offset[:-1]})
    # phase 2: keys of an item = slot_lens[slot] - (tokens on the path before the item); only
    # a position's last item reads the length, the others are whole chunks
    pos = plan.item_pos
    last = plan.item_end == plan.private_indptr[pos + 1]
    before = (plan.path_len[pos].astype(np.int64) - (plan.private_indptr[pos + 1] - plan.item_begin)) * c
    u2 = expand(np.full(I, group, np.int64), {
        0: off2 + plan.item_begin.astype(np.int64), 1: off2 + plan.item_end.astype(np.int64),
        2: np.where(last, plan.slots[pos], -1), 3: np.where(last, before, 0), 4: pos,
        8: plan.num_state_rows + np.arange(I)})
    units = np.concatenate([u1, u2]).astype(np.int32)
    work = units[:, 1] - units[:, 0]
    return units[np.argsort(-work, kind="stable")], chunk_list


def plan_host(cache, seqs, num_q_heads: int, piece_chunks="auto", private_piece_chunks="auto",
              units_per_sm: int = 4, num_sms: int = 132):
    """Host part of ``ChunkAttentionDecode.plan``: everything but the upload (no GPU needed).

    Returns (plan, buf, offs, num_units): ``buf`` int32 concatenates units [U, 9] (raveled),
    chunk_list, order, seq_piece_indptr, seq_pieces, piece_state_offset, piece_begin and
    seq_item_indptr; array ``i`` is ``buf[offs[i]:offs[i + 1]]`` (``offs`` has 9 entries).
    """
    if not isinstance(num_q_heads, (int, np.integer)) or num_q_heads < 1 or num_q_heads % cache.num_kv_heads:
        raise ValueError(f"num_q_heads: expected a positive multiple of num_kv_heads "
                         f"{cache.num_kv_heads}, got {num_q_heads!r}")
    group = num_q_heads // cache.num_kv_heads
    pc, ppc = piece_chunks, private_piece_chunks
    auto = pc == "auto" or ppc == "auto"
    plan = build_decode_plan(cache, seqs, None if pc == "auto" else pc, None if ppc == "auto" else ppc)
    if auto:  # split so that about units_per_sm units per SM exist (chunk reads per unit <= cap)
        tiles1 = -(-(plan.seg_end - plan.seg_begin).astype(np.int64) * group // ROWS_PER_UNIT)
        work = (int((np.diff(plan.seg_chunk_indptr) * tiles1).sum()) + int(plan.private_indptr[-1])
                * -(-group // ROWS_PER_UNIT)) * cache.num_kv_heads
        cap = max(1, math.ceil(work / (units_per_sm * num_sms)))
        plan = split_plan(plan, cap if pc == "auto" else pc, cap if ppc == "auto" else ppc)
    units, chunk_list = build_units(plan, cache.num_kv_heads, group)
    host = [units.ravel(), chunk_list, plan.order, plan.seq_piece_indptr, plan.seq_pieces,
            plan.piece_state_offset, plan.piece_begin, plan.seq_item_indptr]
    offs = np.cumsum([0] + [len(a) for a in host])
    return plan, np.concatenate(host).astype(np.int32), offs, len(units)


class ChunkAttentionDecode:
    """Plan/run wrapper of the two-phase partition decode over a ``GpuChunkCache``.

    ``piece_chunks`` / ``private_piece_chunks``: chunks per phase-1 piece / phase-2 item, or
    "auto" to size them so about ``units_per_sm`` units per multiprocessor exist.
    """

    def __init__(self, cache, piece_chunks="auto", private_piece_chunks="auto", units_per_sm: int = 4):
        import cupy

        self.cache = cache
        self.piece_chunks, self.private_piece_chunks = piece_chunks, private_piece_chunks
        self.units_per_sm = units_per_sm
        self._kern = get_kernels("chunk_attention", cache.dtype, cache.head_dim, cache.chunk_size)
        self._smem = _smem_bytes(cache.head_dim, cache.chunk_size)
        self._kern["chunk_attend"].max_dynamic_shared_size_bytes = self._smem
        self._sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self._states_cap = 0
        self.ref_plan: DecodePlan | None = None

    # ------------------------------------------------------------------ plan
    def plan(self, seqs, num_q_heads: int) -> DecodePlan:
        """Build and upload the plan for ``seqs`` (the row order of ``q`` in ``run``)."""
        import cupy

        cache = self.cache
        plan, host, offs, self._num_units = plan_host(cache, seqs, num_q_heads, self.piece_chunks,
                                                      self.private_piece_chunks, self.units_per_sm, self._sms)
        buf = cupy.asarray(host)  # the one upload
        views = [buf[offs[i]:offs[i + 1]] for i in range(len(offs) - 1)]
        (self._units, self._chunk_list, self._order, self._seq_piece_indptr, self._seq_pieces,
         self._piece_state_offset, self._piece_begin, self._seq_item_indptr) = views
        rows = plan.num_state_rows + plan.num_items
        if rows * num_q_heads > self._states_cap:  # grow only; fixed while a graph replays
            self._states_cap = rows * num_q_heads
            self._o_states = cupy.empty(self._states_cap * cache.head_dim, np.float32)
            self._lse_states = cupy.empty(self._states_cap, np.float32)
        self._num_q_heads, self._group = num_q_heads, num_q_heads // cache.num_kv_heads
        cache.sync_lens()
        self.ref_plan = plan
        return plan

    # ------------------------------------------------------------------ run
    def run(self, q, layer: int = 0, scale: float | None = None, out=None, lse=None):
        """o [batch, Hq, D] (storage dtype) for q [batch, Hq, D]; ``lse`` [batch, Hq] float32 if given.

        Launches two kernels on the current stream; never synchronises.
        """
        import cupy

        cache, plan = self.cache, self.ref_plan
        if plan is None:
            raise CacheError("plan: call plan(seqs, num_q_heads) before run")
        if plan.version != cache.version:
            raise CacheError(f"plan: built for cache version {plan.version}, cache is at {cache.version} "
                             f"(the tree changed); call plan() again")
        B, Hq, D = plan.batch_size, self._num_q_heads, cache.head_dim
        q = as_cupy(q, "q", cache.dtype, (B, Hq, D))
        cache._check_layer(layer)
        if out is None:
            out = cupy.empty((B, Hq, D), q.dtype)
        else:
            out = as_cupy(out, "out", cache.dtype, (B, Hq, D))
        if lse is not None:
            lse = as_cupy(lse, "lse", None, (B, Hq))
            if lse.dtype != np.float32:
                raise TypeError(f"lse: expected dtype float32, got {lse.dtype}")
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        o_st = self._o_states
        lse_st = self._lse_states
        self._kern["chunk_attend"](
            (self._num_units,), (THREADS,),
            (q, cache.k_pool, cache.v_pool, np.int64(layer * cache.num_chunks * cache.num_kv_heads),
             self._units, self._chunk_list, self._order, cache.d_slot_lens, o_st, lse_st,
             np.int32(Hq), np.int32(cache.num_kv_heads), np.int32(self._group),
             np.float32(scale * 1.4426950408889634)),
            shared_mem=self._smem)
        lse_out = lse if lse is not None else lse_st  # lse_st is a valid dummy when not asked for
        write_lse = lse is not None
        warps = B * Hq
        self._kern["chunk_merge"](
            ((warps + 3) // 4,), (THREADS,),
            (o_st, lse_st, self._seq_piece_indptr, self._seq_pieces, self._piece_state_offset,
             self._piece_begin, self._seq_item_indptr, np.int32(plan.num_state_rows), self._order,
             out, lse_out, np.int32(write_lse), np.int32(B), np.int32(Hq)))
        return (out, lse) if lse is not None else out


def run_once(cache, seqs_or_plan, q, layer: int = 0, scale: float | None = None):
    """One-call decode: plan (or reuse the reference plan's batch) and run. Convenience only."""
    seqs = seqs_or_plan.batch if isinstance(seqs_or_plan, DecodePlan) else seqs_or_plan
    q = as_cupy(q, "q", cache.dtype)
    dec = ChunkAttentionDecode(cache)
    dec.plan(seqs, q.shape[1])
    return dec.run(q, layer, scale)
