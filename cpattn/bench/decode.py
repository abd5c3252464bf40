#!/usr/bin/env python3
"""Shared-prefix decode benchmark: cpattn ChunkAttention vs the peers a PyTorch user would pick.

For each (batch, shared prompt, own tokens) and head layout, in one run:
  ours      two-phase decode (attend + merge launches), eager and CUDA-graph replay
  sdpa      torch SDPA over materialised per-sequence K/V, flash and cuDNN backends
  cascade   Hydragen-style: all queries vs the shared prefix as one sequence + each query vs its
            own suffix, two flash calls returning the LSE, merged, captured in a CUDA graph
  floor     unique K/V bytes over measured device copy bandwidth
Timings: ``cpattn.bench.timing.GpuTimer`` (CUDA events around each call after warm-up, the L2
flushed before each, median of --iters runs). Also the plan-build time for 256 sequences.
Writes a markdown table (BENCHMARKS.md section), CSV, JSON (``cpattn.bench.table``) and a plot.

    cpattn bench decode --out DIR   (or python tools/bench_decode.py) [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import numpy as np

from ..reference.checks import cdiv
from . import bar_chart, progress
from .table import fmt, markdown_table, summary, write_tables
from .timing import L2_FLUSH_BYTES, GpuTimer


CONFIGS = [(32, 1024, 512), (32, 4096, 512), (64, 2048, 512), (128, 4096, 256)]
LAYOUTS = [("MHA 32", 32, 32), ("GQA 32/8", 32, 8)]


def copy_bandwidth():
    """Device copy bandwidth in bytes/s (bytes read + written), 1 GiB buffers."""
    import cupy

    n = 1 << 30
    x = cupy.random.randint(0, 255, n, dtype=cupy.uint8)
    y = cupy.empty_like(x)
    ms = GpuTimer(warmup=3, iters=20).median_ms(lambda: cupy.copyto(y, x))
    del x, y
    return 2 * n / (ms * 1e-3)


def build(batch, shared, own, Hkv, D, c, share=True, seed=0, k=1):
    """A GPU cache holding batch sequences (shared + own tokens + k decode tokens), random K/V."""
    import cupy

    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.reference.workloads import shared_prefix_prompts

    prompts = shared_prefix_prompts(batch, shared, own, seed=seed)
    if not share:  # no common prefix at all
        rng = np.random.default_rng(seed + 1)
        prompts = [rng.integers(0, 32000, shared + own).tolist() for _ in range(batch)]
    chunks = batch * cdiv(shared + own + k, c) + 8
    cache = GpuChunkCache(1, Hkv, D, chunks, chunk_size=c, dtype="float16", max_sequences=batch + 8)
    rs = cupy.random.RandomState(seed)
    for pool in (cache.k_pool, cache.v_pool):
        for i in range(0, chunks, 256):
            pool[:, i:i + 256] = rs.standard_normal(pool[:, i:i + 256].shape, dtype=cupy.float32).astype(cupy.float16)
    ids = []
    for p in prompts:  # structure only: the pool already holds random K/V
        sid = cache.add_sequence(p)
        cache.reserve(sid, p[cache.seq_len(sid):])
        cache.commit(sid)
        ids.append(sid)
    for _ in range(k):  # the decode tokens, one batch step at a time
        cache.reserve_batch(ids, [1] * batch)
        for sid in ids:
            cache.commit(sid)
    cache.sync_lens()
    return cache, ids


def ours_timings(dec, ids, Hq, q, timer, k=1, **plan_kw):
    """(plan ms, eager us, graph-replay us, output) of ``dec`` on ``q`` [B * k, Hq, D]."""
    import cupy

    t0 = time.perf_counter()
    plan = dec.plan(ids, Hq, queries_per_seq=k, **plan_kw)
    plan_ms = (time.perf_counter() - t0) * 1e3
    out = cupy.full(q.shape, np.nan, q.dtype)  # poisoned: every row must be written
    eager = timer.median_ms(lambda: dec.run(q, 0, out=out))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dec.run(q, 0, out=out)
        stream.begin_capture()
        dec.run(q, 0, out=out)
        graph = stream.end_capture()
        replay = timer.median_ms(lambda: graph.launch(stream))  # events and flushes on the stream
    stream.synchronize()
    return plan, plan_ms, 1e3 * eager, 1e3 * replay, out


def bench_config(batch, shared, own, Hq, Hkv, D=128, c=64, share=True, iters=50, flush_bytes=L2_FLUSH_BYTES,
                 k=1, invariant=False):
    """One configuration: ours and the peers, k query tokens per sequence (the last k of each
    sequence, causal among themselves; k = 1 is plain decode)."""
    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    from cpattn.chunk_attention import ChunkAttentionDecode

    cache, ids = build(batch, shared, own, Hkv, D, c, share, k=k)
    timer = GpuTimer(iters=iters, flush_bytes=flush_bytes)
    G = Hq // Hkv
    q = cupy.random.RandomState(7).standard_normal((batch * k, Hq, D), dtype=cupy.float32).astype(cupy.float16)
    dec = ChunkAttentionDecode(cache)
    plan, plan_ms, ours, ours_graph, out = ours_timings(dec, ids, Hq, q, timer, k)
    o_ours = torch.from_dlpack(out).float().view(batch, k, Hq, D).permute(0, 2, 1, 3)  # [B, Hq, k, D]
    res = dict(batch=batch, shared=shared if share else 0, own=own if share else shared + own, Hq=Hq, Hkv=Hkv, k=k,
               ours_us=ours, ours_graph_us=ours_graph, plan_ms=plan_ms, pieces=plan.num_pieces,
               units=len(dec.units), nonfinite_rows=int((~torch.isfinite(o_ours)).any(-1).sum()))
    if invariant:  # the batch-invariant mode on the same cache and queries
        try:
            inv = ChunkAttentionDecode(cache, batch_invariant=True)
            _, _, res["invariant_us"], res["invariant_graph_us"], out_inv = ours_timings(inv, ids, Hq, q, timer, k)
            res["invariant_max_abs_diff"] = float((torch.from_dlpack(out_inv).float().view(batch, k, Hq, D)
                                                   .permute(0, 2, 1, 3) - o_ours).abs().max())
            del inv
        except TypeError as e:  # a build without the mode
            res["invariant_graph_us"], res["invariant_error"] = float("nan"), str(e)[:120]

    # materialised per-sequence K/V [B, Hkv, S, D] for SDPA
    S = shared + own + k
    kt = torch.empty(batch, Hkv, S, D, dtype=torch.float16, device="cuda")
    vt = torch.empty_like(kt)
    for b, sid in enumerate(ids):
        kk, vv = cache.read_kv(sid, 0)
        kt[b] = torch.from_dlpack(kk).permute(1, 0, 2)
        vt[b] = torch.from_dlpack(vv).permute(1, 0, 2)
    qt = torch.from_dlpack(q).view(batch, k, Hq, D).permute(0, 2, 1, 3).contiguous()  # [B, Hq, k, D]
    torch.cuda.synchronize()
    with sdpa_kernel(SDPBackend.MATH):  # the judge: float32 math on the same inputs
        ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), enable_gqa=G > 1,
                                             attn_mask=None if k == 1 else causal_lower_right(k, S))
    res["max_abs_diff_vs_math"] = float((o_ours - ref).abs().max())
    if k == 1:
        peers = (("flash", SDPBackend.FLASH_ATTENTION, None), ("cudnn", SDPBackend.CUDNN_ATTENTION, None))
    else:  # flash takes the lower-right causal bias; cuDNN an explicit boolean mask
        bool_mask = torch.ones(k, S, dtype=torch.bool, device="cuda").tril(S - k)
        peers = (("flash", SDPBackend.FLASH_ATTENTION, causal_lower_right(k, S)),
                 ("cudnn", SDPBackend.CUDNN_ATTENTION, bool_mask))
    for name, backend, mask in peers:
        try:
            with sdpa_kernel(backend):
                fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=G > 1)  # noqa: E731
                o = fn()
                res[f"sdpa_{name}_us"] = 1e3 * timer.median_ms(fn)
                res[f"max_abs_diff_{name}_vs_math"] = float((o.float() - ref).abs().max())
        except Exception as e:  # noqa: BLE001
            res[f"sdpa_{name}_us"] = float("nan")
            res[f"sdpa_{name}_error"] = str(e).splitlines()[0][:120]

    if share:  # cascade: shared prefix once for all queries, the rest per sequence, LSE merge
        flash = torch.ops.aten._scaled_dot_product_flash_attention
        scale = 1 / math.sqrt(D)
        ks, vs = kt[:1, :, :shared].contiguous(), vt[:1, :, :shared].contiguous()
        ko, vo = kt[:, :, shared:shared + own + (k == 1)].contiguous(), vt[:, :, shared:shared + own + (k == 1)].contiguous()
        # rows per kv head: (sequence, head of the group, query) for the shared call, (head, query) per sequence
        qs = qt.view(batch, Hkv, G * k, D).permute(1, 0, 2, 3).reshape(1, Hkv, batch * G * k, D).contiguous()
        qo = qt.view(batch, Hkv, G * k, D).contiguous()
        if k > 1:  # the k new tokens, causal among themselves (square: flash's causal is exact)
            kn = kt[:, :, S - k:].repeat_interleave(G, dim=1).contiguous()
            vn = vt[:, :, S - k:].repeat_interleave(G, dim=1).contiguous()

        def cascade():
            o1, l1 = flash(qs, ks, vs, 0.0, False, False, scale=scale)[:2]
            o2, l2 = flash(qo, ko, vo, 0.0, False, False, scale=scale)[:2]
            o1 = o1.view(Hkv, batch, G * k, D).permute(1, 0, 2, 3)
            l1 = l1.view(Hkv, batch, G * k).permute(1, 0, 2)
            parts = [(o1, l1), (o2, l2)]
            if k > 1:
                o3, l3 = flash(qt, kn, vn, 0.0, True, False, scale=scale)[:2]
                parts.append((o3.reshape(batch, Hkv, G * k, D), l3.reshape(batch, Hkv, G * k)))
            lse = torch.logaddexp(l1, l2) if k == 1 else torch.logsumexp(torch.stack([p[1] for p in parts]), 0)
            acc = sum(torch.exp(lp - lse)[..., None] * op for op, lp in parts)
            return acc.reshape(batch, Hq, k, D)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                cascade()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            oc = cascade()
        g.replay()
        torch.cuda.synchronize()
        res["cascade_graph_us"] = 1e3 * timer.median_ms(g.replay)
        res["max_abs_diff_cascade_vs_math"] = float((oc.float() - ref).abs().max())
    else:
        res["cascade_graph_us"] = float("nan")
    unique_tokens = (shared + batch * (own + k)) if share else batch * S
    res["unique_kv_bytes"] = unique_tokens * Hkv * D * 2 * 2
    del kt, vt, cache
    torch.cuda.empty_cache()
    return res


def plan_timing(n=256, shared=4096, own=512, c=64):
    """Host time of build_decode_plan and of the full plan() (units + upload) for n sequences."""
    from cpattn.chunk_attention import ChunkAttentionDecode, build_decode_plan

    cache, ids = build(n, shared, own, 8, 128, c)
    build_decode_plan(cache, ids)
    t = []
    for _ in range(20):
        t0 = time.perf_counter()
        build_decode_plan(cache, ids)
        t.append(time.perf_counter() - t0)
    dec = ChunkAttentionDecode(cache)
    dec.plan(ids, 32)
    t2 = []
    for _ in range(20):
        t0 = time.perf_counter()
        dec.plan(ids, 32)
        t2.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(t)), 1e3 * float(np.median(t2))


def plot(rows, path, dev):
    """Grouped bars per configuration: ours, peers and the floor (us, log scale)."""
    series = [("ours (graph)", "ours_graph_us"), ("cuDNN SDPA", "sdpa_cudnn_us"), ("flash SDPA", "sdpa_flash_us"),
              ("cascade (graph)", "cascade_graph_us"), ("K/V bytes floor", "floor_us")]
    labels = [f"{r['layout']}\nB{r['batch']} S{r['shared']} O{r['own']}" + (f" k{r['k']}" if r.get("k", 1) > 1 else "")
              for r in rows]
    bar_chart(rows, series, labels, "time per decode step and layer (us)",
              f"Shared-prefix decode, fp16 D=128 chunk 64 ({dev})", path, log=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="cpattn bench decode", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true", help="one config per layout (smoke)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per measurement (default 50)")
    ap.add_argument("--queries-per-seq", type=int, nargs="+", default=[1], metavar="K",
                    help="query tokens per sequence (multi-token decode; K > 1 runs the shared configs only)")
    ap.add_argument("--invariant", action="store_true", help="also time the batch-invariant mode (same inputs)")
    ap.add_argument("--no-l2-flush", action="store_true",
                    help="time without evicting the L2 between calls (how the benchmark timed before 2026-12-02)")
    args = ap.parse_args(argv)
    import cupy
    import torch

    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    bw = copy_bandwidth()
    print(f"device {dev}; measured copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    configs = CONFIGS[:1] if args.quick else CONFIGS
    rows = []
    jobs = []
    for k in args.queries_per_seq:
        jobs += [(cfg, lay, True, k) for lay in LAYOUTS for cfg in configs]
        if k == 1:
            jobs += [((32, 4096, 512), lay, False, k) for lay in LAYOUTS]
    for i, ((B, Sh, Own), (lname, Hq, Hkv), share, k) in enumerate(jobs):
        label = f"{lname} batch {B} shared {Sh if share else 0} own {Own if share else Sh + Own} k {k}"
        progress(i, len(jobs), label)
        r = bench_config(B, Sh, Own, Hq, Hkv, share=share, iters=args.iters,
                         flush_bytes=0 if args.no_l2_flush else L2_FLUSH_BYTES, k=k, invariant=args.invariant)
        r["layout"] = lname
        r["floor_us"] = 1e6 * r["unique_kv_bytes"] / bw
        peers = [r[k] for k in ("sdpa_flash_us", "sdpa_cudnn_us", "cascade_graph_us") if not math.isnan(r[k])]
        r["best_peer_us"] = min(peers)
        r["speedup_vs_best_peer"] = r["best_peer_us"] / r["ours_graph_us"]
        r["ours_over_floor"] = r["ours_graph_us"] / r["floor_us"]
        if "invariant_graph_us" in r:
            r["invariant_over_default"] = r["invariant_graph_us"] / r["ours_graph_us"]
        rows.append(r)
        progress(i + 1, len(jobs), label)
        print("   " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    plan_build_ms, plan_full_ms = plan_timing()
    date = datetime.date.today().isoformat()
    for r in rows:
        config = f"{r['layout']} batch {r['batch']} shared {r['shared']} own {r['own']} k {r['k']}"
        r.update(summary(dev, date, config, r["ours_graph_us"], r["best_peer_us"], r["floor_us"]))
    md = [f"## ChunkAttention decode ({dev}, {date})", "",
          f"fp16, head_dim 128, chunk 64; CUDA events, median of {args.iters} after warm-up, "
          f"{'L2 not flushed' if args.no_l2_flush else 'L2 flushed before each call'}; copy bandwidth measured {bw / 1e12:.2f} TB/s (read + write). Generated by "
          "`tools/bench_decode.py`.",
          "ours = graph replay of run() (attend + merge); eager in parentheses. cascade = two flash-attention "
          "calls with LSE + merge, CUDA graph. floor = unique K/V bytes / copy bandwidth. Times in us.",
          "k = query tokens per sequence (multi-token decode: the last k tokens of each sequence, causal among "
          "themselves). For k > 1 flash SDPA takes the lower-right causal bias, cuDNN SDPA an explicit boolean "
          "mask, and the cascade a third flash call for the k x k causal block. max abs diff: ours vs float32 "
          "math SDPA on the same inputs.", ""]
    inv = any("invariant_graph_us" in r for r in rows)
    md += markdown_table(
        ["heads", "batch", "shared", "own", "k", "ours", "cuDNN SDPA", "flash SDPA", "cascade", "floor",
         "best peer / ours", "ours / floor", "max abs diff"] + (["invariant mode", "invariant / default"] if inv else []),
        [[r["layout"], r["batch"], r["shared"], r["own"], r["k"], f"{fmt(r['ours_graph_us'], '{:.1f}')} "
          f"({fmt(r['ours_us'], '{:.1f}')})", fmt(r["sdpa_cudnn_us"], "{:.1f}"), fmt(r["sdpa_flash_us"], "{:.1f}"),
          fmt(r["cascade_graph_us"], "{:.1f}"), fmt(r["floor_us"], "{:.1f}"), fmt(r["ratio"], "{:.2f}x"),
          fmt(r["ours_over_floor"]), fmt(r["max_abs_diff_vs_math"], "{:.1e}")]
         + ([fmt(r.get("invariant_graph_us"), "{:.1f}"), fmt(r.get("invariant_over_default"), "{:.2f}x")] if inv else [])
         for r in rows])
    md += ["", f"Plan build for 256 sequences (shared 4096, own 512, chunk 64): `build_decode_plan` "
               f"{plan_build_ms:.2f} ms, full `plan()` (units + upload) {plan_full_ms:.2f} ms.", ""]
    errors = {f"{r['layout']} {r['batch']}/{r['shared']}/{r['own']}": {k: v for k, v in r.items() if k.endswith("_error")}
              for r in rows if any(k.endswith("_error") for k in r)}
    if errors:
        md += ["Peer failures: " + json.dumps(errors), ""]
    text = "\n".join(md)
    print(text)
    meta = dict(device=dev, date=date, copy_bw=bw, plan_build_ms=plan_build_ms, plan_full_ms=plan_full_ms,
                torch=torch.__version__, cupy=cupy.__version__)
    write_tables(args.out, "bench_decode", rows, meta, text)
    plot(rows, os.path.join(args.out, "bench_decode.png"), dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
