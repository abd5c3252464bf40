#!/usr/bin/env python3
"""Print a CompactAttention selection on a structured long-context workload (NumPy reference).

Builds a prompt with ``long_context_qkv`` (sinks, multi-scale locality, RoPE, needles, head
temperatures), caches its first ``P`` tokens, writes the last chunk and runs
``compact_prefill`` on it; then prints the block tables (``BlockTables.to_string()``), the
density after each stage, the attention-mass recall against the float64 oracle (``oracle_prefill``), the same
recall for the exact-mass oracle selector at equal density, and needle recall.

    python tools/show_selection.py [--tokens 8192] [--chunk 1024] [--block 64] [--alpha 0.06]
                                   [--q-tile ROWS] [--group-size S] [--width 96]

CPU only; the defaults take a few seconds.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from cpattn.reference.chunk_cache import ChunkCache
from cpattn.reference.compact_attention import (
    BlockMeans, compact_prefill, mass_recall, needle_recall, oracle_prefill, relative_error, sparse_prefill)
from cpattn.reference.dtypes import to_float32
from cpattn.reference.workloads import long_context_qkv, oracle_block_tables


def recall_line(name, recall):
    r = recall.reshape(-1)
    return (f"{name:<22} mean {r.mean():.4f}  p1 {np.percentile(r, 1):.4f}  min {r.min():.4f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="prompt length (cached + chunk)")
    ap.add_argument("--chunk", type=int, default=1024, help="tokens of the last chunk (the queries)")
    ap.add_argument("--block", type=int, default=64, help="chunk size c = block size")
    ap.add_argument("--heads", type=int, default=8, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--alpha", type=float, default=0.06)
    ap.add_argument("--sink", type=int, default=2)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--q-tile", type=int, default=None, help="query rows per tile (default: whole chunk)")
    ap.add_argument("--group-size", type=int, default=None, help="query heads per sub-group (default: GQA group)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=96, help="max columns of the picture")
    args = ap.parse_args(argv)

    n, c = args.chunk, args.block
    P = args.tokens - n
    w = long_context_qkv(args.seed, args.tokens, args.heads, args.kv_heads, args.head_dim,
                         dtype=args.dtype, needle_len=c)
    cache = ChunkCache(1, args.kv_heads, args.head_dim, num_chunks=-(-args.tokens // c), chunk_size=c,
                       dtype=args.dtype)
    means = BlockMeans(cache)
    seq = cache.add_sequence([])
    cache.extend(seq, list(range(P)), w.k[:, :P], w.v[:, :P])  # the cached past (P % c == 0)
    means.update(cache, seq)
    cache.extend(seq, list(range(P, args.tokens)), w.k[:, P:], w.v[:, P:])  # the chunk's K/V
    q = w.q[0, P:]

    res = compact_prefill(cache, means, seq, q, alpha=args.alpha, sink=args.sink, window=args.window,
                          q_tile=args.q_tile, group_size=args.group_size)
    o_ref, lse_ref = oracle_prefill(cache, seq, q)
    tables = res.block_tables
    oracle = oracle_block_tables(cache, seq, q, tables)
    _, lse_oracle = sparse_prefill(cache, oracle, q)
    found, counted = needle_recall(tables, *w.needles.triples(c))

    print(f"$ python tools/show_selection.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"workload: long_context_qkv(seed={args.seed}, {args.tokens} tokens, Hq={args.heads}, "
          f"Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype}); alpha={args.alpha}, sink={args.sink}, "
          f"window={args.window}, q_tile={res.selection.q_tile}, group_size={res.selection.group_size}")
    print()
    print(tables.to_string(max_width=args.width))
    print()
    d = res.density()
    print("density   select {select:.3f} -> q_union {q_union:.3f} -> group_union {group_union:.3f} "
          "(past blocks);  tables {tables:.3f} (incl. own blocks)".format(**d))
    print(recall_line("recall (compact)", mass_recall(res.lse, lse_ref)))
    print(recall_line("recall (oracle, =dens)", mass_recall(lse_oracle, lse_ref)))
    print(f"relative output error  {relative_error(to_float32(res.o, args.dtype), o_ref):.2e} ({args.dtype} o)")
    print(f"needle recall          {found}/{counted} (query row, head, block) triples in this chunk")


if __name__ == "__main__":
    main()
