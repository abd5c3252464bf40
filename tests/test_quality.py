"""cpattn.bench.quality: perplexity and needle retrieval of the real model, dense vs sparse prefill.

The pieces without the model (log-likelihoods, planting a needle, the summary) run everywhere;
the rest needs the fetched SmolLM2 file (``cpattn models fetch smollm2``) and the ``models``
extra, and skips saying so unless ``CPATTN_REQUIRE_MODEL=1`` (then it fails). Short texts only:
the whole file runs in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

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


def test_modes_describe_the_defaults():
    import inspect

    import cpattn

    sig = inspect.signature(cpattn.compact_prefill).parameters
    assert (Q.DEFAULT_ALPHA, Q.DEFAULT_SINK, Q.DEFAULT_WINDOW) == \
        (sig["alpha"].default, sig["sink"].default, sig["window"].default)
    assert Q.DENSE.describe().startswith("dense") and "whole chunk" in Q.SPARSE.describe()


# ============================================================================ with the real model
@pytest.fixture(scope="module")
def model_and_tokenizer():
    for module, extra in (("gguf", "models"), ("tokenizers", "models"), ("jinja2", "models")):
        try:
            __import__(module)
        except ImportError:
            if REQUIRED:
                raise
            pytest.skip(f"needs the {extra} extra: pip install 'cpattn[{extra}]'")
    from cpattn.serving import fetch
    from cpattn.serving.gguf import GGUFFile
    from cpattn.serving.llama import LlamaModel

    if not fetch.is_fetched("smollm2"):
        why = f"model file not fetched ({fetch.cached_path('smollm2')}); run `cpattn models fetch smollm2` first"
        if REQUIRED:
            pytest.fail(f"CPATTN_REQUIRE_MODEL=1: {why}")
        pytest.skip(why)
    f = GGUFFile(str(fetch.cached_path("smollm2")))
    return LlamaModel(f.config(), f.tensor, dtype="float16"), f.tokenizer()


@pytest.fixture(scope="module")
def ids(model_and_tokenizer):
    from cpattn.serving.generate import load_text

    return model_and_tokenizer[1].encode(load_text("python-docs", max_chars=4000))[:256]


def test_chunked_dense_perplexity_equals_one_chunk_and_sparse_acts(model_and_tokenizer, ids):
    model, _ = model_and_tokenizer
    one = Q.perplexity(model, ids, Q.DENSE, chunk_size=64, prefill_chunk=256)
    dense = Q.perplexity(model, ids, Q.DENSE, chunk_size=64, prefill_chunk=64)
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


def test_needle_found_by_dense_and_default_sparse(model_and_tokenizer):
    from cpattn.serving.generate import load_text

    model, tok = model_and_tokenizer
    text = load_text("python-docs", max_chars=20_000)
    rows = Q.needle_set(model, tok, text, 200, [0.5], [Q.DENSE, Q.SPARSE], chunk_size=64, prefill_chunk=128,
                        seed=1, offset_chars=5000, max_new_tokens=12)
    assert [r["mode"] for r in rows] == ["dense", "sparse"]
    assert rows[0]["passphrase"] == rows[1]["passphrase"]
    assert all(r["hit"] for r in rows), [r["answer"] for r in rows]
    assert rows[0]["answer"] == rows[1]["answer"]
    assert rows[1]["group_union_mean"] is not None and 0 < rows[1]["group_union_mean"] <= 1
