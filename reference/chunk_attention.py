"""ChunkAttention decode in NumPy: the planner, the two-phase decode and the float64 oracle.

docs/design.md, *ChunkAttention decode*. One decode step gives every sequence of a batch one
query token (its K/V already in the cache) and asks for its attention over every token of its
own sequence. Sequences that share a prompt prefix share the tree nodes of that prefix, so the
step is cut in two:

    phase 1 (chunk-first)    per (piece of shared chunks, kv head): the queries of every
                             sequence through the piece x the query heads of that kv head form
                             one matrix that reads the piece's keys once
    phase 2 (sequence-first) per (private item, kv head): one sequence's own chunks
    merge                    per sequence: its phase-1 and phase-2 states, with merge_states

The file reads top to bottom:

1. ``DecodePlan``: the flat int32 arrays of the partition (the GPU backend reads the same).
2. ``build_decode_plan``: the planner, in numbered passes over the batch's paths.
3. ``split_plan``: cut segments into pieces and private suffixes into items.
4. ``attention_state`` / ``merge_states``: partial attention as a state ``(o, lse)``, and the
   only way two states are combined (mirrored by ``chunk_merge`` in CUDA).
5. ``decode``: the two-phase partition over a plan, float32 states, as the GPU runs it.
6. ``oracle_decode``: float64 attention of each query over its sequence, read through the tree.
7. ``ChunkAttentionDecode``: the plan/run class, the same API as ``cpattn.chunk_attention``'s.

Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` kv heads, ``D`` head_dim, ``c`` chunk size.
GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .checks import INT32_MAX, check_bool, check_instance, check_int, check_scale, is_int
from .chunk_cache import CacheError, ChunkCache, check_cache
from .dtypes import as_numpy, storage_numpy_dtype, storage_view, to_float32, to_storage

_I32 = np.int32


# ============================================================================ 1. the plan
@dataclass(frozen=True)
class DecodePlan:
    """The partition of one decode step: which chunks each phase reads, for whom.

    A plan maps a batch of sequence ids to the depth-first order of the tree, in which every
    node covers a contiguous range of batch positions. It is rebuilt only when the tree or the
    batch changes (``cache.version``), not on every appended token: the length of each
    sequence's last chunk is read at run time from ``cache.slot_lens``.

    Vocabulary (docs/design.md, *ChunkAttention decode*):

    * a node is **shared** in this batch when two or more of its sequences pass through it (a
      node shared only with sequences outside the batch is private here);
    * a **segment** is a maximal run of shared nodes on a path with the same batch range; a
      long segment is split into **pieces** of at most ``piece_chunks`` chunks (phase 1 work);
    * the rest of a path is the sequence's **private** chunks, split into **items** of at most
      ``private_piece_chunks`` chunks (phase 2 work).

    Arrays, all int32 (``S`` segments, ``P`` pieces, ``B`` batch, ``I`` private items);
    positions are depth-first batch positions:

        order               [B]     user batch index of the sequence at position pos
        slots               [B]     cache slot of that sequence (its length is slot_lens[slot])
        path_len            [B]     chunks on its path (last chunk holds len - c*(path_len-1) tokens)
        seg_begin/end       [S]     batch range of each segment (unsplit)
        seg_chunk_indptr    [S+1]   CSR of each segment's chunks in piece_chunks
        piece_begin/end     [P]     batch range [begin, end) of each piece
        piece_chunk_indptr  [P+1]   CSR into piece_chunks (pool chunk ids, root side first; pieces
                                    are contiguous runs of their segment's chunks)
        piece_state_offset  [P+1]   phase-1 state of (piece p, pos) lives in row offset[p] + pos - begin[p]
        seq_piece_indptr    [B+1]   CSR into seq_pieces: the pieces on each position's path
        private_indptr      [B+1]   CSR into private_chunks (pool ids, root side first)
        item_pos            [I]     position of each private item
        item_begin/end      [I]     its chunk range inside private_chunks
        seq_item_indptr     [B+1]   CSR: the items of position pos are seq_item_indptr[pos]..[pos+1]
    """

    batch: tuple  # sequence ids in user order
    version: int  # cache.version this plan was built for
    chunk_size: int
    order: np.ndarray
    slots: np.ndarray
    path_len: np.ndarray
    seg_begin: np.ndarray
    seg_end: np.ndarray
    seg_chunk_indptr: np.ndarray
    piece_begin: np.ndarray
    piece_end: np.ndarray
    piece_chunk_indptr: np.ndarray
    piece_chunks: np.ndarray
    piece_state_offset: np.ndarray
    seq_piece_indptr: np.ndarray
    seq_pieces: np.ndarray
    private_indptr: np.ndarray
    private_chunks: np.ndarray
    item_pos: np.ndarray
    item_begin: np.ndarray
    item_end: np.ndarray
    seq_item_indptr: np.ndarray
    num_segments: int

    @property
    def batch_size(self) -> int:
        return len(self.batch)

    @property
    def num_pieces(self) -> int:
        return len(self.piece_begin)

    @property
    def num_items(self) -> int:
        return len(self.item_pos)

    @property
    def num_state_rows(self) -> int:
        """Phase-1 state rows: one per (piece, sequence in its range)."""
        return int(self.piece_state_offset[-1])

    def arrays(self) -> dict:
        """Every int32 array of the plan by name."""
        return {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}

    def shared_chunk_reads(self) -> int:
        """Chunk reads of phase 1 (each shared chunk once per batch)."""
        return int(self.piece_chunk_indptr[-1])

    def summary(self) -> str:
        shared = self.shared_chunk_reads()
        private = int(self.private_indptr[-1])
        flat = shared and int(((self.piece_end - self.piece_begin) *
                               np.diff(self.piece_chunk_indptr)).sum())
        return (f"batch {self.batch_size}: {self.num_segments} shared segments in {self.num_pieces} pieces "
                f"({shared} shared chunks read once instead of {flat} times), "
                f"{private} private chunks in {self.num_items} items")


# The fields a split leaves alone (the unsplit plan) and the ones it rebuilds.
SPLIT_FIELDS = ("piece_begin", "piece_end", "piece_chunk_indptr", "piece_state_offset", "seq_piece_indptr",
                "seq_pieces", "item_pos", "item_begin", "item_end", "seq_item_indptr")


def check_piece_chunks(value, name: str, auto: bool = False):
    """A piece size: None (no split), an integer in [1, 2**31), or "auto" where ``auto`` allows
    it. Not one of those kinds (a float, a bool, another string): TypeError; out of range:
    ValueError (the fast planner's loops take int32-sized counts)."""
    if value is None or (auto and isinstance(value, str) and value == "auto"):
        return value
    if is_int(value):
        return check_int(value, name, 1, INT32_MAX)
    want = 'None, "auto" or an integer >= 1' if auto else "None or an integer >= 1"
    err = ValueError if auto and isinstance(value, str) else TypeError
    raise err(f"{name}: expected {want}, got {value!r} ({type(value).__name__})")


def batch_states(cache: ChunkCache, seqs) -> tuple:
    """(ids, states) of a decode batch: distinct live sequence ids, each with a token (the
    query token's K/V is appended before its decode step). Raises what ``cache.check_batch``
    raises, or CacheError naming ``seqs``."""
    check_cache(cache)
    ids = cache.check_batch(seqs)
    states = [cache.sequence(i, "seqs") for i in ids]
    for s in states:
        if s.n_tokens == 0:
            raise CacheError(f"seqs: expected sequences with at least one token (append the query "
                             f"token's K/V first), got sequence {s.id} with none")
    return ids, states


# ============================================================================ 2. the planner
def build_decode_plan(cache: ChunkCache, seqs, piece_chunks: int | None = None,
                      private_piece_chunks: int | None = None) -> DecodePlan:
    """Plan a decode step for ``seqs`` (sequence ids; the row order of ``q``).

    ``piece_chunks`` / ``private_piece_chunks`` cap the chunks of one phase-1 piece / phase-2
    item (None: no split). Results do not depend on them; GPU occupancy does.
    """
    check_piece_chunks(piece_chunks, "piece_chunks")
    check_piece_chunks(private_piece_chunks, "private_piece_chunks")
    ids, states = batch_states(cache, seqs)
    B = len(ids)

    # Pass 1. The batch's paths: paths[b] lists the nodes of sequence b, root side first (the
    #         root itself excluded). A node's serial orders siblings by creation.
    paths = [s.path for s in states]  # [B] lists of Node

    # Pass 2. Depth-first order. Sorting the paths by their serials, lexicographically, is a
    #         depth-first walk of the batch's subtree: siblings in creation order, and a path
    #         that ends at a node (a prefix of longer paths) before the paths that go on below
    #         it. Ties (two sequences on one path) keep the caller's order. Then the paths through
    #         any node hold a contiguous range of positions [begin, end).
    order = sorted(range(B), key=lambda b: [n.serial for n in paths[b]])  # [B] position -> user index
    begin, end = {}, {}  # Node -> first position through it, one past the last
    for pos, b in enumerate(order):
        for n in paths[b]:
            begin.setdefault(n, pos)
            end[n] = pos + 1

    def shared(n) -> bool:
        return end[n] - begin[n] >= 2

    def same_range(a, b) -> bool:
        return begin[a] == begin[b] and end[a] == end[b]

    # Pass 3. Segments of shared nodes. Walking positions in order and each path root first
    #         meets nodes in depth-first pre-order; a shared node starts a segment when it is a
    #         root child or its range differs from its parent's. The segment runs down the path
    #         while the range stays the same (a child with its parent's whole range is its only
    #         child in this batch).
    seg_begin, seg_end, seg_chunks = [], [], []  # [S], [S], [S] lists of pool chunk ids
    for pos, b in enumerate(order):
        path = paths[b]
        for d, n in enumerate(path):
            if begin[n] != pos or not shared(n):
                continue  # met before, or private
            if d > 0 and same_range(path[d - 1], n):
                continue  # inside its parent's segment
            run = [n]
            while d + len(run) < len(path) and same_range(path[d + len(run)], n):
                run.append(path[d + len(run)])
            seg_begin.append(begin[n])
            seg_end.append(end[n])
            seg_chunks.append([m.chunk for m in run])

    # Pass 4. Private suffixes: the nodes below a path's last shared one (ranges only narrow
    #         going down a path, so the private nodes are a suffix), root side first.
    private = [[n.chunk for n in paths[b] if not shared(n)] for b in order]  # [B] lists

    # Pass 5. The flat arrays of the unsplit plan; passes 6 to 8 (``_split``) cut it up.
    base = dict(
        batch=tuple(ids), version=cache.version, chunk_size=cache.chunk_size,
        order=np.array(order, _I32),
        slots=np.array([states[b].slot for b in order], _I32),
        path_len=np.array([len(paths[b]) for b in order], _I32),
        seg_begin=np.array(seg_begin, _I32), seg_end=np.array(seg_end, _I32),
        seg_chunk_indptr=_indptr([len(x) for x in seg_chunks]),
        piece_chunks=np.array([x for run in seg_chunks for x in run], _I32),
        private_indptr=_indptr([len(x) for x in private]),
        private_chunks=np.array([x for suffix in private for x in suffix], _I32),
        num_segments=len(seg_chunks),
    )
    return _split(base, piece_chunks, private_piece_chunks)


def _indptr(counts) -> np.ndarray:
    """CSR offsets [len(counts) + 1] int32 of a list of counts."""
    out = np.zeros(len(counts) + 1, _I32)
    out[1:] = np.cumsum(counts, dtype=np.int64)
    return out


# ============================================================================ 3. the split
def split_plan(plan: DecodePlan, piece_chunks: int | None = None,
               private_piece_chunks: int | None = None) -> DecodePlan:
    """The same plan with pieces / items of at most the given number of chunks (None: whole
    segments / whole private suffixes). Only the small per-piece arrays change."""
    check_instance(plan, "plan", DecodePlan, "a DecodePlan (from build_decode_plan)")
    check_piece_chunks(piece_chunks, "piece_chunks")
    check_piece_chunks(private_piece_chunks, "private_piece_chunks")
    base = {k: v for k, v in plan.__dict__.items() if k not in SPLIT_FIELDS}
    return _split(base, piece_chunks, private_piece_chunks)


def _split(base: dict, piece_chunks, private_piece_chunks) -> DecodePlan:
    B = len(base["order"])
    seg_ptr = base["seg_chunk_indptr"].tolist()
    seg_len = [b - a for a, b in zip(seg_ptr, seg_ptr[1:])]  # [S]
    priv_ptr = base["private_indptr"].tolist()
    priv_len = [b - a for a, b in zip(priv_ptr, priv_ptr[1:])]  # [B]
    step = piece_chunks or max(seg_len, default=1)
    pstep = private_piece_chunks or max(max(priv_len, default=1), 1)

    # Pass 6. Pieces: contiguous runs of at most `step` chunks of each segment, in segment
    #         order; they keep the segment's batch range and index the same flat chunk list.
    piece_begin, piece_end, piece_ptr, rows = [], [], [], []
    for s, (a, n) in enumerate(zip(seg_ptr, seg_len)):
        for k in range(0, n, step):
            piece_ptr.append(a + k)
            piece_begin.append(int(base["seg_begin"][s]))
            piece_end.append(int(base["seg_end"][s]))
            rows.append(piece_end[-1] - piece_begin[-1])
    piece_ptr.append(seg_ptr[-1])

    # Pass 7. The pieces on each position's path, root side first (segments were found in
    #         pre-order, so a path's shallower segment comes first).
    mine = [[] for _ in range(B)]  # [B] lists of piece ids
    for p, (b0, b1) in enumerate(zip(piece_begin, piece_end)):
        for pos in range(b0, b1):
            mine[pos].append(p)

    # Pass 8. Items: runs of at most `pstep` of one position's private chunks.
    item_pos, item_begin, item_end, n_items = [], [], [], []
    for pos in range(B):
        a, n = priv_ptr[pos], priv_len[pos]
        starts = range(a, a + n, pstep)
        n_items.append(len(starts))
        for i in starts:
            item_pos.append(pos)
            item_begin.append(i)
            item_end.append(min(i + pstep, a + n))

    return DecodePlan(
        **base,
        piece_begin=np.array(piece_begin, _I32), piece_end=np.array(piece_end, _I32),
        piece_chunk_indptr=np.array(piece_ptr, _I32), piece_state_offset=_indptr(rows),
        seq_piece_indptr=_indptr([len(x) for x in mine]), seq_pieces=np.array([p for x in mine for p in x], _I32),
        item_pos=np.array(item_pos, _I32), item_begin=np.array(item_begin, _I32),
        item_end=np.array(item_end, _I32), seq_item_indptr=_indptr(n_items),
    )


# ============================================================================ 4. attention states
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



def check_q(cache: ChunkCache, q, batch: int) -> int:
    """Check ``q [batch, Hq, D]`` in the cache's storage dtype; returns the GQA group Hq // Hkv."""
    want = storage_numpy_dtype(cache.dtype)
    if not hasattr(q, "shape") or not hasattr(q, "dtype"):
        raise TypeError(f"q: expected an array [batch, num_q_heads, head_dim], got {type(q).__name__}")
    if len(q.shape) != 3:
        raise ValueError(f"q: expected an array [batch, num_q_heads, head_dim], got shape {tuple(q.shape)}")
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


def check_plan(cache: ChunkCache, plan) -> DecodePlan:
    """``plan`` built for the cache as it is now (``cache.version``), else CacheError."""
    check_cache(cache)
    if plan is None:
        raise CacheError("plan: expected a plan (call plan(seqs, num_q_heads) before run), got none")
    check_instance(plan, "plan", DecodePlan, "a DecodePlan (from build_decode_plan)")
    if plan.version != cache.version:
        raise CacheError(f"plan: expected a plan for cache version {cache.version}, got one built for "
                         f"version {plan.version} (the tree changed); build a new plan")
    return plan


# ============================================================================ 5. two-phase decode
def decode(cache: ChunkCache, plan: DecodePlan, q, layer: int = 0, scale: float | None = None,
           return_lse: bool = False):
    """The two-phase partition over ``plan``, as the CUDA kernels run it.

    q [B, Hq, D] storage dtype, rows in ``plan.batch`` order. Returns o [B, Hq, D] float32
    (and lse [B, Hq] float32 with ``return_lse``), unrounded: ``ChunkAttentionDecode.run``
    rounds o once to the storage dtype.
    """
    check_plan(cache, plan)
    q = storage_view(q)  # ml_dtypes / torch bf16 as uint16 bits, no copy
    group = check_q(cache, q, plan.batch_size)
    cache.check_layer(layer)
    scale = check_scale(scale, cache.head_dim)
    return_lse = check_bool(return_lse, "return_lse")
    c, Hkv = cache.chunk_size, cache.num_kv_heads
    B, Hq, D = q.shape
    qf = to_float32(as_numpy(q), cache.dtype)[plan.order]  # [B, Hq, D] in depth-first order
    kp, vp = as_numpy(cache.k_pool[layer]), as_numpy(cache.v_pool[layer])  # [N, Hkv, c, D]

    def keys(chunks, n_last=c):
        """K, V [n_keys, Hkv, D] float32 of a chunk list whose last chunk holds n_last tokens."""
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


# ============================================================================ 6. the oracle
def oracle_decode(cache: ChunkCache, seqs, q, layer: int = 0, scale: float | None = None):
    """float64 oracle: each query over every token of its own sequence, K/V read back through
    the tree (no plan). q [B, Hq, D] storage dtype, rows in ``seqs`` order.

    Returns (o [B, Hq, D] float64, lse [B, Hq] float64).
    """
    ids = check_cache(cache).check_batch(seqs)
    q = storage_view(q)
    group = check_q(cache, q, len(ids))
    cache.check_layer(layer)
    scale = check_scale(scale, cache.head_dim)
    qf = to_float32(as_numpy(q), cache.dtype).astype(np.float64)
    B, Hq, D = q.shape
    o = np.zeros((B, Hq, D))
    lse = np.zeros((B, Hq))
    for b, sid in enumerate(ids):
        k, v = (to_float32(as_numpy(x), cache.dtype).astype(np.float64) for x in cache.read_kv(sid, layer))
        for h in range(Hq):
            ob, lb = attention_state(qf[b, h][None], k[:, h // group], v[:, h // group], scale, np.float64)
            o[b, h], lse[b, h] = ob[0], lb[0]
    return o, lse


# ============================================================================ 7. plan / run
def check_num_q_heads(cache: ChunkCache, num_q_heads) -> int:
    check_int(num_q_heads, "num_q_heads", 1, INT32_MAX)  # a bool, a float: TypeError
    if num_q_heads % cache.num_kv_heads:
        raise ValueError(f"num_q_heads: expected a positive multiple of num_kv_heads "
                         f"{cache.num_kv_heads}, got {num_q_heads!r}")
    return int(num_q_heads)


def check_output(x, name: str, dtype, shape: tuple) -> np.ndarray:
    """A writable NumPy output array of ``dtype`` and ``shape``."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array, got {type(x).__name__}")
    if x.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    if not x.flags.writeable:
        raise ValueError(f"{name}: expected a writable array, got a read-only one")
    return x


def log_plan(plan: DecodePlan, previous: "DecodePlan | None", seconds: float) -> None:
    """A plan (re)build on the standard logger "cpattn", at DEBUG: batch, cache version, time,
    and why (the first plan, the tree changed, or the batch changed)."""
    log = logging.getLogger("cpattn")
    if not log.isEnabledFor(logging.DEBUG):
        return
    why = ("first plan" if previous is None else
           f"tree changed (version {previous.version} -> {plan.version})" if previous.version != plan.version else
           "batch changed" if previous.batch != plan.batch else "same tree and batch")
    log.debug("decode plan rebuilt: batch %d, cache version %d, %d pieces, %d items, %.3f ms (%s)",
              plan.batch_size, plan.version, plan.num_pieces, plan.num_items, 1e3 * seconds, why)


class ChunkAttentionDecode:
    """Plan/run decoder over a NumPy ``ChunkCache``; the same API as the GPU's
    (``cpattn.chunk_attention.ChunkAttentionDecode``, which returns this class for a NumPy cache).

        dec = ChunkAttentionDecode(cache)
        dec.plan(seq_ids, num_q_heads)      # -> DecodePlan, also dec.decode_plan
        o = dec.run(q, layer)               # o [B, Hq, D] storage dtype
        o, lse = dec.run(q, layer, return_lse=True)

    ``piece_chunks`` / ``private_piece_chunks``: chunks per phase-1 piece / phase-2 item, None
    for no split. "auto" sizes pieces for GPU occupancy; here it means no split (whole
    segments, whole private suffixes), since results never depend on piece sizes.
    ``units_per_sm`` is checked and kept, and only matters to the GPU.
    """

    def __init__(self, cache: ChunkCache, piece_chunks="auto", private_piece_chunks="auto",
                 units_per_sm: int = 4):
        self.piece_chunks = check_piece_chunks(piece_chunks, "piece_chunks", auto=True)
        self.private_piece_chunks = check_piece_chunks(private_piece_chunks, "private_piece_chunks", auto=True)
        self.units_per_sm = check_int(units_per_sm, "units_per_sm", 1, INT32_MAX)
        self.cache = check_cache(cache)
        self.decode_plan: DecodePlan | None = None  # the current plan
        self.num_q_heads: int | None = None

    def plan(self, seqs, num_q_heads: int) -> DecodePlan:
        """Plan a decode step for ``seqs`` (the row order of ``q`` in ``run``)."""
        num_q_heads = check_num_q_heads(self.cache, num_q_heads)
        pc, ppc = (None if x == "auto" else x for x in (self.piece_chunks, self.private_piece_chunks))
        t0 = time.perf_counter()
        previous = self.decode_plan
        self.decode_plan = build_decode_plan(self.cache, seqs, pc, ppc)
        self.num_q_heads = num_q_heads
        log_plan(self.decode_plan, previous, time.perf_counter() - t0)
        return self.decode_plan

    def run(self, q, layer: int = 0, *, scale: float | None = None, out=None, return_lse: bool = False,
            lse_out=None):
        """o [B, Hq, D] in the storage dtype for q [B, Hq, D] (rows in the planned batch order):
        the float32 result rounded once. With ``return_lse`` or ``lse_out`` [B, Hq] float32,
        returns (o, lse). ``out`` / ``lse_out`` are written in place when given."""
        cache = self.cache
        plan = check_plan(cache, self.decode_plan)
        q, out = storage_view(q), storage_view(out)
        check_q(cache, q, plan.batch_size)
        B, Hq, D = plan.batch_size, self.num_q_heads, cache.head_dim
        if q.shape[1] != Hq:
            raise ValueError(f"q: expected {Hq} query heads (as planned), got {q.shape[1]}")
        cache.check_layer(layer)
        check_scale(scale, D)
        return_lse = check_bool(return_lse, "return_lse")
        if out is not None:
            check_output(out, "out", storage_numpy_dtype(cache.dtype), (B, Hq, D))
        if lse_out is not None:
            check_output(lse_out, "lse_out", np.float32, (B, Hq))
        o, lse = decode(cache, plan, q, layer, scale, return_lse=True)
        o = to_storage(o, cache.dtype)
        if out is not None:
            out[...] = o
            o = out
        if lse_out is not None:
            lse_out[...] = lse
            lse = lse_out
        return (o, lse) if return_lse or lse_out is not None else o


__all__ = ["DecodePlan", "build_decode_plan", "split_plan", "merge_states", "attention_state", "decode",
           "oracle_decode", "ChunkAttentionDecode", "check_piece_chunks", "batch_states", "check_q",
           "check_plan", "check_num_q_heads", "SPLIT_FIELDS", "log_plan"]
