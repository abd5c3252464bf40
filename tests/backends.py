"""The backends the reliability tests run side by side, behind one small interface.

    numpy     ChunkCache (NumPy pool) + the reference two-phase decode and CompactAttention
    emulated  GpuChunkCache on a CPU stand-in for CuPy (``fake_cupy``): the GPU cache's own host
              logic (length-table mirroring, K/V checks, kv_append arguments) on every CPU run;
              its decode is the reference run on the *device* length table, which is what the
              CUDA kernels read
    cupy      GpuChunkCache + ChunkAttentionDecode + cpattn.compact_attention (needs CuPy and a GPU)

CPU tests pair numpy with emulated; GPU tests (marker ``gpu``) pair numpy with cupy. The
emulated backend replaces the ``cupy`` module while it is entered, so it never runs next to the
real one. Every backend returns host float32 outputs, so tests compare them directly.
"""
from __future__ import annotations

import numpy as np

from cpattn.reference import compact_attention as ca
from cpattn.reference.chunk_attention import decode as ref_decode
from cpattn.reference.dtypes import round_to_storage, to_float32, unit_roundoff
from cpattn.reference.plan import build_decode_plan
from cpattn.reference.chunk_cache import ChunkCache

POISON = {"float16": 0x7E00, "bfloat16": 0x7FC0}  # NaN bit patterns: unwritten output shows up


def to_host(x) -> np.ndarray:
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.array(x, copy=True)


class NumpyBackend:
    name = "numpy"
    rounds_output = False  # reference outputs stay float32

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def make_cache(self, *args, **kwargs) -> ChunkCache:
        return ChunkCache(*args, **kwargs)

    def dev(self, x):
        """A host array as this backend's input array."""
        return x

    def decoder(self, cache, piece_chunks=None, private_piece_chunks=None):
        return RefDecoder(cache, piece_chunks, private_piece_chunks)

    def means(self, cache):
        return ca.BlockMeans(cache)

    def prefill(self, cache, means, seq, q, layer, **opt) -> np.ndarray:
        """CompactAttention output float32 [n, Hq, D] for the sequence's last n tokens."""
        return ca.compact_prefill(cache, means, seq, q, layer, **opt).o


class RefDecoder:
    """plan/run over the reference decode, with ChunkAttentionDecode's contract: ``run``
    refuses a plan whose cache version is stale."""

    def __init__(self, cache, piece_chunks, private_piece_chunks):
        self.cache = cache
        self.split = (None if piece_chunks == "auto" else piece_chunks,
                      None if private_piece_chunks == "auto" else private_piece_chunks)
        self.ref_plan = None

    def plan(self, seqs, num_q_heads):
        self.ref_plan = build_decode_plan(self.cache, seqs, *self.split)
        return self.ref_plan

    def _view(self):
        return self.cache

    def run(self, q, layer=0, scale=None) -> np.ndarray:
        return ref_decode(self._view(), self.ref_plan, q, layer, scale)


# ----------------------------------------------------------------------------- emulated GPU cache
class _DeviceLengthView:
    """The cache as the decode kernels see it: lengths from the device table, not the host's."""

    def __init__(self, cache):
        self._cache = cache
        self.slot_lens = np.array(cache.d_slot_lens, copy=True)

    def __getattr__(self, name):
        return getattr(self._cache, name)


class EmulatedDecoder(RefDecoder):
    def plan(self, seqs, num_q_heads):
        plan = super().plan(seqs, num_q_heads)
        self.cache.sync_lens()  # what ChunkAttentionDecode.plan does after building
        return plan

    def _view(self):
        return _DeviceLengthView(self.cache)

    def run(self, q, layer=0, scale=None):
        return round_to_storage(super().run(q, layer, scale), self.cache.dtype)  # kernels store o


class EmulatedBackend(NumpyBackend):
    name = "emulated"
    rounds_output = True

    def __enter__(self):
        import fake_cupy

        self._patch = fake_cupy.installed()
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        return self._patch.__exit__(*exc)

    def make_cache(self, *args, **kwargs):
        from cpattn.chunk_cache import GpuChunkCache

        kwargs.pop("xp", None)
        return GpuChunkCache(*args, **kwargs)

    def dev(self, x):
        import cupy  # the stand-in while this backend is entered

        return cupy.asarray(x)

    def decoder(self, cache, piece_chunks=None, private_piece_chunks=None):
        return EmulatedDecoder(cache, piece_chunks, private_piece_chunks)


# ----------------------------------------------------------------------------- CUDA
class CupyDecoder:
    def __init__(self, cache, piece_chunks, private_piece_chunks):
        from cpattn.chunk_attention import ChunkAttentionDecode

        self.cache = cache
        self.dec = ChunkAttentionDecode(cache, piece_chunks=piece_chunks,  # None: no split
                                        private_piece_chunks=private_piece_chunks)

    @property
    def ref_plan(self):
        return self.dec.ref_plan

    def plan(self, seqs, num_q_heads):
        return self.dec.plan(seqs, num_q_heads)

    def run(self, q, layer=0, scale=None):
        import cupy

        B, Hq, D = q.shape
        out = cupy.full((B, Hq, D), POISON[self.cache.dtype], dtype=self.cache.k_pool.dtype)
        self.dec.run(cupy.asarray(q), layer, scale=scale, out=out)
        return to_float32(cupy.asnumpy(out), self.cache.dtype)


class CupyBackend(NumpyBackend):
    name = "cupy"
    rounds_output = True

    def make_cache(self, *args, **kwargs):
        from cpattn.chunk_cache import GpuChunkCache

        kwargs.pop("xp", None)
        return GpuChunkCache(*args, **kwargs)

    def dev(self, x):
        import cupy

        return cupy.asarray(x)

    def decoder(self, cache, piece_chunks="auto", private_piece_chunks="auto"):
        return CupyDecoder(cache, piece_chunks, private_piece_chunks)

    def means(self, cache):
        from cpattn.compact_attention import GpuBlockMeans

        return GpuBlockMeans(cache)

    def prefill(self, cache, means, seq, q, layer, **opt):
        import cupy

        from cpattn.compact_attention import compact_prefill

        out = cupy.full(q.shape, POISON[cache.dtype], dtype=cache.k_pool.dtype)
        r = compact_prefill(cache, means, seq, cupy.asarray(q), layer, out=out, **opt)
        return to_float32(cupy.asnumpy(r.o), cache.dtype)


def budget(backend, dtype: str, v_absmax: float) -> float:
    """Allowed max |o - float64 oracle|: a float32 reference is accurate to ~1e-6 relative;
    a kernel rounds P to the storage dtype for P.V and rounds o once (test_gpu_decode.py)."""
    if backend.rounds_output:
        return 4 * unit_roundoff(dtype) * v_absmax + 1e-5
    return 2e-5 * max(1.0, v_absmax)
