"""Native bf16 at the edges (issue 17): ``ml_dtypes.bfloat16`` NumPy arrays and torch bfloat16
tensors are accepted wherever storage arrays are (viewed as uint16 bits, no copy), on the
NumPy cache and as GpuChunkCache inputs (emulated on CPU); ``as_torch`` / ``as_ml_dtypes`` give
outputs back in the real dtype without a view by hand."""
from __future__ import annotations

import numpy as np
import pytest

import cpattn
from cpattn.arrays import as_ml_dtypes, as_torch, to_host
from cpattn.reference import compact_attention as ca
from cpattn.reference.dtypes import storage_view, to_float32
from cpattn.reference.workloads import TokenKV, random_queries
from cpattn.testing import get_backend

ml_dtypes = pytest.importorskip("ml_dtypes")

L, HKV, HQ, D, C = 2, 2, 4, 8, 4


def torch_bf16(x):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)


def ml(x):
    return x.view(ml_dtypes.bfloat16)


NATIVE = {"ml_dtypes": ml, "torch": torch_bf16}


def test_storage_view_is_zero_copy():
    x = np.arange(6, dtype=np.uint16)
    assert np.shares_memory(storage_view(ml(x)), x) and storage_view(ml(x)).dtype == np.uint16
    t = torch_bf16(x)
    v = storage_view(t)
    assert v.dtype == np.uint16 and v.tobytes() == x.tobytes()
    v[0] = 7  # the tensor's memory
    assert int(t.view(__import__("torch").int16)[0]) == 7


@pytest.mark.parametrize("kind", sorted(NATIVE))
@pytest.mark.parametrize("backend_name", ["numpy", "emulated"])
def test_native_bf16_writes_the_same_bytes_and_decodes_the_same(backend_name, kind):
    native = NATIVE[kind]
    kv = TokenKV(L, HKV, D, "bfloat16", seed=1, vocab=20)
    toks = list(range(1, 2 * C + 2))
    k, v = kv(toks)
    with get_backend(backend_name) as b:
        bits = b.make_cache(L, HKV, D, 8, chunk_size=C, dtype="bfloat16")
        nat = b.make_cache(L, HKV, D, 8, chunk_size=C, dtype="bfloat16")
        s1 = bits.add_sequence(toks[:C], k[:, :C], v[:, :C])
        s2 = nat.add_sequence(toks[:C], native(k[:, :C]), native(v[:, :C]))
        bits.extend(s1, toks[C:], k[:, C:], v[:, C:])
        nat.extend(s2, toks[C:], native(k[:, C:]), native(v[:, C:]))
        nk, nv = kv([3], start=len(toks))
        bits.append([s1], [3], nk, nv)
        nat.append([s2], [3], native(nk), native(nv))
        for a, z in ((bits.k_pool, nat.k_pool), (bits.v_pool, nat.v_pool)):
            assert to_host(a).tobytes() == to_host(z).tobytes()
        if backend_name == "numpy":  # host q for the reference decoder
            q = random_queries(0, 1, HQ, D, "bfloat16")
            d = cpattn.ChunkAttentionDecode(nat)
            d.plan([s2], HQ)
            assert d.run(q).tobytes() == d.run(native(q)).tobytes()
            o, _ = cpattn.reference.oracle_decode(nat, [s2], native(q))
            assert np.isfinite(o).all()


@pytest.mark.parametrize("kind", sorted(NATIVE))
def test_native_bf16_write_kv_and_prefill(kind):
    native = NATIVE[kind]
    kv = TokenKV(L, HKV, D, "bfloat16", seed=3, vocab=20)
    cache = cpattn.ChunkCache(L, HKV, D, 8, chunk_size=C, dtype="bfloat16")
    s = cache.add_sequence(list(range(2 * C)), *kv(list(range(2 * C))))
    slots = cache.reserve(s, [1] * C)
    k, v = kv([1] * C, start=2 * C)
    for layer in range(L):
        cache.write_kv(layer, slots, native(k[layer]), native(v[layer]))
    cache.commit(s)
    means = cpattn.BlockMeans(cache)
    q = random_queries(2, C, HQ, D, "bfloat16")
    ref = cpattn.compact_prefill(cache, means, s, q)
    out = native(np.zeros((C, HQ, D), np.uint16))
    res = cpattn.compact_prefill(cache, means, s, native(q), out=out)
    assert res.o.tobytes() == ref.o.tobytes()
    assert storage_view(out).tobytes() == ref.o.tobytes()  # the caller's buffer received o
    o, _ = ca.oracle_prefill(cache, s, native(q))
    assert np.isfinite(o).all()


def test_as_torch_and_as_ml_dtypes_give_the_real_dtype_without_a_copy():
    torch = pytest.importorskip("torch")
    vals = np.array([1.0, -2.5, 3.140625], np.float32)
    bits = cpattn.reference.to_storage(vals, "bfloat16")
    t = as_torch(bits, "bfloat16")
    assert t.dtype == torch.bfloat16 and t.float().tolist() == [1.0, -2.5, 3.140625]
    assert t.data_ptr() == bits.ctypes.data  # no copy
    m = as_ml_dtypes(bits, "bfloat16")
    assert m.dtype == ml_dtypes.bfloat16 and np.shares_memory(m, bits)
    assert m.astype(np.float32).tolist() == [1.0, -2.5, 3.140625]
    assert to_float32(m, "bfloat16").tolist() == [1.0, -2.5, 3.140625]  # accepted back
    h = cpattn.reference.to_storage(vals, "float16")
    assert as_torch(h, "float16").dtype == torch.float16 and as_ml_dtypes(h, "float16") is h
    lse = np.zeros(3, np.float32)
    assert as_torch(lse, "bfloat16").dtype == torch.float32
    assert to_host(t).tobytes() == bits.tobytes()  # a CPU bf16 tensor to the host: the bits


def test_bf16_arrays_of_the_wrong_storage_dtype_are_refused():
    cache = cpattn.ChunkCache(L, HKV, D, 4, chunk_size=C, dtype="float16")
    k = np.zeros((L, 1, HKV, D), np.uint16)
    with pytest.raises(TypeError, match="^k: expected dtype float16"):
        cache.add_sequence([1], ml(k), ml(k))


@pytest.mark.gpu
@pytest.mark.skipif(not cpattn.gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_torch_bf16_in_and_out_without_copies():
    """torch CUDA bf16 K/V and q into a GpuChunkCache and its decoder; as_torch(o) is a bf16
    tensor on the same memory; ml_dtypes host K/V are copied up as the same bits."""
    torch = pytest.importorskip("torch")
    import cupy

    from cpattn.chunk_cache import GpuChunkCache

    D, C = 64, 16
    kv = TokenKV(L, HKV, D, "bfloat16", seed=5, vocab=20)
    toks = list(range(2 * C + 3))
    k, v = kv(toks)
    tb = lambda x: torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16).cuda()  # noqa: E731
    a = GpuChunkCache(L, HKV, D, 8, chunk_size=C, dtype="bfloat16")
    b = GpuChunkCache(L, HKV, D, 8, chunk_size=C, dtype="bfloat16")
    sa = a.add_sequence(toks, tb(k), tb(v))
    sb = b.add_sequence(toks, ml(k), ml(v))
    assert cupy.asnumpy(a.k_pool).tobytes() == cupy.asnumpy(b.k_pool).tobytes()
    dec = cpattn.ChunkAttentionDecode(a)
    dec.plan([sa], HQ)
    q = random_queries(0, 1, HQ, D, "bfloat16")
    o_bits = dec.run(cupy.asarray(q))
    out = torch.empty((1, HQ, D), dtype=torch.bfloat16, device="cuda")
    o_t = dec.run(tb(q), out=out)
    torch.cuda.synchronize()
    assert cupy.asnumpy(o_bits).tobytes() == out.cpu().view(torch.int16).numpy().tobytes()
    t = as_torch(o_bits, "bfloat16")
    assert t.dtype == torch.bfloat16 and t.is_cuda and t.data_ptr() == o_bits.data.ptr
    assert o_t is not None and sb == sa
