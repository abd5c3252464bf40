"""cpattn.bench.quality: perplexity and needle retrieval of the real model, dense vs sparse prefill;
the model's attention options (``CacheAttention``: the alpha rule or the recall-target rule).

The pieces without the model (log-likelihoods, planting a needle, the summary, the attention
options, a small random-weight Llama through the recall rule) run everywhere;
the rest needs the fetched SmolLM2 file (``cpattn models fetch smollm2``) and the ``models``
extra, and skips saying so unless ``CPATTN_REQUIRE_MODEL=1`` (then it fails). Short texts only:
the whole file runs in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import math
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cpattn.testing.models as testing_models

from cpattn.bench import quality as Q

REQUIRED = os.environ.get("CPATTN_REQUIRE_MODEL") == "1"


# ============================================================================ without the model
def test_log_likelihoods_match_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 11)).astype(np.float32) * 4
    targets = rng.integers(0, 11, size=5)
    got = Q.log_likelihoods(logits, targets)
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.log(p[np.arange(5), targets]), rtol=1e-10, atol=1e-10)
    assert (got <= 0).all()
    # a huge logit does not overflow
    big = np.array([[1e4, 0.0, -1e4]], np.float32)
    np.testing.assert_allclose(Q.log_likelihoods(big, np.array([0])), [0.0], atol=1e-12)


def test_plant_puts_the_fact_at_its_depth_on_its_own_line():
    hay = "\n".join(f"line {i} of the haystack" for i in range(100))
    for depth in (0.1, 0.5, 0.9):
        doc = Q.plant(hay, depth, "FACT")
        at = doc.index("\n\nFACT\n")
        assert abs(at / len(hay) - depth) < 0.03
        assert doc.replace("\n\nFACT\n", "") == hay
    assert Q.plant("no line breaks", 0.5, "FACT").endswith("\n\nFACT\n")


def test_passphrase_is_two_distinct_words_and_seeded():
    a = [Q.passphrase(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    w = a[0].split()
    assert len(w) == 2 and w[0] != w[1] and set(w) <= set(Q.NEEDLE_WORDS)


def test_needle_summary_and_same_as_dense():
    rows = [dict(length=100, depth=d, mode=m, hit=h) for d, m, h in
            [(0.1, "dense", True), (0.1, "sparse", True), (0.5, "dense", False), (0.5, "sparse", False)]]
    s = Q.needle_summary(rows, [Q.DENSE, Q.SPARSE])
    assert s == {100: {"dense": 1, "sparse": 1, "trials": 2}}
    assert Q.same_as_dense(rows, "sparse")
    rows[3]["hit"] = True  # sparse finds one that dense misses: still not "exactly as often"
    assert not Q.same_as_dense(rows, "sparse")


def test_trials_count_apart_and_compare_to_their_own_dense_trial():
    rows = [dict(length=100, depth=0.5, trial=t, mode=m, hit=h) for t, m, h in
            [(0, "dense", True), (0, "sparse", True), (1, "dense", False), (1, "sparse", True)]]
    assert Q.needle_summary(rows, [Q.DENSE, Q.SPARSE]) == {100: {"dense": 1, "sparse": 2, "trials": 2}}
    assert not Q.same_as_dense(rows, "sparse")  # trial 1: sparse hits where dense missed
    rows[3]["hit"] = False
    assert Q.same_as_dense(rows, "sparse")


def test_section_with_trials_and_a_gpu_device():
    """Several trials per depth: the per-depth cells count hits over the trials; the title names the device."""
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "bench", "quality_cpu.json")) as fh:
        res = json.load(fh)
    rows = res["needles"]["rows"]
    res["needles"]["rows"] = [dict(r, trial=t, hit=r["hit"] or t == 1) for t in (0, 1) for r in rows]
    modes = [Q.Mode(m, 0.0) for m in res["modes"] if any(r["mode"] == m for r in rows)]
    res["needles"]["summary"] = Q.needle_summary(res["needles"]["rows"], modes)
    res["config"].update(trials=2, needle_offset_chars=100000)
    res["device"] = "NVIDIA H200 (CuPy backend)"
    md = Q.markdown(res)
    assert md.startswith("## Quality of sparse prefill on real text (NVIDIA H200, CuPy backend)")
    assert "2 trials per depth" in md
    dense_miss = next(r for r in rows if r["mode"] == "dense" and not r["hit"])
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {dense_miss['length']} | {dense_miss['depth']:.0%} |"))
    assert line.split("|")[3].strip().startswith("1/2"), line  # trial 0 missed, trial 1 hit


def test_modes_describe_the_defaults():
    import inspect

    import cpattn

    sig = inspect.signature(cpattn.compact_prefill).parameters
    assert (Q.DEFAULT_ALPHA, Q.DEFAULT_SINK, Q.DEFAULT_WINDOW) == \
        (sig["alpha"].default, sig["sink"].default, sig["window"].default)
    assert Q.DENSE.describe().startswith("dense") and "whole chunk" in Q.SPARSE.describe()


def test_recall_mode_describes_and_passes_the_rule():
    assert Q.RECALL.recall == Q.DEFAULT_RECALL and Q.RECALL.summary == "sampled"
    assert "recall rule (target 0.99" in Q.RECALL.describe() and "2 rows" in Q.RECALL.describe()
    assert Q.RECALL.attention_options() == dict(sink=2, window=4, q_tile=None, group_size=None, recall=0.99,
                                                summary="sampled", sample_rows=2)
    assert "alpha" not in Q.RECALL.attention_options() and "recall" not in Q.SPARSE.attention_options()
    assert Q.recall_mode(0.95, q_tile=128).name == "recall0.95_qtile128"
    per_head = Q.recall_mode(0.99, group_size=1)
    assert per_head.name == "recall0.99_g1" and "tables per 1 query head" in per_head.describe()
    assert per_head.attention_options()["group_size"] == 1
    args = Q.parse(["--recall", "0.99", "0.995", "--recall-group-size", "group", "1"])
    assert args.recall_group_size == [None, 1]
    assert args.recall_row_floor == [None]  # the floor is off unless asked for
    floored = Q.recall_mode(0.99, group_size=1, row_floor=0.9)
    assert floored.name == "recall0.99_g1_floor0.9" and "row floor 0.9" in floored.describe()
    assert floored.attention_options()["row_floor"] == 0.9 and Q.RECALL.row_floor is None
    args = Q.parse(["--recall-row-floor", "none", "0.9"])
    assert args.recall_row_floor == [None, 0.9]


# ============================================================================ CacheAttention's options
def small_cache(chunk=16, layers=2, hkv=2, d=16):
    from cpattn.reference.chunk_cache import ChunkCache

    return ChunkCache(layers, hkv, d, 32, chunk_size=chunk, dtype="float16", max_sequences=4)


def test_cache_attention_rule_options():
    from cpattn.serving.llama import CacheAttention

    cache = small_cache()
    a = CacheAttention(cache, 4)
    assert (a.alpha, a.recall, a.summary) == (0.0, None, "mean")  # dense by default, as before
    r = CacheAttention(cache, 4, recall=0.99)
    assert (r.alpha, r.recall, r.summary, r.sample_rows) == (None, 0.99, "sampled", 2)  # 'auto' resolved
    r = CacheAttention(cache, 4, alpha=None, recall=np.float32(0.5), summary="mean", sample_rows=3)
    assert (r.alpha, r.recall, r.summary, r.sample_rows) == (None, 0.5, "mean", 3)
    assert CacheAttention(cache, 4, recall=1).recall == 1.0
    assert CacheAttention(cache, 4, recall=0.99).row_floor is None  # off by default: the rule as before
    assert "row_floor" not in CacheAttention(cache, 4, recall=0.99)._rule
    f = CacheAttention(cache, 4, recall=0.99, row_floor=0.9)
    assert f.row_floor == 0.9 and f._rule["row_floor"] == 0.9
    bad = [  # (options, error type, the argument the message must name)
        (dict(recall=0.99, alpha=0.06), ValueError, "alpha"),  # one rule at a time
        (dict(recall=True), TypeError, "recall"), (dict(recall="0.9"), TypeError, "recall"),
        (dict(recall=1.5), ValueError, "recall"), (dict(recall=float("nan")), ValueError, "recall"),
        (dict(recall=-0.1), ValueError, "recall"),
        (dict(summary="sampled"), ValueError, "summary"), (dict(summary="mean"), ValueError, "summary"),
        (dict(sample_rows=4), ValueError, "sample_rows"),  # recall-rule options without the rule
        (dict(recall=0.9, summary="max"), ValueError, "summary"), (dict(recall=0.9, summary=1), TypeError, "summary"),
        (dict(recall=0.9, sample_rows=0), ValueError, "sample_rows"),
        (dict(recall=0.9, sample_rows=True), TypeError, "sample_rows"),
        (dict(recall=0.9, sample_rows=2.0), TypeError, "sample_rows"),
        (dict(alpha=None), TypeError, "alpha"), (dict(alpha=1.5), ValueError, "alpha"),
        (dict(sink=-1), ValueError, "sink"), (dict(window=True), TypeError, "window"),
        (dict(group_size=3), ValueError, "group_size"), (dict(group_size=0), ValueError, "group_size"),
        (dict(group_size=True), TypeError, "group_size"), (dict(group_size=1.0), TypeError, "group_size"),
        (dict(row_floor=0.9), ValueError, "row_floor"),  # a floor of the recall rule only
        (dict(recall=0.9, summary="mean", row_floor=0.9), ValueError, "row_floor"),  # on the sampled rows
        (dict(recall=0.9, row_floor=True), TypeError, "row_floor"), (dict(row_floor=True), TypeError, "row_floor"),
        (dict(recall=0.9, row_floor="0.9"), TypeError, "row_floor"),
        (dict(recall=0.9, row_floor=1.5), ValueError, "row_floor"),
        (dict(recall=0.9, row_floor=float("nan")), ValueError, "row_floor"),
    ]
    for options, err, name in bad:
        with pytest.raises(err, match=name):
            CacheAttention(cache, 4, **options)


def test_generator_takes_the_recall_rule():
    from types import SimpleNamespace

    from cpattn.serving.generate import Generator

    model = SimpleNamespace(xp=np, config=SimpleNamespace(num_q_heads=4), new_cache=lambda n, **kw: small_cache())
    g = Generator(model, None, chunk_size=16, prefill_chunk=32, recall=0.95, sample_rows=3)
    attn = g.new_session(64)
    assert (attn.recall, attn.summary, attn.sample_rows, attn.alpha) == (0.95, "sampled", 3, None)
    attn = Generator(model, None, chunk_size=16, prefill_chunk=32, alpha=0.1).new_session(64)
    assert (attn.recall, attn.alpha) == (None, 0.1)
    attn = Generator(model, None, chunk_size=16, prefill_chunk=32, recall=0.95, row_floor=0.9).new_session(64)
    assert attn.row_floor == 0.9
    for options, err, name in ((dict(recall=0.9, alpha=0.1), ValueError, "alpha"),
                               (dict(summary="sampled"), ValueError, "summary"),
                               (dict(recall=2.0), ValueError, "recall"),
                               (dict(row_floor=0.9), ValueError, "row_floor")):
        with pytest.raises(err, match=name):  # at construction, not at the first prefill
            Generator(model, None, chunk_size=16, prefill_chunk=32, **options)


def random_llama(seed):
    return testing_models.random_llama(seed, context_length=1024)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), blocks=st.integers(5, 9), target=st.floats(0.3, 0.97))
def test_recall_rule_runs_through_the_model(seed, blocks, target):
    """The model's prefill under the recall rule, chunk by chunk: recall 1 reads every block
    (logits equal dense's exactly); recall 0 reads only the forced sink and window blocks (the
    recorded density says so, which alpha would not); a target between records one density per
    layer and chunk, equal over the three stages (one choice per table), and stays close to dense."""
    from cpattn.serving.llama import CacheAttention

    c = 16
    model = random_llama(seed % 1000)
    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, size=blocks * c).tolist()

    def run(**options):
        attn = CacheAttention(model.new_cache(blocks + 2, chunk_size=c, max_sequences=2), 4, sink=1, window=1,
                              **options)
        seq = attn.cache.add_sequence([])
        logits = np.concatenate([model.prefill(attn, seq, tokens[a:a + c], chunk_tokens=c, logits="all")
                                 for a in range(0, len(tokens), c)])
        return logits, attn.densities

    dense, dd = run()
    full, fd = run(recall=1.0)
    np.testing.assert_array_equal(full, dense)
    assert [d["select"] for _, d in fd] == [1.0] * len(fd) == [d["select"] for _, d in dd]
    _, zd = run(recall=0.0)
    assert len(zd) == model.config.num_layers * (blocks - 1)  # every chunk after the first, every layer
    want = [min(pb, 2) / pb for pb in range(1, blocks) for _ in range(model.config.num_layers)]
    np.testing.assert_allclose([d["select"] for _, d in zd], want, rtol=0, atol=1e-12)
    mid, md = run(recall=target)
    for _, d in md:
        assert d["select"] == d["q_union"] == d["group_union"]
        assert 0.0 < d["select"] <= 1.0
    # per-head tables (group_size 1): recall 1 still reads everything, a target one choice per head
    full1, _ = run(recall=1.0, group_size=1)
    np.testing.assert_array_equal(full1, dense)
    head, hd = run(recall=target, group_size=1)
    assert np.isfinite(head).all() and len(hd) == len(md)
    # the per-row floor: never fewer blocks than the pooled target alone, 1 reads everything.
    # Only layer 0 sees the same queries and keys in both runs (a later layer's inputs depend on
    # the blocks the layers below it read), so the comparison holds there.
    floored, fl = run(recall=target, row_floor=0.9)
    assert np.isfinite(floored).all() and len(fl) == len(md)
    assert [layer for layer, _ in fl] == [layer for layer, _ in md]
    assert all(f["group_union"] >= d["group_union"] for (layer, f), (_, d) in zip(fl, md) if layer == 0)
    np.testing.assert_array_equal(run(recall=target, row_floor=1.0)[0], dense)
    for _, d in hd:
        assert d["select"] == d["q_union"] == d["group_union"] and 0.0 < d["select"] <= 1.0
    np.testing.assert_array_equal(head[:c], dense[:c])
    assert np.isfinite(mid).all()
    # the first chunk has no past: identical to dense whatever the rule
    np.testing.assert_array_equal(mid[:c], dense[:c])


# ============================================================================ with the real model
@pytest.fixture(scope="module")
def model_and_tokenizer(request):
    for module, extra in (("gguf", "models"), ("tokenizers", "models"), ("jinja2", "models")):
        try:
            __import__(module)
        except ImportError:
            if REQUIRED:
                raise
            pytest.skip(f"needs the {extra} extra: pip install 'cpattn[{extra}]'")
    from cpattn.serving.gguf import GGUFFile
    from cpattn.serving.llama import LlamaModel

    f = GGUFFile(request.getfixturevalue("model_file"))  # after the extras: their skip message comes first
    return LlamaModel(f.config(), f.tensor, dtype="float16"), f.tokenizer()


@pytest.fixture(scope="module")
def ids(model_and_tokenizer):
    from cpattn.serving.generate import load_text

    return model_and_tokenizer[1].encode(load_text("python-docs", max_chars=4000))[:256]


@pytest.fixture(scope="module")
def dense64(model_and_tokenizer, ids):
    """Dense perplexity of ``ids`` prefilled in chunks of 64 (shared by the tests below)."""
    return Q.perplexity(model_and_tokenizer[0], ids, Q.DENSE, chunk_size=64, prefill_chunk=64)


def test_chunked_dense_perplexity_equals_one_chunk_and_sparse_acts(model_and_tokenizer, ids, dense64):
    model, _ = model_and_tokenizer
    one = Q.perplexity(model, ids, Q.DENSE, chunk_size=64, prefill_chunk=256)
    dense = dense64
    assert one["scored"] == dense["scored"] == len(ids) - 1
    assert 1.0 < dense["ppl"] < 100.0  # a real model on real text, not noise (vocab 49152)
    # chunking the dense prefill changes nothing but the rounding order
    np.testing.assert_allclose(dense["token_ll"], one["token_ll"], atol=0.05)
    assert abs(dense["nll"] - one["nll"]) < 2e-3
    assert one["density"]["select_mean"] is None  # one chunk: never a past to select on
    assert dense["density"]["group_union"] == [1.0] * model.config.num_layers
    # an aggressive selection (one sink, one window block, per query block) drops past blocks
    tight = Q.Mode("tight", 0.3, q_tile=64, sink=1, window=1)
    sparse = Q.perplexity(model, ids, tight, chunk_size=64, prefill_chunk=64)
    d = sparse["density"]
    assert len(d["select"]) == model.config.num_layers
    assert all(0.0 < v <= 1.0 for k in ("select", "q_union", "group_union") for v in d[k])
    assert d["select_mean"] < 1.0 and d["select_mean"] <= d["q_union_mean"] <= d["group_union_mean"]
    assert math.isfinite(sparse["ppl"]) and abs(sparse["nll"] - dense["nll"]) < 0.5
    # the first chunk has no past: its tokens score as dense's do (up to the tiling's rounding)
    np.testing.assert_allclose(sparse["token_ll"][:63], dense["token_ll"][:63], atol=0.05)


def test_recall_rule_through_the_real_model(model_and_tokenizer, ids, dense64):
    """The recall-target rule through the real model's attention (``CacheAttention(recall=...)``),
    chunks of 64 with one sink and one window block so that the rule has blocks to drop:
    recall 1 scores every token exactly as dense; recall 0.9 drops blocks in some layer, with one
    choice per table (the three stage densities equal) and a perplexity near dense's."""
    model, dense = model_and_tokenizer[0], dense64
    full = Q.perplexity(model, ids, Q.Mode("r1", 0.0, sink=1, window=1, recall=1.0), chunk_size=64, prefill_chunk=64)
    np.testing.assert_array_equal(full["token_ll"], dense["token_ll"])
    assert full["density"]["select_mean"] == 1.0
    r = Q.perplexity(model, ids, Q.Mode("r09", 0.0, sink=1, window=1, recall=0.9), chunk_size=64, prefill_chunk=64)
    d = r["density"]
    assert d["select"] == d["q_union"] == d["group_union"]
    assert all(0.0 < v <= 1.0 for v in d["select"]) and min(d["select"]) < 1.0
    assert math.isfinite(r["ppl"]) and abs(r["nll"] - dense["nll"]) < 0.1
    np.testing.assert_array_equal(r["token_ll"][:64], dense["token_ll"][:64])


def test_needle_found_by_dense_and_default_sparse(model_and_tokenizer):
    from cpattn.serving.generate import load_text

    model, tok = model_and_tokenizer
    text = load_text("python-docs", max_chars=20_000)
    rows = Q.needle_set(model, tok, text, 200, [0.5], [Q.DENSE, Q.SPARSE, Q.RECALL], chunk_size=64,
                        prefill_chunk=128, seed=1, offset_chars=5000, max_new_tokens=12)
    assert [r["mode"] for r in rows] == ["dense", "sparse", "recall0.99"]
    assert rows[0]["passphrase"] == rows[1]["passphrase"] == rows[2]["passphrase"]
    assert all(r["hit"] for r in rows), [r["answer"] for r in rows]
    assert rows[0]["answer"] == rows[1]["answer"] == rows[2]["answer"]
    assert all(r["group_union_mean"] is not None and 0 < r["group_union_mean"] <= 1 for r in rows[1:])


def test_published_section_is_the_tools_output(tmp_path):
    """bench/quality_cpu.md is what ``--replot`` writes from bench/quality_cpu.json, and the
    BENCHMARKS.md section is that file."""
    root = os.path.join(os.path.dirname(__file__), "..")
    src = os.path.join(root, "bench", "quality_cpu.json")
    assert Q.main(["--replot", src, "--out", str(tmp_path)]) == 0
    md = (tmp_path / "quality_cpu.md").read_text()
    with open(os.path.join(root, "bench", "quality_cpu.md")) as fh:
        assert fh.read() == md
    with open(os.path.join(root, "BENCHMARKS.md")) as fh:
        assert md.rstrip("\n") + "\n" in fh.read()
    assert "recall0.99" in md and "Within 0.5% of dense perplexity" in md
