#!/usr/bin/env python3
"""Time sampled_block_mass (summary='sampled', issue 14) against its grid's blocks-per-SM knob.

One layer, bf16, Hq 32 Hkv 8 D 128, chunk 64, a chunk of --chunk queries after --past keys of
random data (the kernel's time depends on the shapes only). For every value of
``compact_attention.SAMPLED_BLOCKS_PER_SM`` given: the kernel alone, and kernel + the combine
(``mass_from_partials``), CUDA events, L2 flushed, median; the partials must be bitwise equal
across values (each key block's log-sum-exp is one split's). For scale: the bytes floor of
reading K once (4.09 TB/s).

    python tools/tune_sampled_mass.py [--past 131072] [--chunk 4096] [--values 4 8 16 32 64] [--json FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--past", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--values", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--sample-rows", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import cupy

    from cpattn import compact_attention as gca
    from cpattn.bench.timing import GpuTimer
    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.reference.dtypes import to_storage

    Hq, Hkv, D, c = 32, 8, 128, 64
    P, n = args.past, args.chunk
    if P % c or n <= 0:
        raise SystemExit(f"--past: expected a multiple of {c}, got {P}; --chunk: expected > 0, got {n}")
    cache = GpuChunkCache(1, Hkv, D, (P + n) // c + 2, chunk_size=c, dtype="bfloat16", max_sequences=2)
    seq = cache.add_sequence([])
    rng = np.random.default_rng(1)
    for a in range(0, P + n, 16384):
        b = min(P + n, a + 16384)
        kv = to_storage(rng.standard_normal((2, 1, b - a, Hkv, D), np.float32), "bfloat16")
        cache.extend(seq, list(range(a, b)), kv[0], kv[1])
    blocks = cupy.asarray(np.asarray(cache.seq_chunks(seq), np.int32))
    q = cupy.asarray(to_storage(rng.standard_normal((n, Hq, D), np.float32), "bfloat16"))
    Pb, scale = P // c, 1 / np.sqrt(D)
    timer = GpuTimer(warmup=3, iters=args.iters)
    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    rows, ref = [], None
    keep = gca.SAMPLED_BLOCKS_PER_SM
    try:
        for v in args.values:
            gca.SAMPLED_BLOCKS_PER_SM = v
            grid, split = gca.sampled_mass_grid(Hq, Hkv, len(gca.reference.sampled_rows(n, c, args.sample_rows)),
                                                Pb, n, c, sms)
            part = gca.sampled_block_mass(cache, 0, blocks, q, Pb, scale, args.sample_rows)
            out = part.copy()
            out.fill(np.nan)  # poisoned: every entry must be written again
            gca.sampled_block_mass(cache, 0, blocks, q, Pb, scale, args.sample_rows, part=out)
            got = cupy.asnumpy(out)
            if np.isnan(got).any():
                raise SystemExit(f"blocks per SM {v}: partials left unwritten")
            if ref is None:
                ref = got
            same = bool(np.array_equal(got.view(np.uint32), ref.view(np.uint32)))
            kern = timer.median_ms(lambda: gca.sampled_block_mass(cache, 0, blocks, q, Pb, scale, args.sample_rows,
                                                                  part=out))
            both = timer.median_ms(lambda: gca.mass_from_partials(
                cupy, gca.sampled_block_mass(cache, 0, blocks, q, Pb, scale, args.sample_rows, part=out), Pb, n, c,
                args.sample_rows))
            rows.append(dict(blocks_per_sm=v, grid=list(grid), split_steps=split, kernel_ms=kern,
                             kernel_and_combine_ms=both, partials_equal_first=same))
            print(f"blocks/SM {v:3d}: grid {grid} split {split}: kernel {kern:.3f} ms, + combine {both:.3f} ms"
                  f"{'' if same else '  PARTIALS DIFFER'}", flush=True)
    finally:
        gca.SAMPLED_BLOCKS_PER_SM = keep
    k_bytes = (P + n) * Hkv * D * 2
    res = dict(device=dev, date=datetime.date.today().isoformat(), past=P, chunk=n, sample_rows=args.sample_rows,
               rows=rows, k_read_floor_ms=k_bytes / 4.09e12 * 1e3)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if all(r["partials_equal_first"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
