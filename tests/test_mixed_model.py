"""Mixed steps of the real model (SmolLM2-135M through ``MixedStepBackend``): the server's scheduler
(budget, prefix reuse, preemption) with decode rows through the graphed decoder (CuPy) or the
eager model (NumPy), and every prefill piece of a step in one forward whose attention is one
``BatchedPrefill`` per layer (docs/design.md, *Mixed steps and preemption*).

The check: every request's greedy tokens equal those of the request run alone (``prefill`` then
``decode``, nothing else in the cache), whatever the arrivals, the budget and the pool; a
difference is allowed only at a near-tie of the lone run (its top-2 logit gap within the fp16
noise the real-model tests allow) where ours took the lone run's second choice. Requests share
a real document as system prompt, each with its own question, and arrive as a Poisson process
(in server steps); hypothesis draws the seed, rate, budget, piece size and pool slack.
Needs the model file (``cpattn models fetch smollm2``) and the models extra, as tests/test_real_model.py;
without them those tests skip (``run(poll=...)``'s test needs neither).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cpattn import gpu_available
from cpattn.bench.soak import accounting
from cpattn.reference.checks import cdiv
from cpattn.serving import ModelConfig, Server, TinyLM
from cpattn.serving.workloads import poisson_arrivals

C = 16  # chunk size: small pools preempt at a fine grain
NEW = 6  # tokens per request
DOC_TOKENS = 70  # the shared document: 4 complete chunks and a partial one, so every prompt computes a tail
QUESTIONS = ("What is this?", "Name one keyword.", "Summarise it.", "Who wrote it?", "Is it long?",
             "Give an example.", "What comes next?", "Why does it matter?")
NEAR_TIE = 0.05  # logits; the lone run's top-2 gap below which fp16 noise may pick the second


@pytest.fixture(scope="module")
def real(model_file):
    """(model, tokenizer, prompts, lone runs) on NumPy; the lone runs are computed on first use."""
    for extra in ("gguf", "tokenizers", "jinja2"):  # the models extra
        pytest.importorskip(extra)
    from cpattn.serving.generate import Generator, load_text
    from cpattn.serving.gguf import GGUFFile
    from cpattn.serving.llama import LlamaModel

    f = GGUFFile(model_file)
    model = LlamaModel(f.config(), f.tensor, dtype="float16")
    tok = f.tokenizer()
    gen = Generator(model, tok, chunk_size=C, prefill_chunk=64)
    doc = tok.decode(tok.encode(load_text("python-docs", max_chars=4000))[:DOC_TOKENS])
    prompts = [gen.prompt_tokens(q, system=doc) for q in QUESTIONS]
    return dict(model=model, gen=gen, prompts=prompts, alone={})


def alone(real, i: int, new: int = NEW, model=None):
    """Request i alone: greedy tokens and the top-2 choices and gap at every position."""
    model = real["model"] if model is None else model
    key = (i, new, id(model))
    if key not in real["alone"]:
        from cpattn.serving.llama import CacheAttention

        p = real["prompts"][i]
        cache = model.new_cache(cdiv(len(p) + new, C) + 1, chunk_size=C, max_sequences=2)
        attn = CacheAttention(cache, model.config.num_q_heads)
        seq = cache.add_sequence([])
        logits = model.prefill(attn, seq, p, chunk_tokens=64)[None]
        toks, second, gaps = [], [], []
        while True:
            row = np.asarray(logits[0].get() if hasattr(logits, "get") else logits[0], np.float64)
            top = np.argsort(row)[-2:]
            toks.append(int(top[1]))
            second.append(int(top[0]))
            gaps.append(float(row[top[1]] - row[top[0]]))
            if len(toks) == new:
                break
            logits = model.decode(attn, [seq], [toks[-1]])
        real["alone"][key] = dict(tokens=toks, second=second, gaps=gaps)
    return real["alone"][key]


def check_tokens(real, reqs, model=None, allow_near_ties: bool = True) -> int:
    """Every request's tokens equal its lone run's, up to a near-tie flip; returns the flips."""
    flips = 0
    for r in reqs:
        ref = alone(real, r.qid, r.max_new_tokens, model)
        if r.output == ref["tokens"]:
            continue
        n = next(k for k, (a, b) in enumerate(zip(r.output, ref["tokens"])) if a != b)
        assert allow_near_ties and ref["gaps"][n] <= NEAR_TIE and r.output[n] == ref["second"][n], \
            (f"request {r.rid} (question {r.qid}, preempted {r.preemptions} times): first difference at token {n}, "
             f"lone run's top-2 gap there {ref['gaps'][n]:.4f}", r.output, ref["tokens"])
        flips += 1
    return flips


def serve(real, arrivals, questions, pool, budget, prefill_chunk=32, model=None, graph="auto", new=NEW, **options):
    from cpattn.serving.llama import MixedStepBackend

    model = real["model"] if model is None else model
    backend = MixedStepBackend(model, model.new_cache(pool, chunk_size=C), graph=graph, **options)
    server = Server(model, pool, chunk_size=C, prefill_chunk=prefill_chunk, backend=backend, step_tokens=budget,
                    trace=True)
    reqs = []
    for q, t in zip(questions, arrivals):
        r = server.submit(real["prompts"][q], new, arrival=t)
        r.qid = q
        reqs.append(r)
    return server, reqs, server.run()


def check_run(server, reqs, rep, budget):
    assert all(r.state == "finished" and len(r.output) == r.max_new_tokens for r in reqs)  # none lost
    a = accounting(server.cache, [])
    assert a["exact"] and a["referenced"] == 0 and not server.cache.sequences, a
    assert rep.mode == "mixed" and 0 < max(rep.step_tokens) <= budget
    assert sum(rep.step_tokens) == sum(r.kv_tokens for r in reqs)
    assert rep.decode_tokens == sum(rep.step_decode) and rep.preemptions == sum(r.preemptions for r in reqs)
    for r in reqs:
        assert r.reused + r.computed == len(r.prompt) and r.first_token_step is not None


def life(real, new=NEW) -> int:
    return max(cdiv(len(p) + new - 1, C) for p in real["prompts"])


# ---------------------------------------------------------------------------- NumPy
def test_a_small_pool_preempts_and_every_request_gets_its_lone_tokens(real):
    qs = [0, 1, 2, 3, 4, 5, 0, 6]
    arrivals = poisson_arrivals(3, len(qs), 0.7)
    server, reqs, rep = serve(real, arrivals, qs, life(real) + 1, budget=48)
    check_run(server, reqs, rep, 48)
    assert rep.preemptions > 0 and any("preempted" in line for line in server.log)
    assert check_tokens(real, reqs, allow_near_ties=False) == 0  # NumPy: exactly the lone tokens
    assert rep.prefill_reused >= 3 * (DOC_TOKENS // C) * C  # the document's chunks were shared (some evicted)
    assert any(0 < d < t for d, t in zip(rep.step_decode, rep.step_tokens))  # steps really mix
    assert "batched prefill" in rep.backend and "NumPy" in str(rep)


@settings(max_examples=3)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 7), rate=st.floats(0.3, 2.0),
       budget=st.sampled_from([16, 40, 64]), prefill_chunk=st.sampled_from([16, 32, 64]), slack=st.integers(0, 3))
def test_random_arrivals_in_a_small_pool(real, seed, n, rate, budget, prefill_chunk, slack):
    rng = np.random.default_rng(seed)
    qs = rng.integers(0, len(QUESTIONS), n).tolist()
    server, reqs, rep = serve(real, poisson_arrivals(seed, n, rate), qs, life(real) + slack, budget=budget,
                              prefill_chunk=prefill_chunk)
    check_run(server, reqs, rep, budget)
    assert check_tokens(real, reqs, allow_near_ties=False) == 0


def test_sparse_prefill_option_reaches_the_batched_prefill(real):
    """alpha > 0 with no sink and one window block: pieces with a past read fewer blocks."""
    server, reqs, rep = serve(real, [0, 1], [0, 1], 64, budget=64, new=2, alpha=0.5, sink=0, window=1)
    check_run(server, reqs, rep, 64)
    assert rep.density and rep.density["group_union"] < 1.0
    assert server.backend.options == dict(alpha=0.5, sink=0, window=1, q_tile=None, group_size=None)


def test_recall_row_floor_option_reaches_the_batched_prefill(real):
    """The recall rule with its per-row floor: BatchedPrefill's plan gets row_floor, and the floor
    reads no fewer blocks than the pooled target alone."""
    got = {}
    for floor in (None, 0.95):
        server, reqs, rep = serve(real, [0, 1], [0, 1], 64, budget=64, new=2, recall=0.5, row_floor=floor, sink=0,
                                  window=1, group_size=1)
        check_run(server, reqs, rep, 64)
        assert server.backend.options.get("row_floor") == floor
        assert server.backend.batched.prefill_plan.options["row_floor"] == floor
        got[floor] = rep.density["group_union"]
    assert got[None] <= got[0.95] and got[None] < 1.0


def test_arguments(real):
    from cpattn.serving.llama import MixedStepBackend

    model = real["model"]
    cache = model.new_cache(16, chunk_size=C)
    with pytest.raises(ValueError, match="graph: expected False or 'auto'"):
        MixedStepBackend(model, cache, graph=True)
    with pytest.raises(TypeError, match="graph: expected True, False or 'auto', got 1"):
        MixedStepBackend(model, cache, graph=1)
    with pytest.raises(ValueError, match="alpha"):
        MixedStepBackend(model, cache, alpha=2.0)
    with pytest.raises(ValueError, match="row_floor: expected None with recall=None"):
        MixedStepBackend(model, cache, row_floor=0.9)
    with pytest.raises(TypeError, match="row_floor: expected None or a number in \\[0, 1\\], got True"):
        MixedStepBackend(model, cache, recall=0.9, row_floor=True)
    backend = MixedStepBackend(model, cache)
    with pytest.raises(ValueError, match="step_tokens: expected an integer"):
        Server(model, 16, chunk_size=C, backend=backend)
    with pytest.raises(ValueError, match="chunk_size: expected the backend cache's chunk size 16, got 32"):
        Server(model, 16, chunk_size=32, prefill_chunk=64, backend=backend, step_tokens=64)


# ---------------------------------------------------------------------------- requests submitted while it runs
TINY = TinyLM(ModelConfig(vocab_size=64, num_layers=2, hidden=32, num_q_heads=4, num_kv_heads=2, head_dim=16,
                          mlp_hidden=64, locality=16.0), seed=0)


def test_poll_submits_requests_during_the_run_and_idles_between_them():
    """``run(poll=...)``: requests submitted at the start of later steps (and after idle turns,
    with nothing live) are served exactly as when all are submitted up front."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, int(rng.integers(5, 40))).tolist() for _ in range(6)]
    at = [0, 0, 2, 30, 31, 60]  # in poll calls: gaps long enough that the server goes idle

    def server():
        return Server(TINY, 64, chunk_size=8, prefill_chunk=16, measure_recall=False, step_tokens=24)

    up_front = server()
    ref = [up_front.submit(p, 5) for p in prompts]
    up_front.run()
    s, calls, got = server(), [0], []

    def poll(srv):
        assert srv is s
        while len(got) < len(prompts) and at[len(got)] <= calls[0]:
            got.append(srv.submit(prompts[len(got)], 5))
        calls[0] += 1
        return len(got) < len(prompts)

    rep = s.run(poll=poll)
    assert [r.output for r in got] == [r.output for r in ref] and rep.requests == len(prompts)
    assert calls[0] > at[-1] and s.step < calls[0]  # idle turns polled again without a step
    assert all(r.state == "finished" for r in got)
    with pytest.raises(TypeError, match="poll: expected None or a callable"):
        s.run(poll=3)
    with pytest.raises(ValueError, match="poll: expected None without step_tokens"):
        Server(TINY, 64, chunk_size=8, prefill_chunk=16, measure_recall=False).run(poll=lambda srv: False)


# ---------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def gpu_model(model_file):
    from cpattn.serving.gguf import GGUFFile
    from cpattn.serving.llama import LlamaModel

    import cupy

    f = GGUFFile(model_file)
    return LlamaModel(f.config(), f.tensor, dtype="float16", xp=cupy)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_graphed_mixed_steps_match_the_eager_mixed_path_and_lone_runs(real, gpu_model):
    """CuPy, float16: decode rows through GraphedDecoder's CUDA graph. Against the eager mixed
    path (graph=False: LlamaModel.decode) and lone CuPy runs, up to near-ties (cuBLAS rounds
    products to fp16, and the graph's RMSNorm sums in another order)."""
    qs = [0, 1, 2, 3, 4, 5, 0, 6, 7, 2, 1, 3]
    arrivals = poisson_arrivals(5, len(qs), 0.8)
    new = 24
    pool = life(real, new) + 2
    runs = {}
    for graph in (True, False):
        server, reqs, rep = serve(real, arrivals, qs, pool, budget=64, model=gpu_model, graph=graph, new=new)
        print(graph, rep)
        check_run(server, reqs, rep, 64)
        runs[graph] = reqs, rep, server.backend
    reqs, rep, backend = runs[True]
    assert rep.preemptions > 0
    assert 0 < backend.captures < rep.decode_steps  # captured when the plan changed, replayed otherwise
    flips = check_tokens(real, reqs, model=gpu_model)
    assert flips <= 2, flips
    same = sum(a.output == b.output for a, b in zip(runs[True][0], runs[False][0]))
    assert same >= len(qs) - 2, [(a.output, b.output) for a, b in zip(runs[True][0], runs[False][0])]
    check_tokens(real, runs[False][0], model=gpu_model)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_sparse_mixed_steps_run(real, gpu_model):
    server, reqs, rep = serve(real, [0, 0, 1, 2], [0, 1, 2, 3], 64, budget=64, model=gpu_model, alpha=0.5, sink=0,
                              window=1)
    check_run(server, reqs, rep, 64)
    assert rep.density and rep.density["group_union"] < 1.0
