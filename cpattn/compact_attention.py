"""CompactAttention chunked prefill on the GPU: selection, unions, CSR tables, paged kernel.

Mirrors ``cpattn.reference.compact_attention`` name for name::

    means = GpuBlockMeans(cache)                       # mean key per full page, on the device
    r = compact_prefill(cache, means, seq, q, layer)   # q [n, Hq, D]: the sequence's last n tokens
    r.o, r.lse                                         # [n, Hq, D] storage dtype, [n, Hq] float32
    r.density()                                        # per-stage densities (syncs to read them)

Five launches on the current stream, no host synchronisation: block_score (tensor cores),
block_union (threshold + sink/window + Q-block and group unions + compaction), tables_csr
(prefix sums -> indptr, indices), paged_prefill (flash attention over each table's pages,
read in place from the pool; bottom-right causal mask on the chunk's own pages). Index
buffers have fixed capacity (every table could keep every block), so nothing waits for counts.

Numerics: block scores use the mean keys rounded to the storage dtype on the tensor cores
(fp32 accumulate), so a block whose score lies within rounding of the threshold
``alpha * max`` may be kept by one backend and not the other; everything else is identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrays import as_cupy
from .kernels import get_kernels
from .reference.compact_attention import BlockMeans, _cdiv, _check_chunk, _check_options, _check_scale
from .reference.dtypes import storage_numpy_dtype

THREADS = 128


ROWS_PER_UNIT = 128  # kPrefillRows of raw_kernels/compact_attention.cu
SCORE_ROWS = 128  # kScoreRows: query rows per block_score block


def _prefill_smem(head_dim: int, chunk_size: int) -> int:
    """PrefillSmem<D, C>::bytes: the Q tile and two K/V stages of min(C, 64) keys."""
    return (ROWS_PER_UNIT + 4 * min(chunk_size, 64)) * (head_dim + 8) * 2


WG_THREADS, WG_KEYS = 256, 128  # kWgThreads and WgSmem::TK of raw_kernels/compact_attention_sm90.cu
KERNEL_CHOICES = ("auto", "wgmma", "mma")


def _prefill_smem_wg(head_dim: int, chunk_size: int) -> int:
    """WgSmem<D, C>::bytes: alignment slack, the swizzled Q tile, the K/V stages of 128 keys and
    two mbarriers per stage."""
    stages = 4 if head_dim == 64 else 3
    return 1024 + ROWS_PER_UNIT * head_dim * 2 + 2 * stages * WG_KEYS * head_dim * 2 + 2 * stages * 8


def _use_wgmma(kernel: str) -> bool:
    """'auto': the warpgroup-MMA kernel on compute capability 9.0 (Hopper), unless the
    environment sets CPATTN_PREFILL_KERNEL=mma; 'wgmma' / 'mma' force one."""
    import os

    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel: expected one of {KERNEL_CHOICES}, got {kernel!r}")
    if kernel == "auto":
        kernel = os.environ.get("CPATTN_PREFILL_KERNEL", "auto")
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"CPATTN_PREFILL_KERNEL: expected one of {KERNEL_CHOICES}, got {kernel!r}")
    if kernel == "mma":
        return False
    import cupy

    hopper = cupy.cuda.Device().compute_capability == "90"
    if kernel == "wgmma" and not hopper:
        raise ValueError(f"kernel: 'wgmma' needs compute capability 9.0, got {cupy.cuda.Device().compute_capability}")
    return kernel == "wgmma" or (kernel == "auto" and hopper)


class GpuBlockMeans(BlockMeans):
    """Mean key of every summarised pool page, on the device (the reference ``BlockMeans`` with
    its summaries computed by one ``block_mean`` launch per update).

    Arrays:
        kmean: float32 [num_layers, num_chunks, Hkv, D]
        kmean_lp: the same rounded to the storage dtype (what the score kernel reads)
    Pages are summarised once, when full and committed; keyed by pool id and owning tree node.
    """

    def __init__(self, cache):
        import cupy

        self.cache = cache
        self.chunk_size = cache.chunk_size
        shape = (cache.num_layers, cache.num_chunks, cache.num_kv_heads, cache.head_dim)
        self.kmean = cupy.zeros(shape, np.float32)
        self.kmean_lp = cupy.zeros(shape, storage_numpy_dtype(cache.dtype))
        self._owner: list = [None] * cache.num_chunks
        self._kern = get_kernels("compact_attention", cache.dtype, cache.head_dim, cache.chunk_size)

    def _summarise(self, cache, chunks: list) -> None:
        import cupy

        pages = cupy.asarray(np.array(chunks, np.int32))
        self._kern["block_mean"](
            (len(chunks), cache.num_kv_heads), (cache.head_dim,),
            (cache.k_pool, pages, np.int32(len(chunks)), np.int32(cache.num_layers), np.int32(cache.num_chunks),
             np.int32(cache.num_kv_heads), self.kmean, self.kmean_lp))


@dataclass
class GpuCompactPrefill:
    """Result of ``compact_prefill``. Device arrays; reading ``density()`` synchronises."""

    o: object  # cupy [n, Hq, D] storage dtype
    lse: object  # cupy float32 [n, Hq]
    indptr: object  # cupy int32 [R + 1], R = T * Hkv * S tables (reference BlockTables order)
    indices: object  # cupy int32 [capacity]; the first indptr[-1] entries are the page lists
    stats: object  # cupy uint64 [3]: kept triples at select / q_union / group_union
    num_past_blocks: int
    num_tables: int
    denominator: int  # Hq * Qb * Pb

    def density(self) -> dict:
        """Past-block density after each stage, as the reference counts it (syncs)."""
        if self.num_past_blocks == 0:
            return dict(select=1.0, q_union=1.0, group_union=1.0)
        s = self.stats.get().astype(np.float64) / self.denominator
        return dict(select=float(s[0]), q_union=float(s[1]), group_union=float(s[2]))

    def tables(self):
        """(indptr, indices) on the host (syncs): the CSR page lists, compare with the reference."""
        indptr = self.indptr.get()
        return indptr, self.indices[: int(indptr[-1])].get()


def compact_prefill(cache, means: GpuBlockMeans, seq: int, q, layer: int = 0, *, scale: float | None = None,
                    alpha: float = 0.06, sink: int = 2, window: int = 4, q_tile: int | None = None,
                    group_size: int | None = None, return_lse: bool = True, out=None,
                    events: list | None = None, kernel: str = "auto") -> GpuCompactPrefill:
    """CompactAttention for one chunk and layer of a ``GpuChunkCache`` (see the module docstring).

    The chunk is the sequence's last n = q.shape[0] tokens, their K/V written for this layer;
    q: [n, Hq, D] storage dtype (CuPy, __cuda_array_interface__ or DLPack). alpha 0 keeps every
    block (dense chunked prefill). Launches on the current stream; never synchronises.
    ``events``: a list that receives (stage name, CUDA event) after each stage, for profiling.
    ``kernel``: the attention kernel: 'auto' (warpgroup MMA on Hopper, else mma.sync), 'wgmma'
    or 'mma'; the environment variable CPATTN_PREFILL_KERNEL overrides 'auto'.
    """
    import cupy

    q = as_cupy(q, "q", cache.dtype)
    P, n, G = _check_chunk(cache, seq, q, layer)
    scale = _check_scale(scale, cache.head_dim)
    c, Hkv, D = cache.chunk_size, cache.num_kv_heads, cache.head_dim
    q_tile, s = _check_options(c, n, G, alpha, sink, window, q_tile, group_size)
    means._check_cache(cache)
    wg = _use_wgmma(kernel)
    Hq = q.shape[1]
    if out is not None:
        out = as_cupy(out, "out", cache.dtype, (n, Hq, D))
    k = means._kern

    def mark(name):
        if events is not None:
            ev = cupy.cuda.Event()
            ev.record()
            events.append((name, ev))

    mark("start")
    means.update(cache, seq, num_tokens=P)
    mark("means")

    Pb, Qb, Cb = P // c, _cdiv(n, c), _cdiv(n, c)
    tb = q_tile // c
    T, S = _cdiv(Qb, tb), G // s
    R = T * Hkv * S
    blocks = cupy.asarray(np.array(cache.seq_chunks(seq)[: Pb + Cb], np.int32))
    page0 = np.int64(layer * cache.num_chunks * Hkv)
    scale_log2 = np.float32(scale * 1.4426950408889634)

    # 2. scores
    s_raw = cupy.zeros((Hq, Qb, max(Pb, 1)), np.float32)
    if Pb and alpha > 0:  # alpha 0 keeps every block: all-zero scores pass a zero threshold
        k["block_score"]((_cdiv(n, SCORE_ROWS), Hq), (THREADS,),
                         (q, means.kmean_lp, page0, blocks, np.int32(Pb), np.int32(n), np.int32(Hq),
                          np.int32(Hkv), scale_log2, s_raw))
    mark("score")
    # 3-5. threshold, unions, compaction
    cap = Pb + Cb
    padded = cupy.empty(R * cap, np.int32)
    counts = cupy.empty(R, np.int32)
    stats = cupy.zeros(3, np.uint64)
    k["block_union"]((R,), (256,),
                     (s_raw, np.int32(Pb), np.int32(Qb), np.int32(tb), np.int32(T), np.int32(Hkv), np.int32(G),
                      np.int32(s), np.float32(alpha), np.int32(sink), np.int32(window), blocks, np.int32(Cb),
                      padded, np.int32(cap), counts, stats),
                     shared_mem=4 * s * tb)
    # 6. CSR
    indptr = cupy.empty(R + 1, np.int32)
    indices = cupy.empty(R * cap, np.int32)
    k["tables_csr"]((R,), (128,), (padded, np.int32(cap), counts, np.int32(R), indptr, indices))
    mark("tables")
    # 7. paged prefill: units (table, 128-row block) are known on the host from the shapes
    tile_tokens = np.minimum(q_tile, n - np.arange(T) * q_tile)  # [T]
    rows = np.repeat(tile_tokens * s, Hkv * S)  # [R]
    per = -(-rows // ROWS_PER_UNIT)
    table_of = np.repeat(np.arange(R), per)
    row0 = (np.arange(len(table_of)) - np.repeat(np.cumsum(per) - per, per)) * ROWS_PER_UNIT
    units = cupy.asarray(np.stack([table_of, row0], axis=1).astype(np.int32).ravel())
    o = out if out is not None else cupy.empty((n, Hq, D), q.dtype)
    lse = cupy.empty((n, Hq), np.float32) if return_lse else cupy.empty(1, np.float32)
    if wg:
        smem = _prefill_smem_wg(D, c)
        pk = get_kernels("compact_attention_sm90", cache.dtype, D, c)["paged_prefill_wg"]
    else:
        smem = _prefill_smem(D, c)
        pk = k["paged_prefill"]
    pk.max_dynamic_shared_size_bytes = smem
    pk((len(table_of),), (WG_THREADS if wg else THREADS,),
       (q, cache.k_pool, cache.v_pool, page0, units, indptr, indices, np.int32(n), np.int32(q_tile),
        np.int32(Hq), np.int32(Hkv), np.int32(G), np.int32(s), np.int32(Cb), scale_log2, o, lse,
        np.int32(return_lse)),
       shared_mem=smem)
    mark("attention")
    return GpuCompactPrefill(o=o, lse=lse if return_lse else None, indptr=indptr, indices=indices, stats=stats,
                             num_past_blocks=Pb, num_tables=R, denominator=Hq * Qb * max(Pb, 1))


def dense_prefill(cache, means: GpuBlockMeans, seq: int, q, layer: int = 0, **kw) -> GpuCompactPrefill:
    """Our dense chunked prefill: the same kernel with every block selected (alpha 0)."""
    kw.setdefault("sink", 0)
    kw.setdefault("window", 0)
    return compact_prefill(cache, means, seq, q, layer, alpha=0.0, **kw)


__all__ = ["GpuBlockMeans", "GpuCompactPrefill", "compact_prefill", "dense_prefill"]
