#!/usr/bin/env python3
"""Batched varlen prefill benchmark: one cpattn BatchedPrefill step vs the peers an engine would use.

A step holds B requests, each with a chunk of n new tokens over its own cached past (pasts
spread evenly over 0 .. max past, multiples of 128), bf16, Hq 32, Hkv 8, D 128. The K/V and
queries are slices of one structured long prompt (``long_context_qkv``: sinks, locality,
needles), so sparse selection sees attention with structure; token ids differ per request, so
nothing is shared in the cache. In one run:
  ours dense    BatchedPrefill, alpha 0: every past page, one launch per stage for the batch
  ours sparse   BatchedPrefill, the default alpha rule (block scores, unions, paged kernel)
  flex          FlexAttention over the packed sequences with a document-causal BlockMask
                (full blocks listed apart, so only the diagonal blocks evaluate the mask)
  sdpa          torch SDPA per request (a Python loop of B calls), flash and cuDNN, causal
                lower-right
  floor         dense causal FLOPs over the measured bf16 matrix-product throughput
Timings: ``GpuTimer`` (CUDA events after warm-up, the L2 flushed before each, median). Plans are
built once per step outside the timing (their host time is reported). Outputs through
``cpattn.bench.table``.

    python -m cpattn.bench.batched_prefill --out DIR [--configs 64:2048:32768 ...] [--quick]
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
from .table import fmt, markdown_table, summary, write_tables
from .timing import GpuTimer

DEFAULT = ["64:2048:32768", "32:4096:65536"]  # requests : new tokens each : longest past
Hq, Hkv, D, C = 32, 8, 128, 64
FLEX_BLOCK = 128  # FlexAttention's block: pasts and chunks are multiples of it


def past_lengths(batch: int, max_past: int, granule: int = FLEX_BLOCK) -> list[int]:
    """Pasts spread evenly over [0, max_past], each a multiple of ``granule``."""
    if batch == 1:
        return [max_past // granule * granule]
    return [round(b * max_past / (batch - 1) / granule) * granule for b in range(batch)]


def dense_flops(pasts, n: int) -> float:
    """Causal attention FLOPs of the step (QK^T and PV, 2 each per multiply-add)."""
    return 4.0 * D * Hq * sum(n * p + n * (n + 1) / 2 for p in pasts)


def doc_block_mask(pasts, n: int, block: int = FLEX_BLOCK):
    """The document-causal block structure of the packed step, for ``BlockMask.from_kv_blocks``.

    Queries are packed request after request (n rows each), keys likewise (past + n each). Query
    block ``i`` of request ``b`` (rows ``r0 .. r0 + block`` of its chunk) sees keys ``0 .. P_b + r``
    of its own request: the key blocks before ``(P_b + r0) / block`` fully ("full" blocks, no
    mask evaluated), the diagonal block under the causal mask ("partial"). Returns int32 arrays
    (kv_num [1, 1, Q], kv_idx [1, 1, Q, K], full_num [1, 1, Q], full_idx [1, 1, Q, K]) over
    Q query blocks and K key blocks, and ``delta`` int64 [rows]: a query row at packed index
    ``qi`` sees packed key ``ki`` of its block when ``ki - qi <= delta[qi]``.
    """
    if n % block or any(p % block for p in pasts):
        raise ValueError(f"n and every past must be multiples of {block}, got n={n} pasts={sorted(set(pasts))}")
    per = n // block
    Q = per * len(pasts)
    K = sum(p + n for p in pasts) // block
    width = K  # from_kv_blocks reads the index rows as [.., Q, K]
    kv_num = np.ones((1, 1, Q), np.int32)
    kv_idx = np.zeros((1, 1, Q, width), np.int32)
    full_num = np.zeros((1, 1, Q), np.int32)
    full_idx = np.zeros((1, 1, Q, width), np.int32)
    delta = np.zeros(n * len(pasts), np.int64)
    k_off = q_off = 0
    for b, p in enumerate(pasts):
        delta[q_off:q_off + n] = k_off + p - q_off
        for i in range(per):
            qb = b * per + i
            diag = (p + i * block) // block  # the request's key block holding the diagonal
            full_num[0, 0, qb] = diag
            full_idx[0, 0, qb, :diag] = k_off // block + np.arange(diag)
            kv_idx[0, 0, qb, 0] = k_off // block + diag
        k_off += p + n
        q_off += n
    assert k_off // block == K
    return kv_num, kv_idx, full_num, full_idx, delta


def matmul_tflops(torch, n: int = 8192) -> float:
    """Measured bf16 matrix-product throughput (TFLOP/s) on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = GpuTimer(warmup=3, iters=20).median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def bench_step(w, batch, n, max_past, timer, flex, alpha):
    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.compact_attention import BatchedPrefill, BlockMeans

    pasts = past_lengths(batch, max_past)
    k_all = cupy.asarray(w.k[:, :max_past + n])  # [1, S, Hkv, D] bf16 bits on the device, once
    v_all = cupy.asarray(w.v[:, :max_past + n])
    q_all = cupy.asarray(w.q[0, :max_past + n])
    chunks = sum(-(-(p + n) // C) for p in pasts) + 8
    cache = GpuChunkCache(1, Hkv, D, chunks, chunk_size=C, dtype="bfloat16", max_sequences=batch + 4)
    seqs = []
    for b, p in enumerate(pasts):  # own token ids: nothing shared
        toks = list(range(b * 1_000_000, b * 1_000_000 + p + n))
        s = cache.add_sequence([])
        if p:
            cache.extend(s, toks[:p], k_all[:, :p], v_all[:, :p])
        cache.extend(s, toks[p:], k_all[:, p:p + n], v_all[:, p:p + n])
        seqs.append(s)
    q = cupy.concatenate([q_all[p:p + n] for p in pasts])  # [B n, Hq, D] packed
    means = BlockMeans(cache)
    r = dict(batch=batch, n=n, max_past=max_past, mean_past=float(np.mean(pasts)), alpha=alpha,
             tokens=batch * n, kv_tokens=sum(pasts) + batch * n)
    out = {}
    for name, opts in (("dense", dict(alpha=0.0, sink=0, window=0)), ("sparse", dict(alpha=alpha))):
        bp = BatchedPrefill(cache, means)
        t0 = time.perf_counter()
        bp.plan(seqs, [n] * batch, Hq, **opts)
        cupy.cuda.Device().synchronize()
        r[f"plan_{name}_ms"] = (time.perf_counter() - t0) * 1e3
        o = cupy.full(q.shape, 0x7FC0, q.dtype)  # poisoned: bf16 NaN bits (bf16 is stored as uint16)
        lse = cupy.full(q.shape[:2], np.nan, cupy.float32)
        r[f"ours_{name}_ms"] = timer.median_ms(lambda: bp.run(q, 0, out=o, lse_out=lse))
        out[name] = (o, lse)
        if name == "sparse":
            dens = bp.density()
            r["density_tables"] = float(np.mean([d["tables"] for d in dens]))
        del bp
    recall = cupy.exp(out["sparse"][1] - out["dense"][1])
    r["recall_mean"], r["recall_min"] = float(recall.mean()), float(recall.min())
    flops = dense_flops(pasts, n)
    r["dense_tflop"] = flops / 1e12
    r["ours_dense_tflops"] = flops / (r["ours_dense_ms"] * 1e-3) / 1e12

    # peers: packed K/V [1, Hkv, sum(P + n), D] (per request: views of it), packed q [1, Hq, B n, D]
    bf = lambda a: torch.from_dlpack(a).view(torch.bfloat16)  # noqa: E731
    kp = torch.cat([bf(k_all[0, :p + n]) for p in pasts]).permute(1, 0, 2).unsqueeze(0).contiguous()
    vp = torch.cat([bf(v_all[0, :p + n]) for p in pasts]).permute(1, 0, 2).unsqueeze(0).contiguous()
    qp = bf(q).permute(1, 0, 2).unsqueeze(0).contiguous()
    o_dense = bf(out["dense"][0]).permute(1, 0, 2).unsqueeze(0).float()
    r["ours_nonfinite"] = int((~torch.isfinite(o_dense)).sum()) + int((~torch.isfinite(
        bf(out["sparse"][0]).float())).sum())
    k_off = np.concatenate([[0], np.cumsum([p + n for p in pasts])])
    views = [(qp[:, :, b * n:(b + 1) * n], kp[:, :, k_off[b]:k_off[b + 1]], vp[:, :, k_off[b]:k_off[b + 1]],
              causal_lower_right(n, pasts[b] + n)) for b in range(batch)]
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                def per_request():
                    return [F.scaled_dot_product_attention(qv, kv, vv, attn_mask=m, enable_gqa=True)
                            for qv, kv, vv, m in views]
                o_sd = torch.cat(per_request(), dim=2)
                r[f"sdpa_{name}_ms"] = timer.median_ms(per_request)
                r[f"max_abs_diff_dense_vs_{name}"] = float((o_sd.float() - o_dense).abs().max())
                del o_sd
        except Exception as e:  # noqa: BLE001
            r[f"sdpa_{name}_ms"], r[f"sdpa_{name}_error"] = float("nan"), str(e).splitlines()[0][:160]
    if flex is not None:
        try:
            from torch.nn.attention.flex_attention import BlockMask

            kv_num, kv_idx, full_num, full_idx, delta = doc_block_mask(pasts, n)
            dt = torch.from_numpy(delta).cuda()

            def doc_causal(b, h, q_idx, kv_idx_):
                return kv_idx_ - q_idx <= dt[q_idx]

            t = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
            bm = BlockMask.from_kv_blocks(t(kv_num), t(kv_idx), t(full_num), t(full_idx), BLOCK_SIZE=FLEX_BLOCK,
                                          mask_mod=doc_causal, seq_lengths=(qp.shape[2], kp.shape[2]))
            fx = lambda: flex(qp, kp, vp, block_mask=bm, enable_gqa=True)  # noqa: E731
            t1 = time.time()
            o_fx = fx()
            torch.cuda.synchronize()
            r["flex_compile_s"] = time.time() - t1
            r["flex_ms"] = timer.median_ms(fx)
            r["max_abs_diff_dense_vs_flex"] = float((o_fx.float() - o_dense).abs().max())
            r["flex_tflops"] = flops / (r["flex_ms"] * 1e-3) / 1e12
            del o_fx
        except Exception as e:  # noqa: BLE001
            r["flex_ms"], r["flex_error"] = float("nan"), str(e).splitlines()[0][:200]
    else:
        r["flex_ms"] = float("nan")
    peers = [r[k] for k in ("sdpa_flash_ms", "sdpa_cudnn_ms", "flex_ms") if not math.isnan(r.get(k, math.nan))]
    r["best_peer_ms"] = min(peers) if peers else float("nan")
    del cache, means, kp, vp, qp, views, out
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()
    return r


def markdown(rows, meta) -> str:
    """The BENCHMARKS.md section of a run (meta: device, date, matmul_tflops, iters, alpha)."""
    md = [f"## Batched varlen prefill ({meta['device']}, {meta['date']})", "",
          f"One step of B requests x n new tokens over pasts spread evenly over 0 .. max past; bf16 Hq {Hq} Hkv "
          f"{Hkv} D {D}, chunk {C}; structured prompt (`long_context_qkv`, seed 1), no pages shared. Ours: "
          "`BatchedPrefill.run` (plan built before, its host time apart); dense = alpha 0, sparse = alpha "
          f"{meta.get('alpha', rows[0]['alpha'])}, sink 2, window 4, whole-chunk tables. Flex = FlexAttention over the packed step with a "
          "document-causal BlockMask; SDPA = one call per request (flash / cuDNN, causal lower-right). floor = "
          f"dense causal FLOPs / measured bf16 matmul ({meta['matmul_tflops']:.0f} TFLOP/s). CUDA events, median of {meta.get('iters', 10)}, "
          "L2 flushed. Generated by `python -m cpattn.bench.batched_prefill`. Times in ms.", ""]
    md += markdown_table(
        ["requests x new", "past", "ours dense", "ours sparse", "Flex (doc mask)", "SDPA flash / request",
         "SDPA cuDNN / request", "floor", "best peer / ours dense", "best peer / ours sparse", "ours dense TFLOP/s",
         "Flex TFLOP/s", "sparse tables density", "recall mean / min", "plan dense / sparse (ms)"],
        [[f"{r['batch']} x {r['n']}", f"0-{r['max_past']}", fmt(r["ours_dense_ms"]), fmt(r["ours_sparse_ms"]),
          fmt(r.get("flex_ms")), fmt(r.get("sdpa_flash_ms")), fmt(r.get("sdpa_cudnn_ms")), fmt(r["floor_ms"]),
          fmt(r["speedup_dense_vs_best_peer"], "{:.2f}x"), fmt(r["speedup_sparse_vs_best_peer"], "{:.2f}x"),
          fmt(r["ours_dense_tflops"], "{:.0f}"), fmt(r.get("flex_tflops"), "{:.0f}"),
          fmt(r.get("density_tables"), "{:.3f}"), f"{r['recall_mean']:.4f} / {r['recall_min']:.3f}",
          f"{r['plan_dense_ms']:.1f} / {r['plan_sparse_ms']:.1f}"] for r in rows])
    errs = {f"{r['batch']}x{r['n']}": {k: v for k, v in r.items() if k.endswith("error")} for r in rows
            if any(k.endswith("error") for k in r)}
    if errs:
        md += ["", "Peer errors: " + json.dumps(errs)]
    text = "\n".join(md) + "\n"
    return text


def plot(rows, path, dev):
    series = [("ours sparse", "ours_sparse_ms"), ("ours dense", "ours_dense_ms"), ("Flex, document mask", "flex_ms"),
              ("SDPA flash per request", "sdpa_flash_ms"), ("SDPA cuDNN per request", "sdpa_cudnn_ms"),
              ("FLOPs floor (dense)", "floor_ms")]
    labels = [f"{r['batch']} x {r['n']} new\npast 0-{r['max_past'] // 1024}K\nrecall {r['recall_mean']:.3f}"
              for r in rows]
    bar_chart(rows, series, labels, "time per step and layer (ms)",
              f"Batched varlen prefill, bf16 Hq32 Hkv8 D128 ({dev})", path)


def replot(json_path: str, png_path: str | None = None) -> str:
    with open(json_path) as f:
        data = json.load(f)
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    plot(data["rows"], png_path, data.get("device", "?"))
    with open(os.path.splitext(png_path)[0] + ".md", "w") as f:  # and the table (a JSON without iters: 10)
        f.write(markdown(data["rows"], data))
    return png_path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cpattn.bench.batched_prefill", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--configs", nargs="*", default=DEFAULT, help="requests:new_tokens:longest_past (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="one small step (smoke)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.06)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--replot", metavar="JSON", default=None, help="only redraw the plot from a JSON this wrote")
    args = ap.parse_args(argv)
    if args.replot:
        replot(args.replot)
        return 0
    import cupy
    import torch

    from cpattn.reference.workloads import long_context_qkv

    cfgs = [tuple(int(x) for x in s.split(":")) for s in (["8:512:4096"] if args.quick else args.configs)]
    for cf in cfgs:
        if len(cf) != 3 or cf[1] % FLEX_BLOCK or cf[2] % FLEX_BLOCK:
            ap.error(f"--configs: expected requests:new:past with new and past multiples of {FLEX_BLOCK}, got {cf}")
    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    total = max(n + p for _, n, p in cfgs)
    t0 = time.time()
    w = long_context_qkv(1, total, Hq, Hkv, D, dtype="bfloat16", needle_len=64, num_needles=16, needle_queries=16,
                         locality_len=512)
    tflops = matmul_tflops(torch)
    print(f"device {dev}; workload of {total} tokens in {time.time() - t0:.0f}s; bf16 matmul {tflops:.0f} TFLOP/s",
          flush=True)
    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            print(f"FlexAttention unavailable: {e}")
    timer = GpuTimer(warmup=2, iters=args.iters)
    rows = []
    for i, (B, n, P) in enumerate(cfgs):
        label = f"{B} requests x {n} new tokens, past 0-{P}"
        progress(i, len(cfgs), label)
        r = bench_step(w, B, n, P, timer, flex, args.alpha)
        r["floor_ms"] = r["dense_tflop"] / tflops * 1e3
        r["speedup_dense_vs_best_peer"] = r["best_peer_ms"] / r["ours_dense_ms"]
        r["speedup_sparse_vs_best_peer"] = r["best_peer_ms"] / r["ours_sparse_ms"]
        rows.append(r)
        progress(i + 1, len(cfgs), label)
        print("   " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
              flush=True)
    date = datetime.date.today().isoformat()
    for r in rows:
        r.update(summary(dev, date, f"{r['batch']} x {r['n']} past 0-{r['max_past']}", r["ours_dense_ms"],
                         r["best_peer_ms"], r["floor_ms"]))
    meta = dict(device=dev, date=date, matmul_tflops=tflops, iters=args.iters, alpha=args.alpha,
                torch=torch.__version__, cupy=cupy.__version__)
    text = markdown(rows, meta)
    print(text)
    write_tables(args.out, "bench_batched_prefill", rows, meta, text)
    plot(rows, os.path.join(args.out, "bench_batched_prefill.png"), dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
