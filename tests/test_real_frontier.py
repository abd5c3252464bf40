"""Real-attention capture and frontier (cpattn/bench/real_frontier.py, tools/real_frontier.py) on
the real model (SmolLM2-135M-Instruct) over a few hundred tokens of Python's language reference.

Needs the model file (``cpattn models fetch smollm2``) and the ``models`` extra; without them the
tests skip and say why, and with ``CPATTN_REQUIRE_MODEL=1`` (CI) a missing model fails instead.

* the captured queries and keys are the model's post-RoPE activations of the right positions: layer
  0's are recomputed here from the weights (textbook RMSNorm, projection, adjacent-pair RoPE);
* the captured chunk is the prompt's last one, and its keys are every token of the prompt;
* the frontier's measurements on the capture keep their invariants (oracle bounds every selector
  at its density; the recall rule reaches its own estimate; more target, more recall).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

REQUIRED = os.environ.get("CPATTN_REQUIRE_MODEL") == "1"

for _mod in ("gguf", "tokenizers"):
    try:
        __import__(_mod)
    except ImportError:
        if REQUIRED:
            raise
        pytest.skip("needs the models extra: pip install 'cpattn[models]'", allow_module_level=True)

from cpattn.bench import real_frontier as rf  # noqa: E402
from cpattn.reference.dtypes import to_float32  # noqa: E402
from cpattn.serving import fetch as fetch_mod  # noqa: E402
from cpattn.serving.generate import load_text  # noqa: E402

TOKENS, CHUNK, BLOCK = 448, 128, 32
LAYERS = (0, 7, 29)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    path = fetch_mod.cached_path("smollm2")
    if not fetch_mod.is_fetched("smollm2"):
        why = f"model file not fetched ({path}); run `cpattn models fetch smollm2` first"
        if REQUIRED:
            pytest.fail(f"CPATTN_REQUIRE_MODEL=1: {why}")
        pytest.skip(why)
    from cpattn.serving.gguf import GGUFFile
    from cpattn.serving.llama import LlamaModel

    f = GGUFFile(str(path))
    return LlamaModel(f.config(), f.tensor, dtype="float16"), f.tokenizer()


@pytest.fixture(scope="module")
def ids(model_and_tokenizer):
    _, tok = model_and_tokenizer
    return tok.encode(load_text("python-docs", max_chars=20_000)[5_000:])[:TOKENS]


@pytest.fixture(scope="module")
def cap(model_and_tokenizer, ids):
    model, _ = model_and_tokenizer
    return rf.capture(model, ids, LAYERS, chunk=CHUNK, block=BLOCK, prefill_chunk=2 * BLOCK, text="python-docs")


def test_capture_shapes(cap, model_and_tokenizer):
    c = model_and_tokenizer[0].config
    assert cap.layers == list(LAYERS) and cap.past == TOKENS - CHUNK and cap.chunk == CHUNK
    assert cap.q.shape == (len(LAYERS), CHUNK, c.num_q_heads, c.head_dim)
    assert cap.k.shape == cap.v.shape == (len(LAYERS), TOKENS, c.num_kv_heads, c.head_dim)
    assert cap.q.dtype == np.float16
    for a in (cap.q, cap.k, cap.v):
        assert np.isfinite(a.astype(np.float32)).all() and np.abs(a.astype(np.float32)).max() > 0.1


def _rope(x, pos, inv_freq):
    ang = pos[:, None].astype(np.float64) * inv_freq[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = np.empty_like(x)
    a, b = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def test_layer0_is_the_models_post_rope_q_and_k(cap, model_and_tokenizer, ids):
    model, _ = model_and_tokenizer
    c, w = model.config, model.layers[0]
    x = np.asarray(model.embed[np.asarray(ids)], np.float64)
    h = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + c.rms_eps) * np.asarray(w["attn_norm"], np.float64)
    qkv = h @ np.asarray(w["qkv"], np.float64).T
    D, nq, nk = c.head_dim, c.num_q_heads * c.head_dim, c.num_kv_heads * c.head_dim
    pos = np.arange(len(ids))
    q = _rope(qkv[:, :nq].reshape(-1, c.num_q_heads, D), pos, c.inv_freq())
    k = _rope(qkv[:, nq:nq + nk].reshape(-1, c.num_kv_heads, D), pos, c.inv_freq())
    got_q, got_k = (to_float32(a, "float16").astype(np.float64) for a in (cap.q[0], cap.k[0]))
    P = cap.past
    # fp16 storage (rel 2^-11) and the model's float32 arithmetic
    np.testing.assert_allclose(got_q, q[P:], rtol=2e-3, atol=2e-3 * np.abs(q).max())
    np.testing.assert_allclose(got_k, k, rtol=2e-3, atol=2e-3 * np.abs(k).max())
    # a capture one position off would differ far beyond that
    assert np.abs(got_q - q[P - 1:-1]).max() > 0.05 * np.abs(q).max()
