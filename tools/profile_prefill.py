#!/usr/bin/env python3
"""Dense paged-prefill kernel speed, both tensor-core paths, on random (non-zero) bf16 data:
TFLOP/s of ``dense_prefill`` (compact_prefill at alpha 0) with kernel='wgmma' and kernel='mma' (CUDA events,
median), for a few (past, chunk) sizes. A quick loop for kernel work; the benchmark with peers
and the structured workload is ``cpattn bench prefill``.

    python tools/profile_prefill.py [--sizes 32768:4096 131072:4096] [--block 64] [--iters 10]
"""
import argparse

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=["32768:4096", "131072:4096"])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--kernels", nargs="*", default=["wgmma", "mma"])
    a = ap.parse_args(argv)
    import cupy

    from cpattn.bench.prefill import events_ms
    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.compact_attention import BlockMeans, dense_prefill
    from cpattn.reference.dtypes import to_float32

    D, c = a.head_dim, a.block
    rng = np.random.default_rng(0)
    for spec in a.sizes:
        P, n = map(int, spec.split(":"))
        S = P + n
        cache = GpuChunkCache(1, a.hkv, D, S // c + 2, chunk_size=c, dtype="bfloat16", max_sequences=2)
        seq = cache.add_sequence([])
        for s0 in range(0, S, 16384):  # random bf16 bit patterns of N(0, 1) values, in slices
            s1 = min(S, s0 + 16384)
            kv = rng.standard_normal((2, 1, s1 - s0, a.hkv, D), dtype=np.float32)
            bits = (kv.view(np.uint32) >> 16).astype(np.uint16)
            cache.extend(seq, list(range(s0, s1)), bits[0], bits[1])
        means = BlockMeans(cache)
        q = cupy.asarray((rng.standard_normal((n, a.hq, D), dtype=np.float32).view(np.uint32) >> 16)
                         .astype(np.uint16))
        flops = 4.0 * D * a.hq * (n * P + n * (n + 1) / 2)
        res = {}
        for k in a.kernels:
            ms = events_ms(lambda: dense_prefill(cache, means, seq, q, kernel=k),
                           a.iters)
            res[k] = ms
            print(f"past {P} chunk {n} block {c} D {D} Hq {a.hq} Hkv {a.hkv}: {k:6s} {ms:8.3f} ms "
                  f"{flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
        if len(res) == 2:
            o = {k: dense_prefill(cache, means, seq, q, kernel=k).o for k in res}
            a_, b_ = (to_float32(cupy.asnumpy(v), "bfloat16") for v in o.values())
            diff = float(np.abs(a_ - b_).max())
            print(f"   max |wgmma - mma| = {diff:.3g}")
        del cache, means
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
