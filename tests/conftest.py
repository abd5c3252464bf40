"""Shared test setup: hypothesis profiles, a cache snapshot helper, loading repository scripts.

Profiles: "ci" is derandomized (the same examples every run) and small enough that the CPU
suite stays within a few minutes on two cores; "dev" explores more. ``CI`` or
``HYPOTHESIS_PROFILE=ci`` selects "ci"; otherwise ``HYPOTHESIS_PROFILE`` names the profile and
the default is "default" (random, modest).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=30, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])

if os.environ.get("CI") or os.environ.get("HYPOTHESIS_PROFILE") == "ci":
    settings.load_profile("ci")
else:
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """A repository script (e.g. ``tools/soak.py``) imported as a module, by path."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def to_host(x) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.array(x, copy=True)


def snapshot(cache) -> dict:
    """Everything observable about a cache (host state and pool bytes), for "unchanged" checks.

    Works for GPU caches too (pools copied to the host; the device length table included)."""
    seqs = sorted(cache.sequences)
    extra = {}
    if hasattr(cache, "_pending_lo"):
        extra.update(pending_lo=cache._pending_lo.copy(), pending_hi=cache._pending_hi.copy())
    if hasattr(cache, "d_slot_lens"):
        extra["device_slot_lens"] = to_host(cache.d_slot_lens)
    return dict(
        stats=cache.stats(),
        version=cache.version,
        next_id=cache._next_id,
        sequences=seqs,
        lens={s: cache.seq_len(s) for s in seqs},
        committed={s: cache._seqs[s].n_committed for s in seqs},
        tokens={s: cache.seq_tokens(s) for s in seqs},
        chunks={s: cache.seq_chunks(s) for s in seqs},
        slots={s: cache.seq_slot(s) for s in seqs},
        free=list(cache._free),
        free_slots=list(cache._free_slots),
        cached=[n.chunk for n in cache._cached],
        tree=[(n.chunk, n.serial, n.parent.chunk, tuple(n.tokens), n.ref, n.registered)
              for n in cache.nodes()],
        index=sorted((n.chunk, k) for n in [cache.root, *cache.nodes()] for k in n.index),
        slot_lens=cache.slot_lens.copy(),
        k_pool=to_host(cache.k_pool),
        v_pool=to_host(cache.v_pool),
        **extra,
    )


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            # byte-for-byte: NaN payloads and -0.0 count too
            assert a[key].tobytes() == b[key].tobytes(), f"{key} changed"
        else:
            assert a[key] == b[key], f"{key} changed: {a[key]!r} -> {b[key]!r}"


@pytest.fixture
def unchanged():
    """``with unchanged(cache): ...`` asserts the block leaves the cache exactly as it was."""
    from contextlib import contextmanager

    @contextmanager
    def guard(cache):
        before = snapshot(cache)
        yield
        assert_same_snapshot(before, snapshot(cache))

    return guard
