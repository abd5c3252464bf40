"""The CUDA-graphed decode step (cpattn/serving/graphed.py) against the eager model (marker: gpu).

A small Llama with random weights (no model file needed) decodes the same batch twice: eagerly
(``LlamaModel.decode``, one CuPy call per operation) and by ``GraphedDecoder`` (one CUDA graph
per plan); the greedy tokens must be identical step for step and the logits within fp16
rounding. Sequences of different lengths cross chunk boundaries at different steps, so the
graph is captured again several times; after every step the plan the graph replays must equal
a plan built afresh (the claim that the plan only changes when a sequence starts a chunk).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpattn import gpu_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")]


def tiny_model(seed, xp):
    from cpattn.testing.models import random_llama

    return random_llama(seed, xp, vocab=512, hidden=256, inter=384, layers=3, hq=4, hkv=2, d=64, gain=1.0)


def session(model, prompts, chunk):
    from cpattn.serving.llama import CacheAttention

    cache = model.new_cache(64, chunk_size=chunk, max_sequences=len(prompts) + 1)
    attn = CacheAttention(cache, model.config.num_q_heads)
    seqs, first = [], []
    for p in prompts:
        s = cache.add_sequence(p, max_match=len(p) - 1)
        done = cache.seq_len(s)
        logits = model.prefill(attn, s, p[done:], chunk_tokens=chunk)
        seqs.append(s)
        first.append(int(logits.argmax().get()))
    return attn, seqs, first


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), shared=st.integers(0, 3),
       chunk=st.sampled_from([16, 32]))
def test_graphed_tokens_equal_eager(seed, batch, shared, chunk):
    import cupy as cp

    from cpattn.chunk_attention import plan_host
    from cpattn.serving.graphed import GraphedDecoder

    model = tiny_model(seed, cp)
    rng = np.random.default_rng(seed)
    doc = rng.integers(0, model.config.vocab_size, shared * chunk).tolist()
    prompts = [doc + rng.integers(0, model.config.vocab_size, int(rng.integers(1, 2 * chunk))).tolist()
               for _ in range(batch)]
    steps = 2 * chunk + 3  # every sequence crosses at least one chunk boundary
    attn_e, seqs_e, last_e = session(model, prompts, chunk)
    attn_g, seqs_g, last_g = session(model, prompts, chunk)
    assert last_e == last_g
    dec = GraphedDecoder(model, attn_g)
    cache = attn_g.cache
    for step in range(steps):
        logits = model.decode(attn_e, seqs_e, last_e)
        want = cp.argmax(logits, axis=-1).get()
        if step:
            dec.logits.fill(np.nan)  # poisoned: the replay must write it
        if step % 7 == 3:  # the length table changes outside the batch: this step must upload it
            cache.release(cache.add_sequence([1, 2, 3]))
        got = dec.step(seqs_g, last_g)
        if step % 7 == 3:
            assert not dec.times.fresh[-1]
        # the step left the device one step on (advance_step): next slot, position and length per row
        meta = dec.meta.get()
        pos = dec.batch.positions  # of the tokens this step wrote: row pos % chunk of their chunk
        np.testing.assert_array_equal(meta[2], pos + 1)
        np.testing.assert_array_equal(meta[1], pos % chunk + 1)
        rows = [cache.seq_slot(s) for s in seqs_g]
        np.testing.assert_array_equal(cache.d_slot_lens.get()[rows], cache.slot_lens[rows] + 1)
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        # the two paths round the same float32 math to fp16 at the same points; a sum of squares
        # in another order or another cuBLAS algorithm may move one rounding by an ulp, which the
        # later layers carry: about an ulp of fp16 at the logits' scale (~16 here, ulp 1/64) on average,
        # a few ulps at the largest logits (~32, ulp 1/32)
        d = np.abs(dec.logits.get().astype(np.float32) - logits.get())
        assert d.max() <= 0.25 and d.mean() <= 0.02, (step, d.max(), d.mean())
        # the replayed plan is the plan of now
        d = attn_g.decoder
        _, host, offs, n = plan_host(attn_g.cache, seqs_g, model.config.num_q_heads, d.piece_chunks,
                                     d.private_piece_chunks, d.units_per_sm, cp.cuda.Device().attributes[
                                         "MultiProcessorCount"])
        np.testing.assert_array_equal(d.units.get().ravel(), host[offs[0]:offs[1]])
        # the next step's tokens: the array this step returned (no checks, no upload) or a copy
        last_e, last_g = want.tolist(), (got if step % 2 else got.tolist())
    assert dec.times.captures >= 2
    assert any(dec.times.fresh)  # steps that uploaded nothing ran (and gave the eager tokens)
    for a, b in zip(seqs_e, seqs_g):
        assert attn_e.cache.seq_len(a) == attn_g.cache.seq_len(b)


def test_graphed_rejects_bad_input():
    import cupy as cp

    from cpattn.serving.graphed import GraphedDecoder

    model = tiny_model(1, cp)
    attn, seqs, first = session(model, [[1, 2, 3, 4, 5]], 16)
    dec = GraphedDecoder(model, attn)
    with pytest.raises(ValueError, match="tokens"):
        dec.step(seqs, [1, 2])
    with pytest.raises(ValueError, match="vocab"):
        dec.step(seqs, [10**6])
    assert attn.cache.seq_len(seqs[0]) == 5  # nothing reserved by the failed calls
    nxt = dec.step(seqs, first)
    assert nxt.shape == (1,) and attn.cache.seq_len(seqs[0]) == 6
    with pytest.raises(ValueError, match="model, attn"):
        GraphedDecoder(tiny_model(1, np), attn)


def test_graphed_profile_parts():
    import cupy as cp

    from cpattn.bench.timing import GpuTimer
    from cpattn.serving.graphed import GraphedDecoder

    model = tiny_model(2, cp)
    attn, seqs, first = session(model, [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 9]], 16)
    dec = GraphedDecoder(model, attn)
    nxt = dec.step(seqs, first)
    p = dec.profile(GpuTimer(warmup=1, iters=3, flush_bytes=0))
    assert all(p[k] > 0 for k in ("all_ms", "attention_ms", "model_ms"))
    # profiling replays the last step on its own inputs: the next step is unchanged
    again = dec.step(seqs, nxt.tolist())
    attn2, seqs2, first2 = session(model, [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 9]], 16)
    l1 = model.decode(attn2, seqs2, first2)
    l2 = model.decode(attn2, seqs2, cp.argmax(l1, axis=-1).get().tolist())
    np.testing.assert_array_equal(again, cp.argmax(l2, axis=-1).get())
