"""Mixed steps in the server (``Server(step_tokens=N)``): decode tokens and prefill pieces in one
step within a token budget, preemption when the pool runs out (docs/design.md, *Mixed steps
and preemption*).

The check of preemption is the same workload served with an ample pool: greedy decoding of the
toy model is deterministic, so every request must generate exactly the tokens it generates when
nothing is preempted (and, with an ample pool, exactly the tokens of the default server and of
the dense model). Workloads are Poisson arrivals of prompts sharing prefixes at two depths
(``arrival_workload``); hypothesis draws the structure (seed, sizes, budget, pool slack) and
NumPy fills the prompts from the seed.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cpattn import gpu_available
from cpattn.bench.soak import accounting
from cpattn.reference.checks import cdiv
from cpattn.reference.chunk_cache import CacheFullError
from cpattn.serving import AttentionStats, ModelConfig, PrefillOptions, Server, TinyLM, dense_generate
from cpattn.serving.workloads import arrival_workload, poisson_arrivals
from cpattn.testing import get_backend

CFG = ModelConfig(vocab_size=64, num_layers=2, hidden=32, num_q_heads=4, num_kv_heads=2, head_dim=16,
                  mlp_hidden=64, locality=16.0)
C = 8
MODEL = TinyLM(CFG, seed=0)


def workload(seed, n, rate=1.0, max_new=(1, 16)):
    return arrival_workload(seed, n, rate=rate, num_systems=2, system_len=(8, 60), branch_len=(0, 24),
                            own_len=(1, 24), max_new_tokens=max_new, vocab=CFG.vocab_size)


def life(work) -> int:
    """Chunks the longest request needs alone (prompt + generated tokens but the last)."""
    return max(cdiv(len(p) + m - 1, C) for p, m, _ in work)


def ample(work) -> int:
    """A pool every request fits in at once without sharing: nothing is ever preempted."""
    return sum(cdiv(len(p) + m - 1, C) for p, m, _ in work)


def serve(work, pool, step_tokens=32, prefill_chunk=16, backend="numpy", model=MODEL, **kw):
    server = Server(model, pool, chunk_size=C, prefill_chunk=prefill_chunk, backend=backend,
                    options=PrefillOptions(alpha=0.0), measure_recall=False, step_tokens=step_tokens, **kw)
    reqs = [server.submit(p, m, arrival=t) for p, m, t in work]
    return server, reqs, server.run()


def check_run(server, reqs, rep, budget, reference=None):
    """What every mixed run must satisfy; ``reference``: the requests of an ample-pool run."""
    cache = server.cache
    assert all(r.state == "finished" and len(r.output) == r.max_new_tokens for r in reqs)  # none lost
    if reference is not None:
        for r, ref in zip(reqs, reference):
            assert r.output == ref.output, f"request {r.rid} (preempted {r.preemptions} times)"
    # the pool: nothing referenced, every chunk free or cached exactly once (recomputed from the tree)
    a = accounting(cache, [])
    assert a["exact"] and a["referenced"] == 0 and not cache.sequences, a
    assert cache.num_free + cache.num_cached == cache.num_chunks
    assert cache.stats()["tokens_flat"] == 0
    # the budget, and the step lists agree with each other and with the requests
    assert rep.mode == "mixed" and rep.token_budget == budget
    assert 0 < max(rep.step_tokens) <= budget and len(rep.step_s) == len(rep.step_tokens) == len(rep.step_decode)
    assert all(0 <= d <= t for d, t in zip(rep.step_decode, rep.step_tokens))
    assert sum(rep.step_tokens) == sum(r.kv_tokens for r in reqs)
    assert rep.decode_tokens == sum(rep.step_decode) and rep.preemptions == sum(r.preemptions for r in reqs)
    # per request: a first token, one pass of K/V when never preempted, waits counted in steps
    for r, s in zip(reqs, rep.per_request):
        assert s["rid"] == r.rid and s["ttft_steps"] >= 1 and s["ttft_s"] > 0 and s["tokens"] == r.max_new_tokens
        assert r.reused + r.computed == len(r.prompt) and r.reused % C == 0
        if r.preemptions == 0:
            assert r.recomputed == 0 and r.kv_tokens == r.computed + r.max_new_tokens - 1
        assert s["waited"] <= server.step - r.arrival
    assert rep.recomputed == sum(r.recomputed for r in reqs)


# ---------------------------------------------------------------------------- ample pool
def test_ample_pool_mixed_steps_generate_the_default_servers_and_the_dense_models_tokens():
    work = workload(11, 10, rate=1.5)
    _, base, _ = serve(work, ample(work), step_tokens=None)  # the default server
    server, reqs, rep = serve(work, ample(work), step_tokens=40)
    check_run(server, reqs, rep, 40, base)
    assert rep.preemptions == 0 and rep.recomputed == 0
    for r in reqs[:3]:
        assert r.output == dense_generate(MODEL, r.prompt, r.max_new_tokens)
    # steps really mix: decode tokens and prefill pieces in one step, and the budget is filled
    assert any(0 < d < t for d, t in zip(rep.step_decode, rep.step_tokens))
    assert max(rep.step_tokens) == 40
    assert rep.prefill_reused > 0  # shared prefixes still reused
    text = str(rep)
    for needle in ("mixed steps (budget 40 tokens)", "time to first token", "0 preemptions", "tok/s"):
        assert needle in text


def test_the_default_server_reports_per_request_numbers_too():
    work = workload(12, 6, rate=0.5)
    server, reqs, rep = serve(work, ample(work), step_tokens=None)
    assert rep.mode == "prefill-then-decode" and rep.step_s == [] and rep.preemptions == 0
    for r, s in zip(reqs, rep.per_request):
        assert s["ttft_steps"] == r.first_token_step - r.arrival + 1 >= 1 and s["preemptions"] == 0
        assert r.kv_tokens == r.computed + r.max_new_tokens - 1 and r.recomputed == 0


# ---------------------------------------------------------------------------- preemption
def test_a_small_pool_preempts_and_outputs_stay_exact():
    """A long Poisson arrival (120 requests) in a pool of one request's life plus two chunks."""
    work = workload(5, 120, rate=0.8)
    _, ref, _ = serve(work, ample(work), step_tokens=32)
    server, reqs, rep = serve(work, life(work) + 2, step_tokens=32, trace=True)
    check_run(server, reqs, rep, 32, ref)
    assert rep.preemptions > 10 and rep.recomputed > 0 and rep.evictions > 0
    assert any("preempted (decode needs room)" in line for line in server.log)
    assert any("prefill needs room" in line for line in server.log)
    # a preempted request is recomputed from its cached prefix when it is still there
    assert any(r.preemptions and r.recomputed < len(r.prompt) + len(r.output) for r in reqs)


def test_the_most_recently_admitted_request_is_preempted_and_reuses_its_chunks():
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, CFG.vocab_size, 40).tolist() for _ in range(2))
    work = [(a, 30, 0), (b, 30, 1)]  # each 9 chunks over its life: 18 > 15, so one must give way
    _, ref, _ = serve(work, ample(work), step_tokens=64, prefill_chunk=64)
    server, reqs, rep = serve(work, 15, step_tokens=64, prefill_chunk=64, trace=True)
    check_run(server, reqs, rep, 64, ref)
    assert [r.preemptions for r in reqs] == [0, 1]  # b, admitted last, makes room for a
    # a needed one chunk more (b's least recently used, evicted); b's other complete chunks stayed
    # cached, so its recompute matched them: of its 56 tokens of K/V, one chunk is computed again
    assert 0 < reqs[1].recomputed <= C and rep.evictions > 0
    assert any("r1 preempted (decode needs room): 17 tokens kept" in line for line in server.log)
    assert reqs[1].waited > 0 and reqs[0].waited == 0


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(6, 24), rate=st.floats(0.2, 3.0),
       budget=st.sampled_from([16, 24, 40, 64]), prefill_chunk=st.sampled_from([8, 16, 32]),
       slack=st.integers(0, 4))
def test_random_arrivals_in_a_small_pool(seed, n, rate, budget, prefill_chunk, slack):
    work = workload(seed, n, rate=rate)
    _, ref, ref_rep = serve(work, ample(work), step_tokens=budget, prefill_chunk=prefill_chunk)
    assert ref_rep.preemptions == 0
    server, reqs, rep = serve(work, life(work) + slack, step_tokens=budget, prefill_chunk=prefill_chunk)
    check_run(server, reqs, rep, budget, ref)


# ---------------------------------------------------------------------------- the emulated GPU cache
class EmulatedTreeBackend:
    """The server's two attention calls on an emulated GPU cache (``cpattn.testing``): the GPU
    cache's host logic, attention by the reference on the *device* length table, so a length the
    server forgot to publish between reservations shows up as a wrong token."""

    label = "emulated GPU cache"

    def __init__(self, b, cache):
        self.api, self.cache = b.api, cache
        self.means, self.decoder = b.api.BlockMeans(cache), b.api.ChunkAttentionDecode(cache)
        self.stats, self.planned = AttentionStats(cache.num_layers), None

    def sync(self):
        pass

    def prefill(self, seq, q, layer):
        res = self.api.compact_prefill(self.cache, self.means, seq, q, layer, alpha=0.0)
        self.stats.record_prefill(layer, self.cache.seq_len(seq) - q.shape[0], q.shape, C, None, None)
        return res.o

    def decode(self, seqs, q, layer):
        key = (tuple(seqs), self.cache.version)
        if key != self.planned:
            self.decoder.plan(list(seqs), q.shape[1])
            self.planned = key
            self.stats.plans_built += 1
        self.stats.decode_calls += 1
        return self.decoder.run(q, layer)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(6, 16), budget=st.sampled_from([16, 40]),
       slack=st.integers(0, 3))
def test_emulated_gpu_cache_random_arrivals_in_a_small_pool(seed, n, budget, slack):
    work = workload(seed, n, rate=1.0, max_new=(1, 10))
    _, ref, _ = serve(work, ample(work), step_tokens=budget)  # the NumPy reference, ample pool
    with get_backend("emulated") as b:
        cache = b.make_cache(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, life(work) + slack, chunk_size=C,
                             dtype=CFG.dtype)
        server, reqs, rep = serve(work, cache.num_chunks, step_tokens=budget,
                                  backend=EmulatedTreeBackend(b, cache))
        check_run(server, reqs, rep, budget, ref)
        assert rep.backend == "emulated GPU cache"


# ---------------------------------------------------------------------------- the checks can fail
def test_a_recompute_that_forgets_the_generated_tokens_is_caught(monkeypatch):
    """Recomputing a preempted request from its prompt alone corrupts its output."""
    work = workload(5, 40, rate=0.8)
    _, ref, _ = serve(work, ample(work), step_tokens=32)
    monkeypatch.setattr(Server, "_tokens", lambda self, r: r.prompt + r.output[:0 if r.preemptions else None])
    server, reqs, rep = serve(work, life(work) + 2, step_tokens=32)
    assert rep.preemptions > 0
    with pytest.raises(AssertionError, match="preempted"):
        check_run(server, reqs, rep, 32, ref)


def test_a_preemption_that_drops_the_request_is_caught(monkeypatch):
    work = workload(5, 40, rate=0.8)
    real = Server._preempt

    def drop(self, r, admitted, waiting, why):
        real(self, r, admitted, waiting, why)
        waiting.remove(r)  # lost: never served again
    monkeypatch.setattr(Server, "_preempt", drop)
    server, reqs, rep = serve(work, life(work) + 2, step_tokens=32)
    assert rep.preemptions > 0
    with pytest.raises(AssertionError):
        check_run(server, reqs, rep, 32)


# ---------------------------------------------------------------------------- arguments and limits
def test_arguments_and_a_pool_too_small():
    with pytest.raises(ValueError, match="step_tokens"):
        Server(MODEL, 16, chunk_size=C, prefill_chunk=C, step_tokens=C - 1)
    for bad in (True, 32.0, "32"):
        with pytest.raises(TypeError, match="step_tokens"):
            Server(MODEL, 16, chunk_size=C, prefill_chunk=C, step_tokens=bad)
    server = Server(MODEL, 3, chunk_size=C, prefill_chunk=C, step_tokens=16, measure_recall=False)
    server.submit(list(range(30)), 4)
    with pytest.raises(CacheFullError, match="pool"):
        server.run()
    for bad, exc in ((0.0, ValueError), (-1.0, ValueError), (True, TypeError)):
        with pytest.raises(exc, match="rate"):
            poisson_arrivals(0, 4, bad)
    arr = poisson_arrivals(0, 50, 0.5)
    assert arr[0] == 0 and arr == sorted(arr) and 40 < arr[-1] < 200  # about 2 steps apart


def test_on_step_sees_every_mixed_step():
    work = workload(13, 8, rate=1.0)
    seen = []
    server, reqs, rep = serve(work, life(work) + 1, step_tokens=24,
                              on_step=lambda kind, s, rs: seen.append((kind, s, [r.rid for r in rs])))
    assert [k for k, _, _ in seen] == ["step"] * len(rep.step_s) and [s for _, s, _ in seen] == rep.step_s
    assert all(len(ids) == len(set(ids)) > 0 for _, _, ids in seen)
    assert sum(rep.step_s) == pytest.approx(rep.decode_s) and rep.prefill_s == 0.0


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_mixed_steps_with_preemption_match_the_ample_run_and_the_reference():
    import cupy

    cfg = ModelConfig(vocab_size=128, num_layers=2, hidden=128, num_q_heads=8, num_kv_heads=2, head_dim=64,
                      mlp_hidden=256, locality=24.0)
    c = 16
    work = arrival_workload(21, 60, rate=1.0, num_systems=3, system_len=(30, 300), branch_len=(0, 80),
                            own_len=(1, 60), max_new_tokens=(1, 24), vocab=cfg.vocab_size)
    need = max(cdiv(len(p) + m - 1, c) for p, m, _ in work)
    everything = sum(cdiv(len(p) + m - 1, c) for p, m, _ in work)
    runs = {}
    for name, xp, pool in (("cupy", cupy, everything), ("cupy", cupy, need + 2), ("numpy", np, need + 2)):
        model = TinyLM(cfg, seed=0, xp=xp)
        server = Server(model, pool, chunk_size=c, prefill_chunk=64, backend=name, options=PrefillOptions(alpha=0.0),
                        measure_recall=False, step_tokens=128)
        reqs = [server.submit(p, m, arrival=t) for p, m, t in work]
        rep = server.run()
        print(name, pool, rep)
        assert all(len(r.output) == r.max_new_tokens for r in reqs) and max(rep.step_tokens) <= 128
        a = accounting(server.cache, [])
        assert a["exact"] and a["referenced"] == 0
        runs[name, pool] = [r.output for r in reqs], rep
    assert runs["cupy", need + 2][1].preemptions > 0
    assert runs["cupy", everything][1].preemptions == 0
    assert runs["cupy", need + 2][0] == runs["cupy", everything][0]  # preemption changes nothing
    same = sum(x == y for x, y in zip(runs["cupy", need + 2][0], runs["numpy", need + 2][0]))
    assert same >= 0.9 * len(work)  # kernels vs reference: float32 order may flip a near tie
