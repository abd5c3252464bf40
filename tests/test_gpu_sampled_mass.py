"""summary='sampled' on the GPU: the sampled_block_mass kernel and its combine (issue 14).

sampled_block_mass (raw_kernels/compact_attention.cu) writes per key block j, query head h and
sampled row i the block's log-sum-exp of the row's exact scores in log2 units, part
[Pb + Qb, Hq, m]; ``mass_from_partials`` turns that into estimate_mass's (past, own).

On the CPU (no GPU needed):
* the launch geometry (``sampled_mass_grid``) covers every (key block, head, sampled row) of
  part exactly once and never splits a key block over two grid blocks: an emulation walks the
  grid with the kernel's own index arithmetic (row gr -> (head, row), step -> key blocks, the
  flat write index) and fills a NaN-poisoned part with float64 partials from the NumPy cache;
* those partials through ``mass_from_partials`` on NumPy are the reference ``estimated_mass``,
  through ``sampled_row_mass`` the reference's per-row masses, and the per-row floor chosen from
  them (``row_floor_choice``) is the reference ``row_floor_rule``'s (ties at the floor aside).
On the GPU (marker gpu): the kernel's part against the float64 partials (NaN-poisoned before
the call), its past/own against the reference ``estimated_mass``, and the recall rule's tables
through compact_prefill and BatchedPrefill against the choice the array path
(``estimate_mass`` over ``sequence_keys``) makes, equal up to float32 ties at the cut.
Hypothesis draws the structure (seed, past and chunk lengths, GQA ratio, sampled rows, variant);
``long_context_qkv`` fills the arrays from the seed.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpattn import gpu_available
from cpattn import compact_attention as gca
from cpattn.kernels import SAMPLED_KEYS, SAMPLED_ROWS
from cpattn.reference import compact_attention as ca
from cpattn.reference.checks import cdiv
from cpattn.reference.chunk_cache import ChunkCache
from cpattn.reference.dtypes import to_float32
from cpattn.reference.workloads import long_context_qkv

LOG2E = 1.4426950408889634
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")]
# kernel variants the GPU tests compile (each compile takes seconds): every chunk size, head
# dim and dtype at least once, with each chunk size under both head dims or dtypes
VARIANTS = [("float16", 64, 16), ("bfloat16", 128, 16), ("float16", 128, 32), ("bfloat16", 64, 32),
            ("bfloat16", 64, 64), ("float16", 128, 64), ("bfloat16", 128, 128), ("float16", 64, 128)]


def make_cache(seed, P, n, c, Hq, Hkv, D, dtype, backend=ChunkCache, extra_chunks=0):
    """One sequence of P + n tokens of a structured prompt: (cache, seq, q [n, Hq, D] storage)."""
    w = long_context_qkv(seed, P + n, Hq, Hkv, D, dtype=dtype, num_sinks=2, locality_len=2 * c, needle_len=c,
                         num_needles=2, needle_queries=2)
    cache = backend(1, Hkv, D, (P + n) // c + 3 + extra_chunks, chunk_size=c, dtype=dtype)
    seq = cache.add_sequence([])
    if P:
        cache.extend(seq, list(range(P)), w.k[:, :P], w.v[:, :P])
    cache.extend(seq, list(range(P, P + n)), w.k[:, P:], w.v[:, P:])
    return cache, seq, w.q[0, P:]


def float64_partials(cache, seq, q, Pb, scale, sample_rows):
    """What the kernel computes, in float64: part [Pb + Qb, Hq, m]."""
    c, Hkv = cache.chunk_size, cache.num_kv_heads
    n, Hq, D = q.shape
    G, P = Hq // Hkv, Pb * c
    sel = ca.sampled_rows(n, c, sample_rows)
    NB = Pb + cdiv(n, c)
    k = to_float32(cache.read_kv(seq, 0)[0], cache.dtype).astype(np.float64)  # [P + n, Hkv, D]
    qf = to_float32(q, cache.dtype).astype(np.float64)[sel]  # [m, Hq, D]
    x = np.arange(NB * c)
    z = np.full((Hq, len(sel), NB * c), -np.inf)
    for h in range(Hq):
        z[h, :, :P + n] = qf[:, h] @ k[:, h // G].T * (scale * LOG2E)
    z[:, x[None, :] > (P + sel)[:, None]] = -np.inf  # row sel sees keys 0 .. P + sel
    zb = z.reshape(Hq, len(sel), NB, c)
    top = zb.max(axis=3, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        lse = np.where(np.isfinite(top[..., 0]),
                       top[..., 0] + np.log2(np.exp2(zb - np.where(np.isfinite(top), top, 0)).sum(axis=3)), -np.inf)
    return lse.transpose(2, 0, 1)  # [NB, Hq, m]


def emulate_kernel(ref_part, Hq, Hkv, m, Pb, n, c, grid, split_steps):
    """Walk the grid as sampled_block_mass does and write ref_part's entries where it writes
    them: returns (part NaN-poisoned then filled, write counts per entry)."""
    NB = Pb + cdiv(n, c)
    G, M = Hq // Hkv, Hq // Hkv * m
    steps_all = cdiv(NB * c, SAMPLED_KEYS)
    part = np.full(NB * Hq * m, np.nan)
    count = np.zeros(NB * Hq * m, np.int64)
    cb = min(c, SAMPLED_KEYS)
    bps, spb = SAMPLED_KEYS // cb, c // cb
    for bz in range(grid[2]):  # kv head
        for by in range(grid[1]):  # key split
            s0, s1 = by * split_steps, min(steps_all, (by + 1) * split_steps)
            if s0 >= s1:
                continue
            for bx in range(grid[0]):  # row tile
                gr = bx * SAMPLED_ROWS + np.arange(SAMPLED_ROWS)
                gr = gr[gr < M]
                h, i = bz * G + gr // m, gr % m  # the rows' head and sampled row (the q read)
                for s in range(s0, s1):
                    if spb == 1:
                        js = [s * bps + b for b in range(bps)]
                    else:  # written after its last step, its first step in this split too
                        js = [s // spb] if s % spb == spb - 1 else []
                        assert s - s % spb >= s0
                    for j in js:
                        if j >= NB:
                            continue
                        flat = j * Hq * m + bz * M + gr  # the kernel's write index
                        part[flat] = ref_part[j, h, i]
                        count[flat] += 1
    return part.reshape(NB, Hq, m), count.reshape(NB, Hq, m)


@st.composite
def workload(draw, variants=None):
    if variants is None:
        dtype = draw(st.sampled_from(["float16", "bfloat16"]))
        D = draw(st.sampled_from([8, 16]))
        c = draw(st.sampled_from([16, 32, 64, 128]))
    else:
        dtype, D, c = draw(st.sampled_from(variants))
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 4, 8]))
    pb = draw(st.integers(1, 12))
    n = max(1, draw(st.integers(1, 3)) * c - draw(st.sampled_from([0, 1, 5, c // 2])))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), P=pb * c, n=n, c=c, Hq=Hkv * G, Hkv=Hkv, D=D, dtype=dtype,
                rows=draw(st.integers(1, 4)))


# ============================================================================ CPU: geometry, layout, combine
@settings(max_examples=300, deadline=None)
@given(G=st.sampled_from([1, 2, 4, 8]), Hkv=st.sampled_from([1, 2, 8]), m=st.integers(1, 300),
       pb=st.integers(0, 3000), n=st.integers(1, 9000), c=st.sampled_from([16, 32, 64, 128]),
       sms=st.sampled_from([1, 8, 132]))
def test_grid_covers_every_step_once_in_whole_key_blocks(G, Hkv, m, pb, n, c, sms):
    grid, split = gca.sampled_mass_grid(G * Hkv, Hkv, m, pb, n, c, sms)
    steps = cdiv((pb + cdiv(n, c)) * c, SAMPLED_KEYS)
    spb = max(1, c // SAMPLED_KEYS)
    assert grid[0] == cdiv(G * m, SAMPLED_ROWS) and grid[2] == Hkv
    assert split % spb == 0 and split >= 8 // spb * spb
    assert (grid[1] - 1) * split < steps <= grid[1] * split  # every split has a step, every step a split
    assert grid[1] < 65536 and grid[2] < 65536


def test_grid_at_128k_fills_the_h200():
    # 128K past, 4096-row chunk, c 64, 2 rows a query block: 128 sampled rows, G 4 -> 512 rows per kv head
    m = len(ca.sampled_rows(4096, 64, 2))
    grid, split = gca.sampled_mass_grid(32, 8, m, 131072 // 64, 4096, 64, 132)
    assert m == 128 and grid[0] == 4 and grid[2] == 8
    blocks = grid[0] * grid[1] * grid[2]
    assert gca.SAMPLED_BLOCKS_PER_SM * 132 <= blocks <= 1.1 * gca.SAMPLED_BLOCKS_PER_SM * 132, grid
    assert split * SAMPLED_KEYS >= 8 * 64  # each block's K reads amortise its Q fragments' load


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(g=workload(), sms=st.sampled_from([1, 3, 132]))
def test_emulated_kernel_and_combine_are_the_reference_estimate(g, sms):
    cache, seq, q = make_cache(g["seed"], g["P"], g["n"], g["c"], g["Hq"], g["Hkv"], g["D"], g["dtype"])
    c, n, Pb, rows = g["c"], g["n"], g["P"] // g["c"], g["rows"]
    scale = 1 / np.sqrt(g["D"])
    ref_part = float64_partials(cache, seq, q, Pb, scale, rows)
    m = ref_part.shape[2]
    grid, split = gca.sampled_mass_grid(g["Hq"], g["Hkv"], m, Pb, n, c, sms)
    part, count = emulate_kernel(ref_part, g["Hq"], g["Hkv"], m, Pb, n, c, grid, split)
    assert (count == 1).all(), "every entry written exactly once"
    np.testing.assert_array_equal(part, ref_part)
    # own blocks a row cannot see are -inf; past blocks are seen by every row
    assert np.isfinite(part[:Pb]).all()
    past, own = gca.mass_from_partials(np, part.astype(np.float32), Pb, n, c, rows)
    assert past.dtype == own.dtype == np.float32 and past.shape == (g["Hq"], cdiv(n, c), Pb)
    means = ca.BlockMeans(cache)
    means.update(cache, seq, num_tokens=g["P"])
    qf = to_float32(q, cache.dtype)
    k_all = to_float32(cache.read_kv(seq, 0)[0], cache.dtype)
    ref_p, ref_o = ca.estimated_mass(qf, k_all, means.gather(cache, seq, 0, Pb), c, scale, "sampled", rows)
    np.testing.assert_allclose(past, ref_p, rtol=2e-4, atol=1e-6 * c)
    np.testing.assert_allclose(own, ref_o, rtol=2e-4, atol=1e-6 * c)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(g=workload(), tile=st.sampled_from([None, 1, 2]), sub=st.sampled_from([None, 1]),
       recall=st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_table_sums_straight_from_the_partials_are_the_two_step_sums(g, tile, sub, recall):
    """sampled_table_sums (what compact_prefill and BatchedPrefill use under the recall rule) is
    table_sums of mass_from_partials, and the recall rule chooses the same from either."""
    cache, seq, q = make_cache(g["seed"], g["P"], g["n"], g["c"], g["Hq"], g["Hkv"], g["D"], g["dtype"])
    c, n, Pb, rows, Hkv, Hq = g["c"], g["n"], g["P"] // g["c"], g["rows"], g["Hkv"], g["Hq"]
    if not Pb:
        return
    part = float64_partials(cache, seq, q, Pb, 1 / np.sqrt(g["D"]), rows).astype(np.float32)
    Qb = cdiv(n, c)
    tb, s = tile or Qb, sub or Hq // Hkv
    past, own = gca.mass_from_partials(np, part, Pb, n, c, rows)
    E2, O2 = gca.table_sums(np, past, own, Hkv, s, tb)
    E1, O1 = gca.sampled_table_sums(np, part, Pb, n, c, rows, Hkv, s, tb)
    assert E1.shape == E2.shape == (cdiv(Qb, tb), Hkv, Hq // Hkv // s, Pb) and O1.shape == O2.shape == E1.shape[:3]
    assert E1.dtype == O1.dtype == np.float64
    np.testing.assert_allclose(E1, E2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(O1, O2, rtol=1e-5, atol=1e-6)
    j = np.arange(Pb)
    forced = (j < 1) | (j >= Pb - 1)
    rows_in = np.minimum(c, n - np.arange(Qb) * c)
    got = gca.recall_choice_sums(np, E1, O1, rows_in, forced, recall, s, tb)
    want = gca.recall_choice(np, past, own, rows_in, forced, recall, Hkv, s, tb)
    _assert_same_choice_up_to_ties(got | forced, want, past.astype(np.float64), own.astype(np.float64), forced,
                                   rows_in, recall, Hkv, s, tb)


def assert_same_floor_up_to_ties(got, want, ref_p, ref_o, row_block, forced, floor, Hkv, s, tb):
    """got and want: floor choices [T, Hkv, S, Pb]. Where they differ, both hold every sampled
    row of the table at the floor on the float64 row masses, within float32 rounding, and differ
    by at most one block per row of the table."""
    Hq, m, Pb = ref_p.shape
    G = Hq // Hkv
    bad = np.argwhere((got != want).any(axis=3))
    assert len(bad) <= max(1, 0.05 * got[..., 0].size), len(bad)
    for t, kvh, g in bad:
        h0 = kvh * G + g * s
        rows = np.flatnonzero(row_block // tb == t)
        for choice in (got[t, kvh, g], want[t, kvh, g]):
            kept = choice | forced
            rec = ref_o[h0:h0 + s, rows] + (ref_p[h0:h0 + s, rows] * kept).sum(axis=2)
            assert (rec >= floor - 1e-4).all(), (t, kvh, g, rec.min())
        assert abs(int(got[t, kvh, g].sum()) - int(want[t, kvh, g].sum())) <= s * len(rows), (t, kvh, g)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(g=workload(), tile=st.sampled_from([None, 1, 2]), sub=st.sampled_from([None, 1]),
       floor=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]))
def test_row_floor_from_the_partials_is_the_reference_floor(g, tile, sub, floor):
    """sampled_row_mass of the partials is the reference's per-row mass, and the floor chosen from
    it on the array module (what compact_prefill and BatchedPrefill run) is the reference's."""
    cache, seq, q = make_cache(g["seed"], g["P"], g["n"], g["c"], g["Hq"], g["Hkv"], g["D"], g["dtype"])
    c, n, Pb, rows, Hkv, Hq = g["c"], g["n"], g["P"] // g["c"], g["rows"], g["Hkv"], g["Hq"]
    scale = 1 / np.sqrt(g["D"])
    part = float64_partials(cache, seq, q, Pb, scale, rows).astype(np.float32)
    row_p, row_o = gca.sampled_row_mass(np, part, Pb)
    means = ca.BlockMeans(cache)
    means.update(cache, seq, num_tokens=g["P"])
    k_all = to_float32(cache.read_kv(seq, 0)[0], cache.dtype)
    sel, ref_p, ref_o = ca.sampled_row_mass(to_float32(q, cache.dtype), k_all, means.gather(cache, seq, 0, Pb), c,
                                            scale, rows)
    assert row_p.shape == ref_p.shape == (Hq, len(sel), Pb) and row_o.shape == ref_o.shape == (Hq, len(sel))
    np.testing.assert_allclose(row_p, ref_p, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(row_o, ref_o, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(row_p.sum(axis=2) + row_o, 1.0, rtol=1e-9)
    Qb = cdiv(n, c)
    tb, s = tile or Qb, sub or Hq // Hkv
    j = np.arange(Pb)
    forced = (j < 1) | (j >= Pb - 1)
    got = gca.row_floor_choice(np, row_p, row_o, sel // c, forced, floor, Hkv, s, tb)
    want = ca.row_floor_rule(ref_p, ref_o, sel // c, forced, floor, Hkv, s, tb)
    assert got.shape == want.shape == (cdiv(Qb, tb), Hkv, Hq // Hkv // s, Pb)
    assert_same_floor_up_to_ties(got, want, ref_p, ref_o, sel // c, forced, floor, Hkv, s, tb)


def test_sample_weights_are_the_reference_weights():
    sel = ca.sampled_rows(10, 4, 2)  # [0, 3, 4, 7, 8, 9]: blocks of 4, 4, 2 rows
    W = gca.sample_weights(10, 4, sel)
    np.testing.assert_array_equal(W, [[2, 2, 0, 0, 0, 0], [0, 0, 2, 2, 0, 0], [0, 0, 0, 0, 1, 1]])
    assert W.dtype == np.float32


# ============================================================================ GPU (marker gpu)
def _poisoned_partials(cupy, cache, layer, blocks, q, Pb, scale, rows):
    n, Hq, _ = q.shape
    m = len(ca.sampled_rows(n, cache.chunk_size, rows))
    part = cupy.full((Pb + cdiv(n, cache.chunk_size), Hq, m), np.nan, np.float32)
    out = gca.sampled_block_mass(cache, layer, blocks, q, Pb, scale, rows, part=part)
    assert out is part
    return cupy.asnumpy(part)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(g=workload(VARIANTS))
def test_gpu_partials_and_mass_match_the_float64_reference(g):
    import cupy

    from cpattn.chunk_cache import GpuChunkCache

    c, n, P, rows = g["c"], g["n"], g["P"], g["rows"]
    Pb = P // c
    scale = 1 / np.sqrt(g["D"])
    cpu, seq, q = make_cache(g["seed"], P, n, c, g["Hq"], g["Hkv"], g["D"], g["dtype"])
    gpu, gseq, _ = make_cache(g["seed"], P, n, c, g["Hq"], g["Hkv"], g["D"], g["dtype"], backend=GpuChunkCache)
    blocks = cupy.asarray(np.array(gpu.seq_chunks(gseq)[: Pb + cdiv(n, c)], np.int32))
    part = _poisoned_partials(cupy, gpu, 0, blocks, cupy.asarray(q), Pb, scale, rows)
    ref = float64_partials(cpu, seq, q, Pb, scale, rows)
    assert not np.isnan(part).any(), "entries left unwritten"
    assert np.array_equal(np.isneginf(part), np.isneginf(ref)), "blocks a row sees"
    fin = np.isfinite(ref)
    # exact products on the tensor cores, fp32 sums, ex2/lg2.approx: log2 units, |ref| up to ~100
    np.testing.assert_allclose(part[fin], ref[fin], rtol=2e-6, atol=2e-4)
    past, own = gca.mass_from_partials(cupy, cupy.asarray(part), Pb, n, c, rows)
    means = ca.BlockMeans(cpu)
    means.update(cpu, seq, num_tokens=P)
    k_all = to_float32(cpu.read_kv(seq, 0)[0], cpu.dtype)
    ref_p, ref_o = ca.estimated_mass(to_float32(q, cpu.dtype), k_all, means.gather(cpu, seq, 0, Pb), c, scale,
                                     "sampled", rows)
    np.testing.assert_allclose(cupy.asnumpy(past), ref_p, rtol=1e-3, atol=1e-5 * c)
    np.testing.assert_allclose(cupy.asnumpy(own), ref_o, rtol=1e-3, atol=1e-5 * c)


def _array_path_choice(cupy, gpu, seq, q, Pb, n, opt, scale):
    """The recall rule's choice [T, Hkv, S, Pb] from the array path (estimate_mass over
    sequence_keys), and its float64 estimates (past, own) on the host."""
    c, Hkv = gpu.chunk_size, gpu.num_kv_heads
    Hq = q.shape[1]
    G = Hq // Hkv
    Qb = cdiv(n, c)
    ids = cupy.asarray(np.array(gpu.seq_chunks(seq)[: Pb + Qb], np.int64))
    kk = gca.sequence_keys(cupy, gpu.k_pool[0], ids, Pb * c + n, gpu.dtype)
    kmean = cupy.zeros((Pb, Hkv, gpu.head_dim), np.float32)  # unused by summary='sampled'
    est_p, est_o = gca.estimate_mass(cupy, to_float32(cupy.asarray(q), gpu.dtype), kk, kmean, c, scale, "sampled",
                                     opt["sample_rows"])
    tb = (opt["q_tile"] or Qb * c) // c
    s = opt["group_size"] or G
    j = np.arange(Pb)
    forced = (j < opt["sink"]) | (j >= Pb - opt["window"])
    rows_in = np.minimum(c, n - np.arange(Qb) * c)
    chosen = gca.recall_choice(cupy, est_p, est_o, rows_in, forced, opt["recall"], Hkv, s, tb)
    return cupy.asnumpy(chosen), cupy.asnumpy(est_p).astype(np.float64), cupy.asnumpy(est_o).astype(np.float64), \
        forced, rows_in, tb, s


def _table_masks(indptr, indices, ids, T, Hkv, S, Pb):
    pos = {int(cid): i for i, cid in enumerate(ids)}
    mask = np.zeros((T * Hkv * S, Pb), bool)
    for t in range(T * Hkv * S):
        for cid in indices[indptr[t]: indptr[t + 1]]:
            if pos[int(cid)] < Pb:
                mask[t, pos[int(cid)]] = True
    return mask.reshape(T, Hkv, S, Pb)


def _assert_same_choice_up_to_ties(got, want, est_p, est_o, forced, rows_in, recall, Hkv, s, tb):
    """got and want are kept-past masks [T, Hkv, S, Pb] (forced blocks included in got). Tables
    may differ only where float32 estimates tie at the cut: both choices then reach the target
    on the array path's estimate within rounding, and differ by at most one block in size."""
    want = want | forced
    Hq, Qb, Pb = est_p.shape
    S = Hq // Hkv // s
    T = cdiv(Qb, tb)
    bad = np.argwhere((got != want).any(axis=3))
    assert len(bad) <= max(1, 0.02 * T * Hkv * S), len(bad)
    for t, kvh, g in bad:
        h0 = kvh * (Hq // Hkv) + g * s
        heads = slice(h0, h0 + s)
        qbs = slice(t * tb, min(Qb, (t + 1) * tb))
        E = est_p[heads, qbs].sum(axis=(0, 1))  # [Pb]
        base = est_o[heads, qbs].sum()
        rows = rows_in[qbs].sum() * s
        need = recall * rows - 1e-4 * rows
        assert base + E[got[t, kvh, g]].sum() >= need and base + E[want[t, kvh, g]].sum() >= need, (t, kvh, g)
        assert abs(int(got[t, kvh, g].sum()) - int(want[t, kvh, g].sum())) <= 1, (t, kvh, g)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(g=workload(VARIANTS[2:6]), recall=st.sampled_from([0.9, 0.99]), tile=st.sampled_from([None, 1]),
       sub=st.sampled_from([None, 1]))
def test_gpu_recall_tables_equal_the_array_path(g, recall, tile, sub):
    """compact_prefill(recall=..., summary='sampled') and BatchedPrefill with the same chunk keep
    the tables the array path chose (ties at the cut aside), and agree with each other exactly."""
    import cupy

    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.compact_attention import BatchedPrefill, BlockMeans, compact_prefill

    c, n, P = g["c"], g["n"], g["P"]
    Pb, Qb, Hkv, Hq = P // c, cdiv(n, c), g["Hkv"], g["Hq"]
    scale = 1 / np.sqrt(g["D"])
    gpu, seq, q = make_cache(g["seed"], P, n, c, Hq, Hkv, g["D"], g["dtype"], backend=GpuChunkCache,
                             extra_chunks=Pb + 3)
    opt = dict(recall=recall, summary="sampled", sample_rows=g["rows"], q_tile=None if tile is None else tile * c,
               group_size=sub, sink=1, window=2)
    means = BlockMeans(gpu)
    r = compact_prefill(gpu, means, seq, cupy.asarray(q), **opt)
    chosen, est_p, est_o, forced, rows_in, tb, s = _array_path_choice(cupy, gpu, seq, q, Pb, n, opt, scale)
    T, S = cdiv(Qb, tb), Hq // Hkv // s
    ids = gpu.seq_chunks(seq)
    indptr, indices = r.tables()
    got = _table_masks(indptr, indices, ids, T, Hkv, S, Pb)
    _assert_same_choice_up_to_ties(got, chosen, est_p, est_o, forced, rows_in, recall, Hkv, s, tb)
    # the batched prefill: this sequence next to another (a different chunk), same tables as alone
    other = gpu.add_sequence([])
    w2 = long_context_qkv(g["seed"] + 1, P + c + 3, Hq, Hkv, g["D"], dtype=g["dtype"], locality_len=2 * c,
                          needle_len=c)
    gpu.extend(other, list(range(P + c + 3)), w2.k, w2.v)
    bp = BatchedPrefill(gpu, means)
    bp.plan([other, seq], [c + 3, n], Hq, **opt)
    bp.run(cupy.concatenate([cupy.asarray(w2.q[0, P:]), cupy.asarray(q)]))
    b_indptr, b_indices = bp.tables()
    t0 = int(bp.prefill_plan.table_indptr[1])
    mine = b_indptr[t0:] - b_indptr[t0]
    assert np.array_equal(mine, indptr)
    assert np.array_equal(b_indices[b_indptr[t0]:], indices)
