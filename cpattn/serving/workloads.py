"""Request workloads for the server: prompts that share system prompts, and their pool footprint.

Each workload is a list of ``(prompt, max_new_tokens)``, prompts as lists of token ids.
"""
from __future__ import annotations

import numpy as np

from ..reference.checks import cdiv


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
