"""CompactAttention chunked prefill (NumPy reference) against float64 oracles and brute force.

Hypothesis draws the structure (seed, prompt length with odd ones near block boundaries,
chunking, chunk size 2..16, GQA ratio, head_dim, dtype, layers, selection options); NumPy's
``default_rng`` fills the arrays through ``long_context_qkv``, so prompts have sinks, local
attention and needles even at these small sizes.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpattn.reference.compact_attention import (
    BlockMeans, BlockTables, CompactPrefill, attention_mass, build_block_tables, causal_attention,
    chunked_prefill, compact_prefill, dense_prefill, mass_recall, needle_recall, oracle_prefill,
    relative_error, select_blocks, sparse_prefill, split_chunks)
from cpattn.reference.dtypes import to_float32, to_storage, unit_roundoff
from cpattn.reference.chunk_cache import CacheError, ChunkCache
from cpattn.reference.workloads import long_context_qkv, oracle_block_tables


# ---------------------------------------------------------------------------- helpers
def f32(x, dtype):
    return to_float32(np.asarray(x), dtype)


def workload(g, length):
    """A small structured prompt for geometry g: LongContext with q [L, m, Hq, D] etc."""
    c = g["c"]
    return long_context_qkv(g["seed"], length, g["Hq"], g["Hkv"], g["D"], num_layers=g["layers"],
                            dtype=g["dtype"], num_sinks=2, locality_len=2 * c, needle_len=c,
                            num_needles=2, needle_queries=2)


def new_cache(g, num_chunks=64, **kw):
    cache = ChunkCache(g["layers"], g["Hkv"], g["D"], num_chunks, chunk_size=g["c"], dtype=g["dtype"], **kw)
    return cache, BlockMeans(cache)


def means_state(means):
    """The means' values and, per live sequence, which leading pages count as summarised."""
    cache = means.cache
    current = {s: [means.is_current(cache, s, b) for b in range(len(cache.seq_chunks(s)) + 1)]
               for s in cache.sequences}
    return means.kmean.tobytes(), current


@st.composite
def geometries(draw):
    Hkv = draw(st.sampled_from([1, 2]))
    return dict(c=draw(st.sampled_from([2, 4, 8, 16])), Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4])),
                D=draw(st.sampled_from([4, 8, 16])), dtype=draw(st.sampled_from(["float16", "bfloat16"])),
                layers=draw(st.sampled_from([1, 2])), seed=draw(st.integers(0, 2**32 - 1)))


def awkward(draw, c, max_blocks, low=1):
    """A length in [low, max_blocks*c], often on or one off a block boundary."""
    k = draw(st.integers(0, max_blocks))
    off = draw(st.sampled_from([0, 1, -1, None]))
    n = draw(st.integers(low, max_blocks * c)) if off is None else k * c + off
    return min(max(low, n), max_blocks * c)


def chunking(draw, length, c):
    """Chunk lengths summing to length; all but the last a multiple of c."""
    sizes, rest = [], length
    while rest > 0:
        k = draw(st.integers(0, min(rest // c, 3)))
        if k == 0 or k * c >= rest:
            sizes.append(rest)
            break
        sizes.append(k * c)
        rest -= k * c
    return sizes


def options(draw, g, alpha=None):
    G = g["Hq"] // g["Hkv"]
    return dict(alpha=draw(st.floats(0, 1)) if alpha is None else alpha,
                sink=draw(st.integers(0, 3)), window=draw(st.integers(0, 3)),
                q_tile=draw(st.sampled_from([None, g["c"], 2 * g["c"], 3 * g["c"]])),
                group_size=draw(st.sampled_from([None] + [s for s in (1, 2, 4) if G % s == 0])))


def prefill_one_chunk(g, P, n):
    """A cache holding a prompt of P + n tokens whose last n are the chunk (K/V written)."""
    w = workload(g, P + n)
    cache, means = new_cache(g, num_chunks=max(64, (P + n) // g["c"] + 1))
    seq = cache.add_sequence([])
    if P:
        cache.extend(seq, list(range(P)), w.k[:, :P], w.v[:, :P])
        means.update(cache, seq)
    cache.extend(seq, list(range(P, P + n)), w.k[:, P:], w.v[:, P:])
    return w, cache, means, seq


# ---------------------------------------------------------------------------- alpha 0 = dense
@given(data=st.data(), g=geometries())
def test_alpha_zero_equals_dense_causal_attention_for_any_chunking(data, g):
    c = g["c"]
    m = awkward(data.draw, c, 12)
    sizes = chunking(data.draw, m, c)
    opts = options(data.draw, g, alpha=0.0)
    w = workload(g, m)
    cache, means = new_cache(g)
    seq = cache.add_sequence([])
    o, lse, results = chunked_prefill(cache, means, seq, list(range(m)), w.q, w.k, w.v, sizes, **opts)
    for layer in range(g["layers"]):
        q, k, v = (f32(x[layer], g["dtype"]) for x in (w.q, w.k, w.v))
        o_ref, lse_ref = causal_attention(q, k, v)  # the whole prompt at once, float64
        vmax = np.abs(v).max()
        # float32 accumulation over at most 128 keys of values stored in 16 bits, then o is
        # rounded once to the storage dtype
        assert o.dtype == w.q.dtype
        np.testing.assert_allclose(f32(o[layer], g["dtype"]), o_ref, rtol=0,
                                   atol=(2e-5 + unit_roundoff(g["dtype"])) * vmax)
        np.testing.assert_allclose(lse[layer], lse_ref, rtol=2e-6, atol=2e-6)
    for per_layer in results:
        for res in per_layer:
            assert res.density() == dict(select=1.0, q_union=1.0, group_union=1.0, tables=1.0)
            t = res.block_tables
            assert t.num_past.sum() == t.num_tables * t.num_past_blocks
    # the chunk's K/V went into the tree: read back equals what was written
    for layer in range(g["layers"]):
        rk, rv = cache.read_kv(seq, layer)
        assert rk.tobytes() == w.k[layer].tobytes() and rv.tobytes() == w.v[layer].tobytes()


# ---------------------------------------------------------------------------- selection vs brute force
def brute_scores(q, k, P, n, c, scale):
    """s[h, i, j] with plain loops in float64 from the prompt arrays (not the cache)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    G, Pb, Qb = Hq // Hkv, P // c, -(-n // c)
    kmean = [[k[j * c:(j + 1) * c, h].astype(np.float64).mean(axis=0) for h in range(Hkv)] for j in range(Pb)]
    s = np.zeros((Hq, Qb, Pb))
    if Pb == 0:
        return s
    for h in range(Hq):
        for r in range(n):
            z = np.array([scale * q[P + r, h].astype(np.float64) @ kmean[j][h // G] for j in range(Pb)])
            s[h, r // c] += np.exp(z - z.max())
    return s / s.sum(axis=2, keepdims=True)


@given(data=st.data(), g=geometries())
def test_union_is_minimal_and_matches_brute_force(data, g):
    c = g["c"]
    P = c * data.draw(st.integers(0, 12))
    n = awkward(data.draw, c, 4)
    opts = options(data.draw, g)
    alpha, sink, window = opts["alpha"], opts["sink"], opts["window"]
    w, cache, means, seq = prefill_one_chunk(g, P, n)
    layer = data.draw(st.integers(0, g["layers"] - 1))
    q = w.q[layer, P:]
    sel = select_blocks(cache, means, seq, q, layer, **opts)
    tables = build_block_tables(cache, seq, sel)
    Hq, Hkv, Pb, Qb = g["Hq"], g["Hkv"], P // c, -(-n // c)
    G, s = Hq // Hkv, sel.group_size
    S, tb = G // s, sel.q_tile // c
    T = -(-Qb // tb)

    # pass 2-3: scores and per-(head, query block) decisions against loops in float64
    ref = brute_scores(f32(w.q[layer], g["dtype"]), f32(w.k[layer], g["dtype"]), P, n, c, 1 / np.sqrt(g["D"]))
    np.testing.assert_allclose(sel.scores, ref, rtol=1e-4, atol=1e-6)
    if Pb:
        thr = alpha * ref.max(axis=2, keepdims=True)
        clear = np.abs(ref - thr) > 1e-4 * ref.max(axis=2, keepdims=True)  # not on the threshold
        assert (sel.selected == (ref >= thr))[clear].all()
        # the rule on the selection's own float32 scores, exactly
        rule = sel.scores >= np.float32(alpha) * sel.scores.max(axis=2, keepdims=True)
        forced = [(j < sink) or (j >= Pb - window) for j in range(Pb)]
        assert (sel.keep == (rule | np.array(forced, bool))).all()

    # pass 4-6: each table holds exactly the union of its (head, query block) selections,
    # ascending, then the own blocks from the chunk start to the tile end
    chunks = cache.seq_chunks(seq)
    assert tables.num_tables == T * Hkv * S
    for t in range(T):
        for h in range(Hkv):
            for gg in range(S):
                r = tables.table(t, h, gg)
                heads = range(h * G + gg * s, h * G + (gg + 1) * s)
                qblocks = range(t * tb, min(Qb, (t + 1) * tb))
                want = sorted({j for hd in heads for i in qblocks for j in range(Pb) if sel.keep[hd, i, j]})
                own_end = -(-min(n, (t + 1) * sel.q_tile) // c)
                blocks = tables.blocks[tables.indptr[r]: tables.indptr[r + 1]].tolist()
                assert blocks == want + [Pb + i for i in range(own_end)]
                assert tables.num_past[r] == len(want)
                ids = tables.indices[tables.indptr[r]: tables.indptr[r + 1]].tolist()
                assert ids == [chunks[b] for b in blocks]
                assert tables.to_dense()[t, h, gg].nonzero()[0].tolist() == blocks
    assert tables.qo_indptr.tolist() == [min(n, t * sel.q_tile) for t in range(T + 1)]

    # densities only grow through the unions
    d = sel.density
    assert 0 <= d["select"] <= d["q_union"] <= d["group_union"] <= 1
    if Pb:
        assert d["select"] == pytest.approx(sel.keep.mean())
        assert tables.density(past_only=True) == pytest.approx(tables.num_past.sum() / (T * Hkv * S * Pb))


# ---------------------------------------------------------------------------- recall and error bound
@given(data=st.data(), g=geometries())
def test_recall_is_mass_on_read_blocks_and_bounds_the_error(data, g):
    c = g["c"]
    P = c * data.draw(st.integers(1, 12))
    n = awkward(data.draw, c, 3)
    opts = options(data.draw, g)
    opts["alpha"] = data.draw(st.floats(0.05, 1))
    w, cache, means, seq = prefill_one_chunk(g, P, n)
    layer = g["layers"] - 1
    q = w.q[layer, P:]
    res = compact_prefill(cache, means, seq, q, layer, **opts)
    o_ref, lse_ref = oracle_prefill(cache, seq, q, layer)
    recall = mass_recall(res.lse, lse_ref)  # [n, Hq]

    # exact mass (float64) on the blocks each (row, head) reads
    mass = attention_mass(cache, seq, q, layer)  # [n, Hq, Kb]
    dense = res.block_tables.to_dense()  # [T, Hkv, S, Kb]
    G, s = g["Hq"] // g["Hkv"], res.block_tables.group_size
    tile = np.searchsorted(res.block_tables.qo_indptr, np.arange(n), side="right") - 1
    heads = np.arange(g["Hq"])
    reads = dense[tile[:, None], (heads // G)[None], ((heads % G) // s)[None]]  # [n, Hq, Kb]
    expected = (mass * reads).sum(axis=2)
    tol = 2e-6 * (1 + np.abs(lse_ref))  # float32 lse: a few ulp of its magnitude
    assert (expected > 0).all()
    assert (np.abs(np.log(recall) - np.log(expected)) <= tol).all()
    assert (np.log(recall) <= tol).all()  # recall <= 1 up to rounding

    # |o_sparse - o_dense| <= 2 (1 - r) max|v| per element, plus float32 rounding and the one
    # rounding of o to the storage dtype
    vmax = np.abs(f32(w.v[layer], g["dtype"])).max()
    bound = 2 * (1 - expected)[:, :, None] * vmax + (2e-5 + unit_roundoff(g["dtype"])) * vmax
    o = f32(res.o, g["dtype"])
    assert (np.abs(o - o_ref) <= bound).all()
    assert relative_error(o, o_ref) >= 0


# ---------------------------------------------------------------------------- reused prefix
@given(data=st.data(), g=geometries())
def test_prefill_after_a_prefix_cached_by_another_sequence_equals_prefill_from_scratch(data, g):
    c = g["c"]
    p = c * data.draw(st.integers(1, 4))  # reused prefix, whole chunks
    m = p + awkward(data.draw, c, 4)
    head = chunking(data.draw, p, c)  # p is a multiple of c: every piece is aligned
    rest = chunking(data.draw, m - p, c)
    opts = options(data.draw, g)
    w = workload(g, m)
    tokens = list(range(m))

    # from scratch, in a cache of its own
    cache1, means1 = new_cache(g)
    s1 = cache1.add_sequence([])
    o1, lse1, _ = chunked_prefill(cache1, means1, s1, tokens, w.q, w.k, w.v, head + rest, **opts)

    # another sequence prefills the prefix (then diverges); ours reuses it
    cache2, means2 = new_cache(g)
    extra = awkward(data.draw, c, 2, low=0)
    other = tokens[:p] + [10_000 + i for i in range(extra)]
    w2 = workload(dict(g, seed=g["seed"] ^ 1), max(extra, 1))  # the other prompt's own tail
    ko, vo, qo = (np.concatenate([x[:, :p], y[:, :extra]], axis=1)
                  for x, y in ((w.k, w2.k), (w.v, w2.v), (w.q, w2.q)))
    a = cache2.add_sequence([])
    other_chunks = chunking(data.draw, len(other), c) if extra else head
    chunked_prefill(cache2, means2, a, other, qo, ko, vo, other_chunks, **opts)
    if data.draw(st.booleans()):
        cache2.release(a)  # the prefix stays cached, unreferenced
    b = cache2.add_sequence(tokens, max_match=p)
    assert cache2.seq_len(b) == p
    assert means2.update(cache2, b) == 0  # the shared pages were summarised by the other sequence
    tail = (w.q[:, p:], w.k[:, p:], w.v[:, p:])
    o2, lse2, _ = chunked_prefill(cache2, means2, b, tokens[p:], *tail, rest, **opts)
    np.testing.assert_array_equal(o2, o1[:, p:])
    np.testing.assert_array_equal(lse2, lse1[:, p:])


# ---------------------------------------------------------------------------- block means
def test_block_means_are_float64_means_and_follow_page_reuse():
    g = dict(c=4, Hkv=2, Hq=4, D=8, dtype="bfloat16", layers=2, seed=3)
    w = workload(g, 24)
    cache, means = new_cache(g, num_chunks=4)
    a = cache.add_sequence([])
    cache.extend(a, list(range(10)), w.k[:, :10], w.v[:, :10])
    assert means.update(cache, a) == 2  # two full pages; the partial tail is not summarised
    assert means.update(cache, a) == 0
    k = f32(w.k, "bfloat16").astype(np.float64)
    for j, chunk in enumerate(cache.seq_chunks(a)[:2]):
        want = k[:, 4 * j:4 * j + 4].mean(axis=1).astype(np.float32)  # [L, Hkv, D]
        assert means.kmean[:, chunk].tobytes() == want.tobytes()
    # mid-prefill: reserved but uncommitted pages are not summarised
    slots = cache.reserve(a, list(range(10, 16)))
    for layer in range(2):
        cache.write_kv(layer, slots, w.k[layer, 10:16], w.v[layer, 10:16])
    assert means.update(cache, a) == 0
    cache.commit(a)
    assert means.update(cache, a) == 2
    # the pages are evicted and reused for other keys: summarised again, not read stale
    cache.release(a)
    cache.evict()
    b = cache.add_sequence([])
    cache.extend(b, [50 + i for i in range(8)], w.k[:, 16:24], w.v[:, 16:24])
    assert set(cache.seq_chunks(b)) <= set(range(4))
    assert not means.is_current(cache, b, 2)
    assert means.update(cache, b) == 2
    for j, chunk in enumerate(cache.seq_chunks(b)):
        want = k[:, 16 + 4 * j:20 + 4 * j].mean(axis=1).astype(np.float32)
        assert means.kmean[:, chunk].tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="cache: expected the cache"):
        means.update(new_cache(g)[0], b)


# ---------------------------------------------------------------------------- structured workload
def test_structured_workload_selection_finds_needles_and_oracle_dominates():
    g = dict(c=16, Hkv=2, Hq=8, D=32, dtype="float16", layers=1, seed=11)
    m, chunk = 1536, 256
    w = long_context_qkv(g["seed"], m, g["Hq"], g["Hkv"], g["D"], dtype="float16", locality_len=64,
                         needle_len=16, num_needles=8, needle_queries=8)
    cache, means = new_cache(g, num_chunks=m // 16)
    seq = cache.add_sequence([])
    _, _, results = chunked_prefill(cache, means, seq, list(range(m)), w.q, w.k, w.v, chunk)
    found = counted = 0
    for res in (r[0] for r in results):
        f, n = needle_recall(res.block_tables, *w.needles.triples(16))
        found, counted = found + f, counted + n
    assert counted > 0 and found / counted >= 0.9
    last = results[-1][0]
    d = last.density()
    assert d["group_union"] < 0.8  # the selection is actually sparse
    assert d["select"] <= d["q_union"] <= d["group_union"]

    # recall at equal density: the exact-mass oracle is at least as good in every table
    q = w.q[0, m - chunk:]
    _, lse_ref = oracle_prefill(cache, seq, q)
    oracle = oracle_block_tables(cache, seq, q, last.block_tables)
    assert oracle.num_past.tolist() == last.block_tables.num_past.tolist()
    _, lse_oracle = sparse_prefill(cache, oracle, q)
    r_compact, r_oracle = mass_recall(last.lse, lse_ref), mass_recall(lse_oracle, lse_ref)
    assert r_compact.mean() > 0.97
    for h in range(g["Hkv"]):  # per table (one tile, one group): mean over its rows and heads
        heads = slice(4 * h, 4 * h + 4)
        assert r_oracle[:, heads].mean() >= r_compact[:, heads].mean() - 1e-6


def test_needle_rows_attend_to_their_needle_and_generation_is_deterministic():
    w = long_context_qkv(5, 512, 4, 2, 32, num_needles=4, needle_len=16, needle_queries=4, locality_len=64)
    again = long_context_qkv(5, 512, 4, 2, 32, num_needles=4, needle_len=16, needle_queries=4, locality_len=64)
    for x, y in ((w.q, again.q), (w.k, again.k), (w.v, again.v)):
        assert x.tobytes() == y.tobytes()
    assert w.q.shape == (1, 512, 4, 32) and w.k.shape == (1, 512, 2, 32) and w.q.dtype == np.float16
    q, k, v = (f32(x[0], "float16") for x in (w.q, w.k, w.v))
    nd = w.needles
    assert len(nd) == 4 and (nd.key_start % 16 == 0).all() and (nd.query_pos[:, 0] >= nd.key_start + 16).all()
    for i in range(len(nd)):
        for row in nd.query_pos[i]:
            z = k[: row + 1, nd.kv_head[i]] @ q[row, nd.q_head[i]] / np.sqrt(32)
            p = np.exp(z - z.max())
            p /= p.sum()
            assert p[nd.key_start[i]: nd.key_start[i] + 16].sum() > 0.5
    # sinks: rows far from the start put a large share of their attention on the first 4 tokens
    rows = np.arange(256, 512, 8)
    z = np.einsum("rhd,lhd->hrl", q[rows], k[:, [0, 0, 1, 1]]) / np.sqrt(32)
    z = np.where(np.arange(512)[None, None] <= rows[None, :, None], z, -np.inf)
    p = np.exp(z - z.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    assert (p[:, :, :4].sum(axis=2).mean(axis=1) > 0.1).all()  # uniform would be under 0.016
    qp, qh, kb = nd.triples(16)
    assert len(qp) == 4 * 4 and (kb == np.repeat(nd.key_start // 16, 4)).all()


# ---------------------------------------------------------------------------- block tables as text
def test_block_tables_to_string_to_dense_and_density():
    g = dict(c=4, Hkv=2, Hq=4, D=16, dtype="float16", layers=1, seed=7)
    w, cache, means, seq = prefill_one_chunk(g, 40, 9)
    res = compact_prefill(cache, means, seq, w.q[0, 40:], alpha=0.3, sink=1, window=1, q_tile=8, group_size=1)
    t = res.block_tables
    dense = t.to_dense()
    assert dense.shape == (2, 2, 2, 13) and dense.sum() == len(t.indices)
    own = np.array([2, 3])  # tile 0 reads own blocks 0-1, tile 1 (the tail) reads all 3
    assert t.density() == pytest.approx(len(t.indices) / (10 * 8 + 2 * 2 * own.sum()))
    text = t.to_string()
    lines = text.splitlines()
    assert lines[0].startswith("BlockTables: seq") and len(lines) == 3 + 8
    for r, line in enumerate(lines[3:]):
        tt, rest = divmod(r, 4)
        h, gg = divmod(rest, 2)
        past, own_cols = line.split()[3].split("|")
        assert past == "".join("#" if b else "." for b in dense[tt, h, gg, :10])
        assert own_cols.rstrip() == "o" * own[tt]
        assert line.split()[:3] == [f"t{tt}", f"h{h}", f"g{gg}"]
    assert str(t) == text


def test_block_tables_to_string_compresses_long_sequences():
    g = dict(c=4, Hkv=1, Hq=2, D=8, dtype="float16", layers=1, seed=8)
    w, cache, means, seq = prefill_one_chunk(g, 400, 6)  # 100 past blocks
    t = compact_prefill(cache, means, seq, w.q[0, 400:], alpha=0.5, sink=0, window=0).block_tables
    lines = t.to_string(max_width=20).splitlines()
    assert "one column = 6 blocks" in lines[2]
    past, own = lines[3].split()[2].split("|")
    assert len(past) == 17 and own == "o"  # 100 past blocks in columns of 6, then 2 own blocks in one
    row = t.to_dense()[0, 0, 0, :100]
    for col, ch in enumerate(past):
        frac = row[6 * col: 6 * col + 6].mean()
        assert ch == ("#" if frac == 1 else "." if frac == 0 else "+" if frac >= 0.5 else "-")
    assert set(past) - {"#", "."}  # this selection has partly-read columns


def test_split_chunks():
    assert split_chunks(10, 4, 2) == [4, 4, 2]
    assert split_chunks(7, [4, 3], 2) == [4, 3]
    for bad in ([3, 4], [4, 4], [4, 0, 3]):
        with pytest.raises(ValueError, match="chunks: expected"):
            split_chunks(7, bad, 2)
    with pytest.raises(ValueError, match="chunks: expected a positive multiple of chunk_size 2, got 3"):
        split_chunks(7, 3, 2)


# ---------------------------------------------------------------------------- the one API
@given(data=st.data(), g=geometries())
def test_compact_prefill_result_is_the_rounded_sparse_prefill_of_its_tables(data, g):
    """o is the float32 attention over the result's own tables rounded once to the storage
    dtype; lse, density() and tables() are the selection's and the tables'; return_lse, out,
    kernel and events change nothing else."""
    c = g["c"]
    P, n = c * data.draw(st.integers(0, 6)), awkward(data.draw, c, 3)
    opts = options(data.draw, g)
    w, cache, means, seq = prefill_one_chunk(g, P, n)
    q = w.q[0, P:]
    res = compact_prefill(cache, means, seq, q, **opts)
    assert isinstance(res, CompactPrefill)
    o32, lse32 = sparse_prefill(cache, res.block_tables, q, 0)
    assert res.o.dtype == q.dtype and res.o.shape == q.shape
    assert res.o.tobytes() == to_storage(o32, g["dtype"]).tobytes()
    assert res.lse.dtype == np.float32 and res.lse.tobytes() == lse32.tobytes()
    assert res.density() == dict(res.selection.density, tables=res.block_tables.density())
    indptr, indices = res.tables()
    assert indptr.dtype == indices.dtype == np.int32
    assert indptr.tolist() == res.block_tables.indptr.tolist() and indices.tolist() == res.block_tables.indices.tolist()
    indices[:] = -1  # host copies: the result is not changed through them
    assert (res.block_tables.indices >= 0).all()

    out = np.full(q.shape, 0x7E00, q.dtype)  # NaN poison: every element must be written
    events = []
    kernel = data.draw(st.sampled_from(["auto", "wgmma", "mma"]))
    again = compact_prefill(cache, means, seq, q, return_lse=False, out=out, kernel=kernel, events=events, **opts)
    assert again.o is out and out.tobytes() == res.o.tobytes() and again.lse is None
    assert [name for name, _ in events] == ["start", "means", "score", "tables", "attention"]
    times = [t for _, t in events]
    assert times == sorted(times)


def test_dense_prefill_is_compact_prefill_at_alpha_zero_within_one_rounding_of_the_oracle():
    g = dict(c=8, Hkv=2, Hq=8, D=16, dtype="bfloat16", layers=2, seed=4)
    w, cache, means, seq = prefill_one_chunk(g, 48, 21)
    q = w.q[1, 48:]
    dense = dense_prefill(cache, means, seq, q, 1)
    same = compact_prefill(cache, means, seq, q, 1, alpha=0.0, sink=0, window=0)
    assert dense.o.tobytes() == same.o.tobytes() and dense.lse.tobytes() == same.lse.tobytes()
    assert dense.density() == dict(select=1.0, q_union=1.0, group_union=1.0, tables=1.0)
    tiled = dense_prefill(cache, means, seq, q, 1, q_tile=8, group_size=1, sink=3)  # options pass through
    assert tiled.block_tables.num_tiles == 3 and tiled.block_tables.group_size == 1
    o_ref, lse_ref = oracle_prefill(cache, seq, q, 1)
    vmax = np.abs(f32(w.v[1], "bfloat16")).max()
    err = np.abs(f32(dense.o, "bfloat16") - o_ref).max()
    assert err <= (2e-5 + unit_roundoff("bfloat16")) * vmax
    assert err > 0  # the rounding shows: o is bf16, not float32
    np.testing.assert_allclose(dense.lse, lse_ref, rtol=2e-6, atol=2e-6)
    with pytest.raises(TypeError, match="alpha: expected no alpha"):
        dense_prefill(cache, means, seq, q, 1, alpha=0.5)


def test_the_gpu_module_runs_the_reference_for_a_numpy_cache():
    """cpattn.BlockMeans / compact_prefill / dense_prefill dispatch on the cache; a NumPy cache
    needs no CuPy and gets exactly the reference."""
    import sys

    import cpattn
    from cpattn import compact_attention as gpu
    from cpattn.reference import compact_attention as ref

    had_cupy = "cupy" in sys.modules
    g = dict(c=4, Hkv=1, Hq=2, D=8, dtype="float16", layers=1, seed=9)
    w, cache, _, seq = prefill_one_chunk(g, 16, 6)
    means = cpattn.BlockMeans(cache)
    assert type(means) is ref.BlockMeans and cpattn.BlockMeans is gpu.BlockMeans
    q = w.q[0, 16:]
    r = cpattn.compact_prefill(cache, means, seq, q, alpha=0.2, kernel="mma")
    want = ref.compact_prefill(cache, ref.BlockMeans(cache), seq, q, alpha=0.2)
    assert type(r) is ref.CompactPrefill and r.o.tobytes() == want.o.tobytes()
    assert r.density() == want.density()
    d = cpattn.dense_prefill(cache, means, seq, q)
    assert d.o.tobytes() == ref.dense_prefill(cache, means, seq, q).o.tobytes()
    with pytest.raises(ValueError, match=r"kernel: expected one of \('auto', 'wgmma', 'mma'\), got 'fast'"):
        cpattn.compact_prefill(cache, means, seq, q, kernel="fast")
    assert ("cupy" in sys.modules) == had_cupy


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def chunk_setup():
    """P = 12 cached tokens (3 blocks) + a chunk of 5: seq_len 17, c = 4, Hkv = 2, Hq = 4."""
    g = dict(c=4, Hkv=2, Hq=4, D=8, dtype="float16", layers=2, seed=1)
    w, cache, means, seq = prefill_one_chunk(g, 12, 5)
    return g, w, cache, means, seq


BAD_CHUNK = [
    # (description, q maker, kwargs, error, words the message must contain)
    ("chunk not block aligned", lambda q: q[2:], {}, ValueError, ["q:", "multiple of chunk_size 4", "P = 14"]),
    ("q heads not a multiple of kv heads", lambda q: q[:, :3], {}, ValueError, ["q:", "num_kv_heads 2", "got 3"]),
    ("more rows than the sequence has", lambda q: np.concatenate([q] * 4), {}, ValueError,
     ["q:", "at most 17 rows", "n = 20"]),
    ("no rows", lambda q: q[:0], {}, ValueError, ["q:", "n >= 1", "got 0"]),
    ("wrong dtype", lambda q: q.astype(np.float32), {}, TypeError, ["q:", "float16", "float32"]),
    ("wrong head_dim", lambda q: q[:, :, :4], {}, ValueError, ["q:", "head_dim 8", "got 4"]),
    ("alpha above 1", None, dict(alpha=1.5), ValueError, ["alpha:", "[0, 1]", "1.5"]),
    ("alpha below 0", None, dict(alpha=-0.1), ValueError, ["alpha:", "[0, 1]", "-0.1"]),
    ("alpha NaN", None, dict(alpha=float("nan")), ValueError, ["alpha:", "[0, 1]", "nan"]),
    ("q_tile not a multiple of c", None, dict(q_tile=6), ValueError, ["q_tile:", "multiple of chunk_size 4", "6"]),
    ("group_size not dividing G", None, dict(group_size=3), ValueError, ["group_size:", "group size 2", "3"]),
    ("negative sink", None, dict(sink=-1), ValueError, ["sink:", ">= 0", "-1"]),
    ("bad scale", None, dict(scale=0.0), ValueError, ["scale:", "> 0", "0.0"]),
    ("layer out of range", None, dict(layer=2), ValueError, ["layer:", "[0, 2)", "2"]),
    ("unknown sequence", None, dict(seq=99), CacheError, ["seq:", "live sequence", "99"]),
]


def check_bad_call(cache, means, unchanged, call, err, words):
    before = means_state(means)
    with unchanged(cache):
        with pytest.raises(err) as info:
            call()
    assert means_state(means) == before
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def bad_args(w, seq, make_q, kw):
    q = w.q[0, 12:] if make_q is None else make_q(w.q[0, 12:])
    kw = dict(kw)
    return q, kw.pop("seq", seq), kw.pop("layer", 0), kw


@pytest.mark.parametrize("what,make_q,kw,err,words", BAD_CHUNK, ids=[b[0] for b in BAD_CHUNK])
@pytest.mark.parametrize("fn", [compact_prefill, select_blocks], ids=["compact_prefill", "select_blocks"])
def test_bad_input_names_the_argument_and_changes_nothing(chunk_setup, unchanged, fn, what, make_q, kw, err,
                                                         words):
    g, w, cache, means, seq = chunk_setup
    q, seq, layer, kw = bad_args(w, seq, make_q, kw)
    check_bad_call(cache, means, unchanged, lambda: fn(cache, means, seq, q, layer, **kw), err, words)


BAD_CALL = [
    ("kernel not a choice", dict(kernel="fast"), ValueError, ["kernel:", "'auto', 'wgmma', 'mma'", "'fast'"]),
    ("return_lse not a bool", dict(return_lse=1), TypeError, ["return_lse:", "True or False", "1"]),
    ("events not a list", dict(events=()), TypeError, ["events:", "list", "tuple"]),
    ("out of the wrong shape", dict(out=np.zeros((5, 4, 4), np.float16)), ValueError, ["out:", "(5, 4, 8)", "(5, 4, 4)"]),
    ("out of the wrong dtype", dict(out=np.zeros((5, 4, 8), np.float32)), TypeError, ["out:", "float16", "float32"]),
    ("out not an array", dict(out=[0.0] * 5), TypeError, ["out:", "NumPy array", "list"]),
]


@pytest.mark.parametrize("what,kw,err,words", BAD_CALL, ids=[b[0] for b in BAD_CALL])
@pytest.mark.parametrize("fn", [compact_prefill, dense_prefill], ids=["compact_prefill", "dense_prefill"])
def test_bad_call_options_name_the_argument_and_change_nothing(chunk_setup, unchanged, fn, what, kw, err, words):
    g, w, cache, means, seq = chunk_setup
    check_bad_call(cache, means, unchanged, lambda: fn(cache, means, seq, w.q[0, 12:], **kw), err, words)


def test_read_only_out_is_refused(chunk_setup, unchanged):
    g, w, cache, means, seq = chunk_setup
    out = np.zeros((5, 4, 8), np.float16)
    out.flags.writeable = False
    check_bad_call(cache, means, unchanged, lambda: compact_prefill(cache, means, seq, w.q[0, 12:], out=out),
                   ValueError, ["out:", "writeable", "read-only"])


BAD_ORACLE = [b for b in BAD_CHUNK if b[1] is not None or set(b[2]) & {"scale", "layer", "seq"}]


@pytest.mark.parametrize("what,make_q,kw,err,words", BAD_ORACLE, ids=[b[0] for b in BAD_ORACLE])
@pytest.mark.parametrize("fn", [oracle_prefill, attention_mass], ids=["oracle_prefill", "attention_mass"])
def test_bad_input_to_the_oracles(chunk_setup, unchanged, fn, what, make_q, kw, err, words):
    g, w, cache, means, seq = chunk_setup
    q, seq, layer, kw = bad_args(w, seq, make_q, kw)
    check_bad_call(cache, means, unchanged, lambda: fn(cache, seq, q, layer, **kw), err, words)


def test_chunked_prefill_bad_input_changes_nothing(unchanged):
    g = dict(c=4, Hkv=2, Hq=4, D=8, dtype="float16", layers=2, seed=2)
    w = workload(g, 20)
    cache, means = new_cache(g, num_chunks=5)
    seq = cache.add_sequence([])
    chunked_prefill(cache, means, seq, list(range(8)), w.q[:, :8], w.k[:, :8], w.v[:, :8], 4)
    odd = cache.add_sequence([])
    cache.extend(odd, [1, 2, 3], w.k[:, :3], w.v[:, :3])
    toks = list(range(8, 20))
    args = (w.q[:, 8:], w.k[:, 8:], w.v[:, 8:])
    cases = [
        (dict(chunks=[3, 9]), ValueError, "chunks: expected"),
        (dict(chunks=[4, 4]), ValueError, "summing to 12"),
        (dict(chunks=4, alpha=2.0), ValueError, "alpha: expected a number in [0, 1], got 2.0"),
        (dict(chunks=4, q_tile=2), ValueError, "q_tile: expected None or a positive multiple of chunk_size 4"),
        (dict(chunks=4, k=w.k[:, 8:19]), ValueError, "k: expected shape (2, 12, 2, 8), got (2, 11, 2, 8)"),
        (dict(chunks=4, q=w.q[:, 8:, :3]), ValueError,
         "q: expected num_q_heads a positive multiple of num_kv_heads 2, got 3"),
        (dict(chunks=4, q=w.q[:, 9:]), ValueError, "q: expected an array [2, 12, num_q_heads, head_dim]"),
        (dict(chunks=4, seq=odd), ValueError,
         "seq: expected a sequence whose length is a multiple of chunk_size 4"),
        (dict(chunks=4, tokens=toks + toks), ValueError, "k: expected shape (2, 24, 2, 8)"),
        (dict(chunks=4, sink=-2), ValueError, "sink: expected an integer >= 0"),
        (dict(chunks=4, alpah=0.1), TypeError, "options: expected scale, alpha"),
        (dict(chunks=4, q=list(range(12))), TypeError,
         "q: expected an array [2, 12, num_q_heads, head_dim], got list"),
    ]
    before = means_state(means)
    for kw, err, msg in cases:
        kw = dict(kw)
        q, k, v = kw.pop("q", args[0]), kw.pop("k", args[1]), kw.pop("v", args[2])
        s, t, chunks = kw.pop("seq", seq), kw.pop("tokens", toks), kw.pop("chunks")
        with unchanged(cache):
            with pytest.raises(err) as info:
                chunked_prefill(cache, means, s, t, q, k, v, chunks, **kw)
        assert msg in str(info.value), (msg, str(info.value))
        assert means_state(means) == before
    # a pool without room for the prompt: refused before anything is written
    with unchanged(cache):
        with pytest.raises(ValueError, match="pool: expected"):
            chunked_prefill(cache, means, seq, toks, *args, 4)


def test_stale_tables_and_selections_are_refused(chunk_setup):
    g, w, cache, means, seq = chunk_setup
    q = w.q[0, 12:]
    res = compact_prefill(cache, means, seq, q)
    other = cache.add_sequence([])  # any structural change bumps the version
    cache.extend(other, [1], w.k[:, :1], w.v[:, :1])
    with pytest.raises(CacheError, match="tables: expected tables for cache version .*, got tables built for cache version"):
        sparse_prefill(cache, res.block_tables, q)
    with pytest.raises(ValueError, match="selection: expected one made for sequence"):
        build_block_tables(cache, seq, res.selection)
