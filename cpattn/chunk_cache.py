"""The chunk tree with its pool on the GPU.

Same tree, same layout as ``cpattn.reference.ChunkCache`` (it *is* that class with
``xp=cupy``); writes into the pool go through the ``kv_append`` kernel, and per-slot sequence
lengths are mirrored in a device array that the decode kernels read, so a decode plan stays
valid while sequences grow inside their tail chunks.

``decode_batch`` returns a ``GpuDecodeBatch``: the reference's ``DecodeBatch`` with its state in
arrays, so that a decode step's host work does not grow with a Python loop over the batch.
"""
from __future__ import annotations

import numpy as np

from .arrays import as_cupy, host_jit, import_cupy
from .kernels import APPEND_THREADS, get_kernels
from .reference.chunk_cache import ChunkCache, DecodeBatch, Slots


class GpuChunkCache(ChunkCache):
    """``ChunkCache`` whose pool is CuPy memory on the current device (see its docstring)."""

    def __init__(self, num_layers, num_kv_heads, head_dim, num_chunks, chunk_size=64, dtype="float16",
                 share_prefix=True, max_sequences=4096):
        cupy = import_cupy("GpuChunkCache")
        super().__init__(num_layers, num_kv_heads, head_dim, num_chunks, chunk_size=chunk_size, dtype=dtype,
                         xp=cupy, share_prefix=share_prefix, max_sequences=max_sequences)
        self._kern = get_kernels("chunk_cache", self.dtype, self.head_dim, self.chunk_size)
        self.d_slot_lens = cupy.zeros(self.max_sequences, np.int32)
        self._lens_dirty = False
        self._lens_ahead: "GpuDecodeBatch | None" = None  # the batch whose step advanced the device table
        self._slots_hi = 0  # slots ever handed out are below this (the free list hands out the lowest first)
        self._lazy: "GpuDecodeBatch | None" = None  # the batch whose state lives in its arrays

    def sync_lens(self) -> None:
        """Upload the host length table if it changed (a small H2D copy on the current stream)."""
        if self._lens_dirty:
            hi = self._slots_hi  # slots above it were never used: their length stays 0 on both sides
            self.d_slot_lens[:hi].set(self.slot_lens[:hi])
            self._lens_dirty, self._lens_ahead = False, None

    def lens_advanced(self, by: "GpuDecodeBatch | None" = None) -> None:
        """Declare that work launched on the device advances ``d_slot_lens`` by one at the slots of
        ``by``'s rows once it has read it (the graphed decode step does: ``GraphedDecoder``). The
        device table is then stale for every reader (``sync_lens`` uploads the host's), except
        for ``by`` after its next ``reserve`` (``GpuDecodeBatch.lens_current``) when nothing
        else changed or uploaded the host table between."""
        self._lens_dirty, self._lens_ahead = True, by

    def _lens_changed(self) -> None:
        """The host length table changed: the device copy is stale for everyone."""
        self._lens_dirty, self._lens_ahead = True, None

    # every change of the host length table marks the device copy stale (plan() and writes
    # upload it): a forked sequence or a matched prompt gets its length without a _reserve
    def add_sequence(self, *args, **kwargs) -> int:
        sid = super().add_sequence(*args, **kwargs)
        self._lens_changed()
        self._slots_hi = max(self._slots_hi, self._seqs[sid].slot + 1)
        return sid

    def fork(self, seq: int) -> int:
        sid = super().fork(seq)
        self._lens_changed()
        self._slots_hi = max(self._slots_hi, self._seqs[sid].slot + 1)
        return sid

    def release(self, seq: int) -> None:
        super().release(seq)
        self._lens_changed()

    # ------------------------------------------------------------------ the decode batch
    def decode_batch(self, seqs) -> "GpuDecodeBatch":
        return GpuDecodeBatch(self, seqs)

    def settle(self) -> None:
        """Write the active decode batch's array state back into the tree (its tail tokens and
        lengths). Every entry point that reads or changes a sequence, the tree or a batch calls
        it first, so nothing outside the batch ever sees the arrays."""
        if self._lazy is not None:
            batch, self._lazy = self._lazy, None
            batch.flush()

    def _room(self) -> int:
        """Chunks free or evictable (what ``_check_room`` compares against)."""
        return len(self._free) + len(self._cached)

    def _commit_seq(self, s) -> None:
        """The tree's commit of one sequence state (the decode batch registers filled chunks)."""
        self._commit(s)

    def sequence(self, seq, name: str = "seq"):
        self.settle()
        return super().sequence(seq, name)

    def check_batch(self, seqs, name: str = "seqs") -> list[int]:
        self.settle()
        return super().check_batch(seqs, name)

    def live_states(self, ids: list):
        """``ChunkCache.live_states`` for planners, which read each state's slot, path and length:
        the active decode batch writes its lengths into the states and stays active (its arrays
        stay exact while nothing changes the tree, and every change settles it); the newest
        tokens of the tail nodes may still be in its arrays."""
        if self._lazy is not None:
            self._lazy.flush_lengths()
        return super().live_states(ids)

    def nodes(self):
        self.settle()
        return super().nodes()

    def reserve_batch(self, seqs, tokens) -> Slots:
        """``ChunkCache.reserve_batch`` (same checks, all or nothing, same state after), with the
        tokens that fit in their sequence's tail chunk (most of them in a decode step) placed for
        the whole batch at once; only the sequences that start a chunk go one by one.
        tests/test_reserve_fast_path.py compares the two on random trees."""
        seqs = self.check_batch(seqs)
        tokens = self.check_tokens(tokens, "tokens")
        if len(tokens) != len(seqs):
            return super().reserve_batch(seqs, tokens)  # raises
        states = [self._seqs[i] for i in seqs]
        for s in states:
            self.check_committed(s, "seqs")
        c = self.chunk_size
        fits = np.fromiter((bool(s.path) and len(s.path[-1].tokens) < c for s in states), bool, len(states))
        self._check_room(int((~fits).sum()))  # one new chunk per sequence that starts one; raises before any change
        chunk = np.empty(len(states), np.int32)
        offset = np.empty(len(states), np.int32)
        idx = np.flatnonzero(fits)
        if len(idx):
            tails = [states[i].path[-1] for i in idx]
            ch = np.fromiter((t.chunk for t in tails), np.int32, len(idx))
            off = np.fromiter((len(t.tokens) for t in tails), np.int32, len(idx))
            # a partial tail is never shared, so the chunks are distinct and fancy assignment is exact
            self._pending_lo[ch] = np.minimum(self._pending_lo[ch], off)
            self._pending_hi[ch] = np.maximum(self._pending_hi[ch], off + 1)
            for i, t in zip(idx, tails):
                t.tokens.append(tokens[i])
                states[i].n_tokens += 1
            self.slot_lens[[states[i].slot for i in idx]] = [states[i].n_tokens for i in idx]
            chunk[idx], offset[idx] = ch, off
            self._lens_changed()
        for i in np.flatnonzero(~fits):
            part = self._reserve(states[i], [tokens[i]])
            chunk[i], offset[i] = part.chunk[0], part.offset[0]
        return Slots(chunk, offset)

    def _reserve(self, s, tokens):
        out = super()._reserve(s, tokens)
        self._lens_changed()
        return out

    def _check_array(self, x, name, shape) -> None:
        if isinstance(x, np.ndarray):  # host K/V is accepted and copied up in _scatter
            super()._check_array(x, name, shape)
            return
        # type, device, dtype and shape before anything changes; layout is _scatter's business
        as_cupy(x, name, self.dtype, shape, contiguous=False)

    def _device_kv(self, x, name, shape):
        """x as a C-contiguous, 16-byte aligned CuPy array (kv_append loads uint4 vectors)."""
        import cupy

        x = cupy.asarray(x) if isinstance(x, np.ndarray) else as_cupy(x, name, self.dtype, shape, contiguous=False)
        x = cupy.ascontiguousarray(x)
        return x if x.data.ptr % 16 == 0 else x.copy()

    def write_kv_device(self, layer: int, slot_chunk, slot_offset, k, v) -> None:
        """``write_kv`` for a CUDA graph: the slots are device int32 arrays [n] (the chunk and
        offset of ``reserve``/``reserve_batch``, uploaded by the caller), k, v device arrays
        [n, Hkv, D] in the storage dtype, C-contiguous. One kernel launch, no host work that
        depends on the values, so a graph captured once replays it with new slots.

        What is checked: layer, types, dtypes, shapes. Not checked (the values live on the
        device): that the slots are reserved and uncommitted; ``write_kv`` checks that.
        """
        self.check_layer(layer)
        slot_chunk, slot_offset = as_cupy(slot_chunk, "slot_chunk"), as_cupy(slot_offset, "slot_offset")
        n = slot_chunk.shape[0] if slot_chunk.ndim == 1 else -1
        for name, a in (("slot_chunk", slot_chunk), ("slot_offset", slot_offset)):
            if a.dtype != np.int32 or a.shape != (max(n, 0),) or n < 0:
                raise ValueError(f"{name}: expected a device int32 array [n] (n equal for both), got {a.dtype} "
                                 f"{a.shape}")
        shape = (n, self.num_kv_heads, self.head_dim)
        k, v = as_cupy(k, "k", self.dtype, shape), as_cupy(v, "v", self.dtype, shape)
        total = n * self.num_kv_heads * (self.head_dim // 8)
        if total:
            self._kern["kv_append"](
                (-(-total // APPEND_THREADS),), (APPEND_THREADS,),
                (k, v, slot_chunk, slot_offset, self.k_pool, self.v_pool,
                 np.int64(layer * self.num_chunks * self.num_kv_heads), np.int32(self.num_kv_heads), np.int32(n)))

    def _scatter(self, layer, slots: Slots, k, v) -> None:
        import cupy

        n = len(slots.chunk)
        shape = (n, self.num_kv_heads, self.head_dim)
        k, v = self._device_kv(k, "k", shape), self._device_kv(v, "v", shape)
        sl = cupy.asarray(np.concatenate([slots.chunk, slots.offset]).astype(np.int32))
        total = n * self.num_kv_heads * (self.head_dim // 8)
        if total:
            self._kern["kv_append"](
                (-(-total // APPEND_THREADS),), (APPEND_THREADS,),
                (k, v, sl[:n], sl[n:], self.k_pool, self.v_pool,
                 np.int64(layer * self.num_chunks * self.num_kv_heads), np.int32(self.num_kv_heads), np.int32(n)))
        self.sync_lens()


# rows of GpuDecodeBatch's state array (int64 [5, B])
SLOT, LENGTH, TAIL, TAIL_LEN, FILL = range(5)


@host_jit
def _reserve_fits(toks, st, pend, pending_lo, pending_hi, slot_lens, c, room, out):
    """One token per row into its tail chunk: ``out[:, b]`` = (chunk, row, position). Rows whose
    tail is full are left to the caller (``out[0, b] = -1``); returns their count, or minus it
    with nothing changed when the pool has fewer than that many chunks free or evictable."""
    B = toks.shape[0]
    full = 0
    for b in range(B):
        full += st[TAIL_LEN, b] == c
    if full > room:
        return -full
    for b in range(B):
        n = st[LENGTH, b] + 1
        out[2, b] = n - 1
        st[LENGTH, b] = n
        slot_lens[st[SLOT, b]] = n
        off = st[TAIL_LEN, b]
        if off == c:
            out[0, b], out[1, b] = -1, 0
            continue
        ch = st[TAIL, b]
        out[0, b], out[1, b] = ch, off
        pend[b, st[FILL, b]] = toks[b]
        st[FILL, b] += 1
        st[TAIL_LEN, b] = off + 1
        # a partial tail is never shared: each chunk is one row's
        pending_lo[ch] = min(pending_lo[ch], off)
        pending_hi[ch] = max(pending_hi[ch], off + 1)
    return full


@host_jit
def _commit_rows(st, chunks, pending_lo, pending_hi, c, filled):
    """The reserved rows committed (``chunks``: the reserve's pages); ``filled[:k]`` = the rows
    whose tail chunk is now full (to register), returns k."""
    k = 0
    for b in range(chunks.shape[0]):
        ch = chunks[b]
        pending_lo[ch], pending_hi[ch] = c, 0
        if st[TAIL_LEN, b] == c:
            filled[k] = b
            k += 1
    return k


class GpuDecodeBatch(DecodeBatch):
    """``DecodeBatch`` of a ``GpuChunkCache`` (same checks, slots, errors and tree after every
    step; tests/test_decode_batch.py compares them on random trees), with the per-sequence state
    in arrays: a step where every token fits its tail chunk is two compiled loops whatever the
    batch size; a sequence whose tail is full opens its chunk in Python (one per sequence every
    ``chunk_size`` steps).

    While the batch is *active* (``cache._lazy is self``) the tail chunks' newest tokens and the
    sequences' lengths live only here: ``_pend[b, :_st[FILL, b]]`` are the tokens of row b not
    yet in its tail node, ``_st[LENGTH, b]`` its length. Page bookkeeping (the reserved rows,
    the length table) is kept current at once. Anything else that touches the cache calls
    ``cache.settle()`` first, which flushes this state into the tree and deactivates the batch;
    the next ``reserve`` reactivates it (one pass over the batch).
    """

    def __init__(self, cache: GpuChunkCache, seqs):
        super().__init__(cache, seqs)
        B, c = len(self.seqs), cache.chunk_size
        self._pend = np.zeros((B, c), np.int64)
        self._st = np.zeros((5, B), np.int64)
        self._out = np.zeros((3, B), np.int32)
        self._filled = np.zeros(B, np.int64)
        self._reserved = False  # a reserve not yet committed
        self._opened: list = []  # rows that opened a chunk in the reserve not yet committed
        self._states = self._tails = None
        self._activate()  # the reference checked: every sequence live and committed

    # ------------------------------------------------------------------ activation
    def _activate(self) -> bool:
        """Take the batch's state into the arrays; False (nothing taken) when a sequence has
        reserved tokens not committed: the reference path then raises what it raises."""
        cache = self.cache
        cache.settle()  # any other active batch: its state into the tree, deactivated
        states = cache.live_states(list(self.seqs))
        if states is None:
            cache.check_batch(list(self.seqs))  # raises: a sequence was released
        if any(s.n_committed != s.n_tokens for s in states):
            return False
        c, B = cache.chunk_size, len(states)
        self._states = states
        self._tails = [s.path[-1] if s.path else None for s in states]
        st = self._st
        st[SLOT] = np.fromiter((s.slot for s in states), np.int64, B)
        st[LENGTH] = np.fromiter((s.n_tokens for s in states), np.int64, B)
        # a sequence with no chunk counts as a full tail: its first token opens one
        st[TAIL] = np.fromiter((t.chunk if t is not None else -1 for t in self._tails), np.int64, B)
        st[TAIL_LEN] = np.fromiter((len(t.tokens) if t is not None else c for t in self._tails), np.int64, B)
        st[FILL] = 0
        self._reserved = False
        cache._lazy = self
        return True

    def flush(self) -> None:
        """The array state into the tree: tail tokens and sequence lengths (``cache.settle``)."""
        for b in np.flatnonzero(self._st[FILL]).tolist():
            self._flush_row(b)
        self.flush_lengths()

    def flush_lengths(self) -> None:
        """The sequence lengths into their states (``cache.live_states``)."""
        for s, n in zip(self._states, self._st[LENGTH].tolist()):
            s.n_tokens, s.n_committed = n, n - 1 if self._reserved else n

    def _flush_row(self, b: int) -> None:
        self._tails[b].tokens.extend(self._pend[b, :self._st[FILL, b]].tolist())
        self._st[FILL, b] = 0

    # ------------------------------------------------------------------ one step
    def reserve(self, tokens) -> Slots:
        cache = self.cache
        if self._reserved or (cache._lazy is not self and not self._activate()):
            cache.settle()  # reserved tokens not committed: the reference path raises, or goes on
            slots = super().reserve(tokens)
            self._reserved = True
            return slots
        toks = self.check_tokens(tokens)
        c, st, out = cache.chunk_size, self._st, self._out
        full = _reserve_fits(toks, st, self._pend, cache._pending_lo, cache._pending_hi, cache.slot_lens, c,
                             cache._room(), out)
        if full < 0:
            cache._check_room(-full)  # raises; nothing was changed
        self._opened = np.flatnonzero(out[0] < 0).tolist() if full else []
        for b in self._opened:  # the sequences that open a chunk, one by one, in batch order
            if st[FILL, b]:
                self._flush_row(b)
            s, n = self._states[b], int(st[LENGTH, b])
            s.n_tokens = s.n_committed = n - 1
            part = cache._reserve(s, [int(toks[b])])  # a new tail node, its token in it; the length table
            self._tails[b] = s.path[-1]
            out[0, b] = st[TAIL, b] = part.chunk[0]
            st[TAIL_LEN, b] = 1
        if cache._lens_ahead is self:  # each row's length grew by one, as the device step's advance did
            cache._lens_dirty = True
        else:
            cache._lens_changed()
        self._reserved = True
        self.positions = out[2].copy()
        self.opened = out[1] == 0
        self.num_opened = len(self._opened)
        return Slots(out[0].copy(), out[1].copy())

    # ------------------------------------------------------------------ the device length table
    @property
    def row_slots(self) -> np.ndarray:
        """The length-table slot of each row (int32 [B]), as ``DecodeBatch.row_slots``."""
        if self.cache._lazy is self:  # active: every row is live (a release settles the batch first)
            return self._st[SLOT].astype(np.int32)
        return super().row_slots

    def lens_advanced(self) -> None:
        """``cache.lens_advanced(by=self)``: a launched step advances the device length table
        at this batch's rows (``lens_current`` after the next reserve says whether that did its work)."""
        self.cache.lens_advanced(self)

    def lens_current(self) -> bool:
        """After a ``reserve``: True when the device length table equals the host's without an
        upload (the last step's device advance did this reserve's work, and nothing else changed
        the host table or uploaded it since ``lens_advanced``); the table is then marked current.
        False otherwise: call ``cache.sync_lens()``."""
        cache = self.cache
        if cache._lens_ahead is not self or not self._reserved:
            return False
        cache._lens_dirty, cache._lens_ahead = False, None
        return True

    def commit(self) -> None:
        cache = self.cache
        if cache._lazy is not self:  # settled since the reserve: the tree is exact, commit as the reference
            self._reserved = False
            super().commit()
            return
        if not self._reserved:
            return
        k = _commit_rows(self._st, self._out[0], cache._pending_lo, cache._pending_hi, cache.chunk_size,
                         self._filled)
        self._reserved = False
        for b in self._opened:
            self._states[b].n_committed = int(self._st[LENGTH, b])
        for b in self._filled[:k].tolist():  # a chunk that just filled becomes matchable (registered)
            if self._st[FILL, b]:
                self._flush_row(b)
            s = self._states[b]
            s.n_tokens = s.n_committed = int(self._st[LENGTH, b])
            cache._commit_seq(s)
        self._opened = []

    def check_tokens(self, tokens) -> np.ndarray:
        """``DecodeBatch.check_tokens`` without a Python loop for a 1-D integer array or a list of ints."""
        if isinstance(tokens, list):
            try:
                tokens = np.asarray(tokens)
            except ValueError:  # ragged: the reference names it
                return super().check_tokens(tokens)
        if not (isinstance(tokens, np.ndarray) and tokens.ndim == 1 and tokens.dtype.kind in "iu"):
            return super().check_tokens(tokens)
        if len(tokens) != len(self.seqs):
            raise ValueError(f"tokens: expected one token per sequence ({len(self.seqs)}), got {len(tokens)}")
        return tokens.astype(np.int64, copy=False)
