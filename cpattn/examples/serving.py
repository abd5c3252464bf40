"""The serving example: a small model whose attention goes through one chunk-tree KV cache.

Requests that share system prompts arrive in waves; ``cpattn.serving.Server`` reuses the cached
K/V of their shared prefixes, prefills the rest chunk by chunk with CompactAttention, decodes
all live requests together with ChunkAttention, and releases finished requests (their chunks
stay cached for the next wave; the pool evicts least-recently-used prefixes). Each wave prints
a report; the first requests of each wave are generated again by the dense model
(``dense_generate``: no cache, no sparsity) and compared token for token.

    python -m cpattn.examples.serving [--backend auto|numpy|cupy] [--requests 12] [--alpha 0.06] ...
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from ..reference.checks import cdiv
from ..serving import (ModelConfig, PrefillOptions, Server, ServingReport, TinyLM, check_against_dense,
                       footprint_chunks, resolve_backend, system_prompt_workload)
from ..serving.backends import BACKENDS
from ..serving.model import add_model_arguments, config_from_args


def run_demo(backend: str = "auto", requests: int = 12, waves: int = 2, num_systems: int = 2, system_len: int = 300,
             own_len: tuple = (8, 64), max_new_tokens: int = 8, chunk_size: int = 16, prefill_chunk: int = 64,
             pool_chunks: int | None = None, alpha: float = 0.06, check: int | None = None, seed: int = 0,
             config: ModelConfig | None = None, measure_recall: bool = True, out=print) -> list[ServingReport]:
    """Serve ``waves`` waves of ``requests`` requests (each wave arrives once the previous one
    is done, so it finds its system prompts in the prefix cache); print one report per wave.

    ``check``: how many requests of each wave to generate again with the dense model and compare
    (None: all of them, 0: none; the dense model recomputes everything, so it dominates on a CPU).
    """
    config = config or ModelConfig()
    name = resolve_backend(backend)
    xp = np
    if name == "cupy":
        import cupy as xp  # noqa: F811
    model = TinyLM(config, seed=seed, xp=xp)
    work = system_prompt_workload(seed + 1, requests * waves, num_systems, system_len, own_len, max_new_tokens,
                                  config.vocab_size)
    if pool_chunks is None:  # a quarter more than one wave needs: later waves evict (LRU)
        need = footprint_chunks(work[:requests], chunk_size)
        pool_chunks = need + need // 4
    options = PrefillOptions(alpha=alpha)
    # warm-up on a scratch server: kernel compilation (GPU) and the plan builder's first call
    # would otherwise be timed as part of the first wave
    scratch = Server(model, 4 * (cdiv(2 * prefill_chunk + 8, chunk_size) + 2), chunk_size, prefill_chunk, name,
                     options, measure_recall=False)
    for tail in ([1, 2, 3], [4, 5]):
        scratch.submit([t % config.vocab_size for t in list(range(2 * prefill_chunk)) + tail], 2)
    scratch.run()
    server = Server(model, pool_chunks, chunk_size, prefill_chunk, name, options, measure_recall)
    cfg = config
    out(f"serving: {cfg.num_layers}-layer model (hidden {cfg.hidden}, Hq={cfg.num_q_heads} Hkv={cfg.num_kv_heads} "
        f"D={cfg.head_dim}, {cfg.dtype}), {waves} wave(s) of {requests} requests over {num_systems} system "
        f"prompts of {system_len} tokens, pool {pool_chunks} chunks of {chunk_size}, prefill chunks of "
        f"{prefill_chunk}, alpha {alpha}")
    reports = []
    for w in range(waves):
        batch = [server.submit(p, m) for p, m in work[w * requests:(w + 1) * requests]]
        rep = server.run()
        if check is None or check > 0:
            check_against_dense(model, batch[:check], rep)
        out(f" wave {w + 1}:")
        for line in rep.lines():
            out(line)
        reports.append(rep)
    return reports


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cpattn.examples.serving", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=BACKENDS, default="auto")
    ap.add_argument("--requests", type=int, default=12, help="requests per wave")
    ap.add_argument("--waves", type=int, default=2)
    ap.add_argument("--systems", type=int, default=2, help="distinct system prompts")
    ap.add_argument("--system-len", type=int, default=300)
    ap.add_argument("--own-len", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--pool-chunks", type=int, default=None, help="default: room for one wave")
    ap.add_argument("--alpha", type=float, default=0.06)
    add_model_arguments(ap)
    ap.add_argument("--check", type=int, default=None, metavar="N",
                    help="compare the first N requests of each wave with the dense model (default all, 0 none)")
    ap.add_argument("--no-recall", action="store_true",
                    help="skip the float64 recall check of every prefill chunk (it runs on the host)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    cfg = config_from_args(a)
    run_demo(a.backend, a.requests, a.waves, a.systems, a.system_len, tuple(a.own_len), a.new_tokens, a.chunk_size,
             a.prefill_chunk, a.pool_chunks, a.alpha, a.check, a.seed, cfg, not a.no_recall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
