"""Numerics at the edges: extreme logits, a very long sequence, a batch of one, one token.

Every output must be finite and within budget of the float64 oracle. Budgets:

* scores: a float32 dot product of D terms whose scaled sum is at most ``S`` in magnitude is
  off by about ``2^-23 sqrt(D) S`` (rounding errors of random sign; the worst case ``D`` instead
  of ``sqrt(D)`` would make the budget meaningless at D = 128), plus ``2^-23 S`` for scaling
  (a kernel's ``scale * log2(e)``). An error ``delta`` per score moves each softmax weight by at
  most ``exp(2 delta) - 1`` relative, so ``|o - oracle| <= 2 (exp(2 delta) - 1) vmax``;
* plus the rounding budget of the backend (``cpattn.testing.budgets``, which holds this score
  term too: ``budget(..., score_absmax=S, head_dim=D)``).

Test bodies take the ``backend`` fixture (NumPy, the emulated GPU cache, and CuPy under the
``gpu`` marker) and call the same names; the ``gpu`` variants add the kernels' head dims and
chunk sizes, and for the long sequence CompactAttention prefill at 128K tokens.
"""
from __future__ import annotations

import numpy as np
import pytest

from cpattn import gpu_available
from cpattn.arrays import to_host
from cpattn.reference import compact_attention as ca
from cpattn.reference.chunk_attention import oracle_decode
from cpattn.reference.dtypes import to_float32, to_storage, unit_roundoff
from cpattn.reference.workloads import TokenKV, long_context_qkv, random_queries
from cpattn.testing import assert_close_to_oracle, budget, get_backend, poisoned, v_absmax

DTYPES = ["float16", "bfloat16"]


def score_budget(q, k, scale, D, vmax, backend, dtype):
    """Budget for outputs whose scores are large (see the module docstring), plus the rest."""
    S = D * float(np.abs(to_float32(q, dtype)).max()) * float(np.abs(to_float32(k, dtype)).max()) * scale
    return budget("decode", dtype, vmax, backend=backend, score_absmax=S, head_dim=D)


def run_decode(backend, cache, ids, q, layer=0, split="auto"):
    """float32 [B, Hq, D] of the backend's decode (written into a NaN-poisoned buffer)."""
    dec = backend.api.ChunkAttentionDecode(cache, piece_chunks=split, private_piece_chunks=split)
    dec.plan(ids, q.shape[1])
    out = dec.run(backend.asarray(q), layer, out=poisoned(q.shape, cache.dtype, backend.xp))
    return to_float32(to_host(out), cache.dtype)


# ============================================================================ extreme logits
def check_extreme_logits(backend, dtype, D, C):
    """Scores of +-1e4: a shared prefix that one query loves (+1e4) and its negation hates
    (-1e4), private tails in between, and a pair of exactly tied best keys. The merge sees
    states whose lse differ by ~2e4."""
    Hkv, Hq = 1, 2
    rng = np.random.default_rng(1)
    u = np.sign(rng.standard_normal(D)).astype(np.float32)  # +-1 entries
    scale = 1.0 / np.sqrt(D)
    amp = np.sqrt(1e4 / (scale * D))  # q = amp u, k = amp u  ->  score = 1e4
    n_shared, n_own = 2 * C, C + 3
    # scores 1e4 - 3j on the prefix: a few logits apart, so several keys share the weight and
    # their O(1) differences come out of O(1e4) dot products; the own tail is in (-5e3, 5e3)
    s = np.concatenate([1.0 - 3e-4 * np.arange(n_shared), rng.uniform(-0.5, 0.5, n_own)]).astype(np.float32)
    keys = amp * s[:, None] * u[None, :] + 0.01 * rng.standard_normal((len(s), D)).astype(np.float32)
    keys[n_shared - 1] = keys[0]  # an exact tie with the best key
    vals = rng.standard_normal((len(s), D)).astype(np.float32)
    k = to_storage(keys, dtype)[None, :, None, :]  # [1 layer, n, Hkv, D]
    v = to_storage(vals, dtype)[None, :, None, :]
    cache = backend.make_cache(1, Hkv, D, 16, chunk_size=C, dtype=dtype)
    toks = list(range(n_shared + n_own))
    a = cache.add_sequence(toks, backend.asarray(k), backend.asarray(v))
    b = cache.add_sequence(toks[:n_shared] + [99] * n_own,  # shares the prefix, own tail
                           backend.asarray(k), backend.asarray(v))
    assert cache.seq_chunks(a)[:2] == cache.seq_chunks(b)[:2]
    qv = np.stack([amp * u, -amp * u])  # per sequence: loves / hates the prefix
    q = to_storage(np.repeat(qv[:, None, :], Hq, axis=1), dtype)  # [2, Hq, D]
    o = run_decode(backend, cache, [a, b], q)
    oracle, lse = oracle_decode(cache, [a, b], q)
    assert np.isfinite(o).all()
    assert np.abs(lse).max() > 5e3  # the scores really are extreme
    vmax = float(np.abs(to_float32(v, dtype)).max())
    err = float(np.abs(o - oracle).max())
    assert err <= score_budget(q, k, scale, D, vmax, backend, dtype), err


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(backend, dtype):
    check_extreme_logits(backend, dtype, D=max(16, backend.head_dim), C=max(16, backend.chunk_size))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("C", [16, 64])
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_extreme_logits_gpu(dtype, D, C):
    with get_backend("cupy") as backend:
        check_extreme_logits(backend, dtype, D=D, C=C)


# ============================================================================ one long sequence
def long_kv(seed, n, Hkv, D, dtype, sharpness=2.0):
    """Random K/V [1, n, Hkv, D] storage and a query scale that makes attention peaky."""
    rng = np.random.default_rng(seed)
    k = to_storage(rng.standard_normal((1, n, Hkv, D), np.float32), dtype)
    v = to_storage(rng.standard_normal((1, n, Hkv, D), np.float32), dtype)
    return k, v, sharpness


def oracle_one(k, v, q, dtype):
    """float64 decode of one sequence, one kv head at a time (bounded memory).
    k, v: [n, Hkv, D] storage; q: [Hq, D] storage. Returns [Hq, D] float64."""
    n, Hkv, D = k.shape
    Hq = q.shape[0]
    G = Hq // Hkv
    qf = to_float32(q, dtype).astype(np.float64)
    out = np.empty((Hq, D))
    for h in range(Hkv):
        kh = to_float32(np.ascontiguousarray(k[:, h]), dtype).astype(np.float64)
        vh = to_float32(np.ascontiguousarray(v[:, h]), dtype).astype(np.float64)
        s = qf[h * G:(h + 1) * G] @ kh.T / np.sqrt(D)  # [G, n]
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[h * G:(h + 1) * G] = (p @ vh) / p.sum(axis=1, keepdims=True)
    return out


def oracle_prefill(k, v, q, dtype):
    """float64 causal attention of the last m tokens of one sequence (bottom-right aligned),
    one query head at a time with its kv head made contiguous once (bounded memory at 128K).
    k, v: [n, Hkv, D] storage; q: [m, Hq, D] storage. Returns o [m, Hq, D], lse [m, Hq]."""
    n, Hkv, D = k.shape
    m, Hq, _ = q.shape
    G = Hq // Hkv
    qf = to_float32(q, dtype).astype(np.float64)
    o, lse = np.empty((m, Hq, D)), np.empty((m, Hq))
    hidden = np.arange(n)[None, :] > (n - m + np.arange(m))[:, None]  # [m, n] future keys
    for h in range(Hkv):
        kh = to_float32(np.ascontiguousarray(k[:, h]), dtype).astype(np.float64)
        vh = to_float32(np.ascontiguousarray(v[:, h]), dtype).astype(np.float64)
        for g in range(h * G, (h + 1) * G):
            s = qf[:, g] @ kh.T / np.sqrt(D)  # [m, n]
            s[hidden] = -np.inf
            mx = s.max(axis=1, keepdims=True)
            p = np.exp(s - mx)
            l = p.sum(axis=1, keepdims=True)
            o[:, g] = (p @ vh) / l
            lse[:, g] = (mx + np.log(l))[:, 0]
    return o, lse


def check_long_sequence(backend, n, Hkv, Hq, D, C, dtype, splits):
    k, v, sharp = long_kv(n, n, Hkv, D, dtype)
    q = random_queries(n + 1, 1, Hq, D, dtype, scale=sharp)
    cache = backend.make_cache(1, Hkv, D, -(-n // C) + 1, chunk_size=C, dtype=dtype)
    sid = cache.add_sequence(list(range(n)), backend.asarray(k), backend.asarray(v))
    oracle = oracle_one(k[0], v[0], q[0], dtype)
    vmax = float(np.abs(to_float32(v, dtype)).max())
    for split in splits:  # whole, and split into pieces merged back
        o = run_decode(backend, cache, [sid], q, split=split)
        assert_close_to_oracle(o[0], oracle, dtype, vmax, backend=backend, what=f"split {split}")
    return cache, sid, k, v


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_sequence_8k(backend, dtype):
    check_long_sequence(backend, 8192 + 1, Hkv=2, Hq=4, D=max(16, backend.head_dim), C=64, dtype=dtype,
                        splits=[None, 7])


def test_long_prefill_8k():
    """The last chunk of an 8K prompt (structured long-context Q/K/V): alpha 0 equals dense;
    the default selection is sparse, finite, and keeps most of the attention mass."""
    dtype, n_past, n, Hkv, Hq, D, C = "float16", 8192, 100, 2, 4, 16, 64
    w = long_context_qkv(3, n_past + n, Hq, Hkv, D, num_layers=1, dtype=dtype, num_sinks=2,
                         locality_len=2 * C, needle_len=C, num_needles=2, needle_queries=2)
    cache = get_backend("numpy").make_cache(1, Hkv, D, (n_past + n) // C + 2, chunk_size=C, dtype=dtype)
    sid = cache.add_sequence(list(range(n_past + n)), w.k, w.v)
    q = w.q[0, n_past:]
    means = ca.BlockMeans(cache)
    oracle, oracle_lse = ca.oracle_prefill(cache, sid, q)
    vmax = float(np.abs(to_float32(w.v, dtype)).max())
    dense = ca.dense_prefill(cache, means, sid, q)  # o in the storage dtype: one rounding
    assert dense.o.dtype == np.float16
    assert_close_to_oracle(dense.o, oracle, dtype, vmax, kind="prefill")
    sparse = ca.compact_prefill(cache, means, sid, q)
    assert np.isfinite(sparse.o).all() and np.isfinite(sparse.lse).all()
    recall = ca.mass_recall(sparse.lse, oracle_lse)
    assert sparse.density()["tables"] < 0.5 and (recall <= 1 + 1e-4).all() and recall.mean() > 0.9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_long_sequence_128k_gpu(dtype):
    """128K tokens, one sequence, Llama-like heads: decode (whole and auto-split), then the
    prompt's last chunk through CompactAttention with alpha 0 against the float64 oracle."""
    n, Hkv, Hq, D, C = 128 * 1024, 8, 32, 128, 64
    with get_backend("cupy") as backend:
        cache, sid, k, v = check_long_sequence(backend, n, Hkv, Hq, D, C, dtype, splits=["auto", None])
        # prefill view: the last 2 chunks are "the chunk", everything before is the past
        m = 2 * C
        q = random_queries(9, m, Hq, D, dtype, scale=2.0)
        api = backend.api
        r = api.compact_prefill(cache, api.BlockMeans(cache), sid, backend.asarray(q), alpha=0.0,
                                out=poisoned((m, Hq, D), dtype, backend.xp))
        oracle, oracle_lse = oracle_prefill(k[0], v[0], q, dtype)
        vmax = float(np.abs(to_float32(v, dtype)).max())
        assert_close_to_oracle(r.o, oracle, dtype, vmax, backend=backend, kind="prefill")
        assert_close_to_oracle(r.lse, oracle_lse, dtype, float(np.abs(oracle_lse).max()), backend=backend,
                               kind="lse", what="lse")


# ============================================================================ batch of one, one token
def check_batch_of_one(backend, D, C, dtype):
    """A batch of one whose chunks are shared with sequences outside the batch (so the plan has
    no shared segment), and a cache holding a single sequence."""
    Hkv, Hq = 2, 4
    kv = TokenKV(1, Hkv, D, dtype=dtype, seed=6, vocab=8, max_len=16 * C)
    cache = backend.make_cache(1, Hkv, D, 32, chunk_size=C, dtype=dtype)
    base = list(range(3 * C))
    ids = [cache.add_sequence(base + [t] * (t + 1), *map(backend.asarray, kv(base + [t] * (t + 1))))
           for t in range(3)]
    lone = backend.make_cache(1, Hkv, D, 8, chunk_size=C, dtype=dtype)
    only = lone.add_sequence(base[:C + 1], *map(backend.asarray, kv(base[:C + 1])))
    for c, sid in ((cache, ids[1]), (lone, only)):
        q = random_queries(sid + 3, 1, Hq, D, dtype)
        for split in (None, 1):
            o = run_decode(backend, c, [sid], q, split=split)
            oracle, _ = oracle_decode(c, [sid], q)
            assert_close_to_oracle(o, oracle, dtype, v_absmax(c), backend=backend)


def check_one_token(backend, D, C, dtype):
    """A sequence of one token attends to itself only: o is exactly its V (softmax of one
    score is 1), alone, forked, and in a batch with long sequences."""
    Hkv, Hq = 2, 4
    kv = TokenKV(1, Hkv, D, dtype=dtype, seed=8, vocab=8, max_len=16 * C)
    cache = backend.make_cache(1, Hkv, D, 32, chunk_size=C, dtype=dtype)
    one = cache.add_sequence([5], *map(backend.asarray, kv([5])))
    twin = cache.fork(one)
    long_ = cache.add_sequence(list(range(3 * C + 1)), *map(backend.asarray, kv(list(range(3 * C + 1)))))
    want = np.repeat(to_float32(kv([5])[1][0, 0], dtype), Hq // Hkv, axis=0)  # [Hq, D]
    for batch in ([one], [one, twin], [long_, one], [twin, long_, one]):
        q = random_queries(len(batch), len(batch), Hq, D, dtype, scale=3.0)
        for split in (None, 1):
            o = run_decode(backend, cache, batch, q, split=split)
            assert np.isfinite(o).all()
            for i, sid in enumerate(batch):
                if sid in (one, twin):  # the stored V, exactly (one rounding of an exact value)
                    assert o[i].tobytes() == want.tobytes(), (batch, split)
            oracle, _ = oracle_decode(cache, batch, q)
            assert_close_to_oracle(o, oracle, dtype, v_absmax(cache), backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_of_one(backend, dtype):
    check_batch_of_one(backend, backend.head_dim, backend.chunk_size, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_of_one_token(backend, dtype):
    check_one_token(backend, backend.head_dim, backend.chunk_size, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,C", [(64, 16), (128, 64), (128, 128)])
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_batch_of_one_and_one_token_gpu(dtype, D, C):
    with get_backend("cupy") as backend:
        check_batch_of_one(backend, D, C, dtype)
        check_one_token(backend, D, C, dtype)


@pytest.mark.parametrize("D", [16, 64, 128])
def test_score_budget_is_tight_enough_to_fail(D):
    """The extreme-logit budget stays well below an error of order vmax (what a wrong running
    max, an overflowed exp or a dropped state produce)."""
    dtype, vmax = "float16", 4.0
    amp = np.sqrt(1e4 / np.sqrt(D))  # scores of 1e4
    q = to_storage(np.full((1, 2, D), amp, np.float32), dtype)
    k = to_storage(np.full((1, 4, 1, D), amp, np.float32), dtype)
    for backend in ("numpy", "emulated", "cupy"):  # (budgets only: no GPU needed)
        b = score_budget(q, k, 1 / np.sqrt(D), D, vmax, backend, dtype)
        assert b < 0.1 * vmax, (backend, b)
        assert budget("decode", dtype, vmax, backend=backend) < 0.1 * vmax
    assert 4 * unit_roundoff(dtype) * vmax < 0.1 * vmax
