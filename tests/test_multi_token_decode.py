"""Multi-token decode (docs/design.md, *Multi-token decode*): k query tokens per sequence, causal
among them or a token tree, on the two-phase partition; and ``truncate``, the rollback of
rejected draft tokens, which never modifies a shared chunk.

Hypothesis draws the structure (workload geometry, k, which sequences are forked after their
drafts and by how much they grow, whether a tree is drawn and whether it is one for all, piece
sizes, seeds); NumPy's generators, seeded from it, fill the arrays and the tree parent arrays.
Forks after the drafts make chunks that hold new tokens shared, so phase 1 masks too, and
forks that grow put rows of different lengths in one piece.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpattn.arrays import to_host
from cpattn.reference.chunk_attention import MAX_QUERIES_PER_SEQ, build_decode_plan, decode, key_starts, oracle_decode
from cpattn.reference.chunk_cache import CacheError, CacheFullError, ChunkCache
from cpattn.reference.dtypes import round_to_storage, to_float32
from cpattn.reference.workloads import fill_cache, random_queries
from cpattn.testing import assert_cache_unchanged, assert_close_to_oracle, poisoned, poisoned_lse, snapshot
from cpattn.testing.strategies import Workload, workloads

DECODE_BUDGET = 1e-4  # float32 two-phase decode vs the float64 oracle (tests/test_chunk_attention.py)
SAME_BUDGET = 1e-5


def rel_err(o, ref):
    return float(np.abs(np.asarray(o, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---------------------------------------------------------------------- workloads
def tree_from_parents(parents) -> np.ndarray:
    """[k, k] bool mask of a token tree given as a parent array (-1: a root)."""
    k = len(parents)
    m = np.zeros((k, k), bool)
    for j, p in enumerate(parents):
        m[j, j] = True
        if p >= 0:
            m[j] |= m[p]
    return m


def random_trees(seed: int, batch: int, k: int, shared: bool) -> np.ndarray:
    """A token tree per sequence ([batch, k, k]), or one for all ([k, k]): parent of token j
    drawn from [-1, j) (-1: a root under the past)."""
    rng = np.random.default_rng(seed)
    trees = [tree_from_parents([int(rng.integers(-1, j)) for j in range(k)]) for _ in range(1 if shared else batch)]
    return trees[0] if shared else np.stack(trees)


@dataclass(frozen=True)
class MultiWorkload:
    """A ``Workload`` whose sequences carry ``k`` query tokens each (``k - 1`` drafts after the
    decode token), plus forks taken after the drafts (sharing the full chunks that hold them),
    each grown by its own number of tokens."""

    base: Workload
    k: int
    forks: tuple  # (source index, extra tokens) pairs
    tree: str  # "causal" | "shared" | "each"

    def cache(self, backend=None, share_prefix=True):
        w, k = self.base, self.k
        make = backend.make_cache if backend is not None else ChunkCache
        c = w.chunk_size
        longest = max(map(len, w.prompts())) + 2 * MAX_QUERIES_PER_SEQ  # every sequence on its own, grown
        n_chunks = self.batch * (longest // c + 2) + 8
        cache = make(w.num_layers, w.num_kv_heads, w.head_dim, n_chunks, chunk_size=c, dtype=w.dtype,
                     share_prefix=share_prefix, max_sequences=2 * (w.num_requests + len(self.forks)) + 8)
        kv = w.kv()
        asarray = backend.asarray if backend is not None else np.asarray
        ids = fill_cache(cache, w.prompts(), kv)
        for i, sid in enumerate(ids):
            self.extend(cache, sid, [(3 * i + t) % kv.vocab for t in range(k - 1)], asarray)
        for src, extra in self.forks:
            f = cache.fork(ids[src % len(ids)])
            self.extend(cache, f, [(5 * src + t) % kv.vocab for t in range(extra)], asarray)
            ids.append(f)
        return cache, ids

    def extend(self, cache, sid, toks, asarray=np.asarray):
        if toks:
            k, v = self.base.kv()(toks, start=cache.seq_len(sid))
            cache.extend(sid, toks, asarray(k), asarray(v))

    @property
    def batch(self) -> int:
        return self.base.num_requests + len(self.forks)

    def queries(self):
        w = self.base
        return random_queries(w.seed + 7, self.batch * self.k, w.num_q_heads, w.head_dim, w.dtype)

    def tree_mask(self):
        if self.tree == "causal":
            return None
        return random_trees(self.base.seed + 3, self.batch, self.k, self.tree == "shared")


@st.composite
def multi_workloads(draw, head_dims=st.sampled_from([8, 16]), chunk_sizes=st.sampled_from([2, 4, 8, 16]),
                    ks=st.integers(1, MAX_QUERIES_PER_SEQ), batch_sizes=st.sampled_from([1, 2, 3, 5, 8])):
    base = draw(workloads(head_dims=head_dims, chunk_sizes=chunk_sizes, batch_sizes=batch_sizes))
    k = draw(ks, label="k")
    forks = tuple(draw(st.lists(st.tuples(st.integers(0, 20), st.integers(0, k)), max_size=3), label="forks"))
    tree = draw(st.sampled_from(["causal", "shared", "each"]), label="tree")
    return MultiWorkload(base, k, forks, tree)


piece_sizes = st.none() | st.integers(1, 3)


# ---------------------------------------------------------------------- reference vs the oracle
@given(mw=multi_workloads(), piece=piece_sizes, private=piece_sizes, data=st.data())
def test_multi_token_decode_matches_the_oracle(mw, piece, private, data):
    cache, ids = mw.cache()
    layer = data.draw(st.integers(0, mw.base.num_layers - 1), label="layer")
    q, mask = mw.queries(), mw.tree_mask()
    plan = build_decode_plan(cache, ids, piece, private, queries_per_seq=mw.k, tree_mask=mask)
    o, lse = decode(cache, plan, q, layer, return_lse=True)
    ref, ref_lse = oracle_decode(cache, ids, q, layer, queries_per_seq=mw.k, tree_mask=mask)
    assert o.shape == q.shape and lse.shape == q.shape[:2] and o.dtype == lse.dtype == np.float32
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    assert rel_err(o, ref) <= DECODE_BUDGET
    assert np.abs(lse - ref_lse).max() <= DECODE_BUDGET * max(1.0, np.abs(ref_lse).max())


@pytest.mark.parametrize("c", [2, 4, 16])
def test_new_tokens_in_shared_chunks_are_masked_in_phase_one(c):
    """Forks after the drafts share the full chunks that hold them: phase 1 pieces then cover
    new tokens of some rows, of sequences of different lengths."""
    base = Workload(seed=17, num_requests=3, chunk_size=c, levels=2, fanout=2, num_layers=1, num_kv_heads=2,
                    group=2, head_dim=16, dtype="bfloat16")
    mw = MultiWorkload(base, 2 * c if 2 * c <= MAX_QUERIES_PER_SEQ else MAX_QUERIES_PER_SEQ,
                       ((0, 0), (0, 1), (1, 3)), "each")
    cache, ids = mw.cache()
    plan = build_decode_plan(cache, ids, 1, 1, queries_per_seq=mw.k, tree_mask=mw.tree_mask())
    new0 = cache.slot_lens[plan.slots] - mw.k
    piece_key0, _ = key_starts(plan)
    ends = piece_key0 + c * np.diff(plan.piece_chunk_indptr)
    masked = [p for p in range(plan.num_pieces) if ends[p] > new0[plan.piece_begin[p]:plan.piece_end[p]].min()]
    assert masked, "no piece holds new tokens: the test lost its point"
    q = mw.queries()
    ref, _ = oracle_decode(cache, ids, q, queries_per_seq=mw.k, tree_mask=mw.tree_mask())
    assert rel_err(decode(cache, plan, q), ref) <= DECODE_BUDGET


def test_the_multi_token_oracle_is_single_token_attention_on_shorter_sequences():
    """Causal query j of a sequence of length L is the one-token decode of its first L-k+j+1
    tokens (forks truncated to that length); a tree query is one over the past and its
    ancestors, which is the causal query of a chain tree."""
    base = Workload(seed=2, num_requests=3, chunk_size=4, levels=2, fanout=2, num_layers=1, num_kv_heads=1,
                    group=2, head_dim=16, dtype="float16")
    mw = MultiWorkload(base, 6, (), "causal")
    cache, ids = mw.cache()
    q = mw.queries()
    o, lse = oracle_decode(cache, ids, q, queries_per_seq=mw.k)
    for b, sid in enumerate(ids):
        for j in range(mw.k):
            f = cache.fork(sid)
            cache.truncate(f, mw.k - 1 - j)
            one, one_lse = oracle_decode(cache, [f], q[b * mw.k + j][None])
            np.testing.assert_allclose(o[b * mw.k + j], one[0], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(lse[b * mw.k + j], one_lse[0], rtol=1e-12, atol=1e-12)
            cache.release(f)
    chain = tree_from_parents([-1] + list(range(mw.k - 1)))  # each token's parent the previous one
    o_chain, _ = oracle_decode(cache, ids, q, queries_per_seq=mw.k, tree_mask=chain)
    np.testing.assert_array_equal(o_chain, o)
    roots = np.eye(mw.k, dtype=bool)  # every draft a root: each sees the past and itself
    o_roots, _ = oracle_decode(cache, ids, q, queries_per_seq=mw.k, tree_mask=roots)
    first = np.arange(len(ids)) * mw.k
    np.testing.assert_array_equal(o_roots[first], o[first])  # query 0 sees the same either way
    assert np.abs(o_roots - o).max() > 1e-3  # the others do not


# ---------------------------------------------------------------------- invariance
@given(mw=multi_workloads(ks=st.integers(2, 9)), piece=piece_sizes, private=piece_sizes)
def test_output_unchanged_by_piece_sizes_and_sharing(mw, piece, private):
    q, mask = mw.queries(), mw.tree_mask()
    cache, ids = mw.cache()
    want = decode(cache, build_decode_plan(cache, ids, queries_per_seq=mw.k, tree_mask=mask), q)
    got = decode(cache, build_decode_plan(cache, ids, piece, private, queries_per_seq=mw.k, tree_mask=mask), q)
    assert rel_err(got, want) <= SAME_BUDGET
    flat, fids = mw.cache(share_prefix=False)
    plan = build_decode_plan(flat, fids, queries_per_seq=mw.k, tree_mask=mask)
    assert plan.num_pieces == 0
    assert rel_err(decode(flat, plan, q), want) <= SAME_BUDGET


def test_one_query_per_sequence_is_the_single_token_decode():
    """queries_per_seq=1 (with or without the one-token tree) is the existing step, bit for bit."""
    base = Workload(seed=8, num_requests=7, chunk_size=4, levels=3, fanout=2, num_layers=1, num_kv_heads=2,
                    group=2, head_dim=16, dtype="float16")
    cache, ids = base.cache()
    q = base.queries()
    want, want_lse = decode(cache, build_decode_plan(cache, ids, 1, 1), q, return_lse=True)
    for mask in (None, np.ones((1, 1), bool), np.ones((len(ids), 1, 1), bool)):
        plan = build_decode_plan(cache, ids, 1, 1, queries_per_seq=1, tree_mask=mask)
        got, got_lse = decode(cache, plan, q, return_lse=True)
        assert np.array_equal(got, want) and np.array_equal(got_lse, want_lse)


@given(mw=multi_workloads(ks=st.integers(2, 6), batch_sizes=st.sampled_from([2, 3, 5])), data=st.data())
def test_output_rows_follow_the_callers_batch_order(mw, data):
    cache, ids = mw.cache()
    perm = np.array(data.draw(st.permutations(range(len(ids))), label="perm"))
    q, mask, k = mw.queries(), mw.tree_mask(), mw.k
    o = decode(cache, build_decode_plan(cache, ids, queries_per_seq=k, tree_mask=mask), q)
    rows = (perm[:, None] * k + np.arange(k)).ravel()
    pmask = mask if mask is None or mask.ndim == 2 else mask[perm]
    o_perm = decode(cache, build_decode_plan(cache, [ids[i] for i in perm], queries_per_seq=k, tree_mask=pmask),
                    np.ascontiguousarray(q[rows]))
    assert rel_err(o_perm, o[rows]) <= SAME_BUDGET


# ---------------------------------------------------------------------- the class, on every backend
def small_multi(backend, k=4, tree="each", forks=((0, 0), (1, 2))):
    base = Workload(seed=21, num_requests=5, chunk_size=backend.chunk_size, levels=2, fanout=2, num_layers=2,
                    num_kv_heads=2, group=2, head_dim=backend.head_dim, dtype="bfloat16")
    mw = MultiWorkload(base, k, forks, tree)
    cache, ids = mw.cache(backend)
    return mw, cache, ids


@pytest.mark.parametrize("k,tree", [(1, "causal"), (3, "causal"), (4, "shared"), (16, "each")])
def test_class_run_matches_the_oracle_into_poisoned_buffers(backend, k, tree):
    mw, cache, ids = small_multi(backend, k, tree)
    q = mw.queries()
    dec = backend.api.ChunkAttentionDecode(cache)
    plan = dec.plan(ids, mw.base.num_q_heads, queries_per_seq=k, tree_mask=mw.tree_mask())
    assert plan.queries_per_seq == k and plan.num_queries == len(ids) * k
    xp = backend.xp
    out, lse_out = poisoned(q.shape, cache.dtype, xp), poisoned_lse(q.shape[:2], xp)
    o, lse = dec.run(backend.asarray(q), 1, out=out, lse_out=lse_out)
    assert o is out and lse is lse_out
    ref_cache, ref_ids = mw.cache()
    oracle, oracle_lse = oracle_decode(ref_cache, ref_ids, q, 1, queries_per_seq=k, tree_mask=mw.tree_mask())
    vmax = float(np.abs(to_float32(to_host(cache.v_pool), cache.dtype)).max())
    assert_close_to_oracle(o, oracle, cache.dtype, vmax, backend=backend)
    assert_close_to_oracle(lse, oracle_lse, cache.dtype, float(np.abs(oracle_lse).max()), backend=backend,
                           kind="lse", what="lse")
    if not backend.kernels:  # the reference math: the float32 decode rounded once
        want = decode(ref_cache, build_decode_plan(ref_cache, ref_ids, queries_per_seq=k, tree_mask=mw.tree_mask()),
                      q, 1)
        assert np.array_equal(to_float32(to_host(o), cache.dtype), round_to_storage(want, cache.dtype))


def test_speculative_steps_with_rollback(backend):
    """Draft k tokens, verify them in one multi-token step, keep a random prefix, truncate the
    rest, repeat: every step equals the oracle, and the shared prompt chunks never change."""
    k = 5
    mw, cache, ids = small_multi(backend, k, "causal", forks=((0, 0), (0, 0), (2, 1)))
    kv = mw.base.kv()
    ref, ref_ids = mw.cache()  # the same operations on a NumPy cache
    shared = sorted({ch for s in ids for ch in cache.seq_chunks(s)
                     if sum(ch in cache.seq_chunks(t) for t in ids) > 1})
    pool_before = to_host(cache.k_pool)[:, shared].copy()
    dec = backend.api.ChunkAttentionDecode(cache)
    for step in range(6):
        mask = random_trees(step, len(ids), k, shared=False) if step % 2 else None
        q = random_queries(step, len(ids) * k, mw.base.num_q_heads, mw.base.head_dim, cache.dtype)
        dec.plan(ids, mw.base.num_q_heads, queries_per_seq=k, tree_mask=mask)
        o = dec.run(backend.asarray(q), 0)
        oracle, _ = oracle_decode(ref, ref_ids, q, 0, queries_per_seq=k, tree_mask=mask)
        vmax = float(np.abs(to_float32(to_host(cache.v_pool), cache.dtype)).max())
        assert_close_to_oracle(o, oracle, cache.dtype, vmax, backend=backend, what=f"step {step}")
        for c_, sids in ((cache, ids), (ref, ref_ids)):  # reject drafts, then draft again
            for b, sid in enumerate(sids):
                accepted = int(np.random.default_rng(100 * step + b).integers(0, k))
                c_.truncate(sid, k - 1 - accepted)
                toks = [int(t) for t in np.random.default_rng(step + b).integers(0, kv.vocab, k - 1)]
                kk, vv = kv(toks, start=c_.seq_len(sid))
                asarray = backend.asarray if c_ is cache else np.asarray
                c_.extend(sid, toks, asarray(kk), asarray(vv))
        assert [cache.seq_tokens(s) for s in ids] == [ref.seq_tokens(s) for s in ref_ids]
    assert shared and np.array_equal(to_host(cache.k_pool)[:, shared], pool_before)


def test_class_refuses_bad_multi_token_arguments_and_keeps_its_plan(backend):
    mw, cache, ids = small_multi(backend, 3, "causal")
    Hq = mw.base.num_q_heads
    dec = backend.api.ChunkAttentionDecode(cache)
    plan = dec.plan(ids, Hq, queries_per_seq=3)
    B = len(ids)
    not_a_tree = np.eye(3, dtype=bool)
    not_a_tree[2, :2] = True  # token 2 sees 0 and 1, but its parent 1 does not see 0
    cases = [
        (dict(queries_per_seq=0), ValueError, "queries_per_seq"),
        (dict(queries_per_seq=MAX_QUERIES_PER_SEQ + 1), ValueError, "queries_per_seq"),
        (dict(queries_per_seq=True), TypeError, "queries_per_seq"),
        (dict(queries_per_seq=2.0), TypeError, "queries_per_seq"),
        (dict(queries_per_seq=3, tree_mask=np.eye(3, dtype=np.int32)), TypeError, "tree_mask"),
        (dict(queries_per_seq=3, tree_mask="causal"), TypeError, "tree_mask"),
        (dict(queries_per_seq=3, tree_mask=np.eye(2, dtype=bool)), ValueError, "tree_mask"),
        (dict(queries_per_seq=3, tree_mask=np.ones((B + 1, 3, 3), bool)), ValueError, "tree_mask"),
        (dict(queries_per_seq=3, tree_mask=np.zeros((3, 3), bool)), ValueError, "tree_mask"),  # not itself
        (dict(queries_per_seq=3, tree_mask=np.ones((3, 3), bool)), ValueError, "tree_mask"),  # a later token
        (dict(queries_per_seq=3, tree_mask=not_a_tree), ValueError, "tree_mask"),
    ]
    for kw, exc, name in cases:
        with assert_cache_unchanged(cache), pytest.raises(exc, match=f"^{name}: "):
            dec.plan(ids, Hq, **kw)
        assert dec.decode_plan is plan  # a refused plan leaves the last one in place
    short = cache.add_sequence([1], *map(backend.asarray, mw.base.kv()([1])))  # too short for 2 queries
    with assert_cache_unchanged(cache), pytest.raises(CacheError, match="^seqs: .*queries_per_seq=2"):
        dec.plan(ids + [short], Hq, queries_per_seq=2)
    assert dec.decode_plan is plan
    cache.release(short)
    dec.plan(ids, Hq, queries_per_seq=3)
    q = mw.queries()[: B * 3]
    with pytest.raises(ValueError, match="^q: expected .*queries_per_seq=3"):
        dec.run(backend.asarray(np.ascontiguousarray(q[:B])), 0)
    with pytest.raises(ValueError, match="^(out|lse_out): "):
        dec.run(backend.asarray(q), 0, out=poisoned((B, Hq, mw.base.head_dim), cache.dtype, backend.xp))
    assert to_host(dec.run(backend.asarray(q), 0)).shape == q.shape


# ---------------------------------------------------------------------- truncate
def tokens_and_kv(cache, sid, layer=0):
    k, v = cache.read_kv(sid, layer)
    return cache.seq_tokens(sid), to_host(k).copy(), to_host(v).copy()


@given(w=workloads(head_dims=st.just(8), chunk_sizes=st.sampled_from([1, 2, 4, 8])), data=st.data())
def test_truncate_keeps_the_prefix_and_never_touches_other_sequences(w, data):
    extra = data.draw(st.lists(st.integers(0, w.num_requests - 1), max_size=3), label="forks")
    tight = data.draw(st.booleans(), label="tight")  # a pool with no room for a copy on write
    size = sum(len(p) // w.chunk_size + 2 for p in w.prompts()) + len(extra)
    cache = ChunkCache(w.num_layers, w.num_kv_heads, w.head_dim, size if tight else 2 * size + 4,
                       chunk_size=w.chunk_size, dtype=w.dtype, max_sequences=w.num_requests + 4)
    ids = fill_cache(cache, w.prompts(), w.kv())
    ids = ids + [cache.fork(ids[i]) for i in extra]  # forks share every full chunk, tail included
    victim = data.draw(st.sampled_from(ids), label="victim")
    r = data.draw(st.integers(0, cache.seq_len(victim)), label="num_tokens")
    before = {s: tokens_and_kv(cache, s) for s in ids}
    others_chunks = sorted({ch for s in ids if s != victim for ch in cache.seq_chunks(s)})
    pool = to_host(cache.k_pool).copy(), to_host(cache.v_pool).copy()
    snap = snapshot(cache)
    try:
        cache.truncate(victim, r)
    except CacheFullError:  # a copy on write found no room: nothing changed
        assert snapshot(cache) == snap
        return
    n = len(before[victim][0]) - r
    toks, k, v = tokens_and_kv(cache, victim)
    assert toks == before[victim][0][:n] and cache.seq_len(victim) == n == cache.slot_lens[cache.seq_slot(victim)]
    assert np.array_equal(k, before[victim][1][:n]) and np.array_equal(v, before[victim][2][:n])
    assert (cache.version > snap["version"]) == (r > 0)
    for s in ids:
        if s != victim:
            got = tokens_and_kv(cache, s)
            assert got[0] == before[s][0] and np.array_equal(got[1], before[s][1]) and np.array_equal(got[2], before[s][2])
    assert np.array_equal(cache.k_pool[:, others_chunks], pool[0][:, others_chunks])  # shared chunks: not a byte
    assert np.array_equal(cache.v_pool[:, others_chunks], pool[1][:, others_chunks])
    # the cache stays whole: the victim grows again, and a prompt matched against the tree gets
    # the original tokens and K/V of whatever prefix it reuses
    if not tight:
        kk, vv = w.kv()([1, 2, 3], start=n)
        cache.extend(victim, [1, 2, 3], kk, vv)
        assert cache.seq_tokens(victim) == before[victim][0][:n] + [1, 2, 3]
    again = cache.add_sequence(before[victim][0])
    m = cache.seq_len(again)
    got = tokens_and_kv(cache, again)
    assert got[0] == before[victim][0][:m] and np.array_equal(got[1], before[victim][1][:m])


def test_truncate_copies_a_shared_tail_on_write_and_cuts_a_private_one_in_place():
    c = 4
    cache = ChunkCache(1, 1, 8, 16, chunk_size=c, dtype="float16")
    base = Workload(seed=1, num_requests=1, chunk_size=c, levels=1, fanout=1, num_layers=1, num_kv_heads=1,
                    group=1, head_dim=8, dtype="float16")
    kv = base.kv()
    toks = list(range(10))  # chunks [0..3] [4..7] full, [8, 9] partial
    a = cache.add_sequence(toks, *kv(toks))
    b = cache.fork(a)  # shares the two full chunks, copies the partial tail
    assert cache.seq_chunks(a)[:2] == cache.seq_chunks(b)[:2]
    shared = cache.seq_chunks(a)[1]
    page = to_host(cache.k_pool[:, shared]).copy()
    cache.truncate(a, 4)  # 6 tokens: the shared chunk [4..7] would be cut: copied
    assert cache.seq_chunks(a)[1] != shared and cache.seq_chunks(b)[1] == shared
    assert np.array_equal(to_host(cache.k_pool[:, shared]), page) and cache.seq_tokens(b) == toks
    assert cache.seq_tokens(a) == toks[:6]
    mine = cache.seq_chunks(a)[1]
    cache.truncate(a, 1)  # private partial tail: cut in place, same chunk
    assert cache.seq_chunks(a) == cache.seq_chunks(b)[:1] + [mine] and cache.seq_tokens(a) == toks[:5]
    cache.truncate(a, 5)
    assert cache.seq_len(a) == 0 and cache.seq_chunks(a) == []
    # a complete chunk registered for matching is not cut in place even when only one sequence uses it
    c2 = cache.add_sequence(toks[:8], *kv(toks[:8]))  # matches both full chunks of b
    cache.release(b)
    reg = cache.seq_chunks(c2)[1]
    cache.truncate(c2, 2)
    assert cache.seq_chunks(c2)[1] != reg
    d = cache.add_sequence(toks[:8])  # the registered chunk is still matched, whole
    assert cache.seq_chunks(d) == cache.seq_chunks(c2)[:1] + [reg]


def test_truncate_refuses_bad_arguments_and_changes_nothing(unchanged):
    c = 4
    cache = ChunkCache(1, 1, 8, 3, chunk_size=c, dtype="float16")
    base = Workload(seed=1, num_requests=1, chunk_size=c, levels=1, fanout=1, num_layers=1, num_kv_heads=1,
                    group=1, head_dim=8, dtype="float16")
    kv = base.kv()
    toks = list(range(8))
    a = cache.add_sequence(toks, *kv(toks))
    b = cache.fork(a)
    staged = cache.add_sequence([9])
    cache.reserve(staged, [1])  # reserved, not committed; the pool is now full
    for args, exc, name in (((a, 9), ValueError, "num_tokens"), ((a, -1), ValueError, "num_tokens"),
                            ((a, True), TypeError, "num_tokens"), ((a, 1.0), TypeError, "num_tokens"),
                            ((99, 1), CacheError, "seq"), ((staged, 1), CacheError, "seq"),
                            ((a, 1), CacheFullError, "pool")):  # the shared tail needs a copy: no room
        with unchanged(cache), pytest.raises(exc, match=f"^{name}: "):
            cache.truncate(*args)
    with unchanged(cache):
        cache.truncate(a, 0)
    cache.truncate(a, 4)  # a whole chunk less: nothing to copy, room or not
    assert cache.seq_tokens(a) == toks[:4] and cache.seq_tokens(b) == toks


def test_truncate_on_the_gpu_cache_marks_the_device_lengths_stale():
    from cpattn.testing import get_backend

    with get_backend("emulated") as be:
        cache = be.make_cache(1, 1, 8, 8, chunk_size=4, dtype="float16")
        base = Workload(seed=1, num_requests=1, chunk_size=4, levels=1, fanout=1, num_layers=1, num_kv_heads=1,
                        group=1, head_dim=8, dtype="float16")
        toks = list(range(7))
        a = cache.add_sequence(toks, *(be.asarray(x) for x in base.kv()(toks)))
        cache.sync_lens()
        assert int(to_host(cache.d_slot_lens)[cache.seq_slot(a)]) == 7
        cache.truncate(a, 2)
        cache.sync_lens()
        assert int(to_host(cache.d_slot_lens)[cache.seq_slot(a)]) == 5 == cache.seq_len(a)


# ---------------------------------------------------------------------- the fast planner and its units
@given(mw=multi_workloads(chunk_sizes=st.sampled_from([2, 4, 16])), piece=piece_sizes, private=piece_sizes)
def test_fast_planner_and_units_carry_the_multi_token_step(mw, piece, private):
    """The GPU planner gives the reference's plan; its units cover k x group rows per sequence
    and name every unit's first key position; the uploaded buffer holds slots and query bits."""
    from cpattn import chunk_attention as fast

    cache, ids = mw.cache()
    mask = mw.tree_mask()
    new = fast.build_decode_plan(cache, ids, piece, private, queries_per_seq=mw.k, tree_mask=mask)
    old = build_decode_plan(cache, ids, piece, private, queries_per_seq=mw.k, tree_mask=mask)
    assert new.queries_per_seq == old.queries_per_seq == mw.k and new.tree_bits == old.tree_bits
    for name, a in old.arrays().items():
        assert np.array_equal(getattr(new, name), a), name
    group, H = mw.base.group, mw.base.num_kv_heads
    units, _ = fast.build_units(new, H, group)
    piece_key0, item_key0 = key_starts(new)
    rows1 = fast.phase1_rows(new.chunk_size)
    rows2 = fast.ROWS_PER_UNIT if mw.k == 1 else rows1
    per_seq = group * mw.k
    covered = {}
    for u in units.tolist():
        cb, ce, slot, minus, pos0, r0, n, h, out = u
        assert 1 <= n <= (rows1 if cb < len(new.piece_chunks) else rows2)
        if cb < len(new.piece_chunks):  # a phase-1 piece
            p = int(np.searchsorted(new.piece_chunk_indptr, cb, side="right")) - 1
            assert minus == (piece_key0[p] if mw.k > 1 else 0) and slot == -1
            span = (new.piece_end[p] - new.piece_begin[p]) * per_seq
        else:
            i = int(np.searchsorted(new.item_begin, cb - len(new.piece_chunks), side="right")) - 1
            last = new.item_end[i] == new.private_indptr[new.item_pos[i] + 1]
            assert minus == (item_key0[i] if mw.k > 1 or last else 0)
            span = per_seq
        for r in range(r0, r0 + n):
            covered[(cb, h, r)] = covered.get((cb, h, r), 0) + 1
        assert r0 + n <= span
    assert all(v == 1 for v in covered.values())
    assert len(covered) == H * per_seq * (int(((new.piece_end - new.piece_begin) * np.diff(new.piece_chunk_indptr) > 0)
                                               .dot(new.piece_end - new.piece_begin)) + new.num_items)
    p2, buf, offs, _ = fast.plan_host(cache, ids, mw.base.num_q_heads, piece or 1, private or 1,
                                      queries_per_seq=mw.k, tree_mask=mask)
    arrays = {n: buf[offs[i]:offs[i + 1]] for i, n in enumerate(fast.DEVICE_ARRAYS)}
    assert np.array_equal(arrays["slots"], p2.slots)
    assert np.array_equal(arrays["query_bits"], old.query_bits().ravel())


# ---------------------------------------------------------------------- the CUDA kernels (device)
@pytest.mark.gpu
@pytest.mark.skipif(not __import__("cpattn").gpu_available(), reason="needs CuPy and a CUDA GPU")
@given(mw=multi_workloads(head_dims=st.sampled_from([64, 128]), chunk_sizes=st.sampled_from([16, 32, 64, 128]),
                          batch_sizes=st.sampled_from([1, 3, 8])),
       piece=st.sampled_from(["auto", None, 1, 3]), data=st.data())
def test_kernels_match_the_reference_and_the_oracle(mw, piece, data):
    """The CUDA decode of a multi-token step into poisoned buffers: within the kernel budget of
    the oracle and of the reference rounded to storage, on a GPU cache mirrored by a NumPy one."""
    import cupy

    from cpattn.chunk_attention import ChunkAttentionDecode as GpuDecode
    from cpattn.testing import get_backend

    group = data.draw(st.sampled_from([1, 4, 8]), label="group")  # up to k x 8 = 128 rows per sequence
    mw = MultiWorkload(Workload(**{**mw.base.__dict__, "group": group}), mw.k, mw.forks, mw.tree)
    be = get_backend("cupy")
    gpu, ids = mw.cache(be)
    cpu, cids = mw.cache()
    assert ids == cids
    q, mask = mw.queries(), mw.tree_mask()
    layer = mw.base.num_layers - 1
    dec = GpuDecode(gpu, piece_chunks=piece, private_piece_chunks=piece)
    dec.plan(ids, mw.base.num_q_heads, queries_per_seq=mw.k, tree_mask=mask)
    out, lse_out = poisoned(q.shape, gpu.dtype, cupy), poisoned_lse(q.shape[:2], cupy)
    dec.run(cupy.asarray(q), layer, out=out, lse_out=lse_out)
    ref_plan = build_decode_plan(cpu, cids, queries_per_seq=mw.k, tree_mask=mask)
    want, want_lse = decode(cpu, ref_plan, q, layer, return_lse=True)
    oracle, oracle_lse = oracle_decode(cpu, cids, q, layer, queries_per_seq=mw.k, tree_mask=mask)
    vmax = float(np.abs(to_float32(cpu.v_pool[layer], cpu.dtype)).max())
    assert_close_to_oracle(out, oracle, gpu.dtype, vmax, backend="cupy")
    assert_close_to_oracle(out, round_to_storage(want, gpu.dtype).astype(np.float64), gpu.dtype, 2 * vmax,
                           backend="cupy", what="o vs reference")
    assert_close_to_oracle(lse_out, oracle_lse, gpu.dtype, float(np.abs(oracle_lse).max()), backend="cupy",
                           kind="lse", what="lse")
    np.testing.assert_allclose(cupy.asnumpy(lse_out), want_lse, rtol=1e-3, atol=1e-3)



@pytest.mark.gpu
@pytest.mark.skipif(not __import__("cpattn").gpu_available(), reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("dtype,head_dim,c,group", [("float16", 128, 64, 4), ("bfloat16", 64, 16, 8),
                                                    ("float16", 64, 128, 1), ("bfloat16", 128, 32, 2)])
@pytest.mark.parametrize("piece", ["auto", None, 1])
def test_one_query_kernels_equal_the_multi_token_kernels_at_one_query(dtype, head_dim, c, group, piece):
    """A step of one query per sequence runs chunk_attend / chunk_merge (none of the multi-token
    code); the same step planned with a tree of one token runs chunk_attend_multi /
    chunk_merge_multi at k = 1. The same keys fold in the same order with the same float
    operations, so the two agree bit for bit, and both are within budget of the oracle."""
    import cupy

    from cpattn.chunk_attention import ChunkAttentionDecode as GpuDecode
    from cpattn.chunk_attention import decode_kernels
    from cpattn.testing import get_backend

    w = Workload(seed=17 + group, num_requests=9, chunk_size=c, levels=3, fanout=2, num_layers=2,
                 num_kv_heads=2, group=group, head_dim=head_dim, dtype=dtype)
    gpu, ids = w.cache(get_backend("cupy"))
    cpu, cids = w.cache()
    q = cupy.asarray(w.queries())
    dec = GpuDecode(gpu, piece_chunks=piece, private_piece_chunks=piece)
    got = {}
    for mask in (None, np.ones((1, 1), bool)):
        plan = dec.plan(ids, w.num_q_heads, tree_mask=mask)
        out, lse_out = poisoned(q.shape, gpu.dtype, cupy), poisoned_lse(q.shape[:2], cupy)
        dec.run(q, 1, out=out, lse_out=lse_out)
        got[decode_kernels(plan)] = (cupy.asnumpy(out), cupy.asnumpy(lse_out))
    assert set(got) == {("chunk_attend", "chunk_merge"), ("chunk_attend_multi", "chunk_merge_multi")}
    (o1, l1), (ok, lk) = got[("chunk_attend", "chunk_merge")], got[("chunk_attend_multi", "chunk_merge_multi")]
    assert np.array_equal(o1.view(np.uint16), ok.view(np.uint16))  # bit for bit
    assert np.array_equal(l1.view(np.uint32), lk.view(np.uint32))
    oracle, oracle_lse = oracle_decode(cpu, cids, w.queries(), 1)
    vmax = float(np.abs(to_float32(cpu.v_pool[1], cpu.dtype)).max())
    assert_close_to_oracle(o1, oracle, gpu.dtype, vmax, backend="cupy")
    assert_close_to_oracle(l1, oracle_lse, gpu.dtype, float(np.abs(oracle_lse).max()), backend="cupy", kind="lse",
                           what="lse")

def emulate_chunk_attend_and_merge(cache, plan, buf, offs, num_units, q, layer, Hq):
    """What raw_kernels/chunk_attention.cu computes from the uploaded arrays, in float64 NumPy:
    each unit's rows (sequence, query, head) decoded the kernel's way, their keys masked by the
    rows' (first new position, tree bits), the states stored at the kernel's indices, and
    chunk_merge's merge per (position, query, head). A model of the kernel contract, for CPUs."""
    from cpattn import chunk_attention as fast
    from cpattn.reference.chunk_attention import attention_state, merge_states

    d = {n: buf[offs[i]:offs[i + 1]] for i, n in enumerate(fast.DEVICE_ARRAYS)}
    units = d["units"].reshape(num_units, -1)
    kq, c, Hkv = plan.queries_per_seq, cache.chunk_size, cache.num_kv_heads
    group, per_seq, D = Hq // Hkv, Hq // Hkv * plan.queries_per_seq, cache.head_dim
    lens = cache.slot_lens
    qf = to_float32(q, cache.dtype).astype(np.float64)
    kp = to_float32(cache.k_pool[layer], cache.dtype).astype(np.float64)
    vp = to_float32(cache.v_pool[layer], cache.dtype).astype(np.float64)
    rows = (plan.num_state_rows + plan.num_items) * kq * Hq
    o_st, l_st = np.full((rows, D), np.nan), np.full(rows, np.nan)
    for cb, ce, slot, minus, pos0, row0, n, kvh, out_base in units.tolist():
        nk = (ce - cb) * c if slot < 0 else lens[slot] - minus
        chunks = d["chunk_list"][cb:ce]
        keys = kp[chunks, kvh].reshape(-1, D)[:nk]
        vals = vp[chunks, kvh].reshape(-1, D)[:nk]
        key_base = minus if kq > 1 else 0
        for r in range(n):
            gr = row0 + r
            s, jg = divmod(gr, per_seq)
            j, g = divmod(jg, group)
            b = int(d["order"][pos0 + s])
            nb = lens[d["slots"][pos0 + s]] - kq
            bits = int(d["query_bits"][b * kq + j])
            p = key_base + np.arange(nk)
            see = (p < nb) | (((bits >> np.clip(p - nb, 0, 31)) & 1) == 1) if kq > 1 else None
            o, lse = attention_state(qf[b * kq + j, kvh * group + g][None], keys, vals, 1 / np.sqrt(D), np.float64,
                                     mask=None if see is None else see[None])
            idx = ((out_base + s) * kq + j) * Hq + kvh * group + g
            assert np.isnan(l_st[idx]), "two units wrote one state"
            o_st[idx], l_st[idx] = o[0], lse[0]
    out = np.full((plan.num_queries, Hq, D), np.nan)
    out_lse = np.full((plan.num_queries, Hq), np.nan)
    spo, spi, pb, sii = d["piece_state_offset"], d["seq_piece_indptr"], d["piece_begin"], d["seq_item_indptr"]
    for pos in range(plan.batch_size):
        rows_ = [spo[p] + pos - pb[p] for p in d["seq_pieces"][spi[pos]:spi[pos + 1]]]
        rows_ += [plan.num_state_rows + i for i in range(sii[pos], sii[pos + 1])]
        for j in range(kq):
            for h in range(Hq):
                o, lse = np.zeros(D), -np.inf
                for row in rows_:
                    idx = (row * kq + j) * Hq + h
                    o, lse = merge_states(o, np.float64(lse), o_st[idx], l_st[idx])
                out[d["order"][pos] * kq + j, h], out_lse[d["order"][pos] * kq + j, h] = o, lse
    return out, out_lse


@given(mw=multi_workloads(head_dims=st.just(8), chunk_sizes=st.sampled_from([2, 4]), ks=st.integers(1, 9),
                          batch_sizes=st.sampled_from([1, 2, 3])),
       piece=st.sampled_from(["auto", None, 1]), sms=st.sampled_from([1, 132]))
def test_the_kernel_contract_on_the_unit_table_equals_the_oracle(mw, piece, sms):
    """The unit table and device arrays plan_host uploads, read the way chunk_attend and
    chunk_merge read them (emulated in NumPy), give the oracle's answer: every state written
    once, rows (sequence, query, head), masks from the rows' lengths and tree bits."""
    from cpattn import chunk_attention as fast

    cache, ids = mw.cache()
    q, mask = mw.queries(), mw.tree_mask()
    Hq = mw.base.num_q_heads
    plan, buf, offs, n_units = fast.plan_host(cache, ids, Hq, piece, piece, 4, sms, queries_per_seq=mw.k,
                                              tree_mask=mask)
    got, got_lse = emulate_chunk_attend_and_merge(cache, plan, buf, offs, n_units, q, 0, Hq)
    want, want_lse = oracle_decode(cache, ids, q, 0, queries_per_seq=mw.k, tree_mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got_lse, want_lse, rtol=1e-9, atol=1e-9)
