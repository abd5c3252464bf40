"""The chunk tree: a prefix-aware KV cache of fixed-size chunks in a preallocated paged pool.

One tree serves every layer. Tree nodes are chunks of up to ``c`` tokens; the pool holds K and V
for every layer, heads-first inside a chunk so that one (chunk, kv head) is a contiguous
``c x head_dim`` page::

    k_pool, v_pool: [num_layers, num_chunks, num_kv_heads, c, head_dim]   (storage dtype)

Rules (docs/design.md, "The chunk tree"):

* A node is shared by every live sequence whose path passes through it; ``ref`` counts them.
* Only *complete* chunks (full, K/V written for every layer, i.e. committed) are matched by later
  prompts. A partially filled chunk is private to its sequence, so appends never copy on write.
* A released sequence drops its references. Complete chunks with no reference stay cached and
  are evicted least-recently-used when the pool needs room; anything else is freed at once.
* Sequence ids are stable integers chosen by the cache. ``fork`` shares every full chunk and
  copies only the partial tail.
* Every mutating call checks everything first, so an error leaves the cache exactly as it was.

The pool's array module is a parameter (``xp=numpy`` or ``cupy``): both backends share this
tree and this layout; only where the bytes live differs.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Sequence as _Seq

import numpy as np

from .checks import INT32_MAX, check_bool, check_ids, check_int, check_optional_int
from .dtypes import check_dtype_name, storage_numpy_dtype, storage_view


MAX_POOL_BYTES = 2**40  # 1 TiB: a larger K/V pool is a typo (num_chunks=10**15), not a cache


class CacheError(ValueError):
    """Bad use of the cache (unknown sequence, wrong shape, ...). Nothing was changed."""


class CacheFullError(CacheError):
    """The pool has no free chunk and nothing evictable. Nothing was changed."""


def check_cache(cache, name: str = "cache") -> "ChunkCache":
    """``cache`` when it is a ``ChunkCache`` (NumPy or GPU), else TypeError naming ``name``."""
    if not isinstance(cache, ChunkCache):
        raise TypeError(f"{name}: expected a ChunkCache or GpuChunkCache, got {type(cache).__name__} "
                        f"{str(cache)[:40]!s}")
    return cache


@dataclass(eq=False)
class Node:
    """One chunk of the tree. ``serial`` orders siblings by creation (depth-first order)."""

    chunk: int  # pool index, -1 for the root
    serial: int
    parent: "Node | None"
    tokens: list = field(default_factory=list)
    children: list = field(default_factory=list)
    index: dict = field(default_factory=dict)  # token tuple -> registered (matchable) child
    ref: int = 0
    registered: bool = False  # complete and reachable by matching from the root
    last_use: int = 0


@dataclass(eq=False)
class SeqState:
    id: int
    slot: int
    path: list  # Node, root excluded, root -> tail
    n_tokens: int = 0
    n_committed: int = 0


@dataclass(frozen=True)
class Slots:
    """Where tokens go in the pool: token i lands in page ``chunk[i]`` at row ``offset[i]``."""

    chunk: np.ndarray  # int32 [n]
    offset: np.ndarray  # int32 [n]


class ChunkCache:
    """Prefix tree of chunks over a paged K/V pool (see the module docstring).

    Args:
        num_layers, num_kv_heads, head_dim: pool geometry.
        num_chunks: pool capacity in chunks (allocated up front, never grows).
        chunk_size: tokens per chunk ``c``, a power of two in [1, 128] (2 and 4 are for tests;
            kernels support 16 to 128).
        dtype: storage dtype name, "float16" or "bfloat16" (bf16 kept as uint16 bit patterns).
        xp: array module of the pool (numpy or cupy).
        share_prefix: False stores every sequence on its own (for A/B checks); results must
            not change.
        max_sequences: capacity of the per-slot length table.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_chunks: int,
                 chunk_size: int = 64, dtype="float16", xp=np, share_prefix: bool = True,
                 max_sequences: int = 4096):
        # int32 bounds: page ids, slots and strides reach int32 kernel arguments and tables
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("num_chunks", num_chunks), ("max_sequences", max_sequences)):
            check_int(val, name, 1, INT32_MAX)
        if check_int(chunk_size, "chunk_size", 1, 129) & (chunk_size - 1):
            raise ValueError(f"chunk_size: expected a power of two in [1, 128], got {chunk_size!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = int(num_layers), int(num_kv_heads), int(head_dim)
        self.num_chunks, self.chunk_size = int(num_chunks), int(chunk_size)
        self.dtype = check_dtype_name(dtype)
        self.xp = xp
        self.share_prefix = check_bool(share_prefix, "share_prefix")
        shape = (self.num_layers, self.num_chunks, self.num_kv_heads, self.chunk_size, self.head_dim)
        pool_bytes = 2 * 2 * int(np.prod(shape, dtype=object))  # K and V, 2 bytes an element
        if pool_bytes > MAX_POOL_BYTES:
            raise ValueError(f"num_chunks: expected a pool of at most {MAX_POOL_BYTES / 2**40:g} TiB, got "
                             f"num_chunks={self.num_chunks} needing {pool_bytes / 2**30:.4g} GiB for K and V "
                             f"({self.num_layers} layers x {self.num_kv_heads} kv heads x chunk "
                             f"{self.chunk_size} x head_dim {self.head_dim}, 2 bytes each)")
        try:
            self.k_pool = xp.zeros(shape, dtype=storage_numpy_dtype(self.dtype))
            self.v_pool = xp.zeros(shape, dtype=storage_numpy_dtype(self.dtype))
        except MemoryError:
            self.k_pool = self.v_pool = None
            raise MemoryError(f"num_chunks: expected a pool that fits in memory, got num_chunks={self.num_chunks} "
                              f"needing {pool_bytes / 2**30:.4g} GiB for K and V; make num_chunks "
                              f"smaller") from None
        # per-slot token counts on the host; a GPU cache mirrors them on the device
        self.max_sequences = int(max_sequences)
        self.slot_lens = np.zeros(self.max_sequences, dtype=np.int32)
        self.root = Node(chunk=-1, serial=0, parent=None, registered=True)
        self._free = list(range(self.num_chunks - 1, -1, -1))  # pop() gives the lowest id
        self._free_slots = list(range(self.max_sequences - 1, -1, -1))
        # rows [lo, hi) of each page are reserved and not committed yet: the only rows write_kv
        # may touch (empty: lo = c, hi = 0), so a stale or made-up Slots cannot overwrite
        # another sequence's committed K/V, or write outside the pool from a GPU kernel
        self._pending_lo = np.full(self.num_chunks, self.chunk_size, np.int32)
        self._pending_hi = np.zeros(self.num_chunks, np.int32)
        self._cached: dict = {}  # Node -> None, ordered by when it became cached (LRU first)
        self._seqs: dict[int, SeqState] = {}
        self._next_id = 0
        self._serial = 0
        self._tick = 0
        self.version = 0  # bumps on every structural change (plans compare it)

    # ------------------------------------------------------------------ introspection
    @property
    def sequences(self) -> list[int]:
        return list(self._seqs)

    def seq_len(self, seq: int) -> int:
        return self.sequence(seq).n_tokens

    def seq_slot(self, seq: int) -> int:
        return self.sequence(seq).slot

    def seq_chunks(self, seq: int) -> list[int]:
        """Pool chunk ids of the sequence's path, root side first."""
        return [n.chunk for n in self.sequence(seq).path]

    def seq_nodes(self, seq: int) -> list[Node]:
        return list(self.sequence(seq).path)

    def seq_tokens(self, seq: int) -> list[int]:
        return [t for n in self.sequence(seq).path for t in n.tokens]

    def is_live(self, seq) -> bool:
        return seq in self._seqs

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_referenced(self) -> int:
        return self.num_chunks - len(self._free) - len(self._cached)

    def cached_nodes(self) -> list[Node]:
        """Complete chunks no live sequence uses, least recently used first (eviction order)."""
        return list(self._cached)

    def free_chunks(self) -> list[int]:
        """Pool chunk ids holding no node, in the order they will be handed out last-first."""
        return list(self._free)

    def live_states(self, ids: list) -> "list[SeqState] | None":
        """The states of ``ids`` when every one is a live sequence id, else None (no checks:
        a fast path for planners, which fall back to ``check_batch`` on None)."""
        states = list(map(self._seqs.get, ids))
        return None if None in states else states

    def check_room_for(self, state: SeqState, n_new: int) -> None:
        """Raise ``CacheFullError`` unless ``n_new`` more tokens of ``state`` fit in the pool."""
        self._check_room(self._chunks_needed(state.path[-1] if state.path else None, state.n_tokens, n_new))

    @property
    def backend(self) -> str:
        """'numpy' or 'cupy': where the pool lives (and which kernels the algorithms run)."""
        return "numpy" if self.xp is np else "cupy"

    def nodes(self):
        """Every node of the tree (root excluded) in depth-first order."""
        stack = list(reversed(self.root.children))
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed(n.children))

    def stats(self) -> dict:
        """Memory accounting: tokens stored in the pool vs a flat per-sequence cache."""
        stored = sum(len(n.tokens) for n in self.nodes())
        flat = sum(s.n_tokens for s in self._seqs.values())
        return dict(sequences=len(self._seqs), chunks_free=self.num_free, chunks_cached=self.num_cached,
                    chunks_referenced=self.num_referenced, tokens_stored=stored, tokens_flat=flat)

    def read_kv(self, seq: int, layer: int):
        """K and V of a sequence gathered from the pool: two arrays [n_tokens, Hkv, D] (storage dtype)."""
        s = self.sequence(seq)
        self.check_layer(layer)
        c = self.chunk_size
        if not s.path:
            e = self.xp.zeros((0, self.num_kv_heads, self.head_dim), self.k_pool.dtype)
            return e, e.copy()
        ids = np.array([n.chunk for n in s.path], dtype=np.int64)
        # [n_chunks, Hkv, c, D] -> [n_chunks, c, Hkv, D] -> [n_chunks*c, Hkv, D]
        k = self.k_pool[layer, ids].transpose(0, 2, 1, 3).reshape(-1, self.num_kv_heads, self.head_dim)
        v = self.v_pool[layer, ids].transpose(0, 2, 1, 3).reshape(-1, self.num_kv_heads, self.head_dim)
        return k[: s.n_tokens], v[: s.n_tokens]

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, tokens: _Seq[int] = (), k=None, v=None, *, max_match: int | None = None) -> int:
        """Start a sequence from a prompt, reusing its longest cached prefix of complete chunks.

        Without ``k``/``v`` only the cached prefix is taken (``seq_len`` says how many tokens);
        the caller extends with the rest. With ``k``, ``v`` ([num_layers, len(tokens), Hkv, D],
        storage dtype) the rest of the prompt is written too (K/V rows of matched tokens are
        ignored) and committed. ``max_match`` caps the reused tokens (e.g. ``len(tokens) - 1``
        so the last prompt token is recomputed to get its logits).
        """
        tokens = self.check_tokens(tokens, "tokens")
        k, v = storage_view(k), storage_view(v)  # ml_dtypes / torch CPU bf16: the uint16 bits, no copy
        if (k is None) != (v is None):
            raise ValueError("k, v: expected both or neither, got only one")
        if k is not None:
            self.check_kv(k, "k", len(tokens))
            self.check_kv(v, "v", len(tokens))
        if not self._free_slots:
            raise CacheError(f"max_sequences: expected a free sequence slot, got all {self.max_sequences} "
                             f"in use; release a sequence or make max_sequences larger")
        limit = len(tokens) if max_match is None else min(self._check_max_match(max_match), len(tokens))
        matched = self._match(tokens[:limit])
        n_matched = len(matched) * self.chunk_size
        rest = len(tokens) - n_matched if k is not None else 0
        reviving = sum(1 for n in matched if n.ref == 0)
        self._check_room(self._chunks_needed(None, 0, rest), reviving)
        # --- checks done: mutate
        s = SeqState(id=self._next_id, slot=self._free_slots.pop(), path=[])
        self._next_id += 1
        self._seqs[s.id] = s
        self._tick += 1
        for n in matched:
            self._take(n)
        s.path = list(matched)
        s.n_tokens = s.n_committed = n_matched
        self.slot_lens[s.slot] = n_matched
        self.version += 1
        if rest:
            slots = self._reserve(s, tokens[n_matched:])
            self._write_all(slots, k[:, n_matched:], v[:, n_matched:])
            self._commit(s)
        return s.id

    def extend(self, seq: int, tokens: _Seq[int], k, v) -> None:
        """Append tokens with their K/V for every layer (k, v: [num_layers, n, Hkv, D]) and commit."""
        s = self.sequence(seq)
        tokens = self.check_tokens(tokens, "tokens")
        k, v = storage_view(k), storage_view(v)
        self.check_kv(k, "k", len(tokens))
        self.check_kv(v, "v", len(tokens))
        slots = self.reserve(seq, tokens)
        self._write_all(slots, k, v)
        self._commit(s)

    def append(self, seqs: _Seq[int], tokens: _Seq[int], k, v) -> None:
        """Decode step: one token per sequence (k, v: [num_layers, batch, Hkv, D]), committed."""
        ids = self.check_batch(seqs)  # before anything is reserved: a bad batch changes nothing
        k, v = storage_view(k), storage_view(v)
        self.check_kv(k, "k", len(ids))
        self.check_kv(v, "v", len(ids))
        slots = self.reserve_batch(ids, tokens)
        self._write_all(slots, k, v)
        for sid in ids:
            self._commit(self._seqs[sid])

    def reserve(self, seq: int, tokens: _Seq[int]) -> Slots:
        """Make room for ``tokens`` at the end of ``seq``; K/V is written later (``write_kv``)
        and the tokens become matchable by other prompts only after ``commit``."""
        s = self.sequence(seq)
        tokens = self.check_tokens(tokens, "tokens")
        self.check_committed(s)
        self._check_room(self._chunks_needed(s.path[-1] if s.path else None, s.n_tokens, len(tokens)))
        return self._reserve(s, tokens)

    def reserve_batch(self, seqs: _Seq[int], tokens: _Seq[int]) -> Slots:
        """``reserve`` of one token for each sequence of a batch, all or nothing."""
        seqs = self.check_batch(seqs)
        tokens = self.check_tokens(tokens, "tokens")
        if len(tokens) != len(seqs):
            raise ValueError(f"tokens: expected one token per sequence ({len(seqs)}), got {len(tokens)}")
        states = [self._seqs[i] for i in seqs]
        for s in states:
            self.check_committed(s, "seqs")
        need = sum(self._chunks_needed(s.path[-1] if s.path else None, s.n_tokens, 1) for s in states)
        self._check_room(need)
        parts = [self._reserve(s, [t]) for s, t in zip(states, tokens)]
        return Slots(np.concatenate([p.chunk for p in parts]), np.concatenate([p.offset for p in parts]))

    def write_kv(self, layer: int, slots: Slots, k, v) -> None:
        """Write k, v ([n, Hkv, D], storage dtype; also ``ml_dtypes.bfloat16`` arrays and torch
        tensors, viewed as bits) of one layer into the reserved slots.

        ``slots`` must address tokens reserved since their sequence's last commit (what
        ``reserve``/``reserve_batch`` returned); anything else raises and writes nothing.
        """
        self.check_layer(layer)
        n = self._check_slots(slots)
        k, v = storage_view(k), storage_view(v)
        for name, x in (("k", k), ("v", v)):
            self._check_array(x, name, (n, self.num_kv_heads, self.head_dim))
        self._scatter(layer, slots, k, v)

    def commit(self, seq: int) -> None:
        """Declare every reserved token of ``seq`` written for all layers."""
        self._commit(self.sequence(seq))

    def decode_batch(self, seqs: _Seq[int]) -> "DecodeBatch":
        """Decode steps of a fixed batch (``DecodeBatch``): ``reserve`` one token per sequence,
        write its K/V, ``commit``; the sequences must be live and committed."""
        return DecodeBatch(self, seqs)

    def fork(self, seq: int) -> int:
        """A new sequence with the same tokens: full chunks are shared, the partial tail copied."""
        s = self.sequence(seq)
        self.check_committed(s)
        if not self._free_slots:
            raise CacheError(f"max_sequences: expected a free sequence slot, got all {self.max_sequences} "
                             f"in use; release a sequence or make max_sequences larger")
        c = self.chunk_size
        copy_from = [i for i, n in enumerate(s.path)
                     if not self.share_prefix or len(n.tokens) < c]
        self._check_room(len(copy_from))
        # --- mutate
        t = SeqState(id=self._next_id, slot=self._free_slots.pop(), path=[],
                     n_tokens=s.n_tokens, n_committed=s.n_committed)
        self._next_id += 1
        self._seqs[t.id] = t
        self._tick += 1
        parent = self.root
        for i, n in enumerate(s.path):
            if i in copy_from:
                m = self._new_node(parent, n.tokens)
                self._copy_chunk(n.chunk, m.chunk)
                n = m
            self._take(n)
            t.path.append(n)
            parent = n
        self.slot_lens[t.slot] = t.n_tokens
        self.version += 1
        self._commit(t)
        return t.id

    def release(self, seq: int) -> None:
        """Drop the sequence. Its complete chunks stay cached for later prompts until evicted."""
        s = self.sequence(seq)
        del self._seqs[s.id]
        self._free_slots.append(s.slot)
        self.slot_lens[s.slot] = 0
        self._tick += 1
        for n in reversed(s.path):  # leaf first, so leaves are older in the LRU order
            self._unref(n)
        self.version += 1

    def truncate(self, seq: int, num_tokens: int) -> None:
        """Drop the last ``num_tokens`` tokens of ``seq`` (rejected draft tokens of a speculative
        step); their K/V is simply dropped. Chunks past the new end lose this sequence's
        reference, as in ``release``. Shared chunks are never modified: when the new last chunk
        is partial and is shared, or is a complete chunk other prompts can match (registered),
        it is copied on write into a private chunk holding the kept tokens (this needs a free or
        evictable chunk, else ``CacheFullError``); a private partial tail is cut in place.
        Every token of ``seq`` must be committed. ``num_tokens`` 0 changes nothing; anything
        else bumps ``version`` (plans must be rebuilt).
        """
        s = self.sequence(seq)
        r = check_int(num_tokens, "num_tokens", 0)
        if r > s.n_tokens:
            raise ValueError(f"num_tokens: expected at most the {s.n_tokens} tokens of sequence {s.id}, got {r}")
        self.check_committed(s)
        if r == 0:
            return
        c, n = self.chunk_size, s.n_tokens - r
        keep = -(-n // c)  # chunks of the path that still hold tokens
        tail = s.path[keep - 1] if keep else None
        cut = n - c * (keep - 1) if keep else 0  # tokens of the new last chunk
        copy = tail is not None and cut < len(tail.tokens) and (tail.ref > 1 or tail.registered)
        dropped = s.path[keep:]
        if copy:  # one chunk: free, evictable, or one the dropped chunks give back
            self._check_room(1 - sum(1 for m in dropped if m.ref == 1))
        # --- checks done: mutate
        self._tick += 1
        for m in reversed(dropped):  # leaf first, as in release
            self._unref(m)
        del s.path[keep:]
        if copy:
            m = self._new_node(tail.parent, tail.tokens[:cut])
            self._copy_chunk(tail.chunk, m.chunk)
            self._take(m)
            s.path[-1] = m
            self._unref(tail)
        elif tail is not None:
            del tail.tokens[cut:]
        s.n_tokens = s.n_committed = n
        self._reserve(s, [])  # publishes the new length (a GPU cache marks its device copy stale)
        self.version += 1

    def _unref(self, n: Node) -> None:
        """Drop one reference of ``n`` (``release``, ``truncate``): unreferenced, it is cached if
        registered (matchable, evictable) and freed otherwise."""
        n.ref -= 1
        n.last_use = self._tick
        if n.ref == 0:
            if n.registered:
                self._cached[n] = None
            else:
                self._free_node(n)

    def evict(self, max_chunks: int | None = None) -> int:
        """Evict up to ``max_chunks`` cached chunks (all when None), least recently used first."""
        # a float would evict one chunk too many (count < 1.5): TypeError; a negative count ValueError
        max_chunks = check_optional_int(max_chunks, "max_chunks", 0)
        count = 0
        while self._cached and (max_chunks is None or count < max_chunks):
            self._evict_one()
            count += 1
        return count

    # ------------------------------------------------------------------ internals
    def sequence(self, seq, name: str = "seq") -> SeqState:
        # integers only: int() would truncate 0.7 to sequence 0 and accept True and "1"
        try:
            key = None if isinstance(seq, (bool, np.bool_)) else operator.index(seq)
        except TypeError:
            key = None
        s = self._seqs.get(key)
        if s is None:
            raise CacheError(f"{name}: expected a live sequence id, got {seq!r} (unknown or released)")
        return s

    def check_batch(self, seqs, name: str = "seqs") -> list[int]:
        """Distinct live sequence ids from a list, tuple or 1-D integer array (a scalar is not a
        batch: TypeError); an element that is no live id raises CacheError, as a single one does."""
        if isinstance(seqs, np.ndarray):
            seqs = check_ids(seqs, name)  # 1-D integer arrays only
        elif not isinstance(seqs, (list, tuple, range)):
            raise TypeError(f"{name}: expected a 1-D list of sequence ids, got {type(seqs).__name__} {seqs!r}")
        if not seqs:
            raise ValueError(f"{name}: expected a non-empty batch of sequence ids, got an empty one")
        seqs = [self.sequence(x, name).id for x in seqs]
        if len(set(seqs)) != len(seqs):
            dup = sorted({x for x in seqs if seqs.count(x) > 1})
            raise ValueError(f"{name}: expected distinct sequence ids, got duplicates {dup}")
        return seqs

    @staticmethod
    def _check_max_match(max_match) -> int:
        return check_int(max_match, "max_match", 0)

    def check_committed(self, s: SeqState, name: str = "seq") -> None:
        if s.n_committed != s.n_tokens:
            raise CacheError(f"{name}: expected a sequence with every token committed, got sequence {s.id} "
                             f"with {s.n_tokens - s.n_committed} reserved tokens not yet committed "
                             f"(mid-prefill); commit it first")

    def check_layer(self, layer) -> int:
        """``layer`` as an int in [0, num_layers); bools are refused (NumPy would read True as a new axis)."""
        return check_int(layer, "layer", 0, self.num_layers)

    @staticmethod
    def check_tokens(tokens, name) -> list[int]:
        try:
            arr = np.asarray(tokens)
        except ValueError:  # ragged nesting: NumPy's own message would name nothing
            raise TypeError(f"{name}: expected a 1-D sequence of integer token ids, got a ragged "
                            f"nested sequence") from None
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{name}: expected a 1-D sequence of integer token ids, got "
                            f"{arr.dtype} with shape {arr.shape}")
        return [int(t) for t in arr]

    def _check_array(self, x, name, shape) -> None:
        want = storage_numpy_dtype(self.dtype)
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
        if np.dtype(x.dtype) != np.dtype(want):
            raise TypeError(f"{name}: expected dtype {np.dtype(want).name} for {self.dtype} storage, "
                            f"got {x.dtype} (convert with cpattn.reference.dtypes.to_storage)")

    def _check_slots(self, slots) -> int:
        chunk, offset = getattr(slots, "chunk", None), getattr(slots, "offset", None)
        if not isinstance(chunk, np.ndarray) or not isinstance(offset, np.ndarray) \
                or chunk.ndim != 1 or offset.shape != chunk.shape \
                or not (np.issubdtype(chunk.dtype, np.integer) and np.issubdtype(offset.dtype, np.integer)):
            raise TypeError(f"slots: expected the Slots returned by reserve/reserve_batch (two 1-D "
                            f"integer arrays of one length), got {type(slots).__name__}")
        inside = (chunk >= 0) & (chunk < self.num_chunks) & (offset >= 0) & (offset < self.chunk_size)
        pending = np.zeros_like(inside)
        pending[inside] = (offset[inside] >= self._pending_lo[chunk[inside]]) & \
                          (offset[inside] < self._pending_hi[chunk[inside]])
        if not pending.all():
            i = int(np.flatnonzero(~pending)[0])
            raise ValueError(f"slots: expected token slots reserved and not yet committed (from the "
                             f"latest reserve of a sequence), got chunk {int(chunk[i])} row {int(offset[i])} "
                             f"at position {i}, which is "
                             + ("outside the pool" if not inside[i] else "not pending (stale slots?)"))
        return len(chunk)

    def check_kv(self, x, name, n) -> None:
        self._check_array(x, name, (self.num_layers, n, self.num_kv_heads, self.head_dim))

    def _chunks_needed(self, tail: Node | None, n_tokens: int, n_new: int) -> int:
        c = self.chunk_size
        room = (c - len(tail.tokens)) if tail is not None else 0
        return -(-max(0, n_new - room) // c)

    def _check_room(self, need: int, reviving: int = 0) -> None:
        have = len(self._free) + len(self._cached) - reviving
        if need > have:
            raise CacheFullError(
                f"pool: expected {need} free or evictable chunks, got {len(self._free)} free and "
                f"{len(self._cached) - reviving} evictable of {self.num_chunks}; release sequences "
                f"or make the pool larger")

    def _match(self, tokens: list[int]) -> list[Node]:
        if not self.share_prefix:
            return []
        c, node, out = self.chunk_size, self.root, []
        for i in range(0, len(tokens) - c + 1, c):
            nxt = node.index.get(tuple(tokens[i:i + c]))
            if nxt is None:
                break
            out.append(nxt)
            node = nxt
        return out

    def _take(self, n: Node) -> None:
        if n.ref == 0:
            self._cached.pop(n, None)
        n.ref += 1
        n.last_use = self._tick

    def _alloc_chunk(self) -> int:
        if not self._free:
            self._evict_one()
        return self._free.pop()

    def _evict_one(self) -> None:
        victim = next((n for n in self._cached if not n.children), None)
        if victim is None:  # cannot happen: a cached node's children are cached too
            raise AssertionError("no cached leaf to evict")
        self._free_node(victim)

    def _new_node(self, parent: Node, tokens) -> Node:
        self._serial += 1
        n = Node(chunk=self._alloc_chunk(), serial=self._serial, parent=parent, tokens=list(tokens),
                 last_use=self._tick)
        parent.children.append(n)
        self.version += 1
        return n

    def _free_node(self, n: Node) -> None:
        self._cached.pop(n, None)
        p = n.parent
        p.children.remove(n)
        if n.registered and p.index.get(tuple(n.tokens)) is n:
            del p.index[tuple(n.tokens)]
        was_registered = n.registered
        n.registered = False
        self._pending_lo[n.chunk], self._pending_hi[n.chunk] = self.chunk_size, 0
        self._free.append(n.chunk)
        self.version += 1
        if was_registered:  # a duplicate of the evicted chunk (same parent, same tokens) takes its place
            twin = next((m for m in p.children if not m.registered and m.tokens == n.tokens
                         and self._is_committed(m)), None)
            if twin is not None and p.registered:
                self._register_down(p, twin)

    def _reserve(self, s: SeqState, tokens: list[int]) -> Slots:
        c = self.chunk_size
        chunk = np.empty(len(tokens), np.int32)
        offset = np.empty(len(tokens), np.int32)
        i = 0
        while i < len(tokens):  # fill the tail, then one new chunk at a time
            tail = s.path[-1] if s.path else None
            if tail is None or len(tail.tokens) == c:
                tail = self._new_node(tail if tail is not None else self.root, [])
                self._take(tail)
                s.path.append(tail)
            j = min(len(tokens), i + c - len(tail.tokens))
            lo, hi = len(tail.tokens), len(tail.tokens) + j - i
            self._pending_lo[tail.chunk] = min(int(self._pending_lo[tail.chunk]), lo)
            self._pending_hi[tail.chunk] = max(int(self._pending_hi[tail.chunk]), hi)
            chunk[i:j] = tail.chunk
            offset[i:j] = np.arange(len(tail.tokens), len(tail.tokens) + j - i)
            tail.tokens.extend(tokens[i:j])
            i = j
        s.n_tokens += len(tokens)
        self.slot_lens[s.slot] = s.n_tokens
        return Slots(chunk, offset)

    def _commit(self, s: SeqState) -> None:
        c = self.chunk_size
        for n in s.path[s.n_committed // c: -(-s.n_tokens // c)]:  # pages of the reserved rows
            self._pending_lo[n.chunk], self._pending_hi[n.chunk] = c, 0
        s.n_committed = s.n_tokens
        if not self.share_prefix:
            return
        # register complete chunks root-first; a registered node's ancestors are registered, so
        # the registered nodes are a prefix of the path: find its end by bisection, go on from there
        lo, hi = 0, len(s.path)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if s.path[mid].registered else (lo, mid)
        parent = s.path[lo - 1] if lo else self.root
        for n in s.path[lo:]:
            if not n.registered:
                key = tuple(n.tokens)
                if len(n.tokens) < self.chunk_size or not parent.registered or key in parent.index:
                    return
                parent.index[key] = n
                n.registered = True
            parent = n

    def _is_committed(self, n: Node) -> bool:
        """Full, and none of its rows reserved without a commit."""
        return len(n.tokens) == self.chunk_size and self._pending_hi[n.chunk] == 0

    def _register_down(self, parent: Node, n: Node) -> None:
        """Register ``n`` under ``parent`` and, below it, every complete committed node that a
        registered twin had kept out of the index (depth-first; at most one per token key)."""
        stack = [(parent, n)]
        while stack:
            parent, n = stack.pop()
            key = tuple(n.tokens)
            if n.registered or not self._is_committed(n) or key in parent.index:
                continue
            parent.index[key] = n
            n.registered = True
            stack.extend((n, m) for m in reversed(n.children))

    def _scatter(self, layer, slots: Slots, k, v) -> None:
        xp = self.xp
        ch, off = xp.asarray(slots.chunk), xp.asarray(slots.offset)
        # pool[layer, chunk, :, offset, :] = k[i]  (advanced indices split by a slice -> [n, Hkv, D])
        self.k_pool[layer, ch, :, off, :] = xp.asarray(k)
        self.v_pool[layer, ch, :, off, :] = xp.asarray(v)

    def _write_all(self, slots: Slots, k, v) -> None:
        for layer in range(self.num_layers):
            self._scatter(layer, slots, k[layer], v[layer])

    def _copy_chunk(self, src: int, dst: int) -> None:
        self.k_pool[:, dst] = self.k_pool[:, src]
        self.v_pool[:, dst] = self.v_pool[:, src]


class DecodeBatch:
    """Decode steps of one fixed batch of sequences: per step ``reserve(tokens)`` (one token per
    sequence, all or nothing, as ``reserve_batch``), the K/V written at the returned ``Slots``,
    then ``commit()``. After a reserve, ``positions`` holds each reserved token's position and
    ``opened`` whether it opened a new chunk (a decode plan must then be rebuilt).

    This is the textbook version: ``reserve_batch`` and one ``commit`` per sequence. A GPU cache
    returns its own batch (``cpattn.chunk_cache.GpuDecodeBatch``) that keeps the same state in
    arrays for a fast host step; both give the same slots and leave the same tree.
    """

    def __init__(self, cache: ChunkCache, seqs: _Seq[int]):
        self.cache = cache
        self.seqs = tuple(cache.check_batch(seqs))
        for i in self.seqs:
            cache.check_committed(cache.sequence(i, "seqs"), "seqs")
        self.positions = np.zeros(0, np.int32)  # int32 [B] after a reserve
        self.opened = np.zeros(0, bool)  # bool [B] after a reserve
        self.num_opened = 0  # opened.sum() after a reserve

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def row_slots(self) -> np.ndarray:
        """Each row's slot in the cache's length table ``slot_lens`` (int32 [B]); fixed while
        the batch's sequences live."""
        return np.array([self.cache.seq_slot(i) for i in self.seqs], np.int32)

    def check_tokens(self, tokens: _Seq[int]) -> np.ndarray:
        """``tokens`` as int64 [B] (one token id per sequence), else the error ``reserve`` raises."""
        toks = self.cache.check_tokens(tokens, "tokens")
        if len(toks) != len(self.seqs):
            raise ValueError(f"tokens: expected one token per sequence ({len(self.seqs)}), got {len(toks)}")
        return np.array(toks, np.int64)

    def reserve(self, tokens: _Seq[int]) -> Slots:
        """One token for each sequence of the batch (``tokens[b]`` for ``seqs[b]``)."""
        slots = self.cache.reserve_batch(self.seqs, tokens)
        self.positions = np.array([self.cache.seq_len(i) - 1 for i in self.seqs], np.int32)
        self.opened = slots.offset == 0
        self.num_opened = int(self.opened.sum())
        return slots

    def commit(self) -> None:
        """Declare the reserved tokens written for every layer (nothing reserved: no change)."""
        for i in self.seqs:
            self.cache.commit(i)
