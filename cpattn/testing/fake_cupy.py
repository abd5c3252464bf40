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

import functools
import sys
import types
from contextlib import contextmanager

import numpy as np

# The launches a stream capture is recording (a list), else None: while a stream captures,
# stand-in kernels are recorded instead of run, as CUDA records them into a graph, and the
# synchronous copies (get, set) that a capture forbids raise.
_capture: list | None = None


def launch(fn):
    """A stand-in kernel (or library call): runs at once, or is recorded by the capturing stream."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _capture is not None:
            _capture.append(lambda: fn(*args, **kwargs))
            return None
        return fn(*args, **kwargs)

    return call


def _not_capturing(what: str) -> None:
    if _capture is not None:
        raise RuntimeError(f"{what} during a stream capture (CUDA refuses a synchronous copy there)")


class FakeGraph:
    """A captured graph: the recorded launches, replayed in order (arguments as recorded: the
    arrays they name are read and written at replay, as a CUDA graph reads its pointers)."""

    def __init__(self, launches: list):
        self.launches = launches

    def launch(self, stream=None) -> None:
        _not_capturing("a graph launch")
        for fn in self.launches:
            fn()


class FakeStream:
    """``cupy.cuda.Stream``: work runs at once (nothing is asynchronous here); ``begin_capture``
    / ``end_capture`` record the stand-in launches in between into a ``FakeGraph``."""

    current = None
    ptr = 0

    def __init__(self, non_blocking: bool = False):
        self._outer = []

    def __enter__(self):
        self._outer.append(FakeStream.current)
        FakeStream.current = self
        return self

    def __exit__(self, *exc):
        FakeStream.current = self._outer.pop()
        return False

    def synchronize(self) -> None:
        _not_capturing("a stream synchronize")

    def is_capturing(self) -> bool:
        return _capture is not None

    def begin_capture(self) -> None:
        global _capture
        if _capture is not None:
            raise RuntimeError("begin_capture: a capture is already running")
        _capture = []

    def end_capture(self) -> FakeGraph:
        global _capture
        if _capture is None:
            raise RuntimeError("end_capture: no capture is running")
        graph, _capture = FakeGraph(_capture), None
        return graph


class FakeEvent:
    """``cupy.cuda.Event``: the host clock at ``record`` (nothing here is asynchronous)."""

    t = 0.0

    def record(self, stream=None) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass


class FakeMemoryPool:
    def malloc(self, nbytes):  # never called: the stand-in's arrays are NumPy's
        raise NotImplementedError


@contextmanager
def _using_allocator(alloc=None):
    yield


class FakeDeviceArray(np.ndarray):
    """A "device" array: a NumPy array that must be copied out with ``get`` like a CuPy one."""

    device = types.SimpleNamespace(id=0)

    @property
    def data(self):  # CuPy: a MemoryPointer with .ptr
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self, stream=None):
        _not_capturing("get")
        return np.array(self, copy=True)

    def set(self, host, stream=None):
        _not_capturing("set")
        self[...] = host


def _dev(x):
    return np.asarray(x).view(FakeDeviceArray)


# the array functions the GPU selection code (cpattn.compact_attention's recall rule and sampled
# summary) calls on the array module, beyond the constructors above
ARRAY_FUNCTIONS = ("exp2", "matmul", "where", "argsort", "take_along_axis", "cumsum", "ones_like", "zeros_like",
                   "arange", "broadcast_to", "concatenate", "einsum",
                   # and the eager model's (cpattn.serving.llama), which prefills the graphed decoder's sequences
                   "sqrt", "exp", "empty_like", "argmax")


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
    device = types.SimpleNamespace(id=0, attributes={"MultiProcessorCount": 132}, synchronize=lambda: None)
    m.cuda = types.SimpleNamespace(
        Device=lambda *a: device, Stream=FakeStream, MemoryPool=FakeMemoryPool, using_allocator=_using_allocator,
        alloc_pinned_memory=bytearray,  # np.frombuffer takes it as the pinned buffer
        get_current_stream=lambda: FakeStream.current or FakeStream(), Event=FakeEvent,
        get_elapsed_time=lambda start, stop: 1e3 * (stop.t - start.t))
    return m


@launch
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
    emulation has none of the compiled variants' limits, so CPU tests can stay small.
    ``model_ops``: the graphed decode step's kernels (``fake_model_ops``)."""
    if file == "model_ops":
        from . import fake_model_ops

        return fake_model_ops.KERNELS
    if file == "chunk_attention":  # the decode kernels of one query per sequence
        from . import fake_decode_kernels

        return dict(fake_decode_kernels.KERNELS)  # (the launcher sets attributes on them)
    assert file == "chunk_cache" and head_dim % 8 == 0, (file, head_dim)
    return {"kv_append": kv_append}


@contextmanager
def installed():
    import cpattn.chunk_attention
    import cpattn.chunk_cache
    import cpattn.kernels
    import cpattn.serving.graphed

    from . import fake_model_ops

    global _capture
    missing = object()
    saved_mod = sys.modules.get("cupy", missing)  # the real CuPy comes back afterwards
    saved = [(cpattn.chunk_cache, "get_kernels", get_kernels), (cpattn.kernels, "get_kernels", get_kernels),
             (cpattn.chunk_attention, "get_kernels", get_kernels),
             (cpattn.serving.graphed, "CublasGemm", fake_model_ops.FakeGemm)]
    saved = [(mod, name, getattr(mod, name), new) for mod, name, new in saved]
    sys.modules["cupy"] = _module()
    for mod, name, _, new in saved:
        setattr(mod, name, new)
    try:
        yield
    finally:
        _capture = None
        for mod, name, old, _ in saved:
            setattr(mod, name, old)
        if saved_mod is missing:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved_mod
