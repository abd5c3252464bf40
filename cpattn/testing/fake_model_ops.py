"""CPU stand-ins for the graphed decode step's kernels (raw_kernels/model_ops.cu) and its cuBLAS
products (``cpattn.serving.cublas.CublasGemm``), for the emulated backend (``fake_cupy``).

Each takes the launch arguments of the kernel it stands for (grid, block, the argument tuple),
checks what the kernel assumes (a grid that covers the rows, dtypes, shapes) and computes the
same float32 math with NumPy; each is recorded, not run, while a stream captures
(``fake_cupy.launch``). They let CPU tests drive ``GraphedDecoder`` itself: its buffers, its
capture and replay, and what it leaves on the "device" between steps. They are not the
kernels' numerics (those are tested on the GPU against the eager model).
"""
from __future__ import annotations

import numpy as np

from .fake_cupy import FakeDeviceArray, launch


def _device(*arrays) -> None:
    for a in arrays:
        assert isinstance(a, FakeDeviceArray), f"kernel argument on the host: {type(a).__name__}"


def _rows(grid, block, n: int) -> None:
    assert grid[0] == n, f"one block per row: grid {grid}, {n} rows"


@launch
def embed_rows(grid, block, args):
    embed, tokens, x, hidden = args
    _device(embed, tokens, x)
    _rows(grid, block, x.shape[0])
    assert x.dtype == np.float32 and x.shape[1] == int(hidden)
    assert (tokens >= 0).all() and (tokens < embed.shape[0]).all(), "token id out of the embedding"
    x[...] = embed[tokens].astype(np.float32)


@launch
def add_rms_norm(grid, block, args):
    x, add, w, out, hidden, eps = args
    _device(x, w, out)
    _rows(grid, block, x.shape[0])
    assert x.dtype == np.float32 and x.shape[1] == int(hidden)
    if not (isinstance(add, np.integer) and int(add) == 0):  # a null pointer: no residual
        _device(add)
        x += add.astype(np.float32)
    inv = np.float32(1) / np.sqrt((x * x).mean(axis=1, keepdims=True, dtype=np.float32) + np.float32(eps))
    out[...] = (x * inv * w).astype(out.dtype)


@launch
def rope_split(grid, block, args):
    qkv, pos, cos, sin, q, k, v, num_q_heads, num_kv_heads = args
    _device(qkv, pos, cos, sin, q, k, v)
    n, Hq, Hkv, D = qkv.shape[0], int(num_q_heads), int(num_kv_heads), q.shape[2]
    _rows(grid, block, n)
    assert qkv.shape[1] == (Hq + 2 * Hkv) * D and (pos >= 0).all() and (pos < cos.shape[0]).all()
    x = qkv.astype(np.float32).reshape(n, Hq + 2 * Hkv, D)
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    a, b = x[:, :Hq + Hkv, 0::2], x[:, :Hq + Hkv, 1::2]
    rot = np.empty((n, Hq + Hkv, D), np.float32)
    rot[..., 0::2], rot[..., 1::2] = a * c - b * s, a * s + b * c
    q[...] = rot[:, :Hq].astype(q.dtype)
    k[...] = rot[:, Hq:].astype(k.dtype)
    v[...] = qkv.reshape(n, Hq + 2 * Hkv, D)[:, Hq + Hkv:]


@launch
def silu_mul(grid, block, args):
    gu, out, inter, n = args
    _device(gu, out)
    inter = int(inter)
    assert grid[0] * block[0] >= int(n) == out.size and gu.shape[1] == 2 * inter
    g, u = gu[:, :inter].astype(np.float32), gu[:, inter:].astype(np.float32)
    out[...] = (g / (np.float32(1) + np.exp(-g)) * u).astype(out.dtype)


@launch
def argmax_rows(grid, block, args):
    logits, tokens, vocab = args
    _device(logits, tokens)
    _rows(grid, block, logits.shape[0])
    x = logits.astype(np.float32)
    x[np.isnan(x)] = -np.inf  # NaN never wins
    tokens[...] = np.where(np.isneginf(x).all(axis=1), 0, x.argmax(axis=1))


@launch
def advance_step(grid, block, args):
    picked, next_in, meta, slot_lens, row_slot, rows = args
    _device(picked, next_in, meta, slot_lens, row_slot)
    rows = int(rows)
    assert grid[0] * block[0] >= rows and meta.shape == (3, rows) and meta.dtype == np.int32
    next_in[...] = picked
    meta[1:] += 1
    slot_lens[row_slot] += 1  # distinct slots: one sequence per row


KERNELS = dict(embed_rows=embed_rows, add_rms_norm=add_rms_norm, rope_split=rope_split, silu_mul=silu_mul,
               argmax_rows=argmax_rows, advance_step=advance_step)


class FakeGemm:
    """``CublasGemm``: out = x @ w.T for float16 arrays, float32 accumulation, one rounding."""

    def __call__(self, x, w, out, stream) -> None:
        _device(x, w, out)
        M, K = x.shape
        N = w.shape[0]
        for name, a, shape in (("x", x, (M, K)), ("w", w, (N, K)), ("out", out, (M, N))):
            if a.dtype != np.float16 or a.shape != shape or a.strides[1] != 2:
                raise ValueError(f"{name}: expected float16 {shape} with contiguous rows, got {a.dtype} {a.shape} "
                                 f"strides {a.strides}")
        if not out.flags.c_contiguous:
            raise ValueError("out: expected a C-contiguous array")
        _gemm(x, w, out)


@launch
def _gemm(x, w, out):
    out[...] = (x.astype(np.float32) @ w.astype(np.float32).T).astype(np.float16)
