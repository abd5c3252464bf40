"""The fast plan builders against a frozen copy of the NumPy implementation they replaced.

``build_decode_plan``, ``split_plan``, ``build_units`` and the host part of
``ChunkAttentionDecode.plan`` must give the same arrays (values and dtypes) as the code below
(reference/plan.py and cpattn/chunk_attention.py at 55d2890), on random prefix trees: many seeds, chunk
sizes, batch orders and subsets, piece sizes, sharing on and off, and caches that keep changing
between plans (new chunks, releases, evictions, forks, reused pool chunks). The CUDA kernels
read these arrays, so any difference is a bug.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpattn.chunk_attention import ROWS_PER_UNIT, build_units, phase1_rows, plan_host
from cpattn.reference.plan import DecodePlan, build_decode_plan, split_plan
from cpattn.reference.chunk_cache import CacheError, ChunkCache
from cpattn.reference.workloads import prefix_tree_prompts, shared_prefix_prompts

_I32 = np.int32


# ---------------------------------------------------------------------- frozen oracle (55d2890)
def old_path_arrays(s):
    """(serials, chunk ids) int64 arrays of a sequence's path, extended incrementally: a live
    path only ever grows at its tail, so plan rebuilds touch only the new nodes."""
    have = s.__dict__.get("_old_plan_path_arrays")
    n = len(s.path)
    if have is None or len(have[0]) != n:
        k = 0 if have is None or len(have[0]) > n else len(have[0])
        new = s.path[k:]
        add_s = np.fromiter((x.serial for x in new), np.int64, len(new))
        add_c = np.fromiter((x.chunk for x in new), np.int64, len(new))
        have = (add_s, add_c) if k == 0 else (np.concatenate([have[0], add_s]), np.concatenate([have[1], add_c]))
        s.__dict__["_old_plan_path_arrays"] = have
    return have


def old_build_decode_plan(cache: ChunkCache, seqs, piece_chunks: int | None = None,
                      private_piece_chunks: int | None = None) -> DecodePlan:
    """Plan a decode step for ``seqs`` (sequence ids; the query order of ``q``).

    ``piece_chunks`` / ``private_piece_chunks`` cap the chunks of one phase-1 piece / phase-2
    item (None: no split). Results do not depend on them; GPU occupancy does.
    """
    for name, val in (("piece_chunks", piece_chunks), ("private_piece_chunks", private_piece_chunks)):
        if val is not None and (not isinstance(val, (int, np.integer)) or val < 1):
            raise ValueError(f"{name}: expected None or an integer >= 1, got {val!r}")
    ids = cache.check_batch(seqs)
    states = [cache.sequence(i) for i in ids]
    for s in states:
        if s.n_tokens == 0:
            raise CacheError(f"seqs: sequence {s.id} has no tokens; append the query token's K/V first")
    B = len(states)
    arrays = [old_path_arrays(s) for s in states]
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
    return old_split_plan(plan=None, piece_chunks=piece_chunks, private_piece_chunks=private_piece_chunks, base=dict(
        batch=tuple(ids), version=cache.version, chunk_size=cache.chunk_size,
        order=order.astype(_I32), slots=slots, path_len=depth.astype(_I32),
        seg_begin=sb, seg_end=se, seg_chunk_indptr=seg_chunk_indptr, piece_chunks=seg_chunks,
        private_indptr=private_indptr, private_chunks=private_chunks, num_segments=S))


def old_split_plan(plan: DecodePlan | None, piece_chunks: int | None = None, private_piece_chunks: int | None = None,
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


def old_build_units(plan: DecodePlan, num_kv_heads: int, group: int):
    """Work units of the fused attend launch (see raw_kernels/chunk_attention.cu).

    Returns (units int32 [U, 9], chunk_list int32): phase-1 units for every (piece, 64-row tile
    of range x group, kv head) and phase-2 units for every (private item, tile, kv head),
    largest first so the long ones start early.
    """
    c, H = plan.chunk_size, num_kv_heads
    chunk_list = np.concatenate([plan.piece_chunks, plan.private_chunks]).astype(np.int32)
    off2 = len(plan.piece_chunks)

    def expand(n_rows, cols, rows=ROWS_PER_UNIT):
        """One row per (entry, row tile, kv head); cols: per-entry columns (tile/head filled in)."""
        tiles = -(-n_rows // rows)
        e = np.repeat(np.arange(len(n_rows)), tiles * H)
        k = np.arange(len(e)) - np.repeat(np.cumsum(tiles * H) - tiles * H, tiles * H)
        r0 = (k // H) * rows
        out = np.empty((len(e), 9), np.int64)
        for f, col in cols.items():
            out[:, f] = col[e]
        out[:, 5] = r0
        out[:, 6] = np.minimum(rows, n_rows[e] - r0)
        out[:, 7] = k % H
        return out

    P, I = plan.num_pieces, plan.num_items
    n1 = (plan.piece_end - plan.piece_begin).astype(np.int64) * group
    u1 = expand(n1, {0: plan.piece_chunk_indptr[:-1], 1: plan.piece_chunk_indptr[1:], 2: np.full(P, -1),
                     3: np.zeros(P, np.int64), 4: plan.piece_begin, 8: plan.piece_state_offset[:-1]},
                rows=phase1_rows(c))  # phase 1: 128-row tiles up to chunk 64
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


def old_plan_host(cache, seqs, num_q_heads, pc="auto", ppc="auto", units_per_sm=4, sms=132):
    """ChunkAttentionDecode.plan at 55d2890 without the upload: (plan, buffer, num_units)."""
    group = num_q_heads // cache.num_kv_heads
    auto = pc == "auto" or ppc == "auto"
    plan = old_build_decode_plan(cache, seqs, None if pc == "auto" else pc, None if ppc == "auto" else ppc)
    if auto:
        tiles1 = -(-(plan.seg_end - plan.seg_begin).astype(np.int64) * group // phase1_rows(cache.chunk_size))
        work = (int((np.diff(plan.seg_chunk_indptr) * tiles1).sum()) + int(plan.private_indptr[-1])
                * -(-group // ROWS_PER_UNIT)) * cache.num_kv_heads
        cap = max(1, math.ceil(work / (units_per_sm * sms)))
        plan = old_split_plan(plan, cap if pc == "auto" else pc, cap if ppc == "auto" else ppc)
    units, chunk_list = old_build_units(plan, cache.num_kv_heads, group)
    host = [units.ravel(), chunk_list, plan.order, plan.seq_piece_indptr, plan.seq_pieces,
            plan.piece_state_offset, plan.piece_begin, plan.seq_item_indptr]
    return plan, np.concatenate(host).astype(np.int32), len(units)


# ---------------------------------------------------------------------- comparisons
def assert_same_plan(new: DecodePlan, old: DecodePlan):
    assert type(new) is DecodePlan
    for f in dataclasses.fields(DecodePlan):
        a, b = getattr(new, f.name), getattr(old, f.name)
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype, (f.name, a, b)
            assert a.shape == b.shape and np.array_equal(a, b), (f.name, a, b)
        else:
            assert type(a) is type(b) and a == b, (f.name, a, b)


def assert_same_units(plan, old_plan, H, group):
    (u, cl), (ou, ocl) = build_units(plan, H, group), old_build_units(old_plan, H, group)
    for a, b in ((u, ou), (cl, ocl)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def check(cache, batch, rng):
    """Everything built from ``batch`` equals the oracle's, for a few piece sizes and head layouts."""
    sizes = [None, 1, 2, 3, 5, 64]
    piece, private = (sizes[int(i)] for i in rng.integers(0, len(sizes), 2))
    new = build_decode_plan(cache, batch, piece, private)
    old = old_build_decode_plan(cache, batch, piece, private)
    assert_same_plan(new, old)
    for p2, q2 in ((None, None), (1, 1), (int(rng.integers(1, 9)), int(rng.integers(1, 9))), (None, 2)):
        assert_same_plan(split_plan(new, p2, q2), old_split_plan(old, p2, q2))
    for H, group in ((1, 1), (2, 4), (8, 4), (3, 33), (1, 200)):
        assert_same_units(new, old, H, group)
    pc, ppc = rng.choice(["auto", "auto", 1, 4, None], 2).tolist()
    Hkv = cache.num_kv_heads
    Hq = Hkv * int(rng.choice([1, 4, 8]))
    sms = int(rng.choice([1, 7, 132]))
    p, buf, offs, n_units = plan_host(cache, batch, Hq, pc, ppc, 4, sms)
    op, obuf, on_units = old_plan_host(cache, batch, Hq, pc, ppc, 4, sms)
    assert_same_plan(p, op)
    assert n_units == on_units and buf.dtype == obuf.dtype and np.array_equal(buf, obuf)
    assert len(offs) == 9 and offs[0] == 0 and offs[-1] == len(buf) and offs[1] == 9 * n_units


def fill(cache, prompts, rng, decode_frac=0.8):
    """Insert prompts structurally (no K/V needed for plans); most get one decode token."""
    ids = []
    for i in rng.permutation(len(prompts)).tolist():
        p = prompts[i]
        sid = cache.add_sequence(p)
        cache.reserve(sid, p[cache.seq_len(sid):])
        cache.commit(sid)
        ids.append(sid)
    dec = [s for s in ids if rng.random() < decode_frac]
    if dec:
        cache.reserve_batch(dec, rng.integers(0, 5, len(dec)).tolist())
        for s in dec:
            cache.commit(s)
    return ids


def random_batch(cache, rng, as_type):
    live = cache.sequences
    k = int(rng.integers(1, len(live) + 1))
    batch = rng.permutation(live)[:k].tolist()
    return {"list": batch, "tuple": tuple(batch), "array": np.array(batch, np.int64)}[as_type]


def churn(cache, rng, vocab, c):
    """Change the tree between plans: appends that open chunks, releases, evictions, forks and
    new prompts (which take freed pool chunks, so stale memos of chunk ids get caught)."""
    live = cache.sequences
    op = int(rng.integers(0, 5))
    if op == 0:  # everyone appends up to a chunk
        n = int(rng.integers(1, c + 2))
        for _ in range(n):
            cache.reserve_batch(live, [1] * len(live))
            for s in live:
                cache.commit(s)
    elif op == 1 and len(live) > 1:
        for s in rng.permutation(live)[: max(1, len(live) // 3)].tolist():
            cache.release(s)
        cache.evict(int(rng.integers(0, 6)) if rng.random() < 0.5 else None)
    elif op == 2:
        cache.fork(int(rng.choice(live)))
    else:  # a prompt continuing a live sequence's tokens, or a fresh one
        base = cache.seq_tokens(int(rng.choice(live)))
        cut = int(rng.integers(0, len(base) + 1))
        p = base[:cut] + rng.integers(0, vocab, int(rng.integers(1, 2 * c + 2))).tolist()
        sid = cache.add_sequence(p)
        cache.reserve(sid, p[cache.seq_len(sid):])
        cache.commit(sid)


def scenario(seed, n, c, share, steps=4):
    rng = np.random.default_rng(seed)
    vocab = int(rng.choice([2, 8, 50]))
    prompts = prefix_tree_prompts(seed, n, c, levels=int(rng.integers(1, 4)), fanout=3, max_chunks=3, vocab=vocab)
    room = sum(len(p) // c + 2 for p in prompts) + (steps + 1) * (n + 4) * 4 + 16
    cache = ChunkCache(1, int(rng.choice([1, 2])), 1, room, chunk_size=c, share_prefix=share)
    fill(cache, prompts, rng)
    kinds = ["list", "tuple", "array"]
    for step in range(steps):
        for _ in range(2):
            check(cache, random_batch(cache, rng, kinds[int(rng.integers(0, 3))]), rng)
        churn(cache, rng, vocab, c)
    check(cache, random_batch(cache, rng, "list"), rng)


# ---------------------------------------------------------------------- tests
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([1, 2, 3, 7, 20, 77]),
       c=st.sampled_from([1, 2, 4, 16, 64]), share=st.booleans())
def test_same_as_oracle_on_random_trees(seed, n, c, share):
    scenario(seed, n, c, share)


@pytest.mark.parametrize("seed", range(40))
def test_same_as_oracle_sweep(seed):
    rng = np.random.default_rng(1000 + seed)
    scenario(1000 + seed, int(rng.choice([1, 2, 5, 13, 40])), int(rng.choice([2, 4, 16])), seed % 5 != 0, steps=3)


def test_same_as_oracle_on_the_benchmark_shape():
    """Shared prompt, own tokens, one decode token (tools/bench_plan.py, scaled down)."""
    rng = np.random.default_rng(0)
    c = 16
    prompts = shared_prefix_prompts(48, 16 * c + 3, 2 * c, seed=1)
    cache = ChunkCache(1, 8, 1, 48 * 22 + 8, chunk_size=c)
    ids = fill(cache, prompts, rng, decode_frac=1.0)
    for batch in (ids, ids[::-1], ids[5:17]):
        check(cache, batch, rng)


def test_identical_and_prefix_paths():
    """Sequences with the same path, and paths that are prefixes of others (full chunks only)."""
    rng = np.random.default_rng(3)
    cache = ChunkCache(1, 1, 1, 64, chunk_size=2)
    ids = [cache.add_sequence([1, 2, 3, 4]) for _ in range(3)]  # nothing cached yet: each empty
    for s in ids:
        cache.reserve(s, [1, 2, 3, 4][cache.seq_len(s):])
        cache.commit(s)
    more = []
    for p in ([1, 2], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7]):
        s = cache.add_sequence(p)
        cache.reserve(s, p[cache.seq_len(s):])
        cache.commit(s)
        more.append(s)
    everyone = ids + more
    for _ in range(20):
        check(cache, rng.permutation(everyone)[: int(rng.integers(1, len(everyone) + 1))].tolist(), rng)


@pytest.mark.parametrize("bad", [lambda a, b: [a, a], lambda a, b: [a, 999], lambda a, b: [a, True],
                                 lambda a, b: [a, float(b)], lambda a, b: [], lambda a, b: [a, "1"],
                                 lambda a, b: np.array([a, a]), lambda a, b: np.array([a, b], np.float64),
                                 lambda a, b: [np.int64(a), b, b], lambda a, b: [a, None]])
def test_same_errors_as_oracle(bad):
    cache = ChunkCache(1, 1, 1, 16, chunk_size=2)
    a = cache.add_sequence()
    cache.reserve(a, [1, 2, 3])
    cache.commit(a)
    b = cache.add_sequence([1, 2, 5])
    cache.reserve(b, [5])
    cache.commit(b)
    seqs = bad(a, b)
    with pytest.raises((ValueError, TypeError, CacheError)) as old:
        old_build_decode_plan(cache, seqs)
    with pytest.raises(old.type) as new:
        build_decode_plan(cache, seqs)
    assert str(new.value) == str(old.value)


def test_same_batch_types_as_oracle():
    """np.int64 ids, 2-D arrays and unsigned arrays plan like the plain list."""
    rng = np.random.default_rng(5)
    cache = ChunkCache(1, 1, 1, 64, chunk_size=4)
    ids = fill(cache, prefix_tree_prompts(5, 9, 4), rng, decode_frac=1.0)
    for batch in ([np.int64(i) for i in ids], np.array(ids).reshape(3, 3), np.array(ids, np.uint32)):
        check(cache, batch, rng)
