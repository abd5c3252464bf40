"""GpuChunkCache.reserve_batch's fast path (every token fits its tail chunk) against the reference's
general path: same slots, same cache state after every step, on random prefix-sharing trees with
forks, releases and chunk boundaries (the GPU cache runs on the CPU stand-in for CuPy)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn.reference.chunk_cache import CacheError, ChunkCache
from cpattn.testing.asserts import assert_same_snapshot, snapshot
from cpattn.testing.backends import get_backend


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), steps=st.integers(1, 14))
def test_fast_reserve_batch_equals_the_general_path(seed, n, steps):
    rng = np.random.default_rng(seed)
    with get_backend("emulated") as be:
        from cpattn.chunk_cache import GpuChunkCache

        c, D = be.chunk_size, be.head_dim
        gpu = GpuChunkCache(1, 1, D, 64, chunk_size=c, dtype="float16", max_sequences=16)
        ref = ChunkCache(1, 1, D, 64, chunk_size=c, dtype="float16", max_sequences=16)
        doc = rng.integers(0, 3, int(rng.integers(0, 3 * c))).tolist()
        live = []
        for _ in range(n):
            p = doc + rng.integers(0, 3, int(rng.integers(1, 2 * c))).tolist()
            ids = [cache.add_sequence(p, max_match=len(p) - 1) for cache in (gpu, ref)]
            assert ids[0] == ids[1]
            for cache, s in zip((gpu, ref), ids):
                cache.reserve(s, p[cache.seq_len(s):])
                cache.commit(s)
            live.append(ids[0])
        for _ in range(steps):
            if len(live) > 1 and rng.random() < 0.15:  # a release or a fork changes the tree between steps
                s = live.pop(int(rng.integers(len(live))))
                for cache in (gpu, ref):
                    cache.release(s)
            elif rng.random() < 0.15 and len(live) < 8:
                s = live[int(rng.integers(len(live)))]
                forks = [cache.fork(s) for cache in (gpu, ref)]
                assert forks[0] == forks[1]
                live.append(forks[0])
            toks = rng.integers(0, 3, len(live)).tolist()
            try:
                a = gpu.reserve_batch(live, toks)
            except CacheError as e:
                raised = e
            else:
                raised = None
            if raised is not None:  # a full pool: the reference refuses too, and nothing changed
                try:
                    ref.reserve_batch(live, toks)
                except CacheError:
                    pass
                else:
                    raise AssertionError(f"the GPU cache raised {raised!r}, the reference did not")
                assert_same_snapshot(snapshot(gpu), snapshot(ref), common=True)
                break
            b = ref.reserve_batch(live, toks)
            np.testing.assert_array_equal(a.chunk, b.chunk)
            np.testing.assert_array_equal(a.offset, b.offset)
            for cache in (gpu, ref):
                for s in live:
                    cache.commit(s)
            assert_same_snapshot(snapshot(gpu), snapshot(ref), common=True)
            np.testing.assert_array_equal(gpu.slot_lens, ref.slot_lens)


def test_fast_path_refuses_like_the_reference():
    with get_backend("emulated") as be:
        from cpattn.chunk_cache import GpuChunkCache

        gpu = GpuChunkCache(1, 1, be.head_dim, 8, chunk_size=be.chunk_size, dtype="float16")
        s = gpu.add_sequence([1, 2])
        gpu.reserve(s, [1, 2])
        before = snapshot(gpu)
        try:
            gpu.reserve_batch([s], [3])  # reserved, not committed
        except CacheError as e:
            assert "commit it first" in str(e)
        else:
            raise AssertionError("expected a CacheError for an uncommitted sequence")
        assert_same_snapshot(before, snapshot(gpu))
        gpu.commit(s)
        before = snapshot(gpu)
        for seqs, toks in (([s], [3, 4]), ([s, s], [3, 3]), ([s], [True]), (s, [3])):
            try:
                gpu.reserve_batch(seqs, toks)
            except (ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"expected an error for {seqs}, {toks}")
        assert_same_snapshot(before, snapshot(gpu))


def test_fast_path_is_taken_inside_a_tail(monkeypatch):
    with get_backend("emulated") as be:
        from cpattn.chunk_cache import GpuChunkCache

        gpu = GpuChunkCache(1, 1, be.head_dim, 8, chunk_size=be.chunk_size, dtype="float16")
        s = gpu.add_sequence([1])
        gpu.reserve(s, [1])
        gpu.commit(s)
        general = []
        monkeypatch.setattr(ChunkCache, "reserve_batch", lambda self, *a: general.append(a))
        slots = gpu.reserve_batch([s], [2])  # row 1 of the tail chunk: no new chunk, the fast path
        assert not general and slots.offset.tolist() == [1] and gpu.seq_len(s) == 2
