"""Assertions for attention outputs and caches: close to the oracle, poisoned buffers, unchanged.

* ``assert_close_to_oracle(o, oracle, dtype, v_absmax, backend=...)``: finite, the oracle's
  shape, and within ``budgets.budget`` of it; returns the error.
* ``poisoned(shape, dtype, xp)``: an output buffer full of NaN bit patterns of the storage
  dtype, so that a row a kernel forgot to write cannot pass as a result.
* ``snapshot(cache)`` / ``assert_same_snapshot(a, b)`` / ``assert_cache_unchanged(*caches)``:
  everything a cache holds (tree, free lists, LRU order, length tables, pending rows, pool
  bytes, a GPU cache's device length table), compared byte for byte.
"""
from __future__ import annotations

import dataclasses
import types
from contextlib import contextmanager

import numpy as np

from ..arrays import to_host
from ..reference.chunk_cache import Node
from ..reference.dtypes import check_dtype_name, storage_numpy_dtype, to_float32
from .budgets import budget

NAN_BITS = {"float16": 0x7E00, "bfloat16": 0x7FC0}  # a quiet NaN of each storage dtype


# ----------------------------------------------------------------------------- outputs
def poisoned(shape, dtype: str, xp=np):
    """An array of ``shape`` in the storage dtype, every element NaN (``xp``: numpy or cupy)."""
    bits = xp.full(tuple(shape), NAN_BITS[check_dtype_name(dtype)], dtype=xp.uint16)
    return bits.view(storage_numpy_dtype(dtype))


def poisoned_lse(shape, xp=np):
    """A float32 log-sum-exp buffer of ``shape``, every element NaN."""
    return xp.full(tuple(shape), np.nan, dtype=xp.float32)


def as_float32(x, dtype: str) -> np.ndarray:
    """A host float32 copy of ``x``: storage-dtype arrays decoded, float arrays cast."""
    h = to_host(x)
    if h.dtype == np.dtype(storage_numpy_dtype(check_dtype_name(dtype))):
        return to_float32(h, dtype)
    return h.astype(np.float32)


def assert_close_to_oracle(o, oracle, dtype: str, v_absmax: float, *, backend="numpy", kind: str = "decode",
                           score_absmax: float = 0.0, head_dim: int = 1, what: str = "o") -> float:
    """Assert ``o`` (storage dtype or float, any backend) is finite and within the budget of
    ``oracle`` (float64, same shape); return ``max |o - oracle|``.

    ``v_absmax`` is the largest ``|v|`` the output mixes (for ``kind="lse"``, the largest
    ``|lse|``); see ``cpattn.testing.budgets`` for the rule and the other arguments.
    """
    got = as_float32(o, dtype) if kind != "lse" else to_host(o).astype(np.float32)
    want = np.asarray(oracle, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, oracle {want.shape}"
    bad = ~np.isfinite(got)
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite values, first at {np.argwhere(bad)[0].tolist()}"
    err = float(np.abs(got.astype(np.float64) - want).max(initial=0.0))
    allowed = budget(kind, dtype, v_absmax, backend=backend, score_absmax=score_absmax, head_dim=head_dim)
    assert err <= allowed, f"{what}: max error {err:.3g} over the {kind} budget {allowed:.3g} ({dtype}, {backend!r})"
    return err


def v_absmax(cache) -> float:
    """The largest ``|v|`` in a cache's V pool (every layer), as float32."""
    return float(np.abs(to_float32(to_host(cache.v_pool), cache.dtype)).max(initial=0.0))


# ----------------------------------------------------------------------------- caches
_SKIP = object()


def _freeze(x):
    """A comparable, hashable image of a cache attribute. Nodes become (chunk, serial)
    references (the tree itself is frozen node by node); modules and functions are
    configuration, not state, and are left out."""
    if isinstance(x, types.ModuleType) or callable(x):
        return _SKIP  # the array module (cupy has .shape and .dtype too), hooks, kernels
    if isinstance(x, Node):
        return ("node", x.chunk, x.serial)
    if isinstance(x, float):
        return ("float", x.hex())  # NaN and -0.0 compare too
    if x is None or isinstance(x, (bool, int, str, bytes, np.generic)):
        return x.item() if isinstance(x, np.generic) else x
    if isinstance(x, np.ndarray) or (hasattr(x, "shape") and hasattr(x, "dtype")):
        h = to_host(x)
        return ("array", h.dtype.str, h.shape, h.tobytes())  # byte for byte: NaN payloads count
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(e) for e in x)
    if isinstance(x, dict):  # in order: the LRU order is state
        return tuple((_freeze(k), _freeze(v)) for k, v in x.items())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__,) + tuple(_freeze(getattr(x, f.name)) for f in dataclasses.fields(x))
    return _SKIP  # a module, a kernel table, a stream: what the cache uses, not what it holds


def snapshot(cache) -> dict:
    """Everything a cache holds, as a dict of comparable values (GPU arrays copied to the host).

    Covers every attribute of the cache object (so nothing new a cache learns to hold is
    missed) and the whole tree, node by node, in depth-first order. A GPU cache's active decode
    batch is settled first (its arrays written into the tree: nothing a caller sees changes)."""
    settle = getattr(cache, "settle", None)
    if settle is not None:
        settle()
    snap = {}
    for name, value in vars(cache).items():
        frozen = _freeze(value)
        if frozen is not _SKIP:
            snap[name] = frozen
    snap["tree"] = tuple(_freeze(n) for n in [cache.root, *cache.nodes()])
    snap["version"] = cache.version
    return snap


def assert_same_snapshot(a: dict, b: dict, *, common: bool = False) -> None:
    """Assert two snapshots are equal. ``common=True`` compares only the keys both have (a
    NumPy cache against a GPU cache, whose device length table the NumPy one lacks)."""
    keys = sorted(a.keys() & b.keys()) if common else sorted(a.keys() | b.keys())
    for key in keys:
        assert key in a and key in b, f"{key}: present in one snapshot only"
        assert a[key] == b[key], f"{key} changed: {_describe(a[key], b[key])}"


def _describe(x, y) -> str:
    """What differs between two frozen values, short enough for an assertion message."""
    if isinstance(x, tuple) and x[:1] == ("array",) and y[:1] == ("array",):
        if x[1:3] != y[1:3]:
            return f"dtype/shape {x[1:3]} -> {y[1:3]}"
        diff = np.frombuffer(x[3], np.uint8) != np.frombuffer(y[3], np.uint8)
        return f"{int(diff.sum())} of {diff.size} bytes differ, first at byte {int(np.argmax(diff))}"
    text = f"{x!r} -> {y!r}"
    return text if len(text) <= 300 else text[:300] + " ..."


@contextmanager
def assert_cache_unchanged(*caches):
    """``with assert_cache_unchanged(cache): ...`` asserts the block leaves each cache exactly
    as it was (whether the block raises or not; an exception still propagates)."""
    before = [snapshot(c) for c in caches]
    try:
        yield
    finally:
        for snap, cache in zip(before, caches):
            assert_same_snapshot(snap, snapshot(cache))
