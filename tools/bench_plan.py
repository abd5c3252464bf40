#!/usr/bin/env python3
"""Decode plan rebuild time on the host (issue 5: under 1 ms for 256 sequences).

The workload of tools/bench_decode.py: n sequences sharing a 4096-token prompt, 512 own tokens
each and one decode token, chunk 64, 8 kv heads and 32 query heads. For n = 64, 256, 1024:

  build         build_decode_plan(cache, ids): the fast planner     (cpattn/chunk_attention.py)
  build+split   build_decode_plan + split_plan to the auto piece size (auto_piece_chunks)
  host plan     cpattn.chunk_attention.plan_host: the host part of ChunkAttentionDecode.plan()
                (plan, auto split, work units, one int32 buffer), no upload
  after chunk   host plan right after every sequence opened a new chunk (the tree changed:
                the plan meets new nodes), one sample per 64 decode steps
  plan()        ChunkAttentionDecode.plan() with its upload, when CuPy sees a GPU

Host times use a NumPy cache (head_dim 1: the tree is what matters). Median of --iters calls
after warm-up (the first call in a process also loads or compiles the numba loops).

    python tools/bench_plan.py [--sizes 64 256 1024] [--iters 200] [--json FILE]

Runs from a checkout (after `pip install -e .`) and from an installed wheel.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import timeit

import numpy as np

SHARED, OWN, CHUNK, HKV, HQ = 4096, 512, 64, 8, 32


def build_tree(cache, n, seed=0):
    """Insert n prompts structurally (no K/V writes: plans read only the tree), then one decode
    token each; returns the sequence ids."""
    from cpattn.reference.workloads import shared_prefix_prompts

    ids = []
    for p in shared_prefix_prompts(n, SHARED, OWN, seed=seed):
        sid = cache.add_sequence(p)
        cache.reserve(sid, p[cache.seq_len(sid):])
        cache.commit(sid)
        ids.append(sid)
    decode_step(cache, ids)
    return ids


def decode_step(cache, ids):
    cache.reserve_batch(ids, [1] * len(ids))
    for sid in ids:
        cache.commit(sid)


def num_chunks(n, extra_steps=0):
    return n * (-(-(SHARED + OWN + 1 + extra_steps) // CHUNK)) + 8


def median_ms(fn, iters):
    for _ in range(5):
        fn()
    return 1e3 * float(np.median(timeit.repeat(fn, number=1, repeat=iters)))


def host_times(n, iters, num_sms, boundary_samples):
    from cpattn.chunk_attention import auto_piece_chunks, build_decode_plan, plan_host, split_plan
    from cpattn.reference import ChunkCache

    steps = boundary_samples * CHUNK
    cache = ChunkCache(1, HKV, 1, num_chunks(n, steps), chunk_size=CHUNK, max_sequences=n + 8)
    ids = build_tree(cache, n)
    cap = auto_piece_chunks(build_decode_plan(cache, ids), HQ, HKV, num_sms)
    res = dict(
        build_ms=median_ms(lambda: build_decode_plan(cache, ids), iters),
        build_split_ms=median_ms(lambda: split_plan(build_decode_plan(cache, ids), cap, cap), iters),
        host_plan_ms=median_ms(lambda: plan_host(cache, ids, HQ, num_sms=num_sms), iters),
    )
    after = []
    for _ in range(boundary_samples):  # decode until every sequence opens its next chunk
        v = cache.version
        while cache.version == v:
            decode_step(cache, ids)
        t0 = time.perf_counter()
        plan_host(cache, ids, HQ, num_sms=num_sms)
        after.append(time.perf_counter() - t0)
    res["after_chunk_ms"] = 1e3 * float(np.median(after)) if after else float("nan")
    return res


def gpu_plan_ms(n, iters):
    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.chunk_attention import ChunkAttentionDecode

    cache = GpuChunkCache(1, HKV, 128, num_chunks(n), chunk_size=CHUNK, max_sequences=n + 8)
    ids = build_tree(cache, n)
    dec = ChunkAttentionDecode(cache)
    return median_ms(lambda: dec.plan(ids, HQ), iters)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--boundary-samples", type=int, default=5, help="'after chunk' samples per size")
    ap.add_argument("--no-gpu", action="store_true", help="skip plan() with upload even if a GPU is there")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from cpattn import gpu_available

    gpu = gpu_available() and not args.no_gpu
    num_sms, dev = 132, "none"
    if gpu:
        import cupy

        num_sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    t0 = time.perf_counter()
    host_times(2, 1, num_sms, 0)  # loads (or compiles) the numba loops
    first_ms = 1e3 * (time.perf_counter() - t0)
    cpu = platform.processor() or platform.machine()
    print(f"plan rebuild, shared {SHARED} + own {OWN} + 1 tokens, chunk {CHUNK}, {HKV} kv / {HQ} q heads, "
          f"{num_sms} SMs assumed; host {cpu}, {os.cpu_count()} cpus; GPU {dev}; {datetime.date.today()}")
    print(f"first plan in this process (numba load or compile): {first_ms:.0f} ms")
    print("| sequences | build | build+split | host plan | after chunk | plan() with upload |")
    print("|---|---|---|---|---|---|")
    rows = []
    for n in args.sizes:
        r = dict(sequences=n, **host_times(n, args.iters, num_sms, args.boundary_samples))
        r["plan_upload_ms"] = gpu_plan_ms(n, args.iters) if gpu else float("nan")
        rows.append(r)
        print(f"| {n} | {r['build_ms']:.3f} | {r['build_split_ms']:.3f} | {r['host_plan_ms']:.3f} | "
              f"{r['after_chunk_ms']:.3f} | {r['plan_upload_ms']:.3f} |", flush=True)
    print("times in ms, median of", args.iters)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=datetime.date.today().isoformat(), device=dev, num_sms=num_sms,
                           first_plan_ms=first_ms, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
