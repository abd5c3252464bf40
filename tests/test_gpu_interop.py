"""Interop on a GPU (marker: gpu): zero-copy inputs and outputs, the caller's stream, graphs."""
import numpy as np
import pytest

import cpattn
from cpattn import gpu_available
from cpattn.arrays import to_host
from cpattn.reference.dtypes import to_float32
from cpattn.reference.workloads import TokenKV, fill_cache, prefix_tree_prompts, random_queries
from cpattn.testing import get_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")]


def small_decode(dtype="float16", Hq=8):
    c, D, Hkv = 16, 64, 2
    prompts = prefix_tree_prompts(4, 9, c, vocab=8)
    kv = TokenKV(1, Hkv, D, dtype=dtype, seed=4, vocab=8, max_len=max(map(len, prompts)) + 4)
    cache = get_backend("cupy").make_cache(1, Hkv, D, sum(-(-(len(p) + 1) // c) for p in prompts) + 2,
                                           chunk_size=c, dtype=dtype)
    ids = fill_cache(cache, prompts, kv)
    dec = cpattn.ChunkAttentionDecode(cache)  # a GpuChunkCache: the kernels
    dec.plan(ids, Hq)
    return cache, ids, dec


def test_torch_in_and_out_without_copies():
    torch = pytest.importorskip("torch")
    import cupy

    cache, ids, dec = small_decode("bfloat16")
    q = torch.randn(len(ids), 8, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    o = dec.run(q, 0, out=out)
    assert o.data.ptr == out.data_ptr()  # written in place into the torch tensor
    back = torch.from_dlpack(o)
    assert back.data_ptr() == out.data_ptr()
    ref = dec.run(cupy.asarray(q.view(torch.int16)).view(cupy.uint16), 0)
    assert bool((ref == o).all())


def test_cuda_array_interface_input():
    import cupy

    cache, ids, dec = small_decode()
    q = cupy.asarray(random_queries(1, len(ids), 8, 64, "float16"))

    class Foreign:  # only the interface, nothing else
        def __init__(self, a):
            self.__cuda_array_interface__ = a.__cuda_array_interface__

    o1 = dec.run(Foreign(q), 0)
    o2 = dec.run(q, 0)
    assert bool((o1 == o2).all())


def test_jax_dlpack_zero_copy():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    from cpattn.arrays import as_cupy

    x = jax.device_put(jnp.arange(8 * 64, dtype=jnp.float16).reshape(8, 64), dev)
    y = as_cupy(x, "q", "float16")
    assert y.data.ptr == x.unsafe_buffer_pointer()


def test_runs_on_the_callers_stream_including_torch():
    torch = pytest.importorskip("torch")
    import cupy

    cache, ids, dec = small_decode()
    q = cupy.asarray(random_queries(2, len(ids), 8, 64, "float16"))
    eager = dec.run(q, 0)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s), cupy.cuda.ExternalStream(s.cuda_stream) as cs:
        assert cupy.cuda.get_current_stream().ptr == s.cuda_stream
        out = cupy.empty_like(q)
        dec.run(q, 0, out=out)
        cs.synchronize()
    assert bool((out == eager).all())


def test_decode_run_captured_in_a_cuda_graph_replays_like_eager():
    import cupy

    cache, ids, dec = small_decode()
    q = cupy.asarray(random_queries(3, len(ids), 8, 64, "float16"))
    out = cupy.empty_like(q)
    lse = cupy.empty(q.shape[:2], cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dec.run(q, 0, out=out, lse_out=lse)  # warm-up outside the capture (compilation, attributes)
        stream.begin_capture()
        dec.run(q, 0, out=out, lse_out=lse)
        graph = stream.end_capture()
        for seed in (5, 6):
            q[...] = cupy.asarray(random_queries(seed, len(ids), 8, 64, "float16"))
            out.fill(0)
            graph.launch(stream)
            stream.synchronize()
            eager, eager_lse = dec.run(q, 0, return_lse=True)
            stream.synchronize()
            assert bool((out == eager).all()) and bool((lse == eager_lse).all())
            assert np.isfinite(to_float32(to_host(out), "float16")).all()
