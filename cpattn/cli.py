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


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: argument --x: expected ..., got ...``
    and a pointer to ``--help`` instead of the usage block (subcommands inherit it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_option(lo: int | None = None, hi: int | None = None, power_of_two: bool = False):
    """An argparse ``type`` for an integer option with lo <= value <= hi (and a power of two):
    a bad value ends in one line, ``argument --x: expected ..., got ...``, not a traceback."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        bounds = " and ".join(b for b in ((f">= {lo}" if lo is not None else ""),
                                          (f"<= {hi}" if hi is not None else "")) if b)
        kind = "a power of two" if power_of_two else "an integer"
        if (lo is not None and value < lo) or (hi is not None and value > hi) \
                or (power_of_two and value & (value - 1)):
            raise argparse.ArgumentTypeError(f"expected {kind}{' ' + bounds if bounds else ''}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def real_option(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """An argparse ``type`` for a finite real option in [lo, hi] (``lo_open``: (lo, hi])."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        if not np.isfinite(value) or low_bad or (hi is not None and value > hi):
            lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
            hi_s = "" if hi is None else f"<= {hi}"
            want = " and ".join(x for x in (lo_s, hi_s) if x)
            raise argparse.ArgumentTypeError(f"expected a finite number {want}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _backend(name: str) -> str:
    from .serving.backends import resolve_backend

    try:
        return resolve_backend(name)
    except RuntimeError as e:  # cupy asked for, no GPU: a message, not a traceback
        raise SystemExit(f"cpattn demo: error: argument --{e}") from None


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
    flat_pages = sum(cdiv(len(p), c) for p in prompts)  # a paged cache without sharing
    need = shared_pages(prompts, c)  # the pool is sized for the tree, not for the flat case
    if backend == "cupy":
        from .chunk_cache import GpuChunkCache as cache_class
    else:
        cache_class = ChunkCache
    cache = cache_class(L, Hkv, D, num_chunks=need, chunk_size=c, dtype=args.dtype)
    t0 = time.perf_counter()
    ids = fill_cache(cache, prompts, kv)
    t_fill = time.perf_counter() - t0
    st = cache.stats()
    page_bytes = 2 * L * Hkv * c * D * 2  # K and V of one chunk, every layer, 2-byte storage
    used = st["chunks_referenced"]
    flat_need = sum(cdiv(len(p) + 1, c) for p in prompts)
    print(f"  cache: pool of {need} chunks, sized for the shared tree with one decode token each (a flat "
          f"paged cache needs {flat_need}), filled in {t_fill:.2f}s")
    print(f"  memory: {used} pages = {used * page_bytes / 2**20:.2f} MiB in the tree vs {flat_pages} pages = "
          f"{flat_pages * page_bytes / 2**20:.2f} MiB flat ({100 * (1 - used / flat_pages):.1f}% saved); "
          f"tokens {st['tokens_stored']} vs {st['tokens_flat']} "
          f"({100 * (1 - st['tokens_stored'] / st['tokens_flat']):.1f}% saved)")

    dec = ChunkAttentionDecode(cache, piece_chunks=args.piece_chunks)  # the cache picks the backend
    t0 = time.perf_counter()
    plan = dec.plan(ids, Hq)  # the first call in this process: the GPU planner's numba loops load or compile
    t_first = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        plan = dec.plan(ids, Hq)
        times.append(time.perf_counter() - t0)
    t_plan = float(np.median(times))
    planner = "fast planner, numba" if backend == "cupy" else "textbook planner, NumPy reference"
    print(f"  plan:  {plan.summary()}")
    print(f"         built in {1e3 * t_plan:.2f} ms (median of 5, {planner}); the first call took "
          f"{1e3 * t_first:.1f} ms" + (" (numba compiles the planner once and caches it on disk)"
                                       if backend == "cupy" else ""))

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
    print(f"  {'OK' if ok else 'FAILED'}: decode of all {len(ids)} sequences on every layer matches the float64 "
          f"oracle: worst max-error relative to max |o| {worst:.2e} (tolerance {args.tolerance:.0e})")
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
    means = [r[0] for rep in reports for r in rep.recall if r]
    lows = [r[1] for rep in reports for r in rep.recall if r]
    reused = sum(rep.prefill_reused for rep in reports)
    ok = reused > 0 and all(r >= args.min_recall for r in means)
    print(f"  {'OK' if ok else 'FAILED'}: prefix reuse ({reused} prompt tokens reused, > 0 expected) and every "
          f"layer's mean prefill recall >= {args.min_recall}: lowest layer mean {min(means, default=1.0):.4f} "
          f"(lowest single query row {min(lows, default=1.0):.4f}, not checked)")
    return ok


def shared_pages(prompts, c: int) -> int:
    """Pool pages the prompts hold in one prefix tree, plus one decode token each: the tree is
    built on a token-only cache (a 1x1x1 pool), so the count is the cache's own."""
    from .reference import ChunkCache

    probe = ChunkCache(1, 1, 1, num_chunks=sum(-(-(len(p) + 1) // c) for p in prompts), chunk_size=c)
    ids = []
    for p in prompts:
        s = probe.add_sequence(p)  # the cached prefix of complete chunks
        probe.reserve(s, p[probe.seq_len(s):])
        probe.commit(s)
        ids.append(s)
    probe.reserve_batch(ids, [0] * len(ids))  # the decode token
    return probe.num_referenced


def main(argv=None) -> int:
    from . import __version__
    from .serving.backends import BACKENDS
    from .serving.model import add_model_arguments

    p = Parser(prog="cpattn", description=__doc__)
    p.add_argument("--version", action="version", version=f"cpattn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    d = sub.add_parser("demo", formatter_class=fmt,
                       help="prefix-sharing decode checked against a dense oracle, then the serving example",
                       description="Prefix-sharing decode checked against a float64 oracle, then the serving "
                                   "example (CompactAttention prefill, ChunkAttention decode).")
    d.add_argument("--backend", choices=BACKENDS, default="auto", help="numpy, cupy, or auto (cupy with a GPU)")
    d.add_argument("--requests", type=int_option(1, 4096), default=24, metavar="N",
                   help="sequences of the decode check")
    d.add_argument("--levels", type=int_option(1, 8), default=2, metavar="N", help="shared levels of the prompt tree")
    d.add_argument("--segment-chunks", type=int_option(1), default=6, metavar="N",
                   help="max chunks per shared tree level")
    d.add_argument("--chunk-size", type=int_option(1, 128, power_of_two=True), default=16, metavar="C",
                   help="tokens per chunk (a power of two; 16 to 128 on the GPU)")
    add_model_arguments(d, num_q_heads=8)  # the serving model's shape; the decode check uses its heads
    d.add_argument("--piece-chunks", type=int_option(1), default=4, metavar="N", help="chunks per phase-1 piece")
    d.add_argument("--seed", type=int_option(0), default=0, metavar="N", help="workload and model seed")
    d.add_argument("--tolerance", type=real_option(0.0, lo_open=True), default=1e-2, metavar="X",
                   help="largest decode error vs the float64 oracle, relative to max |o|")
    d.add_argument("--serving-requests", type=int_option(0), default=8, metavar="N",
                   help="requests per wave of the serving example (0 skips it)")
    d.add_argument("--system-len", type=int_option(1), default=256, metavar="N",
                   help="tokens of each system prompt (serving)")
    d.add_argument("--min-recall", type=real_option(0.0, 1.0), default=0.9, metavar="X",
                   help="lowest acceptable mean prefill recall of a layer (serving)")
    d.add_argument("--check-requests", type=int_option(0), default=4, metavar="N",
                   help="requests per wave compared with a dense no-cache model (the slow part on a CPU)")
    b = sub.add_parser("bench", help="GPU benchmarks vs PyTorch peers: table, CSV, JSON and PNG under --out",
                       description="cpattn bench decode|prefill|serving|mixed [options]; run 'cpattn bench decode "
                                   "--help'. mixed (the real model in mixed steps under Poisson arrivals vs "
                                   "transformers) also runs on the NumPy reference without a GPU.")
    b.add_argument("which", choices=("decode", "prefill", "serving", "mixed"))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see its --help)")
    from .serving import cli_models

    cli_models.register(sub)  # cpattn generate, cpattn models
    args = p.parse_args(argv)
    if getattr(args, "run", None):
        return args.run(args)
    if args.command == "demo":
        try:
            return demo(args)
        except (ValueError, TypeError, ModuleNotFoundError) as e:  # CacheError is a ValueError
            print(f"cpattn demo: error: {as_option(str(e), args)}", file=sys.stderr)
            return 2
    if args.command == "bench":
        from . import gpu_available

        if args.which != "mixed" and not gpu_available() and "-h" not in args.rest and "--help" not in args.rest:
            print("cpattn bench: needs CuPy and a CUDA GPU (and PyTorch for the peers); none visible here",
                  file=sys.stderr)
            return 2
        if args.which == "decode":
            from .bench.decode import main as bench_main
        elif args.which == "serving":
            from .bench.serving import main as bench_main
        elif args.which == "mixed":
            from .bench.mixed_serving import main as bench_main
        else:
            from .bench.prefill import main as bench_main
        return bench_main(args.rest) or 0
    return 2


def as_option(message: str, args) -> str:
    """A library message ``name: expected ..., got ...`` as ``argument --name: ...`` when ``name``
    is an option of the command (chunk_size -> --chunk-size), else unchanged."""
    name, sep, rest = message.partition(": ")
    if sep and name.isidentifier() and hasattr(args, name):
        return f"argument --{name.replace('_', '-')}: {rest}"
    return message


if __name__ == "__main__":
    sys.exit(main())
