"""The one GPU timer of the benchmarks: CUDA events around each call, after warm-up, the L2 cache
flushed before every timed call, the median of many calls.

Without the flush a kernel re-reading the same K/V would find it in L2 (50 MB on an H100/H200)
and be timed faster than it runs on new data. The flush writes a buffer larger than L2 on the
same stream, outside the two events.

CuPy's events record on CuPy's current stream. torch calls on torch's default stream share the
legacy default stream with CuPy's, so one timer serves both; a call that runs on another stream
must be timed inside ``with that_stream:`` (CuPy), as the decode benchmark does for graph replay.
"""
from __future__ import annotations

import numpy as np

L2_FLUSH_BYTES = 256 << 20  # larger than the L2 of any current GPU (H100/H200: 50 MB)


class CudaEvents:
    """CUDA events and device buffers through CuPy (the timer's clock)."""

    def __init__(self):
        import cupy

        self.cupy = cupy

    def event(self):
        return self.cupy.cuda.Event()

    def elapsed_ms(self, start, stop) -> float:
        stop.synchronize()
        return float(self.cupy.cuda.get_elapsed_time(start, stop))

    def buffer(self, nbytes: int):
        return self.cupy.empty(nbytes, dtype=self.cupy.uint8)


class GpuTimer:
    """``timer.median_ms(fn)``: ``warmup`` untimed calls, then ``iters`` calls, each after an L2
    flush (``flush_bytes`` written; 0 for none) and between two events; the median in ms.

    ``clock`` supplies ``event()`` (with ``record()``), ``elapsed_ms(start, stop)`` (waits for
    ``stop``) and ``buffer(nbytes)`` (with ``fill(value)``); default ``CudaEvents()``.
    """

    def __init__(self, warmup: int = 5, iters: int = 50, flush_bytes: int = L2_FLUSH_BYTES, clock=None):
        if warmup < 0 or iters < 1:
            raise ValueError(f"warmup, iters: expected >= 0 and >= 1, got {warmup} and {iters}")
        self.warmup, self.iters, self.flush_bytes = int(warmup), int(iters), int(flush_bytes)
        self.clock = clock if clock is not None else CudaEvents()
        self._scratch = None
        self._flushes = 0

    def flush(self) -> None:
        """Evict the L2: write ``flush_bytes`` bytes (a new value each time) on the current stream."""
        if not self.flush_bytes:
            return
        if self._scratch is None:
            self._scratch = self.clock.buffer(self.flush_bytes)
        self._flushes += 1
        self._scratch.fill(self._flushes & 0xFF)

    def runs_ms(self, fn, iters: int | None = None) -> list[float]:
        """Warm up, then the time of every timed call (ms)."""
        for _ in range(self.warmup):
            fn()
        out = []
        for _ in range(self.iters if iters is None else int(iters)):
            self.flush()
            start, stop = self.clock.event(), self.clock.event()
            start.record()
            fn()
            stop.record()
            out.append(self.clock.elapsed_ms(start, stop))
        return out

    def median_ms(self, fn, iters: int | None = None) -> float:
        return float(np.median(self.runs_ms(fn, iters)))
