"""``python -m cpattn.bench.mixed_serving`` on the CPU: a tiny run of the real model (NumPy
reference, mixed steps, Poisson arrivals in wall-clock time; transformers on the CPU too when
torch and transformers are installed) writes its files with sane numbers; the arrival trace is
reproducible from the seed; bad arguments end in one line naming the option.

Needs the model file (``cpattn models fetch smollm2``) and the models extra, as
tests/test_mixed_model.py; without them the tiny run's tests skip (the others need neither).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest

from cpattn.bench import mixed_serving as bench

REQUESTS, NEW, RATE, SEED = 3, 3, 20.0, 5
TINY = ["--requests", str(REQUESTS), "--new-tokens", str(NEW), "--doc-tokens", "64", "--rate", str(RATE),
        "--seed", str(SEED), "--chunk-size", "16", "--prefill-chunk", "64", "--step-tokens", "64",
        "--lone-checks", "2"]
HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


@pytest.fixture(scope="module")
def tiny(model_file, tmp_path_factory):
    """One tiny run (transformers on the CPU when it is installed, else --skip-hf): its JSON and folder."""
    for extra in ("gguf", "tokenizers", "jinja2"):  # the models extra
        pytest.importorskip(extra)
    out = str(tmp_path_factory.mktemp("mixed"))
    assert bench.main(TINY + ["--model", model_file, "--out", out, "--backend", "numpy"]
                      + ([] if HAS_HF else ["--skip-hf"])) == 0
    with open(os.path.join(out, "mixed_serving_cpu.json")) as fh:
        return json.load(fh), out


# ============================================================================ the tiny run
def test_the_run_writes_its_files(tiny):
    d, out = tiny
    names = set(os.listdir(out))
    assert {"mixed_serving_cpu.md", "mixed_serving_cpu.csv", "mixed_serving_cpu.json"} <= names
    if importlib.util.find_spec("matplotlib") is not None:
        assert "mixed_serving_cpu.png" in names
    md = open(os.path.join(out, "mixed_serving_cpu.md")).read()
    assert md.startswith("## Mixed-step serving under Poisson arrivals") and d["date"] in md.splitlines()[0]
    assert "CPU (NumPy reference)" in md.splitlines()[0]
    with open(os.path.join(out, "mixed_serving_cpu.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["metric"] for r in rows] == [m for m, _, _ in bench.ROW_METRICS]
    assert list(rows[0])[:7] == ["device", "date", "config", "ours", "peer", "ratio", "floor"]


def test_every_request_finished_with_sane_times(tiny):
    d, _ = tiny
    ours = d["cpattn"]
    assert ours["unfinished"] == 0 and ours["tokens"] == REQUESTS * NEW
    assert [len(t) for t in ours["tokens_out"]] == [NEW] * REQUESTS
    for a, s, f, e in zip(ours["arrival_s"], ours["submitted_s"], ours["first_token_s"], ours["finish_s"]):
        assert 0 <= a <= s <= f <= e  # submitted once arrived, first token after that, finish last
    assert all(t >= 0 for t in ours["ttft"]) and ours["ttft_max_s"] >= ours["ttft_p90_s"] >= ours["ttft_median_s"]
    assert ours["makespan_s"] == pytest.approx(max(ours["finish_s"]))
    assert ours["tok_s"] == pytest.approx(ours["tokens"] / ours["makespan_s"])
    assert ours["steps"] >= NEW and ours["preemptions"] == 0 and ours["prefill_reused"] > 0  # the document shared
    ts, ks = zip(*ours["curve"])
    assert list(ts) == sorted(ts) and list(ks) == sorted(ks) and ks[-1] == REQUESTS * NEW
    assert d["agreement"]["lone"]["agree_first_n"] == 2  # NumPy: exactly the lone tokens
    rows = {r["metric"]: r for r in d["rows"]}
    assert rows[bench.ROW_METRICS[0][0]]["ours"] == pytest.approx(ours["tok_s"])


@pytest.mark.skipif(not HAS_HF, reason="needs torch and transformers")
def test_transformers_serves_the_same_trace_in_static_batches(tiny):
    d, _ = tiny
    hf, ours = d["transformers"], d["cpattn"]
    assert hf["tokens"] == REQUESTS * NEW and [len(t) for t in hf["tokens_out"]] == [NEW] * REQUESTS
    assert sum(b["size"] for b in hf["batches"]) == REQUESTS and hf["steps"] == len(hf["batches"]) * NEW
    for b, nxt in zip(hf["batches"], hf["batches"][1:]):
        assert nxt["start_s"] >= b["end_s"]  # a batch starts once the previous one finished
    assert all(t >= 0 for t in hf["ttft"]) and all(f <= e for f, e in zip(hf["first_token_s"], hf["finish_s"]))
    ideal = hf["ideal"]
    assert ideal["tokens"] == REQUESTS * NEW and ideal["ttft_max_s"] == ideal["ttft_median_s"]
    assert d["agreement"]["hf"]["requests"] == REQUESTS and d["transformers"]["dtype"] == "float32"
    r = d["rows"][0]
    assert r["peer"] == pytest.approx(hf["tok_s"]) and r["ratio"] == pytest.approx(ours["tok_s"] / hf["tok_s"])


def test_the_json_replots(tiny):
    d, out = tiny
    path = os.path.join(out, "mixed_serving_cpu.json")
    png = os.path.join(out, "mixed_serving_cpu.png")
    if os.path.exists(png):
        os.remove(png)
    assert bench.main(["--replot", path]) == 0
    assert os.path.exists(png) == (importlib.util.find_spec("matplotlib") is not None)


def test_the_run_used_the_seeded_trace(tiny):
    d, _ = tiny
    assert d["arrivals_s"] == bench.arrival_times(SEED, REQUESTS, RATE) == d["cpattn"]["arrival_s"]


# ============================================================================ arrivals, arguments, CLI
def test_arrival_trace_is_reproducible_from_the_seed():
    a = bench.arrival_times(3, 400, 4.0)
    assert a == bench.arrival_times(3, 400, 4.0) and a != bench.arrival_times(4, 400, 4.0)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert np.mean(np.diff(a)) == pytest.approx(0.25, rel=0.15)  # exponential gaps of mean 1 / rate
    assert bench.arrival_times(0, 0, 1.0) == []
    with pytest.raises(ValueError, match="rate: expected"):
        bench.arrival_times(0, 3, 0.0)
    with pytest.raises(ValueError, match="num_requests"):
        bench.arrival_times(0, -1, 1.0)


def test_defaults_and_bad_arguments(capsys):
    a = bench.parse_args([])
    assert (a.requests, a.doc_tokens, a.new_tokens, a.rate, a.step_tokens) == (64, 2048, 64, 4.0, 512)
    assert a.chunk_size == 64 and a.prefill_chunk % a.chunk_size == 0 and not a.skip_hf
    for bad, want in ((["--rate", "0"], "argument --rate: expected a finite number > 0.0, got 0"),
                      (["--rate", "x"], "argument --rate: expected a number, got 'x'"),
                      (["--requests", "0"], "argument --requests: expected an integer >= 1, got 0"),
                      (["--new-tokens", "-2"], "argument --new-tokens: expected an integer >= 1, got -2"),
                      (["--prefill-chunk", "40"], "argument --prefill-chunk: expected a positive multiple of "
                                                  "--chunk-size 64, got 40"),
                      (["--step-tokens", "32"], "argument --step-tokens: expected an integer >= --chunk-size 64, "
                                                "got 32"),
                      (["--backend", "gpu"], "argument --backend: invalid choice")):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(bad)
        assert e.value.code == 2, bad
        assert want in capsys.readouterr().err, bad


def test_pool_holds_every_request_at_once():
    prompts = [[1] * 40 + [2, 3], [1] * 40 + [4], [1] * 40 + [5, 6, 7]]
    n = bench.pool_chunks(prompts, 5, 16)  # 2 shared chunks, then (tail + 5 new) / 16 + 1 each
    assert n == 2 + 3 * 2 + 2


def test_cli_knows_mixed(capsys):
    from cpattn.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "mixed", "--help"])
    assert e.value.code == 0
    assert "--rate" in capsys.readouterr().out
