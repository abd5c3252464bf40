"""The backends a test runs one body on, side by side.

    numpy     ``ChunkCache`` (NumPy pool): ``cpattn``'s names run the reference
    emulated  ``GpuChunkCache`` on a CPU stand-in for CuPy (``cpattn.testing.fake_cupy``): the GPU
              cache's own host logic (device length table, K/V checks, ``kv_append`` launch
              arguments) on every CPU run. Its attention is the reference run on the cache as
              the kernels see it (lengths from the *device* table), with device outputs
    cupy      ``GpuChunkCache`` and the CUDA kernels (needs CuPy and a GPU)

A test body uses a backend for three things only: ``make_cache(...)``, ``asarray(x)`` (a host
array as this backend's input) and ``api`` (the namespace of the attention names:
``ChunkAttentionDecode``, ``BlockMeans``, ``compact_prefill``, ``dense_prefill``). For numpy and
cupy ``api`` *is* ``cpattn``, whose names dispatch on the cache; only the emulated backend
needs a stand-in, because there are no kernels on the CPU. Read results with
``cpattn.arrays.to_host``. Enter a backend (``with backend: ...``) around its use: the
emulated one swaps the ``cupy`` module while entered, so it never runs next to the real one.

    from cpattn.testing import get_backend
    with get_backend("numpy") as b:
        cache = b.make_cache(1, 2, 16, 8, chunk_size=4)
        dec = b.api.ChunkAttentionDecode(cache)
"""
from __future__ import annotations

import weakref

import numpy as np

from ..reference.chunk_cache import ChunkCache

NAMES = ("numpy", "emulated", "cupy")


def _cpattn():
    import cpattn

    return cpattn


class Backend:
    """One backend (see the module docstring). ``head_dim`` and ``chunk_size`` are the smallest
    sizes it runs: CPU backends any (tests stay small), the kernels 64 and 16."""

    name = "?"
    kernels = False  # True: outputs come from the CUDA kernels (the kernel error budget)
    head_dim, chunk_size = 8, 4

    def available(self) -> bool:
        return True

    skip_reason = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __repr__(self) -> str:
        return f"<cpattn.testing backend {self.name}>"

    @property
    def xp(self):
        """The array module of this backend's arrays (numpy, or the current ``cupy``)."""
        return np

    def make_cache(self, *args, **kwargs):
        """A cache of this backend: ``ChunkCache`` arguments (``xp`` excepted)."""
        return ChunkCache(*args, **kwargs)

    def asarray(self, x):
        """A host array as this backend's input array (a copy on the GPU backends)."""
        return np.asarray(x)

    @property
    def api(self):
        """``ChunkAttentionDecode``, ``BlockMeans``, ``compact_prefill``, ``dense_prefill``."""
        return _cpattn()


class NumpyBackend(Backend):
    name = "numpy"


class CupyBackend(Backend):
    name = "cupy"
    kernels = True
    head_dim, chunk_size = 64, 16
    skip_reason = "needs CuPy and a CUDA GPU"

    def available(self) -> bool:
        return _cpattn().gpu_available()

    @property
    def xp(self):
        import cupy

        return cupy

    def make_cache(self, *args, **kwargs):
        from ..chunk_cache import GpuChunkCache

        return GpuChunkCache(*args, **kwargs)

    def asarray(self, x):
        return self.xp.asarray(x)


# ----------------------------------------------------------------------------- emulated
class DeviceLengthView(ChunkCache):
    """A GPU cache as the kernels see it: its own tree and pool, but each sequence's length
    read from the device length table (what ``sync_lens`` uploaded), not the host one. So an
    emulated decode sees stale lengths exactly when the kernels would."""

    def __init__(self, cache):  # a view: no state of its own
        self.__dict__["gpu_cache"] = cache

    def __getattr__(self, name):
        return getattr(self.__dict__["gpu_cache"], name)

    def __setattr__(self, name, value):
        raise AttributeError(f"DeviceLengthView is read-only (setting {name})")

    @property
    def slot_lens(self) -> np.ndarray:
        return np.array(self.gpu_cache.d_slot_lens).view(np.ndarray)


class EmulatedDecode:
    """``ChunkAttentionDecode`` for an emulated GPU cache: plan like the GPU one (then upload the
    lengths), run the reference on the device lengths, outputs on the "device"."""

    def __init__(self, api, cache, *args, **kwargs):
        from ..reference.chunk_attention import ChunkAttentionDecode

        self.cache = cache
        self._api = api
        self._dec = ChunkAttentionDecode(api.view(cache), *args, **kwargs)

    @property
    def decode_plan(self):
        return self._dec.decode_plan

    def plan(self, seqs, num_q_heads, **options):  # queries_per_seq, tree_mask
        plan = self._dec.plan(seqs, num_q_heads, **options)
        self.cache.sync_lens()  # what the GPU plan does once it is built
        return plan

    def run(self, q, layer=0, **kwargs):
        res = self._dec.run(q, layer, **kwargs)
        return tuple(map(self._api.device, res)) if isinstance(res, tuple) else self._api.device(res)


def emulated_means(view):
    """The reference ``BlockMeans`` of a cache's ``DeviceLengthView`` that also takes the cache
    itself wherever it takes its cache (as a caller of the GPU names passes it)."""
    from ..reference.compact_attention import BlockMeans

    class EmulatedMeans(BlockMeans):
        pass

    def through_view(name):
        method = getattr(BlockMeans, name)

        def call(self, cache, *args, **kwargs):
            return method(self, view if cache is view.gpu_cache else cache, *args, **kwargs)
        call.__name__ = name
        return call

    for name in ("check_num_blocks", "check_cache", "update", "summarise", "is_current", "gather"):
        setattr(EmulatedMeans, name, through_view(name))
    return EmulatedMeans(view)


class EmulatedApi:
    """The attention names for emulated GPU caches: the reference on ``DeviceLengthView``s."""

    def __init__(self):
        self._views = weakref.WeakKeyDictionary()  # one view per cache: BlockMeans knows its cache

    def view(self, cache):
        if not hasattr(cache, "d_slot_lens"):
            return cache  # a NumPy cache: the reference as it is
        if cache not in self._views:
            self._views[cache] = DeviceLengthView(cache)
        return self._views[cache]

    @staticmethod
    def device(x):
        import cupy  # the stand-in while the emulated backend is entered

        return x if x is None or isinstance(x, cupy.ndarray) else cupy.asarray(x)

    def ChunkAttentionDecode(self, cache, *args, **kwargs):
        return EmulatedDecode(self, cache, *args, **kwargs)

    def BlockMeans(self, cache):
        from ..reference.compact_attention import BlockMeans

        if not hasattr(cache, "d_slot_lens"):
            return BlockMeans(cache)
        return emulated_means(self.view(cache))

    def compact_prefill(self, cache, means, *args, **kwargs):
        from ..reference.compact_attention import compact_prefill

        return compact_prefill(self.view(cache), means, *args, **kwargs)

    def dense_prefill(self, cache, means, *args, **kwargs):
        from ..reference.compact_attention import dense_prefill

        return dense_prefill(self.view(cache), means, *args, **kwargs)


class EmulatedBackend(CupyBackend):
    name = "emulated"
    kernels = False  # the reference math
    head_dim, chunk_size = 8, 4  # the stand-in kv_append takes any multiple of 8
    skip_reason = ""

    def __init__(self):
        self._patch = None
        self._api = EmulatedApi()

    def available(self) -> bool:
        return True

    def __enter__(self):
        from . import fake_cupy

        self._patch = fake_cupy.installed()
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        patch, self._patch = self._patch, None
        return patch.__exit__(*exc) if patch is not None else False

    @property
    def api(self):
        return self._api


BACKENDS = {"numpy": NumpyBackend, "emulated": EmulatedBackend, "cupy": CupyBackend}


def get_backend(name: str) -> Backend:
    """A new backend object by name: ``"numpy"``, ``"emulated"`` or ``"cupy"``."""
    if name not in BACKENDS:
        raise ValueError(f"name: expected one of {NAMES}, got {name!r}")
    return BACKENDS[name]()


def available_backends() -> list[str]:
    """The names of the backends this machine runs (cupy only with a GPU)."""
    return [n for n in NAMES if get_backend(n).available()]


__all__ = ["Backend", "NumpyBackend", "EmulatedBackend", "CupyBackend", "DeviceLengthView", "BACKENDS",
           "NAMES", "get_backend", "available_backends"]
