"""The fast host planner (``cpattn.chunk_attention``: numba loops over a per-cache node table)
against the textbook planner (``cpattn.reference.chunk_attention``), array for array.

``build_decode_plan``, ``split_plan`` and the host part of ``ChunkAttentionDecode.plan``
(``plan_host``) must give the same arrays (values and dtypes) as the reference on random prefix
trees: many seeds, chunk sizes, batch orders and subsets, piece sizes, sharing on and off, and
caches that keep changing between plans (new chunks, releases, evictions, forks, reused pool
chunks, which a stale node table would get wrong). The CUDA kernels read these arrays, so any
difference is a bug. Hypothesis draws the structure; NumPy's generator, seeded from it, fills
the rest. The work units have no reference copy; their properties are checked instead.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpattn import chunk_attention as fast
from cpattn.kernels import UNIT_FIELDS
from cpattn.reference import chunk_attention as ref
from cpattn.reference.chunk_attention import DecodePlan
from cpattn.reference.chunk_cache import CacheError, ChunkCache
from cpattn.reference.workloads import prefix_tree_prompts, shared_prefix_prompts


# ---------------------------------------------------------------------- comparisons
def assert_same_plan(new: DecodePlan, old: DecodePlan):
    assert type(new) is DecodePlan
    for f in dataclasses.fields(DecodePlan):
        a, b = getattr(new, f.name), getattr(old, f.name)
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype == np.int32, (f.name, a, b)
            assert a.shape == b.shape and np.array_equal(a, b), (f.name, a, b)
        else:
            assert type(a) is type(b) and a == b, (f.name, a, b)


def assert_units_cover_the_plan(plan: DecodePlan, H: int, group: int):
    """Every (piece, row tile, kv head) and (item, row tile, kv head) is one unit, with the
    fields of UNIT_FIELDS (the record the kernel reads), largest chunk count first."""
    units, chunk_list = fast.build_units(plan, H, group)
    assert units.dtype == np.int32 and units.shape[1] == len(UNIT_FIELDS) and chunk_list.dtype == np.int32

    def unit(*values):
        assert len(values) == len(UNIT_FIELDS)
        return dict(zip(("chunk_begin", "chunk_end", "len_slot", "len_minus", "pos_begin", "row0", "row_count",
                         "kv_head", "out_base"), map(int, values)))
    assert np.array_equal(chunk_list, np.concatenate([plan.piece_chunks, plan.private_chunks]))
    work = units[:, 1] - units[:, 0]
    assert (work >= 1).all() and (np.diff(work) <= 0).all()
    rows1, rows2 = fast.phase1_rows(plan.chunk_size), fast.ROWS_PER_UNIT
    want = []
    for p in range(plan.num_pieces):
        n_rows = int(plan.piece_end[p] - plan.piece_begin[p]) * group
        for r0 in range(0, n_rows, rows1):
            for h in range(H):
                want.append(unit(plan.piece_chunk_indptr[p], plan.piece_chunk_indptr[p + 1], -1, 0,
                                 plan.piece_begin[p], r0, min(rows1, n_rows - r0), h, plan.piece_state_offset[p]))
    off2, c = len(plan.piece_chunks), plan.chunk_size
    for i in range(plan.num_items):
        pos = int(plan.item_pos[i])
        last = plan.item_end[i] == plan.private_indptr[pos + 1]
        before = int(plan.path_len[pos] - (plan.private_indptr[pos + 1] - plan.item_begin[i])) * c
        for r0 in range(0, group, rows2):
            for h in range(H):
                want.append(unit(off2 + plan.item_begin[i], off2 + plan.item_end[i],
                                 plan.slots[pos] if last else -1, before if last else 0, pos, r0,
                                 min(rows2, group - r0), h, plan.num_state_rows + i))
    want = {tuple(u[f] for f in UNIT_FIELDS) for u in want}  # in the record's column order
    got = [tuple(map(int, u)) for u in units]
    assert len(got) == len(set(got)) == len(want) and set(got) == want


def check(cache, batch, rng):
    """Everything the fast planner builds from ``batch`` equals the reference's."""
    sizes = [None, 1, 2, 3, 5, 64]
    piece, private = (sizes[int(i)] for i in rng.integers(0, len(sizes), 2))
    new = fast.build_decode_plan(cache, batch, piece, private)
    old = ref.build_decode_plan(cache, batch, piece, private)
    assert_same_plan(new, old)
    for p2, q2 in ((None, None), (1, 1), (int(rng.integers(1, 9)), int(rng.integers(1, 9))), (None, 2)):
        assert_same_plan(fast.split_plan(new, p2, q2), ref.split_plan(old, p2, q2))
        assert_same_plan(fast.split_plan(new, p2, q2), ref.build_decode_plan(cache, batch, p2, q2))
    for H, group in ((1, 1), (2, 4), (3, 33), (1, 200)):
        assert_units_cover_the_plan(new, H, group)
    pc, ppc = rng.choice(["auto", "auto", 1, 4, None], 2).tolist()
    Hkv = cache.num_kv_heads
    Hq = Hkv * int(rng.choice([1, 4, 8]))
    sms = int(rng.choice([1, 7, 132]))
    p, buf, offs, n_units = fast.plan_host(cache, batch, Hq, pc, ppc, 4, sms)
    cap = fast.auto_piece_chunks(ref.build_decode_plan(cache, batch), Hq, Hkv, sms, 4)
    assert cap >= 1
    want = ref.build_decode_plan(cache, batch, cap if pc == "auto" else pc, cap if ppc == "auto" else ppc)
    assert_same_plan(p, want)
    units, chunk_list = fast.build_units(want, Hkv, Hq // Hkv)
    parts = [units.ravel(), chunk_list, want.order, want.seq_piece_indptr, want.seq_pieces,
             want.piece_state_offset, want.piece_begin, want.seq_item_indptr]
    assert len(offs) == len(fast.DEVICE_ARRAYS) + 1 and offs[0] == 0 and offs[-1] == len(buf)
    assert n_units == len(units) and buf.dtype == np.int32
    for i, part in enumerate(parts):
        assert np.array_equal(buf[offs[i]:offs[i + 1]], part)


# ---------------------------------------------------------------------- random caches
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
def test_fast_planner_equals_the_reference_on_random_trees(seed, n, c, share):
    scenario(seed, n, c, share)


@pytest.mark.parametrize("seed", range(20))
def test_fast_planner_equals_the_reference_sweep(seed):
    rng = np.random.default_rng(1000 + seed)
    scenario(1000 + seed, int(rng.choice([1, 2, 5, 13, 40])), int(rng.choice([2, 4, 16])), seed % 5 != 0, steps=3)


def test_on_the_benchmark_shape():
    """Shared prompt, own tokens, one decode token (tools/bench_plan.py, scaled down)."""
    rng = np.random.default_rng(0)
    c = 16
    prompts = shared_prefix_prompts(48, 16 * c + 3, 2 * c, seed=1)
    cache = ChunkCache(1, 8, 1, 48 * 22 + 8, chunk_size=c)
    ids = fill(cache, prompts, rng, decode_frac=1.0)
    for batch in (ids, ids[::-1], ids[5:17]):
        check(cache, batch, rng)
    plan = ref.build_decode_plan(cache, ids)
    assert plan.num_segments == 1 and plan.seg_end[0] - plan.seg_begin[0] == len(ids)


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


def test_a_hand_built_tree():
    """The reference planner on a tree small enough to write its plan by hand (chunk 2):

        a: [1 2][3 4][5]      b: [1 2][3 4][6]      c: [1 2][7]      d: [9]
    """
    cache = ChunkCache(1, 1, 1, 16, chunk_size=2)
    sid = {}
    for name, p in (("a", [1, 2, 3, 4, 5]), ("b", [1, 2, 3, 4, 6]), ("c", [1, 2, 7]), ("d", [9])):
        sid[name] = cache.add_sequence(p)
        cache.reserve(sid[name], p[cache.seq_len(sid[name]):])
        cache.commit(sid[name])
    ch = {name: cache.seq_chunks(s) for name, s in sid.items()}
    plan = ref.build_decode_plan(cache, [sid["d"], sid["c"], sid["b"], sid["a"]])
    # depth-first: a, b (under [3 4], in creation order), c, then d's own branch
    assert plan.order.tolist() == [3, 2, 1, 0]
    # segments: [1 2] over a, b, c; [3 4] over a, b
    assert plan.seg_begin.tolist() == [0, 0] and plan.seg_end.tolist() == [3, 2]
    assert plan.piece_chunks.tolist() == [ch["a"][0], ch["a"][1]]
    assert plan.private_chunks.tolist() == [ch["a"][2], ch["b"][2], ch["c"][1], ch["d"][0]]
    assert plan.seq_pieces.tolist() == [0, 1, 0, 1, 0] and plan.seq_piece_indptr.tolist() == [0, 2, 4, 5, 5]
    assert plan.piece_state_offset.tolist() == [0, 3, 5] and plan.path_len.tolist() == [3, 3, 2, 1]
    assert_same_plan(fast.build_decode_plan(cache, [sid["d"], sid["c"], sid["b"], sid["a"]]), plan)


@pytest.mark.parametrize("bad", [lambda a, b: [a, a], lambda a, b: [a, 999], lambda a, b: [a, True],
                                 lambda a, b: [a, float(b)], lambda a, b: [], lambda a, b: [a, "1"],
                                 lambda a, b: np.array([a, a]), lambda a, b: np.array([a, b], np.float64),
                                 lambda a, b: [np.int64(a), b, b], lambda a, b: [a, None],
                                 lambda a, b: [a, b, "empty"], lambda a, b: np.array([[a, b]]),
                                 lambda a, b: a, lambda a, b: {a, b}])
def test_same_errors_as_the_reference(bad):
    cache = ChunkCache(1, 1, 1, 16, chunk_size=2)
    a = cache.add_sequence()
    cache.reserve(a, [1, 2, 3])
    cache.commit(a)
    b = cache.add_sequence([1, 2, 5])
    cache.reserve(b, [5])
    cache.commit(b)
    empty = cache.add_sequence([7])  # no tokens yet
    seqs = bad(a, b)
    if isinstance(seqs, list):
        seqs = [empty if isinstance(x, str) and x == "empty" else x for x in seqs]
    with pytest.raises((ValueError, TypeError, CacheError)) as old:
        ref.build_decode_plan(cache, seqs)
    with pytest.raises(old.type) as new:
        fast.build_decode_plan(cache, seqs)
    assert str(new.value) == str(old.value)


@pytest.mark.parametrize("arg,val,exc", [("piece_chunks", 0, ValueError), ("private_piece_chunks", -1, ValueError),
                                         ("piece_chunks", 2**31, ValueError), ("piece_chunks", 1.5, TypeError),
                                         ("piece_chunks", True, TypeError), ("private_piece_chunks", "auto", TypeError)])
def test_same_piece_size_errors_as_the_reference(arg, val, exc):
    cache = ChunkCache(1, 1, 1, 16, chunk_size=2)
    a = cache.add_sequence()
    cache.reserve(a, [1, 2, 3])
    cache.commit(a)
    plan = ref.build_decode_plan(cache, [a])
    for module in (ref, fast):  # a wrong type is a TypeError, a bad value a ValueError, on both
        with pytest.raises(exc, match=f"^{arg}: "):
            module.build_decode_plan(cache, [a], **{arg: val})
        with pytest.raises(exc, match=f"^{arg}: "):
            module.split_plan(plan, **{arg: val})


def test_same_batch_types_as_the_reference():
    """np.int64 ids, unsigned arrays and ranges plan like the plain list."""
    rng = np.random.default_rng(5)
    cache = ChunkCache(1, 1, 1, 64, chunk_size=4)
    ids = fill(cache, prefix_tree_prompts(5, 9, 4), rng, decode_frac=1.0)
    assert ids == list(range(9))
    for batch in ([np.int64(i) for i in ids], np.array(ids, np.uint32), range(9)):
        check(cache, batch, rng)


def test_plan_host_checks_its_arguments():
    cache = ChunkCache(1, 2, 1, 16, chunk_size=2)
    a = cache.add_sequence()
    cache.reserve(a, [1, 2, 3])
    cache.commit(a)
    for bad, exc in ((3, ValueError), (0, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(exc, match="^num_q_heads: "):
            fast.plan_host(cache, [a], bad)
    with pytest.raises(ValueError, match="^piece_chunks: "):
        fast.plan_host(cache, [a], 2, piece_chunks="big")
