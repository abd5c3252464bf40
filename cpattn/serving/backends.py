"""Attention backends of the server, and the cache protocol they and the server rely on.

A backend owns a cache and answers two calls per layer::

    backend.prefill(seq, q, layer)   q [n, Hq, D] storage dtype -> o [n, Hq, D]  (one chunk of one sequence)
    backend.decode(seqs, q, layer)   q [B, Hq, D] storage dtype -> o [B, Hq, D]  (one token per sequence)

The K/V of those tokens is written before the call. ``ChunkTreeBackend`` runs on a chunk-tree
cache, the NumPy reference on a ``ChunkCache`` and the CUDA kernels on a ``GpuChunkCache``. Any
object with the members of ``AttentionBackend`` plugs into ``Server`` (``cpattn.bench`` plugs
in torch SDPA over a flat cache this way).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..arrays import to_host
from ..reference.checks import cdiv
from ..reference.compact_attention import mass_recall

BACKENDS = ("auto", "numpy", "cupy")


# ============================================================================ protocols
@runtime_checkable
class ServingCache(Protocol):
    """What ``Server`` calls on a KV cache (``ChunkCache``, ``GpuChunkCache`` and the benchmark's
    flat cache implement it). Token lists are Python ints; ``slots`` is whatever ``reserve``
    returned; k, v are [n, num_kv_heads, head_dim] storage dtype.

    Chunk accounting (``num_free + num_cached + num_referenced == num_chunks``) is what admission
    counts on; ``cached_nodes()`` lists the complete chunks no sequence uses, least recently used
    first (their ``ref`` is 0): they are evicted when the free list runs out. ``stats()`` returns
    at least ``sequences``, ``tokens_stored`` (tokens in the pool) and ``tokens_flat`` (tokens a
    flat per-sequence cache would hold): the report's memory line.
    """

    num_layers: int
    chunk_size: int
    num_chunks: int

    def add_sequence(self, tokens=(), *, max_match: int | None = None) -> int: ...
    def reserve(self, seq: int, tokens): ...
    def reserve_batch(self, seqs, tokens): ...
    def write_kv(self, layer: int, slots, k, v) -> None: ...
    def commit(self, seq: int) -> None: ...
    def release(self, seq: int) -> None: ...
    def seq_len(self, seq: int) -> int: ...
    def seq_chunks(self, seq: int) -> list: ...
    def stats(self) -> dict: ...
    def cached_nodes(self): ...

    @property
    def num_free(self) -> int: ...
    @property
    def num_cached(self) -> int: ...
    @property
    def num_referenced(self) -> int: ...


@runtime_checkable
class AttentionBackend(Protocol):
    """What ``Server`` calls on a backend: its cache, the two attention calls, ``sync`` (wait for
    the device before a timer stops) and ``stats`` (an ``AttentionStats``; the server puts a fresh
    one in at the start of every run). ``label`` names it in reports."""

    cache: ServingCache
    stats: "AttentionStats"
    label: str

    def prefill(self, seq: int, q, layer: int): ...
    def decode(self, seqs, q, layer: int): ...
    def sync(self) -> None: ...


# ============================================================================ options and stats
@dataclass(frozen=True)
class PrefillOptions:
    """CompactAttention options (docs/design.md, *CompactAttention chunked prefill*): alpha 0
    selects every block (dense)."""

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
        weight = Hq * cdiv(n, chunk_size) * (past_len // chunk_size)
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
            return dict(zip(DENSITY_STAGES, map(float, kept)))
        return {k: v / self.density_weight for k, v in self.density_sum.items()} if self.density_weight else {}

    @property
    def recall(self) -> list:
        """Per layer: (mean, min) attention-mass recall, or None when nothing was measured."""
        return [(s / c, m) if c else None for s, c, m in zip(self.recall_sum, self.recall_count, self.recall_min)]


# ============================================================================ the backend
DENSITY_STAGES = ("select", "q_union", "group_union")  # CompactPrefill.density() keys the stats average


class ChunkTreeBackend:
    """Attention on a chunk-tree cache, the backend chosen by the cache: a ``ChunkCache`` runs the
    NumPy reference, a ``GpuChunkCache`` the CUDA kernels, through the same calls.

    prefill: ``compact_prefill`` for the chunk (selection, block tables, sparse attention over
    the pool pages), its past pages summarised on first use by ``BlockMeans``. decode:
    ``ChunkAttentionDecode``, ``plan`` when the tree or the batch changed (one plan serves every
    layer and later steps while the tree and the batch stay), then ``run`` per layer. Outputs
    are in the storage dtype, on the cache's device; on the GPU nothing synchronises.

    ``measure_recall`` compares every prefill chunk with the float64 oracle on host copies
    (slow, and it synchronises: leave it off for timing). On the GPU the kept-block counters of
    every prefill (``CompactPrefill.stats``) are summed on the device and read once, by
    ``stats.density``, since ``CompactPrefill.density()`` would synchronise per call.
    """

    def __init__(self, cache, options: PrefillOptions = PrefillOptions(), measure_recall: bool = True,
                 piece_chunks="auto"):
        from ..chunk_attention import ChunkAttentionDecode
        from ..compact_attention import BlockMeans

        self.cache, self.options, self.measure_recall = cache, options, measure_recall
        self.name = cache.backend
        self.label = "CUDA kernels" if self.name == "cupy" else "NumPy reference"
        self.means = BlockMeans(cache)
        self.decoder = ChunkAttentionDecode(cache, piece_chunks=piece_chunks)
        self.stats = AttentionStats(cache.num_layers)
        self._planned = None

    def sync(self) -> None:
        if self.name == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    def prefill(self, seq: int, q, layer: int):
        """q [n, Hq, D] storage dtype (the sequence's last n tokens, K/V written) -> o [n, Hq, D]."""
        from ..compact_attention import compact_prefill
        from ..reference.compact_attention import oracle_prefill

        past = self.cache.seq_len(seq) - q.shape[0]
        res = compact_prefill(self.cache, self.means, seq, q, layer, **self.options.kwargs())
        density = None
        if past and self.name == "cupy":
            self.stats.add_device_density(res.stats, res.denominator)
        elif past:
            density = {k: v for k, v in res.density().items() if k in DENSITY_STAGES}
        recall, t0 = None, time.perf_counter()
        if self.measure_recall and past:
            recall = mass_recall(to_host(res.lse), oracle_prefill(self.cache, seq, to_host(q), layer)[1])
        self.stats.check_s += time.perf_counter() - t0
        self.stats.record_prefill(layer, past, q.shape, self.cache.chunk_size, density, recall)
        return res.o

    def decode(self, seqs, q, layer: int):
        """q [B, Hq, D] storage dtype, one token per sequence (K/V appended) -> o [B, Hq, D]."""
        key = (tuple(int(s) for s in seqs), self.cache.version)
        if key != self._planned:
            self.decoder.plan(key[0], q.shape[1])
            self._planned = key
            self.stats.plans_built += 1
        self.stats.decode_calls += 1
        return self.decoder.run(q, layer)


def resolve_backend(name: str) -> str:
    """'auto' -> 'cupy' when ``cpattn.gpu_available()``, else 'numpy'."""
    from .. import gpu_available

    if name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto', 'numpy' or 'cupy', got {name!r}")
    if name == "auto":
        return "cupy" if gpu_available() else "numpy"
    if name == "cupy" and not gpu_available():
        import importlib.util

        from ..arrays import CUPY_EXTRA

        if importlib.util.find_spec("cupy") is None:
            raise RuntimeError(f"backend: expected CuPy for 'cupy', got no CuPy installed ({CUPY_EXTRA}, or "
                               f"cpattn[cuda12x] for CUDA 12)")
        raise RuntimeError("backend: expected a CUDA GPU for 'cupy', got none that CuPy can see on this machine")
    return name


def make_backend(name: str, model_config, num_chunks: int, chunk_size: int,
                 options: PrefillOptions = PrefillOptions(), measure_recall: bool = True):
    """A ``ChunkTreeBackend`` on a new cache sized for ``model_config`` (layers, kv heads, head
    dim, storage dtype): ``"numpy"`` a ``ChunkCache``, ``"cupy"`` a ``GpuChunkCache``, ``"auto"``
    the GPU when there is one."""
    cfg = model_config
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_chunks)
    if resolve_backend(name) == "cupy":
        from ..chunk_cache import GpuChunkCache as cache_class
    else:
        from ..reference.chunk_cache import ChunkCache as cache_class
    return ChunkTreeBackend(cache_class(*shape, chunk_size=chunk_size, dtype=cfg.dtype), options, measure_recall)
