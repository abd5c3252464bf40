"""Shared test setup: hypothesis profiles, the ``backend`` fixture, loading repository scripts.

Snapshots, budgets and the backends themselves are in ``cpattn.testing`` (shipped in the wheel).

Profiles: "ci" is derandomized (the same examples every run) and small enough that the CPU
suite stays within a few minutes on two cores; "dev" explores more. ``CI`` or
``HYPOTHESIS_PROFILE=ci`` selects "ci"; otherwise ``HYPOTHESIS_PROFILE`` names the profile and
the default is "default" (random, modest).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest
from hypothesis import HealthCheck, settings

from cpattn.testing import assert_cache_unchanged, get_backend

# the backend fixture is entered once per test, around all of its examples
SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None, print_blob=True,
                          suppress_health_check=SUPPRESS)
settings.register_profile("default", max_examples=30, deadline=None, print_blob=True,
                          suppress_health_check=SUPPRESS)
settings.register_profile("dev", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=SUPPRESS)

PROFILE = "ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "default")
settings.load_profile(PROFILE)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """A repository script (e.g. ``tools/soak.py``) imported as a module, by path."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(params=[
    "numpy", "emulated",
    pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not get_backend("cupy").available(),
                                                                      reason="needs CuPy and a CUDA GPU")]),
])
def backend(request):
    """Each backend in turn (``cpattn.testing.backends``), entered for the test: one test body
    runs on NumPy, on the emulated GPU cache and (marker ``gpu``) on CuPy."""
    with get_backend(request.param) as b:
        yield b


@pytest.fixture
def unchanged():
    """``with unchanged(cache): ...`` asserts the block leaves the cache exactly as it was
    (``cpattn.testing.assert_cache_unchanged``)."""
    return assert_cache_unchanged


@pytest.fixture(scope="module")
def model_file():
    """The fetched SmolLM2 file (a str path); tests never download it (CI runs ``cpattn models
    fetch smollm2`` first). Missing: the test skips, or fails under ``CPATTN_REQUIRE_MODEL=1``."""
    from cpattn.serving import fetch

    path = fetch.cached_path("smollm2")
    if not fetch.is_fetched("smollm2"):
        why = f"model file not fetched ({path}); run `cpattn models fetch smollm2` first"
        if os.environ.get("CPATTN_REQUIRE_MODEL") == "1":
            pytest.fail(f"CPATTN_REQUIRE_MODEL=1: {why}")
        pytest.skip(why)
    return str(path)
