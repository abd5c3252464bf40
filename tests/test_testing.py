"""cpattn.testing itself: the docs page runs as written, and the helpers catch what they promise.

* docs/testing.md: every ```python block, in order, executed as one module; each ``test_*`` it
  defines is run, and run again with a broken ``my_decode`` (one key dropped), which must fail.
* budgets: per backend, ordered, and far below the error of a real bug.
* snapshots: every kind of change is seen (pool bytes, sign bits, lists, LRU order, tree).
* strategies: workloads build on every CPU backend; tree op sequences keep the model right.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from conftest import PROFILE
from cpattn.reference.chunk_attention import oracle_decode
from cpattn.reference.workloads import TokenKV
from cpattn.testing import (NAN_BITS, as_float32, assert_cache_unchanged, assert_close_to_oracle, budget,
                            get_backend, poisoned, snapshot, to_host, v_absmax)
from cpattn.testing.strategies import apply_tree_ops, tree_ops, workloads

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "testing.md"


def doc_module(shrink: bool = True) -> dict:
    """The namespace of docs/testing.md's python blocks, run in order as one module. With
    ``shrink=False`` its hypothesis tests stop at the first failure (they are expected to fail)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 3, "docs/testing.md lost its examples"
    ns = {"__name__": "docs_testing"}
    if not shrink:  # the page's @settings inherit from the profile loaded when they are made
        settings.register_profile("no-shrink", settings(settings.get_profile(PROFILE),
                                                        phases=[Phase.explicit, Phase.generate]))
        settings.load_profile("no-shrink")
    try:
        exec(compile("\n".join(blocks), str(DOC), "exec"), ns)
    finally:
        settings.load_profile(PROFILE)
    return ns


def doc_tests(ns) -> dict:
    tests = {k: v for k, v in ns.items() if k.startswith("test_") and callable(v)}
    assert len(tests) >= 3, sorted(tests)
    return tests


def test_the_docs_examples_pass():
    for name, fn in doc_tests(doc_module()).items():
        fn()


def test_the_docs_examples_catch_a_broken_attention():
    """my_decode that forgets its sequence's last key (the query token's own K/V) must fail."""
    ns = doc_module(shrink=False)
    good = ns["my_decode"]
    ns["my_decode"] = lambda q, k, v, scale: good(q, k[:-1], v[:-1], scale) if len(k) > 1 else 0 * good(q, k, v, scale)
    users = {k: v for k, v in doc_tests(ns).items() if "my_decode" in k}  # the tests of my_decode
    assert len(users) >= 2, sorted(users)
    for name, fn in users.items():
        with pytest.raises(AssertionError, match="budget"):
            fn()


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_budgets_are_ordered_and_tight(dtype):
    for vmax in (0.5, 1.0, 4.0, 30.0):
        ref, emu, kern = (budget("decode", dtype, vmax, backend=b) for b in ("numpy", "emulated", "cupy"))
        assert ref == emu < kern < 0.1 * vmax  # a dropped key or state moves o by O(vmax)
        assert budget("prefill", dtype, vmax, backend="cupy") == kern
        assert budget("decode", dtype, vmax, score_absmax=1e4, head_dim=128) > ref  # large scores cost
    assert budget("decode", "bfloat16", 1.0) > budget("decode", "float16", 1.0)
    assert budget("lse", dtype, 10.0, backend="cupy") > budget("lse", dtype, 10.0)
    with pytest.raises(ValueError, match="^kind:"):
        budget("o", dtype, 1.0)
    with pytest.raises(ValueError, match="^backend:"):
        budget("decode", dtype, 1.0, backend="tpu")


def test_assert_close_to_oracle_checks_shape_finiteness_and_budget():
    oracle = np.linspace(-1, 1, 24).reshape(2, 3, 4)
    o = oracle.astype(np.float16)  # one rounding: within budget
    assert assert_close_to_oracle(o, oracle, "float16", 1.0) <= budget("decode", "float16", 1.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_oracle(o[:1], oracle, "float16", 1.0)
    bad = o.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_oracle(bad, oracle, "float16", 1.0)
    off = o.copy()
    off[0, 0, 0] += np.float16(0.01)
    with pytest.raises(AssertionError, match="budget"):
        assert_close_to_oracle(off, oracle, "float16", 1.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_poisoned_buffers_are_nan_in_the_storage_dtype(dtype):
    x = poisoned((3, 2), dtype)
    assert x.view(np.uint16).tolist() == [[NAN_BITS[dtype]] * 2] * 3
    assert np.isnan(as_float32(x, dtype)).all()


# ----------------------------------------------------------------------------- snapshots
def test_the_snapshot_sees_every_kind_of_change(backend):
    cache = backend.make_cache(1, 1, backend.head_dim, 6, chunk_size=backend.chunk_size)
    kv = TokenKV(1, 1, backend.head_dim)
    c = backend.chunk_size
    a = cache.add_sequence([1] * (c + 1), *map(backend.asarray, kv([1] * (c + 1))))
    b = cache.add_sequence([2] * c, *map(backend.asarray, kv([2] * c)))
    cache.release(b)  # one cached chunk
    changes = [
        lambda: cache.k_pool.__setitem__((0, 5, 0, 0, 0), 1.0),
        # a sign bit only, written as bits (CuPy fills any value == 0 with memset, so -0.0 stays +0.0)
        lambda: cache.v_pool.reshape(-1).view(np.uint16).__setitem__(-1, 0x8000),
        lambda: cache.evict(),
        lambda: cache.extend(a, [3], *map(backend.asarray, kv([3], start=cache.seq_len(a)))),
        lambda: cache.fork(a),
        lambda: cache.reserve(a, [4]),  # pending rows only
    ]
    for change in changes:
        snap = snapshot(cache)
        with pytest.raises(AssertionError, match="changed"):
            with assert_cache_unchanged(cache):
                change()
        assert snapshot(cache) != snap
    with assert_cache_unchanged(cache):
        cache.seq_tokens(a), to_host(cache.k_pool)  # reads change nothing


# ----------------------------------------------------------------------------- strategies
@settings(max_examples=10, deadline=None)
@given(w=workloads(head_dims=st.just(8), chunk_sizes=st.sampled_from([2, 4])))
def test_workloads_build_on_every_cpu_backend(w):
    outs = []
    for name in ("numpy", "emulated"):
        with get_backend(name) as b:
            cache, ids = w.cache(b)
            assert len(ids) == w.num_requests and len(set(ids)) == len(ids)
            prompts = w.prompts()
            for sid, p in zip(ids, prompts):
                assert cache.seq_tokens(sid)[:-1] == p  # the prompt, then one decode token
            outs.append(oracle_decode(cache, ids, w.queries())[0])
    assert outs[0].tobytes() == outs[1].tobytes()


@settings(max_examples=30, deadline=None)
@given(ops=tree_ops(chunk_size=2), share=st.booleans())
def test_tree_ops_keep_the_model(ops, share):
    cache = get_backend("numpy").make_cache(2, 1, 8, 6, chunk_size=2, share_prefix=share, max_sequences=4)
    kv = TokenKV(2, 1, 8, vocab=3)
    model = apply_tree_ops(cache, ops, kv)
    assert sorted(cache.sequences) == sorted(model)
    for s, tokens in model.items():
        assert cache.seq_tokens(s) == tokens
        k, v = kv(tokens)
        for layer in range(2):
            rk, rv = cache.read_kv(s, layer)
            assert rk.tobytes() == k[layer].tobytes() and rv.tobytes() == v[layer].tobytes()
    assert cache.num_free + cache.num_cached + cache.num_referenced == cache.num_chunks
    assert v_absmax(cache) >= 0
