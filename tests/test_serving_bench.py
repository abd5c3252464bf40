"""``cpattn bench serving`` on the CPU: arguments, outputs from fake rows, and (with torch) the
torch SDPA backend and the whole script on a tiny model against the NumPy reference pipeline.

The GPU run itself is ``cpattn bench serving`` (tools/gpu_check.sh serving); torch is not a
dependency, so everything that needs it skips cleanly without it.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest

from cpattn.bench import serving as bench
from cpattn.bench.flat_cache import FlatKVCache, TorchSdpaBackend
from cpattn.serving import shared_prompt_workload

TINY = ["--requests", "5", "--system-len", "70", "--own-len", "21", "--decode-steps", "6", "--layers", "2",
        "--hidden", "64", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "16", "--vocab", "64",
        "--chunk-size", "16", "--prefill-chunk", "32", "--warmup-steps", "1"]


# ============================================================================ arguments and CLI
def test_defaults_are_the_issue_workload():
    a = bench.parse_args([])
    assert (a.requests, a.system_len, a.own_len, a.decode_steps) == (64, 2048, 512, 128)
    assert (a.head_dim, a.q_heads, a.kv_heads, a.chunk_size) == (128, 32, 8, 64)
    assert 0.0 in a.alphas and a.device == "cuda" and a.sdpa_prefill_chunk == 0
    cfg = bench.model_config(a)
    assert (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (32, 8, 128, 4)


def test_overrides_and_bad_arguments(capsys):
    a = bench.parse_args(TINY + ["--alphas", "0", "0.1", "0", "--out", "x", "--device", "cpu"])
    assert (a.requests, a.decode_steps, a.alphas, a.out, a.device) == (5, 6, [0.0, 0.1], "x", "cpu")
    for bad in (["--prefill-chunk", "40"], ["--sdpa-prefill-chunk", "10"], ["--requests", "0"],
                ["--warmup-steps", "128"], ["--dtype", "float32"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(bad)
        assert e.value.code == 2, bad
    assert "--prefill-chunk" in capsys.readouterr().err


def test_cli_knows_serving(capsys):
    from cpattn import gpu_available
    from cpattn.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "serving", "--help"])
    assert e.value.code == 0
    assert "--decode-steps" in capsys.readouterr().out
    if not gpu_available():  # the benchmark itself needs a GPU; the CLI says so and returns 2
        assert main(["bench", "serving"]) == 2
        assert "needs CuPy and a CUDA GPU" in capsys.readouterr().err


def test_workload_shares_one_system_prompt():
    work = shared_prompt_workload(3, 4, 50, 7, 5, 64)
    assert len(work) == 4 and all(len(p) == 57 and m == 6 for p, m in work)
    assert all(p[:50] == work[0][0][:50] for p, _ in work)
    assert len({tuple(p[50:]) for p, _ in work}) == 4


def test_agreement_counts_positions_identical_requests_and_prefixes():
    ag = bench.agreement([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1]], [[1, 2, 3, 4], [5, 9, 7, 8], [2, 1]])
    assert ag["tokens"] == 10 and ag["tokens_equal"] == 8 and ag["requests_identical"] == 1
    assert ag["agree_frac"] == pytest.approx(0.8) and ag["prefix_frac"] == pytest.approx((4 + 1 + 0) / 10)


# ============================================================================ outputs from fake rows
def fake_rows():
    common = dict(requests=64, prompt_tokens=163840, prefill_chunks=68, decode_steps=128, decode_steps_timed=125,
                  decode_batch_mean=64.0, peak_sequences=64, evictions=0, run_s=3.0, warmup_s=1.0)
    ours = dict(common, pipeline=bench.PIPELINE_CPATTN, alpha=0.0, prefill_reused=129024, prefill_computed=34816,
                prefill_skipped_frac=129024 / 163840, prefill_s=0.5, prefill_us_per_prompt_token=3.05,
                prefill_us_per_computed_token=14.4, decode_step_ms_median=7.0, decode_step_ms_mean=7.4,
                decode_step_ms_p90=8.0, decode_step_ms_min=6.8, decode_tok_s=9000.0, plans_built=41,
                tokens_stored=38848, tokens_flat=167872, stored_frac=38848 / 167872, kv_mib_stored=607.0,
                kv_mib_flat=2623.0, kv_mib_allocated=700.0, agree_frac_vs_sdpa=0.99, prefix_frac_vs_sdpa=0.98,
                requests_identical_vs_sdpa=62, tokens_equal_vs_sdpa=8174, tokens_compared=8256)
    sparse = dict(ours, alpha=0.06, density_select=0.85, agree_frac_vs_sdpa=0.7)
    sdpa = dict(common, pipeline=bench.PIPELINE_SDPA, alpha="", prefill_reused=0, prefill_computed=163840,
                prefill_skipped_frac=0.0, prefill_s=2.0, prefill_us_per_prompt_token=12.2,
                prefill_us_per_computed_token=12.2, decode_step_ms_median=8.4, decode_step_ms_mean=8.5,
                decode_step_ms_p90=9.0, decode_step_ms_min=8.1, decode_tok_s=7500.0, plans_built=0,
                tokens_stored=167872, tokens_flat=167872, stored_frac=1.0, kv_mib_stored=2623.0, kv_mib_flat=2623.0,
                kv_mib_allocated=2688.0, masked_decode_calls=0, gathered_decode_calls=0)
    return [ours, sparse, sdpa]


def test_comparisons_and_markdown_csv_json(tmp_path):
    rows = fake_rows()
    summary = bench.add_comparisons(rows)
    assert rows[0]["decode_speedup_vs_sdpa"] == pytest.approx(1.2)
    assert rows[0]["prefill_speedup_vs_sdpa"] == pytest.approx(12.2 / 3.05)
    assert "decode_speedup_vs_sdpa" not in rows[2]
    assert summary["agree_frac_alpha0"] == 0.99 and summary["requests_identical_alpha0"] == 62
    args = vars(bench.parse_args([]))
    meta = dict(device="NVIDIA Fake 80GB", date="2026-01-02", args=args, summary=summary)
    steps = {"cpattn a=0": [7.0] * 128, "cpattn a=0.06": [7.1] * 128, "torch SDPA": [8.4] * 128}
    text = bench.write_outputs(rows, meta, steps, str(tmp_path))

    md = (tmp_path / "bench_serving.md").read_text()
    assert md == text
    assert md.startswith("## Serving pipeline end to end (NVIDIA Fake 80GB, 2026-01-02)\n")
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # header + one line per pipeline run
    assert "| cpattn | 0 | 7.00 (7.40) |" in md and "| torch SDPA | n/a | 8.40 (8.50) |" in md
    assert "129024 / 163840 (78.8%)" in md and "38848 / 167872 (23.1%)" in md and "1.20x" in md
    assert "0.9900 of the generated tokens equal" in md and "62/64 requests identical" in md

    with open(tmp_path / "bench_serving.csv") as fh:
        got = list(csv.DictReader(fh))
    assert [g["pipeline"] for g in got] == [r["pipeline"] for r in rows]
    assert float(got[0]["decode_step_ms_median"]) == 7.0 and got[2]["alpha"] == "" and got[2]["density_select"] == ""

    js = json.loads((tmp_path / "bench_serving.json").read_text())
    assert js["device"] == "NVIDIA Fake 80GB" and len(js["rows"]) == 3 and js["decode_step_ms"]["torch SDPA"][0] == 8.4
    if importlib.util.find_spec("matplotlib") is None:  # optional: no plot without it
        assert not os.path.exists(tmp_path / "bench_serving.png")
    else:
        assert (tmp_path / "bench_serving.png").stat().st_size > 0


def test_failed_runs_are_listed_not_tabled(tmp_path):
    rows = fake_rows()[:1] + [dict(pipeline=bench.PIPELINE_SDPA, alpha="", error="OutOfMemoryError: CUDA out of memory")]
    summary = bench.add_comparisons(rows)
    assert "decode_speedup_vs_sdpa" not in rows[0]
    meta = dict(device="GPU", date="2026-01-02", args=vars(bench.parse_args([])), summary=summary)
    md = bench.write_outputs(rows, meta, {"cpattn a=0": [7.0] * 3}, str(tmp_path))
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 2
    assert "Failed runs: torch SDPA: OutOfMemoryError: CUDA out of memory." in md
    assert "error" in (tmp_path / "bench_serving.csv").read_text().splitlines()[0].split(",")


# ============================================================================ with torch (CPU)
def _tiny_model(dtype="float16"):
    from cpattn.serving import ModelConfig, TinyLM

    cfg = ModelConfig(vocab_size=64, num_layers=2, hidden=64, num_q_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_hidden=128, locality=16.0, dtype=dtype)
    return TinyLM(cfg, seed=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sdpa_backend_against_the_float64_oracle(dtype):
    """Chunked prefill (first chunk ``is_causal``, the next one a lower-right mask) and batched
    decode (equal lengths: a view; unequal: key mask; rows out of order: gathered) match full
    causal attention in float64 to about one storage ulp."""
    pytest.importorskip("torch")
    from cpattn.serving import causal_attention
    from cpattn.reference.dtypes import to_float32, to_storage

    rng = np.random.default_rng(1)
    Hq, Hkv, D, lens = 4, 2, 16, [37, 37, 20]
    tol = 2e-3 if dtype == "float16" else 1.6e-2  # relative to max |o|: a few ulp of the storage dtype
    cache = FlatKVCache(1, Hkv, D, num_slots=4, max_len=64, chunk_size=8, dtype=dtype, device="cpu")
    backend = TorchSdpaBackend(cache, np, num_q_heads=Hq)
    seqs, qkv = [], []
    for n in lens:
        q, k, v = (to_storage(2 * rng.standard_normal((n + 2, h, D)).astype(np.float32), dtype) for h in (Hq, Hkv, Hkv))
        s = cache.add_sequence()
        outs = []
        for a, b in ((0, 16), (16, n)):  # two prefill chunks
            cache.write_kv(0, cache.reserve(s, list(range(b - a))), k[a:b], v[a:b])
            outs.append(to_float32(np.ascontiguousarray(backend.prefill(s, q[a:b], 0)), dtype))
        ref = causal_attention(np, *(to_float32(x[:n], dtype) for x in (q, k, v)))
        assert np.abs(np.concatenate(outs) - ref).max() <= tol * np.abs(ref).max()
        seqs.append(s)
        qkv.append((q, k, v))

    def decode(order):
        slots = cache.reserve_batch([seqs[i] for i in order], [0] * len(order))
        q = np.stack([qkv[i][0][cache.seq_len(seqs[i]) - 1] for i in order])
        cache.write_kv(0, slots, np.stack([qkv[i][1][cache.seq_len(seqs[i]) - 1] for i in order]),
                       np.stack([qkv[i][2][cache.seq_len(seqs[i]) - 1] for i in order]))
        o = to_float32(np.ascontiguousarray(backend.decode([seqs[i] for i in order], q, 0)), dtype)
        for row, i in enumerate(order):
            n = cache.seq_len(seqs[i])
            ref = causal_attention(np, *(to_float32(x[:n], dtype) for x in qkv[i]))[-1]
            assert np.abs(o[row] - ref).max() <= tol * np.abs(ref).max(), (order, i)

    decode([0, 1])  # lockstep: rows 0, 1, equal lengths (a view, no mask)
    assert backend.masked_calls == backend.gathered_calls == 0
    cache.release(seqs[0])
    seqs.append(cache.add_sequence())  # row 0 again, empty: give it a prompt of 5 tokens
    q, k, v = (to_storage(rng.standard_normal((6, h, D)).astype(np.float32), dtype) for h in (Hq, Hkv, Hkv))
    cache.write_kv(0, cache.reserve(seqs[3], list(range(5))), k[:5], v[:5])
    backend.prefill(seqs[3], q[:5], 0)
    qkv.append((q, k, v))
    decode([2, 1, 3])  # rows 2, 1, 0: gathered, lengths 21, 39, 6: masked
    assert backend.masked_calls == backend.gathered_calls == 1


def test_sdpa_backend_generates_the_reference_pipelines_tokens():
    """Unequal prompts and lengths (key masks), requests that finish early (rows no longer
    consecutive: gathered), chunked prefill with a past (lower-right causal mask): the torch SDPA
    pipeline generates the tokens of the NumPy reference pipeline at alpha 0 and of the dense model
    (float16: the rounding of its output hides the order of float32 sums; bf16 ties break apart)."""
    pytest.importorskip("torch")
    from cpattn.serving import PrefillOptions, Server, dense_generate, system_prompt_workload

    dtype = "float16"
    model = _tiny_model(dtype)
    work = system_prompt_workload(5, 7, num_systems=2, system_len=40, own_len=(3, 30), max_new_tokens=7,
                                  vocab=64)
    work[0] = (work[0][0], 7)  # the first request outlives some later ones: its row stays, theirs free
    ref = Server(model, 400, chunk_size=8, prefill_chunk=16, backend="numpy", options=PrefillOptions(alpha=0.0))
    ref_reqs = [ref.submit(p, m) for p, m in work]
    ref.run()

    cache = FlatKVCache(2, 2, 16, num_slots=len(work), max_len=max(len(p) + m for p, m in work),
                              chunk_size=8, dtype=dtype, device="cpu")
    backend = TorchSdpaBackend(cache, np, num_q_heads=4)
    server = Server(model, cache.num_chunks, chunk_size=8, prefill_chunk=16, backend=backend, max_batch=len(work))
    reqs = [server.submit(p, m) for p, m in work]
    rep = server.run()
    assert [r.output for r in reqs] == [r.output for r in ref_reqs]
    for r, (p, m) in list(zip(reqs, work))[:3]:
        assert r.output == dense_generate(model, p, m)
    assert rep.backend == "torch SDPA" and rep.prefill_reused == 0 and rep.prefill_computed == rep.prompt_tokens
    assert rep.peak["tokens_stored"] == rep.peak["tokens_flat"] and rep.evictions == 0
    assert rep.decode_calls == rep.decode_steps * 2 and backend.stats.prefill_calls > 2 * len(work)
    assert backend.masked_calls > 0 and backend.gathered_calls > 0  # every decode path ran
    assert not cache.sequences and cache.num_free == cache.num_chunks  # all rows released


def test_flat_cache_rows_and_slots():
    torch = pytest.importorskip("torch")
    from cpattn.reference.chunk_cache import CacheFullError

    cache = FlatKVCache(1, 2, 4, num_slots=2, max_len=10, chunk_size=4, device="cpu")
    assert cache.max_len == 12 and cache.num_chunks == 6 and cache.stats()["tokens_allocated"] == 24
    a, b = cache.add_sequence([1, 2, 3]), cache.add_sequence([4])
    assert cache.seq_len(a) == 0 and (cache.row(a), cache.row(b)) == (0, 1)
    with pytest.raises(CacheFullError):
        cache.add_sequence([5])
    k = np.arange(5 * 2 * 4, dtype=np.float16).reshape(5, 2, 4)
    s = cache.reserve(a, [1, 2, 3, 4, 5])
    cache.write_kv(0, s, k, -k)
    assert torch.equal(cache.k[0][0, :, :5], torch.from_numpy(k).transpose(0, 1))
    assert torch.equal(cache.v[0][0, :, :5], -torch.from_numpy(k).transpose(0, 1))
    cache.reserve(b, [1, 2])
    s = cache.reserve_batch([b, a], [7, 8])  # rows 1, 0 at positions 2, 5: the index_put_ path
    one = np.full((2, 2, 4), 3, np.float16)
    one[1] = 4
    cache.write_kv(0, s, one, one)
    assert float(cache.k[0][1, 0, 2, 0]) == 3 and float(cache.k[0][0, 1, 5, 3]) == 4
    assert cache.seq_chunks(a) == [0, 1] and cache.seq_chunks(b) == [3]
    st = cache.stats()
    assert st["tokens_stored"] == st["tokens_flat"] == 9 and cache.num_free == 3
    with pytest.raises(CacheFullError):
        cache.reserve(a, list(range(7)))
    cache.release(a)
    assert cache.add_sequence([9]) is not None and cache.row(2) == 0  # the lowest free row again


def test_the_whole_script_on_the_cpu(tmp_path, capsys):
    """``main`` end to end on a tiny model: NumPy reference pipeline (alpha 0 and 0.1) and torch SDPA
    on the CPU; tokens agree, outputs are written."""
    pytest.importorskip("torch")
    out = tmp_path / "o"
    assert bench.main(TINY + ["--device", "cpu", "--alphas", "0", "0.1", "--out", str(out)]) == 0
    js = json.loads((out / "bench_serving.json").read_text())
    rows = {(r["pipeline"], r["alpha"]): r for r in js["rows"]}
    ours, sdpa = rows[(bench.PIPELINE_CPATTN, 0.0)], rows[(bench.PIPELINE_SDPA, "")]
    assert ours["agree_frac_vs_sdpa"] == 1.0 and js["summary"]["requests_identical_alpha0"] == 5
    assert ours["prefill_reused"] == 4 * (70 // 16 * 16) and sdpa["prefill_reused"] == 0
    assert ours["tokens_stored"] < ours["tokens_flat"] == sdpa["tokens_flat"] == 5 * (91 + 6)
    assert ours["decode_steps"] == sdpa["decode_steps"] == 6 and ours["decode_steps_timed"] == 5
    assert len(js["decode_step_ms"]["torch SDPA"]) == 6 and (out / "bench_serving.csv").exists()
    md = (out / "bench_serving.md").read_text()
    assert "## Serving pipeline end to end (CPU" in md and "torch SDPA kernel used: decode " in md
    assert "math" in sdpa["sdpa_kernels_decode"] and sdpa["sdpa_kernels_prefill_default"] != "unknown"
    assert "] 6/6 torch SDPA: done" in capsys.readouterr().err  # the progress bar (stderr)


def test_a_failing_run_is_recorded_and_the_script_exits_1(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    real = bench.run_pipeline

    def flaky(pipeline, *args, **kwargs):
        if pipeline == bench.PIPELINE_SDPA:
            raise RuntimeError("no room\nsecond line")
        return real(pipeline, *args, **kwargs)

    monkeypatch.setattr(bench, "run_pipeline", flaky)
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + ["--device", "cpu", "--alphas", "0", "--out", str(tmp_path)])
    assert e.value.code == 1
    md = (tmp_path / "bench_serving.md").read_text()
    assert "Failed runs: torch SDPA: RuntimeError: no room." in md and "| cpattn | 0 |" in md


# ============================================================================ the one timer and table writer
class FakeClock:
    """Events that read a counter the timed calls advance; a buffer that counts its fills."""

    def __init__(self):
        self.now, self.log = 0.0, []

    def event(self):
        clock = self

        class Event:
            def record(self):
                self.t = clock.now
                clock.log.append("record")

        return Event()

    def elapsed_ms(self, start, stop):
        return stop.t - start.t

    def buffer(self, nbytes):
        clock = self

        class Buffer:
            size = nbytes

            def fill(self, value):
                clock.log.append(("flush", nbytes, value))

        return Buffer()


def test_timer_warms_up_flushes_before_every_timed_call_and_takes_the_median():
    from cpattn.bench.timing import L2_FLUSH_BYTES, GpuTimer

    clock = FakeClock()
    durations = iter([100.0, 100.0, 3.0, 1.0, 2.0, 50.0, 4.0])  # two warm-up calls, then five timed

    def fn():
        clock.now += next(durations)
        clock.log.append("call")

    timer = GpuTimer(warmup=2, iters=5, clock=clock)
    assert timer.median_ms(fn) == 3.0  # the median ignores the slow outlier; warm-up is not timed
    assert clock.log[:2] == ["call", "call"]
    timed = clock.log[2:]
    assert timed.count("call") == 5 and len(timed) == 5 * 4
    for i in range(5):  # flush, record, call, record: the flush is outside the events
        flush, rec1, call, rec2 = timed[4 * i:4 * i + 4]
        assert flush[:2] == ("flush", L2_FLUSH_BYTES) and (rec1, call, rec2) == ("record", "call", "record")
    assert len({f[2] for f in timed[::4]}) == 5  # a new value each time: the writes cannot be skipped
    assert L2_FLUSH_BYTES >= 200 << 20  # larger than any GPU's L2
    clock.log.clear()
    GpuTimer(warmup=0, iters=2, flush_bytes=0, clock=clock).runs_ms(lambda: None)
    assert not any(isinstance(e, tuple) for e in clock.log)
    with pytest.raises(ValueError, match="iters"):
        GpuTimer(iters=0, clock=clock)


def test_table_writer_leads_with_the_summary_columns(tmp_path):
    from cpattn.bench.table import SUMMARY_COLUMNS, csv_text, fmt, markdown_table, summary, write_tables

    rows = [dict(summary("GPU", "2026-01-02", "batch 32, own 512", 10.0, 25.0, 4.0), extra=1, alpha=0.5),
            dict(summary("GPU", "2026-01-02", "no peer", 10.0, float("nan")), zeta="a,b")]
    assert rows[0]["ratio"] == 2.5 and np.isnan(rows[1]["ratio"]) and rows[1]["floor"] == ""
    lines = csv_text(rows).splitlines()
    assert lines[0].split(",") == list(SUMMARY_COLUMNS) + ["alpha", "extra", "zeta"]
    got = list(csv.DictReader(lines))
    assert got[0]["config"] == "batch 32, own 512" and got[1]["zeta"] == "a,b" and got[1]["extra"] == ""
    assert fmt(float("nan")) == fmt(None) == fmt("") == "n/a" and fmt(2.0, "{:.1f}x") == "2.0x"
    assert markdown_table(["a", "b"], [[1, 2]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    paths = write_tables(str(tmp_path / "out"), "bench_x", rows, dict(device="GPU"), "# md\n", extra=dict(k=[1]))
    assert open(paths["md"]).read() == "# md\n" and open(paths["csv"]).read() == csv_text(rows)
    js = json.loads(open(paths["json"]).read())
    assert js["device"] == "GPU" and js["k"] == [1] and js["rows"][0]["ours"] == 10.0


def test_serving_rows_carry_the_summary_columns(tmp_path):
    rows = fake_rows()
    summary = bench.add_comparisons(rows)
    meta = dict(device="GPU", date="2026-01-02", args=vars(bench.parse_args([])), summary=summary)
    bench.write_outputs(rows, meta, {}, str(tmp_path))
    got = list(csv.DictReader(open(tmp_path / "bench_serving.csv")))
    assert [g["config"] for g in got] == ["cpattn alpha 0", "cpattn alpha 0.06", "torch SDPA"]
    assert float(got[0]["ratio"]) == pytest.approx(8.4 / 7.0) and got[2]["ours"] == ""


def test_bench_modules_use_the_one_timer_and_writer():
    """No module of cpattn.bench times with its own events or writes its own CSV."""
    import pathlib

    import cpattn.bench

    for path in pathlib.Path(cpattn.bench.__file__).parent.glob("*.py"):
        text = path.read_text()
        if path.name in ("timing.py", "table.py"):
            continue
        assert "get_elapsed_time(a, b)" not in text and "Event(enable_timing" not in text, path.name
        assert '.write(",".join' not in text and "csv." not in text, path.name


@pytest.mark.parametrize("script,needle", [("tools/soak.py", "--ops"), ("tools/selection_frontier.py", "--past"),
                                           ("tools/bench_decode.py", "--quick"), ("tools/bench_prefill.py", "--configs")])
def test_tools_scripts_run_from_anywhere(tmp_path, script, needle):
    """The scripts are thin: they import the installed cpattn (no sys.path games), from any directory."""
    import pathlib
    import subprocess
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / script
    assert "sys.path.insert" not in path.read_text()
    done = subprocess.run([sys.executable, str(path), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert needle in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("cpattn").gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_timer_on_the_device():
    import cupy

    from cpattn.bench.timing import L2_FLUSH_BYTES, GpuTimer

    x = cupy.ones(1 << 24, cupy.float32)
    timer = GpuTimer(warmup=1, iters=5)
    runs = timer.runs_ms(lambda: cupy.multiply(x, 2, out=x))
    assert len(runs) == 5 and all(t > 0 for t in runs)
    assert timer.median_ms(lambda: None) < min(runs)  # an empty call times less than 64 MB of traffic
    assert timer.clock.buffer(16).nbytes == 16 and L2_FLUSH_BYTES > cupy.cuda.Device().attributes["L2CacheSize"]
