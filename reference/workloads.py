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
from .chunk_cache import ChunkCache


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


# ============================================================================ long-context prefill workloads
# Structured Q/K/V for CompactAttention (chunked prefill): attention sinks, RoPE-like locality,
# planted needle spans that specific queries retrieve, and a spread of head temperatures. Every
# term is sized in logits (units of scale * q.k with scale = 1/sqrt(head_dim)), so the structure
# looks the same at every head_dim. Positions are generated in slabs of _SLAB tokens, each from
# its own seeded generator: memory stays bounded at 128K tokens and the values do not depend on
# anything but the seed and the arguments.

_SLAB = 4096


@dataclass
class Needles:
    """Planted needles, at the same positions in every layer.

    Needle i: keys of kv head ``kv_head[i]`` at tokens ``key_start[i] .. key_start[i]+key_len-1``
    carry a direction that query head ``q_head[i]`` carries at rows ``query_pos[i, :]``, so those
    rows put most of their attention on that span.

    Arrays: key_start, q_head, kv_head int64 [N]; query_pos int64 [N, R].
    """

    key_start: np.ndarray
    key_len: int
    q_head: np.ndarray
    kv_head: np.ndarray
    query_pos: np.ndarray

    def __len__(self) -> int:
        return len(self.key_start)

    def triples(self, chunk_size: int):
        """Every (query row, query head, key block) a needle asks for: three int64 arrays [M]."""
        out = [], [], []
        for i in range(len(self)):
            first, last = self.key_start[i] // chunk_size, (self.key_start[i] + self.key_len - 1) // chunk_size
            blocks = np.arange(first, last + 1)
            rows = self.query_pos[i]
            out[0].append(np.repeat(rows, len(blocks)))
            out[1].append(np.full(len(rows) * len(blocks), self.q_head[i]))
            out[2].append(np.tile(blocks, len(rows)))
        return tuple(np.concatenate(x).astype(np.int64) if x else np.zeros(0, np.int64) for x in out)


@dataclass
class LongContext:
    """A structured prompt: q [L, n, Hq, D], k, v [L, n, Hkv, D] in storage dtype ``dtype``;
    ``temperature`` float32 [L, Hq] (each query head's multiplier), ``needles`` as planted."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    dtype: str
    temperature: np.ndarray
    num_sinks: int
    needles: Needles

    @property
    def num_tokens(self) -> int:
        return self.q.shape[1]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rotate(x, pos, base: float):
    """RoPE (half-split pairs) of x [m, H, D] at positions pos [m]: q.k then depends on distance."""
    D = x.shape[-1]
    half = D // 2
    theta = base ** (-np.arange(half, dtype=np.float64) * 2 / D)  # [D/2]
    ang = pos[:, None].astype(np.float64) * theta[None, :]  # [m, D/2]
    cos, sin = np.cos(ang).astype(np.float32)[:, None], np.sin(ang).astype(np.float32)[:, None]
    x1, x2 = x[..., :half], x[..., half: 2 * half]
    out = x.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half: 2 * half] = x1 * sin + x2 * cos
    return out


def long_context_qkv(seed: int, n_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, *,
                     num_layers: int = 1, dtype: str = "float16", num_sinks: int = 4,
                     sink_logit: float = 10.0, locality: float = 8.0, locality_len: int = 512,
                     rope_logit: float = 2.0, temperature=(0.7, 3.0), noise: float = 0.7,
                     num_needles: int = 8, needle_len: int = 64, needle_queries: int = 8,
                     needle_logit: float = 20.0, rope_base: float = 10000.0) -> LongContext:
    """Q/K/V of a long prompt with the structure sparse prefill selectors rely on.

    Per layer and query head g (kv head h = g // G), with position p and RoPE rotation R(p)::

        k[p, h] = R(p) (Ar c_h + sigma e) + Ad d_h(p) + [p < num_sinks] B s_h + [p in needle i] M w_i
        q[p, g] = tau_g * ( R(p) (Ar u_g + sigma e) + Ad d_h(p) + B s_h + [p queries needle i] M w_i )

    * locality: d_h(p) sums "topic" directions drifting along the prompt at several scales
      (each interpolated between random anchors every ``locality_len * 4**i`` tokens, up to the
      prompt length), so attention decays with distance at every range, and block means keep
      that preference; on top, the rotated shared content (c_h, u_g a noisy copy of it) gives
      RoPE's token-level peak at distance 0;
    * sinks: the first ``num_sinks`` keys carry s_h (orthogonal to c_h) that every query has;
    * needles: ``num_needles`` spans of ``needle_len`` keys (aligned to ``needle_len``, so with
      block size ``needle_len`` each is one key block) carry a direction w_i that
      ``needle_queries`` consecutive rows of one query head, somewhere after the span, carry too;
    * temperatures: tau_g spreads geometrically over ``temperature``, shuffled per layer.

    Ar, Ad, B, M, sigma are set so that at tau = 1 the terms add about ``rope_logit``,
    ``locality``, ``sink_logit``, ``needle_logit`` and (noise std) ``noise`` logits to
    scale * q.k (scale = 1/sqrt(head_dim)). v is standard normal.

    Vectorised per slab of 4096 positions, each from its own seeded generator (memory stays
    bounded; 128K tokens x 32 heads x 128 dims is fine on a host). Returns a ``LongContext``.
    """
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads: expected a multiple of num_kv_heads {num_kv_heads}, got {num_q_heads}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim: expected an even number >= 2, got {head_dim}")
    n, Hq, Hkv, D, L = int(n_tokens), num_q_heads, num_kv_heads, head_dim, num_layers
    G = Hq // Hkv
    scale = 1.0 / np.sqrt(D)
    scales = [locality_len * 4**i for i in range(32) if i == 0 or locality_len * 4**(i - 1) < n]
    Ar, Ad, B, M = (np.sqrt(x / scale) for x in (rope_logit, locality / len(scales), sink_logit, needle_logit))
    sigma = np.sqrt(noise * scale)  # sigma^2 * (e . e') * scale has std `noise`

    # 1. needles: positions shared by all layers; key spans aligned to needle_len
    rng = np.random.default_rng([seed, 0])
    R, span = int(needle_queries), int(needle_len)
    first = -(-num_sinks // span)  # first aligned span after the sinks
    last = (n - span - R) // span  # last one that leaves room for its queries
    N = int(num_needles) if last >= first else 0
    key_start = span * rng.integers(first, last + 1, N) if N else np.zeros(0, np.int64)
    gap = n - R - key_start - span + 1  # query starts in [key_start + span, n - R]
    q_start = key_start + span + (rng.random(N) * gap).astype(np.int64)
    q_head = rng.integers(0, Hq, N)
    needles = Needles(key_start=key_start.astype(np.int64), key_len=span, q_head=q_head.astype(np.int64),
                      kv_head=(q_head // G).astype(np.int64),
                      query_pos=q_start[:, None] + np.arange(R)[None, :])

    sd = np.float16 if dtype == "float16" else np.uint16
    q = np.empty((L, n, Hq, D), sd)
    k = np.empty((L, n, Hkv, D), sd)
    v = np.empty((L, n, Hkv, D), sd)
    temps = np.empty((L, Hq), np.float32)
    kv_of = np.arange(Hq) // G
    for layer in range(L):
        # 2. per-layer directions (float32 from here on: the bulk is large)
        rng = np.random.default_rng([seed, 1, layer])
        content = _unit(rng.standard_normal((Hkv, D)))  # c_h
        sink = rng.standard_normal((Hkv, D))
        sink = _unit(sink - (sink * content).sum(-1, keepdims=True) * content)  # s_h
        qdir = _unit(content[kv_of] + 0.5 * _unit(rng.standard_normal((Hq, D))))  # u_g
        anchors = [_unit(rng.standard_normal((n // ell + 2, Hkv, D))).astype(np.float32) for ell in scales]
        w = _unit(rng.standard_normal((N, D)))
        tau = np.geomspace(temperature[0], temperature[1], Hq)[rng.permutation(Hq)]
        temps[layer] = tau
        k_base = (Ar * content).astype(np.float32)[None]  # [1, Hkv, D]
        q_base = (Ar * qdir).astype(np.float32)[None]  # [1, Hq, D]
        q_sink = (B * sink[kv_of]).astype(np.float32)[None]  # [1, Hq, D]
        sig = np.float32(sigma)

        # 3. slabs of positions
        for a in range(0, n, _SLAB):
            b = min(n, a + _SLAB)
            pos = np.arange(a, b)
            r = np.random.default_rng([seed, 2, layer, a // _SLAB])
            topic = np.zeros((b - a, Hkv, D), np.float32)
            for ell, anc in zip(scales, anchors):  # d_h(p) at every scale, [b-a, Hkv, D]
                f = pos / ell
                m, lam = f.astype(np.int64), (f - np.floor(f)).astype(np.float32)[:, None, None]
                topic += np.float32(Ad) * _unit((1 - lam) * anc[m] + lam * anc[m + 1])
            kk = _rotate(k_base + sig * r.standard_normal((b - a, Hkv, D), np.float32), pos, rope_base)
            kk += topic
            qq = _rotate(q_base + sig * r.standard_normal((b - a, Hq, D), np.float32), pos, rope_base)
            qq += topic[:, kv_of]
            qq += q_sink
            kk[: max(0, min(b, num_sinks) - a)] += (B * sink[None]).astype(np.float32)
            for i in range(N):  # needle spans and querying rows that fall in this slab
                ks = np.arange(max(a, key_start[i]), min(b, key_start[i] + span)) - a
                kk[ks, needles.kv_head[i]] += (M * w[i]).astype(np.float32)
                rows = needles.query_pos[i]
                qq[rows[(rows >= a) & (rows < b)] - a, q_head[i]] += (M * w[i]).astype(np.float32)
            qq *= tau.astype(np.float32)[None, :, None]
            q[layer, a:b] = to_storage(qq, dtype)
            k[layer, a:b] = to_storage(kk, dtype)
            v[layer, a:b] = to_storage(r.standard_normal((b - a, Hkv, D), np.float32), dtype)
    return LongContext(q=q, k=k, v=v, dtype=dtype, temperature=temps, num_sinks=int(num_sinks),
                       needles=needles)


def oracle_block_tables(cache: ChunkCache, seq: int, q, like, layer: int = 0, scale=None):
    """Oracle selector at equal density: per table of ``like`` (a ``BlockTables``), the same
    number of past blocks, chosen by exact attention mass summed over the table's query rows
    and heads (ties: the earlier block). Own blocks as in ``like``.

    q: [n, Hq, D] storage dtype, the chunk's queries. Returns a ``BlockTables``; since every
    table's mass is maximal for its block count, its mean recall is at least ``like``'s.
    """
    from .compact_attention import attention_mass, tables_from_mask

    mass = attention_mass(cache, seq, q, layer, scale)  # [n, Hq, num_blocks] float64
    c, Pb = cache.chunk_size, like.num_past_blocks
    T, Hkv, S, s = like.num_tiles, like.num_kv_heads, like.num_subgroups, like.group_size
    G = like.num_q_heads // Hkv
    past_mask = np.zeros((T, Hkv, S, Pb), bool)
    for t in range(T):
        rows = slice(int(like.qo_indptr[t]), int(like.qo_indptr[t + 1]))
        for h in range(Hkv):
            for g in range(S):
                heads = slice(h * G + g * s, h * G + (g + 1) * s)
                total = mass[rows, heads, :Pb].sum(axis=(0, 1))  # [Pb]
                top = np.argsort(-total, kind="stable")[: like.num_past[like.table(t, h, g)]]
                past_mask[t, h, g, top] = True
    q_tile = -(-int(like.qo_indptr[1]) // c) * c
    return tables_from_mask(cache, seq, past_mask, chunk_len=like.chunk_len,
                            num_q_heads=like.num_q_heads, q_tile=q_tile)
