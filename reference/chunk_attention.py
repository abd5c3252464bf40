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

Batch-invariant decode (docs/design.md, *Batch-invariant decode*): with ``batch_invariant=True``
each sequence's output is bitwise the same whatever else is in the batch, whether its prefix is
shared or stored on its own, and whatever the piece sizes. The plan cuts every path into fixed
key blocks of ``INVARIANT_BLOCK_CHUNKS`` chunks (``build_decode_plan``), ``decode`` computes
each block's state from one sequence's rows only, and the merge takes a sequence's states in
path order.

Multi-token decode (docs/design.md, *Multi-token decode*): with ``queries_per_seq=k`` every
sequence has ``k`` query tokens, its last ``k`` tokens (their K/V written first): query ``j``
sees the past (every token before the ``k`` new ones) and the new tokens its row of the tree
mask allows (default causal: new tokens ``0..j``). ``q`` has ``B * k`` rows, sequence-major.

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
MAX_QUERIES_PER_SEQ = 16  # query tokens per sequence of a multi-token decode step (speculative drafts)
# Batch-invariant decode: chunks per fixed key block of a path (block m: chunks [8m, 8m + 8)).
INVARIANT_BLOCK_CHUNKS = 8


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

    Multi-token decode: ``queries_per_seq`` (k) query rows per sequence; ``tree_bits`` None
    (causal among the k new tokens) or a tuple of ``B * k`` ints in user order, bit ``i`` of
    entry ``b * k + j`` set when query ``j`` of sequence ``b`` sees new token ``i``.

    Batch-invariant plans (``batch_invariant`` True; ``build_decode_plan``): the same arrays over
    fixed key blocks. Block ``m`` of a path is its chunks ``[8m, 8m + 8)``
    (``INVARIANT_BLOCK_CHUNKS``); a full block whose last node two or more sequences of the batch
    pass through is one segment of one piece (the sequences through that node, a contiguous
    range), every other block (and always a partial last block) an item of its sequence, and
    ``private_chunks`` holds each position's chunks from its first private block on (they may be
    nodes other sequences share). A position's shared blocks come before its private ones, so
    pieces then items is path order.
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
    queries_per_seq: int = 1
    tree_bits: "tuple | None" = None
    batch_invariant: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.batch)

    @property
    def num_queries(self) -> int:
        """Rows of ``q``: ``queries_per_seq`` per sequence."""
        return len(self.batch) * self.queries_per_seq

    def query_bits(self) -> np.ndarray:
        """int64 [B, k] in user order: bit ``i`` of ``[b, j]`` set when query ``j`` of sequence
        ``b`` sees new token ``i`` (causal when the plan has no tree mask)."""
        k = self.queries_per_seq
        if self.tree_bits is None:
            return np.broadcast_to((np.int64(2) << np.arange(k, dtype=np.int64)) - 1, (len(self.batch), k)).copy()
        return np.array(self.tree_bits, np.int64).reshape(len(self.batch), k)

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
        mode = (f", batch-invariant (fixed blocks of {INVARIANT_BLOCK_CHUNKS} chunks)" if self.batch_invariant
                else "")
        return (f"batch {self.batch_size}: {self.num_segments} shared segments in {self.num_pieces} pieces "
                f"({shared} shared chunks read once instead of {flat} times), "
                f"{private} private chunks in {self.num_items} items{mode}")


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


def check_queries_per_seq(value) -> int:
    """``queries_per_seq``: an integer in [1, MAX_QUERIES_PER_SEQ] (a bool, a float: TypeError)."""
    return check_int(value, "queries_per_seq", 1, MAX_QUERIES_PER_SEQ + 1)


def check_query_tokens(states, k: int) -> None:
    """Every sequence holds at least its ``k`` query tokens (their K/V is written before the
    step), else CacheError naming ``seqs``."""
    for s in states:
        if s.n_tokens < k:
            raise CacheError(f"seqs: expected sequences with at least queries_per_seq={k} tokens (append the "
                             f"query tokens' K/V first), got sequence {s.id} with {s.n_tokens}")


def check_tree_mask(tree_mask, batch: int, k: int) -> "tuple | None":
    """A token-tree mask as the plan's ``tree_bits`` (None stays None: causal).

    ``tree_mask``: a host bool array [k, k] (one tree for every sequence) or [batch, k, k];
    ``[b, j, i]`` says whether query ``j`` of sequence ``b`` sees new token ``i``. It must be a
    tree (a forest) over the new tokens in topological order: every token sees itself, no later
    token, and exactly its parent's set plus itself, where the parent is the latest earlier token
    it sees (none: a root, which sees only the past and itself). Wrong type or dtype (integers
    are not bools): TypeError; wrong shape or not a tree: ValueError.
    """
    if tree_mask is None:
        return None
    if not isinstance(tree_mask, (np.ndarray, list, tuple)):
        raise TypeError(f"tree_mask: expected a host bool array [k, k] or [batch, k, k], got "
                        f"{type(tree_mask).__name__}")
    try:
        m = np.asarray(tree_mask)
    except ValueError:  # ragged nesting
        raise ValueError("tree_mask: expected a bool array [k, k] or [batch, k, k], got a ragged nesting") from None
    if m.dtype != np.bool_:
        raise TypeError(f"tree_mask: expected dtype bool (integers are not bools), got {m.dtype}")
    if m.shape == (k, k):
        m = np.broadcast_to(m, (batch, k, k))
    if m.shape != (batch, k, k):
        raise ValueError(f"tree_mask: expected shape ({k}, {k}) or ({batch}, {k}, {k}) for {batch} sequences "
                         f"of queries_per_seq={k}, got {m.shape}")
    bits = np.zeros((batch, k), np.int64)
    for b in range(batch):
        for j in range(k):
            row = m[b, j]
            if not row[j] or row[j + 1:].any():
                raise ValueError(f"tree_mask: expected each token to see itself and no later token, got "
                                 f"sequence {b} query {j} seeing {np.flatnonzero(row).tolist()}")
            earlier = np.flatnonzero(row[:j])
            want = m[b, earlier[-1], :j] if len(earlier) else np.zeros(j, bool)
            if not np.array_equal(row[:j], want):
                raise ValueError(f"tree_mask: expected a token tree (each token sees its parent's tokens and "
                                 f"itself), got sequence {b} query {j} seeing {np.flatnonzero(row).tolist()} but "
                                 f"its parent {int(earlier[-1])} seeing {np.flatnonzero(m[b, earlier[-1]]).tolist()}")
            bits[b, j] = int(np.dot(row.astype(np.int64), np.int64(1) << np.arange(k, dtype=np.int64)))
    return tuple(bits.ravel().tolist())


# ============================================================================ 2. the planner
def build_decode_plan(cache: ChunkCache, seqs, piece_chunks: int | None = None,
                      private_piece_chunks: int | None = None, *, queries_per_seq: int = 1,
                      tree_mask=None, batch_invariant: bool = False) -> DecodePlan:
    """Plan a decode step for ``seqs`` (sequence ids; the row order of ``q``).

    ``piece_chunks`` / ``private_piece_chunks`` cap the chunks of one phase-1 piece / phase-2
    item (None: no split). Results do not depend on them; GPU occupancy does.
    ``queries_per_seq`` / ``tree_mask``: the multi-token step (``check_tree_mask``); the
    partition does not depend on them, only the rows of every piece and item do.
    ``batch_invariant``: the partition of fixed key blocks (``DecodePlan``; passes 3 and 4
    below become 3b); ``piece_chunks`` / ``private_piece_chunks`` are checked and ignored.
    """
    check_piece_chunks(piece_chunks, "piece_chunks")
    check_piece_chunks(private_piece_chunks, "private_piece_chunks")
    batch_invariant = check_bool(batch_invariant, "batch_invariant")
    k = check_queries_per_seq(queries_per_seq)
    ids, states = batch_states(cache, seqs)
    check_query_tokens(states, k)
    tree_bits = check_tree_mask(tree_mask, len(ids), k)
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
    #         child in this batch). (Batch-invariant plans: pass 3b instead of 3 and 4.)
    seg_begin, seg_end, seg_chunks = [], [], []  # [S], [S], [S] lists of pool chunk ids
    for pos, b in enumerate([] if batch_invariant else order):
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

    # Pass 3b (batch-invariant plans). Fixed key blocks: block m of a path is its chunks
    #         [8m, 8m + 8). A full block is named by its last node, and the sequences through
    #         that node (a contiguous range) all hold the same block. With two or more of them
    #         it is a segment, found at its range's first position; else it is private, and so
    #         are the blocks after it (ranges only narrow going down a path) and a partial last
    #         block. Segments come out by first position, then depth: on every path they follow
    #         each other root side first. The private chunks of a position are its path from its
    #         first private block on.
    if batch_invariant:
        n_block = INVARIANT_BLOCK_CHUNKS
        private = []
        for pos, b in enumerate(order):
            path = paths[b]
            m0 = 0  # first chunk of the block looked at
            while m0 + n_block <= len(path) and shared(path[m0 + n_block - 1]):
                last = path[m0 + n_block - 1]
                if begin[last] == pos:
                    seg_begin.append(begin[last])
                    seg_end.append(end[last])
                    seg_chunks.append([n.chunk for n in path[m0:m0 + n_block]])
                m0 += n_block
            private.append([n.chunk for n in path[m0:]])

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
        num_segments=len(seg_chunks), queries_per_seq=k, tree_bits=tree_bits, batch_invariant=batch_invariant,
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
    segments / whole private suffixes). Only the small per-piece arrays change. A
    batch-invariant plan keeps its fixed blocks (the sizes are checked and ignored)."""
    check_instance(plan, "plan", DecodePlan, "a DecodePlan (from build_decode_plan)")
    check_piece_chunks(piece_chunks, "piece_chunks")
    check_piece_chunks(private_piece_chunks, "private_piece_chunks")
    base = {k: v for k, v in plan.__dict__.items() if k not in SPLIT_FIELDS}
    return _split(base, piece_chunks, private_piece_chunks)


def _split(base: dict, piece_chunks, private_piece_chunks) -> DecodePlan:
    if base["batch_invariant"]:  # every segment one block; private suffixes start at a block
        piece_chunks = private_piece_chunks = INVARIANT_BLOCK_CHUNKS
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


def attention_state(q, k, v, scale, dtype=np.float32, mask=None):
    """State of queries q [M, D] over keys k [N, D], values v [N, D]: (o [M, D], lse [M]).

    ``mask`` [M, N] bool (None: every key): key n counts for query m only where set; a query
    that sees no key gets the empty state (o = 0, lse = -inf)."""
    q, k, v = (np.asarray(x, dtype) for x in (q, k, v))
    if k.shape[0] == 0:
        return np.zeros((q.shape[0], v.shape[1]), dtype), np.full(q.shape[0], -np.inf, dtype)
    s = (q @ k.T) * dtype(scale)
    if mask is None:
        m = s.max(axis=1, keepdims=True)
        p = np.exp(s - m)
        l = p.sum(axis=1, keepdims=True)
        return (p @ v) / l, (m + np.log(l))[:, 0]
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    seen = np.isfinite(m)
    m = np.where(seen, m, 0)
    p = np.exp(s - m)  # exp(-inf) = 0
    l = p.sum(axis=1, keepdims=True)
    o = (p @ v) / np.where(seen, l, 1)
    return o, np.where(seen, m + np.log(np.where(seen, l, 1)), -np.inf)[:, 0].astype(dtype)


def check_q(cache: ChunkCache, q, batch: int, queries_per_seq: int = 1) -> int:
    """Check ``q [batch * queries_per_seq, Hq, D]`` in the cache's storage dtype; returns the
    GQA group Hq // Hkv."""
    want = storage_numpy_dtype(cache.dtype)
    if not hasattr(q, "shape") or not hasattr(q, "dtype"):
        raise TypeError(f"q: expected an array [batch, num_q_heads, head_dim], got {type(q).__name__}")
    if len(q.shape) != 3:
        raise ValueError(f"q: expected an array [batch, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    b, hq, d = q.shape
    if b != batch * queries_per_seq:
        if queries_per_seq == 1:
            raise ValueError(f"q: expected batch {batch} (one row per sequence), got {b}")
        raise ValueError(f"q: expected {batch * queries_per_seq} rows ({batch} sequences x queries_per_seq="
                         f"{queries_per_seq}, sequence-major), got {b}")
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


def key_starts(plan: DecodePlan) -> tuple:
    """(piece_key0 [P], item_key0 [I]) int64: the position in its sequence of the first key of
    every piece and item (tokens on the path before it). A piece is at the same depth on every
    path through it."""
    c = plan.chunk_size
    piece_key0 = np.zeros(plan.num_pieces, np.int64)
    for pos in range(plan.batch_size):
        before = 0
        for p in plan.seq_pieces[plan.seq_piece_indptr[pos]: plan.seq_piece_indptr[pos + 1]]:
            piece_key0[p] = before
            before += c * int(plan.piece_chunk_indptr[p + 1] - plan.piece_chunk_indptr[p])
    tail = plan.private_indptr[plan.item_pos + 1] - plan.item_begin  # private chunks from the item on
    item_key0 = c * (plan.path_len[plan.item_pos].astype(np.int64) - tail)
    return piece_key0, item_key0


# ============================================================================ 5. two-phase decode
def decode(cache: ChunkCache, plan: DecodePlan, q, layer: int = 0, scale: float | None = None,
           return_lse: bool = False):
    """The two-phase partition over ``plan``, as the CUDA kernels run it.

    q [B * k, Hq, D] storage dtype (k = ``plan.queries_per_seq``), rows in ``plan.batch`` order,
    the k queries of a sequence together. Returns o [B * k, Hq, D] float32 (and lse [B * k, Hq]
    float32 with ``return_lse``), unrounded: ``ChunkAttentionDecode.run`` rounds o once to the
    storage dtype.

    With k > 1 every phase masks the keys its rows may not see: query ``j`` of a sequence of
    length ``L`` sees positions ``< L - k`` and the new positions ``L - k + i`` of its tree bits;
    only pieces and items that hold new tokens have keys masked.

    A batch-invariant plan: the state of every (sequence, block) is computed from that
    sequence's rows alone (the same arrays of the same shapes whether the block is a piece or an
    item, so the same bits), and each sequence merges its states in path order.
    """
    check_plan(cache, plan)
    q = storage_view(q)  # ml_dtypes / torch bf16 as uint16 bits, no copy
    kq = plan.queries_per_seq
    group = check_q(cache, q, plan.batch_size, kq)
    cache.check_layer(layer)
    scale = check_scale(scale, cache.head_dim)
    return_lse = check_bool(return_lse, "return_lse")
    c, Hkv = cache.chunk_size, cache.num_kv_heads
    B, Hq, D = plan.batch_size, q.shape[1], q.shape[2]
    # [B, k, Hq, D] in depth-first order
    qf = to_float32(as_numpy(q), cache.dtype).reshape(B, kq, Hq, D)[plan.order]
    kp, vp = as_numpy(cache.k_pool[layer]), as_numpy(cache.v_pool[layer])  # [N, Hkv, c, D]
    lens = cache.slot_lens[plan.slots].astype(np.int64)  # [B] current lengths, depth-first order
    new0 = lens - kq  # position of each sequence's first query token
    bits = plan.query_bits()[plan.order]  # [B, k]
    piece_key0, item_key0 = key_starts(plan)

    def keys(chunks, n_last=c):
        """K, V [n_keys, Hkv, D] float32 of a chunk list whose last chunk holds n_last tokens."""
        k = to_float32(kp[chunks], cache.dtype).transpose(0, 2, 1, 3).reshape(-1, Hkv, D)
        v = to_float32(vp[chunks], cache.dtype).transpose(0, 2, 1, 3).reshape(-1, Hkv, D)
        n = len(chunks) * c - (c - n_last)
        return k[:n], v[:n]

    def visible(pos0, pos1, key0, n):
        """[(pos1-pos0) * k * group, n] bool: which of the keys at positions key0..key0+n-1
        each row (sequence, query, head of the group) sees; None when every row sees all."""
        if kq == 1:
            return None  # one query: it is the last token and sees every key
        rel = key0 + np.arange(n)[None, :] - new0[pos0:pos1, None]  # [b, n]: offset into the new tokens
        see = (rel[:, None, :] < 0) | (((bits[pos0:pos1, :, None] >> np.clip(rel, 0, 62)[:, None, :]) & 1) == 1)
        return np.repeat(see[:, :, None, :], group, axis=2).reshape(-1, n)  # rows (sequence, query, head)

    # phase 1: per (piece, kv head), rows = (sequence in range) x (query) x (query head in group)
    S = plan.num_state_rows
    o1 = np.zeros((S, kq, Hq, D), np.float32)
    lse1 = np.full((S, kq, Hq), -np.inf, np.float32)
    for p in range(plan.num_pieces):
        b0, b1 = plan.piece_begin[p], plan.piece_end[p]
        k, v = keys(plan.piece_chunks[plan.piece_chunk_indptr[p]: plan.piece_chunk_indptr[p + 1]])
        mask = visible(b0, b1, piece_key0[p], len(k))
        rows = slice(plan.piece_state_offset[p], plan.piece_state_offset[p + 1])
        for h in range(Hkv):
            heads = slice(h * group, (h + 1) * group)
            if plan.batch_invariant:  # one sequence's rows at a time, as its item would be
                for pos in range(b0, b1):
                    row = plan.piece_state_offset[p] + pos - b0
                    om, lm = attention_state(qf[pos, :, heads].reshape(-1, D), k[:, h], v[:, h], scale,
                                             mask=visible(pos, pos + 1, piece_key0[p], len(k)))
                    o1[row, :, heads], lse1[row, :, heads] = om.reshape(kq, group, D), lm.reshape(kq, group)
                continue
            qm = qf[b0:b1, :, heads].reshape(-1, D)  # [(b1-b0)*k*group, D]
            om, lm = attention_state(qm, k[:, h], v[:, h], scale, mask=mask)
            o1[rows, :, heads] = om.reshape(b1 - b0, kq, group, D)
            lse1[rows, :, heads] = lm.reshape(b1 - b0, kq, group)

    # phase 2: per (private item, kv head); only the sequence's last chunk is partial
    n_last = lens - c * (plan.path_len - 1)
    o2 = np.zeros((plan.num_items, kq, Hq, D), np.float32)
    lse2 = np.full((plan.num_items, kq, Hq), -np.inf, np.float32)
    for i in range(plan.num_items):
        pos = plan.item_pos[i]
        last = plan.item_end[i] == plan.private_indptr[pos + 1]
        k, v = keys(plan.private_chunks[plan.item_begin[i]: plan.item_end[i]], n_last[pos] if last else c)
        mask = visible(pos, pos + 1, item_key0[i], len(k))
        for h in range(Hkv):
            heads = slice(h * group, (h + 1) * group)
            om, lm = attention_state(qf[pos, :, heads].reshape(-1, D), k[:, h], v[:, h], scale, mask=mask)
            o2[i, :, heads], lse2[i, :, heads] = om.reshape(kq, group, D), lm.reshape(kq, group)

    # merge: each (sequence, query)'s phase-1 states (pieces on its path) and phase-2 states (its items)
    o = np.zeros((B, kq, Hq, D), np.float32)
    lse = np.full((B, kq, Hq), -np.inf, np.float32)
    for pos in range(B):
        for p in plan.seq_pieces[plan.seq_piece_indptr[pos]: plan.seq_piece_indptr[pos + 1]]:
            row = plan.piece_state_offset[p] + pos - plan.piece_begin[p]
            o[pos], lse[pos] = merge_states(o[pos], lse[pos], o1[row], lse1[row])
        for i in range(plan.seq_item_indptr[pos], plan.seq_item_indptr[pos + 1]):
            o[pos], lse[pos] = merge_states(o[pos], lse[pos], o2[i], lse2[i])

    out, out_lse = np.empty_like(o), np.empty_like(lse)
    out[plan.order], out_lse[plan.order] = o, lse  # back to the caller's batch order
    out, out_lse = out.reshape(B * kq, Hq, D), out_lse.reshape(B * kq, Hq)
    return (out, out_lse) if return_lse else out


# ============================================================================ 6. the oracle
def oracle_decode(cache: ChunkCache, seqs, q, layer: int = 0, scale: float | None = None, *,
                  queries_per_seq: int = 1, tree_mask=None):
    """float64 oracle: each query over the tokens of its own sequence it may see, K/V read back
    through the tree (no plan). q [B * k, Hq, D] storage dtype, rows in ``seqs`` order, the k
    queries of a sequence together; query ``j`` of a sequence of length ``L`` sees positions
    ``0 .. L-k-1`` and the new tokens ``L-k+i`` of its ``tree_mask`` row (default ``i <= j``).

    Returns (o [B * k, Hq, D] float64, lse [B * k, Hq] float64).
    """
    ids = check_cache(cache).check_batch(seqs)
    kq = check_queries_per_seq(queries_per_seq)
    check_query_tokens([cache.sequence(i, "seqs") for i in ids], kq)
    tree_bits = check_tree_mask(tree_mask, len(ids), kq)
    q = storage_view(q)
    group = check_q(cache, q, len(ids), kq)
    cache.check_layer(layer)
    scale = check_scale(scale, cache.head_dim)
    qf = to_float32(as_numpy(q), cache.dtype).astype(np.float64)
    R, Hq, D = q.shape
    o = np.zeros((R, Hq, D))
    lse = np.zeros((R, Hq))
    if tree_bits is None:  # causal: query j sees new tokens 0..j
        tree_bits = [(2 << j) - 1 for _ in ids for j in range(kq)]
    for b, sid in enumerate(ids):
        k, v = (to_float32(as_numpy(x), cache.dtype).astype(np.float64) for x in cache.read_kv(sid, layer))
        past = len(k) - kq
        for j in range(kq):
            seen = [i for i in range(kq) if tree_bits[b * kq + j] >> i & 1]
            idx = np.concatenate([np.arange(past), past + np.array(seen, np.int64)]).astype(np.int64)
            r = b * kq + j
            for h in range(Hq):
                ob, lb = attention_state(qf[r, h][None], k[idx, h // group], v[idx, h // group], scale, np.float64)
                o[r, h], lse[r, h] = ob[0], lb[0]
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
    log.debug("decode plan rebuilt: batch %d, cache version %d, %d pieces, %d items%s, %.3f ms (%s)",
              plan.batch_size, plan.version, plan.num_pieces, plan.num_items,
              ", batch-invariant" if plan.batch_invariant else "", 1e3 * seconds, why)


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

    ``batch_invariant=True``: every plan is batch-invariant (``build_decode_plan``): a
    sequence's output is bitwise the same whatever the rest of the batch, the sharing and the
    piece sizes (which are then checked and ignored).
    """

    def __init__(self, cache: ChunkCache, piece_chunks="auto", private_piece_chunks="auto",
                 units_per_sm: int = 4, *, batch_invariant: bool = False):
        self.piece_chunks = check_piece_chunks(piece_chunks, "piece_chunks", auto=True)
        self.private_piece_chunks = check_piece_chunks(private_piece_chunks, "private_piece_chunks", auto=True)
        self.units_per_sm = check_int(units_per_sm, "units_per_sm", 1, INT32_MAX)
        self.batch_invariant = check_bool(batch_invariant, "batch_invariant")
        self.cache = check_cache(cache)
        self.decode_plan: DecodePlan | None = None  # the current plan
        self.plan_reused = False  # (the GPU decoder's: the last plan went into the buffers of the one before)
        self.num_q_heads: int | None = None

    def plan(self, seqs, num_q_heads: int, *, queries_per_seq: int = 1, tree_mask=None) -> DecodePlan:
        """Plan a decode step for ``seqs`` (the row order of ``q`` in ``run``): one query token
        per sequence, or ``queries_per_seq`` (causal among them, or as ``tree_mask`` says; see
        ``check_tree_mask``), the sequence's last tokens."""
        num_q_heads = check_num_q_heads(self.cache, num_q_heads)
        pc, ppc = (None if x == "auto" else x for x in (self.piece_chunks, self.private_piece_chunks))
        t0 = time.perf_counter()
        previous = self.decode_plan
        self.decode_plan = build_decode_plan(self.cache, seqs, pc, ppc, queries_per_seq=queries_per_seq,
                                             tree_mask=tree_mask, batch_invariant=self.batch_invariant)
        self.num_q_heads = num_q_heads
        log_plan(self.decode_plan, previous, time.perf_counter() - t0)
        return self.decode_plan

    def run(self, q, layer: int = 0, *, scale: float | None = None, out=None, return_lse: bool = False,
            lse_out=None):
        """o [B, Hq, D] in the storage dtype for q [B, Hq, D] (rows in the planned batch order):
        the float32 result rounded once. With ``return_lse`` or ``lse_out`` [B, Hq] float32,
        returns (o, lse). ``out`` / ``lse_out`` are written in place when given. A multi-token
        plan takes and gives ``B * queries_per_seq`` rows, sequence-major."""
        cache = self.cache
        plan = check_plan(cache, self.decode_plan)
        q, out = storage_view(q), storage_view(out)
        check_q(cache, q, plan.batch_size, plan.queries_per_seq)
        B, Hq, D = plan.num_queries, self.num_q_heads, cache.head_dim
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
           "check_plan", "check_num_q_heads", "SPLIT_FIELDS", "log_plan", "MAX_QUERIES_PER_SEQ",
           "check_queries_per_seq", "check_query_tokens", "check_tree_mask", "key_starts", "INVARIANT_BLOCK_CHUNKS"]
