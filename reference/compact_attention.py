"""CompactAttention chunked prefill in NumPy: block-union KV selection over the chunk tree.

A prompt is prefilled chunk by chunk. A sequence has ``P`` cached tokens (a multiple of the
chunk size ``c``); the next prompt chunk of ``n >= 1`` tokens has had its K/V written into the
cache, so the chunk is the sequence's last ``n`` tokens. Its queries ``q [n, Hq, D]`` attend to
the ``P`` past tokens and to the chunk's tokens causally (docs/design.md, "CompactAttention chunked
prefill"). The block size is the chunk size, ``b = c``, so a KV block *is* a pool page.

Vocabulary and sizes::

    c   chunk size = block size          G   Hq // Hkv, query heads per kv head (GQA group)
    Pb  P // c past blocks (all full)    s   group_size, query heads per sub-group; S = G // s
    Cb  ceil(n / c) own blocks           q_tile  query rows per tile (multiple of c); T tiles
    Qb  ceil(n / c) query blocks         table   one CSR row per (tile, kv head, sub-group)

The passes, written as the GPU runs them (each is one function below)::

    1. summarise  BlockMeans.update     kmean[layer, chunk] = mean of the page's c keys  [Hkv, D] f32
    2. score      select_blocks         z[h,r,j] = scale * q[r,h] . kmean[j, h//G]        [Hq, n, Pb]
                                        s[h,i,j] = sum_{r in query block i} exp(z - max_j z),
                                                   normalised over j                       [Hq, Qb, Pb]
    3. select                           keep[h,i,j] = s >= alpha * max_j s
                                                      or j < sink or j >= Pb - window      [Hq, Qb, Pb]
       (or, with recall=..., per table: blocks by estimated mass until the estimate reaches the
        target, ``estimated_mass`` + ``recall_rule``, and with row_floor=... also until every
        sampled row's estimate reaches the floor, ``sampled_row_mass`` + ``row_floor_rule``;
        docs/design.md, "Selection on real attention")
    4. Q-union                          OR over the query blocks of a tile               [Hq, T, Pb]
    5. group union                      OR over the query heads of a sub-group           [T, Hkv, S, Pb]
    6. tables     build_block_tables    per table: kept past pool ids ascending in token
                                        order, then the chunk's own blocks up to the tile end (CSR)
    7. execute    sparse_prefill        per table: state over past pages (no mask) merged with
                                        the state over own pages (bottom-right causal mask)

``compact_prefill`` runs 2-7 for one chunk and layer and returns a ``CompactPrefill`` (``o`` in
the storage dtype, ``lse`` float32, as the GPU backend returns them); ``dense_prefill`` is the same
call with every block kept (alpha 0), our dense chunked prefill; ``chunked_prefill`` drives a
whole prompt (write K/V, attend, commit, summarise). ``oracle_prefill`` is the float64 oracle;
``attention_mass``, ``mass_recall``, ``relative_error`` and ``needle_recall`` are the metrics.
``cpattn.compact_attention`` has the same ``BlockMeans``, ``compact_prefill``, ``dense_prefill``
and ``CompactPrefill`` on the GPU (docs/design.md, "One API for both backends").

Why the own blocks go last: a paged prefill kernel's causal mask is bottom-right aligned. With
every own block of the tile present and last in the list, compacted key position
``len(keys) - rows + r`` of tile row ``r`` is exactly that row's own token, so the bottom-right
mask reproduces causality inside the chunk and never touches a past block.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .checks import INT32_MAX, cdiv, check_bool, check_choice, check_ids, check_instance, check_int, \
    check_scale, is_int, is_real
from .chunk_attention import attention_state, merge_states
from .chunk_cache import CacheError, ChunkCache, check_cache
from .dtypes import as_numpy, storage_numpy_dtype, storage_view, to_float32, to_storage

_I32 = np.int32
KERNEL_CHOICES = ("auto", "wgmma", "mma")  # compact_prefill(kernel=...): the GPU's attention kernels



# ============================================================================ 1. block means
class BlockMeans:
    """Mean key of every summarised pool page, per layer and kv head: the selector's view of
    the past. Lives next to the cache; the GPU backend keeps the same array on the device.

    Arrays:
        kmean: float32 [num_layers, num_chunks, Hkv, D]; ``kmean[l, chunk, h]`` is the mean of
            the ``c`` keys of kv head ``h`` in pool page ``chunk`` (summed in float64, rounded
            once to float32, so every backend can match it to an ulp).

    A page is summarised once, when it is full and committed; a page shared by several
    sequences (a reused prefix) is summarised once for all of them. Entries are keyed by pool
    chunk id *and* the tree node that owned the page when it was summarised, so a page that was
    evicted and reused for other tokens is summarised again, never read stale.

    ``kmean`` (optional): the zeroed float32 array to keep the means in; the GPU backend passes
    device memory and overrides ``summarise``. Users call ``BlockMeans(cache)``.
    """

    def __init__(self, cache: ChunkCache, kmean=None):
        self.cache = check_cache(cache)
        self.chunk_size = cache.chunk_size
        shape = (cache.num_layers, cache.num_chunks, cache.num_kv_heads, cache.head_dim)
        self.kmean = np.zeros(shape, np.float32) if kmean is None else kmean
        if tuple(self.kmean.shape) != shape or self.kmean.dtype != np.float32:
            raise ValueError(f"kmean: expected a float32 array of shape {shape}, got {self.kmean.dtype} "
                             f"{tuple(self.kmean.shape)}")
        self._owner: list = [None] * cache.num_chunks  # tree Node summarised in each page

    def check_num_blocks(self, cache: ChunkCache, seq: int, num_blocks) -> int:
        """``num_blocks`` as an int in [0, pages of ``seq``]."""
        return check_int(num_blocks, "num_blocks", 0, len(cache.sequence(seq).path) + 1)

    def check_cache(self, cache) -> None:
        """Raise ``ValueError`` unless ``cache`` is the cache these means were made for (TypeError
        when it is no cache at all)."""
        if check_cache(cache) is not self.cache:
            raise ValueError("cache: expected the cache these block means were made for "
                             f"(id {id(self.cache):#x}), got another one (id {id(cache):#x})")

    def update(self, cache: ChunkCache, seq: int, num_tokens: int | None = None) -> int:
        """Summarise every full page among the sequence's first ``num_tokens`` tokens (default:
        all its committed tokens) that is not summarised yet. Returns how many were computed.

        Only committed tokens count: a reserved chunk may still be missing K/V of later layers.
        """
        self.check_cache(cache)
        state = cache.sequence(seq)
        committed = state.n_committed
        upto = committed if num_tokens is None else check_int(num_tokens, "num_tokens")
        if not 0 <= upto <= committed:
            raise ValueError(f"num_tokens: expected an integer in [0, {committed}] (committed tokens "
                             f"of sequence {seq}), got {num_tokens!r}")
        # every node but a path's tail is full
        todo = [n for n in state.path[: upto // self.chunk_size] if self._owner[n.chunk] is not n]
        if todo:
            self.summarise(cache, [n.chunk for n in todo])
        for n in todo:
            self._owner[n.chunk] = n
        return len(todo)

    def summarise(self, cache: ChunkCache, chunks: list) -> None:
        """kmean[:, chunk] for every listed pool chunk (all layers); ``update`` decides which.
        The GPU backend launches one kernel instead."""
        for ch in chunks:
            k = to_float32(as_numpy(cache.k_pool[:, ch]), cache.dtype)  # [L, Hkv, c, D]
            self.kmean[:, ch] = k.astype(np.float64).mean(axis=2).astype(np.float32)

    def is_current(self, cache: ChunkCache, seq: int, num_blocks: int) -> bool:
        """True when the sequence's first ``num_blocks`` pages are all summarised."""
        self.check_cache(cache)
        self.check_num_blocks(cache, seq, num_blocks)
        return all(self._owner[n.chunk] is n for n in cache.sequence(seq).path[:num_blocks])

    def gather(self, cache: ChunkCache, seq: int, layer: int, num_blocks: int):
        """kmean of the sequence's first ``num_blocks`` pages: float32 [num_blocks, Hkv, D]."""
        self.check_cache(cache)
        layer = cache.check_layer(layer)
        if not self.is_current(cache, seq, num_blocks):
            raise CacheError(f"means: the first {num_blocks} blocks of sequence {seq} are not all "
                             f"summarised; call means.update(cache, seq) after each commit")
        ids = np.array(cache.seq_chunks(seq)[:num_blocks], np.int64)
        return self.kmean[layer, ids]


# ============================================================================ argument checks
def check_chunk(cache: ChunkCache, seq: int, q, layer: int):
    """Check one prefill call's chunk; returns (P, n, G). The chunk is the sequence's last n
    tokens, so ``P = seq_len - n`` must be a multiple of the chunk size. Both backends use it
    (``q`` may be a NumPy or a CuPy array)."""
    length = check_cache(cache).seq_len(seq)  # unknown or released sequence -> CacheError
    cache.check_layer(layer)
    want = storage_numpy_dtype(cache.dtype)
    if not hasattr(q, "shape") or not hasattr(q, "dtype"):
        raise TypeError(f"q: expected an array [n, num_q_heads, head_dim], got {type(q).__name__}")
    if q.ndim != 3:
        raise ValueError(f"q: expected an array [n, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    n, hq, d = q.shape
    if np.dtype(q.dtype) != np.dtype(want):
        raise TypeError(f"q: expected dtype {np.dtype(want).name} for {cache.dtype} storage, got {q.dtype}")
    if d != cache.head_dim:
        raise ValueError(f"q: expected head_dim {cache.head_dim}, got {d}")
    if hq == 0 or hq % cache.num_kv_heads:
        raise ValueError(f"q: expected num_q_heads a positive multiple of num_kv_heads "
                         f"{cache.num_kv_heads}, got {hq}")
    if n < 1:
        raise ValueError("q: expected at least one query row (n >= 1), got 0")
    if n > length:
        raise ValueError(f"q: expected at most {length} rows (the chunk is the last n tokens of "
                         f"sequence {seq}, which has {length}), got n = {n}")
    P = length - n
    if P % cache.chunk_size:
        raise ValueError(f"q: expected the chunk to start at a multiple of chunk_size "
                         f"{cache.chunk_size} (P = seq_len - n cached tokens before it), got "
                         f"P = {P} (seq_len {length}, n {n})")
    committed = cache.sequence(seq).n_committed
    if P > committed:  # the past must be committed: its pages are summarised and read as keys
        raise ValueError(f"q: expected the chunk to cover every uncommitted token of sequence {seq} "
                         f"(P = {P} past tokens, {committed} committed), got n = {n}; commit the "
                         f"earlier chunk first")
    return P, n, hq // cache.num_kv_heads


DEFAULT_ALPHA = 0.06  # the alpha rule's default threshold
SUMMARIES = ("auto", "mean", "sampled")  # select_blocks(summary=...): how the past is estimated
DEFAULT_SAMPLE_ROWS = 2  # rows per query block scored exactly by summary="sampled"


def check_options(c: int, n: int, G: int, alpha, sink, window, q_tile, group_size, recall=None):
    """Check the selection options of a chunk of ``n`` rows, chunk size ``c``, GQA group ``G``;
    returns (q_tile in rows, group_size) with the defaults filled in.

    Exactly one rule is active: ``recall`` None selects by ``alpha`` (a number in [0, 1]);
    a ``recall`` in [0, 1] selects by the recall target, and ``alpha`` must then be None or
    left at its default."""
    if recall is None:
        if not is_real(alpha):
            raise TypeError(f"alpha: expected a number in [0, 1], got {alpha!r} ({type(alpha).__name__})")
        if not 0.0 <= float(alpha) <= 1.0:  # NaN fails the comparison too
            raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    else:
        if not is_real(recall):
            raise TypeError(f"recall: expected None or a number in [0, 1], got {recall!r} "
                            f"({type(recall).__name__})")
        if not 0.0 <= float(recall) <= 1.0:
            raise ValueError(f"recall: expected None or a number in [0, 1], got {recall!r}")
        if alpha is not None and not (is_real(alpha) and float(alpha) == DEFAULT_ALPHA):
            raise ValueError(f"alpha: expected None (or its default {DEFAULT_ALPHA}) with recall={recall!r}: "
                             f"one selection rule at a time, got alpha={alpha!r}")
    for name, value in (("sink", sink), ("window", window)):
        if check_int(value, name, 0) >= INT32_MAX:  # int32 kernel arguments
            raise ValueError(f"{name}: expected an integer >= 0 and < 2**31, got {value}")
    if q_tile is None:
        q_tile = cdiv(n, c) * c  # the whole chunk
    elif check_int(q_tile, "q_tile", hi=INT32_MAX) < c or q_tile % c:
        raise ValueError(f"q_tile: expected None or a positive multiple of chunk_size {c} (query "
                         f"rows per tile), got {q_tile!r}")
    if group_size is None:
        group_size = G
    elif check_int(group_size, "group_size", hi=INT32_MAX) < 1 or G % group_size:
        raise ValueError(f"group_size: expected None or a divisor of the GQA group size {G} "
                         f"(query heads per sub-group), got {group_size!r}")
    return int(q_tile), int(group_size)


def check_summary(summary, sample_rows, recall) -> str:
    """The past's summary a selection uses: 'mean' (block mean keys) or 'sampled' (exact scores
    of ``sample_rows`` rows per query block); 'auto' is 'mean' for the alpha rule and 'sampled'
    for the recall rule (docs/design.md, "Selection on real attention")."""
    check_choice(summary, "summary", SUMMARIES)
    if check_int(sample_rows, "sample_rows", hi=INT32_MAX) < 1:
        raise ValueError(f"sample_rows: expected an integer >= 1 (rows per query block scored exactly), "
                         f"got {sample_rows!r}")
    if summary == "auto":
        return "mean" if recall is None else "sampled"
    return summary


def check_row_floor(row_floor, recall, summary: str) -> float | None:
    """The recall rule's per-row floor: None (off) or a number in [0, 1], every sampled row's
    estimated recall (``row_floor_rule``). An option of the recall rule on the sampled summary:
    ``recall`` must be a target and ``summary`` (resolved by ``check_summary``) 'sampled'."""
    if row_floor is None:
        return None
    if not is_real(row_floor):
        raise TypeError(f"row_floor: expected None or a number in [0, 1], got {row_floor!r} "
                        f"({type(row_floor).__name__})")
    if not 0.0 <= float(row_floor) <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"row_floor: expected None or a number in [0, 1], got {row_floor!r}")
    if recall is None:
        raise ValueError(f"row_floor: expected None with recall=None (a floor of the recall rule), "
                         f"got {row_floor!r}")
    if summary != "sampled":
        raise ValueError(f"row_floor: expected None with summary={summary!r} (the floor holds on the sampled "
                         f"rows of summary='sampled'), got {row_floor!r}")
    return float(row_floor)


def check_means(means, cache) -> None:
    """``means``: a ``BlockMeans`` made for ``cache`` (TypeError for anything else, ValueError for
    the means of another cache)."""
    check_instance(means, "means", BlockMeans, "BlockMeans(cache)")
    means.check_cache(cache)


def check_events(events) -> None:
    """``events``: None or a list that receives (stage name, mark) pairs."""
    if events is not None and not isinstance(events, list):
        raise TypeError(f"events: expected None or a list, got {type(events).__name__}")


# ============================================================================ 2-5. selection
def block_scores(q: np.ndarray, kmean: np.ndarray, chunk_size: int, scale: float) -> np.ndarray:
    """FlashPrefill-style block scores of one chunk against the past blocks.

    Args:
        q: float32 [n, Hq, D] query values of the chunk.
        kmean: float32 [Pb, Hkv, D] mean key of every past block.
    Returns:
        s: float32 [Hq, Qb, Pb], each (h, i) row normalised to sum 1 over j (empty when Pb = 0).
    """
    n, Hq, D = q.shape
    Pb, Hkv, _ = kmean.shape
    Qb = cdiv(n, chunk_size)
    if Pb == 0:
        return np.zeros((Hq, Qb, 0), np.float32)
    km = kmean[:, np.arange(Hq) // (Hq // Hkv)]  # [Pb, Hq, D], each query head's kv head
    z = np.einsum("nhd,jhd->hnj", q, km).astype(np.float32) * np.float32(scale)  # [Hq, n, Pb]
    e = np.exp(z - z.max(axis=2, keepdims=True))  # each row's best block contributes 1
    s = np.add.reduceat(e, np.arange(0, n, chunk_size), axis=1)  # [Hq, Qb, Pb] sum over block rows
    return s / s.sum(axis=2, keepdims=True)


def sampled_rows(n: int, chunk_size: int, rows: int, last_block: bool = False) -> np.ndarray:
    """Chunk rows scored exactly by summary="sampled": ``rows`` rows evenly spaced over each
    query block, its first and last row included (fewer in a block that has fewer), and with
    ``last_block`` every row of the chunk's last query block (the rule's ``row_floor`` asks for
    it: the rows that give the next token when the chunk ends a prompt). int64, ascending."""
    out = []
    for a in range(0, n, chunk_size):
        m = min(chunk_size, n - a)
        take = m if last_block and a + m == n else min(rows, m)
        out.append(a + np.unique(np.round(np.linspace(0, m - 1, take)).astype(np.int64)))
    return np.concatenate(out)


def estimated_mass(q: np.ndarray, k: np.ndarray, kmean: np.ndarray, chunk_size: int, scale: float,
                   summary: str = "mean", sample_rows: int = DEFAULT_SAMPLE_ROWS):
    """Estimated attention mass of each query block on each past block and on its own chunk.

    Args:
        q: float32 [n, Hq, D] the chunk's queries; k: float32 [P + n, Hkv, D] every key of the
            sequence up to the chunk's end; kmean: float32 [Pb, Hkv, D] the past blocks' means.
        summary: 'mean': each row's softmax over blocks, a block standing for its ``c`` keys at
            its mean key (log c + scale q . kmean); the chunk's own blocks before the row's
            block likewise (their means computed here), the row's own block exactly (causal).
            'sampled': the exact softmax of ``sample_rows`` rows per query block (``sampled_rows``)
            over every key they see, each query block's rows taken to spread as its samples do.
    Returns:
        past float64 [Hq, Qb, Pb], own float64 [Hq, Qb]: summed over the query block's rows, so
        past.sum(axis=2) + own is the number of rows of each query block.
    """
    n, Hq, D = q.shape
    Pb, Hkv = kmean.shape[0], k.shape[1]
    c, G = chunk_size, Hq // Hkv
    P = Pb * c
    Qb = cdiv(n, c)
    past = np.zeros((Hq, Qb, Pb))
    own = np.zeros((Hq, Qb))
    rows_in = np.minimum(c, n - np.arange(Qb) * c)  # rows per query block
    qblock = np.arange(n) // c
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    if summary == "sampled":
        sel, row_past, row_own = sampled_row_mass(q, k, kmean, chunk_size, scale, sample_rows)
        weight = rows_in[qblock[sel]] / np.bincount(qblock[sel], minlength=Qb)[qblock[sel]]  # rows per sample
        for h in range(Hq):
            np.add.at(past[h], qblock[sel], row_past[h] * weight[:, None])
            np.add.at(own[h], qblock[sel], row_own[h] * weight)
        return past, own
    own_k = k64[P:]  # [n, Hkv, D]
    own_mean = np.stack([own_k[a:a + c].mean(axis=0) for a in range(0, n, c)])  # [Qb, Hkv, D]
    km = kmean.astype(np.float64)
    log_c = np.log(c)
    for h in range(Hq):
        g = h // G
        zp = (q64[:, h] @ km[:, g].T) * scale + log_c  # [n, Pb]
        zo = (q64[:, h] @ own_mean[:, g].T) * scale + log_c  # [n, Qb]; blocks before the row's only
        zo[np.arange(Qb)[None, :] >= qblock[:, None]] = -np.inf
        zd = np.empty(n)  # the row's own block, exactly
        for i in range(Qb):
            r = slice(i * c, i * c + rows_in[i])
            s = (q64[r, h] @ own_k[r, g].T) * scale  # [rows, rows]
            s[np.arange(rows_in[i])[None, :] > np.arange(rows_in[i])[:, None]] = -np.inf
            m = s.max(axis=1)
            zd[r] = m + np.log(np.exp(s - m[:, None]).sum(axis=1))
        m = np.maximum(np.max(zp, axis=1, initial=-np.inf), np.maximum(zo.max(axis=1), zd))
        ep, eo = np.exp(zp - m[:, None]), np.exp(zo - m[:, None]).sum(axis=1) + np.exp(zd - m)
        tot = ep.sum(axis=1) + eo
        np.add.at(past[h], qblock, ep / tot[:, None])
        np.add.at(own[h], qblock, eo / tot)
    return past, own


def sampled_row_mass(q: np.ndarray, k: np.ndarray, kmean: np.ndarray, chunk_size: int, scale: float,
                     sample_rows: int = DEFAULT_SAMPLE_ROWS, last_block: bool = False):
    """Each sampled row's exact attention mass on every past block and on the chunk: what
    summary='sampled' measures, before ``estimated_mass`` spreads it over the query blocks.

    Args: as ``estimated_mass`` (``kmean`` only gives the number of past blocks).
    Returns: rows int64 [m] (``sampled_rows``: chunk row of each sample), past float64
        [Hq, m, Pb] and own float64 [Hq, m], each row's softmax over every key it sees
        (keys 0 .. P + row), summed per past block and over the chunk: past.sum(axis=2) + own = 1.
    """
    n, Hq, D = q.shape
    Pb, Hkv = kmean.shape[0], k.shape[1]
    c, G = chunk_size, Hq // Hkv
    P = Pb * c
    sel = sampled_rows(n, c, sample_rows, last_block)
    m = len(sel)
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    past = np.zeros((Hq, m, Pb))
    own = np.zeros((Hq, m))
    seen = P + sel  # row sel sees keys 0 .. P + sel
    for h in range(Hq):
        z = (q64[sel, h] @ k64[:, h // G].T) * scale  # [m, P + n]
        z[np.arange(P + n)[None, :] > seen[:, None]] = -np.inf
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        past[h] = p[:, :P].reshape(m, Pb, c).sum(axis=2) if Pb else np.zeros((m, 0))
        own[h] = p[:, P:].sum(axis=1)
    return sel, past, own


def recall_rule(past: np.ndarray, own: np.ndarray, rows_in: np.ndarray, forced: np.ndarray, recall: float,
                num_kv_heads: int, group_size: int, tile_blocks: int) -> np.ndarray:
    """The recall-target rule: per table (tile, kv head, sub-group), past blocks in decreasing
    order of estimated mass (summed over the table's heads and rows; ties: the earlier block)
    until the estimated kept mass, own chunk and forced blocks counted in, reaches ``recall``
    of the table's rows. ``recall`` 1 takes every block (dense), estimated mass 0 included.

    Args: past float64 [Hq, Qb, Pb], own [Hq, Qb] (``estimated_mass``), rows_in int [Qb] rows
        per query block, forced bool [Pb].
    Returns: bool [T, Hkv, S, Pb], the blocks chosen (forced ones not included).
    """
    Hq, Qb, Pb = past.shape
    s, tb = group_size, tile_blocks
    S, T = Hq // num_kv_heads // s, cdiv(Qb, tb)
    pad = np.zeros((Hq, T * tb, Pb))
    pad[:, :Qb] = past
    E = pad.reshape(num_kv_heads, S, s, T, tb, Pb).sum(axis=(2, 4)).transpose(2, 0, 1, 3)  # [T, Hkv, S, Pb]
    padded_own = np.zeros((Hq, T * tb))
    padded_own[:, :Qb] = own
    base = padded_own.reshape(num_kv_heads, S, s, T, tb).sum(axis=(2, 4)).transpose(2, 0, 1)  # [T, Hkv, S]
    base = base + E[..., forced].sum(axis=3)
    rows = np.add.reduceat(rows_in, np.arange(0, Qb, tb)) * s  # [T] rows of each table
    gain = np.where(forced, 0.0, E)
    order = np.argsort(-np.where(forced, -1.0, gain), axis=3, kind="stable")
    g_sorted = np.take_along_axis(gain, order, axis=3)
    before = base[..., None] + np.cumsum(g_sorted, axis=3) - g_sorted  # kept estimate before each
    take = (before < recall * rows[:, None, None, None]) | (recall >= 1.0)  # 1: every block, even at 0
    take &= ~forced[order]
    chosen = np.zeros_like(take)
    np.put_along_axis(chosen, order, take, axis=3)
    return chosen


def row_floor_rule(row_past: np.ndarray, row_own: np.ndarray, row_block: np.ndarray, forced: np.ndarray,
                   floor: float, num_kv_heads: int, group_size: int, tile_blocks: int) -> np.ndarray:
    """The recall rule's per-row floor: per table, the union over the table's sampled rows (of
    each of its query heads) of each row's own minimal set, that row's past blocks in decreasing
    order of its estimated mass (ties: the earlier block) until its kept mass, own chunk and
    forced blocks counted in, reaches ``floor`` (the row's estimated recall; 1 for the whole
    row). ``floor`` 1 takes every block. The pooled target (``recall_rule``) keeps the table's
    mass; the floor keeps, besides, a block that matters to one row only.

    Args: row_past float64 [Hq, m, Pb], row_own [Hq, m] (``sampled_row_mass``), row_block int
        [m] the query block of each sampled row, forced bool [Pb].
    Returns: bool [T, Hkv, S, Pb], the blocks the floor needs (forced ones not included).
    """
    Hq, m, Pb = row_past.shape
    s, tb = group_size, tile_blocks
    S = Hq // num_kv_heads // s
    T = cdiv(int(row_block.max()) + 1, tb) if m else 0
    # each sampled row's minimal set, exactly as recall_rule orders and cuts a table
    base = row_own + row_past[..., forced].sum(axis=2)  # [Hq, m] own chunk and forced blocks
    gain = np.where(forced, 0.0, row_past)
    order = np.argsort(-np.where(forced, -1.0, gain), axis=2, kind="stable")
    g_sorted = np.take_along_axis(gain, order, axis=2)
    before = base[..., None] + np.cumsum(g_sorted, axis=2) - g_sorted  # the row's kept estimate before each
    take = (before < floor) | (floor >= 1.0)
    take &= ~forced[order]
    mine = np.zeros_like(take)
    np.put_along_axis(mine, order, take, axis=2)  # [Hq, m, Pb] in block order
    # the union over each table's rows: the sampled rows of its tile, the query heads of its sub-group
    chosen = np.zeros((T, num_kv_heads, S, Pb), bool)
    tile = np.asarray(row_block) // tb
    for t in range(T):
        per_head = mine[:, tile == t].any(axis=1)  # [Hq, Pb]
        chosen[t] = per_head.reshape(num_kv_heads, S, s, Pb).any(axis=2)
    return chosen


@dataclass(frozen=True)
class BlockSelection:
    """What the selector kept, stage by stage (the input of ``build_block_tables``).

    Arrays (bool unless said):
        scores      float32 [Hq, Qb, Pb]  normalised block scores (pass 2); under the recall rule
                                   the estimated mass share per row (with the own chunk's, 1)
        selected    [Hq, Qb, Pb]   kept by the score rule alone (the recall rule decides per
                                   table: its choice repeated over the table's heads and blocks)
        forced      [Pb]           sink and window blocks, kept for every (head, query block)
        keep        [Hq, Qb, Pb]   selected | forced: the per-(head, query block) selection
        q_union     [Hq, T, Pb]    OR over the query blocks of each tile
        group_union [T, Hkv, S, Pb]  OR over the query heads of each sub-group
    ``density`` maps each stage to the fraction of (query head, query block, past block)
    triples whose past block is read at that stage (1.0 when there is no past).
    """

    seq: int
    version: int
    chunk_size: int
    past_len: int  # P
    chunk_len: int  # n
    num_q_heads: int
    num_kv_heads: int
    group_size: int  # s
    q_tile: int  # query rows per tile
    alpha: float | None  # None under the recall rule
    sink: int
    window: int
    scores: np.ndarray
    selected: np.ndarray
    forced: np.ndarray
    keep: np.ndarray
    q_union: np.ndarray
    group_union: np.ndarray
    density: dict = field(default_factory=dict)
    recall: float | None = None  # the recall target (None: the alpha rule)
    summary: str = "mean"  # 'mean' or 'sampled' (check_summary)
    sample_rows: int = DEFAULT_SAMPLE_ROWS
    row_floor: float | None = None  # the recall rule's per-row floor (None: off)

    @property
    def num_tiles(self) -> int:
        return self.q_union.shape[1]


def select_blocks(cache: ChunkCache, means: BlockMeans, seq: int, q, layer: int = 0, *,
                  scale: float | None = None, alpha: float | None = DEFAULT_ALPHA, sink: int = 2, window: int = 4,
                  q_tile: int | None = None, group_size: int | None = None, recall: float | None = None,
                  summary: str = "auto", sample_rows: int = DEFAULT_SAMPLE_ROWS,
                  row_floor: float | None = None) -> BlockSelection:
    """Passes 2-5: score the past blocks for the chunk and take the two unions.

    Args:
        q: [n, Hq, D] storage dtype, the queries of the sequence's last n tokens (the chunk).
        alpha: keep a block when its score is at least alpha times the row's best (0 keeps all).
        sink, window: the first ``sink`` and last ``window`` past blocks are always kept.
        q_tile: query rows per tile of the Q-block union (None: the whole chunk).
        group_size: query heads per sub-group of the group union (None: the whole GQA group).
        recall: instead of alpha, the recall-target rule (``recall_rule``): per table, blocks by
            estimated mass until the estimate reaches ``recall``; alpha then None or its default.
        summary: 'mean', 'sampled' or 'auto' ('mean' for alpha, 'sampled' for recall): how the
            past is estimated (``estimated_mass``); the alpha rule with 'mean' is ``block_scores``.
        sample_rows: rows per query block that summary='sampled' scores exactly.
        row_floor: None, or with the recall rule on summary='sampled' a number in [0, 1]: besides
            the pooled target, every sampled row's estimated recall reaches ``row_floor`` (each
            table also keeps the union of its sampled rows' minimal sets, ``row_floor_rule``),
            and so does every row of the chunk's last query block (the rows that give the next
            token when the chunk ends a prompt: ``sampled_rows(last_block=True)``); the pooled
            estimate stays on the ``sample_rows`` samples.
    Past pages not yet summarised (e.g. a freshly matched prefix) are summarised first.
    """
    q = storage_view(q)
    P, n, G = check_chunk(cache, seq, q, layer)
    scale = check_scale(scale, cache.head_dim)
    c, Hkv = cache.chunk_size, cache.num_kv_heads
    q_tile, s = check_options(c, n, G, alpha, sink, window, q_tile, group_size, recall)
    summary = check_summary(summary, sample_rows, recall)
    row_floor = check_row_floor(row_floor, recall, summary)
    check_means(means, cache)
    Pb, Qb, Hq = P // c, cdiv(n, c), q.shape[1]
    means.update(cache, seq, num_tokens=P)  # checks done: past pages are committed
    j = np.arange(Pb)
    forced = (j < sink) | (j >= Pb - window)  # [Pb]
    tb = q_tile // c
    T = cdiv(Qb, tb)

    # 2. scores [Hq, Qb, Pb]
    kmean = means.gather(cache, seq, layer, Pb)  # [Pb, Hkv, D] float32
    qf = to_float32(np.asarray(q), cache.dtype)
    if Pb and (recall is not None or summary == "sampled"):
        k_all = to_float32(as_numpy(cache.read_kv(seq, layer)[0]), cache.dtype)  # [P + n, Hkv, D]
        est_past, est_own = estimated_mass(qf, k_all, kmean, c, scale, summary, sample_rows)
        rows_in = np.minimum(c, n - np.arange(Qb) * c)
        scores = (est_past / rows_in[None, :, None]).astype(np.float32)
    else:
        scores = block_scores(qf, kmean, c, scale)

    # 3. the rule: threshold relative to the (head, query block)'s best block, or the recall
    # target per table; then the forced blocks
    if not Pb:
        selected = np.zeros((Hq, Qb, 0), bool)
    elif recall is None:
        if summary == "sampled":  # normalise the estimate over the past blocks, as block_scores is
            tot = scores.sum(axis=2, keepdims=True)
            scores = np.where(tot > 0, scores / np.where(tot > 0, tot, 1), 0).astype(np.float32)
        selected = scores >= np.float32(alpha) * scores.max(axis=2, keepdims=True)
    else:
        chosen = recall_rule(est_past, est_own, rows_in, forced, float(recall), Hkv, s, tb)  # [T, Hkv, S, Pb]
        if row_floor is not None:  # and the own minimal set at the floor of every sampled row, and of
            # every row of the last query block (the rows that give the next token when the chunk ends a prompt)
            rows, row_past, row_own = sampled_row_mass(qf, k_all, kmean, c, scale, sample_rows, last_block=True)
            chosen |= row_floor_rule(row_past, row_own, rows // c, forced, row_floor, Hkv, s, tb)
        per_head = chosen.transpose(1, 2, 0, 3)[:, :, None].repeat(s, axis=2).reshape(Hq, T, Pb)
        selected = per_head[:, np.arange(Qb) // tb]
    keep = selected | forced

    # 4. Q-block union over each tile of tb query blocks: [Hq, Qb, Pb] -> [Hq, T, Pb]
    q_union = np.logical_or.reduceat(keep, np.arange(0, Qb, tb), axis=1) if Pb else np.zeros((Hq, T, 0), bool)

    # 5. group union over the s query heads of each sub-group: [Hq, T, Pb] -> [T, Hkv, S, Pb]
    S = G // s
    group_union = q_union.reshape(Hkv, S, s, T, Pb).any(axis=2).transpose(2, 0, 1, 3)

    # density per stage, counted per (query head, query block, past block)
    tile_of_block = np.arange(Qb) // tb
    head_sub = np.arange(Hq) // s  # sub-group index over all heads = h * S + g
    gu = group_union.transpose(1, 2, 0, 3).reshape(Hkv * S, T, Pb)
    stages = dict(select=keep, q_union=q_union[:, tile_of_block], group_union=gu[head_sub][:, tile_of_block])
    density = {k: float(v.mean()) if Pb else 1.0 for k, v in stages.items()}
    return BlockSelection(seq=int(seq), version=cache.version, chunk_size=c, past_len=P, chunk_len=n,
                          num_q_heads=Hq, num_kv_heads=Hkv, group_size=s, q_tile=q_tile,
                          alpha=None if recall is not None else float(alpha), sink=int(sink),
                          window=int(window), scores=scores, selected=selected, forced=forced, keep=keep,
                          q_union=q_union, group_union=group_union, density=density,
                          recall=None if recall is None else float(recall), summary=summary,
                          sample_rows=int(sample_rows), row_floor=row_floor)


# ============================================================================ 6. block tables
@dataclass(frozen=True)
class BlockTables:
    """Per-(tile, kv head, sub-group) page lists in CSR form: what the paged kernel reads.

    Table ``r = (t * Hkv + h) * S + g`` serves query rows ``qo_indptr[t]:qo_indptr[t+1]`` of the
    chunk and query heads ``h*G + g*s ... h*G + g*s + s - 1``; it reads kv head ``h`` of pages
    ``indices[indptr[r]:indptr[r+1]]``: first the kept past pages (no mask), then the chunk's own
    pages from the chunk start to the tile end (bottom-right causal mask), all in token order.

    Arrays (int32):
        indptr     [R + 1]   R = T * Hkv * S tables
        indices    [nnz]     pool chunk ids
        blocks     [nnz]     block position of each entry in the sequence (token // c)
        num_past   [R]       the first num_past[r] entries of table r are past blocks
        qo_indptr  [T + 1]   query rows of each tile
    Every page is full except the chunk's last one, which holds the chunk's last
    ``chunk_len - (Cb - 1) * c`` tokens (the kernel masks the rest causally).
    """

    seq: int
    version: int
    chunk_size: int
    past_len: int
    chunk_len: int
    num_q_heads: int
    num_kv_heads: int
    group_size: int
    indptr: np.ndarray
    indices: np.ndarray
    blocks: np.ndarray
    num_past: np.ndarray
    qo_indptr: np.ndarray

    @property
    def num_tiles(self) -> int:
        return len(self.qo_indptr) - 1

    @property
    def num_subgroups(self) -> int:
        return self.num_q_heads // self.num_kv_heads // self.group_size

    @property
    def num_tables(self) -> int:
        return len(self.indptr) - 1

    @property
    def num_past_blocks(self) -> int:
        return self.past_len // self.chunk_size

    @property
    def num_blocks(self) -> int:
        """Blocks of the sequence up to the chunk end (past + own)."""
        return self.num_past_blocks + cdiv(self.chunk_len, self.chunk_size)

    def table(self, t: int, h: int, g: int = 0) -> int:
        """Row index of the table of tile t, kv head h, sub-group g."""
        return (t * self.num_kv_heads + h) * self.num_subgroups + g

    def to_dense(self) -> np.ndarray:
        """bool [T, Hkv, S, num_blocks]: which sequence blocks each table reads."""
        T, Hkv, S = self.num_tiles, self.num_kv_heads, self.num_subgroups
        dense = np.zeros((T * Hkv * S, self.num_blocks), bool)
        rows = np.repeat(np.arange(T * Hkv * S), np.diff(self.indptr))
        dense[rows, self.blocks] = True
        return dense.reshape(T, Hkv, S, self.num_blocks)

    def _own_blocks(self) -> np.ndarray:
        """int [T]: own blocks each tile reads (chunk start to tile end)."""
        return np.array([cdiv(int(e), self.chunk_size) for e in self.qo_indptr[1:]], np.int64)

    def density(self, past_only: bool = False) -> float:
        """Fraction of the causally valid blocks the tables read (1.0 = dense).

        ``past_only`` counts past blocks alone (the selector's part; own blocks are always read).
        """
        own = np.repeat(self._own_blocks(), self.num_kv_heads * self.num_subgroups)  # [R]
        Pb = self.num_past_blocks
        if past_only:
            return float(self.num_past.sum() / (Pb * self.num_tables)) if Pb else 1.0
        return float(len(self.indices) / (Pb * self.num_tables + own.sum()))

    def to_string(self, max_width: int = 96, max_rows: int = 48) -> str:
        """An ASCII picture: one line per table, one column per block (or per ``w`` blocks).

        '#' past block read, '.' skipped, '|' chunk start, 'o' own block (causal mask),
        ' ' own block after the tile; when a column covers w > 1 blocks, '-' means under half of
        them are read and '+' half or more.
        """
        c, Pb, Kb = self.chunk_size, self.num_past_blocks, self.num_blocks
        T, Hkv, S = self.num_tiles, self.num_kv_heads, self.num_subgroups
        w = max(1, cdiv(Kb, max(8, max_width)))
        dense = self.to_dense().reshape(T * Hkv * S, Kb)
        own_end = self._own_blocks()

        def columns(bits, own: bool):
            out = []
            for a in range(0, len(bits), w):
                part = bits[a:a + w]
                frac = part.mean() if len(part) else 0.0
                if own:
                    out.append("o" if part.any() else " ")
                else:
                    out.append("#" if frac == 1 else "." if frac == 0 else "+" if frac >= 0.5 else "-")
            return "".join(out)

        lines = [f"BlockTables: seq {self.seq}, chunk of {self.chunk_len} tokens after P = {self.past_len} "
                 f"cached (block {c}: {Pb} past + {Kb - Pb} own blocks)",
                 f"  {T} tile(s) x {Hkv} kv head(s) x {S} sub-group(s) of {self.group_size} query "
                 f"head(s); density {self.density():.3f} (past blocks {self.density(past_only=True):.3f})",
                 "  '#' past block read  '.' skipped  '|' chunk start  'o' own block (causal mask)"
                 + (f"; one column = {w} blocks, '-' under half read, '+' half or more" if w > 1 else "")]
        label_w = len(f"t{T - 1} h{Hkv - 1}" + (f" g{S - 1}" if S > 1 else ""))
        for r in range(min(T * Hkv * S, max_rows)):
            t, rest = divmod(r, Hkv * S)
            h, g = divmod(rest, S)
            label = f"t{t} h{h}" + (f" g{g}" if S > 1 else "")
            row = dense[r]
            past_cols = columns(row[:Pb], own=False)
            own_cols = columns(row[Pb:], own=True)
            n_past, n_own = int(self.num_past[r]), int(own_end[t])
            lines.append(f"  {label:<{label_w}} {past_cols}|{own_cols}  {n_past}/{Pb} past + {n_own} own")
        if T * Hkv * S > max_rows:
            lines.append(f"  ... {T * Hkv * S - max_rows} more table(s)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()


def tables_from_mask(cache: ChunkCache, seq: int, past_mask: np.ndarray, *, chunk_len: int,
                     num_q_heads: int, q_tile: int) -> BlockTables:
    """CSR tables from a past-block mask bool [T, Hkv, S, Pb] (the group union, or an oracle's).

    The sequence's last ``chunk_len`` tokens are the chunk; ``q_tile`` query rows per tile.
    """
    c = cache.chunk_size
    length = cache.seq_len(seq)
    P, n = length - chunk_len, chunk_len
    T, Hkv, S, Pb = past_mask.shape
    if Pb * c != P or Hkv != cache.num_kv_heads or T != cdiv(n, q_tile):
        raise ValueError(f"past_mask: expected shape [{cdiv(n, q_tile)}, {cache.num_kv_heads}, S, {P // c}] "
                         f"for a chunk of {n} after P = {P}, got {tuple(past_mask.shape)}")
    ids = np.array(cache.seq_chunks(seq), _I32)
    past_ids, own_ids = ids[:Pb], ids[Pb:]
    qo_indptr = np.minimum(np.arange(T + 1) * q_tile, n).astype(_I32)
    own_end = [cdiv(int(e), c) for e in qo_indptr[1:]]  # own blocks up to each tile's end

    # counts, then a prefix sum: the GPU builds the same arrays without a host round trip
    counts = past_mask.sum(axis=3) + np.array(own_end)[:, None, None]  # [T, Hkv, S]
    indptr = np.concatenate([[0], np.cumsum(counts.reshape(-1))]).astype(_I32)
    indices = np.empty(indptr[-1], _I32)
    blocks = np.empty(indptr[-1], _I32)
    num_past = past_mask.sum(axis=3).reshape(-1).astype(_I32)
    for r in range(T * Hkv * S):
        t, rest = divmod(r, Hkv * S)
        h, g = divmod(rest, S)
        past = np.flatnonzero(past_mask[t, h, g])  # ascending block positions
        own = np.arange(own_end[t])
        sl = slice(indptr[r], indptr[r + 1])
        indices[sl] = np.concatenate([past_ids[past], own_ids[own]])
        blocks[sl] = np.concatenate([past, Pb + own])
    return BlockTables(seq=int(seq), version=cache.version, chunk_size=c, past_len=P, chunk_len=n,
                       num_q_heads=int(num_q_heads), num_kv_heads=Hkv,
                       group_size=int(num_q_heads) // Hkv // S, indptr=indptr, indices=indices,
                       blocks=blocks, num_past=num_past, qo_indptr=qo_indptr)


def build_block_tables(cache: ChunkCache, seq: int, selection: BlockSelection) -> BlockTables:
    """Pass 6: the group union of a selection as CSR page lists (see ``BlockTables``)."""
    check_cache(cache)
    check_instance(selection, "selection", BlockSelection, "a BlockSelection (from select_blocks)")
    if selection.seq != seq or selection.version != cache.version \
            or cache.seq_len(seq) != selection.past_len + selection.chunk_len:
        raise ValueError(f"selection: expected one made for sequence {seq} at cache version "
                         f"{cache.version} with {cache.seq_len(seq)} tokens, got one for sequence "
                         f"{selection.seq} at version {selection.version} with "
                         f"{selection.past_len + selection.chunk_len} tokens")
    return tables_from_mask(cache, seq, selection.group_union, chunk_len=selection.chunk_len,
                            num_q_heads=selection.num_q_heads, q_tile=selection.q_tile)


# ============================================================================ 7. execution
def _causal_state(q, k, v, scale, last):
    """State of q [M, D] over k, v [N, D] where row m sees keys 0..last[m]: (o [M, D], lse [M])."""
    s = (q @ k.T) * np.float32(scale)  # [M, N]
    s = np.where(np.arange(k.shape[0])[None, :] <= last[:, None], s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    m = np.where(np.isneginf(m), 0, m)  # a row that sees nothing stays an empty state
    p = np.exp(s - m)
    l = p.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        o = np.where(l > 0, (p @ v) / np.where(l > 0, l, 1), 0)
        lse = np.where(l[:, 0] > 0, m[:, 0] + np.log(l[:, 0]), -np.inf)
    return o.astype(np.float32), lse.astype(np.float32)


def sparse_prefill(cache: ChunkCache, tables: BlockTables, q, layer: int = 0,
                   scale: float | None = None):
    """Pass 7: dense attention over each table's pages, read in place from the pool.

    Args:
        q: [n, Hq, D] storage dtype, the chunk's queries (n = tables.chunk_len).
    Returns:
        o: float32 [n, Hq, D] and lse: float32 [n, Hq] (natural log of the scaled-score sum).
    """
    check_cache(cache)
    check_instance(tables, "tables", BlockTables, "BlockTables (from build_block_tables)")
    if tables.version != cache.version:
        raise CacheError(f"tables: expected tables for cache version {cache.version}, got tables built for cache version {tables.version}, cache is at "
                         f"{cache.version} (the tree changed); select and build again")
    q = storage_view(q)
    P, n, G = check_chunk(cache, tables.seq, q, layer)
    if (P, n, q.shape[1]) != (tables.past_len, tables.chunk_len, tables.num_q_heads):
        raise ValueError(f"q: expected [{tables.chunk_len}, {tables.num_q_heads}, D] after P = "
                         f"{tables.past_len} as the tables were built, got {tuple(q.shape)} after P = {P}")
    scale = check_scale(scale, cache.head_dim)
    c, D, Hkv = cache.chunk_size, cache.head_dim, cache.num_kv_heads
    s, S = tables.group_size, tables.num_subgroups
    qf = to_float32(np.asarray(q), cache.dtype)  # [n, Hq, D]
    kp, vp = as_numpy(cache.k_pool[layer]), as_numpy(cache.v_pool[layer])  # [num_chunks, Hkv, c, D]

    def pages(pool, ids, h):  # [len(ids) * c, D] float32, in list order
        return to_float32(pool[ids, h], cache.dtype).reshape(-1, D)

    o = np.zeros((n, tables.num_q_heads, D), np.float32)
    lse = np.full((n, tables.num_q_heads), -np.inf, np.float32)
    for r in range(tables.num_tables):
        t, rest = divmod(r, Hkv * S)
        h, g = divmod(rest, S)
        r0, r1 = int(tables.qo_indptr[t]), int(tables.qo_indptr[t + 1])
        heads = slice(h * G + g * s, h * G + (g + 1) * s)
        ids = tables.indices[tables.indptr[r]: tables.indptr[r + 1]]
        past, own = ids[: tables.num_past[r]], ids[tables.num_past[r]:]
        qm = qf[r0:r1, heads].reshape(-1, D)  # [(r1-r0) * s, D]: tile rows x sub-group heads

        # past pages: every key visible
        o1, l1 = attention_state(qm, pages(kp, past, h), pages(vp, past, h), scale)
        # own pages: bottom-right causal; own keys cover chunk tokens [0, r1)
        n_own = min(len(own) * c, n)
        last = np.repeat(n_own - (r1 - r0) + np.arange(r1 - r0), s)  # [(r1-r0) * s]
        o2, l2 = _causal_state(qm, pages(kp, own, h)[:n_own], pages(vp, own, h)[:n_own], scale, last)

        om, lm = merge_states(o1, l1, o2, l2)
        o[r0:r1, heads] = om.reshape(r1 - r0, s, D)
        lse[r0:r1, heads] = lm.reshape(r1 - r0, s)
    return o, lse


# ============================================================================ oracle and metrics
_SLAB = 1 << 24  # score-matrix elements per slab: the float64 oracles stay in memory at 128K


def causal_attention(q, k, v, scale: float | None = None):
    """float64 causal attention of the last n positions of a sequence (bottom-right aligned).

    Args:
        q: [n, Hq, D] values; k, v: [L, Hkv, D] values (L >= n), any float dtype.
    Returns:
        o float64 [n, Hq, D], lse float64 [n, Hq]: query t sees keys 0 .. L - n + t.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    n, Hq, D = q.shape
    L, Hkv, _ = k.shape
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    G = Hq // Hkv
    o, lse = np.empty((n, Hq, D)), np.empty((n, Hq))
    step = max(1, _SLAB // L)
    for h in range(Hq):
        for a in range(0, n, step):  # rows a..b of head h: scores [b-a, L]
            rows = np.arange(a, min(n, a + step))
            s = (q[rows, h] @ k[:, h // G].T) * scale
            s[np.arange(L)[None, :] > (L - n + rows)[:, None]] = -np.inf
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - m)
            l = p.sum(axis=1, keepdims=True)
            o[rows, h] = (p @ v[:, h // G]) / l
            lse[rows, h] = (m + np.log(l))[:, 0]
    return o, lse


def _chunk_kv64(cache: ChunkCache, seq: int, layer: int):
    k, v = cache.read_kv(seq, layer)
    return (to_float32(as_numpy(x), cache.dtype).astype(np.float64) for x in (k, v))


def oracle_prefill(cache: ChunkCache, seq: int, q, layer: int = 0, scale: float | None = None):
    """float64 oracle: the chunk (the sequence's last n tokens) attends densely and causally to
    every token of the sequence, K/V read back through the tree.

    Args:
        q: [n, Hq, D] storage dtype.
    Returns:
        o float64 [n, Hq, D], lse float64 [n, Hq].
    """
    q = storage_view(q)
    check_chunk(cache, seq, q, layer)
    scale = check_scale(scale, cache.head_dim)
    k, v = _chunk_kv64(cache, seq, layer)
    return causal_attention(to_float32(np.asarray(q), cache.dtype), k, v, scale)


def attention_mass(cache: ChunkCache, seq: int, q, layer: int = 0, scale: float | None = None) -> np.ndarray:
    """Exact share of each row's attention on each block: float64 [n, Hq, num_blocks].

    Block j covers tokens j*c .. j*c + c - 1 of the sequence (past blocks first, then the
    chunk's own blocks); every (row, head) sums to 1.
    """
    q = storage_view(q)
    P, n, G = check_chunk(cache, seq, q, layer)
    scale = check_scale(scale, cache.head_dim)
    k, _ = _chunk_kv64(cache, seq, layer)
    qf = to_float32(np.asarray(q), cache.dtype).astype(np.float64)
    L, Hq, c = k.shape[0], qf.shape[1], cache.chunk_size
    mass = np.empty((n, Hq, cdiv(L, c)))
    step = max(1, _SLAB // L)
    for h in range(Hq):
        for a in range(0, n, step):
            rows = np.arange(a, min(n, a + step))
            s = (qf[rows, h] @ k[:, h // G].T) * scale  # [rows, L]
            s[np.arange(L)[None, :] > (P + rows)[:, None]] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            mass[rows, h] = np.add.reduceat(p, np.arange(0, L, c), axis=1)
    return mass


def mass_recall(lse_sparse, lse_dense) -> np.ndarray:
    """Attention-mass recall per (row, head): exp(lse_sparse - lse_dense), in [0, 1].

    The sparse softmax sum is the dense sum restricted to the read keys, so the ratio is the
    share of the dense attention probability that fell on the read keys.
    """
    return np.exp(np.asarray(lse_sparse, np.float64) - np.asarray(lse_dense, np.float64))


def relative_error(o, o_ref) -> float:
    """||o - o_ref|| / ||o_ref|| (Frobenius, over everything)."""
    o, o_ref = np.asarray(o, np.float64), np.asarray(o_ref, np.float64)
    den = np.linalg.norm(o_ref)
    return float(np.linalg.norm(o - o_ref) / den) if den else float(np.linalg.norm(o))


def needle_recall(tables: BlockTables, query_pos, q_head, key_block) -> tuple[int, int]:
    """How many (query row, query head, key block) needle triples the tables read.

    Args (int arrays [M], sequence coordinates):
        query_pos: token position of the querying row; q_head: its query head;
        key_block: the block (token // c) it should retrieve.
    Only triples whose row is in this chunk and whose block is in the past count.
    Returns (found, counted).
    """
    query_pos, q_head, key_block = (np.asarray(x, np.int64).reshape(-1) for x in (query_pos, q_head, key_block))
    P, n, c = tables.past_len, tables.chunk_len, tables.chunk_size
    use = (query_pos >= P) & (query_pos < P + n) & (key_block < P // c)
    if not use.any():
        return 0, 0
    row = query_pos[use] - P
    tile = np.searchsorted(tables.qo_indptr, row, side="right") - 1
    G = tables.num_q_heads // tables.num_kv_heads
    h, g = q_head[use] // G, (q_head[use] % G) // tables.group_size
    found = tables.to_dense()[tile, h, g, key_block[use]]
    return int(found.sum()), int(use.sum())


# ============================================================================ one call, and a prompt driver
@dataclass(frozen=True)
class CompactPrefill:
    """Result of ``compact_prefill`` (the GPU backend returns one with the same ``o``, ``lse``,
    ``density()`` and ``tables()``).

    Arrays and objects:
        o            [n, Hq, D] storage dtype (the float32 result rounded once)
        lse          float32 [n, Hq], natural log of the scaled-score sum; None with return_lse=False
        selection    the ``BlockSelection`` (scores and the masks of passes 2-5)
        block_tables the ``BlockTables`` the attention read (pass 6)
    """

    o: np.ndarray
    lse: np.ndarray | None
    selection: BlockSelection
    block_tables: BlockTables

    def density(self) -> dict:
        """Density after each stage: select, q_union, group_union (past blocks), tables (all)."""
        return dict(self.selection.density, tables=self.block_tables.density())

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr int32 [R + 1], indices int32 [nnz]): the CSR page lists, host copies."""
        return self.block_tables.indptr.copy(), self.block_tables.indices.copy()


def _check_out(cache: ChunkCache, out, shape) -> None:
    want = np.dtype(storage_numpy_dtype(cache.dtype))
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected None or a NumPy array {shape} of dtype {want.name}, "
                        f"got {type(out).__name__}")
    if out.dtype != want:
        raise TypeError(f"out: expected dtype {want.name} ({cache.dtype} storage), got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out: expected shape {shape}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out: expected a writeable array, got a read-only one")


def compact_prefill(cache: ChunkCache, means: BlockMeans, seq: int, q, layer: int = 0, *,
                    scale: float | None = None, alpha: float | None = DEFAULT_ALPHA, sink: int = 2,
                    window: int = 4, q_tile: int | None = None, group_size: int | None = None,
                    recall: float | None = None, summary: str = "auto", sample_rows: int = DEFAULT_SAMPLE_ROWS,
                    row_floor: float | None = None, return_lse: bool = True, out=None, kernel: str = "auto",
                    events: list | None = None) -> CompactPrefill:
    """CompactAttention for one chunk and layer: select_blocks, build_block_tables, sparse_prefill.

    The chunk is the sequence's last n = q.shape[0] tokens, its K/V already written for this
    layer; q: [n, Hq, D] storage dtype. Selection options as in ``select_blocks`` (alpha 0 keeps
    every block: dense chunked prefill; ``recall`` the recall-target rule instead of alpha).
    ``return_lse``: False leaves ``lse`` None. ``out``: a storage-dtype array [n, Hq, D] that
    receives ``o`` (and is ``o``). ``kernel``: checked against ``KERNEL_CHOICES`` and otherwise
    ignored (the GPU backend picks its attention kernel with it; the reference has one).
    ``events``: a list that receives (stage name, ``time.perf_counter()`` seconds) at "start"
    and after "means", "score", "tables" and "attention" (the GPU appends CUDA events under the
    same names).
    """
    check_choice(kernel, "kernel", KERNEL_CHOICES)
    check_bool(return_lse, "return_lse")
    check_events(events)
    q, out = storage_view(q), storage_view(out)
    P, n, G = check_chunk(cache, seq, q, layer)
    check_scale(scale, cache.head_dim)
    check_options(cache.chunk_size, n, G, alpha, sink, window, q_tile, group_size, recall)
    check_row_floor(row_floor, recall, check_summary(summary, sample_rows, recall))
    check_means(means, cache)
    if out is not None:
        _check_out(cache, out, (n, q.shape[1], cache.head_dim))

    def mark(name):
        if events is not None:
            events.append((name, time.perf_counter()))

    mark("start")
    means.update(cache, seq, num_tokens=P)  # every check passed: now the means may change
    mark("means")
    sel = select_blocks(cache, means, seq, q, layer, scale=scale, alpha=alpha, sink=sink,
                        window=window, q_tile=q_tile, group_size=group_size, recall=recall, summary=summary,
                        sample_rows=sample_rows, row_floor=row_floor)
    mark("score")  # scores, threshold and unions (the GPU's "score" mark covers the scores alone)
    tables = build_block_tables(cache, seq, sel)
    mark("tables")
    o, lse = sparse_prefill(cache, tables, q, layer, scale)
    if out is None:
        out = to_storage(o, cache.dtype)
    else:
        out[...] = to_storage(o, cache.dtype)
    mark("attention")
    return CompactPrefill(out, lse if return_lse else None, sel, tables)


def dense_options(options: dict) -> dict:
    """``compact_prefill`` options of ``dense_prefill``: alpha 0, sink and window 0 unless given."""
    for name in ("alpha", "recall"):
        if name in options:
            raise TypeError(f"{name}: expected no {name} (dense_prefill keeps every block; compact_prefill "
                            f"takes one), got {name}={options[name]!r}")
    return {"sink": 0, "window": 0, **options, "alpha": 0.0}


def dense_prefill(cache: ChunkCache, means: BlockMeans, seq: int, q, layer: int = 0, **options) -> CompactPrefill:
    """Our dense chunked prefill: ``compact_prefill`` with every block kept (alpha 0, no sink or
    window blocks needed). ``options``: the other keywords of ``compact_prefill``."""
    return compact_prefill(cache, means, seq, q, layer, **dense_options(options))


def _check_q_heads(cache: ChunkCache, q) -> int:
    """dtype, head_dim and GQA checks of a stacked q [L, m, Hq, D]; returns G."""
    want = storage_numpy_dtype(cache.dtype)
    if np.dtype(q.dtype) != np.dtype(want):
        raise TypeError(f"q: expected dtype {np.dtype(want).name} for {cache.dtype} storage, got {q.dtype}")
    if q.shape[3] != cache.head_dim:
        raise ValueError(f"q: expected head_dim {cache.head_dim}, got {q.shape[3]}")
    if q.shape[2] == 0 or q.shape[2] % cache.num_kv_heads:
        raise ValueError(f"q: expected num_q_heads a positive multiple of num_kv_heads "
                         f"{cache.num_kv_heads}, got {q.shape[2]}")
    return q.shape[2] // cache.num_kv_heads


def split_chunks(length: int, chunks, chunk_size: int) -> list[int]:
    """Chunk lengths of a prompt: ``chunks`` is an int (every chunk that long, the last shorter)
    or a list of lengths summing to ``length``, every one but the last a multiple of c."""
    if is_int(chunks):
        if chunks < chunk_size or chunks % chunk_size:
            raise ValueError(f"chunks: expected a positive multiple of chunk_size {chunk_size}, got {chunks}")
        return [min(int(chunks), length - a) for a in range(0, length, int(chunks))]
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, (list, tuple, range, np.ndarray)):
        raise TypeError(f"chunks: expected an integer or a list of integer lengths, got {chunks!r} "
                        f"({type(chunks).__name__})")
    sizes = check_ids(chunks, "chunks")  # 1-D, integers only: [4.9, 4.9] is refused, not truncated
    if sum(sizes) != length or any(x < 1 for x in sizes) or any(x % chunk_size for x in sizes[:-1]):
        raise ValueError(f"chunks: expected lengths >= 1 summing to {length}, every one but the last "
                         f"a multiple of chunk_size {chunk_size}, got {sizes}")
    return sizes


def chunked_prefill(cache: ChunkCache, means: BlockMeans, seq: int, tokens, q, k, v, chunks, **options):
    """Prefill ``tokens`` at the end of ``seq`` chunk by chunk, as a model would.

    Per chunk: reserve its slots; per layer write its K/V and run ``compact_prefill``; commit;
    summarise the pages that filled. The sequence's current length must be a multiple of c.

    Args:
        tokens: [m] ints; q: [L, m, Hq, D], k, v: [L, m, Hkv, D] storage dtype (L = num_layers).
        chunks: chunk length (int) or list of lengths (see ``split_chunks``).
        options: passed to ``compact_prefill`` (alpha, sink, window, q_tile, group_size, scale,
            recall, summary, sample_rows, row_floor).
    Returns:
        o [L, m, Hq, D] storage dtype, lse float32 [L, m, Hq], results: one list of
        CompactPrefill per chunk (one per layer).
    Everything is checked before the cache changes.
    """
    c, L = cache.chunk_size, cache.num_layers
    length = cache.seq_len(seq)
    tokens = cache.check_tokens(tokens, "tokens")
    q, k, v = storage_view(q), storage_view(k), storage_view(v)
    m = len(tokens)
    if length % c:
        raise ValueError(f"seq: expected a sequence whose length is a multiple of chunk_size {c} "
                         f"(prefill chunks start on a block), got length {length}")
    if m < 1:
        raise ValueError("tokens: expected at least one token, got 0")
    cache.check_kv(k, "k", m)
    cache.check_kv(v, "v", m)
    if not hasattr(q, "shape") or not hasattr(q, "dtype"):
        raise TypeError(f"q: expected an array [{L}, {m}, num_q_heads, head_dim], got {type(q).__name__}")
    if q.ndim != 4 or q.shape[:2] != (L, m):
        raise ValueError(f"q: expected an array [{L}, {m}, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    sizes = split_chunks(m, chunks, c)
    allowed = ("scale", "alpha", "sink", "window", "q_tile", "group_size", "recall", "summary", "sample_rows",
               "row_floor")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"options: expected {', '.join(allowed)}, got {unknown}")
    # dry-run every check that does not need the chunk's K/V, so a bad call changes nothing
    G = _check_q_heads(cache, q)
    check_scale(options.get("scale"), cache.head_dim)
    for n in sizes:
        check_options(c, n, G, options.get("alpha", DEFAULT_ALPHA), options.get("sink", 2),
                      options.get("window", 4), options.get("q_tile"), options.get("group_size"),
                      options.get("recall"))
    check_row_floor(options.get("row_floor"), options.get("recall"),
                    check_summary(options.get("summary", "auto"), options.get("sample_rows", DEFAULT_SAMPLE_ROWS),
                                  options.get("recall")))
    check_means(means, cache)
    state = cache.sequence(seq)
    cache.check_committed(state)
    cache.check_room_for(state, m)

    o = np.zeros((L, m, q.shape[2], cache.head_dim), storage_numpy_dtype(cache.dtype))
    lse = np.zeros((L, m, q.shape[2]), np.float32)
    results, a = [], 0
    for n in sizes:
        slots = cache.reserve(seq, tokens[a:a + n])
        per_layer = []
        for layer in range(L):
            cache.write_kv(layer, slots, k[layer, a:a + n], v[layer, a:a + n])
            res = compact_prefill(cache, means, seq, q[layer, a:a + n], layer, **options)
            o[layer, a:a + n], lse[layer, a:a + n] = res.o, res.lse
            per_layer.append(res)
        cache.commit(seq)
        means.update(cache, seq)
        results.append(per_layer)
        a += n
    return o, lse, results



# ============================================================================ batched varlen prefill
# One plan/run over the prompt chunks of many sequences (docs/design.md, "Batched varlen
# prefill"): sequence b's chunk is its last chunk_lens[b] tokens (K/V written), its queries are
# rows qo_indptr[b]:qo_indptr[b+1] of one packed q [sum(chunk_lens), Hq, D]. The result is, row
# for row, ``compact_prefill`` of each sequence on its rows: selection, tables (per sequence,
# tile, kv head, sub-group) and attention are per sequence; only the launches are shared.
PLAN_OPTIONS = ("alpha", "sink", "window", "q_tile", "group_size", "recall", "summary", "sample_rows", "row_floor",
                "kernel")


@dataclass(frozen=True)
class PrefillPlan:
    """A batched prefill step (host arrays; the same on both backends).

    Arrays (int64):
        seqs        [B]      sequence ids, the order of the packed rows
        chunk_lens  [B]      n of each sequence's chunk
        qo_indptr   [B + 1]  packed rows of each sequence (CSR over sequences)
        past_lens   [B]      P of each sequence (cached tokens before its chunk, a multiple of c)
        q_tiles     [B]      query rows per tile of each sequence (``q_tile``, or the whole chunk)
        table_indptr [B + 1] tables of each sequence in the batch's table order (T_b * Hkv * S each)
    ``options``: the selection options every sequence uses (``PLAN_OPTIONS``, defaults filled in
    as given; ``q_tile`` None means each sequence's whole chunk). ``version``: the cache version
    it was built at; ``run`` also checks every sequence still has P + n tokens.
    """

    seqs: np.ndarray
    chunk_lens: np.ndarray
    qo_indptr: np.ndarray
    past_lens: np.ndarray
    q_tiles: np.ndarray
    table_indptr: np.ndarray
    num_q_heads: int
    group_size: int
    chunk_size: int
    version: int
    options: dict

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return int(self.qo_indptr[-1])

    @property
    def num_tables(self) -> int:
        return int(self.table_indptr[-1])


def check_chunk_lens(cache: ChunkCache, seqs, chunk_lens) -> tuple:
    """Check a batch of chunks: distinct live ``seqs`` and ``chunk_lens`` (one integer >= 1 per
    sequence, each the sequence's last tokens, starting on a chunk boundary after committed
    tokens). Returns (seqs int64 [B], chunk_lens int64 [B], past_lens int64 [B])."""
    check_cache(cache)
    ids = check_ids(seqs, "seqs")
    lens = check_ids(chunk_lens, "chunk_lens")
    if not ids:
        raise ValueError("seqs: expected at least one sequence, got none")
    if len(set(ids)) != len(ids):
        dup = sorted({s for s in ids if ids.count(s) > 1})
        raise ValueError(f"seqs: expected distinct sequence ids (one chunk per sequence), got {dup} more than once")
    if len(lens) != len(ids):
        raise ValueError(f"chunk_lens: expected one length per sequence ({len(ids)}), got {len(lens)}")
    c = cache.chunk_size
    past = []
    for seq, n in zip(ids, lens):
        length = cache.seq_len(seq)  # unknown or released sequence -> CacheError
        if not 1 <= n <= length:
            raise ValueError(f"chunk_lens: expected a length in [1, {length}] for sequence {seq} (its chunk is "
                             f"its last tokens), got {n}")
        P = length - n
        if P % c:
            raise ValueError(f"chunk_lens: expected sequence {seq}'s chunk to start at a multiple of chunk_size "
                             f"{c}, got P = {P} (seq_len {length}, chunk length {n})")
        committed = cache.sequence(seq).n_committed
        if P > committed:
            raise ValueError(f"chunk_lens: expected sequence {seq}'s chunk to cover every uncommitted token "
                             f"(P = {P} past tokens, {committed} committed), got chunk length {n}")
        past.append(P)
    return np.array(ids, np.int64), np.array(lens, np.int64), np.array(past, np.int64)


def build_prefill_plan(cache: ChunkCache, seqs, chunk_lens, num_q_heads: int, *, alpha: float | None = DEFAULT_ALPHA,
                       sink: int = 2, window: int = 4, q_tile: int | None = None, group_size: int | None = None,
                       recall: float | None = None, summary: str = "auto", sample_rows: int = DEFAULT_SAMPLE_ROWS,
                       row_floor: float | None = None, kernel: str = "auto") -> PrefillPlan:
    """Check a batched prefill step and lay it out (``PrefillPlan``); changes nothing."""
    ids, lens, past = check_chunk_lens(cache, seqs, chunk_lens)
    check_int(num_q_heads, "num_q_heads", 1, INT32_MAX)
    if num_q_heads % cache.num_kv_heads:
        raise ValueError(f"num_q_heads: expected a positive multiple of num_kv_heads {cache.num_kv_heads}, "
                         f"got {num_q_heads!r}")
    check_choice(kernel, "kernel", KERNEL_CHOICES)
    c, Hkv = cache.chunk_size, cache.num_kv_heads
    G = num_q_heads // Hkv
    tiles, s = [], None
    for n in lens:
        qt, s = check_options(c, int(n), G, alpha, sink, window, q_tile, group_size, recall)
        tiles.append(qt)
    row_floor = check_row_floor(row_floor, recall, check_summary(summary, sample_rows, recall))
    q_tiles = np.array(tiles, np.int64)
    S = G // s
    num_tiles = -(-lens // q_tiles)
    options = dict(alpha=alpha, sink=int(sink), window=int(window), q_tile=q_tile, group_size=group_size,
                   recall=recall, summary=summary, sample_rows=int(sample_rows), row_floor=row_floor, kernel=kernel)
    return PrefillPlan(seqs=ids, chunk_lens=lens, qo_indptr=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                       past_lens=past, q_tiles=q_tiles,
                       table_indptr=np.concatenate([[0], np.cumsum(num_tiles * Hkv * S)]).astype(np.int64),
                       num_q_heads=int(num_q_heads), group_size=int(s), chunk_size=c, version=cache.version,
                       options=options)


def check_prefill_plan(cache: ChunkCache, plan) -> PrefillPlan:
    """``plan`` made for the cache as it is: same version, every sequence still P + n tokens long
    (CacheError otherwise)."""
    check_cache(cache)
    if plan is None:
        raise CacheError("plan: expected a plan (call plan(seqs, chunk_lens, num_q_heads) before run), got none")
    check_instance(plan, "plan", PrefillPlan, "a PrefillPlan (from build_prefill_plan)")
    if plan.version != cache.version:
        raise CacheError(f"plan: expected a plan for cache version {cache.version}, got one built for version "
                         f"{plan.version} (the tree changed); plan again")
    for seq, P, n in zip(plan.seqs, plan.past_lens, plan.chunk_lens):
        if cache.seq_len(int(seq)) != P + n:
            raise CacheError(f"plan: expected sequence {seq} to have {P + n} tokens as planned, got "
                             f"{cache.seq_len(int(seq))}; plan again")
    return plan


def check_packed_q(cache: ChunkCache, plan: PrefillPlan, q) -> None:
    """q [plan.num_tokens, Hq, D] in the storage dtype (NumPy or CuPy)."""
    want = storage_numpy_dtype(cache.dtype)
    shape = (plan.num_tokens, plan.num_q_heads, cache.head_dim)
    if not hasattr(q, "shape") or not hasattr(q, "dtype"):
        raise TypeError(f"q: expected an array {list(shape)} (packed chunks), got {type(q).__name__}")
    if np.dtype(q.dtype) != np.dtype(want):
        raise TypeError(f"q: expected dtype {np.dtype(want).name} for {cache.dtype} storage, got {q.dtype}")
    if tuple(q.shape) != shape:
        raise ValueError(f"q: expected shape {shape} (sum(chunk_lens), num_q_heads, head_dim as planned), "
                         f"got {tuple(q.shape)}")


class BatchedPrefill:
    """Batched varlen CompactAttention prefill: ``plan`` once per step, ``run`` per layer.

        bp = BatchedPrefill(cache, means)
        bp.plan(seqs, chunk_lens, num_q_heads, alpha=..., q_tile=..., ...)   # a PrefillPlan
        o, lse = bp.run(q, layer)          # q, o [sum(chunk_lens), Hq, D], lse [sum, Hq] float32
        bp.density(), bp.tables()          # of the last run: per sequence, and the batch's CSR

    Row for row the result is ``compact_prefill(cache, means, seqs[b], q[rows of b], layer,
    **options)``; the reference runs exactly that, one sequence after another.
    ``cpattn.compact_attention.BatchedPrefill`` is the GPU one (one launch per stage).
    """

    def __init__(self, cache: ChunkCache, means: BlockMeans):
        check_cache(cache)
        check_means(means, cache)
        self.cache, self.means = cache, means
        self.prefill_plan: PrefillPlan | None = None
        self.results: list = []  # the last run's CompactPrefill per sequence

    def plan(self, seqs, chunk_lens, num_q_heads: int, **options) -> PrefillPlan:
        """Plan a step over the chunks of ``seqs`` (see ``build_prefill_plan`` for the options).
        Summarises the sequences' past pages (``BlockMeans.update``) once everything is checked."""
        unknown = sorted(set(options) - set(PLAN_OPTIONS))
        if unknown:
            raise TypeError(f"options: expected some of {', '.join(PLAN_OPTIONS)}, got {unknown}")
        plan = build_prefill_plan(self.cache, seqs, chunk_lens, num_q_heads, **options)
        for seq, P in zip(plan.seqs, plan.past_lens):
            self.means.update(self.cache, int(seq), num_tokens=int(P))
        self.prefill_plan, self.results = plan, []
        return plan

    def run(self, q, layer: int = 0, *, scale: float | None = None, out=None, lse_out=None):
        """(o [N, Hq, D] storage dtype, lse [N, Hq] float32) for the packed q [N, Hq, D], N =
        sum(chunk_lens). ``out`` / ``lse_out`` receive them when given."""
        cache = self.cache
        plan = check_prefill_plan(cache, self.prefill_plan)
        q, out = storage_view(q), storage_view(out)
        check_packed_q(cache, plan, q)
        cache.check_layer(layer)
        check_scale(scale, cache.head_dim)
        N, Hq, D = q.shape
        if out is not None:
            _check_out(cache, out, (N, Hq, D))
        if lse_out is not None:
            if not isinstance(lse_out, np.ndarray) or lse_out.dtype != np.float32:
                raise TypeError(f"lse_out: expected None or a float32 NumPy array {(N, Hq)}, got "
                                f"{type(lse_out).__name__} of dtype {getattr(lse_out, 'dtype', None)}")
            if lse_out.shape != (N, Hq) or not lse_out.flags.writeable:
                raise ValueError(f"lse_out: expected a writeable array of shape {(N, Hq)}, got shape "
                                 f"{lse_out.shape}{'' if lse_out.flags.writeable else ' (read-only)'}")
        o = np.empty((N, Hq, D), storage_numpy_dtype(cache.dtype)) if out is None else out
        lse = np.empty((N, Hq), np.float32) if lse_out is None else lse_out
        results = []
        for b, seq in enumerate(plan.seqs):
            a, e = int(plan.qo_indptr[b]), int(plan.qo_indptr[b + 1])
            r = compact_prefill(cache, self.means, int(seq), q[a:e], layer, scale=scale, **plan.options)
            o[a:e], lse[a:e] = r.o, r.lse
            results.append(r)
        self.results = results
        return o, lse

    def density(self) -> list:
        """Per sequence of the last run: ``CompactPrefill.density()`` (select, q_union,
        group_union, tables)."""
        return [r.density() for r in self._last()]

    def tables(self) -> tuple:
        """The last run's tables as one CSR over the batch (indptr int32 [R + 1], indices int32):
        sequence b's tables are rows ``plan.table_indptr[b]:plan.table_indptr[b+1]``, each in
        ``BlockTables`` order."""
        parts = [r.tables() for r in self._last()]
        sizes = np.array([0] + [len(ind) for _, ind in parts], np.int64)
        indptr = np.concatenate([[0]] + [ip[1:].astype(np.int64) + off for (ip, _), off in zip(parts, np.cumsum(sizes)[:-1])])
        return indptr.astype(_I32), np.concatenate([ind for _, ind in parts]).astype(_I32)

    def _last(self):
        if not self.results:
            raise ValueError("run: expected a run of the current plan before reading its tables or density, got none")
        return self.results
