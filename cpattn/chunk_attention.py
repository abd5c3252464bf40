"""ChunkAttention decode on the GPU: the fast host planner, work units, and the plan/run class.

    dec = ChunkAttentionDecode(cache)          # cache: GpuChunkCache (a NumPy cache gets the reference)
    dec.plan(seq_ids, num_q_heads=32)          # host work + one upload; may sync
    for layer in range(L):
        o = dec.run(q[layer], layer)           # two launches on the current stream, no sync

docs/design.md, *ChunkAttention decode*. The plan means what ``reference/chunk_attention.py``
says (its ``DecodePlan``, built there by the textbook planner); here the same arrays come from
numba loops over a per-cache node table, tested equal to the reference on random trees
(tests/test_planner.py). ``run`` is CUDA-graph capturable: it allocates nothing once the output
buffers exist (pass ``out=`` and ``lse_out=``) and reads sequence lengths from the cache's
device table, so the same plan serves every layer and every decode step until the tree changes
(a new chunk, a new or released sequence); ``run`` then raises instead of computing with a
stale plan.
"""
from __future__ import annotations

import itertools
import math
import operator
import time
import types
import weakref

import numpy as np

from .arrays import as_cupy, host_jit, import_cupy
from .kernels import DECODE_ROWS as ROWS_PER_UNIT  # rows of a phase-2 unit (and of phase-1 units at chunk 128)
from .kernels import THREADS, UNIT_FIELDS, UNIT_WIDTH, decode_smem_bytes, get_kernels, invariant_rows, phase1_rows
from .reference import chunk_attention as reference
from .reference.checks import INT32_MAX, check_bool, check_instance, check_int, check_scale
from .reference.chunk_attention import INVARIANT_BLOCK_CHUNKS, SPLIT_FIELDS, DecodePlan, batch_states, \
    check_num_q_heads, check_piece_chunks, check_plan, check_q, check_queries_per_seq, check_query_tokens, \
    check_tree_mask, log_plan
from .reference.chunk_cache import ChunkCache, check_cache

_I32 = np.int32
LOG2E = 1.4426950408889634  # the kernels exponentiate with exp2: scores are scaled by scale * log2(e)

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

@host_jit
def _plan_core(tails, node_serial, node_parent, node_depth, seen, stamp, block):
    """Depth-first order, shared segments and private suffixes of the paths ending at ``tails``.

    tails [B] pool chunk of each sequence's last node (batch order); node_* [num_chunks] the
    node table; seen [num_chunks] scratch: seen[c] = stamp + v when chunk c is local node v of
    this call. Work is linear in the distinct nodes of the batch's paths, not in B x depth.
    ``block`` > 0: the batch-invariant partition of fixed blocks of ``block`` chunks (the
    reference's pass 3b; its work is linear in the batch's path cells).
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
    path_len_pos = np.empty(B, np.int32)
    for q in range(B):
        path_len_pos[q] = path_len[order[q]]
    if block > 0:
        # 4b. fixed blocks (batch-invariant plans): block m of a path is its chunks [m*block,
        #     (m+1)*block); a full block whose last node has a range of 2 or more is a segment,
        #     made at its range's first position; the blocks from a path's first private one on
        #     are its private chunks
        longest = 0
        for q in range(B):
            longest = max(longest, path_len_pos[q])
        path = np.empty(longest, np.int64)  # local ids of one path, root side first
        private_indptr = np.zeros(B + 1, np.int32)
        for q in range(B):
            L = path_len_pos[q]
            v = tail_of[order[q]]
            for d in range(L - 1, -1, -1):
                path[d] = v
                v = up[v]
            m0 = 0
            while m0 + block <= L:
                last = path[m0 + block - 1]
                if end[last] - begin[last] < 2:
                    break
                if begin[last] == q:
                    seg_begin[S], seg_end[S] = begin[last], end[last]
                    for d in range(m0, m0 + block):
                        seg_chunks[t] = chunk[path[d]]
                        t += 1
                    S += 1
                    seg_chunk_indptr[S] = t
                m0 += block
            private_indptr[q + 1] = private_indptr[q] + L - m0
        # 5b. each position's private chunks: the last nodes of its path, root side first
        private_chunks = np.empty(private_indptr[B], np.int32)
        for q in range(B):
            v = tail_of[order[q]]
            j = private_indptr[q + 1]
            while j > private_indptr[q]:
                j -= 1
                private_chunks[j] = chunk[v]
                v = up[v]
        return (order, path_len_pos, seg_begin[:S], seg_end[:S], seg_chunk_indptr[:S + 1], seg_chunks[:t],
                private_indptr, private_chunks)
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
    # (plain loops and views: numba compiles fancy indexing, astype and copies slowly)
    return (order, path_len_pos, seg_begin[:S], seg_end[:S], seg_chunk_indptr[:S + 1], seg_chunks[:t],
            private_indptr, private_chunks)


@host_jit
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



def _batch_states(cache: ChunkCache, seqs):
    """(ids, states) of the batch. Distinct live int ids with tokens skip the per-id checks;
    anything else goes through the reference's ``batch_states`` (same errors)."""
    check_cache(cache)
    if isinstance(seqs, (list, tuple)):
        ids = list(seqs)
    elif isinstance(seqs, np.ndarray) and seqs.ndim == 1 and seqs.dtype.kind in "iu":
        ids = seqs.tolist()
    else:
        ids = None
    if ids and set(map(type, ids)) == {int} and len(set(ids)) == len(ids):
        states = cache.live_states(ids)
        if states is not None and 0 not in map(_N_TOKENS, states):
            return ids, states
    return batch_states(cache, seqs)


def _plan_base(cache: ChunkCache, seqs, queries_per_seq: int = 1, tree_mask=None,
               batch_invariant: bool = False) -> dict:
    """The unsplit fields of the plan for ``seqs`` (every field but ``SPLIT_FIELDS``); with
    ``batch_invariant`` those of the fixed blocks.

    Python touches each sequence once (its slot and last node); the rest is ``_plan_core`` over
    the per-cache node table, which learns only the nodes it has not seen (new chunks).
    """
    batch_invariant = check_bool(batch_invariant, "batch_invariant")
    kq = check_queries_per_seq(queries_per_seq)
    ids, states = _batch_states(cache, seqs)
    if kq > 1:
        check_query_tokens(states, kq)
    tree_bits = check_tree_mask(tree_mask, len(ids), kq)
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
        tail_chunk, t.serial, t.parent, t.depth, t.seen, t.stamp(), INVARIANT_BLOCK_CHUNKS if batch_invariant else 0)
    slots = np.fromiter(map(_SLOT, states), _I32, B)[order]
    return dict(batch=tuple(ids), version=cache.version, chunk_size=cache.chunk_size,
                order=order, slots=slots, path_len=path_len,
                seg_begin=sb, seg_end=se, seg_chunk_indptr=seg_chunk_indptr, piece_chunks=seg_chunks,
                private_indptr=private_indptr, private_chunks=private_chunks, num_segments=len(sb),
                queries_per_seq=kq, tree_bits=tree_bits, batch_invariant=batch_invariant)


def _split(base: dict, piece_chunks, private_piece_chunks) -> DecodePlan:
    if base["batch_invariant"]:  # one block per piece and per item, whatever was asked
        piece_chunks = private_piece_chunks = INVARIANT_BLOCK_CHUNKS
    split = _split_core(base["seg_begin"], base["seg_end"], base["seg_chunk_indptr"], base["private_indptr"],
                        int(piece_chunks or 0), int(private_piece_chunks or 0))
    return DecodePlan(**dict(zip(SPLIT_FIELDS, split)), **base)


def build_decode_plan(cache: ChunkCache, seqs, piece_chunks: int | None = None,
                      private_piece_chunks: int | None = None, *, queries_per_seq: int = 1,
                      tree_mask=None, batch_invariant: bool = False) -> DecodePlan:
    """``reference.build_decode_plan`` (same arguments, errors and arrays), fast. With
    ``batch_invariant`` the piece sizes are checked and ignored (fixed blocks)."""
    check_piece_chunks(piece_chunks, "piece_chunks")
    check_piece_chunks(private_piece_chunks, "private_piece_chunks")
    return _split(_plan_base(cache, seqs, queries_per_seq, tree_mask, batch_invariant), piece_chunks,
                  private_piece_chunks)


def split_plan(plan: DecodePlan, piece_chunks: int | None = None,
               private_piece_chunks: int | None = None) -> DecodePlan:
    """``reference.split_plan`` (same arguments, errors and arrays), fast."""
    check_instance(plan, "plan", DecodePlan, "a DecodePlan (from build_decode_plan)")
    check_piece_chunks(piece_chunks, "piece_chunks")
    check_piece_chunks(private_piece_chunks, "private_piece_chunks")
    return _split({k: v for k, v in plan.__dict__.items() if k not in SPLIT_FIELDS}, piece_chunks,
                  private_piece_chunks)


# ---------------------------------------------------------------------- work units
@host_jit
def _units_core(piece_begin, piece_end, piece_chunk_indptr, piece_state_offset, item_pos, item_begin, item_end,
                private_indptr, path_len, slots, seq_piece_indptr, seq_pieces, H, group, c, rows_per_unit, rows1,
                kq):
    """units int32 [U, UNIT_WIDTH] of ``build_units``, in (entry, tile, kv head) order, then stably
    sorted by chunk count, largest first (a counting sort: counts are small integers). With
    ``kq`` > 1 query rows per (sequence, head), len_minus holds every unit's first key position."""
    P, I = len(piece_begin), len(item_pos)
    off2 = piece_chunk_indptr[P]
    per_seq = group * kq  # rows of one sequence: (query, head of the group)
    tiles2 = -(-per_seq // rows_per_unit)
    U = I * tiles2 * H
    for p in range(P):
        U += -(-(piece_end[p] - piece_begin[p]) * per_seq // rows1) * H
    key0 = np.zeros(P, np.int32)  # the first key position of each piece (the same on every path through it)
    if kq > 1:
        for pos in range(len(path_len)):
            before = 0
            for t in range(seq_piece_indptr[pos], seq_piece_indptr[pos + 1]):
                p = seq_pieces[t]
                key0[p] = before
                before += c * (piece_chunk_indptr[p + 1] - piece_chunk_indptr[p])
    raw = np.empty((U, UNIT_WIDTH), np.int32)
    u = 0
    for p in range(P):  # phase 1: (piece, rows1-row tile of range x rows per sequence, kv head)
        n_rows = (piece_end[p] - piece_begin[p]) * per_seq
        for r0 in range(0, n_rows, rows1):
            for h in range(H):
                raw[u, 0], raw[u, 1] = piece_chunk_indptr[p], piece_chunk_indptr[p + 1]
                raw[u, 2], raw[u, 3], raw[u, 4] = -1, key0[p], piece_begin[p]
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
        for r0 in range(0, per_seq, rows_per_unit):
            for h in range(H):
                raw[u, 0], raw[u, 1] = off2 + item_begin[i], off2 + item_end[i]
                raw[u, 2] = slots[pos] if last else -1
                raw[u, 3] = before if last or kq > 1 else 0
                raw[u, 4], raw[u, 5], raw[u, 6], raw[u, 7] = pos, r0, min(rows_per_unit, per_seq - r0), h
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
    units = np.empty((U, UNIT_WIDTH), np.int32)
    for u in range(U):
        j = start[top - (raw[u, 1] - raw[u, 0])]
        start[top - (raw[u, 1] - raw[u, 0])] = j + 1
        for f in range(UNIT_WIDTH):  # (not units[j] = raw[u]: that slice copy takes seconds to compile)
            units[j, f] = raw[u, f]
    return units


def build_units(plan: DecodePlan, num_kv_heads: int, group: int):
    """Work units of the fused attend launch (see raw_kernels/chunk_attention.cu).

    Returns (units int32 [U, UNIT_WIDTH], chunk_list int32): phase-1 units for every (piece,
    tile of ``phase1_rows`` rows of range x group, kv head) and phase-2 units for every
    (private item, tile of ``ROWS_PER_UNIT`` rows of the group, kv head), largest first so the
    long ones start early. Columns: ``cpattn.kernels.UNIT_FIELDS`` (0, 1 range in chunk_list;
    2 slot whose length bounds the keys, -1: whole chunks; 3 tokens on the path before the
    range; 4 first batch position; 5, 6 first row and row count of the tile; 7 kv head; 8
    first state row).

    Multi-token plans (``plan.queries_per_seq`` k > 1): a sequence has k x group rows (query,
    head), phase-2 tiles have ``phase1_rows`` rows too, and column 3 holds every unit's first
    key position (the kernel masks the pages that reach a row's new tokens).

    Batch-invariant plans: every tile, piece or item, has at most ``invariant_rows(chunk_size, k)``
    rows (chunk_attend_invariant splits each unit's keys over its warps by a fixed rule of the
    chunk size, never by the row count, and never takes the two-tile path).
    """
    kq = int(plan.queries_per_seq)
    if plan.batch_invariant:
        rows1 = rows2 = invariant_rows(int(plan.chunk_size), kq)
    else:
        rows1 = phase1_rows(int(plan.chunk_size))
        rows2 = ROWS_PER_UNIT if kq == 1 else rows1
    units = _units_core(plan.piece_begin, plan.piece_end, plan.piece_chunk_indptr, plan.piece_state_offset,
                        plan.item_pos, plan.item_begin, plan.item_end, plan.private_indptr, plan.path_len,
                        plan.slots, plan.seq_piece_indptr, plan.seq_pieces, int(num_kv_heads), int(group),
                        int(plan.chunk_size), rows2, rows1, kq)
    return units, np.concatenate([plan.piece_chunks, plan.private_chunks]).astype(np.int32)


def auto_piece_chunks(plan, num_q_heads: int, num_kv_heads: int, num_sms: int, units_per_sm: int = 4) -> int:
    """The piece size of ``piece_chunks="auto"`` (and of ``private_piece_chunks="auto"``).

    ``plan``: a DecodePlan, or anything with its unsplit fields (seg_begin, seg_end,
    seg_chunk_indptr, private_indptr, chunk_size). The unsplit plan's work, in chunk reads of
    units (phase-1 tiles of ``phase1_rows`` rows, phase-2 tiles of ``ROWS_PER_UNIT``, times kv
    heads), divided over ``units_per_sm * num_sms`` units: the cap on chunks per piece / item.
    """
    for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads), ("num_sms", num_sms),
                        ("units_per_sm", units_per_sm)):
        check_int(value, name, 1, INT32_MAX)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads: expected a multiple of num_kv_heads {num_kv_heads}, got {num_q_heads}")
    kq = int(getattr(plan, "queries_per_seq", 1))
    per_seq = num_q_heads // num_kv_heads * kq  # rows of one sequence per kv head
    rows1 = phase1_rows(int(plan.chunk_size))
    rows = (np.asarray(plan.seg_end) - np.asarray(plan.seg_begin)).astype(np.int64) * per_seq
    tiles1 = -(-rows // rows1)
    work = (int(np.dot(np.diff(plan.seg_chunk_indptr).astype(np.int64), tiles1))
            + int(plan.private_indptr[-1]) * -(-per_seq // (ROWS_PER_UNIT if kq == 1 else rows1))) * num_kv_heads
    return max(1, math.ceil(work / (units_per_sm * num_sms)))


# The device arrays of a plan, in the order of plan_host's buffer.
DEVICE_ARRAYS = ("units", "chunk_list", "order", "seq_piece_indptr", "seq_pieces", "piece_state_offset",
                 "piece_begin", "seq_item_indptr", "slots", "query_bits")


def plan_host(cache, seqs, num_q_heads: int, piece_chunks="auto", private_piece_chunks="auto",
              units_per_sm: int = 4, num_sms: int = 132, *, queries_per_seq: int = 1, tree_mask=None,
              batch_invariant: bool = False):
    """Host part of ``ChunkAttentionDecode.plan``: everything but the upload (no GPU needed).
    With ``batch_invariant`` the plan of fixed blocks (piece sizes checked and ignored).

    Returns (plan, buf, offs, num_units): ``buf`` int32 concatenates the ``DEVICE_ARRAYS``:
    units [U, UNIT_WIDTH] (raveled), chunk_list, order, seq_piece_indptr, seq_pieces,
    piece_state_offset, piece_begin, seq_item_indptr, slots (per depth-first position) and
    query_bits ([B * k] caller order: the new tokens each query sees, ``plan.query_bits()``);
    array ``i`` is ``buf[offs[i]:offs[i + 1]]`` (``offs`` has 11 entries).
    """
    num_q_heads = check_num_q_heads(check_cache(cache), num_q_heads)
    pc = check_piece_chunks(piece_chunks, "piece_chunks", auto=True)
    ppc = check_piece_chunks(private_piece_chunks, "private_piece_chunks", auto=True)
    check_int(units_per_sm, "units_per_sm", 1, INT32_MAX)
    check_int(num_sms, "num_sms", 1, INT32_MAX)
    H = cache.num_kv_heads
    base = _plan_base(cache, seqs, queries_per_seq, tree_mask, batch_invariant)
    if base["batch_invariant"]:
        pc = ppc = None  # (_split uses the fixed blocks)
    if pc == "auto" or ppc == "auto":  # about units_per_sm units per SM
        cap = auto_piece_chunks(types.SimpleNamespace(**base), num_q_heads, H, num_sms, units_per_sm)
        pc, ppc = cap if pc == "auto" else pc, cap if ppc == "auto" else ppc
    plan = _split(base, pc, ppc)
    units, chunk_list = build_units(plan, H, num_q_heads // H)
    host = [units.ravel(), chunk_list, plan.order, plan.seq_piece_indptr, plan.seq_pieces,
            plan.piece_state_offset, plan.piece_begin, plan.seq_item_indptr, plan.slots,
            plan.query_bits().astype(np.int32).ravel()]
    offs = [0, *itertools.accumulate(map(len, host))]
    return plan, np.concatenate(host), offs, len(units)


# ---------------------------------------------------------------------- plan / run
def decode_kernels(plan: DecodePlan) -> tuple:
    """(attend, merge): the kernels of raw_kernels/chunk_attention.cu that run ``plan``. One
    query per sequence and no tree mask: chunk_attend / chunk_merge, which hold none of the
    multi-token code; otherwise chunk_attend_multi / chunk_merge_multi (docs/design.md,
    "Multi-token decode"). A batch-invariant plan, any k: chunk_attend_invariant (the multi-token
    body with one fixed per-row arithmetic) / chunk_merge_multi (docs/design.md, "Batch-invariant
    decode")."""
    if plan.batch_invariant:
        return "chunk_attend_invariant", "chunk_merge_multi"
    if plan.queries_per_seq == 1 and plan.tree_bits is None:
        return "chunk_attend", "chunk_merge"
    return "chunk_attend_multi", "chunk_merge_multi"


class ChunkAttentionDecode:
    """Plan/run decoder of the two-phase partition over a ``GpuChunkCache``.

    The API of ``reference.ChunkAttentionDecode``, name for name: constructing this class with a
    NumPy cache (``cache.backend == "numpy"``) returns the reference decoder.

    ``piece_chunks`` / ``private_piece_chunks``: chunks per phase-1 piece / phase-2 item, None
    for no split, or "auto" (``auto_piece_chunks``) to size them so about ``units_per_sm``
    units per multiprocessor exist. Results never depend on them.

    ``batch_invariant=True``: batch-invariant plans (fixed key blocks, piece sizes ignored) run
    on ``chunk_attend_invariant``; a sequence's output is then bitwise the same whatever the
    rest of the batch, the sharing and the piece sizes (docs/design.md, "Batch-invariant decode").
    """

    def __new__(cls, cache, *args, **kwargs):
        if check_cache(cache).backend == "numpy":
            return reference.ChunkAttentionDecode(cache, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, cache, piece_chunks="auto", private_piece_chunks="auto", units_per_sm: int = 4, *,
                 batch_invariant: bool = False):
        self.piece_chunks = check_piece_chunks(piece_chunks, "piece_chunks", auto=True)
        self.private_piece_chunks = check_piece_chunks(private_piece_chunks, "private_piece_chunks", auto=True)
        self.units_per_sm = check_int(units_per_sm, "units_per_sm", 1, INT32_MAX)
        self.batch_invariant = check_bool(batch_invariant, "batch_invariant")
        cupy = import_cupy("ChunkAttentionDecode on a GpuChunkCache")
        self.cache = cache
        self._kern = get_kernels("chunk_attention", cache.dtype, cache.head_dim, cache.chunk_size)
        self._smem = decode_smem_bytes(cache.head_dim, cache.chunk_size)
        for name in ("chunk_attend", "chunk_attend_multi", "chunk_attend_invariant"):  # decode_kernels picks one
            self._kern[name].max_dynamic_shared_size_bytes = self._smem
        self._sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self._states_cap = 0
        self.decode_plan: DecodePlan | None = None  # the current plan (host arrays)
        self.num_q_heads: int | None = None
        self._dev = {}  # DEVICE_ARRAYS name -> view of the one uploaded buffer
        # The plan buffer keeps its place while later plans fit it and launch alike (same units,
        # state rows, batch, kernels): then ``plan_reused`` is True and a CUDA graph captured on
        # the plan before replays the new one (GraphedDecoder keeps its graph across a new chunk).
        self.plan_reused = False
        self._launch_shape = None
        self._caps = np.zeros(len(DEVICE_ARRAYS), np.int64)
        self._buf = self._starts = self._padded = None

    # ------------------------------------------------------------------ plan
    def plan(self, seqs, num_q_heads: int, *, queries_per_seq: int = 1, tree_mask=None) -> DecodePlan:
        """Build and upload the plan for ``seqs`` (the row order of ``q`` in ``run``); with
        ``queries_per_seq`` / ``tree_mask`` a multi-token step (``reference.ChunkAttentionDecode.plan``)."""
        import cupy

        cache = self.cache
        t0, previous = time.perf_counter(), self.decode_plan
        plan, host, offs, num_units = plan_host(cache, seqs, num_q_heads, self.piece_chunks,
                                                self.private_piece_chunks, self.units_per_sm, self._sms,
                                                queries_per_seq=queries_per_seq, tree_mask=tree_mask,
                                                batch_invariant=self.batch_invariant)
        rows = (plan.num_state_rows + plan.num_items) * plan.queries_per_seq
        lens = np.diff(offs)
        # what a launch bakes in besides the buffers' places: state rows of the pieces, batch, kernels
        shape = (plan.num_state_rows, plan.batch_size, plan.queries_per_seq, decode_kernels(plan), int(num_q_heads))
        self.plan_reused = (shape == self._launch_shape and rows * num_q_heads <= self._states_cap
                            and bool((lens <= self._caps).all()))
        if not self.plan_reused:  # new buffers with room to grow: a captured launch keeps its pointers,
            # its grid and its state buffers while the next plans fit (plan_reused)
            spare_units = max(num_units // 16, 16)
            self._caps = lens + np.maximum(lens // 4, 64)
            self._caps[0] = (num_units + spare_units) * UNIT_WIDTH
            self._starts = np.concatenate([[0], np.cumsum(self._caps)[:-1]])
            self._buf = cupy.empty(int(self._caps.sum()), np.int32)
            self._padded = np.zeros(int(self._caps.sum()), np.int32)
            self._states_cap = (rows + max(rows // 4, 64)) * num_q_heads
            self._o_states = cupy.empty(self._states_cap * cache.head_dim, np.float32)
            self._lse_states = cupy.empty(self._states_cap, np.float32)
        padded, starts = self._padded, self._starts
        for i in range(len(DEVICE_ARRAYS)):
            padded[starts[i]:starts[i] + lens[i]] = host[offs[i]:offs[i + 1]]
        # the units past the plan's do nothing: no rows, no chunks (chunk_attend then reads only
        # chunk_list[0], loads no page and stores no state)
        spare = padded[lens[0]:self._caps[0]].reshape(-1, UNIT_WIDTH)
        spare[:] = 0
        spare[:, UNIT_FIELDS.index("len_slot")] = -1
        self._buf.set(padded)  # the one upload
        self._dev = {name: self._buf[starts[i]:starts[i] + lens[i]] for i, name in enumerate(DEVICE_ARRAYS)}
        self._dev["units"] = self._dev["units"].reshape(num_units, UNIT_WIDTH)
        self._dev["launch_units"] = self._buf[:self._caps[0]].reshape(-1, UNIT_WIDTH)  # the grid: spares included
        self._launch_shape = shape
        self.num_q_heads = int(num_q_heads)
        cache.sync_lens()
        self.decode_plan = plan
        log_plan(plan, previous, time.perf_counter() - t0)
        return plan

    @property
    def units(self):
        """The planned work units on the device, int32 [U, UNIT_WIDTH] (``build_units``)."""
        check_plan(self.cache, self.decode_plan)
        return self._dev["units"]

    # ------------------------------------------------------------------ run
    def _check_q(self, q, layer, scale):
        cache, plan = self.cache, check_plan(self.cache, self.decode_plan)
        q = as_cupy(q, "q", contiguous=False)  # a GPU array (torch bfloat16 as its uint16 bits)
        check_q(cache, q, plan.batch_size, plan.queries_per_seq)  # the reference's checks and messages
        if q.shape[1] != self.num_q_heads:
            raise ValueError(f"q: expected {self.num_q_heads} query heads (as planned), got {q.shape[1]}")
        q = as_cupy(q, "q")  # C-contiguous
        cache.check_layer(layer)
        return q, check_scale(scale, cache.head_dim)

    def launch_attend(self, q, layer: int = 0, *, scale: float | None = None, units=None):
        """Launch ``chunk_attend`` (``chunk_attend_multi`` for a multi-token plan,
        ``chunk_attend_invariant`` for a batch-invariant one) alone over
        ``units`` (a device int32 [n, UNIT_WIDTH] subset of ``self.units``; default all): the
        partial states, no merge. For profiling."""
        q, scale = self._check_q(q, layer, scale)
        if units is None:  # a capture takes the spare units too: the graph then runs the next plans that fit
            import cupy

            units = self._dev["launch_units" if cupy.cuda.get_current_stream().is_capturing() else "units"]
        else:
            units = as_cupy(units, "units", None, None)
        if units.dtype != np.int32 or units.ndim != 2 or units.shape[1] != UNIT_WIDTH:
            raise ValueError(f"units: expected a device int32 array [n, {UNIT_WIDTH}], got {units.dtype} {units.shape}")
        cache = self.cache
        self._kern[decode_kernels(self.decode_plan)[0]](
            (len(units),), (THREADS,),
            (q, cache.k_pool, cache.v_pool, np.int64(layer * cache.num_chunks * cache.num_kv_heads),
             units, self._dev["chunk_list"], self._dev["order"], cache.d_slot_lens, self._o_states,
             self._lse_states, np.int32(self.num_q_heads), np.int32(cache.num_kv_heads),
             np.int32(self.num_q_heads // cache.num_kv_heads), np.float32(scale * LOG2E),
             np.int32(self.decode_plan.queries_per_seq), self._dev["slots"], self._dev["query_bits"]),
            shared_mem=self._smem)

    def run(self, q, layer: int = 0, *, scale: float | None = None, out=None, return_lse: bool = False,
            lse_out=None):
        """o [B, Hq, D] (storage dtype) for q [B, Hq, D] (rows in the planned batch order); with
        ``return_lse`` or ``lse_out`` [B, Hq] float32, returns (o, lse). A multi-token plan
        takes and gives ``B * queries_per_seq`` rows, sequence-major.

        Launches two kernels on the current stream; never synchronises.
        """
        import cupy

        q, scale = self._check_q(q, layer, scale)
        cache, plan = self.cache, self.decode_plan
        B, Hq, D = plan.num_queries, self.num_q_heads, cache.head_dim
        return_lse = check_bool(return_lse, "return_lse")
        out = cupy.empty((B, Hq, D), q.dtype) if out is None else as_cupy(out, "out", cache.dtype, (B, Hq, D))
        if lse_out is not None:
            lse_out = as_cupy(lse_out, "lse_out", None, (B, Hq))
            if lse_out.dtype != np.float32:
                raise TypeError(f"lse_out: expected dtype float32, got {lse_out.dtype}")
        elif return_lse:
            lse_out = cupy.empty((B, Hq), np.float32)
        self.launch_attend(q, layer, scale=scale)
        d = self._dev
        self._kern[decode_kernels(plan)[1]](
            ((B * Hq + 3) // 4,), (THREADS,),  # one warp per (sequence, query, query head)
            (self._o_states, self._lse_states, d["seq_piece_indptr"], d["seq_pieces"], d["piece_state_offset"],
             d["piece_begin"], d["seq_item_indptr"], np.int32(plan.num_state_rows), d["order"],
             out, self._lse_states if lse_out is None else lse_out,  # the states: a valid dummy
             np.int32(lse_out is not None), np.int32(plan.batch_size), np.int32(Hq),
             np.int32(plan.queries_per_seq)))
        return out if lse_out is None else (out, lse_out)


__all__ = ["ChunkAttentionDecode", "DecodePlan", "build_decode_plan", "split_plan", "plan_host", "build_units",
           "auto_piece_chunks", "decode_kernels", "DEVICE_ARRAYS", "ROWS_PER_UNIT", "THREADS", "phase1_rows"]
