#!/usr/bin/env python3
"""CompactAttention chunked-prefill benchmark: cpattn sparse and dense vs PyTorch peers.

bf16, Hq=32, Hkv=8, D=128, one structured long-context prompt from the reference generator
(sinks, locality, RoPE, needles, head temperatures), sliced to past P + chunk n. Per config,
in one run:
  ours sparse   compact_prefill (means, scores, unions + tables, paged kernel; each part timed)
  ours dense    the same kernel with every block (alpha 0)
  sdpa flash    torch SDPA, flash backend, causal lower-right, dense
  sdpa cudnn    torch SDPA, cuDNN backend, causal lower-right (or no mask if refused), dense
  flex dense    FlexAttention with a causal lower-right BlockMask
  flex sparse   FlexAttention with a BlockMask built from our selection (same blocks)
plus density per stage, attention-mass recall exp(lse_sparse - lse_dense) (mean, min), and
TFLOP/s (dense FLOPs = 4 D Hq sum over rows of visible keys). Timings: ``GpuTimer`` (CUDA
events after warm-up, the L2 flushed before each call, median); per-stage times from the events
``compact_prefill`` records. Outputs through ``cpattn.bench.table``.

    cpattn bench prefill --out DIR   (or python tools/bench_prefill.py) [--configs 64:131072:4096 ...] [--no-flex]
        [--recall 0.99] [--summary auto|mean|sampled]

``--recall R`` selects by the recall rule (alpha then unused) and ``--summary`` picks the
past's summary ('auto': mean for alpha, sampled for recall); the score stage
(``stage_score_ms``) is then the estimate (summary='sampled': the sampled_block_mass kernel
and its combine) plus the recall rule's choice.
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
from .table import fmt, summary, write_tables
from .timing import GpuTimer


DEFAULT = ["64:32768:4096", "64:65536:4096", "64:131072:2048", "64:131072:4096", "64:131072:8192",
           "128:131072:4096"]
Hq, Hkv, D = 32, 8, 128
PROMPT_LEN = 131072 + 8192  # the generator's multi-scale locality depends on the prompt length


def cudnn_peer(torch, F, sdpa_kernel, SDPBackend, qt, kt, vt, mask, timer, ours):
    """torch SDPA on the cuDNN backend: causal lower-right when it accepts that mask, else
    with no mask over all P + n keys (``sdpa_cudnn_mask`` says which): that does the causal
    work plus the masked-out triangle, n^2/2 extra dot products per head (1.5% at 128K + 4K),
    so it bounds cuDNN's causal time from above by about that much. ``ours``: our dense output
    [1, Hq, n, D], compared with cuDNN's when cuDNN ran the same (masked) problem."""
    r = {}
    G = qt.shape[1] // kt.shape[1]
    for how, kw in (("lower-right", dict(attn_mask=mask)), ("none (all keys)", {})):
        for heads in ("gqa", "repeated"):
            try:
                if heads == "gqa":
                    args = (qt, kt, vt)
                    kw2 = dict(kw, enable_gqa=True)
                else:  # K/V repeated to Hq heads (more bytes read; prefill is compute-bound)
                    args = (qt, kt.repeat_interleave(G, dim=1), vt.repeat_interleave(G, dim=1))
                    kw2 = kw
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    fn = lambda: F.scaled_dot_product_attention(*args, **kw2)  # noqa: E731
                    o = fn()
                    r["sdpa_cudnn_ms"] = timer.median_ms(fn)
                r["sdpa_cudnn_mask"], r["sdpa_cudnn_heads"] = how, heads
                if "attn_mask" in kw:
                    r["max_abs_diff_dense_vs_cudnn"] = float((o.float() - ours.float()).abs().max())
                return r
            except Exception as e:  # noqa: BLE001
                r[f"sdpa_cudnn_{how.split()[0]}_{heads}_error"] = str(e).splitlines()[0][:160]
    r["sdpa_cudnn_ms"] = float("nan")
    return r


def rule_label(r, short: bool = False) -> str:
    """The selection rule of a row: its alpha ('0.06', short 'a0.06'), or 'recall 0.99' (short
    'r0.99'), followed by the summary unless 'auto' ('recall 0.99 sampled')."""
    if r.get("recall_target") is not None:
        rule = f"{'r' if short else 'recall '}{r['recall_target']}"
    else:
        rule = f"{'a' if short else ''}{r['alpha']}"
    summary = r.get("summary", "auto")
    return rule if summary == "auto" else f"{rule} {summary}"


def plot(rows, path, dev):
    """Grouped bars per configuration (ms). Each group's label carries its configuration on two
    lines and the recall of our selection on a third, so no text is drawn over the bars."""
    series = [("ours sparse", "ours_sparse_ms"), ("ours dense", "ours_dense_ms"), ("SDPA flash", "sdpa_flash_ms"),
              ("SDPA cuDNN", "sdpa_cudnn_ms"), ("Flex dense", "flex_dense_ms"), ("Flex, our blocks", "flex_sparse_ms")]
    labels = [f"c{r['block']} P{r['past'] // 1024}K n{r['chunk']}\n{rule_label(r, short=True)} g{r['group_size']}\n"
              f"recall {r['recall_mean']:.3f}" for r in rows]
    bar_chart(rows, series, labels, "time per chunk and layer (ms)",
              f"CompactAttention chunked prefill, bf16 Hq32 Hkv8 D128 ({dev})\n"
              f"recall: mean attention mass our sparse selection reads", path)


def replot(json_path: str, png_path: str | None = None) -> str:
    """Draw the plot again from a JSON this benchmark wrote (PNG next to it unless ``png_path``)."""
    import json

    with open(json_path) as f:
        data = json.load(f)
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    plot(data["rows"], png_path, data.get("device", "?"))
    return png_path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="cpattn bench prefill", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out", help="directory of the table, CSV, JSON and PNG")
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="only draw the plot again from a JSON this benchmark wrote (PNG next to it); no GPU")
    ap.add_argument("--configs", nargs="*", default=DEFAULT,
                    help="chunk_size:past:chunk_len[:alpha[:group_size[:q_tile]]] (group_size 0: whole GQA "
                         "group; q_tile 0: whole chunk)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--alpha", type=float, default=0.06)
    ap.add_argument("--recall", type=float, default=None,
                    help="select by the recall rule with this target instead of alpha (configs' alpha unused)")
    ap.add_argument("--summary", choices=("auto", "mean", "sampled"), default="auto",
                    help="the past's summary of the selection ('auto': mean for alpha, sampled for recall)")
    ap.add_argument("--prompt-len", type=int, default=PROMPT_LEN,
                    help="tokens of the generated prompt (fixed, so a config's data does not depend on "
                         "which other configs run; raised to the longest past + chunk if needed)")
    args = ap.parse_args(argv)
    if args.replot:
        replot(args.replot)
        return 0
    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.compact_attention import BlockMeans, choose_kernel, compact_prefill
    from cpattn.reference.workloads import long_context_qkv

    cfgs = []
    for spec in args.configs:
        f_ = spec.split(":")
        cfgs.append((int(f_[0]), int(f_[1]), int(f_[2]), float(f_[3]) if len(f_) > 3 else args.alpha,
                     (int(f_[4]) or None) if len(f_) > 4 else None, (int(f_[5]) or None) if len(f_) > 5 else None))
    total = max([args.prompt_len] + [cf[1] + cf[2] for cf in cfgs])
    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    t0 = time.time()
    w = long_context_qkv(1, total, Hq, Hkv, D, dtype="bfloat16", needle_len=64, num_needles=16,
                         needle_queries=16, locality_len=512)
    print(f"device {dev}; workload of {total} tokens generated in {time.time() - t0:.0f}s", flush=True)
    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

            torch._dynamo.config.cache_size_limit = 64
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            print(f"FlexAttention unavailable: {e}")
    timer = GpuTimer(warmup=2, iters=args.iters)
    bf = lambda a: torch.from_numpy(np.ascontiguousarray(a)).view(torch.bfloat16).cuda()  # noqa: E731
    rows = []
    for i, (c, P, n, alpha, gsz, qtile) in enumerate(cfgs):
        label = f"block {c} past {P} chunk {n} alpha {alpha} group {gsz or Hq // Hkv}"
        progress(i, len(cfgs), label)
        S_len = P + n
        cache = GpuChunkCache(1, Hkv, D, S_len // c + 2, chunk_size=c, dtype="bfloat16", max_sequences=4)
        seq = cache.add_sequence([])
        for a in range(0, S_len, 16384):  # in slices: bounded host->device copies
            b = min(S_len, a + 16384)
            cache.extend(seq, list(range(a, b)), w.k[:, a:b], w.v[:, a:b])
        means = BlockMeans(cache)
        means.update(cache, seq)
        q = cupy.asarray(w.q[0, P:S_len])
        r = {"block": c, "past": P, "chunk": n, "alpha": alpha, "group_size": gsz or Hq // Hkv, "q_tile": qtile or n,
             "recall_target": args.recall, "summary": args.summary}
        rule = dict(alpha=alpha) if args.recall is None else dict(alpha=None, recall=args.recall)
        # ours, sparse with per-stage times (the timer's warm-up and flush, compact_prefill's events)
        stage = {}
        res = None
        times = []
        for it in range(timer.warmup + timer.iters):
            timer.flush()
            ev = []
            res = compact_prefill(cache, means, seq, q, group_size=gsz, q_tile=qtile, summary=args.summary, events=ev,
                                  **rule)
            ev[-1][1].synchronize()
            if it >= timer.warmup:
                times.append(cupy.cuda.get_elapsed_time(ev[0][1], ev[-1][1]))
                for (a_, ea), (b_, eb) in zip(ev[:-1], ev[1:]):
                    stage.setdefault(b_, []).append(cupy.cuda.get_elapsed_time(ea, eb))
        r["ours_sparse_ms"] = float(np.median(times))
        for k_, v_ in stage.items():
            r[f"stage_{k_}_ms"] = float(np.median(v_))
        dense = compact_prefill(cache, means, seq, q, alpha=0.0, sink=0, window=0)
        r["ours_dense_ms"] = timer.median_ms(lambda: compact_prefill(cache, means, seq, q, alpha=0.0, sink=0, window=0))
        r["kernel"] = choose_kernel("auto")
        if r["kernel"] == "wgmma":  # the portable mma.sync kernel too, for comparison
            r["ours_dense_mma_ms"] = timer.median_ms(lambda: compact_prefill(cache, means, seq, q, alpha=0.0, sink=0,
                                                                             window=0, kernel="mma"))
        recall = cupy.exp(res.lse - dense.lse)
        r["recall_mean"], r["recall_min"] = float(recall.mean()), float(recall.min())
        r.update({f"density_{k_}": v_ for k_, v_ in res.density().items()})
        indptr, indices = res.tables()
        own = cdiv(n, c)
        r["keys_read_frac"] = len(indices) / (res.num_tables * (P // c + own))
        dense_flops = 4.0 * D * Hq * (n * P + n * (n + 1) / 2)
        r["dense_tflop"] = dense_flops / 1e12
        r["ours_dense_tflops"] = dense_flops / (r["ours_dense_ms"] * 1e-3) / 1e12
        # peers on materialised K/V
        qt = torch.from_dlpack(q).view(torch.bfloat16).permute(1, 0, 2).unsqueeze(0)  # [1, Hq, n, D]
        kt = bf(w.k[0, :S_len]).permute(1, 0, 2).unsqueeze(0).contiguous()  # [1, Hkv, S, D]
        vt = bf(w.v[0, :S_len]).permute(1, 0, 2).unsqueeze(0).contiguous()
        mask = causal_lower_right(n, S_len)
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)  # noqa: E731
                o_ref = fn()
                r["sdpa_flash_ms"] = timer.median_ms(fn)
            o_ours = torch.from_dlpack(dense.o).view(torch.bfloat16).permute(1, 0, 2).unsqueeze(0)
            r["max_abs_diff_dense_vs_sdpa"] = float((o_ours.float() - o_ref.float()).abs().max())
        except Exception as e:  # noqa: BLE001
            r["sdpa_flash_ms"], r["sdpa_error"] = float("nan"), str(e).splitlines()[0][:160]
        o_dense = torch.from_dlpack(dense.o).view(torch.bfloat16).permute(1, 0, 2).unsqueeze(0)
        r.update(cudnn_peer(torch, F, sdpa_kernel, SDPBackend, qt, kt, vt, mask, timer, o_dense))
        if flex is not None:
            try:
                def causal(b, h, q_idx, kv_idx):
                    return q_idx + P >= kv_idx

                bm = create_block_mask(causal, 1, 1, n, S_len, device="cuda", BLOCK_SIZE=128)
                fd = lambda: flex(qt, kt, vt, block_mask=bm, enable_gqa=True)  # noqa: E731
                t1 = time.time()
                fd()
                torch.cuda.synchronize()
                r["flex_compile_s"] = time.time() - t1
                r["flex_dense_ms"] = timer.median_ms(fd)
                # our selection as a BlockMask: per query head, per 128-row query block
                G, nqb, nkb = Hq // Hkv, cdiv(n, 128), S_len // c + (S_len % c > 0)
                s_sub = gsz or G
                kv_num = np.zeros((1, Hq, nqb), np.int32)
                kv_idx = np.zeros((1, Hq, nqb, nkb), np.int32)
                pos = {cid: j for j, cid in enumerate(cache.seq_chunks(seq))}
                S_sub, tile = G // s_sub, qtile or n
                for h in range(Hq):
                    for qb in range(nqb):
                        t = (qb * 128) // tile  # (q_tile is a multiple of 128 here, or the whole chunk)
                        tbl = (t * Hkv + h // G) * S_sub + (h % G) // s_sub
                        blocks = sorted(pos[int(x)] for x in indices[indptr[tbl]: indptr[tbl + 1]])
                        last_key = P + min(n, (qb + 1) * 128) - 1
                        sel = [b for b in blocks if b * c <= last_key]
                        kv_num[0, h, qb] = len(sel)
                        kv_idx[0, h, qb, :len(sel)] = sel
                sm = BlockMask.from_kv_blocks(torch.from_numpy(kv_num).cuda(), torch.from_numpy(kv_idx).cuda(),
                                              BLOCK_SIZE=(128, c), mask_mod=causal, seq_lengths=(n, S_len))
                fs = lambda: flex(qt, kt, vt, block_mask=sm, enable_gqa=True)  # noqa: E731
                fs()
                r["flex_sparse_ms"] = timer.median_ms(fs)
                o_fs = fs().float()
                o_sp = torch.from_dlpack(res.o).view(torch.bfloat16).permute(1, 0, 2).unsqueeze(0).float()
                r["max_abs_diff_sparse_vs_flex_sparse"] = float((o_sp - o_fs).abs().max())
            except Exception as e:  # noqa: BLE001
                r["flex_error"] = str(e).splitlines()[0][:200]
                r.setdefault("flex_dense_ms", float("nan"))
                r.setdefault("flex_sparse_ms", float("nan"))
        peers = [r.get(k_, float("nan")) for k_ in ("sdpa_flash_ms", "sdpa_cudnn_ms", "flex_dense_ms")]
        best = min([p for p in peers if not math.isnan(p)], default=float("nan"))
        r["best_dense_peer_ms"] = best
        r["speedup_sparse_vs_best_dense"] = best / r["ours_sparse_ms"]
        r["selection_frac"] = (r.get("stage_means_ms", 0) + r.get("stage_score_ms", 0) + r.get("stage_tables_ms", 0)) \
            / r["ours_sparse_ms"]
        if not math.isnan(r.get("flex_dense_ms", float("nan"))):
            r["flex_dense_tflops"] = dense_flops / (r["flex_dense_ms"] * 1e-3) / 1e12
        rows.append(r)
        progress(i + 1, len(cfgs), label)
        print("   " + ", ".join(f"{k_}={v_:.3g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in r.items()),
              flush=True)
        del cache, means, kt, vt
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()

    date = datetime.date.today().isoformat()

    def cudnn_cell(r):
        cell = f(r, "sdpa_cudnn_ms")
        return cell + ("*" if r.get("sdpa_cudnn_mask", "").startswith("none") else "")

    def f(r, key, spec="{:.2f}"):
        return fmt(r.get(key), spec)

    for r in rows:
        config = f"block {r['block']} past {r['past']} chunk {r['chunk']} alpha {rule_label(r)} group {r['group_size']}"
        r.update(summary(dev, date, config, r["ours_sparse_ms"], r["best_dense_peer_ms"]))
    md = [f"## CompactAttention chunked prefill ({dev}, {date})", "",
          "bf16, Hq 32, Hkv 8, D 128, structured prompt from `long_context_qkv` (seed 1), "
          "sink 2, window 4; Q-block union over `q tile` rows, group union over `group` query heads "
          "(4 = the whole GQA group). Ours runs the warpgroup-MMA kernel (wgmma, sm_90a) on Hopper; "
          "the mma.sync kernel's dense time is in parentheses. "
          "CUDA events, median of "
          f"{args.iters}, L2 flushed before each call. Generated by `tools/bench_prefill.py`. Times in ms; TFLOP/s count dense causal FLOPs.", "",
          "| block | past | chunk | alpha | group | q tile | ours sparse | (score / tables / kernel) | ours dense (mma.sync) | SDPA flash | SDPA cuDNN | Flex dense | Flex sparse (our blocks) | sparse vs best dense | density select / q-union / group | keys read | recall mean / min | ours dense TFLOP/s | Flex dense TFLOP/s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['block']} | {r['past']} | {r['chunk']} | {rule_label(r)} | {r['group_size']} | {r['q_tile']} | "
                  f"{f(r, 'ours_sparse_ms')} | "
                  f"{f(r, 'stage_score_ms')} / {f(r, 'stage_tables_ms')} / {f(r, 'stage_attention_ms')} | "
                  f"{f(r, 'ours_dense_ms')} ({f(r, 'ours_dense_mma_ms')}) | {f(r, 'sdpa_flash_ms')} | {cudnn_cell(r)} | {f(r, 'flex_dense_ms')} | {f(r, 'flex_sparse_ms')} | "
                  f"{f(r, 'speedup_sparse_vs_best_dense', '{:.2f}x')} | {f(r, 'density_select', '{:.3f}')} / "
                  f"{f(r, 'density_q_union', '{:.3f}')} / {f(r, 'density_group_union', '{:.3f}')} | "
                  f"{f(r, 'keys_read_frac', '{:.3f}')} | {f(r, 'recall_mean', '{:.4f}')} / {f(r, 'recall_min', '{:.3f}')} | "
                  f"{f(r, 'ours_dense_tflops', '{:.0f}')} | {f(r, 'flex_dense_tflops', '{:.0f}')} |")
    if any(r.get("sdpa_cudnn_mask", "").startswith("none") for r in rows):
        md += ["", "SDPA cuDNN marked * ran with no mask over all P + n keys (it refused the lower-right causal "
               "mask): an upper bound on its causal time, high by at most the masked triangle (n^2/2 of "
               "n (P + n) dot products per head)."]
    errs = {f"{r['block']}/{r['past']}/{r['chunk']}": {k_: v_ for k_, v_ in r.items() if k_.endswith("error")}
            for r in rows if any(k_.endswith("error") for k_ in r)}
    if errs:
        md += ["", "Peer errors: " + json.dumps(errs)]
    text = "\n".join(md) + "\n"
    print(text)
    write_tables(args.out, "bench_prefill", rows, dict(device=dev, date=date, torch=torch.__version__,
                                                       cupy=cupy.__version__), text)
    plot(rows, os.path.join(args.out, "bench_prefill.png"), dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
