"""The chunk tree with its pool on the GPU.

Same tree, same layout as ``cpattn.reference.ChunkCache`` (it *is* that class with
``xp=cupy``); writes into the pool go through the ``kv_append`` kernel, and per-slot sequence
lengths are mirrored in a device array that the decode kernels read, so a decode plan stays
valid while sequences grow inside their tail chunks.
"""
from __future__ import annotations

import numpy as np

from .arrays import as_cupy, import_cupy
from .kernels import APPEND_THREADS, get_kernels
from .reference.chunk_cache import ChunkCache, Slots


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

    def sync_lens(self) -> None:
        """Upload the host length table if it changed (a small H2D copy on the current stream)."""
        if self._lens_dirty:
            self.d_slot_lens.set(self.slot_lens)
            self._lens_dirty = False

    # every change of the host length table marks the device copy stale (plan() and writes
    # upload it): a forked sequence or a matched prompt gets its length without a _reserve
    def add_sequence(self, *args, **kwargs) -> int:
        sid = super().add_sequence(*args, **kwargs)
        self._lens_dirty = True
        return sid

    def fork(self, seq: int) -> int:
        sid = super().fork(seq)
        self._lens_dirty = True
        return sid

    def release(self, seq: int) -> None:
        super().release(seq)
        self._lens_dirty = True

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
            self._lens_dirty = True
        for i in np.flatnonzero(~fits):
            part = self._reserve(states[i], [tokens[i]])
            chunk[i], offset[i] = part.chunk[0], part.offset[0]
        return Slots(chunk, offset)

    def _reserve(self, s, tokens):
        out = super()._reserve(s, tokens)
        self._lens_dirty = True
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
