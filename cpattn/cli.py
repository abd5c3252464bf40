"""Command line: ``cpattn demo`` (also ``python -m cpattn demo``).

The demo checks a prefix-sharing decode against a float64 oracle, then runs the serving
example (``cpattn.examples.serving``): a small model whose attention goes through the chunk
tree, with prefix reuse, CompactAttention prefill and ChunkAttention decode.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _backend(name: str) -> str:
    from .serving.backends import resolve_backend

    try:
        return resolve_backend(name)
    except RuntimeError as e:  # cupy asked for, no GPU: a message, not a traceback
        raise SystemExit(f"--{e}") from None


def demo(args) -> int:
    from . import ChunkAttentionDecode
    from .arrays import to_host
    from .reference import ChunkCache, oracle_decode, to_float32
    from .reference.checks import cdiv
    from .reference.workloads import TokenKV, fill_cache, prefix_tree_prompts, random_queries

    backend = _backend(args.backend)
    c, L, Hkv, Hq, D = args.chunk_size, args.layers, args.kv_heads, args.q_heads, args.head_dim
    print(f"cpattn demo: {args.requests} requests sharing prompt prefixes (tree of {args.levels} levels), "
          f"chunk size {c}, {args.dtype}, Hq={Hq} Hkv={Hkv} D={D}, backend {backend}")
    prompts = prefix_tree_prompts(args.seed, args.requests, c, levels=args.levels, fanout=3,
                                  max_chunks=args.segment_chunks, vocab=50, own_max_chunks=2)
    kv = TokenKV(L, Hkv, D, dtype=args.dtype, seed=args.seed, max_len=max(map(len, prompts)) + 8)
    need = sum(cdiv(len(p) + 1, c) for p in prompts) + 8
    if backend == "cupy":
        from .chunk_cache import GpuChunkCache as cache_class
    else:
        cache_class = ChunkCache
    cache = cache_class(L, Hkv, D, num_chunks=need, chunk_size=c, dtype=args.dtype)
    t0 = time.perf_counter()
    ids = fill_cache(cache, prompts, kv)
    t_fill = time.perf_counter() - t0
    st = cache.stats()
    saved = 1 - st["tokens_stored"] / st["tokens_flat"]
    print(f"  cache: {st['tokens_stored']} tokens stored vs {st['tokens_flat']} in a flat cache "
          f"({100 * saved:.1f}% memory saved), {st['chunks_referenced']} chunks in use, filled in {t_fill:.2f}s")

    dec = ChunkAttentionDecode(cache, piece_chunks=args.piece_chunks)  # the cache picks the backend
    t0 = time.perf_counter()
    plan = dec.plan(ids, Hq)
    t_plan = time.perf_counter() - t0
    print(f"  plan:  {plan.summary()} (built in {1e3 * t_plan:.2f} ms)")

    q = random_queries(args.seed + 1, len(ids), Hq, D, args.dtype)
    q_dev = q
    if backend == "cupy":
        import cupy

        q_dev = cupy.asarray(q)
        dec.run(q_dev, 0)  # compile + warm up
    worst = 0.0
    for layer in range(L):
        t0 = time.perf_counter()
        o = to_float32(to_host(dec.run(q_dev, layer)), cache.dtype)  # to_host waits for the device
        t_run = time.perf_counter() - t0
        ref = oracle_decode(cache, ids, q, layer=layer)[0]  # float64, K/V read back from either pool
        err = float(np.abs(o - ref).max() / np.abs(ref).max())
        worst = max(worst, err)
        print(f"  layer {layer}: two-phase decode {1e3 * t_run:.2f} ms, max error vs float64 oracle "
              f"{err:.2e} (relative to max |o|)")
    ok = worst < args.tolerance
    print(f"  {'OK' if ok else 'FAILED'}: worst relative error {worst:.2e} (tolerance {args.tolerance:.0e})")
    if args.serving_requests > 0:
        ok = serving(args, backend) and ok
    return 0 if ok else 1


def serving(args, backend: str) -> bool:
    """The whole serving flow on the same geometry; True when prefixes were reused and every
    layer's prefill read at least ``--min-recall`` of the attention mass on average."""
    from .examples.serving import run_demo
    from .serving.model import config_from_args

    cfg = config_from_args(args)
    print()
    reports = run_demo(backend, requests=args.serving_requests, waves=2, system_len=args.system_len,
                       chunk_size=args.chunk_size, prefill_chunk=4 * args.chunk_size, check=args.check_requests,
                       config=cfg, seed=args.seed)
    recall = [r[0] for rep in reports for r in rep.recall if r]
    reused = sum(rep.prefill_reused for rep in reports)
    ok = reused > 0 and all(r >= args.min_recall for r in recall)
    print(f"  {'OK' if ok else 'FAILED'}: {reused} prompt tokens reused, lowest per-layer prefill recall "
          f"{min(recall, default=1.0):.4f} (at least {args.min_recall} expected)")
    return ok


def main(argv=None) -> int:
    from . import __version__
    from .serving.backends import BACKENDS
    from .serving.model import add_model_arguments

    p = argparse.ArgumentParser(prog="cpattn", description=__doc__)
    p.add_argument("--version", action="version", version=f"cpattn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="prefix-sharing decode checked against a dense oracle, then the serving example")
    d.add_argument("--backend", choices=BACKENDS, default="auto")
    d.add_argument("--requests", type=int, default=24)
    d.add_argument("--levels", type=int, default=2)
    d.add_argument("--segment-chunks", type=int, default=6, help="max chunks per shared tree level")
    d.add_argument("--chunk-size", type=int, default=16)
    add_model_arguments(d, num_q_heads=8)  # the serving model's shape; the decode check uses its heads
    d.add_argument("--piece-chunks", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tolerance", type=float, default=1e-2)
    d.add_argument("--serving-requests", type=int, default=8,
                   help="requests per wave of the serving example (0 skips it)")
    d.add_argument("--system-len", type=int, default=256, help="tokens of each system prompt (serving)")
    d.add_argument("--min-recall", type=float, default=0.9, help="lowest acceptable mean prefill recall")
    d.add_argument("--check-requests", type=int, default=4,
                   help="requests per wave compared with a dense no-cache model (the slow part on a CPU)")
    b = sub.add_parser("bench", help="GPU benchmarks vs PyTorch peers: table, CSV, JSON and PNG under --out",
                       description="cpattn bench decode|prefill|serving [options]; run 'cpattn bench decode --help'.")
    b.add_argument("which", choices=("decode", "prefill", "serving"))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see its --help)")
    from .serving import cli_models

    cli_models.register(sub)  # cpattn generate, cpattn models
    args = p.parse_args(argv)
    if getattr(args, "run", None):
        return args.run(args)
    if args.command == "demo":
        return demo(args)
    if args.command == "bench":
        from . import gpu_available

        if not gpu_available() and "-h" not in args.rest and "--help" not in args.rest:
            print("cpattn bench: needs CuPy and a CUDA GPU (and PyTorch for the peers); none visible here",
                  file=sys.stderr)
            return 2
        if args.which == "decode":
            from .bench.decode import main as bench_main
        elif args.which == "serving":
            from .bench.serving import main as bench_main
        else:
            from .bench.prefill import main as bench_main
        return bench_main(args.rest) or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
