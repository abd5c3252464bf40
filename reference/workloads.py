"""Reproducible prefix-sharing workloads.

A workload is a list of prompts (token ids) whose prefixes form a tree: a few system prompts,
each with sub-prompts (several levels), and per-request suffixes. Lengths favour the awkward
cases: one past a chunk boundary, exactly on one, and divergence in the middle of a chunk.

K/V are a deterministic function of (token, position) built from a seed (``TokenKV``), so the
same prefix always has the same K/V, as in a real model, and any sequence's K/V can be
recomputed to check what the cache stores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import to_storage
from .tree import ChunkCache


def awkward_length(rng, c: int, max_chunks: int) -> int:
    """A length in [1, max_chunks*c], half the time on or next to a chunk boundary."""
    k = int(rng.integers(0, max_chunks + 1))
    pick = rng.random()
    if pick < 0.2:
        return max(1, k * c)  # on a boundary
    if pick < 0.4:
        return k * c + 1  # one past
    if pick < 0.5:
        return max(1, k * c - 1)  # one short
    return int(rng.integers(1, max_chunks * c + 1))


def prefix_tree_prompts(seed: int, num_requests: int, chunk_size: int, levels: int = 2,
                        fanout: int = 3, max_chunks: int = 3, vocab: int = 50,
                        own_max_chunks: int = 2) -> list[list[int]]:
    """Prompts of ``num_requests`` requests sharing prefixes through a ``levels``-deep tree.

    Each tree level adds a segment of awkward length; siblings share their parent's tokens and
    may share the first tokens of their own segment (mid-chunk divergence). A small vocabulary
    makes accidental matches likely, which the cache must handle like intended ones.
    """
    rng = np.random.default_rng(seed)

    def segment():
        return rng.integers(0, vocab, awkward_length(rng, chunk_size, max_chunks)).tolist()

    nodes = [[]]  # prefixes at the current level
    for _ in range(levels):
        nxt = []
        for pre in nodes:
            base = segment()
            for _ in range(int(rng.integers(1, fanout + 1))):
                cut = int(rng.integers(0, len(base) + 1))  # share base[:cut], then diverge
                nxt.append(pre + base[:cut] + segment())
        nodes = nxt
    prompts = []
    for _ in range(num_requests):
        pre = nodes[int(rng.integers(0, len(nodes)))]
        own = rng.integers(0, vocab, awkward_length(rng, chunk_size, own_max_chunks)).tolist()
        prompts.append(pre + own if pre + own else [int(rng.integers(0, vocab))])
    return prompts


def shared_prefix_prompts(batch: int, shared: int, own: int, seed: int = 0, vocab: int = 32000):
    """``batch`` prompts of one ``shared``-token system prompt plus ``own`` tokens each."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, vocab, shared).tolist()
    return [system + rng.integers(0, vocab, own).tolist() for _ in range(batch)]


@dataclass
class TokenKV:
    """K/V of a token as a function of (token id, position): [num_layers, n, Hkv, D] storage."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    seed: int = 0
    vocab: int = 50
    max_len: int = 4096
    spread: float = 1.0

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        shape = (self.num_layers, self.num_kv_heads, self.head_dim)
        self._tok = rng.standard_normal((2, self.vocab) + shape).astype(np.float32)
        self._pos = 0.5 * rng.standard_normal((2, self.max_len) + shape).astype(np.float32)

    def __call__(self, tokens, start: int = 0):
        t = np.asarray(tokens, np.int64) % self.vocab
        p = (start + np.arange(len(t))) % self.max_len
        kv = self.spread * (self._tok[:, t] + self._pos[:, p])  # [2, n, L, Hkv, D]
        kv = kv.transpose(0, 2, 1, 3, 4)  # [2, L, n, Hkv, D]
        return to_storage(np.ascontiguousarray(kv[0]), self.dtype), to_storage(np.ascontiguousarray(kv[1]), self.dtype)


def fill_cache(cache: ChunkCache, prompts, kv: TokenKV, order=None) -> list[int]:
    """Insert prompts (in ``order``) and then one decode token each; returns ids in prompt order.

    The decode token is the query's own token: its K/V goes in before attention, as in a model.
    """
    ids = [None] * len(prompts)
    for i in (range(len(prompts)) if order is None else order):
        k, v = kv(prompts[i])
        ids[i] = cache.add_sequence(prompts[i], k, v)
    xp = cache.xp
    for i, sid in enumerate(ids):
        n = cache.seq_len(sid)
        tok = [(7 * i + n) % kv.vocab]
        k, v = kv(tok, start=n)
        cache.append([sid], tok, xp.asarray(k), xp.asarray(v))
    return ids


def random_queries(seed: int, batch: int, num_q_heads: int, head_dim: int, dtype: str, scale: float = 1.0):
    """q [batch, Hq, D] in storage dtype, standard normal times ``scale``."""
    rng = np.random.default_rng(seed)
    return to_storage(scale * rng.standard_normal((batch, num_q_heads, head_dim)).astype(np.float32), dtype)
