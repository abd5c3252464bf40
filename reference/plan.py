"""Decode plan: the flat int32 arrays the two-phase partition reads.

A plan maps a batch of sequence ids to the depth-first order of the tree, in which every node
covers a contiguous range of batch positions. It is rebuilt only when the tree or the batch
changes (``cache.version``), not on every appended token: the length of each sequence's last
chunk is read at run time from ``cache.slot_lens``.

Vocabulary (docs/design.md, "ChunkAttention decode"):

* a node is **shared** in this batch when two or more of its sequences pass through it (a
  node shared only with sequences outside the batch is private here);
* a **segment** is a maximal run of shared nodes on a path with the same batch range; a long
  segment is split into **pieces** of at most ``piece_chunks`` chunks (phase 1 work);
* the rest of a path is the sequence's **private** chunks, split into **items** of at most
  ``private_piece_chunks`` chunks (phase 2 work).

Arrays (``P`` pieces, ``B`` batch, ``I`` private items), positions are DFS batch positions:

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
    seq_item_indptr     [B+1]   CSR: the items of each position are item_indptr[pos]..[pos+1]
"""
from __future__ import annotations

import functools
import itertools
import operator
import weakref
from dataclasses import dataclass

import numpy as np

from .chunk_cache import CacheError, ChunkCache

_I32 = np.int32


@dataclass(frozen=True)
class DecodePlan:
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
        return int(self.piece_state_offset[-1])

    def arrays(self) -> dict:
        """Every int32 array of the plan by name (what a GPU backend uploads)."""
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


# ---------------------------------------------------------------------- compiled loops
def _jit(fn):
    """``fn`` compiled with numba on its first call, so ``import cpattn`` stays cheap; the
    machine code is cached on disk, so a later process only loads it. With NUMBA_DISABLE_JIT=1
    it runs as plain Python (same results, slow)."""
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


# ---------------------------------------------------------------------- node table
# What a plan needs of a node is immutable (pool chunk, creation serial, parent, depth), and a
# node on a live path keeps its chunk, so it is kept per cache in arrays indexed by chunk id and
# learnt only for nodes not seen before. An entry is valid for a node when its serial matches:
# a freed chunk reused by a new node (new serial) is learnt again. A valid entry's ancestors are
# valid too: the ancestors of a live node are live, so their chunks cannot be reused.
_TABLES: "weakref.WeakKeyDictionary[ChunkCache, _NodeTable]" = weakref.WeakKeyDictionary()
_CHUNK, _SERIAL, _PARENT = operator.attrgetter("chunk"), operator.attrgetter("serial"), operator.attrgetter("parent")
_N_TOKENS, _SLOT = operator.attrgetter("n_tokens"), operator.attrgetter("slot")


class _NodeTable:
    """Per-cache int64 arrays [num_chunks]: serial, parent chunk and depth of the node holding
    each chunk (-1: unknown / the root), and ``seen``, scratch of ``_plan_core``."""

    def __init__(self, cache: ChunkCache):
        n = cache.num_chunks
        self.serial = np.full(n, -1, np.int64)
        self.parent = np.full(n, -1, np.int64)
        self.depth = np.zeros(n, np.int64)
        self.seen = np.full(n, -1, np.int64)
        # each plan build marks `seen` with its own window [stamp, stamp + num_chunks) of values,
        # so the scratch is never cleared and builds in two threads ignore each other's marks
        self._stamps = itertools.count()
        self._window = n + 1

    def stamp(self) -> int:
        return next(self._stamps) * self._window

    def known(self, node) -> bool:
        return self.serial[node.chunk] == node.serial

    def learn(self, states: list, tails: list, chunk: np.ndarray, serial: np.ndarray) -> None:
        """Enter the nodes the table lacks on the paths of ``states``, whose last nodes
        (``tails``, with their chunk and serial arrays) it lacks. Known nodes are a prefix of
        every path (a known node's ancestors are known), and entries are written parents first,
        serial last, which keeps it so."""
        # 1. a new last node under a known parent (every sequence opened a chunk): vectorised
        parents = list(map(_PARENT, tails))
        pc = np.fromiter(map(_CHUNK, parents), np.int64, len(parents))
        ps = np.fromiter(map(_SERIAL, parents), np.int64, len(parents))
        one = (pc < 0) | (self.serial[pc] == ps)  # (pc = -1 reads the last entry; masked)
        if one.any():
            k = np.flatnonzero(one)
            c, p = chunk[k], pc[k]
            self.parent[c] = p
            self.depth[c] = np.where(p >= 0, self.depth[p], 0) + 1
            self.serial[c] = serial[k]
        # 2. longer new suffixes (a new prompt, the first plan of a cache): one path at a time,
        #    so a prefix shared with a later path is entered once
        for i in np.flatnonzero(~one).tolist():
            path = states[i].path
            lo, hi = 0, len(path)  # binary search for the first unknown node
            while lo < hi:
                mid = (lo + hi) // 2
                if self.known(path[mid]):
                    lo = mid + 1
                else:
                    hi = mid
            new = path[lo:]
            if not new:
                continue
            c = np.fromiter(map(_CHUNK, new), np.int64, len(new))
            p = np.empty_like(c)
            p[0] = path[lo - 1].chunk if lo else -1
            p[1:] = c[:-1]
            self.parent[c] = p
            self.depth[c] = np.arange(lo + 1, len(path) + 1)
            self.serial[c] = np.fromiter(map(_SERIAL, new), np.int64, len(new))


def _node_table(cache: ChunkCache) -> _NodeTable:
    t = _TABLES.get(cache)
    if t is None:
        t = _TABLES[cache] = _NodeTable(cache)
    return t


@_jit
def _plan_core(tails, node_serial, node_parent, node_depth, seen, stamp):
    """Depth-first order, shared segments and private suffixes of the paths ending at ``tails``.

    tails [B] pool chunk of each sequence's last node (batch order); node_* [num_chunks] the
    node table; seen [num_chunks] scratch: seen[c] = stamp + v when chunk c is local node v of
    this call. Work is linear in the distinct nodes of the batch's paths, not in B x depth.
    """
    B = len(tails)

    # 1. the batch's subtree: walk up from each tail until a node met before (or the root);
    #    nodes get local ids v in [0, n), up[v] is the parent's (-1: the root)
    path_len = np.empty(B, np.int64)
    cap = 0  # no more nodes than path cells, or than pool chunks (sized up front: arrays grown
    for b in range(B):  # in a loop are slow)
        path_len[b] = node_depth[tails[b]]
        cap += path_len[b]
    if cap > len(node_serial):
        cap = len(node_serial)
    chunk = np.empty(cap, np.int64)  # [n] pool chunk of local node v
    up = np.empty(cap, np.int64)  # [n] its parent's local id, -1 for the root
    tail_of = np.empty(B, np.int64)  # [B] local id of each row's last node
    n = 0
    for b in range(B):
        c = tails[b]
        child = -1  # the node walked just before, whose parent c is
        while True:
            if c < 0:
                v, met = -1, True
            else:
                v = seen[c] - stamp
                met = 0 <= v < n
            if not met:
                if n == cap:  # only if the node table disagrees with the tree (a bug)
                    raise RuntimeError("plan: node table inconsistent with the tree")
                v = n
                n += 1
                seen[c] = stamp + v
                chunk[v] = c
            if child >= 0:
                up[child] = v
            else:
                tail_of[b] = v
            if met:
                break
            child = v
            c = node_parent[c]

    # 2. children of every node (the root is node n), siblings in creation (serial) order,
    #    and the rows ending at every node, in batch order
    root = n
    kid_ptr = np.zeros(n + 2, np.int64)
    for v in range(n):
        kid_ptr[(up[v] if up[v] >= 0 else root) + 1] += 1
    row_ptr = np.zeros(n + 2, np.int64)
    for b in range(B):
        row_ptr[tail_of[b] + 1] += 1
    for v in range(n + 1):
        kid_ptr[v + 1] += kid_ptr[v]
        row_ptr[v + 1] += row_ptr[v]
    kids = np.empty(n, np.int64)
    kid_fill = kid_ptr[:n + 1].copy()
    for v in range(n):
        p = up[v] if up[v] >= 0 else root
        kids[kid_fill[p]] = v
        kid_fill[p] += 1
    key = np.empty(n, np.int64)
    for v in range(n + 1):  # shell sort by serial (numba's argsort takes seconds to compile)
        lo, hi = kid_ptr[v], kid_ptr[v + 1]
        if hi - lo < 2:
            continue
        for i in range(lo, hi):
            key[i] = node_serial[chunk[kids[i]]]
        gap = (hi - lo) // 2
        while gap:
            for i in range(lo + gap, hi):
                x, kx, j = kids[i], key[i], i
                while j - gap >= lo and key[j - gap] > kx:
                    kids[j], key[j] = kids[j - gap], key[j - gap]
                    j -= gap
                kids[j], key[j] = x, kx
            gap //= 2
    rows = np.empty(B, np.int64)
    row_fill = row_ptr[:n + 1].copy()
    for b in range(B):
        rows[row_fill[tail_of[b]]] = b
        row_fill[tail_of[b]] += 1

    # 3. depth-first pre-order: a node's rows, then its children's subtrees. Positions follow
    #    the rows; every node gets the batch range [begin, end) of the paths through it.
    begin = np.empty(n + 1, np.int64)
    end = np.empty(n + 1, np.int64)
    pre = np.empty(n, np.int64)
    order = np.empty(B, np.int32)
    stack = np.empty(n + 1, np.int64)  # nodes entered, not left
    next_kid = kid_ptr[:n + 1].copy()  # each node's next child to enter
    stack[0] = root
    top, pos, k = 1, 0, 0
    begin[root] = 0
    while top:
        v = stack[top - 1]
        i = next_kid[v]
        if i == kid_ptr[v + 1]:
            end[v] = pos
            top -= 1
            continue
        next_kid[v] = i + 1
        u = kids[i]
        begin[u] = pos
        pre[k] = u
        k += 1
        for j in range(row_ptr[u], row_ptr[u + 1]):
            order[pos] = rows[j]
            pos += 1
        stack[top] = u
        top += 1

    # 4. segments, in pre-order (= by first position, then depth): a shared node (range of 2 or
    #    more) whose parent is the root or has a wider range starts one, which runs down
    #    through the nodes with the same range
    seg_begin = np.empty(n, np.int32)
    seg_end = np.empty(n, np.int32)
    seg_chunk_indptr = np.zeros(n + 1, np.int32)
    seg_chunks = np.empty(n, np.int32)
    S = 0
    t = 0
    for j in range(n):
        v = pre[j]
        if end[v] - begin[v] < 2:
            continue
        p = up[v]
        if p >= 0 and begin[p] == begin[v] and end[p] == end[v]:
            continue  # inside its parent's segment
        seg_begin[S], seg_end[S] = begin[v], end[v]
        w = v
        while True:
            seg_chunks[t] = chunk[w]
            t += 1
            if kid_ptr[w] == kid_ptr[w + 1]:
                break
            u = kids[kid_ptr[w]]
            if begin[u] != begin[w] or end[u] != end[w]:
                break
            w = u
        S += 1
        seg_chunk_indptr[S] = t

    # 5. private suffixes: the nodes of a path below its last shared one, root side first
    private_indptr = np.zeros(B + 1, np.int32)
    for q in range(B):
        v = tail_of[order[q]]
        m = 0
        while v >= 0 and end[v] - begin[v] == 1:
            m += 1
            v = up[v]
        private_indptr[q + 1] = private_indptr[q] + m
    private_chunks = np.empty(private_indptr[B], np.int32)
    for q in range(B):
        v = tail_of[order[q]]
        j = private_indptr[q + 1]
        while j > private_indptr[q]:
            j -= 1
            private_chunks[j] = chunk[v]
            v = up[v]
    path_len_pos = np.empty(B, np.int32)
    for q in range(B):
        path_len_pos[q] = path_len[order[q]]
    # (plain loops and views: numba compiles fancy indexing, astype and copies slowly)
    return (order, path_len_pos, seg_begin[:S], seg_end[:S], seg_chunk_indptr[:S + 1], seg_chunks[:t],
            private_indptr, private_chunks)


def _batch_states(cache: ChunkCache, seqs):
    """(ids, states) of the batch; distinct live int ids skip the per-id checks of
    ``cache.check_batch``, which anything else goes through (same errors)."""
    if isinstance(seqs, (list, tuple)):
        ids = list(seqs)
    elif isinstance(seqs, np.ndarray) and seqs.dtype.kind in "iu":
        ids = seqs.reshape(-1).tolist()
    else:
        ids = None
    if ids and set(map(type, ids)) == {int} and len(set(ids)) == len(ids):
        states = cache.live_states(ids)
        if states is not None:
            return ids, states
    ids = cache.check_batch(seqs)
    return ids, [cache.sequence(i) for i in ids]


def check_piece_sizes(piece_chunks, private_piece_chunks) -> None:
    for name, val in (("piece_chunks", piece_chunks), ("private_piece_chunks", private_piece_chunks)):
        if val is not None and (not isinstance(val, (int, np.integer)) or val < 1):
            raise ValueError(f"{name}: expected None or an integer >= 1, got {val!r}")


def plan_base(cache: ChunkCache, seqs) -> dict:
    """The unsplit part of a plan (what ``split_plan`` keeps) for ``seqs``.

    Python touches each sequence once (its slot and last node); the rest is ``_plan_core`` over
    the per-cache node table, which learns only the nodes it has not seen (new chunks).
    """
    ids, states = _batch_states(cache, seqs)
    if 0 in map(_N_TOKENS, states):
        s = next(s for s in states if s.n_tokens == 0)
        raise CacheError(f"seqs: sequence {s.id} has no tokens; append the query token's K/V first")
    B = len(states)
    tails = [s.path[-1] for s in states]
    tail_chunk = np.fromiter(map(_CHUNK, tails), np.int64, B)
    tail_serial = np.fromiter(map(_SERIAL, tails), np.int64, B)
    t = _node_table(cache)
    miss = t.serial[tail_chunk] != tail_serial
    if miss.any():
        k = np.flatnonzero(miss)
        t.learn([states[i] for i in k.tolist()], [tails[i] for i in k.tolist()], tail_chunk[k], tail_serial[k])
    order, path_len, sb, se, seg_chunk_indptr, seg_chunks, private_indptr, private_chunks = _plan_core(
        tail_chunk, t.serial, t.parent, t.depth, t.seen, t.stamp())
    slots = np.fromiter(map(_SLOT, states), _I32, B)[order]
    return dict(batch=tuple(ids), version=cache.version, chunk_size=cache.chunk_size,
                order=order, slots=slots, path_len=path_len,
                seg_begin=sb, seg_end=se, seg_chunk_indptr=seg_chunk_indptr, piece_chunks=seg_chunks,
                private_indptr=private_indptr, private_chunks=private_chunks, num_segments=len(sb))


def build_decode_plan(cache: ChunkCache, seqs, piece_chunks: int | None = None,
                      private_piece_chunks: int | None = None) -> DecodePlan:
    """Plan a decode step for ``seqs`` (sequence ids; the query order of ``q``).

    ``piece_chunks`` / ``private_piece_chunks`` cap the chunks of one phase-1 piece / phase-2
    item (None: no split). Results do not depend on them; GPU occupancy does.
    """
    check_piece_sizes(piece_chunks, private_piece_chunks)
    return split_plan(None, piece_chunks, private_piece_chunks, base=plan_base(cache, seqs))


@_jit
def _split_core(seg_begin, seg_end, seg_chunk_indptr, private_indptr, step, pstep):
    """Pieces of at most ``step`` chunks, items of at most ``pstep`` (0: no split)."""
    S = len(seg_begin)
    B = len(private_indptr) - 1
    if step == 0:
        step = 1
        for s in range(S):
            step = max(step, seg_chunk_indptr[s + 1] - seg_chunk_indptr[s])
    if pstep == 0:
        pstep = 1
        for pos in range(B):
            pstep = max(pstep, private_indptr[pos + 1] - private_indptr[pos])

    # pieces: contiguous runs of at most `step` chunks of each segment (same flat chunk list)
    P = 0
    for s in range(S):
        P += -(-(seg_chunk_indptr[s + 1] - seg_chunk_indptr[s]) // step)
    piece_chunk_indptr = np.empty(P + 1, np.int32)
    piece_begin = np.empty(P, np.int32)
    piece_end = np.empty(P, np.int32)
    piece_state_offset = np.zeros(P + 1, np.int32)
    p = 0
    for s in range(S):
        for a in range(seg_chunk_indptr[s], seg_chunk_indptr[s + 1], step):
            piece_chunk_indptr[p] = a
            piece_begin[p], piece_end[p] = seg_begin[s], seg_end[s]
            piece_state_offset[p + 1] = piece_state_offset[p] + seg_end[s] - seg_begin[s]
            p += 1
    piece_chunk_indptr[P] = seg_chunk_indptr[S]

    # each position's pieces in piece order (root side first: pieces are in segment-start order)
    seq_piece_indptr = np.zeros(B + 1, np.int32)
    for p in range(P):
        for pos in range(piece_begin[p], piece_end[p]):
            seq_piece_indptr[pos + 1] += 1
    for pos in range(B):
        seq_piece_indptr[pos + 1] += seq_piece_indptr[pos]
    fill = seq_piece_indptr[:B].copy()
    seq_pieces = np.empty(piece_state_offset[P], np.int32)
    for p in range(P):
        for pos in range(piece_begin[p], piece_end[p]):
            seq_pieces[fill[pos]] = p
            fill[pos] += 1

    # phase-2 items: runs of at most `pstep` private chunks of one position
    seq_item_indptr = np.zeros(B + 1, np.int32)
    for pos in range(B):
        seq_item_indptr[pos + 1] = seq_item_indptr[pos] - (-(private_indptr[pos + 1] - private_indptr[pos]) // pstep)
    I = seq_item_indptr[B]
    item_pos = np.empty(I, np.int32)
    item_begin = np.empty(I, np.int32)
    item_end = np.empty(I, np.int32)
    i = 0
    for pos in range(B):
        for a in range(private_indptr[pos], private_indptr[pos + 1], pstep):
            item_pos[i], item_begin[i] = pos, a
            item_end[i] = min(a + pstep, private_indptr[pos + 1])
            i += 1
    return (piece_begin, piece_end, piece_chunk_indptr, piece_state_offset, seq_piece_indptr, seq_pieces,
            item_pos, item_begin, item_end, seq_item_indptr)


_BASE_FIELDS = ("batch", "version", "chunk_size", "order", "slots", "path_len", "seg_begin", "seg_end",
                "seg_chunk_indptr", "piece_chunks", "private_indptr", "private_chunks", "num_segments")
_SPLIT_FIELDS = ("piece_begin", "piece_end", "piece_chunk_indptr", "piece_state_offset", "seq_piece_indptr",
                 "seq_pieces", "item_pos", "item_begin", "item_end", "seq_item_indptr")


def split_plan(plan: DecodePlan | None, piece_chunks: int | None = None, private_piece_chunks: int | None = None,
               base: dict | None = None) -> DecodePlan:
    """The same plan with pieces / items of at most the given number of chunks (None: whole
    segments / whole private suffixes). Cheap: only the small per-piece arrays change."""
    check_piece_sizes(piece_chunks or None, private_piece_chunks or None)  # 0 still means None
    if base is None:
        base = {k: getattr(plan, k) for k in _BASE_FIELDS}
    split = _split_core(base["seg_begin"], base["seg_end"], base["seg_chunk_indptr"], base["private_indptr"],
                        int(piece_chunks or 0), int(private_piece_chunks or 0))
    return DecodePlan(**dict(zip(_SPLIT_FIELDS, split)), **base)
