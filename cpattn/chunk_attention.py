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

import itertools
import math

import numpy as np

from .arrays import as_cupy
from .kernels import get_kernels
from .reference.plan import DecodePlan, _jit, check_piece_sizes, plan_base, split_plan
from .reference.chunk_cache import CacheError

ROWS_PER_UNIT = 64  # rows of a phase-2 unit (and of phase-1 units when chunk_size is 128)
THREADS = 128


def phase1_rows(chunk_size: int) -> int:
    """Rows of a phase-1 unit: 128 (32 per warp, two mma tiles per K/V fragment) up to chunk 64."""
    return 128 if chunk_size <= 64 else ROWS_PER_UNIT


def _smem_bytes(head_dim: int, chunk_size: int) -> int:
    """Dynamic shared memory of chunk_attend: the Q tile (QRows<C>) and two K/V stages."""
    ld = head_dim + 8
    tiles = (phase1_rows(chunk_size) * ld + 4 * chunk_size * ld) * 2
    reduce = 4 * (16 * head_dim + 32) * 4 if chunk_size >= 32 else 0
    return max(tiles, reduce)


@_jit
def _units_core(piece_begin, piece_end, piece_chunk_indptr, piece_state_offset, item_pos, item_begin, item_end,
                private_indptr, path_len, slots, H, group, c, rows_per_unit, rows1):
    """units int32 [U, 9] of ``build_units``, in (entry, tile, kv head) order, then stably
    sorted by chunk count, largest first (a counting sort: counts are small integers)."""
    P, I = len(piece_begin), len(item_pos)
    off2 = piece_chunk_indptr[P]
    tiles2 = -(-group // rows_per_unit)
    U = I * tiles2 * H
    for p in range(P):
        U += -(-(piece_end[p] - piece_begin[p]) * group // rows1) * H
    raw = np.empty((U, 9), np.int32)
    u = 0
    for p in range(P):  # phase 1: (piece, rows1-row tile of range x group, kv head)
        n_rows = (piece_end[p] - piece_begin[p]) * group
        for r0 in range(0, n_rows, rows1):
            for h in range(H):
                raw[u, 0], raw[u, 1] = piece_chunk_indptr[p], piece_chunk_indptr[p + 1]
                raw[u, 2], raw[u, 3], raw[u, 4] = -1, 0, piece_begin[p]
                raw[u, 5], raw[u, 6], raw[u, 7] = r0, min(rows1, n_rows - r0), h
                raw[u, 8] = piece_state_offset[p]
                u += 1
    num_state_rows = piece_state_offset[P]
    for i in range(I):  # phase 2: (private item, tile of the group, kv head)
        pos = item_pos[i]
        # keys of an item = slot_lens[slot] - (tokens on the path before the item); only a
        # position's last item reads the length, the others are whole chunks
        last = item_end[i] == private_indptr[pos + 1]
        before = (path_len[pos] - (private_indptr[pos + 1] - item_begin[i])) * c
        for r0 in range(0, group, rows_per_unit):
            for h in range(H):
                raw[u, 0], raw[u, 1] = off2 + item_begin[i], off2 + item_end[i]
                raw[u, 2] = slots[pos] if last else -1
                raw[u, 3] = before if last else 0
                raw[u, 4], raw[u, 5], raw[u, 6], raw[u, 7] = pos, r0, min(rows_per_unit, group - r0), h
                raw[u, 8] = num_state_rows + i
                u += 1
    # largest first, ties in the order above
    top = 0
    for u in range(U):
        top = max(top, raw[u, 1] - raw[u, 0])
    start = np.zeros(top + 2, np.int64)  # start[top - w] = first slot of chunk count w
    for u in range(U):
        start[top - (raw[u, 1] - raw[u, 0]) + 1] += 1
    for w in range(top + 1):
        start[w + 1] += start[w]
    units = np.empty((U, 9), np.int32)
    for u in range(U):
        j = start[top - (raw[u, 1] - raw[u, 0])]
        start[top - (raw[u, 1] - raw[u, 0])] = j + 1
        for f in range(9):  # (not units[j] = raw[u]: that slice copy takes seconds to compile)
            units[j, f] = raw[u, f]
    return units


def build_units(plan: DecodePlan, num_kv_heads: int, group: int):
    """Work units of the fused attend launch (see raw_kernels/chunk_attention.cu).

    Returns (units int32 [U, 9], chunk_list int32): phase-1 units for every (piece, tile of
    ``phase1_rows`` rows of range x group, kv head) and phase-2 units for every (private item, tile, kv head),
    largest first so the long ones start early. Columns: 0, 1 range in chunk_list; 2 slot whose
    length bounds the keys (-1: whole chunks); 3 tokens on the path before the range; 4 first
    batch position; 5, 6 first row and row count of the tile; 7 kv head; 8 first state row.
    """
    units = _units_core(plan.piece_begin, plan.piece_end, plan.piece_chunk_indptr, plan.piece_state_offset,
                        plan.item_pos, plan.item_begin, plan.item_end, plan.private_indptr, plan.path_len,
                        plan.slots, int(num_kv_heads), int(group), int(plan.chunk_size), ROWS_PER_UNIT,
                        phase1_rows(int(plan.chunk_size)))
    return units, np.concatenate([plan.piece_chunks, plan.private_chunks]).astype(np.int32)


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
    H = cache.num_kv_heads
    group = num_q_heads // H
    pc, ppc = piece_chunks, private_piece_chunks
    check_piece_sizes(None if pc == "auto" else pc, None if ppc == "auto" else ppc)
    base = plan_base(cache, seqs)
    if pc == "auto" or ppc == "auto":  # about units_per_sm units per SM (chunk reads per unit <= cap)
        tiles1 = -(-(base["seg_end"] - base["seg_begin"]).astype(np.int64) * group // phase1_rows(cache.chunk_size))
        work = (int(np.dot(np.diff(base["seg_chunk_indptr"]), tiles1)) + int(base["private_indptr"][-1])
                * -(-group // ROWS_PER_UNIT)) * H
        cap = max(1, math.ceil(work / (units_per_sm * num_sms)))
        pc, ppc = cap if pc == "auto" else pc, cap if ppc == "auto" else ppc
    plan = split_plan(None, pc, ppc, base=base)
    units, chunk_list = build_units(plan, H, group)
    host = [units.ravel(), chunk_list, plan.order, plan.seq_piece_indptr, plan.seq_pieces,
            plan.piece_state_offset, plan.piece_begin, plan.seq_item_indptr]
    offs = [0, *itertools.accumulate(map(len, host))]
    return plan, np.concatenate(host), offs, len(units)


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
            raise CacheError("plan: expected a plan (call plan(seqs, num_q_heads) before run), got none")
        if plan.version != cache.version:
            raise CacheError(f"plan: expected a plan for cache version {cache.version}, got one built at "
                             f"version {plan.version} (the tree changed); call plan() again")
        B, Hq, D = plan.batch_size, self._num_q_heads, cache.head_dim
        q = as_cupy(q, "q", cache.dtype, (B, Hq, D))
        cache.check_layer(layer)
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
