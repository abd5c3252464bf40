#!/usr/bin/env python3
"""Shared-prefix decode benchmark: cpattn ChunkAttention vs the peers a PyTorch user would pick.

For each (batch, shared prompt, own tokens) and head layout, in one run:
  ours      two-phase decode (attend + merge launches), eager and CUDA-graph replay
  sdpa      torch SDPA over materialised per-sequence K/V, flash and cuDNN backends
  cascade   Hydragen-style: all queries vs the shared prefix as one sequence + each query vs its
            own suffix, two flash calls returning the LSE, merged, captured in a CUDA graph
  floor     unique K/V bytes over measured device copy bandwidth
Timings: CUDA events around each call after warm-up, median of --iters runs. Also the
plan-build time for 256 sequences. Writes a markdown table (BENCHMARKS.md section), CSV and JSON.

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

from . import bar_chart, progress


CONFIGS = [(32, 1024, 512), (32, 4096, 512), (64, 2048, 512), (128, 4096, 256)]
LAYOUTS = [("MHA 32", 32, 32), ("GQA 32/8", 32, 8)]


def median_ms(fn, warmup=5, iters=50, lib="cupy"):
    if lib == "torch":
        import torch

        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return float(np.median(ts))
    import cupy

    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(a, b))
    return float(np.median(ts))


def copy_bandwidth():
    """Device copy bandwidth in bytes/s (bytes read + written), 1 GiB buffers."""
    import cupy

    n = 1 << 30
    x = cupy.random.randint(0, 255, n, dtype=cupy.uint8)
    y = cupy.empty_like(x)
    ms = median_ms(lambda: cupy.copyto(y, x), warmup=3, iters=20)
    del x, y
    return 2 * n / (ms * 1e-3)


def build(batch, shared, own, Hkv, D, c, share=True, seed=0):
    """A GPU cache holding batch sequences (shared + own tokens + 1 decode token), random K/V."""
    import cupy

    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.reference.workloads import shared_prefix_prompts

    prompts = shared_prefix_prompts(batch, shared, own, seed=seed)
    if not share:  # no common prefix at all
        rng = np.random.default_rng(seed + 1)
        prompts = [rng.integers(0, 32000, shared + own).tolist() for _ in range(batch)]
    chunks = batch * (-(-(shared + own + 1) // c)) + 8
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
    cache.reserve_batch(ids, [1] * batch)
    for sid in ids:
        cache.commit(sid)
    cache.sync_lens()
    return cache, ids


def bench_config(batch, shared, own, Hq, Hkv, D=128, c=64, share=True, iters=50):
    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cpattn.chunk_attention import ChunkAttentionDecode

    cache, ids = build(batch, shared, own, Hkv, D, c, share)
    G = Hq // Hkv
    q = cupy.random.RandomState(7).standard_normal((batch, Hq, D), dtype=cupy.float32).astype(cupy.float16)
    dec = ChunkAttentionDecode(cache)
    t0 = time.perf_counter()
    plan = dec.plan(ids, Hq)
    plan_ms = (time.perf_counter() - t0) * 1e3
    out = cupy.empty_like(q)
    ours = median_ms(lambda: dec.run(q, 0, out=out), iters=iters)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dec.run(q, 0, out=out)
        stream.begin_capture()
        dec.run(q, 0, out=out)
        graph = stream.end_capture()
        ours_graph = median_ms(lambda: graph.launch(stream), iters=iters)
    stream.synchronize()
    o_ours = torch.from_dlpack(out).float()

    # materialised per-sequence K/V [B, Hkv, S, D] for SDPA
    S = shared + own + 1
    kt = torch.empty(batch, Hkv, S, D, dtype=torch.float16, device="cuda")
    vt = torch.empty_like(kt)
    for b, sid in enumerate(ids):
        k, v = cache.read_kv(sid, 0)
        kt[b] = torch.from_dlpack(k).permute(1, 0, 2)
        vt[b] = torch.from_dlpack(v).permute(1, 0, 2)
    qt = torch.from_dlpack(q).unsqueeze(2)  # [B, Hq, 1, D]
    torch.cuda.synchronize()
    res = dict(batch=batch, shared=shared if share else 0, own=own if share else shared + own, Hq=Hq, Hkv=Hkv,
               ours_us=1e3 * ours, ours_graph_us=1e3 * ours_graph, plan_ms=plan_ms, pieces=plan.num_pieces,
               units=dec._num_units)
    ref = None
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=G > 1)  # noqa: E731
                o = fn()
                res[f"sdpa_{name}_us"] = 1e3 * median_ms(fn, iters=iters, lib="torch")
                ref = o.squeeze(2).float() if ref is None else ref
        except Exception as e:  # noqa: BLE001
            res[f"sdpa_{name}_us"] = float("nan")
            res[f"sdpa_{name}_error"] = str(e).splitlines()[0][:120]
    if ref is None:
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), enable_gqa=G > 1).squeeze(2)
    res["max_abs_diff_vs_sdpa"] = float((o_ours - ref).abs().max())

    if share:  # cascade: shared prefix once for all queries, own suffix per sequence, LSE merge
        flash = torch.ops.aten._scaled_dot_product_flash_attention
        ks, vs = kt[:1, :, :shared].contiguous(), vt[:1, :, :shared].contiguous()
        ko, vo = kt[:, :, shared:].contiguous(), vt[:, :, shared:].contiguous()
        qs = qt.view(batch, Hkv, G, D).permute(1, 0, 2, 3).reshape(1, Hkv, batch * G, D).contiguous()
        qo = qt.view(batch, Hkv, G, D).contiguous()
        scale = 1 / math.sqrt(D)

        def cascade():
            o1, l1 = flash(qs, ks, vs, 0.0, False, False, scale=scale)[:2]
            o2, l2 = flash(qo, ko, vo, 0.0, False, False, scale=scale)[:2]
            o1 = o1.view(Hkv, batch, G, D).permute(1, 0, 2, 3)
            l1 = l1.view(Hkv, batch, G).permute(1, 0, 2)
            lse = torch.logaddexp(l1, l2)
            return (torch.exp(l1 - lse)[..., None] * o1 + torch.exp(l2 - lse)[..., None] * o2).reshape(batch, Hq, D)

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
        res["cascade_graph_us"] = 1e3 * median_ms(g.replay, iters=iters, lib="torch")
        res["max_abs_diff_cascade_vs_sdpa"] = float((oc.float() - ref).abs().max())
    else:
        res["cascade_graph_us"] = float("nan")
    unique_tokens = (shared + batch * (own + 1)) if share else batch * S
    res["unique_kv_bytes"] = unique_tokens * Hkv * D * 2 * 2
    del kt, vt, cache
    torch.cuda.empty_cache()
    return res


def plan_timing(n=256, shared=4096, own=512, c=64):
    """Host time of build_decode_plan and of the full plan() (units + upload) for n sequences."""
    from cpattn.chunk_attention import ChunkAttentionDecode
    from cpattn.reference.plan import build_decode_plan

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
    labels = [f"{r['layout']}\nB{r['batch']} S{r['shared']} O{r['own']}" for r in rows]
    bar_chart(rows, series, labels, "time per decode step and layer (us)",
              f"Shared-prefix decode, fp16 D=128 chunk 64 ({dev})", path, log=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="cpattn bench decode", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true", help="one config per layout (smoke)")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    import cupy
    import torch

    os.makedirs(args.out, exist_ok=True)
    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    bw = copy_bandwidth()
    print(f"device {dev}; measured copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    configs = CONFIGS[:1] if args.quick else CONFIGS
    rows = []
    jobs = [(cfg, lay, True) for lay in LAYOUTS for cfg in configs]
    jobs += [((32, 4096, 512), lay, False) for lay in LAYOUTS]
    for i, ((B, Sh, Own), (lname, Hq, Hkv), share) in enumerate(jobs):
        label = f"{lname} batch {B} shared {Sh if share else 0} own {Own if share else Sh + Own}"
        progress(i, len(jobs), label)
        r = bench_config(B, Sh, Own, Hq, Hkv, share=share, iters=args.iters)
        r["layout"] = lname
        r["floor_us"] = 1e6 * r["unique_kv_bytes"] / bw
        peers = [r[k] for k in ("sdpa_flash_us", "sdpa_cudnn_us", "cascade_graph_us") if not math.isnan(r[k])]
        r["best_peer_us"] = min(peers)
        r["speedup_vs_best_peer"] = r["best_peer_us"] / r["ours_graph_us"]
        r["ours_over_floor"] = r["ours_graph_us"] / r["floor_us"]
        rows.append(r)
        progress(i + 1, len(jobs), label)
        print("   " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    plan_build_ms, plan_full_ms = plan_timing()
    date = datetime.date.today().isoformat()
    md = [f"## ChunkAttention decode ({dev}, {date})", "",
          f"fp16, head_dim 128, chunk 64; CUDA events, median of {args.iters} after warm-up; "
          f"copy bandwidth measured {bw / 1e12:.2f} TB/s (read + write). Generated by `tools/bench_decode.py`.",
          "ours = graph replay of run() (attend + merge); eager in parentheses. cascade = two flash-attention "
          "calls with LSE + merge, CUDA graph. floor = unique K/V bytes / copy bandwidth. Times in us.", "",
          "| heads | batch | shared | own | ours | cuDNN SDPA | flash SDPA | cascade | floor | best peer / ours | ours / floor | max abs diff vs SDPA |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['layout']} | {r['batch']} | {r['shared']} | {r['own']} | {r['ours_graph_us']:.1f} "
                  f"({r['ours_us']:.1f}) | {r['sdpa_cudnn_us']:.1f} | {r['sdpa_flash_us']:.1f} | "
                  f"{r['cascade_graph_us']:.1f} | {r['floor_us']:.1f} | {r['speedup_vs_best_peer']:.2f}x | "
                  f"{r['ours_over_floor']:.2f} | {r['max_abs_diff_vs_sdpa']:.1e} |")
    md += ["", f"Plan build for 256 sequences (shared 4096, own 512, chunk 64): `build_decode_plan` "
               f"{plan_build_ms:.2f} ms, full `plan()` (units + upload) {plan_full_ms:.2f} ms.", ""]
    errors = {f"{r['layout']} {r['batch']}/{r['shared']}/{r['own']}": {k: v for k, v in r.items() if k.endswith("_error")}
              for r in rows if any(k.endswith("_error") for k in r)}
    if errors:
        md += ["Peer failures: " + json.dumps(errors), ""]
    text = "\n".join(md)
    print(text)
    with open(os.path.join(args.out, "bench_decode.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(dict(device=dev, date=date, copy_bw=bw, rows=rows, plan_build_ms=plan_build_ms,
                       plan_full_ms=plan_full_ms, torch=torch.__version__, cupy=cupy.__version__), f, indent=1)
    plot(rows, os.path.join(args.out, "bench_decode.png"), dev)
    with open(os.path.join(args.out, "bench_decode.csv"), "w") as f:
        keys = sorted({k for r in rows for k in r})
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(str(r.get(k, "")) for k in keys) + "\n")


if __name__ == "__main__":
    main()
