"""Request workloads for the server: prompts that share system prompts, and their pool footprint.

Each workload is a list of ``(prompt, max_new_tokens)`` (``arrival_workload``: with the arrival step
third), prompts as lists of token ids.
"""
from __future__ import annotations

import numpy as np

from ..reference.checks import cdiv, check_int, check_real


def system_prompt_workload(seed: int, num_requests: int, num_systems: int = 2, system_len: int = 200,
                           own_len: tuple = (8, 48), max_new_tokens: int = 8, vocab: int = 256):
    """Prompts of ``num_requests`` requests, each a random system prompt (of ``num_systems``,
    ``system_len`` tokens, not chunk aligned in general) plus its own ``own_len`` tokens;
    returns a list of (prompt, max_new_tokens)."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, vocab, system_len).tolist() for _ in range(num_systems)]
    out = []
    for i in range(num_requests):
        own = rng.integers(0, vocab, int(rng.integers(own_len[0], own_len[1] + 1))).tolist()
        out.append((systems[i % num_systems] + own, int(rng.integers(max(1, max_new_tokens // 2), max_new_tokens + 1))))
    return out


def footprint_chunks(work, chunk_size: int) -> int:
    """Pool chunks that the requests of ``work`` [(prompt, max_new_tokens)] hold when all are
    live in one tree: each distinct full prompt chunk once, plus every request's own tail."""
    c, shared, private = chunk_size, set(), 0
    for prompt, m in work:
        full = (len(prompt) - 1) // c  # chunks matchable under max_match = len - 1
        shared.update(tuple(prompt[:(i + 1) * c]) for i in range(full))
        private += cdiv(len(prompt) + m - 1, c) - full
    return len(shared) + private


def shared_prompt_workload(seed: int, requests: int, system_len: int, own_len: int, decode_steps: int,
                           vocab: int) -> list:
    """One random system prompt + ``own_len`` random tokens per request; ``decode_steps + 1`` new
    tokens each (the first from the prefill, the rest one per decode step)."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, system_len).tolist()
    return [(system + rng.integers(0, vocab, own_len).tolist(), decode_steps + 1) for _ in range(requests)]


def arrival_times(seed: int, num_requests: int, rate: float) -> list:
    """Arrival times of ``num_requests`` requests of a Poisson process of ``rate`` requests per
    unit of time (exponential gaps from ``numpy.random.default_rng(seed)``), shifted so the first
    arrives at 0; non-decreasing floats (seconds for wall-clock serving)."""
    check_int(seed, "seed", 0)
    check_int(num_requests, "num_requests", 0)
    rate = check_real(rate, "rate", lo=0.0, lo_open=True)
    if not num_requests:
        return []
    t = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, num_requests))
    return (t - t[0]).tolist()


def poisson_arrivals(seed: int, num_requests: int, rate: float) -> list:
    """Arrival steps of ``num_requests`` requests of a Poisson process of ``rate`` requests per
    server step: ``arrival_times`` floored to steps, the first at step 0; non-decreasing."""
    return np.floor(arrival_times(seed, num_requests, rate)).astype(int).tolist()


def arrival_workload(seed: int, num_requests: int, rate: float = 0.5, num_systems: int = 3,
                     system_len: tuple = (16, 120), branches: int = 2, branch_len: tuple = (0, 40),
                     own_len: tuple = (1, 40), max_new_tokens: tuple = (1, 16), vocab: int = 256) -> list:
    """Requests arriving as a Poisson process (``poisson_arrivals``) whose prompts share
    prefixes at two depths: one of ``num_systems`` system prompts, then one of ``branches``
    continuations of that system (few-shot examples, a document), then the request's own
    tokens. Every length is drawn uniformly from its (lo, hi) range, inclusive, so shared
    prefixes end anywhere in a chunk. Returns [(prompt, max_new_tokens, arrival)] in arrival
    order; prompts have at least one token."""
    check_int(num_requests, "num_requests", 0)
    check_int(num_systems, "num_systems", 1)
    check_int(branches, "branches", 1)
    rng = np.random.default_rng(seed)

    def draw(lo_hi):
        return int(rng.integers(lo_hi[0], lo_hi[1] + 1))

    systems = [rng.integers(0, vocab, draw(system_len)).tolist() for _ in range(num_systems)]
    tails = [[rng.integers(0, vocab, draw(branch_len)).tolist() for _ in range(branches)] for _ in systems]
    arrivals = poisson_arrivals(int(rng.integers(2**31)), num_requests, rate)
    out = []
    for t in arrivals:
        s = int(rng.integers(num_systems))
        prompt = systems[s] + tails[s][int(rng.integers(branches))] + rng.integers(0, vocab, draw(own_len)).tolist()
        if not prompt:
            prompt = [int(rng.integers(vocab))]
        out.append((prompt, max(1, draw(max_new_tokens)), t))
    return out
