"""CUDA CompactAttention prefill vs the NumPy reference (marker: gpu).

A GPU cache and a NumPy cache receive the same prompt; tables, densities and outputs are
compared. Scores on the GPU use the mean keys rounded to the storage dtype, so a block whose
reference score lies within a small band around its threshold may differ; every other block
must agree, and the kernel output is checked against the reference run on the GPU's own tables.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpattn import gpu_available
from cpattn.testing.budgets import budget as kernel_budget
from cpattn.reference import compact_attention as ca
from cpattn.reference.chunk_attention import attention_state  # noqa: F401
from cpattn.reference.dtypes import to_float32
from cpattn.reference.chunk_cache import ChunkCache
from cpattn.reference.workloads import long_context_qkv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")]
POISON = {"float16": 0x7E00, "bfloat16": 0x7FC0}


def _kernels():
    """Attention kernels this device runs: mma.sync everywhere, warpgroup MMA on Hopper."""
    if not gpu_available():
        return ["mma"]
    import cupy

    return ["mma", "wgmma"] if cupy.cuda.Device().compute_capability == "90" else ["mma"]


KERNELS = _kernels()


def setup(seed, P, n, c, Hq, Hkv, D, dtype, layers=1):
    import cupy

    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.compact_attention import BlockMeans

    w = long_context_qkv(seed, P + n, Hq, Hkv, D, num_layers=layers, dtype=dtype, num_sinks=2,
                         locality_len=2 * c, needle_len=c, num_needles=2, needle_queries=2)
    chunks = (P + n) // c + 2
    caches = []
    for make in (lambda: ChunkCache(layers, Hkv, D, chunks, chunk_size=c, dtype=dtype),
                 lambda: GpuChunkCache(layers, Hkv, D, chunks, chunk_size=c, dtype=dtype)):
        cache = make()
        seq = cache.add_sequence([])
        if P:
            cache.extend(seq, list(range(P)), w.k[:, :P], w.v[:, :P])
        cache.extend(seq, list(range(P, P + n)), w.k[:, P:], w.v[:, P:])
        caches.append((cache, seq))
    (cpu, seq), (gpu, gseq) = caches
    assert seq == gseq
    assert np.array_equal(cupy.asnumpy(gpu.k_pool), cpu.k_pool)
    return w, cpu, ca.BlockMeans(cpu), gpu, BlockMeans(gpu), seq


def run_gpu(gpu, gmeans, seq, q, **opt):
    import cupy

    from cpattn.compact_attention import compact_prefill

    out = cupy.full(q.shape, POISON[gpu.dtype], dtype=np.float16 if gpu.dtype == "float16" else np.uint16)
    r = compact_prefill(gpu, gmeans, seq, cupy.asarray(q), out=out, **opt)
    return r, to_float32(cupy.asnumpy(r.o), gpu.dtype), cupy.asnumpy(r.lse)


def gpu_mask(r, cpu, seq, sel):
    """The GPU's past-block selection as a reference-shaped mask [T, Hkv, S, Pb]."""
    indptr, indices = r.tables()
    Pb = sel.past_len // cpu.chunk_size
    pos = {cid: i for i, cid in enumerate(cpu.seq_chunks(seq))}
    T, Hkv, S, _ = sel.group_union.shape
    mask = np.zeros((T * Hkv * S, Pb), bool)
    for t in range(T * Hkv * S):
        for cid in indices[indptr[t]: indptr[t + 1]]:
            if pos[int(cid)] < Pb:
                mask[t, pos[int(cid)]] = True
    return mask.reshape(T, Hkv, S, Pb)


def budget(dtype, v_absmax):
    """The kernels' budget from the one table (cpattn.testing.budgets)."""
    return kernel_budget("prefill", dtype, v_absmax, backend="cupy")


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), c=st.sampled_from([16, 32, 64, 128]), pb=st.integers(0, 9),
       n_blocks=st.integers(1, 4), off=st.sampled_from([0, -1, -5]), ratio=st.sampled_from([1, 4, 8]),
       dtype=st.sampled_from(["float16", "bfloat16"]), D=st.sampled_from([64, 128]),
       tile=st.sampled_from([None, 1, 2]), sub=st.sampled_from([None, 1]), kernel=st.sampled_from(KERNELS))
def test_alpha_zero_equals_dense_and_tables_are_all_blocks(seed, c, pb, n_blocks, off, ratio, dtype, D, tile, sub,
                                                           kernel):
    Hkv = 2
    Hq = Hkv * ratio
    n = max(1, n_blocks * c + off)
    P = pb * c
    w, cpu, means, gpu, gmeans, seq = setup(seed, P, n, c, Hq, Hkv, D, dtype)
    q = w.q[0, P:]
    opt = dict(alpha=0.0, q_tile=None if tile is None else tile * c, group_size=sub)
    r, o, lse = run_gpu(gpu, gmeans, seq, q, kernel=kernel, **opt)
    ref = ca.compact_prefill(cpu, means, seq, q, 0, **opt)
    oracle, oracle_lse = ca.oracle_prefill(cpu, seq, q, 0)
    indptr, indices = r.tables()
    ref_indptr, ref_indices = ref.tables()
    assert np.array_equal(indptr, ref_indptr) and np.array_equal(indices, ref_indices)
    assert r.density() == ref.density() == dict(select=1.0, q_union=1.0, group_union=1.0, tables=1.0)
    vmax = float(np.abs(to_float32(w.v[0], dtype)).max())
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    assert np.abs(o - oracle).max() <= budget(dtype, vmax)
    np.testing.assert_allclose(lse, oracle_lse, rtol=2e-3, atol=2e-3)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), c=st.sampled_from([16, 32, 64]), pb=st.integers(4, 24),
       n_blocks=st.integers(1, 5), ratio=st.sampled_from([1, 2, 4, 8]), dtype=st.sampled_from(["float16", "bfloat16"]),
       alpha=st.sampled_from([0.02, 0.06, 0.3]), tile=st.sampled_from([None, 1]), sub=st.sampled_from([None, 1]),
       D=st.sampled_from([64, 128]), kernel=st.sampled_from(KERNELS))
def test_selection_and_output_match_reference(seed, c, pb, n_blocks, ratio, dtype, alpha, tile, sub, D, kernel):
    Hkv = 2
    Hq = Hkv * ratio
    n, P = n_blocks * c - (seed % 3), pb * c
    w, cpu, means, gpu, gmeans, seq = setup(seed, P, n, c, Hq, Hkv, D, dtype)
    q = w.q[0, P:]
    opt = dict(alpha=alpha, q_tile=None if tile is None else tile * c, group_size=sub)
    r, o, lse = run_gpu(gpu, gmeans, seq, q, kernel=kernel, **opt)
    sel = ca.select_blocks(cpu, means, seq, q, 0, **opt)
    got = gpu_mask(r, cpu, seq, sel)
    # blocks may differ only where some (head, query block) of the table sits near its threshold
    thr = np.float32(alpha) * sel.scores.max(axis=2, keepdims=True)
    band = 0.06 if dtype == "bfloat16" else 0.02
    near = np.abs(sel.scores - thr) <= band * thr + 1e-7  # [Hq, Qb, Pb]
    G, s = Hq // Hkv, sel.group_size
    T, S = sel.group_union.shape[0], sel.group_union.shape[2]
    tb = sel.q_tile // c
    diff = np.argwhere(got != sel.group_union)
    for t, h, g, j in diff:
        heads = slice(h * G + g * s, h * G + (g + 1) * s)
        assert near[heads, t * tb:(t + 1) * tb, j].any(), (t, h, g, j)
    assert len(diff) <= max(2, 0.02 * got.size)
    # the kernel on the GPU's own tables == the reference on those tables
    tables = ca.tables_from_mask(cpu, seq, got, chunk_len=n, num_q_heads=Hq, q_tile=sel.q_tile)
    ro, rlse = ca.sparse_prefill(cpu, tables, q, 0)
    vmax = float(np.abs(to_float32(w.v[0], dtype)).max())
    assert np.abs(o - ro).max() <= budget(dtype, vmax)
    np.testing.assert_allclose(lse, rlse, rtol=2e-3, atol=2e-3)
    d_gpu, d_ref = r.density(), sel.density
    for k in ("select", "q_union", "group_union"):
        assert abs(d_gpu[k] - d_ref[k]) <= 0.03, (k, d_gpu, d_ref)
    assert d_gpu["tables"] == pytest.approx(tables.density(), rel=1e-12)  # counted on the GPU's own tables


def test_prefix_reused_from_another_sequence_equals_from_scratch():
    import cupy

    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.compact_attention import BlockMeans, compact_prefill

    c, Hq, Hkv, D, dtype = 64, 8, 2, 128, "bfloat16"
    P, n = 8 * c, 3 * c - 7
    w = long_context_qkv(3, P + n, Hq, Hkv, D, dtype=dtype, locality_len=2 * c, needle_len=c)
    toks = list(range(P + n))
    # from scratch
    a = GpuChunkCache(1, Hkv, D, 64, chunk_size=c, dtype=dtype)
    sa = a.add_sequence([])
    a.extend(sa, toks, w.k[:, :], w.v[:, :])
    ra = compact_prefill(a, BlockMeans(a), sa, cupy.asarray(w.q[0, P:]))
    # another sequence caches the prefix; ours reuses it and writes only its chunk
    b = GpuChunkCache(1, Hkv, D, 64, chunk_size=c, dtype=dtype)
    mb = BlockMeans(b)
    other = b.add_sequence(toks[:P] + [999], np.concatenate([w.k[:, :P], w.k[:, :1]], 1),
                           np.concatenate([w.v[:, :P], w.v[:, :1]], 1))
    mb.update(b, other)
    sb = b.add_sequence(toks[:P])
    assert b.seq_len(sb) == P and b.seq_chunks(sb) == b.seq_chunks(other)[:P // c]
    b.extend(sb, toks[P:], w.k[:, P:], w.v[:, P:])
    rb = compact_prefill(b, mb, sb, cupy.asarray(w.q[0, P:]))
    assert np.array_equal(cupy.asnumpy(ra.o), cupy.asnumpy(rb.o))
    assert np.array_equal(cupy.asnumpy(ra.lse), cupy.asnumpy(rb.lse))
    assert ra.density() == rb.density()


@pytest.mark.skipif("wgmma" not in KERNELS, reason="needs a Hopper GPU (compute capability 9.0)")
@pytest.mark.parametrize("dtype,D,c,n,P,ratio", [("bfloat16", 128, 64, 1000, 40 * 64, 4),
                                                  ("float16", 128, 128, 257, 9 * 128, 8),
                                                  ("bfloat16", 64, 16, 77, 30 * 16, 1),
                                                  ("float16", 64, 32, 300, 0, 4)])
def test_wgmma_kernel_equals_mma_kernel_and_oracle(dtype, D, c, n, P, ratio):
    """The two tensor-core paths on the same tables: both within budget of the float64 oracle,
    and of each other (only the accumulation order differs)."""
    Hkv = 2
    w, cpu, means, gpu, gmeans, seq = setup(11, P, n, c, Hkv * ratio, Hkv, D, dtype)
    q = w.q[0, P:]
    _, o_mma, lse_mma = run_gpu(gpu, gmeans, seq, q, alpha=0.0, kernel="mma")
    _, o_wg, lse_wg = run_gpu(gpu, gmeans, seq, q, alpha=0.0, kernel="wgmma")
    oracle, oracle_lse = ca.oracle_prefill(cpu, seq, q, 0)
    vmax = float(np.abs(to_float32(w.v[0], dtype)).max())
    for o, lse in ((o_mma, lse_mma), (o_wg, lse_wg)):
        assert np.isfinite(o).all() and np.abs(o - oracle).max() <= budget(dtype, vmax)
        np.testing.assert_allclose(lse, oracle_lse, rtol=2e-3, atol=2e-3)
    assert np.abs(o_wg - o_mma).max() <= 2 * budget(dtype, vmax)


def test_kernel_choice_is_checked():
    import cupy

    from cpattn.compact_attention import compact_prefill

    w, cpu, means, gpu, gmeans, seq = setup(1, 64, 64, 64, 2, 1, 64, "float16")
    with pytest.raises(ValueError, match="kernel: expected one of"):
        compact_prefill(gpu, gmeans, seq, cupy.asarray(w.q[0, 64:]), kernel="fast")
    if "wgmma" not in KERNELS:
        with pytest.raises(ValueError, match="compute capability 9.0"):
            compact_prefill(gpu, gmeans, seq, cupy.asarray(w.q[0, 64:]), kernel="wgmma")


def test_same_api_as_the_reference():
    """One test body's view of both backends: the result's names, dtypes and shapes agree, and
    the options the reference takes (return_lse, out, events, dense_prefill) work the same."""
    import cupy

    import cpattn
    from cpattn import compact_attention as gpu_ca

    P, n, c = 4 * 64, 100, 64
    w, cpu, means, gpu, gmeans, seq = setup(5, P, n, c, 8, 2, 128, "bfloat16")
    assert type(gmeans) is gpu_ca.BlockMeans and type(cpattn.BlockMeans(cpu)) is ca.BlockMeans
    q = w.q[0, P:]
    results = {}
    for name, cache, m, qq in (("numpy", cpu, means, q), ("cupy", gpu, gmeans, cupy.asarray(q))):
        events = []
        r = cpattn.compact_prefill(cache, m, seq, qq, alpha=0.1, events=events)
        assert r.o.dtype == np.uint16 and r.o.shape == q.shape and r.lse.dtype == np.float32
        assert [e[0] for e in events] == ["start", "means", "score", "tables", "attention"]
        assert set(r.density()) == {"select", "q_union", "group_union", "tables"}
        assert cpattn.compact_prefill(cache, m, seq, qq, return_lse=False).lse is None
        d = cpattn.dense_prefill(cache, m, seq, qq)
        results[name] = (r, d)
    (r_ref, d_ref), (r_gpu, d_gpu) = results["numpy"], results["cupy"]
    for k, v in r_ref.density().items():  # the selection may differ only near its threshold
        assert abs(r_gpu.density()[k] - v) <= 0.03, (k, r_gpu.density(), r_ref.density())
    assert np.array_equal(d_gpu.tables()[0], d_ref.tables()[0]) and np.array_equal(d_gpu.tables()[1], d_ref.tables()[1])
    vmax = float(np.abs(to_float32(w.v[0], "bfloat16")).max())
    o_gpu, o_ref = to_float32(cupy.asnumpy(d_gpu.o), "bfloat16"), to_float32(d_ref.o, "bfloat16")
    assert np.abs(o_gpu - o_ref).max() <= 2 * budget("bfloat16", vmax)
    out = cupy.full(q.shape, POISON["bfloat16"], dtype=np.uint16)
    again = cpattn.dense_prefill(gpu, gmeans, seq, cupy.asarray(q), out=out)
    assert again.o is out and np.array_equal(cupy.asnumpy(out), cupy.asnumpy(d_gpu.o))
