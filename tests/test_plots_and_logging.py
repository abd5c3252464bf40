"""Plots redrawn from the benchmark JSON, the frontier tool's defaults, and the "cpattn" logger
(issue 17)."""
from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import pytest

import cpattn
from cpattn.bench import frontier
from cpattn.reference.workloads import TokenKV

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")


def _png_size(path):
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.skipif(not (ROOT / "bench" / "serving_h100.json").exists(), reason="bench/ not in this checkout")
def test_serving_plot_redraws_from_json_with_log_axes(tmp_path, monkeypatch):
    from cpattn.bench import serving

    axes_scales = []
    real = serving.plot

    def spy(rows, steps, path, dev, warmup_steps=0):
        import matplotlib.pyplot as plt

        orig = plt.Figure.savefig

        def save(fig, *a, **k):
            axes_scales.extend((ax.get_yscale(), ax.get_xscale()) for ax in fig.axes)
            return orig(fig, *a, **k)

        monkeypatch.setattr(plt.Figure, "savefig", save)
        return real(rows, steps, path, dev, warmup_steps)

    monkeypatch.setattr(serving, "plot", spy)
    src = tmp_path / "serving.json"
    src.write_text((ROOT / "bench" / "serving_h100.json").read_text())
    assert serving.main(["--replot", str(src)]) == 0  # no GPU, no torch needed
    w, h = _png_size(tmp_path / "serving.png")
    assert w > 2000 and h > 400
    assert axes_scales[0] == ("log", "linear") and axes_scales[1] == ("linear", "log")  # steps, histogram


@pytest.mark.skipif(not (ROOT / "bench" / "prefill_h100.json").exists(), reason="bench/ not in this checkout")
def test_prefill_plot_redraws_from_json_with_recall_in_the_labels(tmp_path, monkeypatch):
    from cpattn.bench import prefill

    seen = {}
    import cpattn.bench as bench

    real = bench.bar_chart

    def spy(rows, series, labels, *a, **k):
        seen["labels"], seen["annotate"] = labels, k.get("annotate")
        return real(rows, series, labels, *a, **k)

    monkeypatch.setattr(prefill, "bar_chart", spy)
    src = tmp_path / "prefill.json"
    src.write_text((ROOT / "bench" / "prefill_h100.json").read_text())
    assert prefill.main(["--replot", str(src)]) == 0
    rows = json.loads(src.read_text())["rows"]
    assert seen["annotate"] is None  # nothing drawn over the bars
    assert all(lb.endswith(f"recall {r['recall_mean']:.3f}") for lb, r in zip(seen["labels"], rows))
    assert _png_size(tmp_path / "prefill.png")[0] > 1500


def test_frontier_defaults_are_small_and_write_no_tracked_file():
    args = {a.dest: a.default for a in _parser_actions()}
    assert args["out"] == "frontier_out" and args["past"] is None
    assert frontier.SMALL["past"] + frontier.SMALL["chunk"] < 16384


def _parser_actions():
    import argparse

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, argv=None, namespace=None):
        captured["actions"] = self._actions
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            frontier.main([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return [a for a in captured["actions"] if a.dest != "help"]


def test_frontier_granularities_are_distinct():
    for n in (64, 256, 1024, 4096):
        g = frontier.granularities(n)
        eff = [(h, min(r or n, n)) for h, r in g]
        assert len(set(eff)) == len(eff)
    assert len(frontier.granularities(4096)) == 6 and len(frontier.granularities(256)) == 3


def test_frontier_small_run_prints_each_row_once(tmp_path, capsys):
    assert frontier.main(["--past", "1024", "--chunk", "256", "--kv-heads", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = [ln.split("|")[0].strip() for ln in out.splitlines() if ln.count("|") == 2]
    assert len(table) == len(set(table)) == 4  # 3 granularities + the token oracle
    assert (tmp_path / "frontier.json").exists()


def test_plan_rebuilds_and_reasons_are_logged(caplog):
    L, HKV, D, C = 1, 1, 8, 4
    cache = cpattn.ChunkCache(L, HKV, D, 8, chunk_size=C)
    kv = TokenKV(L, HKV, D, seed=0)
    a = cache.add_sequence([1, 2, 3], *kv([1, 2, 3]))
    b = cache.add_sequence([1, 2], *kv([1, 2]))
    dec = cpattn.ChunkAttentionDecode(cache)
    with caplog.at_level(logging.DEBUG, logger="cpattn"):
        dec.plan([a], 1)
        dec.plan([a, b], 1)
        cache.append([a], [4], *kv([4], start=3))  # fills a's chunk: no new chunk, same version
        cache.append([a], [5], *kv([5], start=4))  # a new chunk: the tree changed
        dec.plan([a, b], 1)
    msgs = [r.getMessage() for r in caplog.records if r.name == "cpattn"]
    assert len(msgs) == 3 and all(m.startswith("decode plan rebuilt: batch") for m in msgs)
    assert msgs[0].endswith("(first plan)") and msgs[1].endswith("(batch changed)") and "tree changed" in msgs[2]


def test_kernel_compiles_are_logged(caplog, monkeypatch):
    """The compile cache is wrapped: a miss logs one INFO line naming the variant, a hit none."""
    import functools

    from cpattn import kernels

    calls = []

    @functools.lru_cache(maxsize=None)
    def fake(key, file, dtype, head_dim, chunk_size, device):
        calls.append(key)
        return {"k": key}

    wrapped = kernels.log_compiles(fake)  # the module's own wrapper, on a stand-in compiler
    with caplog.at_level(logging.INFO, logger="cpattn"):
        wrapped("x_f16_d64_c16", "x", "float16", 64, 16, 0)
        wrapped("x_f16_d64_c16", "x", "float16", 64, 16, 0)
    msgs = [r.getMessage() for r in caplog.records if r.name == "cpattn"]
    assert calls == ["x_f16_d64_c16"] and len(msgs) == 1 and msgs[0].startswith("compiled kernels x_f16_d64_c16 on device 0")
    assert np.isfinite(float(msgs[0].split(" in ")[1].split()[0]))
