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
    piece_begin/end     [P]     batch range [begin, end) of each piece
    piece_chunk_indptr  [P+1]   CSR into piece_chunks (pool chunk ids, root side first)
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
    depth = np.array([len(s.path) for s in states], dtype=np.int64)
    D = int(depth.max())

    # 1. paths as a padded [B, D] grid of node serials (-1 pads, sorts before any child)
    serial = np.full((B, D), -1, np.int64)
    chunk = np.full((B, D), -1, np.int64)
    for b, s in enumerate(states):
        serial[b, : depth[b]] = [n.serial for n in s.path]
        chunk[b, : depth[b]] = [n.chunk for n in s.path]

    # 2. depth-first order = lexicographic order of serial paths
    order = np.lexsort(serial.T[::-1]) if D else np.arange(B)
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

    # 4. segments: a shared cell starts one when its range differs from its parent's
    starts = shared.copy()
    starts[:, 1:] &= (begin[:, 1:] != begin[:, :-1]) | (end[:, 1:] != end[:, :-1])
    seg_rows, seg_d0 = np.nonzero(starts & (begin == pos))  # one representative per segment
    step = piece_chunks or D or 1
    p_begin, p_end, p_chunks = [], [], []
    for r, d0 in zip(seg_rows.tolist(), seg_d0.tolist()):
        d1 = d0 + 1
        while d1 < depth[r] and shared[r, d1] and not starts[r, d1]:
            d1 += 1
        for a in range(d0, d1, step):
            p_begin.append(begin[r, d0])
            p_end.append(end[r, d0])
            p_chunks.append(chunk[r, a: min(a + step, d1)])
    P = len(p_begin)
    piece_begin = np.array(p_begin, _I32)
    piece_end = np.array(p_end, _I32)
    piece_chunk_indptr = np.zeros(P + 1, _I32)
    piece_chunk_indptr[1:] = np.cumsum([len(c) for c in p_chunks])
    piece_chunks_flat = np.concatenate(p_chunks).astype(_I32) if P else np.zeros(0, _I32)
    piece_state_offset = np.zeros(P + 1, _I32)
    piece_state_offset[1:] = np.cumsum(piece_end - piece_begin)

    # 5. each position's pieces (ordered root side first: pieces come in segment-start order)
    rng = piece_end - piece_begin
    sp_piece = np.repeat(np.arange(P, dtype=np.int64), rng)
    sp_pos = (np.arange(int(rng.sum())) - np.repeat(piece_state_offset[:-1], rng)
              + np.repeat(piece_begin, rng))
    key = np.lexsort((sp_piece, sp_pos))
    seq_pieces = sp_piece[key].astype(_I32)
    seq_piece_indptr = np.zeros(B + 1, _I32)
    seq_piece_indptr[1:] = np.cumsum(np.bincount(sp_pos, minlength=B))

    # 6. private suffixes and their phase-2 items
    priv = valid & ~shared
    n_priv = priv.sum(axis=1)
    private_indptr = np.zeros(B + 1, _I32)
    private_indptr[1:] = np.cumsum(n_priv)
    private_chunks = chunk[priv].astype(_I32)
    pstep = private_piece_chunks or D or 1
    n_items = -(-n_priv // pstep)
    item_pos = np.repeat(np.arange(B), n_items).astype(_I32)
    seq_item_indptr = np.zeros(B + 1, _I32)
    seq_item_indptr[1:] = np.cumsum(n_items)
    k_in_seq = np.arange(len(item_pos)) - np.repeat(seq_item_indptr[:-1], n_items)
    item_begin = (private_indptr[item_pos] + k_in_seq * pstep).astype(_I32)
    item_end = np.minimum(item_begin + pstep, private_indptr[item_pos + 1]).astype(_I32)

    slots = np.array([s.slot for s in states], _I32)[order]
    return DecodePlan(
        batch=tuple(ids), version=cache.version, chunk_size=cache.chunk_size,
        order=order.astype(_I32), slots=slots, path_len=depth.astype(_I32),
        piece_begin=piece_begin, piece_end=piece_end, piece_chunk_indptr=piece_chunk_indptr,
        piece_chunks=piece_chunks_flat, piece_state_offset=piece_state_offset,
        seq_piece_indptr=seq_piece_indptr, seq_pieces=seq_pieces, private_indptr=private_indptr,
        private_chunks=private_chunks, item_pos=item_pos, item_begin=item_begin, item_end=item_end,
        seq_item_indptr=seq_item_indptr, num_segments=len(seg_rows))
