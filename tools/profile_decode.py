#!/usr/bin/env python3
"""Where decode time goes: the whole run (attend and merge), and the attend launch alone over
only the phase-1 units and over only the phase-2 units, for one configuration (the benchmarks' GpuTimer: CUDA events,
L2 flushed, median).

    python tools/profile_decode.py --batch 128 --shared 4096 --own 256 --hq 32 --hkv 8

Runs from a checkout (after `pip install -e .`) and from an installed wheel.
"""
import argparse

import numpy as np

from cpattn.bench.decode import build
from cpattn.bench.timing import GpuTimer


def main():
    ap = argparse.ArgumentParser()
    for k, v in (("batch", 128), ("shared", 4096), ("own", 256), ("hq", 32), ("hkv", 8), ("chunk", 64)):
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--units-per-sm", type=int, nargs="*", default=[2, 4, 8])
    a = ap.parse_args()
    import cupy

    from cpattn.chunk_attention import ChunkAttentionDecode, phase1_rows
    from cpattn.kernels import UNIT_FIELDS

    col = {f: i for i, f in enumerate(UNIT_FIELDS)}

    cache, ids = build(a.batch, a.shared, a.own, a.hkv, 128, a.chunk)
    median_ms = GpuTimer().median_ms
    q = cupy.random.RandomState(1).standard_normal((a.batch, a.hq, 128), dtype=cupy.float32).astype(cupy.float16)
    for ups in a.units_per_sm:
        dec = ChunkAttentionDecode(cache, units_per_sm=ups)
        plan = dec.plan(ids, a.hq)
        host = cupy.asnumpy(dec.units)  # [U, len(UNIT_FIELDS)]
        is1 = (host[:, col["len_slot"]] < 0) & (host[:, col["out_base"]] < plan.num_state_rows)  # phase-1 units
        out = cupy.empty_like(q)
        t_all = median_ms(lambda: dec.run(q, 0, out=out))
        res = {}
        for name, mask in (("phase1", is1), ("phase2", ~is1)):
            sub = cupy.asarray(np.ascontiguousarray(host[mask]))
            res[name] = (int(mask.sum()), median_ms(lambda: dec.launch_attend(q, 0, units=sub)))
        rows1 = host[is1, col["row_count"]].sum()
        chunks1 = (host[is1, col["chunk_end"]] - host[is1, col["chunk_begin"]]).sum()
        flops1 = 4.0 * phase1_rows(a.chunk) * 128 * a.chunk * chunks1  # tiles as computed (padded rows too)
        print(f"units/SM {ups}: pieces {plan.num_pieces} items {plan.num_items} units {len(host)}; "
              f"run {1e3 * t_all:.1f} us; phase1 {res['phase1'][0]} units {1e3 * res['phase1'][1]:.1f} us "
              f"({flops1 / res['phase1'][1] / 1e9:.0f} TFLOP/s on padded tiles, {rows1} real rows); "
              f"phase2 {res['phase2'][0]} units {1e3 * res['phase2'][1]:.1f} us", flush=True)


if __name__ == "__main__":
    main()
