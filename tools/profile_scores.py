#!/usr/bin/env python3
"""Where the recall rule's score stage goes on the GPU, step by step (CUDA events, median).

The array code after the sampled_block_mass kernel (cpattn/compact_attention.py
``sequence_scores``): ``sampled_table_sums`` (softmax weights, one float64 product per head),
``recall_choice_sums`` (sort per table, cumulative sums, scatter back) and ``choice_scores``
(the +-1 scores for block_union), each op timed alone on random partials of the bench's shape
(128K past, chunk 4096, block 64, Hq 32 / Hkv 8, 2 sampled rows per query block). The op
times do not depend on the values.

    python tools/profile_scores.py [--past 131072 --chunk 4096 --group-size 4 1 --iters 20]
"""
from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--past", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--sample-rows", type=int, default=2)
    ap.add_argument("--group-size", type=int, nargs="+", default=[4, 1])
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()

    import cupy

    from cpattn import compact_attention as ca
    from cpattn.reference import compact_attention as reference

    c, n, Hq, Hkv = a.block, a.chunk, a.hq, a.hkv
    Pb, Qb = a.past // c, -(-n // c)
    m = len(reference.sampled_rows(n, c, a.sample_rows))
    rng = np.random.default_rng(0)
    part = cupy.asarray(rng.normal(0, 4, (Pb + Qb, Hq, m)).astype(np.float32))
    rows_in = np.minimum(c, n - np.arange(Qb) * c)
    j = np.arange(Pb)
    forced = (j < 2) | (j >= Pb - 4)

    def timed(fn):
        for _ in range(3):
            fn()
        ev = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(a.iters)]
        for s, e in ev:
            s.record()
            fn()
            e.record()
        ev[-1][1].synchronize()
        return float(np.median([cupy.cuda.get_elapsed_time(s, e) for s, e in ev]))

    for s in a.group_size:
        tb = Qb  # whole-chunk tables (q_tile = chunk)
        G = Hq // Hkv
        E, O = ca.sampled_table_sums(cupy, part, Pb, n, c, a.sample_rows, Hkv, s, tb)
        chosen = ca.recall_choice_sums(cupy, E, O, rows_in, forced, 0.99, s, tb)
        W = ca.sample_weights(n, c, reference.sampled_rows(n, c, a.sample_rows))
        Wt = cupy.asarray(np.add.reduceat(W, np.arange(0, Qb, tb), axis=0))
        ex = cupy.exp2(part - part.max(axis=0)[None])
        w = Wt[None].astype(np.float64) / ex.sum(axis=0, dtype=np.float64)[:, None, :]
        ops = {
            "sampled_table_sums (all)": lambda: ca.sampled_table_sums(cupy, part, Pb, n, c, a.sample_rows, Hkv, s, tb),
            "  max over blocks": lambda: part.max(axis=0),
            "  exp2": lambda: cupy.exp2(part - part.max(axis=0)[None]),
            "  row totals (f64 sum)": lambda: ex.sum(axis=0, dtype=np.float64),
            "  transpose + f64 copy": lambda: ex[:Pb].transpose(1, 2, 0).astype(np.float64),
            "  matmul f64": lambda: cupy.matmul(w, ex[:Pb].transpose(1, 2, 0).astype(np.float64)),
            "recall_choice_sums (all)": lambda: ca.recall_choice_sums(cupy, E, O, rows_in, forced, 0.99, s, tb),
            "  argsort": lambda: cupy.argsort(-E, axis=3),
            "choice_scores": lambda: ca.choice_scores(cupy, chosen, G, tb, Qb),
        }
        print(f"group_size {s}: part {tuple(part.shape)}, tables {tuple(E.shape)}")
        for name, fn in ops.items():
            print(f"  {name:28s} {timed(fn):8.3f} ms")


if __name__ == "__main__":
    main()
