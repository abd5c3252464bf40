"""ChunkAttention decode in NumPy: the two-phase partition against the float64 dense oracle,
and the properties docs/design.md states of it (output unchanged by piece sizes, chunk size, insertion
order, sharing on/off and batch order), plus the merge operator of attention states.

Hypothesis draws the structure (seed, request count, chunk size, tree depth, GQA ratio, dtype,
head_dim, piece sizes); NumPy's generators, seeded from it, fill the arrays.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cpattn
from cpattn.reference.chunk_attention import (ChunkAttentionDecode, attention_state, build_decode_plan, decode,
                                              merge_states, oracle_decode)
from cpattn.reference.dtypes import round_to_storage, storage_numpy_dtype, to_float32, to_storage
from cpattn.reference.chunk_cache import CacheError
from cpattn.testing.strategies import Workload

# Error budget of the float32 two-phase decode against the float64 oracle on the same stored
# K/V and q. Every difference is float32 rounding (unit roundoff u = 2**-24): a score is a
# D-term dot product (error <= D*u*|q||k|, a few hundred u for D = 128), a softmax sum runs over
# at most a few hundred keys (n*u), and each merge adds a few u. Worst-case bounds give about
# 1e3*u ~ 6e-5 relative to max|o|; typical errors are 1e-7..1e-6, so 1e-4 only fails on a
# real bug (one dropped or doubled key moves the output by 1e-3 or more).
DECODE_BUDGET = 1e-4
# Two float32 computations of the same quantity that differ only in summation order.
SAME_BUDGET = 1e-5

ODD_BATCHES = [1, 2, 3, 5, 7, 8, 13, 77]


# the prefix-sharing workload of the shipped strategies (cpattn.testing.strategies.Workload)


@st.composite
def workloads(draw, head_dims=st.sampled_from([8, 16, 64, 128])):
    return Workload(
        seed=draw(st.integers(0, 2**32 - 1)),
        num_requests=draw(st.sampled_from(ODD_BATCHES)),
        chunk_size=draw(st.sampled_from([2, 4, 8, 16])),
        levels=draw(st.integers(1, 3)),
        fanout=draw(st.integers(1, 3)),
        num_layers=draw(st.integers(1, 2)),
        num_kv_heads=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 4])),
        head_dim=draw(head_dims),
        dtype=draw(st.sampled_from(["float16", "bfloat16"])),
    )


piece_sizes = st.none() | st.integers(1, 4)


def rel_err(o, ref):
    return float(np.abs(np.asarray(o, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_same(a, b, budget=SAME_BUDGET):
    assert a.shape == b.shape
    err = rel_err(a, np.asarray(b, np.float64))
    assert err <= budget, f"relative error {err:.3g} > {budget:.3g}"


def run(cache, ids, q, layer=0, **plan_kw):
    return decode(cache, build_decode_plan(cache, ids, **plan_kw), q, layer)


# ---------------------------------------------------------------------- decode vs the oracle
@given(w=workloads(), piece=piece_sizes, private=piece_sizes, data=st.data())
def test_decode_matches_dense_oracle(w, piece, private, data):
    cache, ids = w.cache()
    layer = data.draw(st.integers(0, w.num_layers - 1), label="layer")
    q = w.queries()
    plan = build_decode_plan(cache, ids, piece_chunks=piece, private_piece_chunks=private)
    o, lse = decode(cache, plan, q, layer, return_lse=True)
    ref, ref_lse = oracle_decode(cache, ids, q, layer)
    assert o.dtype == np.float32 and o.shape == (w.num_requests, w.num_q_heads, w.head_dim)
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    err = rel_err(o, ref)
    assert err <= DECODE_BUDGET, f"relative error {err:.3g} > {DECODE_BUDGET:.3g}"
    assert np.abs(lse - ref_lse).max() <= DECODE_BUDGET * max(1.0, np.abs(ref_lse).max())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decode_matches_dense_oracle_at_model_head_dims(head_dim, dtype):
    w = Workload(seed=11, num_requests=7, chunk_size=16, levels=2, fanout=3, num_layers=1,
                 num_kv_heads=2, group=4, head_dim=head_dim, dtype=dtype)
    cache, ids = w.cache()
    q = w.queries()
    plan = build_decode_plan(cache, ids, piece_chunks=1, private_piece_chunks=1)
    assert plan.num_pieces > 0 and plan.num_items > 0  # both phases and the merge are exercised
    assert rel_err(decode(cache, plan, q), oracle_decode(cache, ids, q)[0]) <= DECODE_BUDGET


def test_the_oracle_is_attention_over_the_written_tokens():
    """oracle_decode checked once against attention written out from TokenKV, not the cache."""
    w = Workload(seed=5, num_requests=3, chunk_size=4, levels=2, fanout=2, num_layers=2,
                 num_kv_heads=2, group=2, head_dim=16, dtype="bfloat16")
    cache, ids = w.cache()
    q = w.queries()
    kv = w.kv()
    o, _ = oracle_decode(cache, ids, q, layer=1)
    for b, sid in enumerate(ids):
        k, v = (to_float32(x[1], w.dtype).astype(np.float64) for x in kv(cache.seq_tokens(sid)))
        for h in range(w.num_q_heads):
            qh = to_float32(q[b, h], w.dtype).astype(np.float64)
            s = k[:, h // w.group] @ qh / np.sqrt(w.head_dim)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(o[b, h], p @ v[:, h // w.group] / p.sum(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- plan structure
@given(w=workloads(head_dims=st.just(8)), piece=piece_sizes, private=piece_sizes)
def test_plan_covers_each_path_once_and_reads_shared_chunks_once(w, piece, private):
    cache, ids = w.cache()
    plan = build_decode_plan(cache, ids, piece_chunks=piece, private_piece_chunks=private)
    assert sorted(plan.order.tolist()) == list(range(len(ids)))
    pieces = [plan.piece_chunks[plan.piece_chunk_indptr[p]: plan.piece_chunk_indptr[p + 1]].tolist()
              for p in range(plan.num_pieces)]
    for p, chunks in enumerate(pieces):
        assert plan.piece_end[p] - plan.piece_begin[p] >= 2  # a piece is shared in this batch
        assert 1 <= len(chunks) <= (piece or len(chunks))
    flat = [x for c in pieces for x in c]
    assert len(flat) == len(set(flat))  # every shared chunk is read once per batch
    for pos in range(len(ids)):
        sid = ids[plan.order[pos]]
        mine = [x for p in plan.seq_pieces[plan.seq_piece_indptr[pos]: plan.seq_piece_indptr[pos + 1]]
                for x in pieces[p]]
        for p in plan.seq_pieces[plan.seq_piece_indptr[pos]: plan.seq_piece_indptr[pos + 1]]:
            assert plan.piece_begin[p] <= pos < plan.piece_end[p]
        private_chunks = plan.private_chunks[plan.private_indptr[pos]: plan.private_indptr[pos + 1]].tolist()
        assert mine + private_chunks == cache.seq_chunks(sid)  # root side first, nothing twice
        items = range(plan.seq_item_indptr[pos], plan.seq_item_indptr[pos + 1])
        covered = [x for i in items for x in plan.private_chunks[plan.item_begin[i]: plan.item_end[i]]]
        assert covered == private_chunks and all(plan.item_pos[i] == pos for i in items)
        assert all(plan.item_end[i] - plan.item_begin[i] <= (private or 10**9) for i in items)
        others = {x for j in ids if j != sid for x in cache.seq_chunks(j)}
        assert not set(private_chunks) & others  # private: on no other path of the batch
        assert plan.path_len[pos] == len(cache.seq_chunks(sid))
        assert plan.slots[pos] == cache.seq_slot(sid)


# ---------------------------------------------------------------------- invariance
@given(w=workloads(head_dims=st.sampled_from([8, 16])), piece=piece_sizes, private=piece_sizes)
def test_output_unchanged_by_piece_sizes(w, piece, private):
    cache, ids = w.cache()
    q = w.queries()
    assert_same(run(cache, ids, q, piece_chunks=piece, private_piece_chunks=private), run(cache, ids, q))


@given(w=workloads(head_dims=st.sampled_from([8, 16])), c=st.sampled_from([1, 2, 4, 8, 32]))
def test_output_unchanged_by_chunk_size(w, c):
    q = w.queries()
    cache_a, ids_a = w.cache()
    cache_b, ids_b = w.cache(chunk_size=c)
    assert [cache_a.seq_tokens(s) for s in ids_a] == [cache_b.seq_tokens(s) for s in ids_b]
    assert_same(run(cache_b, ids_b, q), run(cache_a, ids_a, q))


@given(w=workloads(head_dims=st.sampled_from([8, 16])), data=st.data())
def test_output_unchanged_by_insertion_order(w, data):
    order = data.draw(st.permutations(range(w.num_requests)), label="order")
    q = w.queries()
    cache_a, ids_a = w.cache()
    cache_b, ids_b = w.cache(order=order)
    assert_same(run(cache_b, ids_b, q, piece_chunks=2), run(cache_a, ids_a, q))


@given(w=workloads(head_dims=st.sampled_from([8, 16])))
def test_output_unchanged_by_sharing(w):
    q = w.queries()
    cache_a, ids_a = w.cache()
    cache_b, ids_b = w.cache(share_prefix=False)
    assert cache_b.stats()["tokens_stored"] == cache_b.stats()["tokens_flat"]
    assert cache_a.stats()["tokens_stored"] <= cache_b.stats()["tokens_stored"]
    plan_b = build_decode_plan(cache_b, ids_b)
    assert plan_b.num_pieces == 0  # nothing shared: phase 2 does everything
    assert_same(decode(cache_b, plan_b, q), run(cache_a, ids_a, q))


@given(w=workloads(head_dims=st.sampled_from([8, 16])), data=st.data())
def test_output_rows_follow_the_callers_batch_order(w, data):
    perm = np.array(data.draw(st.permutations(range(w.num_requests)), label="perm"))
    cache, ids = w.cache()
    q = w.queries()
    o = run(cache, ids, q)
    o_perm = run(cache, [ids[i] for i in perm], np.ascontiguousarray(q[perm]))
    assert_same(o_perm, o[perm])
    # a sub-batch gives each sequence the same answer (sharing is decided per batch)
    sub = perm[: max(1, len(perm) // 2)]
    assert_same(run(cache, [ids[i] for i in sub], np.ascontiguousarray(q[sub])), o[sub])


def test_plan_survives_appends_within_a_chunk():
    """The plan reads lengths at run time: appends into partial chunks need no new plan, and
    the first append that opens a chunk makes the plan stale."""
    w = Workload(seed=3, num_requests=5, chunk_size=8, levels=2, fanout=2, num_layers=1,
                 num_kv_heads=1, group=2, head_dim=16, dtype="float16")
    cache, ids = w.cache()
    kv = w.kv()
    c = cache.chunk_size

    def append(seqs):
        ks, vs = zip(*(kv([1], start=cache.seq_len(s)) for s in seqs))
        cache.append(seqs, [1] * len(seqs), np.concatenate(ks, axis=1), np.concatenate(vs, axis=1))

    full = [s for s in ids if cache.seq_len(s) % c == 0]
    if full:  # open a partial chunk for sequences that end on a boundary
        append(full)
    plan = build_decode_plan(cache, ids)
    q = w.queries()
    appended = 0
    while room := [s for s in ids if cache.seq_len(s) % c]:
        append(room)
        appended += len(room)
        assert cache.version == plan.version
        assert rel_err(decode(cache, plan, q), oracle_decode(cache, ids, q)[0]) <= DECODE_BUDGET
    assert appended >= len(ids)
    append(ids[:1])  # every tail is full now: this append opens a chunk
    with pytest.raises(CacheError, match="plan"):
        decode(cache, plan, q)
    assert rel_err(run(cache, ids, q), oracle_decode(cache, ids, q)[0]) <= DECODE_BUDGET


# ---------------------------------------------------------------------- merge_states
def states(seed, n=5, d=8, empty=()):
    rng = np.random.default_rng(seed)
    o = rng.standard_normal((n, d)).astype(np.float32)
    lse = (3 * rng.standard_normal(n)).astype(np.float32)
    lse[list(empty)] = -np.inf
    return o, lse


@given(seeds=st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3, unique=True))
def test_merge_is_commutative_and_associative(seeds):
    a, b, c = (states(s) for s in seeds)
    ab = merge_states(*a, *b)
    ba = merge_states(*b, *a)
    np.testing.assert_array_equal(ab[0], ba[0])
    np.testing.assert_array_equal(ab[1], ba[1])
    left = merge_states(*ab, *c)
    right = merge_states(*a, *merge_states(*b, *c))
    np.testing.assert_allclose(left[0], right[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(left[1], right[1], rtol=1e-6, atol=1e-6)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 40), cut=st.integers(0, 40))
def test_merge_of_a_split_equals_attention_over_all_keys(seed, n, cut):
    cut = min(cut, n)  # 0 or n: one side is empty
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) for s in ((3, 16), (n, 16), (n, 16)))
    o, lse = merge_states(*attention_state(q, k[:cut], v[:cut], 0.25),
                          *attention_state(q, k[cut:], v[cut:], 0.25))
    o_all, lse_all = attention_state(q, k, v, 0.25, np.float64)
    np.testing.assert_allclose(o, o_all, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, lse_all, rtol=1e-5, atol=1e-5)


def test_merge_with_empty_states():
    o, lse = states(1)
    junk = np.full_like(o, 1e30)  # an empty state's o is anything finite
    empty = np.full_like(lse, -np.inf)
    for got in (merge_states(o, lse, junk, empty), merge_states(junk, empty, o, lse)):
        np.testing.assert_array_equal(got[0], o)
        np.testing.assert_array_equal(got[1], lse)
    with np.errstate(all="raise"):
        eo, else_ = merge_states(junk, empty, junk, empty)
    assert np.isneginf(else_).all() and np.isfinite(eo).all()
    # mixed rows: some rows empty on one side only
    o2, lse2 = states(2, empty=[0, 3])
    m, ml = merge_states(o, lse, o2, lse2)
    np.testing.assert_array_equal(m[[0, 3]], o[[0, 3]])
    np.testing.assert_array_equal(ml[[0, 3]], lse[[0, 3]])
    eo, el = attention_state(np.ones((2, 4)), np.zeros((0, 4)), np.zeros((0, 4)), 1.0)
    assert eo.shape == (2, 4) and np.isneginf(el).all()


# ---------------------------------------------------------------------- extreme logits
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_extreme_logits_stay_finite(sign, dtype):
    w = Workload(seed=9, num_requests=7, chunk_size=4, levels=2, fanout=3, num_layers=1,
                 num_kv_heads=1, group=2, head_dim=64, dtype=dtype)
    cache, ids = w.cache()
    q1 = to_float32(w.queries(), dtype)
    # scale q so the largest |score| is about 1e4 (q stays well inside float16 range)
    top = max(np.abs(to_float32(cache.read_kv(s, 0)[0], dtype)[:, 0] @ q1[b].T).max()
              for b, s in enumerate(ids)) / np.sqrt(w.head_dim)
    q = to_storage(sign * q1 * np.float32(1e4 / top), dtype)
    o, lse = decode(cache, build_decode_plan(cache, ids, piece_chunks=1, private_piece_chunks=1), q,
                    return_lse=True)
    ref, ref_lse = oracle_decode(cache, ids, q)
    assert np.abs(ref_lse).max() > 5e3  # the scores really are extreme
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    # a float32 score of magnitude 1e4 is off by up to D * u * 1e4 ~ 4e-2 (worst case; about
    # sqrt(D) * u * 1e4 ~ 5e-3 typically), which moves a softmax weight by as much relatively
    assert rel_err(o, ref) <= 1e-2
    assert np.abs(lse - ref_lse).max() <= 1e-4 * np.abs(ref_lse).max()


# ---------------------------------------------------------------------- ChunkAttentionDecode
def small():
    w = Workload(seed=21, num_requests=5, chunk_size=4, levels=2, fanout=2, num_layers=2,
                 num_kv_heads=2, group=2, head_dim=16, dtype="bfloat16")
    cache, ids = w.cache()
    return w, cache, ids


@given(w=workloads(head_dims=st.sampled_from([8, 16])), piece=st.none() | st.just("auto") | st.integers(1, 3),
       data=st.data())
def test_class_run_is_decode_rounded_once_to_storage(w, piece, data):
    cache, ids = w.cache()
    layer = data.draw(st.integers(0, w.num_layers - 1), label="layer")
    q = w.queries()
    dec = cpattn.ChunkAttentionDecode(cache, piece_chunks=piece, private_piece_chunks=piece)
    assert type(dec) is ChunkAttentionDecode  # a NumPy cache gets the reference decoder
    plan = dec.plan(ids, w.num_q_heads)
    assert dec.decode_plan is plan and plan.batch == tuple(ids)
    o = dec.run(q, layer)
    want, want_lse = decode(cache, plan, q, layer, return_lse=True)
    assert o.dtype == storage_numpy_dtype(w.dtype) and o.shape == q.shape
    assert np.array_equal(to_float32(o, w.dtype), round_to_storage(want, w.dtype))
    o2, lse = dec.run(q, layer, return_lse=True)
    assert np.array_equal(o2, o) and lse.dtype == np.float32 and np.array_equal(lse, want_lse)
    # "auto" plans no split in the reference; any piece size gives the same result
    if piece in (None, "auto"):
        assert plan.num_pieces == plan.num_segments and plan.num_items == int((np.diff(plan.private_indptr) > 0).sum())
    ref, _ = oracle_decode(cache, ids, q, layer)
    assert rel_err(to_float32(o, w.dtype), ref) <= DECODE_BUDGET + 2.0**-8


def test_class_writes_out_and_lse_out_in_place():
    w, cache, ids = small()
    dec = ChunkAttentionDecode(cache)
    dec.plan(ids, w.num_q_heads)
    q = w.queries()
    out = np.full(q.shape, 0x7FC0, np.uint16)
    lse_out = np.full(q.shape[:2], np.nan, np.float32)
    o, lse = dec.run(q, 1, out=out, lse_out=lse_out)
    assert o is out and lse is lse_out
    want, want_lse = dec.run(q, 1, return_lse=True)
    assert np.array_equal(out, want) and np.array_equal(lse_out, want_lse)
    assert dec.run(q, 1, out=out) is out
    for kw, exc in ((dict(out=out.astype(np.float16)), TypeError), (dict(out=out[:1]), ValueError),
                    (dict(out=out.tolist()), TypeError), (dict(lse_out=lse_out.astype(np.float64)), TypeError),
                    (dict(lse_out=lse_out[:, :1]), ValueError), (dict(return_lse=1), TypeError)):
        before = (out.copy(), lse_out.copy())
        with pytest.raises(exc, match="^(out|lse_out|return_lse): "):
            dec.run(q, 1, **kw)
        assert np.array_equal(out, before[0]) and np.array_equal(lse_out, before[1], equal_nan=True)


@pytest.mark.parametrize("scale,exc", [(0, ValueError), (0.0, ValueError), (-1.0, ValueError),
                                       (float("nan"), ValueError), (float("inf"), ValueError),
                                       (-float("inf"), ValueError), ("0.5", TypeError), (True, TypeError),
                                       (np.float32("nan"), ValueError), ([0.5], TypeError)])
def test_bad_scale_is_refused(scale, exc):
    """Not a number: TypeError; NaN, infinity, zero or negative: ValueError."""
    w, cache, ids = small()
    q = w.queries()
    dec = ChunkAttentionDecode(cache)
    plan = dec.plan(ids, w.num_q_heads)
    for call in (lambda: dec.run(q, scale=scale), lambda: decode(cache, plan, q, scale=scale),
                 lambda: oracle_decode(cache, ids, q, scale=scale)):
        with pytest.raises(exc, match="^scale: "):
            call()


def test_scale_is_used():
    w, cache, ids = small()
    q = w.queries()
    dec = ChunkAttentionDecode(cache)
    dec.plan(ids, w.num_q_heads)
    o, lse = dec.run(q, scale=0.3, return_lse=True)
    ref, ref_lse = oracle_decode(cache, ids, q, scale=np.float32(0.3))
    assert rel_err(to_float32(o, w.dtype), ref) <= DECODE_BUDGET + 2.0**-8
    assert np.abs(lse - ref_lse).max() <= 1e-4 * max(1.0, np.abs(ref_lse).max())
    assert not np.allclose(lse, dec.run(q, return_lse=True)[1])  # not the default 1/sqrt(D)


def test_class_refuses_a_stale_or_missing_plan_and_bad_arguments():
    w, cache, ids = small()
    q = w.queries()
    dec = ChunkAttentionDecode(cache)
    with pytest.raises(CacheError, match="^plan: "):
        dec.run(q)
    dec.plan(ids, w.num_q_heads)
    with pytest.raises(ValueError, match="^q: "):
        dec.run(np.ascontiguousarray(np.concatenate([q, q], axis=1)))  # more heads than planned
    with pytest.raises(ValueError, match="^layer: "):
        dec.run(q, w.num_layers)
    with pytest.raises(TypeError, match="^layer: "):
        dec.run(q, True)
    for bad, exc in ((0, ValueError), (3, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(exc, match="^num_q_heads: "):
            dec.plan(ids, bad)
    for kw, exc in ((dict(piece_chunks=0), ValueError), (dict(private_piece_chunks="x"), ValueError),
                    (dict(piece_chunks=1.5), TypeError)):
        with pytest.raises(exc, match="^(piece_chunks|private_piece_chunks): "):
            ChunkAttentionDecode(cache, **kw)
    with pytest.raises(TypeError, match="^units_per_sm: "):
        ChunkAttentionDecode(cache, units_per_sm=2.0)
    cache.release(cache.add_sequence([]))  # any structural change makes the plan stale
    with pytest.raises(CacheError, match="^plan: "):
        dec.run(q)
    dec.plan(ids, w.num_q_heads)
    dec.run(q)
