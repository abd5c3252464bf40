"""The command line and first use without a GPU (issue 17): one-line errors naming the bad
option, help texts with defaults on every option, GPU paths without CuPy naming the extra."""
from __future__ import annotations

import argparse
import importlib.util

import pytest

from cpattn.cli import as_option, main, shared_pages

HAVE_CUPY = importlib.util.find_spec("cupy") is not None


@pytest.mark.parametrize("option,value,want", [
    ("--requests", "0", "argument --requests: expected an integer >= 1 and <= 4096, got 0"),
    ("--chunk-size", "48", "argument --chunk-size: expected a power of two >= 1 and <= 128, got 48"),
    ("--chunk-size", "x", "argument --chunk-size: expected an integer, got 'x'"),
    ("--tolerance", "nan", "argument --tolerance: expected a finite number > 0.0, got nan"),
    ("--min-recall", "1.5", "argument --min-recall: expected a finite number >= 0.0 and <= 1.0, got 1.5"),
    ("--head-dim", "0", "argument --head-dim: expected an integer >= 1, got 0"),
    ("--serving-requests", "-1", "argument --serving-requests: expected an integer >= 0, got -1"),
    ("--levels", "2.5", "argument --levels: expected an integer, got '2.5'"),
])
def test_a_bad_option_is_one_line_naming_it(capsys, option, value, want):
    with pytest.raises(SystemExit) as e:
        main(["demo", option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cpattn demo: error: {want}")


def test_a_library_refusal_is_one_line_naming_the_option(capsys):
    """Values argparse lets through but the model refuses (an odd head_dim) end the same way."""
    rc = main(["demo", "--backend", "numpy", "--head-dim", "7", "--requests", "2", "--serving-requests", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("cpattn demo: error: argument --head-dim: expected an even number")


def test_as_option_maps_argument_names_to_options():
    args = argparse.Namespace(chunk_size=48)
    assert as_option("chunk_size: expected a power of two, got 48", args) == \
        "argument --chunk-size: expected a power of two, got 48"
    assert as_option("pool: expected 3 free chunks, got 0", args) == "pool: expected 3 free chunks, got 0"


def test_every_demo_option_has_help_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("--backend", "auto"), ("--requests", "24"), ("--levels", "2"), ("--segment-chunks", "6"),
                            ("--chunk-size", "16"), ("--layers", "2"), ("--hidden", "128"), ("--q-heads", "8"),
                            ("--kv-heads", "2"), ("--head-dim", "64"), ("--vocab", "256"), ("--dtype", "float16"),
                            ("--piece-chunks", "4"), ("--seed", "0"), ("--tolerance", "0.01"),
                            ("--serving-requests", "8"), ("--system-len", "256"), ("--min-recall", "0.9"),
                            ("--check-requests", "4")]:
        start = text.index(option + " ", text.index("options:"))
        block = text[start:start + 220]
        assert f"(default: {default})" in block, (option, block)


def test_version(capsys):
    import cpattn

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"cpattn {cpattn.__version__}"


def test_the_demo_pool_is_what_the_shared_tree_holds():
    """shared_pages counts the tree's own pages: prompts sharing two full chunks hold them once."""
    c = 4
    shared = list(range(8))
    prompts = [shared + [100 + i] for i in range(3)]  # 2 shared chunks + 1 private page each
    assert shared_pages(prompts, c) == 2 + 3
    assert shared_pages([list(range(4))], c) == 2  # a full chunk, then the decode token opens a page


@pytest.mark.skipif(HAVE_CUPY, reason="CuPy is installed here")
def test_gpu_classes_without_cupy_name_the_extra():
    from cpattn.chunk_cache import GpuChunkCache

    with pytest.raises(ModuleNotFoundError, match=r"GpuChunkCache needs CuPy.*pip install 'cpattn\[cuda13x\]'"):
        GpuChunkCache(1, 1, 64, 4, chunk_size=16)


@pytest.mark.skipif(HAVE_CUPY, reason="CuPy is installed here")
def test_backend_cupy_without_cupy_names_the_extra(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--backend", "cupy"])
    assert "argument --backend: expected CuPy for 'cupy', got no CuPy installed (pip install 'cpattn[cuda13x]'" \
        in str(e.value.code)


@pytest.mark.skipif(HAVE_CUPY, reason="CuPy is installed here")
def test_as_cupy_without_cupy_names_the_extra():
    import numpy as np

    from cpattn.arrays import as_cupy

    with pytest.raises(ModuleNotFoundError, match=r"cuda13x"):
        as_cupy(np.zeros(2), "q")


def test_generate_checks_the_row_floor_before_loading_a_model(capsys):
    """cpattn generate --row-floor: an option of the recall rule, checked before any model is
    fetched or loaded (exit status 2, the argument named)."""
    from cpattn.cli import main

    assert main(["generate", "--model", "/nonexistent.gguf", "--row-floor", "0.9", "hello"]) == 2
    assert "row_floor: expected None with recall=None" in capsys.readouterr().err
    assert main(["generate", "--model", "/nonexistent.gguf", "--recall", "0.99", "--row-floor", "1.5", "hi"]) == 2
    assert "row_floor: expected None or a number in [0, 1], got 1.5" in capsys.readouterr().err
