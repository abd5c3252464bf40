"""CompactAttention chunked prefill on the GPU: selection, unions, CSR tables, paged kernel.

Mirrors ``cpattn.reference.compact_attention`` name for name (docs/design.md, "One API for both
backends"); the cache picks the backend, so a NumPy ``ChunkCache`` runs the reference::

    means = BlockMeans(cache)                          # mean key per full page, on the device
    r = compact_prefill(cache, means, seq, q, layer)   # q [n, Hq, D]: the sequence's last n tokens
    r.o, r.lse                                         # [n, Hq, D] storage dtype, [n, Hq] float32
    r.density(), r.tables()                            # per-stage densities, host CSR (both sync)

Five launches on the current stream, no host synchronisation: block_score (tensor cores),
block_union (threshold + sink/window + Q-block and group unions + compaction), tables_csr
(prefix sums -> indptr, indices), paged_prefill (flash attention over each table's pages,
read in place from the pool; bottom-right causal mask on the chunk's own pages). Index
buffers have fixed capacity (every table could keep every block), so nothing waits for counts.

Numerics: block scores use the mean keys rounded to the storage dtype on the tensor cores
(fp32 accumulate), so a block whose score lies within rounding of the threshold
``alpha * max`` may be kept by one backend and not the other; everything else is identical.
summary='sampled' (the recall rule's default) scores its sampled rows with one more kernel,
sampled_block_mass (exact scores on the tensor cores, K read in place from the pool; float32
estimates vs the reference's float64, so ties at the recall rule's cut may differ).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrays import as_cupy, import_cupy
from .kernels import PREFILL_ROWS, PREFILL_SEQ_FIELDS, SAMPLED_KEYS, SAMPLED_ROWS, SCORE_ROWS, THREADS, UNION_THREADS, \
    WG_THREADS, get_kernels, prefill_smem_bytes, prefill_wg_smem_bytes
from .reference import compact_attention as reference
from .reference.checks import cdiv, check_bool, check_choice, check_instance, check_scale
from .reference.chunk_cache import check_cache
from .reference.compact_attention import DEFAULT_ALPHA, DEFAULT_SAMPLE_ROWS, KERNEL_CHOICES, check_chunk, \
    check_events, check_options, check_row_floor, check_summary, dense_options
from .reference.dtypes import storage_numpy_dtype, to_float32


def choose_kernel(kernel: str = "auto") -> str:
    """The paged-prefill kernel ``compact_prefill(kernel=...)`` runs: 'wgmma' (warpgroup MMA,
    compute capability 9.0 only) or 'mma' (mma.sync, every GPU). 'auto' picks 'wgmma' on Hopper,
    unless the environment sets CPATTN_PREFILL_KERNEL to 'mma' (or 'wgmma'). Checked before
    CuPy is imported."""
    import os

    check_choice(kernel, "kernel", KERNEL_CHOICES)
    if kernel == "auto":
        kernel = check_choice(os.environ.get("CPATTN_PREFILL_KERNEL", "auto"), "CPATTN_PREFILL_KERNEL",
                              KERNEL_CHOICES)
    if kernel == "mma":
        return "mma"
    import cupy

    cc = cupy.cuda.Device().compute_capability
    if kernel == "wgmma" and cc != "90":
        raise ValueError(f"kernel: expected 'wgmma' only on compute capability 9.0, got compute capability {cc}")
    return "wgmma" if cc == "90" else "mma"


def use_wgmma(kernel: str = "auto") -> bool:
    """True when ``choose_kernel(kernel)`` is the warpgroup-MMA kernel."""
    return choose_kernel(kernel) == "wgmma"


class BlockMeans(reference.BlockMeans):
    """Mean key of every summarised pool page, on the device: the reference ``BlockMeans`` with
    its summaries computed by one ``block_mean`` launch per update. For a NumPy cache,
    ``BlockMeans(cache)`` is the reference one.

    Arrays:
        kmean: cupy float32 [num_layers, num_chunks, Hkv, D]
        kmean_lp: the same rounded to the storage dtype (what the score kernel reads)
    Pages are summarised once, when full and committed; keyed by pool id and owning tree node.
    """

    def __new__(cls, cache):
        if check_cache(cache).backend == "numpy":
            return reference.BlockMeans(cache)
        return super().__new__(cls)

    def __init__(self, cache):
        cupy = import_cupy("BlockMeans on a GpuChunkCache")

        shape = (cache.num_layers, cache.num_chunks, cache.num_kv_heads, cache.head_dim)
        super().__init__(cache, kmean=cupy.zeros(shape, np.float32))
        self.kmean_lp = cupy.zeros(shape, storage_numpy_dtype(cache.dtype))
        self._kernels = get_kernels("compact_attention", cache.dtype, cache.head_dim, cache.chunk_size)

    def summarise(self, cache, chunks: list) -> None:
        import cupy

        pages = cupy.asarray(np.array(chunks, np.int32))
        self._kernels["block_mean"](
            (len(chunks), cache.num_kv_heads), (cache.head_dim,),
            (cache.k_pool, pages, np.int32(len(chunks)), np.int32(cache.num_layers), np.int32(cache.num_chunks),
             np.int32(cache.num_kv_heads), self.kmean, self.kmean_lp))


# ============================================================================ recall rule and sampled summary
# Array code written once for any array module ``xp`` (CuPy on the device; NumPy runs the same
# code on the host, which is how the CPU tests check it against the reference). float32 scores
# and exponentials, float64 per-table sums: the reference computes in float64, so a block whose
# estimate ties another's to float32 rounding at the cut may be chosen by one and not the other.
def estimate_mass(xp, q, k, kmean, chunk_size: int, scale: float, summary: str, sample_rows: int):
    """The reference's ``estimated_mass`` on ``xp`` arrays.

    Args: q float32 [n, Hq, D]; k float32 [Hkv, P + n, D] every key up to the chunk end;
        kmean float32 [Pb, Hkv, D]; summary 'mean' or 'sampled'.
    Returns: past float32 [Hq, Qb, Pb], own float32 [Hq, Qb] (summed over each query block's rows).
    """
    n, Hq, D = q.shape
    Hkv, L, _ = k.shape
    Pb, c = kmean.shape[0], chunk_size
    G, P, Qb = Hq // Hkv, L - n, cdiv(n, chunk_size)
    f32 = np.float32
    rows_in = np.minimum(c, n - np.arange(Qb) * c)
    past = xp.zeros((Hq, Qb, Pb), f32)
    own = xp.zeros((Hq, Qb), f32)
    if summary == "sampled":
        sel = reference.sampled_rows(n, c, sample_rows)
        W = xp.asarray(sample_weights(n, c, sel))
        hidden = xp.asarray(np.arange(L)[None, :] > (P + sel)[:, None])  # [m, L] keys after the row
        qs = q[xp.asarray(sel)]  # [m, Hq, D]
        for g in range(Hkv):
            z = xp.einsum("mhd,ld->hml", qs[:, g * G:(g + 1) * G], k[g]) * f32(scale)  # [G, m, L]
            z = xp.where(hidden[None], f32(-np.inf), z)
            p = xp.exp(z - z.max(axis=2, keepdims=True))
            p /= p.sum(axis=2, keepdims=True)
            bp = p[:, :, :P].reshape(G, len(sel), Pb, c).sum(axis=3)  # [G, m, Pb]
            past[g * G:(g + 1) * G] = xp.einsum("qm,gmp->gqp", W, bp)
            own[g * G:(g + 1) * G] = xp.einsum("qm,gm->gq", W, p[:, :, P:].sum(axis=2))
        return past, own
    # mean summary: own blocks before the row's at their means, the row's own block exactly
    pad = Qb * c
    own_k = xp.zeros((Hkv, pad, D), f32)
    own_k[:, :n] = k[:, P:]
    own_mean = own_k.reshape(Hkv, Qb, c, D).sum(axis=2) / xp.asarray(rows_in.astype(np.float32))[None, :, None]
    qp = xp.zeros((pad, Hq, D), f32)
    qp[:n] = q
    r = np.arange(pad)
    valid = xp.asarray(r < n)
    before = xp.asarray(np.arange(Qb)[None, :] < (r // c)[:, None])  # [pad, Qb] own blocks before the row's
    diag_ok = xp.asarray((np.arange(c)[None, :] <= np.arange(c)[:, None]))  # [c, c] causal in the block
    key_ok = xp.asarray(np.arange(pad).reshape(Qb, c) < n)  # [Qb, c] real keys of the last block
    log_c = f32(np.log(c))
    for h in range(Hq):
        g = h // G
        zp = (qp[:, h] @ kmean[:, g].T) * f32(scale) + log_c  # [pad, Pb]
        zo = xp.where(before, (qp[:, h] @ own_mean[g].T) * f32(scale) + log_c, f32(-np.inf))  # [pad, Qb]
        qb_ = qp[:, h].reshape(Qb, c, D)
        kb_ = own_k[g].reshape(Qb, c, D)
        sd = xp.einsum("ird,itd->irt", qb_, kb_) * f32(scale)  # [Qb, c, c]
        sd = xp.where(diag_ok[None] & key_ok[:, None, :], sd, f32(-np.inf))
        md = sd.max(axis=2)
        zd = (md + xp.log(xp.exp(sd - md[..., None]).sum(axis=2))).reshape(pad)  # [pad]
        m = xp.maximum(xp.maximum(zp.max(axis=1), zo.max(axis=1)), zd)
        ep = xp.exp(zp - m[:, None])
        eo = xp.exp(zo - m[:, None]).sum(axis=1) + xp.exp(zd - m)
        w = xp.where(valid, 1 / (ep.sum(axis=1) + eo), f32(0))  # padded rows count nothing
        past[h] = (ep * w[:, None]).reshape(Qb, c, Pb).sum(axis=1)
        own[h] = (eo * w).reshape(Qb, c).sum(axis=1)
    return past, own


def sample_weights(n: int, chunk_size: int, sel) -> np.ndarray:
    """float32 [Qb, m]: query block <- sampled row ``sel[i]`` (``reference.sampled_rows``), the
    rows of its query block each sample stands for (the reference's ``weight``); 0 elsewhere."""
    c, Qb = chunk_size, cdiv(n, chunk_size)
    rows_in = np.minimum(c, n - np.arange(Qb) * c)
    qb = np.asarray(sel) // c
    W = np.zeros((Qb, len(qb)), np.float32)
    W[qb, np.arange(len(qb))] = rows_in[qb] / np.bincount(qb, minlength=Qb)[qb]
    return W


# ---------------------------------------------------------------------------- the sampled summary's kernel
# sampled_block_mass (raw_kernels/compact_attention.cu) writes, per key block j of the sequence
# up to the chunk end (Pb past pages, then the chunk's Qb own pages), query head h and sampled
# row i, the block's log-sum-exp of the row's exact scores in log2 units (-inf where the row
# sees none of its keys): part float32 [Pb + Qb, Hq, m]. mass_from_partials turns that into
# estimate_mass's (past, own); together they are estimate_mass(summary='sampled') without the
# float32 copy of every key.
# sampled_block_mass: key splits such that the grid is about this many blocks per SM (about 3 fit
# at once at D 128). Measured at 128K (tools/tune_sampled_mass.py): 8 to 32 within run-to-run
# noise of each other (0.70-0.79 ms), 4 and 64 slower.
SAMPLED_BLOCKS_PER_SM = 16


def sampled_mass_grid(num_q_heads: int, num_kv_heads: int, m: int, past_blocks: int, n: int, chunk_size: int,
                      num_sms: int):
    """(grid, split_steps) of sampled_block_mass for m sampled rows: grid (row tiles of
    SAMPLED_ROWS rows of the G m rows of a kv head, key splits, kv heads); each key split is
    ``split_steps`` steps of SAMPLED_KEYS keys, a multiple of the steps one key block spans
    (at least 8 steps, so the Q fragments' load is amortised), the last split shorter."""
    G, c = num_q_heads // num_kv_heads, chunk_size
    steps = cdiv((past_blocks + cdiv(n, c)) * c, SAMPLED_KEYS)
    per_block = max(1, c // SAMPLED_KEYS)  # steps a key block spans
    tiles = cdiv(G * m, SAMPLED_ROWS)
    want = max(1, cdiv(SAMPLED_BLOCKS_PER_SM * num_sms, tiles * num_kv_heads))  # splits wanted
    split_steps = max(cdiv(cdiv(steps, want), per_block), cdiv(8, per_block)) * per_block
    return (tiles, cdiv(steps, split_steps), num_kv_heads), split_steps


def sampled_block_mass(cache, layer: int, blocks, q, past_blocks: int, scale: float, sample_rows: int, part=None,
                       last_block: bool = False):
    """Launch sampled_block_mass for one chunk (on the current stream; no sync).

    Args: blocks cupy int32 [Pb + Qb] the sequence's pool ids up to the chunk end; q cupy
        [n, Hq, D] storage dtype, the chunk's queries; part: None or a cupy float32
        [Pb + Qb, Hq, m] that receives the partials (every entry is written).
    Returns: part float32 [Pb + Qb, Hq, m] (m = len(reference.sampled_rows(n, c, sample_rows, last_block))).
    """
    import cupy

    n, Hq, D = q.shape
    c, Hkv = cache.chunk_size, cache.num_kv_heads
    sel = reference.sampled_rows(n, c, sample_rows, last_block)
    m, nb = len(sel), past_blocks + cdiv(n, c)
    if part is None:
        part = cupy.empty((nb, Hq, m), np.float32)
    elif part.shape != (nb, Hq, m) or part.dtype != np.float32 or not part.flags.c_contiguous:
        raise ValueError(f"part: expected a C-contiguous float32 array of shape {(nb, Hq, m)}, got "
                         f"{part.dtype} {part.shape}")
    rows = cupy.asarray(sel.astype(np.int32))
    q_rows = cupy.ascontiguousarray(q[cupy.asarray(sel)])  # [m, Hq, D]
    grid, split_steps = sampled_mass_grid(Hq, Hkv, m, past_blocks, n, c,
                                          cupy.cuda.Device().attributes["MultiProcessorCount"])
    k = get_kernels("compact_attention", cache.dtype, cache.head_dim, c)
    k["sampled_block_mass"](grid, (THREADS,),
                            (q_rows, rows, np.int32(m), cache.k_pool, np.int64(layer * cache.num_chunks * Hkv), blocks,
                             np.int32(past_blocks), np.int32(n), np.int32(Hq), np.int32(Hkv), np.int32(split_steps),
                             np.float32(scale * 1.4426950408889634), part))
    return part


def mass_from_partials(xp, part, past_blocks: int, n: int, chunk_size: int, sample_rows: int):
    """estimate_mass(summary='sampled')'s (past float32 [Hq, Qb, Pb], own float32 [Hq, Qb]) from
    sampled_block_mass's ``part`` float32 [Pb + Qb, Hq, m]: each sampled row's softmax is
    2^(part - its log-sum-exp over every block), summed over the past blocks one by one and over
    the own blocks, and weighted per query block (``sample_weights``)."""
    Pb = past_blocks
    W = xp.asarray(sample_weights(n, chunk_size, reference.sampled_rows(n, chunk_size, sample_rows)))  # [Qb, m]
    top = part.max(axis=0)  # [Hq, m]: finite, every row sees key 0
    e = xp.exp2(part - top[None])  # [Pb + Qb, Hq, m]; -inf -> 0
    w = W[None] / e.sum(axis=0)[:, None, :]  # [Hq, Qb, m]: each sample's weight over its row total
    past = xp.einsum("hqm,phm->hqp", w, e[:Pb]).astype(np.float32)
    own = xp.einsum("hqm,hm->hq", w, e[Pb:].sum(axis=0)).astype(np.float32)
    return past, own


def table_sums(xp, past, own, num_kv_heads: int, group_size: int, tile_blocks: int):
    """The recall rule's per-table sums of an estimate: (E float64 [T, Hkv, S, Pb], own float64
    [T, Hkv, S]), ``past`` [Hq, Qb, Pb] and ``own`` [Hq, Qb] summed over each table's heads and
    query blocks."""
    Hq, Qb, Pb = past.shape
    s, tb = group_size, tile_blocks
    S, T = Hq // num_kv_heads // s, cdiv(Qb, tb)
    pad = xp.zeros((Hq, T * tb, Pb), np.float64)
    pad[:, :Qb] = past
    E = pad.reshape(num_kv_heads, S, s, T, tb, Pb).sum(axis=(2, 4)).transpose(2, 0, 1, 3)
    po = xp.zeros((Hq, T * tb), np.float64)
    po[:, :Qb] = own
    return E, po.reshape(num_kv_heads, S, s, T, tb).sum(axis=(2, 4)).transpose(2, 0, 1)


def sampled_table_sums(xp, part, past_blocks: int, n: int, chunk_size: int, sample_rows: int, num_kv_heads: int,
                       group_size: int, tile_blocks: int):
    """``table_sums`` of ``mass_from_partials(part, ...)`` straight from sampled_block_mass's
    ``part`` float32 [Pb + Qb, Hq, m], without the [Hq, Qb, Pb] estimate: a table's query blocks
    enter only through their summed sample weights, so per head the past sums are one product
    (tile weights [T, m] over the row totals) x (the rows' block masses [m, Pb]), in float64.
    Equal to the two-step path up to float rounding."""
    Pb, c = past_blocks, chunk_size
    NB, Hq, m = part.shape
    s, tb = group_size, tile_blocks
    W = sample_weights(n, c, reference.sampled_rows(n, c, sample_rows))  # [Qb, m], host
    Qb = W.shape[0]
    S, T = Hq // num_kv_heads // s, cdiv(Qb, tb)
    Wt = xp.asarray(np.add.reduceat(W, np.arange(0, Qb, tb), axis=0))  # [T, m]: a tile's weights
    e = xp.exp2(part - part.max(axis=0)[None])  # [Pb + Qb, Hq, m]; -inf -> 0
    w = Wt[None].astype(np.float64) / e.sum(axis=0, dtype=np.float64)[:, None, :]  # [Hq, T, m]
    Eh = xp.matmul(w, e[:Pb].transpose(1, 2, 0).astype(np.float64))  # [Hq, T, Pb]
    Oh = (w * e[Pb:].sum(axis=0, dtype=np.float64)[:, None, :]).sum(axis=2)  # [Hq, T]
    E = Eh.reshape(num_kv_heads, S, s, T, Pb).sum(axis=2).transpose(2, 0, 1, 3)
    return E, Oh.reshape(num_kv_heads, S, s, T).sum(axis=2).transpose(2, 0, 1)


def sampled_row_mass(xp, part, past_blocks: int):
    """The reference's ``sampled_row_mass`` (past, own) from sampled_block_mass's ``part``
    float32 [Pb + Qb, Hq, m]: each sampled row's softmax, 2^(part - its log-sum-exp over every
    block), summed per past block and over the own blocks. Returns past float64 [Hq, m, Pb],
    own float64 [Hq, m] (past.sum(axis=2) + own = 1)."""
    Pb = past_blocks
    e = xp.exp2(part - part.max(axis=0)[None]).astype(np.float64)  # [Pb + Qb, Hq, m]; -inf -> 0
    tot = e.sum(axis=0)  # [Hq, m]
    return e[:Pb].transpose(1, 2, 0) / tot[..., None], e[Pb:].sum(axis=0) / tot


def row_floor_choice(xp, row_past, row_own, row_block, forced, floor: float, num_kv_heads: int, group_size: int,
                     tile_blocks: int):
    """The reference's ``row_floor_rule`` on ``xp`` arrays: bool [T, Hkv, S, Pb], per table the
    union of its sampled rows' minimal sets at ``floor`` (forced blocks not included).
    ``row_past`` [Hq, m, Pb], ``row_own`` [Hq, m] on ``xp``; ``row_block`` int [m] (the query block
    of each sampled row) and ``forced`` bool [Pb] are host arrays."""
    Hq, m, Pb = row_past.shape
    s, tb = group_size, tile_blocks
    S = Hq // num_kv_heads // s
    tile = np.asarray(row_block) // tb
    T = int(tile.max()) + 1 if m else 0
    fx = xp.asarray(forced)
    base = row_own + (row_past * fx).sum(axis=2)  # [Hq, m]
    gain = xp.where(fx, 0.0, row_past)
    order = xp.argsort(-xp.where(fx, -1.0, gain), axis=2, kind="stable")  # ties: the earlier block
    g_sorted = xp.take_along_axis(gain, order, axis=2)
    take = base[..., None] + xp.cumsum(g_sorted, axis=2) - g_sorted < floor
    if floor >= 1.0:
        take = xp.ones_like(take)
    take &= ~fx[order]
    mine = xp.zeros(take.size, np.float32)  # scatter back to block order through flat indices
    mine[(xp.arange(take.size // Pb)[:, None] * Pb + order.reshape(-1, Pb)).ravel()] = take.ravel()
    in_tile = xp.asarray((tile[None, :] == np.arange(T)[:, None]).astype(np.float32))  # [T, m]
    per_head = xp.matmul(in_tile[None], mine.reshape(Hq, m, Pb)) > 0  # [Hq, T, Pb]: any row of the tile
    return per_head.reshape(num_kv_heads, S, s, T, Pb).any(axis=2).transpose(2, 0, 1, 3)


def recall_choice(xp, past, own, rows_in, forced, recall: float, num_kv_heads: int, group_size: int,
                  tile_blocks: int):
    """The reference's ``recall_rule`` on ``xp`` arrays: bool [T, Hkv, S, Pb] (forced blocks not
    included). ``rows_in`` int [Qb] and ``forced`` bool [Pb] are host arrays."""
    E, O = table_sums(xp, past, own, num_kv_heads, group_size, tile_blocks)
    return recall_choice_sums(xp, E, O, rows_in, forced, recall, group_size, tile_blocks)


def recall_choice_sums(xp, E, O, rows_in, forced, recall: float, group_size: int, tile_blocks: int):
    """``recall_choice`` from the per-table sums (``table_sums`` or ``sampled_table_sums``)."""
    Pb = E.shape[3]
    Qb, tb = len(rows_in), tile_blocks
    fx = xp.asarray(forced)
    base = O + (E * fx).sum(axis=3)
    rows = np.add.reduceat(rows_in, np.arange(0, Qb, tb)) * group_size  # [T]
    gain = xp.where(fx, 0.0, E)
    order = xp.argsort(-xp.where(fx, -1.0, gain), axis=3)
    g_sorted = xp.take_along_axis(gain, order, axis=3)
    before = base[..., None] + xp.cumsum(g_sorted, axis=3) - g_sorted
    take = before < xp.asarray(recall * rows.astype(np.float64))[:, None, None, None]
    if recall >= 1.0:
        take = xp.ones_like(take)
    take &= ~fx[order]
    chosen = xp.zeros(take.size, bool)  # scatter back to block order through flat indices
    chosen[(xp.arange(take.size // Pb)[:, None] * Pb + order.reshape(-1, Pb)).ravel()] = take.ravel()
    return chosen.reshape(take.shape)


def choice_scores(xp, chosen, G: int, tile_blocks: int, Qb: int):
    """A recall-rule choice [T, Hkv, S, Pb] as block_union input [Hq, Qb, Pb] float32: +1 where
    chosen, -1 elsewhere, so alpha 1 keeps exactly the choice (the kernel's row max starts at 0:
    a row with nothing chosen has threshold 0 and keeps only its forced blocks)."""
    T, Hkv, S, Pb = chosen.shape
    s = G // S
    per_head = xp.broadcast_to(chosen.transpose(1, 2, 0, 3)[:, :, None], (Hkv, S, s, T, Pb)).reshape(Hkv * G, T, Pb)
    sel = per_head[:, xp.asarray(np.arange(Qb) // tile_blocks)]
    return xp.where(sel, np.float32(1), np.float32(-1)).astype(np.float32)


def sequence_scores(cache, means, layer: int, blocks, q, past_blocks: int, scale: float, *, recall, summary: str,
                    sample_rows: int, sink: int, window: int, group_size: int, tile_blocks: int, row_floor=None):
    """One sequence's block scores by the array path (the recall rule, or ``summary='sampled'``):
    float32 [Hq, Qb, Pb], for ``block_union`` at threshold 1 under the recall rule (its choice as
    +-1 scores) and at alpha otherwise (the estimate). ``blocks`` cupy int32 [Pb + Qb]: the
    sequence's pool ids up to the chunk end; q cupy [n, Hq, D] storage dtype. ``row_floor``
    (recall rule on summary='sampled' only): the choice also holds the minimal set at the floor of
    every sampled row and of every row of the chunk's last query block (their partials come from
    the same launch; the pooled sums use the sampled rows alone; ``row_floor_choice``)."""
    import cupy

    n, Hq, _ = q.shape
    c, Hkv, Pb = cache.chunk_size, cache.num_kv_heads, past_blocks
    Qb, s, tb = cdiv(n, c), group_size, tile_blocks
    last = row_floor is not None  # the floor samples the chunk's last query block in full
    if summary == "sampled":  # one kernel over the pool pages in place, then a small combine
        part = sampled_block_mass(cache, layer, blocks, q, Pb, scale, sample_rows, last_block=last)
        if recall is None:
            return mass_from_partials(cupy, part, Pb, n, c, sample_rows)[0]
        if last:  # the pooled estimate on the sample_rows samples alone (the reference's), a subset of the rows
            rows = reference.sampled_rows(n, c, sample_rows, last_block=True)
            base = np.searchsorted(rows, reference.sampled_rows(n, c, sample_rows))
            E, O = sampled_table_sums(cupy, part[:, :, cupy.asarray(base)], Pb, n, c, sample_rows, Hkv, s, tb)
        else:
            E, O = sampled_table_sums(cupy, part, Pb, n, c, sample_rows, Hkv, s, tb)  # straight from the partials
        if row_floor is not None:
            row_p, row_o = sampled_row_mass(cupy, part, Pb)
    else:
        ids = blocks[:Pb + Qb].astype(np.int64)
        kk = sequence_keys(cupy, cache.k_pool[layer], ids, Pb * c + n, cache.dtype)
        est_p, est_o = estimate_mass(cupy, to_float32(q, cache.dtype), kk, means.kmean[layer][ids[:Pb]], c, scale,
                                     summary, sample_rows)
        if recall is None:
            return est_p
        E, O = table_sums(cupy, est_p, est_o, Hkv, s, tb)
    j = np.arange(Pb)
    forced = (j < sink) | (j >= Pb - window)
    rows_in = np.minimum(c, n - np.arange(Qb) * c)
    chosen = recall_choice_sums(cupy, E, O, rows_in, forced, float(recall), s, tb)
    if row_floor is not None:  # check_row_floor: only on the sampled summary
        rows = reference.sampled_rows(n, c, sample_rows, last_block=True)
        chosen |= row_floor_choice(cupy, row_p, row_o, rows // c, forced, float(row_floor), Hkv, s, tb)
    return choice_scores(cupy, chosen, Hq // Hkv, tb, Qb)


def sequence_keys(xp, k_pool, ids, length: int, dtype: str):
    """float32 [Hkv, length, D]: a layer's keys of the blocks ``ids`` (pool [chunks, Hkv, c, D])."""
    k = to_float32(k_pool[ids], dtype)  # [nb, Hkv, c, D]
    nb, Hkv, c, D = k.shape
    return xp.ascontiguousarray(k.transpose(1, 0, 2, 3).reshape(Hkv, nb * c, D)[:, :length])


@dataclass
class CompactPrefill:
    """Result of ``compact_prefill`` (the reference's ``CompactPrefill`` on the device). Reading
    ``density()`` or ``tables()`` synchronises.

    Arrays:
        o        cupy [n, Hq, D] storage dtype
        lse      cupy float32 [n, Hq]; None with return_lse=False
        indptr   cupy int32 [R + 1], R = T * Hkv * S tables (reference BlockTables order)
        indices  cupy int32 [capacity]; the first indptr[-1] entries are the page lists
        stats    cupy uint64 [3]: kept (head, query block, past block) triples at select / q_union /
                 group_union
    """

    o: object
    lse: object
    indptr: object
    indices: object
    stats: object
    num_past_blocks: int
    num_tables: int
    denominator: int  # Hq * Qb * Pb
    causal_blocks: int  # Pb * R + own blocks of every table: what a dense prefill reads

    def density(self) -> dict:
        """Density after each stage, as the reference counts it: select, q_union, group_union
        (past blocks), tables (all blocks). Synchronises."""
        tables = float(self.indptr[-1].get()) / self.causal_blocks
        if self.num_past_blocks == 0:
            return dict(select=1.0, q_union=1.0, group_union=1.0, tables=tables)
        s = self.stats.get().astype(np.float64) / self.denominator
        return dict(select=float(s[0]), q_union=float(s[1]), group_union=float(s[2]), tables=tables)

    def tables(self):
        """(indptr int32 [R + 1], indices int32 [nnz]) on the host (syncs): the CSR page lists."""
        indptr = self.indptr.get()
        return indptr, self.indices[: int(indptr[-1])].get()


def compact_prefill(cache, means: BlockMeans, seq: int, q, layer: int = 0, *, scale: float | None = None,
                    alpha: float | None = DEFAULT_ALPHA, sink: int = 2, window: int = 4, q_tile: int | None = None,
                    group_size: int | None = None, recall: float | None = None, summary: str = "auto",
                    sample_rows: int = DEFAULT_SAMPLE_ROWS, row_floor: float | None = None, return_lse: bool = True,
                    out=None, kernel: str = "auto", events: list | None = None):
    """CompactAttention for one chunk and layer (see the module docstring): a ``CompactPrefill``.

    The chunk is the sequence's last n = q.shape[0] tokens, their K/V written for this layer;
    q: [n, Hq, D] storage dtype (CuPy, __cuda_array_interface__ or DLPack). alpha 0 keeps every
    block (dense chunked prefill). Launches on the current stream; never synchronises.
    ``out``: a device array [n, Hq, D] storage dtype that receives ``o``.
    ``events``: a list that receives (stage name, CUDA event) at "start" and after "means",
    "score", "tables" and "attention", for profiling.
    ``kernel``: the attention kernel (``choose_kernel``): 'auto' (warpgroup MMA on Hopper, else
    mma.sync), 'wgmma' or 'mma'; the environment variable CPATTN_PREFILL_KERNEL overrides 'auto'.
    A NumPy ``ChunkCache`` runs ``cpattn.reference.compact_attention.compact_prefill``.
    """
    if check_cache(cache).backend == "numpy":
        return reference.compact_prefill(cache, means, seq, q, layer, scale=scale, alpha=alpha, sink=sink,
                                         window=window, q_tile=q_tile, group_size=group_size, recall=recall,
                                         summary=summary, sample_rows=sample_rows, row_floor=row_floor,
                                         return_lse=return_lse,
                                         out=out, kernel=kernel, events=events)
    import cupy

    check_choice(kernel, "kernel", KERNEL_CHOICES)
    check_bool(return_lse, "return_lse")
    check_events(events)
    q = as_cupy(q, "q", cache.dtype)
    P, n, G = check_chunk(cache, seq, q, layer)
    scale = check_scale(scale, cache.head_dim)
    c, Hkv, D = cache.chunk_size, cache.num_kv_heads, cache.head_dim
    q_tile, s = check_options(c, n, G, alpha, sink, window, q_tile, group_size, recall)
    summary = check_summary(summary, sample_rows, recall)
    row_floor = check_row_floor(row_floor, recall, summary)
    check_instance(means, "means", BlockMeans, "cpattn.compact_attention.BlockMeans(cache) for a GPU cache")
    means.check_cache(cache)
    wg = use_wgmma(kernel)
    Hq = q.shape[1]
    if out is not None:
        out = as_cupy(out, "out", cache.dtype, (n, Hq, D))
    k = get_kernels("compact_attention", cache.dtype, D, c)

    def mark(name):
        if events is not None:
            ev = cupy.cuda.Event()
            ev.record()
            events.append((name, ev))

    mark("start")
    means.update(cache, seq, num_tokens=P)
    mark("means")

    Pb, Qb, Cb = P // c, cdiv(n, c), cdiv(n, c)
    tb = q_tile // c
    T, S = cdiv(Qb, tb), G // s
    R = T * Hkv * S
    blocks = cupy.asarray(np.array(cache.seq_chunks(seq)[: Pb + Cb], np.int32))
    page0 = np.int64(layer * cache.num_chunks * Hkv)
    scale_log2 = np.float32(scale * 1.4426950408889634)

    # 2. scores (3. under the recall rule: its choice, as +-1 scores that alpha 1 keeps exactly)
    s_raw = cupy.zeros((Hq, Qb, max(Pb, 1)), np.float32)
    thr = alpha
    if Pb and (recall is not None or summary == "sampled"):
        s_raw = sequence_scores(cache, means, layer, blocks, q, Pb, scale, recall=recall, summary=summary,
                                sample_rows=sample_rows, sink=sink, window=window, group_size=s, tile_blocks=tb,
                                row_floor=row_floor)
        thr = alpha if recall is None else 1.0
        s_raw = cupy.ascontiguousarray(s_raw)
    elif Pb and alpha > 0:  # alpha 0 keeps every block: all-zero scores pass a zero threshold
        k["block_score"]((cdiv(n, SCORE_ROWS), Hq), (THREADS,),
                         (q, means.kmean_lp, page0, blocks, np.int32(Pb), np.int32(n), np.int32(Hq),
                          np.int32(Hkv), scale_log2, s_raw))
    mark("score")
    # 3-5. threshold, unions, compaction
    cap = Pb + Cb
    padded = cupy.empty(R * cap, np.int32)
    counts = cupy.empty(R, np.int32)
    stats = cupy.zeros(3, np.uint64)
    k["block_union"]((R,), (UNION_THREADS,),
                     (s_raw, np.int32(Pb), np.int32(Qb), np.int32(tb), np.int32(T), np.int32(Hkv), np.int32(G),
                      np.int32(s), np.float32(thr), np.int32(sink), np.int32(window), blocks, np.int32(Cb),
                      padded, np.int32(cap), counts, stats),
                     shared_mem=4 * s * tb)
    # 6. CSR
    indptr = cupy.empty(R + 1, np.int32)
    indices = cupy.empty(R * cap, np.int32)
    k["tables_csr"]((R,), (THREADS,), (padded, np.int32(cap), counts, np.int32(R), indptr, indices))
    mark("tables")
    # 7. paged prefill: units (table, 128-row block) are known on the host from the shapes
    tile_tokens = np.minimum(q_tile, n - np.arange(T) * q_tile)  # [T]
    rows = np.repeat(tile_tokens * s, Hkv * S)  # [R]
    per = -(-rows // PREFILL_ROWS)
    table_of = np.repeat(np.arange(R), per)
    row0 = (np.arange(len(table_of)) - np.repeat(np.cumsum(per) - per, per)) * PREFILL_ROWS
    units = cupy.asarray(np.stack([table_of, row0], axis=1).astype(np.int32).ravel())
    o = out if out is not None else cupy.empty((n, Hq, D), q.dtype)
    lse = cupy.empty((n, Hq), np.float32) if return_lse else cupy.empty(1, np.float32)
    if wg:
        smem = prefill_wg_smem_bytes(D, c)
        pk = get_kernels("compact_attention_sm90", cache.dtype, D, c)["paged_prefill_wg"]
    else:
        smem = prefill_smem_bytes(D, c)
        pk = k["paged_prefill"]
    pk.max_dynamic_shared_size_bytes = smem
    pk((len(table_of),), (WG_THREADS if wg else THREADS,),
       (q, cache.k_pool, cache.v_pool, page0, units, indptr, indices, np.int32(n), np.int32(q_tile),
        np.int32(Hq), np.int32(Hkv), np.int32(G), np.int32(s), np.int32(Cb), scale_log2, o, lse,
        np.int32(return_lse)),
       shared_mem=smem)
    mark("attention")
    own_blocks = sum(cdiv(min(n, (t + 1) * q_tile), c) for t in range(T))  # own pages each tile reads
    return CompactPrefill(o=o, lse=lse if return_lse else None, indptr=indptr, indices=indices, stats=stats,
                          num_past_blocks=Pb, num_tables=R, denominator=Hq * Qb * max(Pb, 1),
                          causal_blocks=Pb * R + own_blocks * Hkv * S)


def dense_prefill(cache, means: BlockMeans, seq: int, q, layer: int = 0, **options):
    """Our dense chunked prefill: ``compact_prefill`` with every block kept (alpha 0, sink and
    window 0 unless given). A NumPy ``ChunkCache`` runs the reference."""
    return compact_prefill(cache, means, seq, q, layer, **dense_options(options))


# ============================================================================ batched varlen prefill
@dataclass(frozen=True)
class BatchedLayout:
    """The device-side layout of a ``PrefillPlan`` (host arrays, uploaded once per plan), what the
    ``*_varlen`` kernels read (docs/design.md, "Batched varlen prefill").

    Arrays (int32):
        seq_info    [len(PREFILL_SEQ_FIELDS), B]  the per-sequence record (field-major)
        blocks      [sum(Pb + Cb)]  each sequence's pool ids up to its chunk end, packed
        table_seq   [R]   the sequence of every table (tables of the batch, sequence-major)
        units       [U, 2] (table, row0): paged-prefill units, PREFILL_ROWS rows of a table
                    each, longest tables first (a dense table's keys)
        row_blocks  [Ur, 2] (sequence, row0): block-score blocks of the chunks with a past,
                    longest past first
    cap: the longest table any chunk could have (max Pb + Cb; padded lists use it);
    max_tile_blocks: the largest tb (block_union's shared thresholds); score_size: floats of
    the packed block scores ([Hq, Qb, max(Pb, 1)] per sequence).
    """

    seq_info: np.ndarray
    blocks: np.ndarray
    table_seq: np.ndarray
    units: np.ndarray
    row_blocks: np.ndarray
    cap: int
    max_tile_blocks: int
    score_size: int


def batched_layout(plan, block_ids: list, num_kv_heads: int) -> BatchedLayout:
    """The ``BatchedLayout`` of ``plan`` (a ``PrefillPlan``); ``block_ids[b]``: the pool ids of
    sequence b's pages (``cache.seq_chunks``), at least its Pb + Cb first."""
    c, Hq, s = plan.chunk_size, plan.num_q_heads, plan.group_size
    S = Hq // num_kv_heads // s
    n = plan.chunk_lens
    Pb = plan.past_lens // c
    Qb = -(-n // c)
    tb = plan.q_tiles // c
    T = -(-Qb // tb)
    score = Hq * Qb * np.maximum(Pb, 1)
    rec = dict(chunk_len=n, past_blocks=Pb, query_blocks=Qb, tile_blocks=tb, row0=plan.qo_indptr[:-1],
               table0=plan.table_indptr[:-1], block0=np.concatenate([[0], np.cumsum(Pb + Qb)[:-1]]),
               score0=np.concatenate([[0], np.cumsum(score)[:-1]]))
    total_blocks = int((Pb + Qb).sum())
    R = plan.num_tables
    cap = int((Pb + Qb).max())
    for name, size in (("score", int(score.sum())), ("tables", R * cap), ("rows", plan.num_tokens * Hq)):
        if size >= 2**31:
            raise ValueError(f"seqs: expected a batch whose {name} fit int32 indices, got {size} entries; "
                             f"split the batch")
    seq_info = np.stack([np.asarray(rec[f], np.int64) for f in PREFILL_SEQ_FIELDS]).astype(np.int32)
    blocks = np.concatenate([np.asarray(ids[: int(p + q)], np.int64) for ids, p, q in zip(block_ids, Pb, Qb)])
    assert len(blocks) == total_blocks
    table_seq = np.repeat(np.arange(plan.batch_size), T * num_kv_heads * S).astype(np.int32)
    # units: per table, its rows (tile tokens x sub-group heads) in PREFILL_ROWS pieces
    local = np.arange(R) - plan.table_indptr[table_seq]
    t = local // (num_kv_heads * S)
    qt = plan.q_tiles[table_seq]
    rows = np.minimum(qt, n[table_seq] - t * qt) * s
    per = -(-rows // PREFILL_ROWS)
    table_of = np.repeat(np.arange(R), per)
    row0 = (np.arange(len(table_of)) - np.repeat(np.cumsum(per) - per, per)) * PREFILL_ROWS
    # longest first (keys a dense table reads: every past page and the own pages to the tile end),
    # so a ragged batch's long units do not start last; results do not depend on the order
    keys = (Pb[table_seq] + np.minimum((t + 1) * (qt // c), Qb[table_seq]))[table_of]
    order = np.argsort(-keys, kind="stable")
    units = np.stack([table_of, row0], axis=1)[order].astype(np.int32)
    # block-score blocks: SCORE_ROWS rows of each chunk that has a past, longest past first
    nblk = np.where(Pb > 0, -(-n // SCORE_ROWS), 0)
    seq_of = np.repeat(np.arange(plan.batch_size), nblk)
    r0 = (np.arange(len(seq_of)) - np.repeat(np.cumsum(nblk) - nblk, nblk)) * SCORE_ROWS
    row_blocks = np.stack([seq_of, r0], axis=1)[np.argsort(-Pb[seq_of], kind="stable")].astype(np.int32)
    return BatchedLayout(seq_info=seq_info, blocks=blocks.astype(np.int32), table_seq=table_seq, units=units,
                         row_blocks=row_blocks, cap=cap, max_tile_blocks=int(tb.max()), score_size=int(score.sum()))


class BatchedPrefill(reference.BatchedPrefill):
    """Batched varlen CompactAttention prefill on the GPU: the reference ``BatchedPrefill``'s API
    (``plan``, ``run``, ``density``, ``tables``), one launch per stage over every chunk of the
    batch: block_score_varlen, block_union_varlen, tables_csr, paged_prefill_varlen (or its
    warpgroup-MMA twin). For a NumPy cache, ``BatchedPrefill(cache, means)`` is the reference one.

    ``plan`` summarises the past pages, uploads the layout (``batched_layout``) and allocates
    the stage buffers; ``run`` only launches (plus zero fills), so with ``out`` and ``lse_out``
    given it can be captured in a CUDA graph and replayed while the plan holds (same cache
    version, every sequence still P + n tokens). The recall rule and summary='sampled' score
    each sequence first (summary='sampled': ``sampled_block_mass`` + ``mass_from_partials``;
    'mean': the array code ``estimate_mass``): correct, not capturable.
    """

    def __new__(cls, cache, means):
        if check_cache(cache).backend == "numpy":
            return reference.BatchedPrefill(cache, means)
        return super().__new__(cls)

    def __init__(self, cache, means):
        import_cupy("BatchedPrefill on a GpuChunkCache")
        check_instance(means, "means", BlockMeans, "cpattn.compact_attention.BlockMeans(cache) for a GPU cache")
        means.check_cache(cache)
        self.cache, self.means = cache, means
        self.prefill_plan = None
        self.results = []
        self._k = get_kernels("compact_attention", cache.dtype, cache.head_dim, cache.chunk_size)
        self._d = None

    def plan(self, seqs, chunk_lens, num_q_heads: int, **options):
        import cupy

        unknown = sorted(set(options) - set(reference.PLAN_OPTIONS))
        if unknown:
            raise TypeError(f"options: expected some of {', '.join(reference.PLAN_OPTIONS)}, got {unknown}")
        cache = self.cache
        plan = reference.build_prefill_plan(cache, seqs, chunk_lens, num_q_heads, **options)
        wg = use_wgmma(plan.options["kernel"])
        ids = [cache.seq_chunks(int(seq)) for seq in plan.seqs]
        lay = batched_layout(plan, ids, cache.num_kv_heads)  # checks done: the state may change now
        for seq, P in zip(plan.seqs, plan.past_lens):
            self.means.update(cache, int(seq), num_tokens=int(P))
        c, D, Hq = cache.chunk_size, cache.head_dim, plan.num_q_heads
        B, R = plan.batch_size, plan.num_tables
        if wg:
            smem = prefill_wg_smem_bytes(D, c)
            pk = get_kernels("compact_attention_sm90", cache.dtype, D, c)["paged_prefill_wg_varlen"]
        else:
            smem = prefill_smem_bytes(D, c)
            pk = self._k["paged_prefill_varlen"]
        pk.max_dynamic_shared_size_bytes = smem
        self._d = dict(
            lay=lay, wg=wg, smem=smem, pk=pk,
            seq_info=cupy.asarray(lay.seq_info), blocks=cupy.asarray(lay.blocks),
            table_seq=cupy.asarray(lay.table_seq), units=cupy.asarray(lay.units.ravel()),
            row_blocks=cupy.asarray(lay.row_blocks.ravel()),
            s_raw=cupy.zeros(lay.score_size, np.float32), padded=cupy.empty(R * lay.cap, np.int32),
            counts=cupy.empty(R, np.int32), stats=cupy.zeros(3 * B, np.uint64),
            indptr=cupy.empty(R + 1, np.int32), indices=cupy.empty(R * lay.cap, np.int32),
            block_lists=ids)
        self.prefill_plan, self.results = plan, []
        self._ran = False
        return plan

    def _scores(self, plan, q, layer: int, scale: float) -> float:
        """Fill the packed block scores for this layer; returns the union threshold."""
        cache, d, opt = self.cache, self._d, plan.options
        lay = d["lay"]
        c, Hkv, Hq, s = cache.chunk_size, cache.num_kv_heads, plan.num_q_heads, plan.group_size
        recall = opt["recall"]
        summary = check_summary(opt["summary"], opt["sample_rows"], recall)
        if recall is not None or summary == "sampled":
            for b in range(plan.batch_size):
                n, Pb = int(plan.chunk_lens[b]), int(plan.past_lens[b]) // c
                if not Pb:
                    continue
                Qb, tb = cdiv(n, c), int(plan.q_tiles[b]) // c
                a0, a = int(lay.seq_info[PREFILL_SEQ_FIELDS.index("score0"), b]), int(plan.qo_indptr[b])
                b0 = int(lay.seq_info[PREFILL_SEQ_FIELDS.index("block0"), b])  # this sequence's slice of the blocks
                sc = sequence_scores(cache, self.means, layer, d["blocks"][b0:b0 + Pb + Qb], q[a:a + n], Pb, scale,
                                     recall=recall, summary=summary, sample_rows=opt["sample_rows"], sink=opt["sink"],
                                     window=opt["window"], group_size=s, tile_blocks=tb, row_floor=opt["row_floor"])
                d["s_raw"][a0:a0 + Hq * Qb * Pb] = sc.astype(np.float32).ravel()
            return 1.0 if recall is not None else float(opt["alpha"])
        alpha = float(opt["alpha"])
        if alpha > 0 and len(lay.row_blocks):  # alpha 0: the zero scores of the plan pass a zero threshold
            d["s_raw"].fill(0)
            page0 = np.int64(layer * cache.num_chunks * Hkv)
            self._k["block_score_varlen"](
                (len(lay.row_blocks), Hq), (THREADS,),
                (q, self.means.kmean_lp, page0, d["blocks"], d["seq_info"], np.int32(plan.batch_size),
                 d["row_blocks"], np.int32(Hq), np.int32(Hkv), np.float32(scale * 1.4426950408889634), d["s_raw"]))
        return alpha

    def run(self, q, layer: int = 0, *, scale: float | None = None, out=None, lse_out=None):
        import cupy

        cache = self.cache
        plan = reference.check_prefill_plan(cache, self.prefill_plan)
        q = as_cupy(q, "q", cache.dtype)
        reference.check_packed_q(cache, plan, q)
        layer = cache.check_layer(layer)
        scale = check_scale(scale, cache.head_dim)
        N, Hq, D = q.shape
        out = cupy.empty((N, Hq, D), q.dtype) if out is None else as_cupy(out, "out", cache.dtype, (N, Hq, D))
        if lse_out is None:
            lse_out = cupy.empty((N, Hq), np.float32)
        else:
            lse_out = as_cupy(lse_out, "lse_out", None, (N, Hq))
            if lse_out.dtype != np.float32:
                raise TypeError(f"lse_out: expected dtype float32, got {lse_out.dtype}")
        d, lay = self._d, self._d["lay"]
        c, Hkv, B, R = cache.chunk_size, cache.num_kv_heads, plan.batch_size, plan.num_tables
        G, s = Hq // Hkv, plan.group_size
        opt = plan.options
        page0 = np.int64(layer * cache.num_chunks * Hkv)
        scale_log2 = np.float32(scale * 1.4426950408889634)
        thr = self._scores(plan, q, layer, scale)
        d["stats"].fill(0)
        self._k["block_union_varlen"](
            (R,), (UNION_THREADS,),
            (d["s_raw"], d["seq_info"], np.int32(B), d["table_seq"], np.int32(Hkv), np.int32(G), np.int32(s),
             np.float32(thr), np.int32(opt["sink"]), np.int32(opt["window"]), d["blocks"], d["padded"],
             np.int32(lay.cap), d["counts"], d["stats"]),
            shared_mem=4 * s * lay.max_tile_blocks)
        self._k["tables_csr"]((R,), (THREADS,), (d["padded"], np.int32(lay.cap), d["counts"], np.int32(R), d["indptr"],
                                                d["indices"]))
        d["pk"]((len(lay.units),), (WG_THREADS if d["wg"] else THREADS,),
                (q, cache.k_pool, cache.v_pool, page0, d["units"], d["indptr"], d["indices"], d["seq_info"],
                 np.int32(B), d["table_seq"], np.int32(Hq), np.int32(Hkv), np.int32(G), np.int32(s), scale_log2,
                 out, lse_out, np.int32(1)),
                shared_mem=d["smem"])
        self._ran = True
        return out, lse_out

    def density(self) -> list:
        """Per sequence of the last run: select, q_union, group_union, tables (as
        ``CompactPrefill.density``). Synchronises."""
        plan = self._last_plan()
        c, Hkv, Hq = self.cache.chunk_size, self.cache.num_kv_heads, plan.num_q_heads
        S = Hq // Hkv // plan.group_size
        indptr = self._d["indptr"].get().astype(np.int64)
        stats = self._d["stats"].get().astype(np.float64).reshape(-1, 3)
        out = []
        for b in range(plan.batch_size):
            n, Pb, qt = int(plan.chunk_lens[b]), int(plan.past_lens[b]) // c, int(plan.q_tiles[b])
            t0, t1 = int(plan.table_indptr[b]), int(plan.table_indptr[b + 1])
            T, Qb = cdiv(n, qt), cdiv(n, c)
            own = sum(cdiv(min(n, (t + 1) * qt), c) for t in range(T))
            tables = float(indptr[t1] - indptr[t0]) / (Pb * (t1 - t0) + own * Hkv * S)
            if Pb == 0:
                out.append(dict(select=1.0, q_union=1.0, group_union=1.0, tables=tables))
                continue
            v = stats[b] / (Hq * Qb * Pb)
            out.append(dict(select=float(v[0]), q_union=float(v[1]), group_union=float(v[2]), tables=tables))
        return out

    def tables(self) -> tuple:
        """(indptr int32 [R + 1], indices int32 [nnz]) of the last run on the host (syncs)."""
        self._last_plan()
        indptr = self._d["indptr"].get()
        return indptr, self._d["indices"][: int(indptr[-1])].get()

    def _last_plan(self):
        if self.prefill_plan is None or not self._ran:
            raise ValueError("run: expected a run of the current plan before reading its tables or density, got none")
        return self.prefill_plan


__all__ = ["BlockMeans", "BatchedPrefill", "BatchedLayout", "batched_layout", "CompactPrefill", "compact_prefill", "dense_prefill", "choose_kernel", "use_wgmma",
           "KERNEL_CHOICES", "estimate_mass", "recall_choice", "recall_choice_sums", "table_sums", "sampled_table_sums",
           "sampled_row_mass", "row_floor_choice",
           "choice_scores", "sequence_scores", "sequence_keys", "sample_weights",
           "sampled_mass_grid", "sampled_block_mass", "mass_from_partials"]
