"""Test helpers shipped with cpattn: error budgets, assertions, backends, hypothesis strategies.

    from cpattn.testing import budget, assert_close_to_oracle, assert_cache_unchanged, get_backend
    from cpattn.testing import strategies      # needs hypothesis (the ``test`` extra)

``budgets``: the one table of error budgets against the float64 oracles. ``asserts``: closeness
to the oracle, NaN-poisoned output buffers, cache snapshots. ``backends``: numpy, emulated
(the GPU cache on a CPU stand-in for CuPy) and cupy behind one small interface.
``strategies``: prefix-sharing workloads and tree operation sequences. docs/testing.md shows
how to property-test an attention function of your own against the reference with them.
"""
from ..arrays import to_host
from .asserts import (NAN_BITS, as_float32, assert_cache_unchanged, assert_close_to_oracle,
                      assert_same_snapshot, poisoned, poisoned_lse, snapshot, v_absmax)
from .backends import (BACKENDS, Backend, CupyBackend, EmulatedBackend, NumpyBackend, available_backends,
                       get_backend)
from .budgets import budget, score_error

__all__ = [
    "budget", "score_error", "assert_close_to_oracle", "assert_cache_unchanged", "assert_same_snapshot",
    "snapshot", "poisoned", "poisoned_lse", "NAN_BITS", "as_float32", "v_absmax", "to_host", "Backend",
    "NumpyBackend", "EmulatedBackend", "CupyBackend", "BACKENDS", "get_backend", "available_backends",
    "strategies",
]


def __getattr__(name):
    if name == "strategies":  # imported on first use: hypothesis is only in the test extra
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
