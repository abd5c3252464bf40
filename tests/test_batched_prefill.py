"""Batched varlen CompactAttention prefill (docs/design.md, "Batched varlen prefill").

Workloads: B sequences whose pasts are prefixes of a few shared prompts (so pages are shared
through the tree), each with a chunk of awkward length (1 token, one off a block boundary,
several blocks) whose K/V is written. Oracles: ``compact_prefill`` of each sequence on its
rows (the result must be the same, row for row) and the float64 ``oracle_prefill`` (alpha 0).
The GPU layout (``cpattn.compact_attention.batched_layout``) is checked on the CPU by a NumPy
emulation of the varlen kernels' contract; the kernels themselves in the ``gpu`` tests.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpattn import gpu_available
from cpattn.reference import compact_attention as ca
from cpattn.reference.chunk_cache import CacheError, ChunkCache
from cpattn.reference.dtypes import to_float32, to_storage
from cpattn.reference.workloads import TokenKV
from cpattn.testing.budgets import budget

POISON = {"float16": 0x7E00, "bfloat16": 0x7FC0}


# ---------------------------------------------------------------------------- workloads
@st.composite
def batches(draw, kernels=False):
    """Structure of a batched step: geometry, per-sequence (prefix group, past blocks, chunk length)."""
    c = draw(st.sampled_from([16, 32, 64] if kernels else [2, 4, 8, 16]))
    Hkv = draw(st.sampled_from([1, 2]))
    B = draw(st.integers(1, 6))
    seqs = []
    for _ in range(B):
        kind = draw(st.sampled_from(["one", "off-", "off+", "blocks", "any"]))
        k = draw(st.integers(1, 3))
        n = {"one": 1, "off-": k * c - 1, "off+": k * c + 1, "blocks": k * c,
             "any": draw(st.integers(1, 3 * c))}[kind]
        seqs.append((draw(st.integers(0, 1)), draw(st.integers(0, 5)), max(1, n)))
    return dict(c=c, Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4])),
                D=draw(st.sampled_from([64, 128] if kernels else [8, 16])),
                dtype=draw(st.sampled_from(["float16", "bfloat16"])), layers=draw(st.sampled_from([1, 2])),
                seed=draw(st.integers(0, 2**32 - 1)), seqs=seqs)


def selection_options(draw, g):
    G = g["Hq"] // g["Hkv"]
    rule = draw(st.sampled_from(["dense", "alpha", "recall"]))
    opt = dict(sink=draw(st.integers(0, 2)), window=draw(st.integers(0, 2)),
               q_tile=draw(st.sampled_from([None, g["c"], 2 * g["c"]])),
               group_size=draw(st.sampled_from([None] + [s for s in (1, 2) if G % s == 0])))
    if rule == "dense":
        opt.update(alpha=0.0)
    elif rule == "alpha":
        opt.update(alpha=draw(st.sampled_from([0.02, 0.1, 0.5, 1.0])))
    else:
        opt.update(recall=draw(st.sampled_from([0.5, 0.9])), summary=draw(st.sampled_from(["auto", "mean"])))
        if opt["summary"] == "auto":  # the per-row floor needs the sampled summary
            opt.update(row_floor=draw(st.sampled_from([None, 0.9])))
    return opt


def build(g, make_cache=ChunkCache):
    """(cache, seqs, chunk_lens, q [layers, N, Hq, D] host storage): the batch of ``g``."""
    c, rng = g["c"], np.random.default_rng(g["seed"])
    kv = TokenKV(g["layers"], g["Hkv"], g["D"], g["dtype"], seed=g["seed"] % 2**31, vocab=997)
    longest = max(pb for _, pb, _ in g["seqs"]) * c
    prefixes = [rng.integers(0, 997, longest).tolist() for _ in range(2)]
    chunks = sum(pb + n // c + 2 for _, pb, n in g["seqs"])
    cache = make_cache(g["layers"], g["Hkv"], g["D"], chunks, chunk_size=c, dtype=g["dtype"],
                       max_sequences=len(g["seqs"]) + 1)
    ids, lens = [], []
    for grp, pb, n in g["seqs"]:
        past = prefixes[grp][: pb * c]
        k, v = kv(past)
        seq = cache.add_sequence(past, k, v) if past else cache.add_sequence([])
        assert cache.seq_len(seq) == pb * c
        toks = rng.integers(0, 997, n).tolist()
        k, v = kv(toks, start=pb * c)
        cache.extend(seq, toks, k, v)
        ids.append(seq)
        lens.append(n)
    N = sum(lens)
    q = to_storage(rng.standard_normal((g["layers"], N, g["Hq"], g["D"])).astype(np.float32) * 1.5, g["dtype"])
    return cache, ids, lens, q


def vmax(cache):
    return float(np.abs(to_float32(np.asarray(cache.v_pool), cache.dtype)).max())


def packed_rows(lens):
    ptr = np.concatenate([[0], np.cumsum(lens)])
    return [slice(int(a), int(b)) for a, b in zip(ptr[:-1], ptr[1:])]


# ---------------------------------------------------------------------------- reference
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=batches(), data=st.data())
def test_batched_equals_per_sequence_compact_prefill_and_dense_equals_oracle(g, data):
    opt = selection_options(data.draw, g)
    cache, seqs, lens, q = build(g)
    means = ca.BlockMeans(cache)
    bp = ca.BatchedPrefill(cache, means)
    plan = bp.plan(seqs, lens, g["Hq"], **opt)
    assert plan.num_tokens == sum(lens) and list(plan.seqs) == seqs
    assert np.array_equal(np.diff(plan.qo_indptr), lens)
    for layer in range(g["layers"]):
        o, lse = bp.run(q[layer], layer)
        assert o.dtype == q.dtype and o.shape == q[layer].shape and lse.dtype == np.float32
        indptr, indices = bp.tables()
        assert len(indptr) == plan.num_tables + 1 and indptr[-1] == len(indices)
        dens = bp.density()
        for b, (seq, rows) in enumerate(zip(seqs, packed_rows(lens))):
            one = ca.compact_prefill(cache, means, seq, q[layer, rows], layer, **opt)
            assert o[rows].tobytes() == one.o.tobytes() and lse[rows].tobytes() == one.lse.tobytes()
            assert dens[b] == one.density()
            t0, t1 = int(plan.table_indptr[b]), int(plan.table_indptr[b + 1])
            ip, ind = one.tables()
            assert np.array_equal(indptr[t0:t1 + 1] - indptr[t0], ip)
            assert np.array_equal(indices[indptr[t0]:indptr[t1]], ind)
            if opt.get("alpha") == 0.0:
                ref_o, ref_lse = ca.oracle_prefill(cache, seq, q[layer, rows], layer)
                err = np.abs(to_float32(o[rows], g["dtype"]) - ref_o).max()
                assert err <= budget("prefill", g["dtype"], vmax(cache)), err
                np.testing.assert_allclose(lse[rows], ref_lse, rtol=2e-5, atol=2e-5)
                assert dens[b]["tables"] == 1.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=batches())
def test_sparse_tables_keep_the_sequence_own_pages_and_recall_is_bounded(g):
    """Each table lists past pages of its own sequence, then exactly its own pages up to the
    tile end; recall of the dense attention mass is in (0, 1]."""
    cache, seqs, lens, q = build(g)
    means = ca.BlockMeans(cache)
    bp = ca.BatchedPrefill(cache, means)
    plan = bp.plan(seqs, lens, g["Hq"], alpha=0.3, sink=1, window=1, q_tile=g["c"])
    o, lse = bp.run(q[0])
    indptr, indices = bp.tables()
    c, S = g["c"], g["Hq"] // g["Hkv"] // plan.group_size
    for b, (seq, rows) in enumerate(zip(seqs, packed_rows(lens))):
        ids = cache.seq_chunks(seq)
        Pb, n = int(plan.past_lens[b]) // c, lens[b]
        for r in range(int(plan.table_indptr[b]), int(plan.table_indptr[b + 1])):
            t = (r - int(plan.table_indptr[b])) // (g["Hkv"] * S)
            lst = list(indices[indptr[r]:indptr[r + 1]])
            own = ids[Pb: Pb + -(-min(n, (t + 1) * c) // c)]
            assert lst[len(lst) - len(own):] == own
            past = lst[: len(lst) - len(own)]
            assert set(past) <= set(ids[:Pb]) and past == sorted(past, key=ids.index)
        _, dense_lse = ca.oracle_prefill(cache, seq, q[0, rows], 0)
        rec = ca.mass_recall(lse[rows], dense_lse)
        assert np.all(rec > 0) and np.all(rec <= 1 + 1e-4)


def test_one_token_chunks_and_a_prefix_shared_by_every_sequence():
    g = dict(c=4, Hkv=2, Hq=4, D=8, dtype="bfloat16", layers=1, seed=7,
             seqs=[(0, 3, 1), (0, 3, 1), (0, 2, 5), (1, 0, 1), (0, 3, 3)])
    cache, seqs, lens, q = build(g)
    assert cache.seq_chunks(seqs[0])[:3] == cache.seq_chunks(seqs[1])[:3] == cache.seq_chunks(seqs[4])[:3]
    means = ca.BlockMeans(cache)
    bp = ca.BatchedPrefill(cache, means)
    bp.plan(seqs, lens, 4, alpha=0.0)
    o, lse = bp.run(q[0])
    for seq, rows in zip(seqs, packed_rows(lens)):
        ref_o, ref_lse = ca.oracle_prefill(cache, seq, q[0, rows], 0)
        assert np.abs(to_float32(o[rows], "bfloat16") - ref_o).max() <= budget("prefill", "bfloat16", vmax(cache))
        np.testing.assert_allclose(lse[rows], ref_lse, rtol=2e-5, atol=2e-5)


def test_out_and_lse_out_are_written_in_place():
    g = dict(c=4, Hkv=1, Hq=2, D=8, dtype="float16", layers=1, seed=3, seqs=[(0, 2, 3), (1, 1, 4)])
    cache, seqs, lens, q = build(g)
    bp = ca.BatchedPrefill(cache, ca.BlockMeans(cache))
    bp.plan(seqs, lens, 2)
    o0, l0 = bp.run(q[0])
    out = np.full(q[0].shape, POISON["float16"], np.uint16).view(np.float16)
    lse_out = np.full(l0.shape, np.nan, np.float32)
    o, lse = bp.run(q[0], out=out, lse_out=lse_out)
    assert o is out and lse is lse_out and o.tobytes() == o0.tobytes() and lse.tobytes() == l0.tobytes()


# ---------------------------------------------------------------------------- bad input
def small():
    g = dict(c=4, Hkv=1, Hq=2, D=8, dtype="float16", layers=1, seed=1, seqs=[(0, 2, 3), (0, 1, 4)])
    cache, seqs, lens, q = build(g)
    return cache, seqs, lens, q, ca.BatchedPrefill(cache, ca.BlockMeans(cache))


@pytest.mark.parametrize("args,kw,exc,msg", [
    (("SEQS", [3], 2), {}, ValueError, "chunk_lens: expected one length per sequence"),
    (("DUP", [3, 3], 2), {}, ValueError, "seqs: expected distinct"),
    (([], [], 2), {}, ValueError, "seqs: expected at least one"),
    (("SEQS", [3, 0], 2), {}, ValueError, r"chunk_lens: expected a length in \[1"),
    (("SEQS", [2, 4], 2), {}, ValueError, "chunk_lens: expected sequence .* multiple of chunk_size"),
    (("SEQS", [3, 4.0], 2), {}, TypeError, "chunk_lens"),
    (("SEQS", [3, True], 2), {}, TypeError, "chunk_lens"),
    (("SEQS", [3, 4], 3.0), {}, TypeError, "num_q_heads"),
    (("SEQS", [3, 4], True), {}, TypeError, "num_q_heads"),
    (("SEQS", [3, 4], 2), {"alpha": 2.0}, ValueError, "alpha"),
    (("SEQS", [3, 4], 2), {"q_tile": 3}, ValueError, "q_tile"),
    (("SEQS", [3, 4], 2), {"group_size": 3}, ValueError, "group_size"),
    (("SEQS", [3, 4], 2), {"kernel": "fast"}, ValueError, "kernel"),
    (("SEQS", [3, 4], 2), {"scale": 1.0}, TypeError, "options: expected some of"),
    (("SEQS", [3, 4], 2), {"recall": 0.9, "alpha": 0.3}, ValueError, "one selection rule"),
])
def test_bad_plans_are_refused_and_change_nothing(args, kw, exc, msg):
    cache, seqs, lens, q, bp = small()
    bp.plan(seqs, lens, 2)
    before, kmean = bp.prefill_plan, bp.means.kmean.copy()
    seq_arg = {"SEQS": seqs, "DUP": [seqs[0], seqs[0]]}.get(args[0], args[0]) if isinstance(args[0], str) else args[0]
    with pytest.raises(exc, match=msg):
        bp.plan(seq_arg, *args[1:], **kw)
    assert bp.prefill_plan is before and np.array_equal(bp.means.kmean, kmean)


def test_bad_runs_are_refused():
    cache, seqs, lens, q, bp = small()
    with pytest.raises(CacheError, match="plan: expected a plan"):
        bp.run(q[0])
    bp.plan(seqs, lens, 2)
    with pytest.raises(ValueError, match=r"q: expected shape \(7, 2, 8\)"):
        bp.run(q[0, :5])
    with pytest.raises(TypeError, match="q: expected dtype float16"):
        bp.run(q[0].astype(np.float32))
    with pytest.raises(TypeError, match="layer"):
        bp.run(q[0], True)
    with pytest.raises(ValueError, match="out: expected shape"):
        bp.run(q[0], out=np.zeros((7, 2, 4), np.float16))
    with pytest.raises(TypeError, match="lse_out"):
        bp.run(q[0], lse_out=np.zeros((7, 2), np.float64))
    with pytest.raises(ValueError, match="run: expected a run"):
        bp.tables()
    # the sequence grew after the plan: its chunk is no longer its last tokens
    kv = TokenKV(1, 1, 8, "float16")
    k, v = kv([5])
    cache.extend(seqs[1], [5], k, v)
    with pytest.raises(CacheError, match="plan: expected"):
        bp.run(q[0])


# ---------------------------------------------------------------------------- emulated GPU cache
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=batches(), data=st.data())
def test_emulated_gpu_cache_gives_the_numpy_results(g, data):
    """The reference batched prefill on the GPU cache as the kernels see it (the emulated
    backend's device length view) equals the NumPy cache's, bitwise."""
    from cpattn.testing import get_backend

    opt = selection_options(data.draw, g)
    cache, seqs, lens, q = build(g)
    bp = ca.BatchedPrefill(cache, ca.BlockMeans(cache))
    bp.plan(seqs, lens, g["Hq"], **opt)
    o_ref, lse_ref = bp.run(q[0])
    with get_backend("emulated") as be:
        gcache, gseqs, _, _ = build(g, be.make_cache)
        assert gseqs == seqs
        view = be.api.view(gcache)
        gbp = ca.BatchedPrefill(view, be.api.BlockMeans(gcache))
        gbp.plan(seqs, lens, g["Hq"], **opt)
        o, lse = gbp.run(q[0])
    assert o.tobytes() == o_ref.tobytes() and lse.tobytes() == lse_ref.tobytes()


# ---------------------------------------------------------------------------- the GPU layout, emulated
def emulate_varlen_kernels(cache, plan, lay, q, scores, layer, alpha, sink, window):
    """The varlen kernels' contract in NumPy on the uploaded layout: block_union_varlen (thresholds
    on ``scores``, packed [Hq, Qb, max(Pb, 1)] per sequence), tables_csr, paged_prefill_varlen
    (float64). Returns (indptr, indices, o float64 [N, Hq, D], lse)."""
    from cpattn.kernels import PREFILL_ROWS, PREFILL_SEQ_FIELDS

    F = {f: lay.seq_info[i] for i, f in enumerate(PREFILL_SEQ_FIELDS)}
    c, Hkv, D = cache.chunk_size, cache.num_kv_heads, cache.head_dim
    Hq, s = plan.num_q_heads, plan.group_size
    G = Hq // Hkv
    S = G // s
    R = len(lay.table_seq)
    lists = []
    for table in range(R):
        b = lay.table_seq[table]
        Pb, Qb, tb = F["past_blocks"][b], F["query_blocks"][b], F["tile_blocks"][b]
        local = table - F["table0"][b]
        t, kvh, g = local // (Hkv * S), (local // S) % Hkv, local % S
        sr = scores[F["score0"][b]: F["score0"][b] + Hq * Qb * max(Pb, 1)].reshape(Hq, Qb, max(Pb, 1))
        blocks = lay.blocks[F["block0"][b]: F["block0"][b] + Pb + Qb]
        i0, nb = t * tb, min(tb, Qb - t * tb)
        keep = np.zeros(Pb, bool)
        for hh in range(kvh * G + g * s, kvh * G + (g + 1) * s):
            for i in range(i0, i0 + nb):
                row = sr[hh, i, :Pb]
                thr = np.float32(alpha) * max(np.float32(0), row.max(initial=0))
                keep |= row >= thr
        j = np.arange(Pb)
        keep |= (j < sink) | (j >= Pb - window)
        own = min((t + 1) * tb, Qb)
        lists.append(np.concatenate([blocks[:Pb][keep], blocks[Pb:Pb + own]]))
        assert len(lists[-1]) <= lay.cap
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])])
    indices = np.concatenate(lists)
    qf = to_float32(q, cache.dtype).astype(np.float64)
    kp = to_float32(np.asarray(cache.k_pool[layer]), cache.dtype).astype(np.float64)
    vp = to_float32(np.asarray(cache.v_pool[layer]), cache.dtype).astype(np.float64)
    N = plan.num_tokens
    o, lse = np.full((N, Hq, D), np.nan), np.full((N, Hq), np.nan)
    written = np.zeros((N, Hq), int)
    for table, row0 in lay.units:
        b = lay.table_seq[table]
        n, tb, Qb = F["chunk_len"][b], F["tile_blocks"][b], F["query_blocks"][b]
        local = table - F["table0"][b]
        t, kvh, g = local // (Hkv * S), (local // S) % Hkv, local % S
        tile_start = t * tb * c
        row_count = min(PREFILL_ROWS, min(tb * c, n - tile_start) * s - row0)
        assert row_count > 0
        pages = indices[indptr[table]: indptr[table + 1]]
        npast = len(pages) - min((t + 1) * tb, Qb)
        k = kp[pages, kvh].reshape(-1, D)
        v = vp[pages, kvh].reshape(-1, D)
        for r in range(row_count):
            gr = row0 + r
            tok, head = tile_start + gr // s, kvh * G + g * s + gr % s
            lim = npast * c + tok + 1  # the bottom-right causal limit
            z = k[:lim] @ qf[F["row0"][b] + tok, head] / np.sqrt(D)
            m = z.max()
            p = np.exp(z - m)
            o[F["row0"][b] + tok, head] = p @ v[:lim] / p.sum()
            lse[F["row0"][b] + tok, head] = m + np.log(p.sum())
            written[F["row0"][b] + tok, head] += 1
    assert (written == 1).all()  # every (row, head) by exactly one unit row
    return indptr, indices, o, lse


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=batches(), data=st.data())
def test_gpu_layout_emulated_gives_the_reference_tables_and_output(g, data):
    from cpattn.compact_attention import batched_layout

    alpha = data.draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    opt = dict(alpha=alpha, sink=data.draw(st.integers(0, 2)), window=data.draw(st.integers(0, 2)),
               q_tile=data.draw(st.sampled_from([None, g["c"], 2 * g["c"]])),
               group_size=data.draw(st.sampled_from([None, 1])))
    cache, seqs, lens, q = build(g)
    means = ca.BlockMeans(cache)
    bp = ca.BatchedPrefill(cache, means)
    plan = bp.plan(seqs, lens, g["Hq"], **opt)
    lay = batched_layout(plan, [cache.seq_chunks(s) for s in seqs], cache.num_kv_heads)
    assert lay.seq_info.dtype == np.int32 and lay.units.dtype == np.int32
    # the scores the kernel thresholds: the reference's, packed per sequence
    parts = []
    for b, (seq, rows) in enumerate(zip(seqs, packed_rows(lens))):
        sel = ca.select_blocks(cache, means, seq, q[0, rows], 0, **opt)
        sc = sel.scores if sel.scores.shape[2] else np.zeros(sel.scores.shape[:2] + (1,), np.float32)
        parts.append(sc.ravel())
    scores = np.concatenate(parts)
    assert len(scores) == lay.score_size
    indptr, indices, o, lse = emulate_varlen_kernels(cache, plan, lay, q[0], scores, 0, alpha, opt["sink"],
                                                     opt["window"])
    o_ref, lse_ref = bp.run(q[0])
    ref_indptr, ref_indices = bp.tables()
    assert np.array_equal(indptr, ref_indptr) and np.array_equal(indices, ref_indices)
    assert np.abs(o - to_float32(o_ref, g["dtype"])).max() <= budget("prefill", g["dtype"], vmax(cache))
    np.testing.assert_allclose(lse, lse_ref, rtol=2e-5, atol=2e-5)


def test_the_record_fields_match_the_kernel_enum():
    import re

    from cpattn.kernels import PREFILL_SEQ_FIELDS, read_source

    src = read_source("compact_attention.cuh")
    body = re.search(r"enum\s*\{([^}]*SQ_CHUNK_LEN[^}]*)\}", src).group(1)
    names = [re.sub(r"//.*", "", n).strip() for n in re.sub(r"//[^\n]*", "", body).split(",")]
    names = [n for n in names if n]
    assert names[-1] == "kSeqFields"
    assert [n[len("SQ_"):].lower() for n in names[:-1]] == list(PREFILL_SEQ_FIELDS)


# ---------------------------------------------------------------------------- GPU (marker gpu)
def _kernels():
    if not gpu_available():
        return ["mma"]
    import cupy

    return ["mma", "wgmma"] if cupy.cuda.Device().compute_capability == "90" else ["mma"]


KERNELS = _kernels()
needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")


def gpu_build(g):
    import cupy

    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.compact_attention import BlockMeans

    cache, seqs, lens, q = build(g, GpuChunkCache)
    return cache, BlockMeans(cache), seqs, lens, q


def poisoned(shape, dtype):
    import cupy

    return cupy.full(shape, POISON[dtype], dtype=np.float16 if dtype == "float16" else np.uint16)


@pytest.mark.gpu
@needs_gpu
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(g=batches(kernels=True), data=st.data())
def test_gpu_batched_equals_per_sequence_gpu_calls_bitwise(g, data):
    """One launch per stage over the batch gives, row for row, the single-sequence kernels'
    result (same arithmetic per unit), poisoned outputs fully written; alpha 0 within the
    kernel budget of the float64 oracle; tables equal the reference's at alpha 0."""
    import cupy

    from cpattn.compact_attention import BatchedPrefill, compact_prefill

    opt = selection_options(data.draw, g)
    opt["kernel"] = data.draw(st.sampled_from(KERNELS))
    cache, means, seqs, lens, q = gpu_build(g)
    bp = BatchedPrefill(cache, means)
    plan = bp.plan(seqs, lens, g["Hq"], **opt)
    layer = g["layers"] - 1
    qd = cupy.asarray(q[layer])
    out = poisoned(qd.shape, g["dtype"])
    lse_out = cupy.full(qd.shape[:2], np.nan, np.float32)
    o, lse = bp.run(qd, layer, out=out, lse_out=lse_out)
    o, lse = cupy.asnumpy(o), cupy.asnumpy(lse)
    assert np.isfinite(to_float32(o, g["dtype"])).all() and np.isfinite(lse).all()
    indptr, indices = bp.tables()
    dens = bp.density()
    ref_cache, ref_seqs, _, _ = build(g)
    ref = ca.BatchedPrefill(ref_cache, ca.BlockMeans(ref_cache))
    ref.plan(ref_seqs, lens, g["Hq"], **opt)
    ref_o, ref_lse = ref.run(q[layer], layer)
    for b, (seq, rows) in enumerate(zip(seqs, packed_rows(lens))):
        one = compact_prefill(cache, means, seq, cupy.asarray(q[layer, rows]), layer, **opt)
        assert o[rows].tobytes() == cupy.asnumpy(one.o).tobytes(), b
        assert lse[rows].tobytes() == cupy.asnumpy(one.lse).tobytes(), b
        ip, ind = one.tables()
        t0, t1 = int(plan.table_indptr[b]), int(plan.table_indptr[b + 1])
        assert np.array_equal(indptr[t0:t1 + 1] - indptr[t0], ip)
        assert np.array_equal(indices[indptr[t0]:indptr[t1]], ind)
        assert dens[b] == pytest.approx(one.density(), abs=1e-12)
    if opt.get("alpha") == 0.0:
        ref_ip, ref_ind = ref.tables()
        assert np.array_equal(indptr, ref_ip)
        for b, (seq, rows) in enumerate(zip(ref_seqs, packed_rows(lens))):
            oracle, oracle_lse = ca.oracle_prefill(ref_cache, seq, q[layer, rows], layer)
            err = np.abs(to_float32(o[rows], g["dtype"]) - oracle).max()
            assert err <= budget("prefill", g["dtype"], vmax(ref_cache), backend="cupy"), err
            np.testing.assert_allclose(lse[rows], oracle_lse, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpu_batched_run_replays_in_a_cuda_graph(kernel):
    import cupy

    from cpattn.compact_attention import BatchedPrefill

    g = dict(c=64, Hkv=2, Hq=8, D=128, dtype="bfloat16", layers=2, seed=5,
             seqs=[(0, 4, 1), (0, 4, 130), (1, 2, 63), (1, 0, 64), (0, 5, 200)])
    for opt in (dict(alpha=0.0), dict(alpha=0.1, q_tile=128)):
        cache, means, seqs, lens, q = gpu_build(g)
        bp = BatchedPrefill(cache, means)
        bp.plan(seqs, lens, g["Hq"], kernel=kernel, **opt)
        qd = cupy.asarray(q[1])
        eager_o, eager_lse = (cupy.asnumpy(x) for x in bp.run(qd, 1))
        out = poisoned(qd.shape, "bfloat16")
        lse_out = cupy.full(qd.shape[:2], np.nan, np.float32)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            bp.run(qd, 1, out=out, lse_out=lse_out)
            graph = stream.end_capture()
        out.fill(POISON["bfloat16"])
        graph.launch(stream)
        stream.synchronize()
        assert cupy.asnumpy(out).tobytes() == eager_o.tobytes()
        assert cupy.asnumpy(lse_out).tobytes() == eager_lse.tobytes()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_gpu_batched_dispatch_and_numpy_cache(kernel):
    """``BatchedPrefill`` on a NumPy cache is the reference one; on a GPU cache with NumPy q it refuses."""
    import cupy

    from cpattn.compact_attention import BatchedPrefill

    g = dict(c=16, Hkv=1, Hq=2, D=64, dtype="float16", layers=1, seed=2, seqs=[(0, 2, 5), (0, 1, 16)])
    cache, seqs, lens, q = build(g)
    assert type(BatchedPrefill(cache, ca.BlockMeans(cache))) is ca.BatchedPrefill
    gcache, gmeans, seqs, lens, q = gpu_build(g)
    bp = BatchedPrefill(gcache, gmeans)
    bp.plan(seqs, lens, 2, kernel=kernel)
    with pytest.raises(TypeError, match="q: expected a GPU array"):
        bp.run(q[0])
    o, lse = bp.run(cupy.asarray(q[0]))
    assert o.dtype == np.float16 and lse.dtype == np.float32 and o.shape == q[0].shape



# ---------------------------------------------------------------------------- GPU host code, emulated kernels
class EmulatedKernels:
    """The compact_attention kernels as NumPy functions called with the launch tuples the GPU host
    code builds (argument order as in raw_kernels/compact_attention.cu), so the host code of both
    GPU paths (``compact_prefill`` and ``BatchedPrefill``) runs on the CPU with the emulated cache.
    The varlen kernels call the single-sequence bodies with the record's offsets, as the CUDA does."""

    def __init__(self, dtype, D, C):
        self.dtype, self.D, self.C = dtype, D, C
        self.launches = []

    def table(self):
        names = ("block_mean", "block_score", "block_union", "tables_csr", "paged_prefill", "block_score_varlen",
                 "block_union_varlen", "paged_prefill_varlen", "sampled_block_mass")
        out = {}
        for name in names:
            def launch(grid, block, args, shared_mem=0, _name=name):
                import cupy

                for a in args:  # device arrays or NumPy scalars of the kernel's types, nothing else
                    assert isinstance(a, (cupy.ndarray, np.int32, np.int64, np.float32)), (_name, type(a))
                self.launches.append(_name)
                getattr(self, _name)(grid, args)
            out[name] = launch
        return out

    # ---- values as the kernels read them
    def f32(self, x):
        return to_float32(np.asarray(x).view(np.ndarray), self.dtype)

    def block_mean(self, grid, args):
        k_pool, pages, num_pages, L, N, Hkv, kmean, kmean_lp = args
        for p in range(int(num_pages)):
            for layer in range(int(L)):
                m = self.f32(k_pool[layer, int(pages[p])]).sum(axis=1, dtype=np.float32) / np.float32(self.C)
                kmean[layer, int(pages[p])] = m
                kmean_lp[layer, int(pages[p])] = to_storage(m, self.dtype)

    def score_rows(self, q, kmean_lp, page0, blocks, Pb, n, Hq, Hkv, scale_log2, s_raw, h, row0):
        C, D = self.C, self.D
        rows = np.arange(row0, min(row0 + 128, n))
        if Pb == 0 or not len(rows):
            return
        km = self.f32(kmean_lp.reshape(-1, D)[int(page0) + blocks[:Pb].astype(np.int64) * Hkv + h // (Hq // Hkv)])
        z = (self.f32(q.reshape(-1, Hq, D)[rows, h]) @ km.T).astype(np.float32) * np.float32(scale_log2)
        e = np.exp2(z - z.max(axis=1, keepdims=True))
        Qb = -(-n // C)
        for i in np.unique(rows // C):
            s_raw[(h * Qb + i) * Pb: (h * Qb + i + 1) * Pb] += e[rows // C == i].sum(axis=0)

    def block_score(self, grid, args):
        q, kmean_lp, page0, blocks, Pb, n, Hq, Hkv, scale_log2, s_raw = args
        for x in range(grid[0]):
            for h in range(grid[1]):
                self.score_rows(q, kmean_lp, page0, blocks, int(Pb), int(n), int(Hq), int(Hkv), scale_log2,
                                s_raw.reshape(-1), h, x * 128)

    def sampled_block_mass(self, grid, args):
        """Every (key block, head, sampled row) log2 log-sum-exp of the row's exact scores over
        the keys it sees (the grid's split of the work does not change the values)."""
        q_rows, rows, m, k_pool, page0, blocks, Pb, n, Hq, Hkv, split_steps, scale_log2, part = args
        C, D = self.C, self.D
        m, Pb, n, Hq, Hkv = int(m), int(Pb), int(n), int(Hq), int(Hkv)
        G, NB = Hq // Hkv, int(part.shape[0])
        x = np.arange(NB * C)
        for kvh in range(Hkv):
            pages = int(page0) + blocks[:NB].astype(np.int64) * Hkv + kvh
            k = self.f32(k_pool.reshape(-1, C, D)[pages]).reshape(-1, D)  # [NB C, D]
            for hh in range(G):
                h = kvh * G + hh
                z = (self.f32(q_rows.reshape(m, Hq, D)[:, h]) @ k.T).astype(np.float32) * np.float32(scale_log2)
                z[x[None, :] > Pb * C + rows.astype(np.int64)[:, None]] = -np.inf  # [m, NB C]
                z[:, Pb * C + n:] = -np.inf
                zb = z.reshape(m, NB, C)
                top = zb.max(axis=2, keepdims=True)
                with np.errstate(invalid="ignore", divide="ignore"):
                    lse = np.where(np.isfinite(top[..., 0]),
                                   top[..., 0] + np.log2(np.exp2(zb - np.where(np.isfinite(top), top, 0)).sum(axis=2)),
                                   -np.inf)
                part[:, h, :] = lse.T.astype(np.float32)

    def field(self, seqs, B, name, b):
        from cpattn.kernels import PREFILL_SEQ_FIELDS

        return int(seqs.reshape(-1)[PREFILL_SEQ_FIELDS.index(name) * int(B) + b])

    def block_score_varlen(self, grid, args):
        q, kmean_lp, page0, blocks, seqs, B, row_blocks, Hq, Hkv, scale_log2, s_raw = args
        Hq, D = int(Hq), self.D
        for x in range(grid[0]):
            b, row0 = int(row_blocks[2 * x]), int(row_blocks[2 * x + 1])
            f = lambda name: self.field(seqs, B, name, b)  # noqa: E731
            for h in range(grid[1]):
                self.score_rows(q.reshape(-1)[f("row0") * Hq * D:], kmean_lp, page0, blocks[f("block0"):],
                                f("past_blocks"), f("chunk_len"), Hq, int(Hkv), scale_log2,
                                s_raw.reshape(-1)[f("score0"):], h, row0)

    def union_table(self, s_raw, Pb, Qb, tb, Hkv, G, s, alpha, sink, window, blocks, own_total, lst, counts, ci,
                    stats, table):
        S = G // s
        t, kvh, g = table // (Hkv * S), (table // S) % Hkv, table % S
        i0, nb, h0 = t * tb, min(tb, Qb - t * tb), kvh * G + g * s
        sr = s_raw[: (h0 + s) * Qb * Pb].reshape(-1, Qb, Pb) if Pb else np.zeros((h0 + s, Qb, 0), np.float32)
        keep_g = np.zeros(Pb, bool)
        j = np.arange(Pb)
        forced = (j < sink) | (j >= Pb - window)
        n_sel = n_qu = 0
        for hh in range(h0, h0 + s):
            keep_h = np.zeros(Pb, bool)
            for i in range(i0, i0 + nb):
                thr = np.float32(alpha) * max(np.float32(0), sr[hh, i].max(initial=0))
                k = forced | (sr[hh, i] >= thr)
                n_sel += int(k.sum())
                keep_h |= k
            n_qu += int(keep_h.sum()) * nb
            keep_g |= keep_h
        own = min((t + 1) * tb, own_total)
        chosen = np.concatenate([blocks[:Pb][keep_g], blocks[Pb:Pb + own]])
        lst[: len(chosen)] = chosen
        counts[ci] = len(chosen)
        stats[:3] += np.array([n_sel, n_qu, int(keep_g.sum()) * s * nb], np.uint64)

    def block_union(self, grid, args):
        s_raw, Pb, Qb, tb, T, Hkv, G, s, alpha, sink, window, blocks, own_total, padded, cap, counts, stats = args
        for table in range(grid[0]):
            self.union_table(s_raw.reshape(-1), int(Pb), int(Qb), int(tb), int(Hkv), int(G), int(s), alpha, int(sink),
                             int(window), blocks, int(own_total), padded[table * int(cap):], counts, table, stats,
                             table)

    def block_union_varlen(self, grid, args):
        s_raw, seqs, B, table_seq, Hkv, G, s, alpha, sink, window, blocks, padded, cap, counts, stats = args
        for table in range(grid[0]):
            b = int(table_seq[table])
            f = lambda name: self.field(seqs, B, name, b)  # noqa: E731
            self.union_table(s_raw.reshape(-1)[f("score0"):], f("past_blocks"), f("query_blocks"), f("tile_blocks"),
                             int(Hkv), int(G), int(s), alpha, int(sink), int(window), blocks[f("block0"):],
                             f("query_blocks"), padded[table * int(cap):], counts, table, stats[3 * b:],
                             table - f("table0"))

    def tables_csr(self, grid, args):
        padded, cap, counts, R, indptr, indices = args
        off = 0
        for t in range(int(R)):
            indptr[t] = off
            indices[off: off + counts[t]] = padded[t * int(cap): t * int(cap) + counts[t]]
            off += int(counts[t])
        indptr[int(R)] = off

    def prefill_unit(self, table, local, row0, indptr, indices, n, q_tile, Hq, Hkv, G, s, own_total, q, kp, vp,
                     page0, scale_log2, out, lse, write_lse):
        C, D = self.C, self.D
        S = G // s
        t, kvh, g = local // (Hkv * S), (local // S) % Hkv, local % S
        tile_start = t * q_tile
        row_count = min(128, min(q_tile, n - tile_start) * s - row0)
        own = min((t + 1) * (q_tile // C), own_total)
        pages = indices[int(indptr[table]): int(indptr[table + 1])].astype(np.int64)
        npast = len(pages) - own
        k = self.f32(kp.reshape(-1, C, D)[int(page0) + pages * Hkv + kvh]).reshape(-1, D)
        v = self.f32(vp.reshape(-1, C, D)[int(page0) + pages * Hkv + kvh]).reshape(-1, D)
        q2, o2 = q.reshape(-1, D), out.reshape(-1, D)
        for r in range(row_count):
            gr = row0 + r
            idx = (tile_start + gr // s) * Hq + kvh * G + g * s + gr % s
            lim = npast * C + tile_start + gr // s + 1
            z = (k[:lim] @ self.f32(q2[idx])).astype(np.float32) * np.float32(scale_log2)
            p = np.exp2(z - z.max())
            o2[idx] = to_storage((p @ v[:lim]) / p.sum(dtype=np.float32), self.dtype)
            if write_lse:
                lse.reshape(-1)[idx] = (z.max() + np.log2(p.sum())) * np.float32(np.log(2))

    def paged_prefill(self, grid, args):
        (q, kp, vp, page0, units, indptr, indices, n, q_tile, Hq, Hkv, G, s, own_total, scale_log2, out, lse,
         write_lse) = args
        for x in range(grid[0]):
            table = int(units[2 * x])
            self.prefill_unit(table, table, int(units[2 * x + 1]), indptr, indices, int(n), int(q_tile), int(Hq),
                              int(Hkv), int(G), int(s), int(own_total), q, kp, vp, page0, scale_log2, out, lse,
                              int(write_lse))

    def paged_prefill_varlen(self, grid, args):
        q, kp, vp, page0, units, indptr, indices, seqs, B, table_seq, Hq, Hkv, G, s, scale_log2, out, lse, write_lse = args
        Hq, D = int(Hq), self.D
        for x in range(grid[0]):
            table = int(units[2 * x])
            b = int(table_seq[table])
            f = lambda name: self.field(seqs, B, name, b)  # noqa: E731
            r0 = f("row0")
            self.prefill_unit(table, table - f("table0"), int(units[2 * x + 1]), indptr, indices, f("chunk_len"),
                              f("tile_blocks") * self.C, Hq, int(Hkv), int(G), int(s), f("query_blocks"),
                              q.reshape(-1)[r0 * Hq * D:], kp, vp, page0, scale_log2, out.reshape(-1)[r0 * Hq * D:],
                              lse.reshape(-1)[r0 * Hq:], int(write_lse))


def single_density(one):
    """``CompactPrefill.density()`` of the GPU result read on the stand-in (whose scalars have no .get)."""
    tables = float(np.asarray(one.indptr)[-1]) / one.causal_blocks
    if one.num_past_blocks == 0:
        return dict(select=1.0, q_union=1.0, group_union=1.0, tables=tables)
    v = np.asarray(one.stats).astype(np.float64) / one.denominator
    return dict(select=float(v[0]), q_union=float(v[1]), group_union=float(v[2]), tables=tables)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=batches(), data=st.data())
def test_gpu_host_code_on_emulated_kernels_batched_equals_per_sequence(g, data):
    """The GPU ``BatchedPrefill`` and ``compact_prefill`` host code on the emulated cache, with the
    kernels emulated from their launch tuples: the batched launches give, bitwise, the per-sequence
    launches' o, lse, tables and density; at alpha 0, the float64 oracle within budget."""
    import cpattn.compact_attention as gca
    from cpattn.testing import get_backend

    alpha = data.draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    recall = data.draw(st.sampled_from([None, None, 0.5, 0.99]))  # the recall rule on the sampled summary
    rule = dict(alpha=alpha) if recall is None else dict(alpha=None, recall=recall, summary="sampled",
                                                          sample_rows=data.draw(st.integers(1, 3)),
                                                          row_floor=data.draw(st.sampled_from([None, 0.9])))
    opt = dict(rule, sink=data.draw(st.integers(0, 2)), window=data.draw(st.integers(0, 2)),
               q_tile=data.draw(st.sampled_from([None, g["c"], 2 * g["c"]])),
               group_size=data.draw(st.sampled_from([None, 1])), kernel="mma")
    emu = EmulatedKernels(g["dtype"], g["D"], g["c"])
    saved = gca.get_kernels, gca.as_cupy

    def as_device(x, name, dtype=None, shape=None, contiguous=True):  # as_cupy refuses the stand-in's arrays
        import cupy

        assert isinstance(x, cupy.ndarray), (name, type(x))
        if dtype is not None and x.dtype != np.dtype(np.float16 if dtype == "float16" else np.uint16):
            raise TypeError(f"{name}: dtype {x.dtype}")
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {x.shape}")
        return x

    gca.get_kernels, gca.as_cupy = (lambda file, dtype, D, c: emu.table()), as_device
    try:
        with get_backend("emulated") as be:
            cache, seqs, lens, q = build(g, be.make_cache)
            means = gca.BlockMeans(cache)
            bp = gca.BatchedPrefill(cache, means)
            plan = bp.plan(seqs, lens, g["Hq"], **opt)
            qd = be.asarray(q[0])
            out = be.xp.full(qd.shape, POISON[g["dtype"]], dtype=qd.dtype)
            o, lse = bp.run(qd, 0, out=out)
            assert o is out
            assert [x for x in emu.launches if x.endswith("varlen")][-2:] == ["block_union_varlen",
                                                                              "paged_prefill_varlen"]
            assert ("block_score_varlen" in emu.launches) == (recall is None and alpha > 0 and any(plan.past_lens > 0))
            assert ("sampled_block_mass" in emu.launches) == (recall is not None and any(plan.past_lens > 0))
            o, lse = np.asarray(o).view(np.ndarray), np.asarray(lse).view(np.ndarray)
            indptr, indices = bp.tables()
            dens = bp.density()
            per_seq = []
            for seq, rows in zip(seqs, packed_rows(lens)):
                one = gca.compact_prefill(cache, means, seq, be.asarray(q[0, rows]), 0, **opt)
                per_seq.append((np.asarray(one.o).view(np.ndarray), np.asarray(one.lse).view(np.ndarray),
                                one.tables(), single_density(one)))
    finally:
        gca.get_kernels, gca.as_cupy = saved
    for b, (rows, (o1, l1, (ip, ind), d1)) in enumerate(zip(packed_rows(lens), per_seq)):
        assert o[rows].tobytes() == o1.tobytes() and lse[rows].tobytes() == l1.tobytes(), b
        t0, t1 = int(plan.table_indptr[b]), int(plan.table_indptr[b + 1])
        assert np.array_equal(indptr[t0:t1 + 1] - indptr[t0], ip) and np.array_equal(indices[indptr[t0]:indptr[t1]], ind)
        assert dens[b] == pytest.approx(d1, abs=1e-12)
    if recall is None and alpha == 0.0:
        host, hseqs, _, _ = build(g)
        for b, (seq, rows) in enumerate(zip(hseqs, packed_rows(lens))):
            oracle, oracle_lse = ca.oracle_prefill(host, seq, q[0, rows], 0)
            err = np.abs(to_float32(o[rows], g["dtype"]) - oracle).max()
            assert err <= budget("prefill", g["dtype"], vmax(host)), err
            np.testing.assert_allclose(lse[rows], oracle_lse, rtol=1e-4, atol=1e-4)
            assert dens[b]["tables"] == 1.0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=batches(), data=st.data())
def test_gpu_host_code_on_emulated_kernels_row_floor_tables_are_the_reference(g, data):
    """The recall rule with its per-row floor through the GPU host code (``compact_prefill`` on the
    emulated cache, the sampled_block_mass kernel emulated, ``row_floor_choice`` on the stand-in
    for CuPy) keeps the reference ``compact_prefill``'s tables on the same chunk, and reads
    no fewer blocks than without the floor."""
    import cpattn.compact_attention as gca
    from cpattn.testing import get_backend

    opt = dict(recall=data.draw(st.sampled_from([0.5, 0.9])), summary="sampled",
               sample_rows=data.draw(st.integers(1, 3)), row_floor=data.draw(st.sampled_from([0.8, 0.95])),
               sink=data.draw(st.integers(0, 2)), window=data.draw(st.integers(0, 2)),
               q_tile=data.draw(st.sampled_from([None, g["c"]])), group_size=data.draw(st.sampled_from([None, 1])),
               kernel="mma")
    emu = EmulatedKernels(g["dtype"], g["D"], g["c"])
    saved = gca.get_kernels, gca.as_cupy

    def as_device(x, name, dtype=None, shape=None, contiguous=True):
        return x

    host, hseqs, lens, q = build(g)
    hmeans = ca.BlockMeans(host)
    gca.get_kernels, gca.as_cupy = (lambda file, dtype, D, c: emu.table()), as_device
    try:
        with get_backend("emulated") as be:
            cache, seqs, _, _ = build(g, be.make_cache)
            means = gca.BlockMeans(cache)
            got = []
            for seq, rows in zip(seqs, packed_rows(lens)):
                with_floor = gca.compact_prefill(cache, means, seq, be.asarray(q[0, rows]), 0, **opt)
                plain = gca.compact_prefill(cache, means, seq, be.asarray(q[0, rows]), 0,
                                            **dict(opt, row_floor=None))
                got.append((with_floor.tables(), plain.tables()))
    finally:
        gca.get_kernels, gca.as_cupy = saved
    for seq, rows, ((ip, ind), (ip0, ind0)) in zip(hseqs, packed_rows(lens), got):
        ref = ca.compact_prefill(host, hmeans, seq, q[0, rows], 0, **opt)
        rip, rind = ref.tables()
        sizes, ref_sizes, plain_sizes = np.diff(ip), np.diff(rip), np.diff(ip0)
        assert (sizes >= plain_sizes).all()  # the floor only adds blocks
        if np.array_equal(ip, rip) and np.array_equal(ind, rind):
            continue
        # float32 partials against the reference's float64: a row that ties the floor at the cut
        # may take one block more or less; never more than a few tables differ
        differ = [r for r in range(len(sizes)) if not np.array_equal(ind[ip[r]:ip[r + 1]], rind[rip[r]:rip[r + 1]])]
        assert len(differ) <= max(1, 0.05 * len(sizes)), differ
        assert np.abs(sizes - ref_sizes).max() <= 1, (sizes, ref_sizes)
