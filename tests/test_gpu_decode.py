"""CUDA ChunkAttention decode vs the NumPy reference and the float64 oracle (marker: gpu).

Every GPU cache is mirrored by a NumPy cache fed the same operations, so the tree, the plan
and the pool bytes must be identical; outputs are poisoned before each run.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpattn import gpu_available
from cpattn.testing.budgets import budget as kernel_budget
from cpattn.reference import ChunkAttentionDecode as RefDecode
from cpattn.reference import ChunkCache, oracle_decode
from cpattn.reference.dtypes import to_float32
from cpattn.reference.workloads import TokenKV, fill_cache, prefix_tree_prompts, random_queries

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")]

POISON = {"float16": 0x7E00, "bfloat16": 0x7FC0}  # NaN bit patterns


def make_pair(prompts, kv, L, Hkv, D, c, dtype, share=True, order=None):
    from cpattn.chunk_cache import GpuChunkCache

    need = sum(-(-(len(p) + 1) // c) for p in prompts) + 4
    gpu = GpuChunkCache(L, Hkv, D, need, chunk_size=c, dtype=dtype, share_prefix=share)
    cpu = ChunkCache(L, Hkv, D, need, chunk_size=c, dtype=dtype, share_prefix=share)
    ids_g = fill_cache(gpu, prompts, kv, order)
    ids_c = fill_cache(cpu, prompts, kv, order)
    assert ids_g == ids_c
    return gpu, cpu, ids_g


def budget(dtype, v_absmax):
    """The kernels' budget from the one table (cpattn.testing.budgets)."""
    return kernel_budget("decode", dtype, v_absmax, backend="cupy")


def run_gpu(gpu, ids, q, layer, piece=None, private=None, scale=None):
    import cupy

    from cpattn.chunk_attention import ChunkAttentionDecode

    dec = ChunkAttentionDecode(gpu, piece_chunks=piece or "auto", private_piece_chunks=private or "auto")
    dec.plan(ids, q.shape[1])
    out = cupy.full(q.shape, POISON[gpu.dtype], dtype=cupy.float16 if gpu.dtype == "float16" else cupy.uint16)
    lse = cupy.full(q.shape[:2], np.nan, cupy.float32)
    o, lse_o = dec.run(cupy.asarray(q), layer, scale=scale, out=out, lse_out=lse)
    assert o is out and lse_o is lse
    return to_float32(cupy.asnumpy(out), gpu.dtype), cupy.asnumpy(lse), dec


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([1, 3, 7, 20, 77]),
       c=st.sampled_from([16, 32, 64, 128]), ratio=st.sampled_from([1, 4, 8]),
       dtype=st.sampled_from(["float16", "bfloat16"]), D=st.sampled_from([64, 128]),
       share=st.booleans(), piece=st.sampled_from([None, 1, 3]), private=st.sampled_from([None, 1, 2]))
def test_decode_matches_reference(seed, n, c, ratio, dtype, D, share, piece, private):
    Hkv = 2
    Hq = Hkv * ratio
    prompts = prefix_tree_prompts(seed, n, c, levels=2, fanout=3, max_chunks=3, vocab=8)
    kv = TokenKV(2, Hkv, D, dtype=dtype, seed=seed, vocab=8, max_len=max(map(len, prompts)) + 4)
    gpu, cpu, ids = make_pair(prompts, kv, 2, Hkv, D, c, dtype, share)
    import cupy

    for layer in range(2):  # identical pools, then identical results
        assert np.array_equal(cupy.asnumpy(gpu.k_pool[layer]), cpu.k_pool[layer])
    q = random_queries(seed + 1, n, Hq, D, dtype)
    layer = 1
    o, lse, dec = run_gpu(gpu, ids, q, layer, piece, private)
    ref_dec = RefDecode(cpu, piece, private)
    ref_dec.plan(ids, Hq)
    if piece is not None and private is not None:  # the same pieces on both backends
        for name, a in ref_dec.decode_plan.arrays().items():
            assert np.array_equal(a, getattr(dec.decode_plan, name)), name
    ref, ref_lse = ref_dec.run(q, layer, return_lse=True)
    ref = to_float32(ref, dtype)
    oracle, _ = oracle_decode(cpu, ids, q, layer)
    assert np.isfinite(o).all() and np.isfinite(lse).all(), "unwritten or NaN output"
    vmax = float(np.abs(to_float32(cpu.v_pool[layer], dtype)).max())
    err_oracle = np.abs(o - oracle).max()
    assert err_oracle <= budget(dtype, vmax), (err_oracle, budget(dtype, vmax))
    assert np.abs(o - ref).max() <= 2 * budget(dtype, vmax)  # both rounded once to storage
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 3, 77, 200])
def test_batch_sizes_and_gqa(dtype, batch):
    c, D, Hkv, Hq = 64, 128, 2, 16
    prompts = prefix_tree_prompts(batch, batch, c, levels=3, fanout=4, max_chunks=4, vocab=6)
    kv = TokenKV(1, Hkv, D, dtype=dtype, seed=batch, vocab=6, max_len=max(map(len, prompts)) + 4)
    gpu, cpu, ids = make_pair(prompts, kv, 1, Hkv, D, c, dtype)
    q = random_queries(batch, batch, Hq, D, dtype)
    o, _, dec = run_gpu(gpu, ids, q, 0)
    oracle, _ = oracle_decode(cpu, ids, q, 0)
    vmax = float(np.abs(to_float32(cpu.v_pool[0], dtype)).max())
    assert np.isfinite(o).all()
    assert np.abs(o - oracle).max() <= budget(dtype, vmax)


def test_decode_steps_reuse_plan_until_tree_changes():
    """A plan stays valid while tails fill; lengths come from the device table."""
    import cupy

    from cpattn.chunk_attention import ChunkAttentionDecode
    from cpattn.reference.chunk_cache import CacheError

    c, D, Hkv, Hq, dtype = 16, 64, 2, 4, "float16"
    prompts = prefix_tree_prompts(5, 9, c, levels=2, vocab=8)
    kv = TokenKV(1, Hkv, D, dtype=dtype, seed=5, vocab=8, max_len=max(map(len, prompts)) + 64)
    gpu, cpu, ids = make_pair(prompts, kv, 1, Hkv, D, c, dtype)
    extra = 40
    dec = ChunkAttentionDecode(gpu)
    dec.plan(ids, Hq)
    replans = 0
    for step in range(extra):
        q = random_queries(step, len(ids), Hq, D, dtype)
        try:
            o = dec.run(cupy.asarray(q), 0)
        except CacheError:
            dec.plan(ids, Hq)
            replans += 1
            o = dec.run(cupy.asarray(q), 0)
        oracle, _ = oracle_decode(cpu, ids, q, 0)
        vmax = float(np.abs(to_float32(cpu.v_pool[0], dtype)).max())
        assert np.abs(to_float32(cupy.asnumpy(o), dtype) - oracle).max() <= budget(dtype, vmax)
        for cache in (gpu, cpu):  # one more token each, like a decode step
            for i, sid in enumerate(ids):
                n = cache.seq_len(sid)
                k, v = kv([i], start=n)
                cache.append([sid], [i], cache.xp.asarray(k), cache.xp.asarray(v))
    assert 0 < replans < extra  # rebuilt only when a tail chunk filled up


def test_extreme_logits_no_nan():
    c, D, Hkv, Hq = 64, 128, 1, 4
    for dtype, qscale in (("float16", 60.0), ("bfloat16", 60.0)):
        prompts = prefix_tree_prompts(11, 5, c, vocab=8)
        kv = TokenKV(1, Hkv, D, dtype=dtype, seed=11, vocab=8, max_len=max(map(len, prompts)) + 4, spread=3.0)
        gpu, cpu, ids = make_pair(prompts, kv, 1, Hkv, D, c, dtype)
        q = random_queries(3, len(ids), Hq, D, dtype, scale=qscale)  # scores reach ~1e4
        o, lse, _ = run_gpu(gpu, ids, q, 0)
        oracle, _ = oracle_decode(cpu, ids, q, 0)
        assert np.isfinite(o).all() and np.isfinite(lse).all()
        vmax = float(np.abs(to_float32(cpu.v_pool[0], dtype)).max())
        assert np.abs(o - oracle).max() <= budget(dtype, vmax) * 2


def test_torch_interop_zero_copy():
    torch = pytest.importorskip("torch")
    import cupy

    from cpattn.arrays import as_cupy

    t = torch.randn(4, 8, 64, device="cuda", dtype=torch.float16)
    x = as_cupy(t, "q", "float16")
    assert x.data.ptr == t.data_ptr()
    tb = torch.randn(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    xb = as_cupy(tb, "q", "bfloat16")
    assert xb.data.ptr == tb.data_ptr() and xb.dtype == cupy.uint16


def test_one_api_return_lse_and_the_units_hook():
    """cpattn.ChunkAttentionDecode picks the GPU class for a GPU cache; return_lse allocates the
    lse, and equals the lse_out path; units / launch_attend expose the attend launch."""
    import cupy

    import cpattn
    from cpattn.chunk_attention import ChunkAttentionDecode

    c, D, Hkv, Hq, dtype = 16, 64, 2, 8, "bfloat16"
    prompts = prefix_tree_prompts(7, 9, c, levels=2, vocab=8)
    kv = TokenKV(1, Hkv, D, dtype=dtype, seed=7, vocab=8, max_len=max(map(len, prompts)) + 4)
    gpu, cpu, ids = make_pair(prompts, kv, 1, Hkv, D, c, dtype)
    dec = cpattn.ChunkAttentionDecode(gpu, piece_chunks=1, private_piece_chunks=1)
    assert type(dec) is ChunkAttentionDecode
    plan = dec.plan(ids, Hq)
    assert dec.decode_plan is plan
    q = cupy.asarray(random_queries(2, len(ids), Hq, D, dtype))
    o, lse = dec.run(q, 0, return_lse=True)
    assert o.dtype == gpu.k_pool.dtype and lse.dtype == np.float32 and lse.shape == (len(ids), Hq)
    assert cupy.array_equal(dec.run(q, 0), o)
    ref = RefDecode(cpu, 1, 1)
    ref.plan(ids, Hq)
    ref_o, ref_lse = ref.run(cupy.asnumpy(q), 0, return_lse=True)
    np.testing.assert_allclose(cupy.asnumpy(lse), ref_lse, rtol=1e-3, atol=1e-3)
    units = dec.units
    assert units.dtype == np.int32 and units.shape[1] == 9 and len(units) > 1
    dec.launch_attend(q, 0, units=units[:1])  # a subset launches alone
    cupy.cuda.get_current_stream().synchronize()
    with pytest.raises(ValueError, match="^scale: "):
        dec.run(q, 0, scale=0.0)
