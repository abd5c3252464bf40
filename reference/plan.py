"""Decode plan: the flat int32 arrays the two-phase partition reads.

A plan maps a batch of sequence ids to the depth-first order of the tree, in which every node
covers a contiguous range of batch positions. It is rebuilt only when the tree or the batch
changes (``cache.version``), not on every appended token: the length of each sequence's last
chunk is read at run time from ``cache.slot_lens``.

Vocabulary (DESIGN.md, "ChunkAttention decode"):

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

from dataclasses import dataclass

import numpy as np

from .tree import CacheError, ChunkCache

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


def _path_arrays(s):
    """(serials, chunk ids) int64 arrays of a sequence's path, extended incrementally: a live
    path only ever grows at its tail, so plan rebuilds touch only the new nodes."""
    have = s.__dict__.get("_plan_path_arrays")
    n = len(s.path)
    if have is None or len(have[0]) != n:
        k = 0 if have is None or len(have[0]) > n else len(have[0])
        new = s.path[k:]
        add_s = np.fromiter((x.serial for x in new), np.int64, len(new))
        add_c = np.fromiter((x.chunk for x in new), np.int64, len(new))
        have = (add_s, add_c) if k == 0 else (np.concatenate([have[0], add_s]), np.concatenate([have[1], add_c]))
        s.__dict__["_plan_path_arrays"] = have
    return have


def build_decode_plan(cache: ChunkCache, seqs, piece_chunks: int | None = None,
                      private_piece_chunks: int | None = None) -> DecodePlan:
    """Plan a decode step for ``seqs`` (sequence ids; the query order of ``q``).

    ``piece_chunks`` / ``private_piece_chunks`` cap the chunks of one phase-1 piece / phase-2
    item (None: no split). Results do not depend on them; GPU occupancy does.
    """
    for name, val in (("piece_chunks", piece_chunks), ("private_piece_chunks", private_piece_chunks)):
        if val is not None and (not isinstance(val, (int, np.integer)) or val < 1):
            raise ValueError(f"{name}: expected None or an integer >= 1, got {val!r}")
    ids = cache._check_batch(seqs)
    states = [cache._seqs[i] for i in ids]
    for s in states:
        if s.n_tokens == 0:
            raise CacheError(f"seqs: sequence {s.id} has no tokens; append the query token's K/V first")
    B = len(states)
    arrays = [_path_arrays(s) for s in states]
    depth = np.array([len(a[0]) for a in arrays], dtype=np.int64)
    D = int(depth.max())

    # 1. paths as a padded [B, D] grid of node serials (-1 pads, sorts before any child)
    serial = np.full((B, D), -1, np.int64)
    chunk = np.full((B, D), -1, np.int64)
    rows = np.repeat(np.arange(B), depth)
    cols = np.arange(int(depth.sum())) - np.repeat(np.cumsum(depth) - depth, depth)
    serial[rows, cols] = np.concatenate([a[0] for a in arrays])
    chunk[rows, cols] = np.concatenate([a[1] for a in arrays])

    # 2. depth-first order = lexicographic order of serial paths; big-endian rows compared as
    #    raw bytes sort exactly so (pads become 0, below every serial + 1)
    key = np.ascontiguousarray((serial + 1).astype(">u8")).view(np.dtype((np.void, 8 * D))).ravel()
    order = np.argsort(key, kind="stable")
    serial, chunk, depth = serial[order], chunk[order], depth[order]
    valid = serial >= 0

    # 3. shared cells and the batch range [begin, end) of every cell's node
    same_prev = np.zeros((B, D), bool)  # same node as the row above
    same_prev[1:] = (serial[1:] == serial[:-1]) & valid[1:]
    same_next = np.zeros((B, D), bool)
    same_next[:-1] = same_prev[1:]
    shared = same_prev | same_next
    pos = np.arange(B)[:, None]
    begin = np.maximum.accumulate(np.where(same_prev, 0, pos), axis=0)
    end = B - np.maximum.accumulate(np.where(same_next, 0, B - 1 - pos)[::-1], axis=0)[::-1]

    # 4. segments: a shared cell starts one when its range differs from its parent's; a
    #    segment runs down its representative row (the range's first) until the next start
    starts = shared.copy()
    starts[:, 1:] &= (begin[:, 1:] != begin[:, :-1]) | (end[:, 1:] != end[:, :-1])
    seg_rows, seg_d0 = np.nonzero(starts & (begin == pos))
    stop = starts | ~shared  # a segment's chunks are its start cell and the cells before a stop
    stop[:, 0] = True
    S = len(seg_rows)
    seg_len = np.empty(S, np.int64)
    for k, (r, d0) in enumerate(zip(seg_rows.tolist(), seg_d0.tolist())):
        nxt = np.flatnonzero(stop[r, d0 + 1:])
        seg_len[k] = (nxt[0] + 1) if len(nxt) else D - d0
    seg_chunk_indptr = np.zeros(S + 1, _I32)
    seg_chunk_indptr[1:] = np.cumsum(seg_len)
    take_r = np.repeat(seg_rows, seg_len)
    take_d = np.arange(int(seg_len.sum())) - np.repeat(seg_chunk_indptr[:-1], seg_len) + np.repeat(seg_d0, seg_len)
    seg_chunks = chunk[take_r, take_d].astype(_I32)

    # 5. private suffixes
    priv = valid & ~shared
    private_indptr = np.zeros(B + 1, _I32)
    private_indptr[1:] = np.cumsum(priv.sum(axis=1))
    private_chunks = chunk[priv].astype(_I32)

    slots = np.array([s.slot for s in states], _I32)[order]
    sb = begin[seg_rows, seg_d0].astype(_I32)
    se = end[seg_rows, seg_d0].astype(_I32)
    return split_plan(plan=None, piece_chunks=piece_chunks, private_piece_chunks=private_piece_chunks, base=dict(
        batch=tuple(ids), version=cache.version, chunk_size=cache.chunk_size,
        order=order.astype(_I32), slots=slots, path_len=depth.astype(_I32),
        seg_begin=sb, seg_end=se, seg_chunk_indptr=seg_chunk_indptr, piece_chunks=seg_chunks,
        private_indptr=private_indptr, private_chunks=private_chunks, num_segments=S))


def split_plan(plan: DecodePlan | None, piece_chunks: int | None = None, private_piece_chunks: int | None = None,
               base: dict | None = None) -> DecodePlan:
    """The same plan with pieces / items of at most the given number of chunks (None: whole
    segments / whole private suffixes). Cheap: only the small per-piece arrays change."""
    if base is None:
        base = {k: getattr(plan, k) for k in ("batch", "version", "chunk_size", "order", "slots", "path_len",
                                              "seg_begin", "seg_end", "seg_chunk_indptr", "piece_chunks",
                                              "private_indptr", "private_chunks", "num_segments")}
    B = len(base["order"])
    seg_n = np.diff(base["seg_chunk_indptr"]).astype(np.int64)

    # pieces: contiguous runs of at most `step` chunks of each segment (same flat chunk list)
    step = piece_chunks or max(1, int(seg_n.max(initial=1)))
    k = -(-seg_n // step)
    seg_of = np.repeat(np.arange(len(seg_n)), k)
    j = np.arange(len(seg_of)) - np.repeat(np.cumsum(k) - k, k)
    P = len(seg_of)
    piece_chunk_indptr = np.zeros(P + 1, _I32)
    piece_chunk_indptr[:P] = base["seg_chunk_indptr"][seg_of] + j * step
    piece_chunk_indptr[P] = base["seg_chunk_indptr"][-1]
    piece_begin = base["seg_begin"][seg_of].astype(_I32)
    piece_end = base["seg_end"][seg_of].astype(_I32)
    rng = (piece_end - piece_begin).astype(np.int64)
    piece_state_offset = np.zeros(P + 1, _I32)
    piece_state_offset[1:] = np.cumsum(rng)

    # each position's pieces, root side first (pieces are in segment-start order, and of two
    # segments on one path the one starting at the smaller position is the shallower)
    sp_piece = np.repeat(np.arange(P, dtype=np.int64), rng)
    sp_pos = np.arange(int(rng.sum())) - np.repeat(piece_state_offset[:-1], rng) + np.repeat(piece_begin, rng)
    key = np.lexsort((sp_piece, sp_pos))
    seq_pieces = sp_piece[key].astype(_I32)
    seq_piece_indptr = np.zeros(B + 1, _I32)
    seq_piece_indptr[1:] = np.cumsum(np.bincount(sp_pos, minlength=B))

    # phase-2 items: runs of at most `pstep` private chunks of one position
    private_indptr = base["private_indptr"]
    n_priv = np.diff(private_indptr).astype(np.int64)
    pstep = private_piece_chunks or max(1, int(n_priv.max(initial=1)))
    n_items = -(-n_priv // pstep)
    item_pos = np.repeat(np.arange(B), n_items).astype(_I32)
    seq_item_indptr = np.zeros(B + 1, _I32)
    seq_item_indptr[1:] = np.cumsum(n_items)
    k_in_seq = np.arange(len(item_pos)) - np.repeat(seq_item_indptr[:-1], n_items)
    item_begin = (private_indptr[item_pos] + k_in_seq * pstep).astype(_I32)
    item_end = np.minimum(item_begin + pstep, private_indptr[item_pos + 1]).astype(_I32)
    return DecodePlan(piece_begin=piece_begin, piece_end=piece_end, piece_chunk_indptr=piece_chunk_indptr,
                      piece_state_offset=piece_state_offset, seq_piece_indptr=seq_piece_indptr,
                      seq_pieces=seq_pieces, item_pos=item_pos, item_begin=item_begin, item_end=item_end,
                      seq_item_indptr=seq_item_indptr, **base)
