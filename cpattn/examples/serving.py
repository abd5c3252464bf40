"""A worked serving pipeline: one chunk-tree KV cache under a small decoder-only transformer.

Requests that share system prompts arrive; the server

1. matches each prompt against the cache (``add_sequence(prompt, max_match=len - 1)``): the
   K/V of the longest cached prefix of complete chunks is reused, not recomputed;
2. prefills the rest of the prompt chunk by chunk (every chunk a multiple of the chunk size but
   the last), each chunk attending to the cached past through **CompactAttention** (block-union
   KV selection over the pool pages);
3. decodes all live requests together with **ChunkAttention** (two-phase partition; one plan
   serves every layer, rebuilt only when the tree or the batch changes);
4. releases finished requests: their complete chunks stay cached for later prompts, and the
   pool evicts least-recently-used prefixes when it needs room.

The model (``TinyLM``) is written against an array module ``xp`` (NumPy, or CuPy on a GPU):
random weights from a seed, RMSNorm, RoPE, GQA attention, a SwiGLU MLP and a tied or random
vocabulary projection, greedy decoding. Attention of every layer goes through a backend with two
methods::

    backend.prefill(seq, q, layer)   q [n, Hq, D] storage dtype -> o [n, Hq, D]  (one chunk of one sequence)
    backend.decode(seqs, q, layer)   q [B, Hq, D] storage dtype -> o [B, Hq, D]  (one token per sequence)

``ReferenceBackend`` runs the NumPy reference (``cpattn.reference``). ``GpuBackend`` is the
slot for the CUDA kernels (``cpattn.chunk_attention.ChunkAttentionDecode`` and ``cpattn.compact_attention``).

``dense_generate`` is the check: the same model with no cache, no sharing and no sparsity, full
causal attention recomputed over the whole sequence at every step. With ``alpha=0`` (every block
selected) the server generates the same tokens, token for token.

    python -m cpattn.examples.serving [--backend auto|numpy|cupy] [--requests 12] [--alpha 0.06] ...
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..reference.chunk_attention import decode as reference_decode
from ..reference.compact_attention import BlockMeans, compact_prefill, dense_prefill, mass_recall, split_chunks
from ..reference.dtypes import round_to_storage, storage_numpy_dtype, to_float32, to_storage
from ..reference.plan import build_decode_plan
from ..reference.chunk_cache import CacheFullError, ChunkCache


# ============================================================================ the model
@dataclass(frozen=True)
class ModelConfig:
    """Shape of ``TinyLM``. ``dtype`` is the storage dtype of attention inputs and outputs
    (q, k, v, o), as in a half-precision model; everything else computes in ``compute_dtype``.

    ``locality`` sizes a bias added to queries and keys before RoPE, in logits at distance 0 on
    the last kv head, scaled down linearly to none on kv head 0 (which stays global): it makes
    attention prefer recent tokens, the structure block selection exploits in trained models.
    0 gives a plain random model.
    """

    vocab_size: int = 256
    num_layers: int = 2
    hidden: int = 128
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    mlp_hidden: int = 256
    rope_base: float = 10000.0
    eps: float = 1e-6
    tied_embeddings: bool = False
    locality: float = 24.0
    dtype: str = "float16"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads: expected a multiple of num_kv_heads {self.num_kv_heads}, "
                             f"got {self.num_q_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even number (RoPE rotates pairs), got {self.head_dim}")


class TinyLM:
    """Decoder-only transformer with random weights: ``x -> [attention, MLP] * L -> logits``.

    The layer is split where attention happens, so a caller can route attention anywhere::

        q, k, v = model.qkv(layer, x, pos)      # x [n, hidden]; q [n, Hq, D], k, v [n, Hkv, D] storage dtype
        x = model.finish_layer(layer, x, o)     # o [n, Hq, D]: attention output (any float or storage dtype)
    """

    def __init__(self, config: ModelConfig, seed: int = 0, xp=np):
        self.config, self.xp = config, xp
        cfg, rng = config, np.random.default_rng(seed)
        self.dt = np.dtype(cfg.compute_dtype)
        H, Hq, Hkv, D, F = cfg.hidden, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden
        G = Hq // Hkv

        def w(*shape, std=1.0):  # drawn on the host from the seed, then moved: same weights on every xp
            return xp.asarray((std * rng.standard_normal(shape)).astype(self.dt))

        def gain(n):
            return xp.asarray((1.0 + 0.1 * rng.standard_normal(n)).astype(self.dt))

        self.embed_table = w(cfg.vocab_size, H)
        self.layers = []
        for _ in range(cfg.num_layers):
            # locality bias: b_k per kv head, b_q = b_k times a per-query-head factor, sized so
            # that scale * b_q . b_k = locality * factor logits at distance 0 (RoPE turns it into
            # a function of distance that decays as the high frequencies lose phase)
            bk = rng.standard_normal((Hkv, D))
            strength = cfg.locality * np.arange(Hkv) / max(1, Hkv - 1)  # kv head 0 global, the last most local
            bk *= np.sqrt(strength)[:, None] * D ** 0.25 / np.linalg.norm(bk, axis=1, keepdims=True)
            factor = rng.uniform(0.5, 1.0, Hq)
            bq = bk[np.arange(Hq) // G] * factor[:, None]
            self.layers.append(dict(
                attn_norm=gain(H), wq=w(H, Hq * D, std=H ** -0.5), wk=w(H, Hkv * D, std=H ** -0.5),
                wv=w(H, Hkv * D, std=H ** -0.5), wo=w(Hq * D, H, std=2.0 * (Hq * D) ** -0.5),
                bq=xp.asarray(bq.astype(self.dt)), bk=xp.asarray(bk.astype(self.dt)),
                mlp_norm=gain(H), w_gate=w(H, F, std=H ** -0.5), w_up=w(H, F, std=H ** -0.5),
                w_down=w(F, H, std=F ** -0.5)))
        self.final_norm = gain(H)
        self.lm_head = self.embed_table.T if cfg.tied_embeddings else w(H, cfg.vocab_size, std=H ** -0.5)
        half = D // 2
        self._inv_freq = xp.asarray((cfg.rope_base ** (-np.arange(half) / half)).astype(np.float64))

    # ---------------------------------------------------------------- pieces
    def _rmsnorm(self, x, g):
        return x / self.xp.sqrt((x * x).mean(axis=-1, keepdims=True) + self.config.eps) * g

    def _rope(self, x, pos):
        """Rotate pairs (i, i + D/2) of x [n, H, D] by pos [n] * inv_freq (computed in float64)."""
        xp, half = self.xp, x.shape[-1] // 2
        ang = xp.asarray(pos, dtype=np.float64)[:, None] * self._inv_freq[None, :]  # [n, D/2]
        cos, sin = xp.cos(ang)[:, None, :].astype(self.dt), xp.sin(ang)[:, None, :].astype(self.dt)
        x1, x2 = x[..., :half], x[..., half:]
        return xp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def embed(self, tokens):
        """tokens: ints [n] -> x [n, hidden] compute dtype."""
        return self.embed_table[self.xp.asarray(np.asarray(tokens, np.int64))]

    def qkv(self, layer: int, x, pos):
        """x [n, hidden], pos int [n] -> q [n, Hq, D], k [n, Hkv, D], v [n, Hkv, D] in storage dtype."""
        cfg, p = self.config, self.layers[layer]
        n = x.shape[0]
        h = self._rmsnorm(x, p["attn_norm"])
        q = (h @ p["wq"]).reshape(n, cfg.num_q_heads, cfg.head_dim) + p["bq"]
        k = (h @ p["wk"]).reshape(n, cfg.num_kv_heads, cfg.head_dim) + p["bk"]
        v = (h @ p["wv"]).reshape(n, cfg.num_kv_heads, cfg.head_dim)
        q, k = self._rope(q, pos), self._rope(k, pos)
        return tuple(to_storage(self.xp.ascontiguousarray(a.astype(np.float32)), cfg.dtype) for a in (q, k, v))

    def attention_values(self, o):
        """Attention output as the model sees it: rounded to the storage dtype, in compute dtype.

        A backend may return float32 (the NumPy reference) or the storage dtype (the CUDA kernels);
        both become the same numbers here.
        """
        dtype = self.config.dtype
        if np.dtype(o.dtype) == np.dtype(storage_numpy_dtype(dtype)):
            return to_float32(o, dtype).astype(self.dt)
        return round_to_storage(o.astype(np.float32), dtype).astype(self.dt)

    def finish_layer(self, layer: int, x, o):
        """x [n, hidden] plus the output projection of o [n, Hq, D], then the MLP block."""
        p, n = self.layers[layer], x.shape[0]
        x = x + self.attention_values(o).reshape(n, -1) @ p["wo"]
        h = self._rmsnorm(x, p["mlp_norm"])
        gate = h @ p["w_gate"]
        return x + (gate / (1 + self.xp.exp(-gate)) * (h @ p["w_up"])) @ p["w_down"]

    def logits(self, x):
        """x [n, hidden] -> logits [n, vocab] compute dtype."""
        return self._rmsnorm(x, self.final_norm) @ self.lm_head

    def greedy(self, x) -> list[int]:
        """Next token of every row of x [n, hidden] (argmax of the logits)."""
        return [int(t) for t in array_module_get(self.xp.argmax(self.logits(x), axis=-1))]


def array_module_get(x) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


# ============================================================================ the check: dense, no cache
def causal_attention(xp, q, k, v):
    """Full causal attention in float64: q [n, Hq, D], k, v [n, Hkv, D] (storage dtype values
    as float) -> o float32 [n, Hq, D]. Query t sees keys 0..t; GQA head h reads kv head h // G."""
    n, Hq, D = q.shape
    G = Hq // k.shape[1]
    q, k, v = (a.astype(np.float64).transpose(1, 0, 2) for a in (q, k, v))  # [H, n, D]
    k, v = xp.repeat(k, G, axis=0), xp.repeat(v, G, axis=0)  # [Hq, n, D]
    s = (q @ k.transpose(0, 2, 1)) / math.sqrt(D)  # [Hq, n, n]
    s = xp.where(xp.tril(xp.ones((n, n), bool))[None], s, -xp.inf)
    p = xp.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).transpose(1, 0, 2).astype(np.float32)  # [n, Hq, D]


def dense_generate(model: TinyLM, prompt, max_new_tokens: int) -> list[int]:
    """Greedy generation with no KV cache: every step recomputes the whole sequence densely."""
    xp, dtype, tokens, out = model.xp, model.config.dtype, list(prompt), []
    for _ in range(max_new_tokens):
        x, pos = model.embed(tokens), np.arange(len(tokens))
        for layer in range(model.config.num_layers):
            q, k, v = (to_float32(a, dtype) for a in model.qkv(layer, x, pos))
            x = model.finish_layer(layer, x, causal_attention(xp, q, k, v))
        out.append(model.greedy(x[-1:])[0])
        tokens.append(out[-1])
    return out


# ============================================================================ attention backends
@dataclass(frozen=True)
class PrefillOptions:
    """CompactAttention options (docs/design.md, "CompactAttention chunked prefill"): alpha 0 selects every block (dense)."""

    alpha: float = 0.06
    sink: int = 2
    window: int = 4
    q_tile: int | None = None
    group_size: int | None = None

    def kwargs(self) -> dict:
        return dict(alpha=self.alpha, sink=self.sink, window=self.window, q_tile=self.q_tile,
                    group_size=self.group_size)


@dataclass
class AttentionStats:
    """What the attention calls did: plans built, decode calls, prefill density and recall.

    Density is averaged over prefill calls with a past, weighted by their (query head, query
    block, past block) triples. Recall is ``exp(lse_sparse - lse_dense)`` per (row, head),
    against the float64 dense oracle, per layer, over chunks with a past.
    """

    num_layers: int
    check_s: float = 0.0  # seconds spent measuring recall (not serving)
    plans_built: int = 0
    decode_calls: int = 0
    prefill_calls: int = 0
    density_sum: dict = field(default_factory=dict)
    density_weight: float = 0.0
    recall_sum: list = field(default_factory=list)
    recall_count: list = field(default_factory=list)
    recall_min: list = field(default_factory=list)
    device_kept: object = None  # GPU backend: uint64 [3] kept triples per stage, summed on the device
    device_triples: int = 0

    def __post_init__(self):
        self.recall_sum = [0.0] * self.num_layers
        self.recall_count = [0] * self.num_layers
        self.recall_min = [1.0] * self.num_layers

    def record_prefill(self, layer: int, past_len: int, q_shape, chunk_size: int, density: dict | None,
                       recall: np.ndarray | None) -> None:
        self.prefill_calls += 1
        if past_len == 0:
            return
        n, Hq = q_shape[0], q_shape[1]
        weight = Hq * -(-n // chunk_size) * (past_len // chunk_size)
        if density:
            for k, d in density.items():
                self.density_sum[k] = self.density_sum.get(k, 0.0) + weight * float(d)
            self.density_weight += weight
        if recall is not None:
            r = np.asarray(recall, np.float64).reshape(-1)
            self.recall_sum[layer] += float(r.sum())
            self.recall_count[layer] += r.size
            self.recall_min[layer] = min(self.recall_min[layer], float(r.min()))

    def add_device_density(self, kept, triples: int) -> None:
        """Add a GPU prefill's kept-triple counters (device uint64 [3]) without synchronising."""
        self.device_kept = kept.copy() if self.device_kept is None else self.device_kept + kept
        self.device_triples += int(triples)

    @property
    def density(self) -> dict:
        """Stage -> weighted mean density (empty when no prefill call had a past)."""
        if self.device_kept is not None:  # one small copy from the device
            kept = self.device_kept.get().astype(np.float64) / self.device_triples
            return dict(zip(("select", "q_union", "group_union"), map(float, kept)))
        return {k: v / self.density_weight for k, v in self.density_sum.items()} if self.density_weight else {}

    @property
    def recall(self) -> list:
        """Per layer: (mean, min) attention-mass recall, or None when nothing was measured."""
        return [(s / c, m) if c else None for s, c, m in zip(self.recall_sum, self.recall_count, self.recall_min)]


class ReferenceBackend:
    """Attention through the NumPy reference (``cpattn.reference``).

    prefill: ``compact_prefill`` for the chunk (selection, block tables, sparse attention), its
    past pages summarised on first use by ``BlockMeans``. decode: ``decode`` over a
    ``DecodePlan`` built once and reused for every layer, and for later steps while the tree
    and the batch stay the same.
    """

    name = "numpy"

    def __init__(self, cache: ChunkCache, options: PrefillOptions = PrefillOptions(),
                 measure_recall: bool = True, piece_chunks: int | None = None):
        self.cache, self.options, self.measure_recall = cache, options, measure_recall
        self.piece_chunks = piece_chunks
        self.means = BlockMeans(cache)
        self.stats = AttentionStats(cache.num_layers)
        self._plan = None

    def prefill(self, seq: int, q, layer: int):
        """q [n, Hq, D] storage dtype (the sequence's last n tokens, K/V written) -> o float32 [n, Hq, D]."""
        res = compact_prefill(self.cache, self.means, seq, q, layer, **self.options.kwargs())
        recall, t0 = None, time.perf_counter()
        if self.measure_recall and res.tables.past_len:
            recall = mass_recall(res.lse, dense_prefill(self.cache, seq, q, layer)[1])
        self.stats.check_s += time.perf_counter() - t0
        self.stats.record_prefill(layer, res.tables.past_len, q.shape, self.cache.chunk_size, res.density, recall)
        return res.o

    def decode(self, seqs, q, layer: int):
        """q [B, Hq, D] storage dtype, one token per sequence (K/V appended) -> o float32 [B, Hq, D]."""
        self.stats.decode_calls += 1
        return reference_decode(self.cache, self._plan_for(seqs), q, layer)

    def _plan_for(self, seqs):
        batch = tuple(int(s) for s in seqs)
        if self._plan is None or self._plan.batch != batch or self._plan.version != self.cache.version:
            self._plan = build_decode_plan(self.cache, batch, piece_chunks=self.piece_chunks)
            self.stats.plans_built += 1
        return self._plan


class GpuBackend:
    """THE GPU SLOT: the same two methods on the CUDA kernels, for a ``GpuChunkCache``.

    prefill: ``cpattn.compact_attention.compact_prefill`` with ``GpuBlockMeans`` (five launches, no sync).
    decode: ``cpattn.chunk_attention.ChunkAttentionDecode``, ``plan`` when the tree or the batch changed,
    then ``run`` per layer (two launches, no sync). Both return storage-dtype CuPy arrays.
    Densities are summed on the device and read once, by ``stats``; recall (``measure_recall``)
    runs the float64 oracle on host copies and synchronises, so leave it off for timing.
    """

    name = "cupy"

    def __init__(self, cache, options: PrefillOptions = PrefillOptions(), measure_recall: bool = True):
        from .. import prefill as gpu_prefill
        from ..chunk_attention import ChunkAttentionDecode

        self.cache, self.options, self.measure_recall = cache, options, measure_recall
        self.gpu_prefill = gpu_prefill
        self.means = gpu_prefill.GpuBlockMeans(cache)
        self.dec = ChunkAttentionDecode(cache)
        self._planned = None
        self.stats = AttentionStats(cache.num_layers)

    def prefill(self, seq: int, q, layer: int):
        """q [n, Hq, D] storage dtype on the GPU -> o [n, Hq, D] storage dtype on the GPU."""
        import cupy

        res = self.gpu_prefill.compact_prefill(self.cache, self.means, seq, q, layer, **self.options.kwargs())
        if res.num_past_blocks:  # kept-triple counters stay on the device until the report
            self.stats.add_device_density(res.stats, res.denominator)
        recall, t0 = None, time.perf_counter()
        if self.measure_recall and res.num_past_blocks:
            dense_lse = dense_prefill(self.cache, seq, cupy.asnumpy(q), layer)[1]
            recall = mass_recall(cupy.asnumpy(res.lse), dense_lse)
        self.stats.check_s += time.perf_counter() - t0
        self.stats.record_prefill(layer, res.num_past_blocks * self.cache.chunk_size, q.shape,
                                  self.cache.chunk_size, None, recall)
        return res.o

    def decode(self, seqs, q, layer: int):
        """q [B, Hq, D] storage dtype on the GPU -> o [B, Hq, D] storage dtype on the GPU."""
        batch = tuple(int(s) for s in seqs)
        if self._planned != (batch, self.cache.version):
            self.dec.plan(batch, q.shape[1])
            self._planned = (batch, self.cache.version)
            self.stats.plans_built += 1
        self.stats.decode_calls += 1
        return self.dec.run(q, layer)


def resolve_backend(name: str) -> str:
    """'auto' -> 'cupy' when ``cpattn.gpu_available()``, else 'numpy'."""
    from .. import gpu_available

    if name not in ("auto", "numpy", "cupy"):
        raise ValueError(f"backend: expected 'auto', 'numpy' or 'cupy', got {name!r}")
    if name == "auto":
        return "cupy" if gpu_available() else "numpy"
    if name == "cupy" and not gpu_available():
        raise RuntimeError("backend: 'cupy' asked for, but CuPy sees no CUDA GPU on this machine")
    return name


# ============================================================================ the server
@dataclass
class Request:
    """One request: its prompt, how many tokens to generate, and what happened to it."""

    rid: int
    prompt: list
    max_new_tokens: int
    arrival: int = 0  # the server step at which it arrives
    seq: int | None = None  # cache sequence id while live
    output: list = field(default_factory=list)
    reused: int = 0  # prompt tokens whose K/V came from the cache (prefill skipped)
    computed: int = 0  # prompt tokens prefilled
    state: str = "waiting"  # waiting -> running -> finished


@dataclass
class ServingReport:
    """Numbers of one ``Server.run`` (times exclude the dense check)."""

    backend: str
    requests: int
    prompt_tokens: int
    prefill_reused: int
    prefill_computed: int
    prefill_chunks: int
    prefill_s: float
    decode_steps: int
    decode_tokens: int
    decode_s: float
    plans_built: int
    decode_calls: int
    peak: dict  # cache.stats() when the most tokens were live
    bytes_per_token: int  # K and V of one token, all layers
    evictions: int
    density: dict
    recall: list
    agreement: dict | None = None  # filled by check_against_dense

    def lines(self) -> list[str]:
        pk, mb = self.peak, self.bytes_per_token / 2 ** 20
        saved = 1 - pk["tokens_stored"] / pk["tokens_flat"] if pk.get("tokens_flat") else 0.0
        out = [
            f"  requests: {self.requests}, {self.prompt_tokens} prompt tokens: {self.prefill_reused} reused "
            f"from the cache ({100 * self.prefill_reused / max(1, self.prompt_tokens):.1f}% of prefill "
            f"skipped), {self.prefill_computed} prefilled in {self.prefill_chunks} chunks",
            f"  memory at peak ({pk.get('sequences', 0)} live): {pk.get('tokens_stored', 0)} tokens stored vs "
            f"{pk.get('tokens_flat', 0)} in a flat cache ({100 * saved:.1f}% saved, "
            f"{pk.get('tokens_stored', 0) * mb:.2f} vs {pk.get('tokens_flat', 0) * mb:.2f} MiB of K/V); "
            f"{self.evictions} chunks evicted (LRU)",
        ]
        if self.density:
            out.append("  prefill density (share of past blocks read): " + ", ".join(
                f"{k} {v:.3f}" for k, v in self.density.items()))
        else:
            out.append("  prefill density: no chunk had a past (nothing to select)")
        rec = [f"layer {i} mean {r[0]:.4f} min {r[1]:.4f}" for i, r in enumerate(self.recall) if r]
        if rec:
            out.append("  prefill recall (attention mass read, vs dense): " + "; ".join(rec))
        steps = max(1, self.decode_steps)
        out.append(
            f"  speed ({self.backend}): prefill {self.prefill_computed / max(self.prefill_s, 1e-9):.0f} tok/s, "
            f"decode {self.decode_tokens / max(self.decode_s, 1e-9):.0f} tok/s "
            f"({1e3 * self.decode_s / steps:.1f} ms/step, {self.decode_tokens / steps:.1f} requests/step); "
            f"{self.plans_built} decode plans for {self.decode_steps} steps x {len(self.recall)} layers")
        if self.agreement:
            a = self.agreement
            out.append(f"  vs dense model (no cache, no sparsity): {a['tokens_equal']}/{a['tokens']} tokens "
                       f"equal, {a['requests_equal']}/{a['requests']} requests identical"
                       + (f" (first {a['requests']} of {self.requests} checked)" if a["requests"] < self.requests else ""))
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


class Server:
    """Continuous batching over one chunk-tree cache (see the module docstring).

    Args:
        model: a ``TinyLM``; its array module decides where the pool lives.
        num_chunks: pool capacity in chunks (the pool never grows; LRU eviction makes room).
        chunk_size: tokens per chunk = CompactAttention block size.
        prefill_chunk: tokens per prefill chunk, a multiple of ``chunk_size``.
        backend: "numpy", "cupy" or "auto"; or a pluggable backend object that brings its own
            cache: ``backend.cache`` (the chunk-tree cache's methods that the server calls:
            ``add_sequence``, ``reserve``, ``reserve_batch``, ``write_kv``, ``commit``,
            ``release``, ``seq_len``, ``seq_chunks``, ``stats``, ``num_free``, ``num_cached``,
            ``num_referenced``, ``num_chunks``, ``cached_nodes``), ``prefill`` and ``decode`` (the two
            methods above), a ``stats`` attribute (``AttentionStats``), and optionally ``name``,
            ``label`` (the report's backend name) and ``sync()`` (waits for the device before a
            timer stops). ``num_chunks`` and ``options`` are then unused
            (``cpattn.bench.serving`` plugs in a torch SDPA backend this way).
        options: CompactAttention options; ``measure_recall`` compares every prefill chunk with
            the float64 dense oracle (slower; off for timing).
        trace: keep a line per event (admission, decode step, release, eviction) in ``log``.
    """

    def __init__(self, model: TinyLM, num_chunks: int, chunk_size: int = 16, prefill_chunk: int = 64,
                 backend: str = "numpy", options: PrefillOptions = PrefillOptions(),
                 measure_recall: bool = True, max_batch: int = 256, trace: bool = False):
        if prefill_chunk < chunk_size or prefill_chunk % chunk_size:
            raise ValueError(f"prefill_chunk: expected a positive multiple of chunk_size {chunk_size}, "
                             f"got {prefill_chunk}")
        cfg = model.config
        self.model, self.chunk_size, self.prefill_chunk, self.max_batch = model, chunk_size, prefill_chunk, max_batch
        self.backend_name = resolve_backend(backend) if isinstance(backend, str) else \
            str(getattr(backend, "name", type(backend).__name__))
        if not isinstance(backend, str):  # a pluggable backend with its own cache
            self.cache, self.backend = backend.cache, backend
        elif self.backend_name == "cupy":
            from ..chunk_cache import GpuChunkCache

            self.cache = GpuChunkCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_chunks,
                                       chunk_size=chunk_size, dtype=cfg.dtype)
            self.backend = GpuBackend(self.cache, options, measure_recall)
        else:
            self.cache = ChunkCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_chunks,
                                    chunk_size=chunk_size, dtype=cfg.dtype)
            self.backend = ReferenceBackend(self.cache, options, measure_recall)
        self.requests: list[Request] = []
        self.step = 0
        self.log: list[str] | None = [] if trace else None

    def _note(self, text: str) -> None:
        if self.log is not None:
            self.log.append(f"step {self.step:>2}  {text}")

    def submit(self, prompt, max_new_tokens: int, arrival: int | None = None) -> Request:
        if len(prompt) < 1 or max_new_tokens < 1:
            raise ValueError(f"prompt, max_new_tokens: expected at least one token each, got "
                             f"{len(prompt)} and {max_new_tokens}")
        r = Request(len(self.requests), [int(t) for t in prompt], int(max_new_tokens),
                    self.step if arrival is None else int(arrival))
        self.requests.append(r)
        return r

    # ---------------------------------------------------------------- admission
    def _chunks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.chunk_size)

    def _owed(self, r: Request) -> int:
        """Chunks a live request still needs to reach its last token (its path is full chunks
        and a partial tail, so the count is exact even when the path is shared)."""
        return self._chunks_for(len(r.prompt) + r.max_new_tokens - 1) - len(self.cache.seq_chunks(r.seq))

    def _admit(self, r: Request, running: list[Request]) -> bool:
        """Match the prompt against the cache and keep the request if the pool has room for
        the rest of its life after what the running requests may still need. Cached chunks
        count as room: they are evicted (LRU) when the free list runs out."""
        cache = self.cache
        r.seq = cache.add_sequence(r.prompt, max_match=len(r.prompt) - 1)  # takes the cached prefix only
        have = cache.num_free + cache.num_cached - sum(self._owed(x) for x in running)
        if self._owed(r) <= have:
            return True
        if r.state == "waiting":
            self._note(f"r{r.rid} waits: needs {self._owed(r)} more chunks, {have} free or evictable")
            r.state = "queued"
        cache.release(r.seq)  # not now: its matched chunks go back to the prefix cache
        r.seq = None
        return False

    def _lru(self) -> list:
        return list(self.cache.cached_nodes())  # complete chunks no sequence uses, least recently used first

    def _evicted_since(self, before: list) -> int:
        return sum(1 for n in before if n.ref == 0 and n not in self.cache.cached_nodes())

    # ---------------------------------------------------------------- prefill
    def _prefill(self, r: Request) -> None:
        """Match the prompt, prefill the rest chunk by chunk; the last logits give token 1."""
        model, cache, backend = self.model, self.cache, self.backend
        start = cache.seq_len(r.seq)  # matched by _admit: a multiple of chunk_size, < len(prompt)
        r.reused, r.computed = start, len(r.prompt) - start
        rest = r.prompt[start:]
        sizes = split_chunks(len(rest), self.prefill_chunk, self.chunk_size)
        self._note(f"r{r.rid} admitted: prompt {len(r.prompt)} tokens = {start} reused from the cache "
                   f"+ {len(rest)} prefilled in chunks {sizes}")
        for n in sizes:
            toks = rest[:n]
            rest = rest[n:]
            pos = np.arange(start, start + n)
            slots = cache.reserve(r.seq, toks)
            x = model.embed(toks)
            for layer in range(model.config.num_layers):
                q, k, v = model.qkv(layer, x, pos)
                cache.write_kv(layer, slots, k, v)
                x = model.finish_layer(layer, x, backend.prefill(r.seq, q, layer))
            cache.commit(r.seq)  # the chunk's full pages are now matchable by other prompts
            start += n
            self._n_chunks += 1
        r.output.append(model.greedy(x[-1:])[0])
        r.state = "running"

    # ---------------------------------------------------------------- decode
    def _decode_step(self, running: list[Request]) -> None:
        """One token for every running request: reserve, then per layer write K/V and attend."""
        model, cache, backend = self.model, self.cache, self.backend
        seqs = [r.seq for r in running]
        pos = np.array([cache.seq_len(s) for s in seqs])
        slots = cache.reserve_batch(seqs, [r.output[-1] for r in running])
        x = model.embed([r.output[-1] for r in running])
        for layer in range(model.config.num_layers):
            q, k, v = model.qkv(layer, x, pos)
            cache.write_kv(layer, slots, k, v)
            x = model.finish_layer(layer, x, backend.decode(seqs, q, layer))
        for s in seqs:
            cache.commit(s)
        for r, t in zip(running, model.greedy(x)):
            r.output.append(t)

    def _sync(self):
        sync = getattr(self.backend, "sync", None)
        if sync is not None:  # a pluggable backend says how to wait for its device
            sync()
        elif self.backend_name == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    # ---------------------------------------------------------------- the loop
    def run(self) -> ServingReport:
        """Serve every submitted request that is not finished; returns this run's numbers."""
        cfg, cache = self.model.config, self.cache
        todo = [r for r in self.requests if r.state != "finished"]
        waiting = sorted((r for r in todo if r.state in ("waiting", "queued")), key=lambda r: (r.arrival, r.rid))
        running = [r for r in todo if r.state == "running"]
        self.backend.stats = AttentionStats(cfg.num_layers)
        self._n_chunks, evictions, t_pre, t_dec, steps, dec_tokens = 0, 0, 0.0, 0.0, 0, 0
        peak = cache.stats()

        def finish(r):
            cache.release(r.seq)
            r.state, r.seq = "finished", None
            self._note(f"r{r.rid} finished ({len(r.output)} tokens) and released; the pool holds "
                       f"{cache.num_cached} cached, {cache.num_referenced} referenced, {cache.num_free} free chunks")

        def evicted(before):
            n = self._evicted_since(before)
            if n:
                self._note(f"evicted {n} cached chunk(s), least recently used first")
            return n

        while waiting or running:
            # admit arrived requests in order while they fit (FIFO: no overtaking)
            while waiting and waiting[0].arrival <= self.step and len(running) < self.max_batch \
                    and self._admit(waiting[0], running):
                r = waiting.pop(0)
                before, t0, checked = self._lru(), time.perf_counter(), self.backend.stats.check_s
                self._prefill(r)
                self._sync()
                t_pre += time.perf_counter() - t0 - (self.backend.stats.check_s - checked)
                evictions += evicted(before)
                if len(r.output) >= r.max_new_tokens:
                    finish(r)
                else:
                    running.append(r)
            if running:
                before, t0, plans = self._lru(), time.perf_counter(), self.backend.stats.plans_built
                self._decode_step(running)
                self._sync()
                t_dec += time.perf_counter() - t0
                self._note(f"decode {' '.join(f'r{r.rid}' for r in running)} "
                           f"({'new plan' if self.backend.stats.plans_built > plans else 'plan reused'})")
                evictions += evicted(before)
                steps, dec_tokens = steps + 1, dec_tokens + len(running)
                st = cache.stats()
                if st["tokens_flat"] > peak["tokens_flat"]:
                    peak = st
                for r in [r for r in running if len(r.output) >= r.max_new_tokens]:
                    running.remove(r)
                    finish(r)
            elif waiting and waiting[0].arrival <= self.step:
                r = waiting[0]
                raise CacheFullError(f"pool: request {r.rid} needs "
                                     f"{self._chunks_for(len(r.prompt) + r.max_new_tokens - 1)} chunks, "
                                     f"the pool has {cache.num_chunks}; make the pool larger")
            self.step += 1

        st = self.backend.stats
        return ServingReport(
            backend=getattr(self.backend, "label", None)
            or ("CUDA kernels" if self.backend_name == "cupy" else "NumPy reference"),
            requests=len(todo), prompt_tokens=sum(len(r.prompt) for r in todo),
            prefill_reused=sum(r.reused for r in todo), prefill_computed=sum(r.computed for r in todo),
            prefill_chunks=self._n_chunks, prefill_s=t_pre, decode_steps=steps, decode_tokens=dec_tokens,
            decode_s=t_dec, plans_built=st.plans_built, decode_calls=st.decode_calls, peak=peak,
            bytes_per_token=2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2, evictions=evictions,
            density=st.density, recall=st.recall)


def check_against_dense(model: TinyLM, requests, report: ServingReport | None = None) -> dict:
    """Generate every request again with ``dense_generate``; count equal tokens (position by
    position) and identical requests. Stored in ``report.agreement`` when a report is given."""
    tokens = equal = same = 0
    for r in requests:
        ref = dense_generate(model, r.prompt, r.max_new_tokens)
        tokens += len(ref)
        equal += sum(a == b for a, b in zip(ref, r.output))
        same += ref == r.output
    out = dict(tokens=tokens, tokens_equal=equal, requests=len(requests), requests_equal=same)
    if report is not None:
        report.agreement = out
    return out


# ============================================================================ a workload
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
        private += -(-(len(prompt) + m - 1) // c) - full
    return len(shared) + private


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
    scratch = Server(model, 4 * (-(-(2 * prefill_chunk + 8) // chunk_size) + 2), chunk_size, prefill_chunk, name,
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
    ap.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto")
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
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--q-heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    ap.add_argument("--check", type=int, default=None, metavar="N",
                    help="compare the first N requests of each wave with the dense model (default all, 0 none)")
    ap.add_argument("--no-recall", action="store_true",
                    help="skip the float64 recall check of every prefill chunk (it runs on the host)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    cfg = ModelConfig(vocab_size=a.vocab, num_layers=a.layers, hidden=a.hidden, num_q_heads=a.q_heads,
                      num_kv_heads=a.kv_heads, head_dim=a.head_dim, mlp_hidden=2 * a.hidden, dtype=a.dtype)
    run_demo(a.backend, a.requests, a.waves, a.systems, a.system_len, tuple(a.own_len), a.new_tokens, a.chunk_size,
             a.prefill_chunk, a.pool_chunks, a.alpha, a.check, a.seed, cfg, not a.no_recall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
