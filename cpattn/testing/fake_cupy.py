"""A CPU stand-in for the parts of CuPy that ``cpattn.chunk_cache.GpuChunkCache`` uses (and the
array functions of the GPU selection code, ``ARRAY_FUNCTIONS``).

It lets CPU CI run the GPU cache's host logic (length-table mirroring, argument checks, the
``kv_append`` launch arguments) against the NumPy cache. "Device" arrays are NumPy arrays of a
subclass with ``get``/``set``/``device``; ``kv_append`` is emulated with the kernel's own
addressing (flat page index ``layer_page0 + chunk * Hkv + head``, row ``offset``) and its
preconditions (C-contiguous, 16-byte aligned K/V, a grid that covers every vector).

Use ``with installed(): ...``: it swaps ``sys.modules['cupy']`` and the cache's kernel loader,
and puts both back afterwards. Never mix it with real CuPy arrays inside the block. Tests reach
it through the emulated backend (``cpattn.testing.get_backend("emulated")``), which also gives
the GPU cache its attention (the reference, on the device length table).
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import numpy as np


class FakeDeviceArray(np.ndarray):
    """A "device" array: a NumPy array that must be copied out with ``get`` like a CuPy one."""

    device = types.SimpleNamespace(id=0)

    @property
    def data(self):  # CuPy: a MemoryPointer with .ptr
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self):
        return np.array(self, copy=True)

    def set(self, host):
        self[...] = host


def _dev(x):
    return np.asarray(x).view(FakeDeviceArray)


# the array functions the GPU selection code (cpattn.compact_attention's recall rule and sampled
# summary) calls on the array module, beyond the constructors above
ARRAY_FUNCTIONS = ("exp2", "matmul", "where", "argsort", "take_along_axis", "cumsum", "ones_like", "zeros_like",
                   "arange", "broadcast_to", "concatenate", "einsum")


def _on_device(fn):
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        return _dev(out) if isinstance(out, np.ndarray) else out
    call.__name__ = fn.__name__
    return call


def _module() -> types.ModuleType:
    m = types.ModuleType("cupy")
    m.__fake__ = True
    m.ndarray = FakeDeviceArray
    m.zeros = lambda shape, dtype=float: _dev(np.zeros(shape, dtype))
    m.empty = lambda shape, dtype=float: _dev(np.empty(shape, dtype))
    m.full = lambda shape, fill, dtype=None: _dev(np.full(shape, fill, dtype))
    m.asarray = lambda x, dtype=None: _dev(np.array(x, dtype=dtype, copy=True))  # an H2D copy
    m.ascontiguousarray = lambda x: _dev(np.ascontiguousarray(x))
    m.asnumpy = lambda x: np.array(x, copy=True)
    m.is_available = lambda: False  # nobody may mistake this for a GPU
    for name in ("float16", "float32", "uint16", "int16", "int32", "int64", "uint32"):
        setattr(m, name, getattr(np, name))
    for name in ARRAY_FUNCTIONS:  # NumPy's, results on the "device"
        setattr(m, name, _on_device(getattr(np, name)))
    device = types.SimpleNamespace(id=0, attributes={"MultiProcessorCount": 132})
    m.cuda = types.SimpleNamespace(Device=lambda *a: device)
    return m


def kv_append(grid, block, args):
    """Emulated ``cpattn::kv_append<T, D, C>``: scatter n tokens' K/V rows of one layer."""
    k, v, slot_chunk, slot_off, k_pool, v_pool, layer_page0, num_kv_heads, n = args
    L, N, H, C, D = k_pool.shape
    n, H_arg = int(n), int(num_kv_heads)
    assert H_arg == H and k.shape == v.shape == (n, H, D), (k.shape, n, H, D)
    for x in (k, v, slot_chunk, slot_off):
        assert isinstance(x, FakeDeviceArray), f"kernel argument on the host: {type(x).__name__}"
    for x in (k, v):  # uint4 loads
        assert x.flags.c_contiguous and x.ctypes.data % 16 == 0, "kv_append needs contiguous, aligned K/V"
    assert grid[0] * block[0] >= n * H * (D // 8), "grid does not cover every vector"
    assert k_pool.flags.c_contiguous and v_pool.flags.c_contiguous
    pages = int(layer_page0) + slot_chunk[:n].astype(np.int64)[:, None] * H + np.arange(H)  # [n, H]
    assert pages.min(initial=0) >= 0 and pages.max(initial=0) < L * N * H, "page out of the pool"
    rows = np.broadcast_to(slot_off[:n].astype(np.int64)[:, None], pages.shape)
    assert rows.min(initial=0) >= 0 and rows.max(initial=0) < C, "row out of the page"
    for pool, x in ((k_pool, k), (v_pool, v)):
        flat = pool.reshape(L * N * H, C, D)
        assert np.shares_memory(flat, pool)
        flat[pages, rows] = x


def get_kernels(file, dtype, head_dim, chunk_size):
    """Any head_dim that is a multiple of 8 (kv_append's vector) and any chunk size: the
    emulation has none of the compiled variants' limits, so CPU tests can stay small."""
    assert file == "chunk_cache" and head_dim % 8 == 0, (file, head_dim)
    return {"kv_append": kv_append}


@contextmanager
def installed():
    import cpattn.chunk_cache

    missing = object()
    saved_mod = sys.modules.get("cupy", missing)  # the real CuPy comes back afterwards
    saved_loader = cpattn.chunk_cache.get_kernels
    sys.modules["cupy"] = _module()
    cpattn.chunk_cache.get_kernels = get_kernels
    try:
        yield
    finally:
        cpattn.chunk_cache.get_kernels = saved_loader
        if saved_mod is missing:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved_mod
