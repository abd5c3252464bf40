#!/usr/bin/env python3
"""Serving benchmark: the serving example end to end, cpattn vs the same pipeline on torch SDPA.

One model (``TinyLM`` on CuPy, default 4 layers, hidden 1024, GQA 32/8, D 128, float16), one
workload (64 requests sharing a 2048-token system prompt, 512 own prompt tokens each, 128 decode
steps with all requests in one batch) and one serving loop (``Server``: admission, prefill,
batched decode, release). Only the KV cache and the attention call differ:

  cpattn      ``GpuChunkCache`` (prefix reuse: the system prompt is prefilled once),
              CompactAttention chunked prefill, ChunkAttention decode (``ChunkTreeBackend``);
              once per ``--alphas`` value (alpha 0 reads every block: dense)
  torch SDPA  a static per-request K/V cache in torch tensors (``FlatKVCache``: [requests, Hkv,
              max_len, D] per layer, no sharing), every prompt prefilled whole with
              ``F.scaled_dot_product_attention(..., is_causal=True)``, decode batched over the
              requests' own contiguous K/V (padded, with a key mask only when lengths differ)
              (``TorchSdpaBackend``); q/k/v/o cross between CuPy and torch by DLPack, no copies

Measured: decode step time (synchronized wall time of a whole step: model, cache writes and
attention for every layer; median over the steps after ``--warmup-steps``), prefill time per
prompt token and per computed token, prefill tokens skipped by reuse, tokens stored at peak vs
a flat cache, and the generated tokens of each cpattn run compared with torch SDPA's (at alpha 0
they must agree: the fraction is reported, and the run fails below ``--min-agreement``).
Writes a markdown section (BENCHMARKS.md), CSV, JSON and a PNG plot under ``--out``.

    cpattn bench serving --out DIR [--requests 64 --system-len 2048 --own-len 512 --decode-steps 128]
"""
from __future__ import annotations

import argparse
import json
import datetime
import os
import sys
import time

import numpy as np

from ..serving import ModelConfig, PrefillOptions, Server, TinyLM, footprint_chunks, shared_prompt_workload
from ..serving.model import add_model_arguments, config_from_args
from . import progress, pyplot
from .flat_cache import FlatKVCache, TorchSdpaBackend
from .table import fmt, summary, write_tables

PIPELINE_CPATTN, PIPELINE_SDPA = "cpattn", "torch SDPA"


# ============================================================================ arguments
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="cpattn bench serving", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out", help="directory of the table, CSV, JSON and PNG")
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="only draw the plot again from a JSON this benchmark wrote (PNG next to it); no GPU")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--system-len", type=int, default=2048, help="tokens of the shared system prompt")
    ap.add_argument("--own-len", type=int, default=512, help="own prompt tokens of each request")
    ap.add_argument("--decode-steps", type=int, default=128,
                    help="decode steps per request (each generates decode-steps + 1 tokens: the first "
                         "comes from the prefill)")
    add_model_arguments(ap, num_layers=4, hidden=1024, num_q_heads=32, num_kv_heads=8, head_dim=128)
    ap.add_argument("--chunk-size", type=int, default=64, help="cpattn chunk = CompactAttention block")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="cpattn prefill chunk (tokens)")
    ap.add_argument("--sdpa-prefill-chunk", type=int, default=0,
                    help="torch SDPA prefill chunk; 0 (default): the whole prompt in one is_causal call")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.06],
                    help="cpattn runs, one per CompactAttention alpha (0: every block, the dense comparison)")
    ap.add_argument("--warmup-steps", type=int, default=3, help="decode steps left out of the median")
    ap.add_argument("--min-agreement", type=float, default=0.9,
                    help="lowest acceptable share of generated tokens equal between cpattn at alpha 0 and "
                         "torch SDPA (position by position); below it the run exits 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: NumPy reference pipeline and torch on the CPU (a smoke test of this "
                         "script; its times mean nothing)")
    a = ap.parse_args(argv)
    for name in ("requests", "system_len", "own_len", "decode_steps", "layers", "chunk_size", "prefill_chunk"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(a, name)}")
    if a.prefill_chunk % a.chunk_size:
        ap.error(f"--prefill-chunk: expected a multiple of --chunk-size {a.chunk_size}, got {a.prefill_chunk}")
    if a.sdpa_prefill_chunk < 0 or a.sdpa_prefill_chunk % a.chunk_size:
        ap.error(f"--sdpa-prefill-chunk: expected 0 or a multiple of --chunk-size {a.chunk_size}, "
                 f"got {a.sdpa_prefill_chunk}")
    if a.warmup_steps < 0 or a.warmup_steps >= a.decode_steps:
        ap.error(f"--warmup-steps: expected 0 to {a.decode_steps - 1}, got {a.warmup_steps}")
    a.alphas = list(dict.fromkeys(float(x) for x in a.alphas))  # one run per distinct alpha
    return a


def model_config(args) -> ModelConfig:
    return config_from_args(args)


# ============================================================================ the two pipelines
def make_server(pipeline: str, model, work, args, alpha: float = 0.0, on_step=None) -> Server:
    """A ``Server`` for one pipeline sized for ``work`` [(prompt, max_new_tokens)]; ``on_step`` is
    the server's hook (called after every timed prefill and decode step)."""
    cfg, c, on_gpu = model.config, args.chunk_size, args.device == "cuda"
    if pipeline == PIPELINE_CPATTN:
        need = footprint_chunks(work, c)
        return Server(model, need + need // 4 + 4, c, args.prefill_chunk, "cupy" if on_gpu else "numpy",
                      PrefillOptions(alpha=alpha), measure_recall=False, max_batch=len(work), on_step=on_step)
    cache = FlatKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_slots=len(work),
                        max_len=max(len(p) + m - 1 for p, m in work), chunk_size=c, dtype=cfg.dtype,
                        device="cuda" if on_gpu else "cpu")
    backend = TorchSdpaBackend(cache, model.xp, cfg.num_q_heads)
    prefill_chunk = args.sdpa_prefill_chunk or cache.max_len  # default: every prompt in one call
    return Server(model, cache.num_chunks, c, prefill_chunk, backend, max_batch=len(work), on_step=on_step)


def warm_up(pipeline: str, model, args, alpha: float = 0.0) -> dict:
    """A scratch run of the pipeline (kernel compilation, the plan builder's first call, torch and
    cuBLAS initialisation): prompts over two prefill chunks sharing a prefix, equal and unequal
    lengths, so every path of both backends runs once before anything is timed. Returns, for torch
    SDPA, which SDPA kernels accept its calls (``TorchSdpaBackend.probe_kernels``)."""
    P, V = args.prefill_chunk, model.config.vocab_size
    base = [t % V for t in range(2 * P)]
    work = [(base + [1, 2, 3], 3), (base + [4, 5, 6], 3), (base + [7], 4)]
    server = make_server(pipeline, model, work, args, alpha)
    for p, m in work:
        server.submit(p, m)
    server.run()
    if pipeline == PIPELINE_SDPA:
        try:
            return server.backend.probe_kernels()
        except Exception as e:  # noqa: BLE001  (diagnostic only)
            return dict(decode=f"probe failed: {type(e).__name__}", prefill="")
    return {}


def _free_device_memory(args) -> None:
    if args.device != "cuda":
        return
    import cupy
    import torch

    torch.cuda.synchronize()
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def run_pipeline(pipeline: str, model, work, args, alpha: float = 0.0, on_step=None):
    """Serve ``work`` once; returns (row of numbers, generated tokens per request, step times in ms)."""
    t0 = time.perf_counter()
    server = make_server(pipeline, model, work, args, alpha, on_step)
    reqs = [server.submit(p, m) for p, m in work]
    rep = server.run()
    wall = time.perf_counter() - t0
    row = pipeline_row(pipeline, alpha, rep, server.cache, args.warmup_steps)
    row["run_s"] = wall
    if pipeline == PIPELINE_SDPA:
        row["masked_decode_calls"] = server.backend.masked_calls
        row["gathered_decode_calls"] = server.backend.gathered_calls
    outputs = [list(r.output) for r in reqs]
    steps_ms = [1e3 * s for s in rep.decode_step_s]
    del server
    return row, outputs, steps_ms


def pipeline_row(pipeline, alpha, rep, cache, warmup_steps) -> dict:
    """One CSV row (the table's summary columns are added by ``with_summary``) from a
    ``ServingReport``; its per-step times are synchronized wall times in seconds."""
    step_s, step_batch, prefill_s = rep.decode_step_s, rep.decode_step_batch, rep.prefill_s
    steps = np.asarray(step_s[warmup_steps:] or step_s, np.float64) * 1e3
    pk = rep.peak
    mib = rep.bytes_per_token / 2 ** 20
    if pipeline == PIPELINE_CPATTN:
        allocated = cache.num_chunks * cache.chunk_size
    else:
        allocated = cache.num_slots * cache.max_len
    row = dict(
        pipeline=pipeline, alpha=alpha if pipeline == PIPELINE_CPATTN else "",
        requests=rep.requests, prompt_tokens=rep.prompt_tokens, prefill_reused=rep.prefill_reused,
        prefill_computed=rep.prefill_computed, prefill_chunks=rep.prefill_chunks,
        prefill_skipped_frac=rep.prefill_reused / max(1, rep.prompt_tokens),
        prefill_s=prefill_s, prefill_us_per_prompt_token=1e6 * prefill_s / max(1, rep.prompt_tokens),
        prefill_us_per_computed_token=1e6 * prefill_s / max(1, rep.prefill_computed),
        decode_steps=len(step_s), decode_steps_timed=int(steps.size),
        decode_batch_mean=float(np.mean(step_batch)) if step_batch else 0.0,
        decode_step_ms_median=float(np.median(steps)) if steps.size else float("nan"),
        decode_step_ms_mean=float(np.mean(steps)) if steps.size else float("nan"),
        decode_step_ms_p90=float(np.percentile(steps, 90)) if steps.size else float("nan"),
        decode_step_ms_min=float(np.min(steps)) if steps.size else float("nan"),
        decode_tok_s=sum(step_batch) / max(sum(step_s), 1e-12),
        plans_built=rep.plans_built if pipeline == PIPELINE_CPATTN else 0,
        peak_sequences=pk.get("sequences", 0), tokens_stored=pk.get("tokens_stored", 0),
        tokens_flat=pk.get("tokens_flat", 0),
        stored_frac=pk.get("tokens_stored", 0) / max(1, pk.get("tokens_flat", 0)),
        kv_mib_stored=pk.get("tokens_stored", 0) * mib, kv_mib_flat=pk.get("tokens_flat", 0) * mib,
        kv_mib_allocated=allocated * mib, evictions=rep.evictions,
    )
    for k, v in (rep.density or {}).items():
        row[f"density_{k}"] = float(v)
    return row


# ============================================================================ comparison
def agreement(a: list, b: list) -> dict:
    """Generated tokens of two runs (per request): positions equal, identical requests, and the
    common prefix (tokens before a request's first difference; after one, the requests continue
    from different tokens and agree only by chance)."""
    tokens = equal = same = prefix = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        tokens += n
        equal += sum(s == t for s, t in zip(x, y))
        same += x == y
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix += k
    return dict(tokens=tokens, tokens_equal=equal, requests=len(a), requests_identical=same,
                agree_frac=equal / max(1, tokens), prefix_frac=prefix / max(1, tokens))


def add_comparisons(rows: list) -> dict:
    """Speed-ups of every cpattn row against the torch SDPA row (in place); the summary."""
    sdpa = next((r for r in rows if r["pipeline"] == PIPELINE_SDPA and "error" not in r), None)
    summary = {}
    for r in rows:
        if r["pipeline"] != PIPELINE_CPATTN or sdpa is None or "error" in r:
            continue
        r["decode_speedup_vs_sdpa"] = sdpa["decode_step_ms_median"] / r["decode_step_ms_median"]
        r["prefill_speedup_vs_sdpa"] = sdpa["prefill_us_per_prompt_token"] / r["prefill_us_per_prompt_token"]
        r["kv_stored_vs_sdpa"] = r["tokens_stored"] / max(1, sdpa["tokens_stored"])
    zero = next((r for r in rows if r["pipeline"] == PIPELINE_CPATTN and r["alpha"] == 0.0
                 and "agree_frac_vs_sdpa" in r), None)
    if zero is not None:
        summary.update(agree_frac_alpha0=zero["agree_frac_vs_sdpa"], prefix_frac_alpha0=zero["prefix_frac_vs_sdpa"],
                       requests_identical_alpha0=zero["requests_identical_vs_sdpa"], requests=zero["requests"])
    return summary


# ============================================================================ outputs
def _fmt(r: dict, key: str, spec: str = "{:.2f}") -> str:
    return fmt(r.get(key), spec)


def markdown(rows: list, meta: dict) -> str:
    """The BENCHMARKS.md section."""
    a = meta["args"]
    gpu = a.get("device", "cuda") == "cuda"
    model_lib, cache_cls = ("CuPy", "`GpuChunkCache`") if gpu else ("NumPy", "the NumPy reference `ChunkCache`")
    conv = "CuPy and torch" if gpu else "NumPy and torch"
    md = [f"## Serving pipeline end to end ({meta['device']}, {meta['date']})", "",
          f"`TinyLM` ({a['layers']} layers, hidden {a['hidden']}, Hq {a['q_heads']} / Hkv {a['kv_heads']}, "
          f"D {a['head_dim']}, {a['dtype']}, vocab {a['vocab']}, random weights, seed {a['seed']}); "
          f"{a['requests']} requests sharing one {a['system_len']}-token system prompt plus {a['own_len']} own "
          f"prompt tokens each, {a['decode_steps']} decode steps (all requests in one batch). The same `Server` loop "
          f"and the same {model_lib} model in both pipelines; only the KV cache and the attention call differ. "
          f"cpattn: {cache_cls} with prefix reuse (chunk {a['chunk_size']}), CompactAttention prefill in "
          f"chunks of {a['prefill_chunk']}, ChunkAttention decode. torch SDPA: a static per-request K/V cache "
          f"(torch tensors [requests, Hkv, max_len, D] per layer, no sharing), each prompt prefilled whole with "
          f"`is_causal=True`, decode batched over the requests' own K/V; q/k/v/o cross between {conv} "
          f"by DLPack without copies. Decode step = synchronized wall time of a whole step (model, K/V writes, "
          f"attention, all layers), median (mean) over the steps after {a['warmup_steps']} warm-up steps. "
          f"Prefill = synchronized wall time of all prompts, per prompt token (per computed token). "
          f"Generated by `cpattn bench serving`.", "",
          "| pipeline | alpha | decode step ms | decode tok/s | prefill us / prompt token (/ computed) "
          "| prefill skipped by reuse | peak tokens stored / flat cache | K/V MiB stored (allocated) "
          "| tokens equal to SDPA | decode vs SDPA | prefill vs SDPA |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            continue
        md.append(
            f"| {r['pipeline']} | {_fmt(r, 'alpha', '{:g}')} | {_fmt(r, 'decode_step_ms_median')} "
            f"({_fmt(r, 'decode_step_ms_mean')}) | {_fmt(r, 'decode_tok_s', '{:.0f}')} | "
            f"{_fmt(r, 'prefill_us_per_prompt_token', '{:.2f}')} ({_fmt(r, 'prefill_us_per_computed_token', '{:.2f}')}) | "
            f"{r['prefill_reused']} / {r['prompt_tokens']} ({100 * r['prefill_skipped_frac']:.1f}%) | "
            f"{r['tokens_stored']} / {r['tokens_flat']} ({100 * r['stored_frac']:.1f}%) | "
            f"{_fmt(r, 'kv_mib_stored', '{:.1f}')} ({_fmt(r, 'kv_mib_allocated', '{:.1f}')}) | "
            f"{_fmt(r, 'agree_frac_vs_sdpa', '{:.4f}')} | {_fmt(r, 'decode_speedup_vs_sdpa', '{:.2f}x')} | "
            f"{_fmt(r, 'prefill_speedup_vs_sdpa', '{:.2f}x')} |")
    md.append("")
    s = meta.get("summary", {})
    if "agree_frac_alpha0" in s:
        md.append(f"Token agreement, cpattn at alpha 0 vs torch SDPA: {s['agree_frac_alpha0']:.4f} of the generated "
                  f"tokens equal position by position, {s['prefix_frac_alpha0']:.4f} before a request's first "
                  f"difference, {s['requests_identical_alpha0']}/{s['requests']} requests identical "
                  f"(both accumulate attention in float32 and round its output to {a['dtype']}; a token can only "
                  f"change at a near tie of the top two logits, and the request then continues from another "
                  f"token). Required: at least {a['min_agreement']}.")
    failed = [r for r in rows if "error" in r]
    if failed:
        md.append("Failed runs: " + "; ".join(
            f"{r['pipeline']}" + (f" alpha {r['alpha']:g}" if r["pipeline"] == PIPELINE_CPATTN else "")
            + f": {r['error']}" for r in failed) + ".")
    sd = next((r for r in rows if r["pipeline"] == PIPELINE_SDPA and "error" not in r), None)
    if sd is not None and "sdpa_kernels_decode" in sd:
        md.append(f"torch SDPA kernel used: decode {sd.get('sdpa_kernels_decode_default', 'n/a')} "
                  f"(accepted: {sd['sdpa_kernels_decode']}), prefill {sd.get('sdpa_kernels_prefill_default', 'n/a')} "
                  f"(accepted: {sd.get('sdpa_kernels_prefill', 'n/a')}).")
    if sd is not None and (sd.get("masked_decode_calls") or sd.get("gathered_decode_calls")):
        md.append(f"torch SDPA decode calls with a key mask: {sd['masked_decode_calls']}, with gathered rows: "
                  f"{sd['gathered_decode_calls']}.")
    md.append("")
    return "\n".join(md)


def with_summary(rows: list, meta: dict) -> list:
    """The rows with the table's leading columns: ours / peer = decode step ms (median) of the
    cpattn run / of torch SDPA, ratio = peer / ours; no floor."""
    sdpa = next((r for r in rows if r["pipeline"] == PIPELINE_SDPA and "error" not in r), {})
    out = []
    for r in rows:
        ours = r.get("decode_step_ms_median") if r["pipeline"] == PIPELINE_CPATTN else None
        config = f"{r['pipeline']} alpha {r['alpha']:g}" if r["pipeline"] == PIPELINE_CPATTN else r["pipeline"]
        out.append(dict(summary(meta["device"], meta["date"], config, ours, sdpa.get("decode_step_ms_median")), **r))
    return out


def plot(rows: list, steps_ms: dict, path: str, dev: str, warmup_steps: int = 0) -> bool:
    """Decode step times (log axis, and their distribution, so a few slow steps cannot flatten
    the rest), prefill time per prompt token and peak K/V tokens, per pipeline."""
    plt = pyplot()
    if plt is None:
        return False
    rows = [r for r in rows if "error" not in r]
    names = [f"{r['pipeline']}" + (f" a={r['alpha']:g}" if r["pipeline"] == PIPELINE_CPATTN else "") for r in rows]
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    steps = {n: np.asarray(steps_ms.get(n, []), np.float64) for n in names}
    positive = np.concatenate([v[v > 0] for v in steps.values()] + [np.zeros(0)])
    positive = positive if positive.size else np.ones(1)
    bins = np.geomspace(positive.min() * 0.9, positive.max() * 1.1, 50)
    for i, name in enumerate(names):
        t, col = steps[name], colors[i % len(colors)]
        if not len(t):
            continue
        med = float(np.median(t[warmup_steps:] if len(t) > warmup_steps else t))
        ax[0].plot(np.arange(1, len(t) + 1), t, lw=1, color=col, label=f"{name} (median {med:.1f} ms)")
        ax[0].axhline(med, color=col, lw=0.8, ls="--")
        ax[1].hist(t, bins=bins, color=col, alpha=0.55, label=name)
    if warmup_steps:
        ax[0].axvspan(0.5, warmup_steps + 0.5, color="0.9", zorder=0, label=f"warm-up ({warmup_steps} steps, not in the median)")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("decode step")
    ax[0].set_ylabel("step time (ms, all layers; log scale)")
    ax[0].set_title("decode step time")
    for a in ax[:2]:
        if a.get_legend_handles_labels()[0]:  # a run without step times has nothing to label
            a.legend(fontsize=7)
    ax[1].set_xscale("log")
    ax[1].set_xlabel("step time (ms, log scale)")
    ax[1].set_ylabel("decode steps")
    ax[1].set_title("decode step time distribution")
    x = np.arange(len(rows))
    vals = [r["prefill_us_per_prompt_token"] for r in rows]
    bars = ax[2].bar(x, vals, 0.6, color=[colors[i % len(colors)] for i in range(len(rows))])
    ax[2].bar_label(bars, [f"{v:.2f}" for v in vals], fontsize=8)
    ax[2].set_xticks(x, names, fontsize=8)
    ax[2].set_ylabel("prefill us per prompt token")
    ax[2].set_title("prefill (prefix reuse included)")
    stored = ax[3].bar(x - 0.2, [r["tokens_stored"] for r in rows], 0.4, label="stored")
    ax[3].bar(x + 0.2, [r["tokens_flat"] for r in rows], 0.4, label="flat cache")
    ax[3].bar_label(stored, [f"{r['tokens_stored'] / max(r['tokens_flat'], 1):.0%}" for r in rows], fontsize=8)
    ax[3].set_xticks(x, names, fontsize=8)
    ax[3].set_ylabel("K/V tokens at peak")
    ax[3].set_title("memory (stored, as a share of flat)")
    ax[3].set_ylim(0, 1.15 * max([r["tokens_flat"] for r in rows] + [1]))
    ax[3].legend(fontsize=8, loc="upper center", ncol=2)
    fig.suptitle(f"Serving pipeline end to end ({dev})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")
    return True


def replot(json_path: str, png_path: str | None = None) -> str:
    """Draw the plot again from a benchmark's JSON (rows, decode_step_ms, device, args); the PNG
    goes next to the JSON (same name, .png) unless ``png_path`` is given. Nothing is measured."""
    with open(json_path) as f:
        data = json.load(f)
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    warm = int(data.get("args", {}).get("warmup_steps", 0))
    plot(data["rows"], data.get("decode_step_ms", {}), png_path, data.get("device", "?"), warm)
    return png_path


def write_outputs(rows: list, meta: dict, steps_ms: dict, out: str) -> str:
    """bench_serving.md / .csv / .json / .png under ``out``; returns the markdown."""
    text = markdown(rows, meta)
    write_tables(out, "bench_serving", with_summary(rows, meta), meta, text, extra=dict(decode_step_ms=steps_ms))
    try:
        plot(rows, steps_ms, os.path.join(out, "bench_serving.png"), meta["device"],
             int(meta["args"].get("warmup_steps", 0)))
    except Exception as e:  # noqa: BLE001  (the numbers are written; a plotting problem loses only the picture)
        print(f"plot failed: {type(e).__name__}: {e}")
    return text


# ============================================================================ main
def _versions(args) -> dict:
    import torch

    out = dict(torch=torch.__version__)
    if args.device == "cuda":
        import cupy

        out["cupy"] = cupy.__version__
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        replot(args.replot)
        return 0
    try:  # the peer: fail early, before anything is measured
        import torch
    except ImportError:
        raise SystemExit("cpattn bench serving: needs PyTorch for the torch SDPA pipeline (pip install torch)")

    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(1)  # torch's spinning threads would compete with NumPy's BLAS for the cores
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    import torch

    if args.device == "cuda":
        import cupy as xp

        dev = xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        xp, dev = np, "CPU (NumPy reference, torch CPU; smoke run)"
    cfg = model_config(args)
    model = TinyLM(cfg, seed=args.seed, xp=xp)
    work = shared_prompt_workload(args.seed + 1, args.requests, args.system_len, args.own_len, args.decode_steps,
                                  cfg.vocab_size)
    runs = [(PIPELINE_CPATTN, float(al)) for al in args.alphas] + [(PIPELINE_SDPA, 0.0)]
    print(f"device {dev}, torch {torch.__version__}; {cfg.num_layers}-layer TinyLM (hidden {cfg.hidden}, Hq {cfg.num_q_heads} Hkv "
          f"{cfg.num_kv_heads} D {cfg.head_dim}, {cfg.dtype}); {args.requests} requests x ({args.system_len} shared "
          f"+ {args.own_len} own) prompt tokens, {args.decode_steps} decode steps", flush=True)
    n = 2 * len(runs)
    rows, outputs, steps_ms = [], {}, {}
    for i, (pipeline, alpha) in enumerate(runs):
        name = pipeline + (f" a={alpha:g}" if pipeline == PIPELINE_CPATTN else "")
        progress(2 * i, n, f"{name}: warm-up")

        decoded = [0]

        def on_step(kind, seconds, requests, name=name, i=i, decoded=decoded):  # the Server's hook
            if kind != "decode":
                return
            decoded[0] += 1
            k = decoded[0]
            if k % 8 == 0 or k == args.decode_steps:
                progress(2 * i + 1, n, f"{name}: decode step {k}/{args.decode_steps}")

        try:
            t0 = time.perf_counter()
            kernels = warm_up(pipeline, model, args, alpha)
            warm_s = time.perf_counter() - t0
            progress(2 * i + 1, n, f"{name}: prefill {args.requests} prompts")
            row, outputs[name], steps_ms[name] = run_pipeline(pipeline, model, work, args, alpha, on_step)
            row["warmup_s"] = warm_s
            row.update({f"sdpa_kernels_{k}": v for k, v in kernels.items()})
        except Exception as e:  # noqa: BLE001  (recorded; the other runs still report)
            import traceback

            traceback.print_exc()
            row = dict(pipeline=pipeline, alpha=alpha if pipeline == PIPELINE_CPATTN else "",
                       error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
        rows.append(row)
        _free_device_memory(args)
        progress(2 * i + 2, n, f"{name}: done")
        print("   " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    sdpa_out = outputs.get(PIPELINE_SDPA)
    for r in rows:
        name = f"{PIPELINE_CPATTN} a={r['alpha']:g}" if r["pipeline"] == PIPELINE_CPATTN else None
        if name in outputs and sdpa_out is not None:
            ag = agreement(outputs[name], sdpa_out)
            r.update(tokens_equal_vs_sdpa=ag["tokens_equal"], tokens_compared=ag["tokens"],
                     agree_frac_vs_sdpa=ag["agree_frac"], prefix_frac_vs_sdpa=ag["prefix_frac"],
                     requests_identical_vs_sdpa=ag["requests_identical"])
    summary = add_comparisons(rows)
    meta = dict(device=dev, date=datetime.date.today().isoformat(), args=vars(args), summary=summary,
                **_versions(args))
    print(write_outputs(rows, meta, steps_ms, args.out))
    if "agree_frac_alpha0" in summary and summary["agree_frac_alpha0"] < args.min_agreement:
        print(f"FAILED: cpattn at alpha 0 and torch SDPA agree on {summary['agree_frac_alpha0']:.4f} of the "
              f"generated tokens (at least {args.min_agreement} required)", file=sys.stderr)
        raise SystemExit(1)
    if any("error" in r for r in rows):
        print("FAILED: " + "; ".join(f"{r['pipeline']}: {r['error']}" for r in rows if "error" in r), file=sys.stderr)
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
