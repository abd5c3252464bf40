"""End to end: the server (cpattn.serving) and its example against a dense model.

A tiny model (2 layers, D=16, GQA 4/2) serves requests that share system prompts through one
chunk-tree cache: cached prefix chunks are reused, the rest is prefilled chunk by chunk with
CompactAttention, live requests decode together with ChunkAttention. The check is
``dense_generate``: the same model with no cache, no sharing and no sparsity, full causal
attention recomputed over the whole sequence at every step.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_script
from cpattn import gpu_available
from cpattn.examples.serving import main
from cpattn.serving import (ModelConfig, PrefillOptions, Server, TinyLM, check_against_dense, dense_generate,
                            footprint_chunks, system_prompt_workload)
from cpattn.reference.chunk_cache import CacheFullError

CFG = ModelConfig(vocab_size=64, num_layers=2, hidden=64, num_q_heads=4, num_kv_heads=2, head_dim=16,
                  mlp_hidden=128, locality=16.0)
C, PREFILL = 8, 16  # chunk size (= block size) and prefill chunk


def workload(seed, n, systems=2, system_len=120, max_new=6):
    return system_prompt_workload(seed, n, num_systems=systems, system_len=system_len, own_len=(3, 30),
                                  max_new_tokens=max_new, vocab=CFG.vocab_size)


def serve(work, alpha, pool=400, model=None, **options):
    model = model or TinyLM(CFG, seed=0)
    server = Server(model, pool, chunk_size=C, prefill_chunk=PREFILL, backend="numpy",
                    options=PrefillOptions(alpha=alpha, **options))
    reqs = [server.submit(p, m) for p, m in work]
    return server, reqs, server.run()


def test_alpha0_generates_the_dense_models_tokens():
    work = workload(1, 6)
    server, reqs, rep = serve(work, alpha=0.0)
    agree = check_against_dense(server.model, reqs, rep)
    for r, (p, m) in zip(reqs, work):
        assert r.output == dense_generate(server.model, p, m), f"request {r.rid}"
    assert agree["requests_equal"] == len(reqs) and agree["tokens"] == sum(m for _, m in work)
    # the shared system prompts were reused, not recomputed: every request after the first of
    # its system prompt skips the prompt's full chunks (the last token is always recomputed)
    assert rep.prefill_reused > 0 and rep.prefill_reused + rep.prefill_computed == rep.prompt_tokens
    assert all(r.reused % C == 0 and r.reused < len(r.prompt) for r in reqs)
    assert max(r.reused for r in reqs) >= 120 // C * C
    # alpha 0 reads every block: recall 1 up to float32 rounding, density 1
    assert all(rec[1] > 1 - 1e-4 for rec in rep.recall)
    assert rep.density["group_union"] == 1.0
    # one plan per step at most, reused by both layers (and by later steps while the tree holds)
    assert rep.decode_calls == rep.decode_steps * CFG.num_layers
    assert rep.plans_built <= rep.decode_steps
    # sharing stores fewer tokens than a flat cache would
    assert rep.peak["tokens_stored"] < rep.peak["tokens_flat"]
    assert not server.cache.sequences  # everything released


def test_default_alpha_recall_and_agreement(capsys):
    work = workload(2, 6, system_len=160)
    server, reqs, rep = serve(work, alpha=0.06)
    agree = check_against_dense(server.model, reqs, rep)
    with capsys.disabled():
        print(f"\n  default alpha: density {rep.density}, recall {rep.recall}, agreement {agree}")
    assert rep.density["group_union"] < 0.95  # blocks were actually skipped ...
    for mean, low in rep.recall:  # ... and the attention mass they held was small
        assert mean > 0.99 and low > 0.5
    assert agree["tokens_equal"] >= 0.8 * agree["tokens"]
    assert rep.prefill_reused > 0


def test_the_check_can_fail():
    """The dense comparison detects attention that reads too little, and the model's tokens
    depend on tokens far back in the prompt (so a wrong reused prefix would show)."""
    work = workload(1, 6)
    server, reqs, rep = serve(work, alpha=1.0, sink=0, window=0)  # only each row's best block
    agree = check_against_dense(server.model, reqs, rep)
    assert agree["requests_equal"] < len(reqs)
    model, changed = server.model, 0
    for p, m in work:
        far = list(p)
        far[3] = (far[3] + 1) % CFG.vocab_size
        changed += dense_generate(model, p, m) != dense_generate(model, far, m)
    assert changed > 0


def test_second_wave_reuses_released_prefixes():
    work = workload(3, 8)
    model = TinyLM(CFG, seed=0)
    server = Server(model, 400, chunk_size=C, prefill_chunk=PREFILL, options=PrefillOptions(alpha=0.0))
    first = [server.submit(p, m) for p, m in work[:4]]
    rep1 = server.run()
    assert not server.cache.sequences and server.cache.num_cached > 0  # released, still cached
    second = [server.submit(p, m) for p, m in work[4:]] + [server.submit(*work[0])]  # and one repeat
    rep2 = server.run()
    assert rep2.prefill_reused > 0 and rep2.requests == len(second)
    # the second wave's first request of each system prompt reuses it from the prefix cache
    assert all(r.reused >= 120 // C * C for r in second)
    # a repeated prompt reuses every full chunk but the one holding its last token
    assert second[-1].reused == (len(work[0][0]) - 1) // C * C and second[-1].output == first[0].output
    assert rep2.prefill_computed < rep1.prefill_computed
    agree = check_against_dense(model, first + second)
    assert agree["requests_equal"] == len(first) + len(second)


def test_small_pool_evicts_lru_and_outputs_stay_exact():
    # three waves over six system prompts: each wave's prompts push out the last wave's
    work = workload(4, 12, systems=6, system_len=80)
    need = max(footprint_chunks(work[i:i + 4], C) for i in (0, 4, 8))
    model = TinyLM(CFG, seed=0)
    server = Server(model, need + 2, chunk_size=C, prefill_chunk=PREFILL, options=PrefillOptions(alpha=0.0))
    reqs, evicted = [], 0
    for w in range(3):
        reqs += [server.submit(p, m) for p, m in work[4 * w:4 * w + 4]]
        rep = server.run()
        evicted += rep.evictions
        assert server.cache.num_free + server.cache.num_cached == server.cache.num_chunks
    assert evicted > 0
    assert check_against_dense(model, reqs)["requests_equal"] == len(reqs)


def test_requests_wait_for_room_and_a_too_small_pool_raises():
    work = workload(5, 6, systems=1)
    one = max(-(-(len(p) + m) // C) for p, m in work)
    model = TinyLM(CFG, seed=0)
    # room for about one request at a time: the others queue, results stay exact
    server = Server(model, one + 1, chunk_size=C, prefill_chunk=PREFILL, options=PrefillOptions(alpha=0.0))
    reqs = [server.submit(p, m) for p, m in work]
    rep = server.run()
    assert rep.peak["sequences"] < len(reqs)
    assert check_against_dense(model, reqs)["requests_equal"] == len(reqs)
    tiny = Server(model, 3, chunk_size=C, prefill_chunk=PREFILL)
    tiny.submit(*work[0])
    with pytest.raises(CacheFullError, match="pool"):
        tiny.run()


def test_arrivals_join_a_running_batch():
    """Continuous batching: a request arriving mid-decode joins the batch; results stay exact."""
    work = workload(6, 4, max_new=8)
    model = TinyLM(CFG, seed=0)
    server = Server(model, 400, chunk_size=C, prefill_chunk=PREFILL, options=PrefillOptions(alpha=0.0))
    reqs = [server.submit(p, m, arrival=3 * i) for i, (p, m) in enumerate(work)]
    rep = server.run()
    assert rep.decode_steps < sum(m for _, m in work)  # batches of more than one
    assert check_against_dense(model, reqs)["requests_equal"] == len(reqs)


def test_on_step_hook_sees_every_timed_step_and_the_report_keeps_them():
    """The server's public hook (what ``cpattn bench serving`` uses instead of subclassing)."""
    work = workload(6, 4, max_new=5)
    seen = []
    model = TinyLM(CFG, seed=0)
    server = Server(model, 400, chunk_size=C, prefill_chunk=PREFILL, options=PrefillOptions(alpha=0.0),
                    on_step=lambda kind, seconds, reqs: seen.append((kind, seconds, [r.rid for r in reqs])))
    reqs = [server.submit(p, m, arrival=i) for i, (p, m) in enumerate(work)]
    rep = server.run()
    prefills = [s for s in seen if s[0] == "prefill"]
    decodes = [s for s in seen if s[0] == "decode"]
    assert [s[2] for s in prefills] == [[r.rid] for r in reqs]  # one per request, in admission order
    assert len(decodes) == rep.decode_steps == len(rep.decode_step_s) == len(rep.decode_step_batch)
    assert [s[1] for s in decodes] == rep.decode_step_s and [s[1] for s in prefills] == rep.prefill_request_s
    assert [len(s[2]) for s in decodes] == rep.decode_step_batch and sum(rep.decode_step_batch) == rep.decode_tokens
    assert rep.decode_s == pytest.approx(sum(rep.decode_step_s)) and all(t > 0 for _, t, _ in seen)
    assert max(rep.decode_step_batch) > 1  # arrivals joined a running batch
    assert sum(m for _, m in work) == sum(len(r.output) for r in reqs)


def test_backends_and_caches_implement_the_protocols():
    from cpattn.bench.flat_cache import FlatKVCache, TorchSdpaBackend
    from cpattn.reference.chunk_cache import ChunkCache
    from cpattn.serving import AttentionBackend, ChunkTreeBackend, ServingCache, make_backend

    from cpattn.serving import ServingModel

    assert isinstance(TinyLM(CFG, seed=0), ServingModel)
    backend = make_backend("numpy", CFG, 64, C)
    assert isinstance(backend, ChunkTreeBackend) and isinstance(backend, AttentionBackend)
    assert isinstance(backend.cache, ChunkCache) and isinstance(backend.cache, ServingCache)
    assert backend.label == "NumPy reference" and backend.name == "numpy"
    pytest.importorskip("torch")
    flat = FlatKVCache(1, 2, 16, num_slots=2, max_len=32, chunk_size=8, device="cpu")
    assert isinstance(flat, ServingCache) and flat.cached_nodes() == []
    assert isinstance(TorchSdpaBackend(flat, np, 4), AttentionBackend)


def test_module_entry_point_prints_the_report(capsys):
    assert main(["--backend", "numpy", "--requests", "3", "--waves", "2", "--system-len", "40",
                 "--own-len", "4", "12", "--new-tokens", "3", "--hidden", "32", "--head-dim", "16",
                 "--vocab", "32"]) == 0
    out = capsys.readouterr().out
    for needle in ("wave 2:", "reused from the cache", "tokens stored vs", "prefill density",
                   "vs dense model", "tok/s"):
        assert needle in out
    assert "requests identical" in out


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_backend_matches_dense_and_the_reference():
    """CUDA kernels (GpuChunkCache, ChunkAttentionDecode, cpattn.compact_attention) in the same pipeline."""
    import cupy

    cfg = ModelConfig(vocab_size=128, num_layers=2, hidden=128, num_q_heads=8, num_kv_heads=2, head_dim=64,
                      mlp_hidden=256, locality=24.0)
    work = system_prompt_workload(7, 16, num_systems=2, system_len=400, own_len=(5, 90), max_new_tokens=8,
                                  vocab=cfg.vocab_size)
    reports = {}
    for backend, xp, alpha in (("cupy", cupy, 0.0), ("cupy", cupy, 0.06), ("numpy", np, 0.06)):
        model = TinyLM(cfg, seed=0, xp=xp)
        server = Server(model, 600, chunk_size=16, prefill_chunk=64, backend=backend,
                        options=PrefillOptions(alpha=alpha))
        reqs = [server.submit(p, m) for p, m in work]
        rep = server.run()
        agree = check_against_dense(model, reqs, rep)
        reports[backend, alpha] = rep
        print(backend, alpha, rep)
        if alpha == 0.0:
            assert agree["requests_equal"] == len(reqs)
        assert rep.prefill_reused > 0
    gpu, ref = reports["cupy", 0.06], reports["numpy", 0.06]
    for (m_gpu, _), (m_ref, _) in zip(gpu.recall, ref.recall):
        assert m_gpu > 0.99 and abs(m_gpu - m_ref) < 0.01
    assert abs(gpu.density["group_union"] - ref.density["group_union"]) < 0.02


def test_cli_demo_runs_the_decode_check_then_the_serving_flow(capsys):
    from cpattn.cli import main as cli_main

    args = ["demo", "--backend", "numpy", "--requests", "6", "--serving-requests", "3", "--system-len", "48",
            "--check-requests", "1"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    decode_ok, serving_ok = out.index("OK: decode of all 6 sequences"), out.index("prompt tokens reused, > 0 expected")
    assert decode_ok < out.index("serving:") < serving_ok
    for needle in ("% saved); tokens", "pages =", "MiB flat", "sized for the shared tree", "median of 5",
                   "the first call took", "% of prefill skipped", "tokens stored vs", "prefill density", "tok/s",
                   "(first 1 of 3 checked)", "lowest single query row"):
        assert needle in out
    # an impossible tolerance fails the demo (exit 1); an impossible recall bar is refused (exit 2)
    assert cli_main(args + ["--tolerance", "1e-9"]) == 1
    assert "FAILED: decode" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(args + ["--min-recall", "1.5"])
    assert e.value.code == 2
    assert cli_main(args[:-4] + ["--serving-requests", "0"]) == 0
    assert "serving:" not in capsys.readouterr().out


DOCS = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.skipif(not (DOCS / "make_figures.py").exists(), reason="docs/ not in this checkout")
def test_docs_figures_are_current_and_links_resolve():
    import re

    make_figures = load_script("docs/make_figures.py")
    pages = {p.name: p.read_text() for p in DOCS.glob("*.md")}
    for name in ("chunk_tree.md", "two_phase_decode.md", "serving_pipeline.md"):
        assert "<!-- figure: " in pages[name], f"{name} lost its figure"
    assert make_figures.stale_pages() == [], "run python docs/make_figures.py"
    for name, text in pages.items():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert (DOCS / target).exists(), f"{name}: broken link {target}"
