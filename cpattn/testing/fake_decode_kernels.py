"""CPU stand-ins for ChunkAttention's decode kernels (raw_kernels/chunk_attention.cu:
``chunk_attend`` and ``chunk_merge``, one query per sequence), for the emulated backend
(``fake_cupy``), taking the launch arguments ``cpattn.chunk_attention.ChunkAttentionDecode``
passes: the grid, the unit table and the plan arrays in "device" memory, the device length
table. They read the uploaded arrays the way the kernels do (a unit's chunks, rows, kv head
and state rows; each sequence's pieces and items in the merge), compute in float64 and store
float32 states, so the GPU decoder's host code (planning, the one upload, launch arguments,
what a CUDA graph bakes in) runs on the CPU. Like the kernels, they are recorded, not run,
while a stream captures. Their numerics are not the kernels' (those are tested on the GPU).
"""
from __future__ import annotations

import numpy as np

from ..reference.chunk_attention import attention_state, merge_states
from ..reference.dtypes import to_float32, to_storage
from .fake_cupy import FakeDeviceArray, launch


def _pointer(a):
    """``a`` read as a kernel reads its pointer argument: from its first element to the end of
    its allocation, flat (a view's own length means nothing to a kernel; a CUDA graph keeps the
    pointer while the buffer's contents change)."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    assert a.flags.c_contiguous and root.flags.c_contiguous
    flat = root.reshape(-1).view(np.uint8)
    start = a.ctypes.data - root.ctypes.data
    return flat[start:start + (flat.size - start) // a.itemsize * a.itemsize].view(a.dtype)


def _dtype_of(pool) -> str:
    return "float16" if pool.dtype == np.float16 else "bfloat16"


@launch
def chunk_attend(grid, block, args, shared_mem=0):
    (q, k_pool, v_pool, layer_page0, units, chunk_list, order, slot_lens, o_states, lse_states, num_q_heads,
     num_kv_heads, group, scale_log2, queries_per_seq, slots, query_bits) = args
    for a in (q, k_pool, v_pool, units, chunk_list, order, slot_lens, o_states, lse_states):
        assert isinstance(a, FakeDeviceArray), f"kernel argument on the host: {type(a).__name__}"
    chunk_list, order, o_states, lse_states = map(_pointer, (chunk_list, order, o_states, lse_states))
    assert int(queries_per_seq) == 1, "the stand-in runs one query per sequence (chunk_attend)"
    assert grid[0] == len(units), f"one block per unit: grid {grid}, {len(units)} units"
    dtype = _dtype_of(k_pool)
    L, N, H, C, D = k_pool.shape
    Hq, Hkv, G = int(num_q_heads), int(num_kv_heads), int(group)
    assert Hkv == H and Hq == Hkv * G
    layer = int(layer_page0) // (N * H)
    kp, vp = k_pool[layer], v_pool[layer]  # [N, H, C, D]
    qf = to_float32(np.asarray(q), dtype).astype(np.float64)
    scale = float(scale_log2) / np.log2(np.e)
    rows_max, written = len(lse_states), set()
    for cb, ce, slot, minus, pos0, row0, n, kvh, out_base in np.asarray(units).tolist():
        nk = (ce - cb) * C if slot < 0 else int(slot_lens[slot]) - minus
        assert 0 <= nk <= (ce - cb) * C, f"unit keys {nk} outside its {ce - cb} chunks"
        chunks = np.asarray(chunk_list[cb:ce])
        assert ((chunks >= 0) & (chunks < N)).all(), "chunk out of the pool"
        keys = to_float32(kp[chunks, kvh], dtype).astype(np.float64).reshape(-1, D)[:nk]
        vals = to_float32(vp[chunks, kvh], dtype).astype(np.float64).reshape(-1, D)[:nk]
        for r in range(n):
            s, g = divmod(row0 + r, G)
            b = int(order[pos0 + s])
            o, lse = attention_state(qf[b, kvh * G + g][None], keys, vals, scale, np.float64)
            idx = (out_base + s) * Hq + kvh * G + g
            assert 0 <= idx < rows_max, "state row out of the states buffer"
            assert idx not in written, "two units wrote one state"
            written.add(idx)
            o_states[idx * D:(idx + 1) * D] = o[0].astype(np.float32)
            lse_states[idx] = np.float32(lse[0])


@launch
def chunk_merge(grid, block, args):
    (o_states, lse_states, seq_piece_indptr, seq_pieces, piece_state_offset, piece_begin, seq_item_indptr,
     item_state_base, order, out, out_lse, write_lse, batch, num_q_heads, queries_per_seq) = args
    B, Hq, D = int(batch), int(num_q_heads), out.shape[-1]
    assert grid[0] * 4 >= B * Hq, "one warp per (sequence, head)"
    dtype = "float16" if out.dtype == np.float16 else "bfloat16"
    spi, sp, pso, pb, sii, order, o_states, lse_states = (
        _pointer(a) for a in (seq_piece_indptr, seq_pieces, piece_state_offset, piece_begin, seq_item_indptr, order,
                              o_states, lse_states))
    for pos in range(B):
        rows = [int(pso[p]) + pos - int(pb[p]) for p in sp[spi[pos]:spi[pos + 1]]]
        rows += [int(item_state_base) + i for i in range(sii[pos], sii[pos + 1])]
        for h in range(Hq):
            o, lse = np.zeros(D), -np.inf
            for row in rows:
                idx = row * Hq + h
                o, lse = merge_states(o, np.float64(lse), o_states[idx * D:(idx + 1) * D].astype(np.float64),
                                      np.float64(lse_states[idx]))
            b = int(order[pos])
            out[b, h] = to_storage(o.astype(np.float32), dtype)
            if int(write_lse):
                out_lse[b, h] = np.float32(lse)


def _not_emulated(name):
    def call(*args, **kwargs):
        raise NotImplementedError(f"{name}: the CPU stand-in runs one query per sequence only")
    call.__name__ = name
    return call


KERNELS = dict(chunk_attend=chunk_attend, chunk_merge=chunk_merge,
               **{n: _not_emulated(n) for n in ("chunk_attend_multi", "chunk_attend_invariant", "chunk_merge_multi")})
