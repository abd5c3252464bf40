"""``GraphedDecoder`` on the CPU: the emulated backend's stand-ins for CuPy, the model's kernels
and cuBLAS (``cpattn.testing.fake_cupy``, ``fake_model_ops``) record a capture and replay it,
so the decoder's own host logic runs in CI: buffers per batch, capture and recapture, and what a
step leaves on the "device" for the next one (``advance_step``: tokens, slots, positions and
the length table), which lets a steady step upload nothing.

The differential: one decoder over every step (steady steps take the no-upload path) against a
fresh decoder per step (every step uploads everything and captures anew). The emulated math is
deterministic, so the tokens must be identical bitwise, step for step, whatever happens between
steps (other sequences added, the length table uploaded by another reader, the tokens given as
a list or as the array the step returned, a profile replay). The kernels' numerics against the
eager model are tests/test_graphed_decode.py's (GPU)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cpattn.reference.chunk_cache import CacheError
from cpattn.testing.backends import get_backend


def tiny_model(seed, xp, layers=2):
    from cpattn.testing.models import random_llama

    return random_llama(seed, xp, vocab=96, hidden=32, inter=48, layers=layers, hq=4, hkv=2, d=8, gain=2.0)


@pytest.fixture
def emulated(monkeypatch):
    """The emulated backend entered: the model decodes with the GPU decoder itself (its kernels
    emulated from their launch arguments, ``fake_decode_kernels``) and prefills with the
    reference on the device lengths."""
    import cpattn.serving.llama as llama

    with get_backend("emulated") as be:
        from cpattn.chunk_attention import ChunkAttentionDecode

        api = be.api
        monkeypatch.setattr(llama, "attention_api", lambda: (ChunkAttentionDecode, api.BlockMeans,
                                                             api.compact_prefill))
        yield be


def session(model, prompts, chunk):
    from cpattn.serving.llama import CacheAttention

    cache = model.new_cache(48, chunk_size=chunk, max_sequences=len(prompts) + 3)
    attn = CacheAttention(cache, model.config.num_q_heads)
    seqs, first = [], []
    for p in prompts:
        s = cache.add_sequence(p, max_match=len(p) - 1)
        logits = model.prefill(attn, s, p[cache.seq_len(s):], chunk_tokens=chunk)
        seqs.append(s)
        first.append(int(np.asarray(logits).argmax()))
    return attn, seqs, first


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5), shared=st.integers(0, 2),
       chunk=st.sampled_from([4, 8]), events=st.lists(st.sampled_from(["none", "none", "none", "add", "sync", "list",
                                                                         "profile"]), min_size=12, max_size=30))
@example(seed=3, batch=2, shared=1, chunk=8, events=["none"] * 6 + ["list", "none", "sync", "none", "profile", "none"])
def test_steady_steps_give_the_tokens_of_fresh_ones(emulated, seed, batch, shared, chunk, events):
    from cpattn.bench.timing import GpuTimer
    from cpattn.serving.graphed import GraphedDecoder

    model = tiny_model(seed % 1000, __import__("cupy"))
    rng = np.random.default_rng(seed)
    doc = rng.integers(0, model.config.vocab_size, shared * chunk).tolist()
    prompts = [doc + rng.integers(0, model.config.vocab_size, int(rng.integers(1, 2 * chunk))).tolist()
               for _ in range(batch)]
    attn_a, seqs_a, first = session(model, prompts, chunk)
    attn_b, seqs_b, first_b = session(model, prompts, chunk)
    assert first == first_b
    dec = GraphedDecoder(model, attn_a)
    cache = attn_a.cache
    last_a, last_b = np.array(first, np.int64), first
    withdrawn = {0}  # steps that must upload: the first, and those after a change outside the batch
    for step, event in enumerate(events):
        if event in ("add", "sync"):
            withdrawn.add(step)
        if event == "add":  # another sequence comes and goes: the length table changed outside the batch
            for attn in (attn_a, attn_b):
                attn.cache.release(attn.cache.add_sequence([1, 2, 3]))
        elif event == "sync":  # another reader uploads the host table (it sees the host's, not the advance)
            cache.sync_lens()
            rows = [cache.seq_slot(s) for s in seqs_a]
            np.testing.assert_array_equal(cache.d_slot_lens.get()[rows], cache.slot_lens[rows])
        elif event == "profile" and step:
            if attn_a.decoder.decode_plan.version == cache.version:
                dec.profile(GpuTimer(warmup=0, iters=1, flush_bytes=0))
                withdrawn.add(step)
            else:  # the tree changed since the plan (another sequence came and went): capturing anew refuses
                with pytest.raises(CacheError, match="build a new plan"):
                    dec.profile(GpuTimer(warmup=0, iters=1, flush_bytes=0))
        if step:
            dec.logits.fill(np.nan)  # poisoned: the replay must write it
        replans = dec.times.replans
        got = dec.step(seqs_a, last_a.tolist() if event == "list" else last_a)
        want = GraphedDecoder(model, attn_b).step(seqs_b, last_b)  # everything uploaded, captured anew
        np.testing.assert_array_equal(got, want, err_msg=f"step {step} ({event})")
        assert not np.isnan(dec.logits.astype(np.float32)).any()
        # the no-upload path exactly on the steps that may take it: no new chunk, nothing changed since the last
        assert dec.times.fresh[-1] == (step not in withdrawn and dec.times.replans == replans), (step, event)
        # the device is one step on: next slot, position and length of every row
        meta, pos = dec.meta.get(), dec.batch.positions
        np.testing.assert_array_equal(meta[2], pos + 1)
        np.testing.assert_array_equal(meta[1], pos % chunk + 1)
        rows = [cache.seq_slot(s) for s in seqs_a]
        np.testing.assert_array_equal(cache.d_slot_lens.get()[rows], cache.slot_lens[rows] + 1)
        last_a, last_b = got, want.tolist()
    assert dec.times.captures >= 1
    if seed == 3 and batch == 2:  # the explicit example: steady steps take the no-upload path, and a new
        # chunk the plan written into the captured one's buffers (no new capture)
        assert sum(dec.times.fresh) >= 4 and dec.times.replans > dec.times.captures


def test_capture_refuses_synchronous_copies(emulated):
    """The stand-in capture is strict like CUDA's: a copy inside it raises."""
    import cupy

    s = cupy.cuda.Stream()
    a = cupy.zeros(3, np.int32)
    s.begin_capture()
    try:
        with pytest.raises(RuntimeError, match="capture"):
            a.get()
    finally:
        s.end_capture()
    assert a.get().tolist() == [0, 0, 0]


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), chunk=st.sampled_from([4, 8]),
       steps=st.integers(6, 20))
def test_steps_with_slots_reserved_by_the_caller(emulated, seed, batch, chunk, steps):
    """The mixed-step path (``MixedStepBackend``): the caller reserves each step's tokens
    (``reserve_batch``) and hands the slots in; such a step always uploads them, and the device
    advance it leaves behind is stale for every other reader (the next sync uploads the host
    table). Same tokens as a fresh decoder per step."""
    from cpattn.serving.graphed import GraphedDecoder

    model = tiny_model(seed % 1000, __import__("cupy"))
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, model.config.vocab_size, int(rng.integers(1, 2 * chunk))).tolist()
               for _ in range(batch)]
    attn_a, seqs_a, first = session(model, prompts, chunk)
    attn_b, seqs_b, _ = session(model, prompts, chunk)
    dec, cache = GraphedDecoder(model, attn_a), attn_a.cache
    last_a, last_b = first, first
    for step in range(steps):
        slots = cache.reserve_batch(seqs_a, last_a)
        got = dec.step(seqs_a, last_a, slots=slots)
        want = GraphedDecoder(model, attn_b).step(seqs_b, last_b)
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        assert not dec.times.fresh[-1]
        rows = [cache.seq_slot(s) for s in seqs_a]
        cache.sync_lens()  # a reader between steps sees the host lengths, not the advance
        np.testing.assert_array_equal(cache.d_slot_lens.get()[rows], cache.slot_lens[rows])
        last_a, last_b = got.tolist(), want.tolist()
