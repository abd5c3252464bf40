"""GpuChunkCache's decode batch (state in arrays, settled on demand) against the reference's
DecodeBatch (reserve_batch and one commit per sequence): same slots, positions, errors and tree
after every step, on random prefix-sharing trees with forks, releases, matching prompts,
evictions, full pools and reads in the middle of a step (the GPU cache runs on the CPU
stand-in for CuPy)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn.reference.chunk_cache import CacheError, CacheFullError, ChunkCache, DecodeBatch
from cpattn.testing.asserts import assert_same_snapshot, snapshot
from cpattn.testing.backends import get_backend


def _outcome(fn):
    """(value, None) or (None, exception type) of ``fn()``."""
    try:
        return fn(), None
    except (CacheError, ValueError, TypeError) as e:
        return None, type(e)


def _same(gpu, ref):
    assert_same_snapshot(snapshot(gpu), snapshot(ref), common=True)
    np.testing.assert_array_equal(gpu.slot_lens, ref.slot_lens)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), steps=st.integers(1, 40),
       pool=st.integers(12, 48))
def test_decode_batch_equals_the_reference(seed, n, steps, pool):
    rng = np.random.default_rng(seed)
    with get_backend("emulated") as be:
        from cpattn.chunk_cache import GpuChunkCache, GpuDecodeBatch

        c, D = be.chunk_size, be.head_dim
        gpu = GpuChunkCache(1, 1, D, pool, chunk_size=c, dtype="float16", max_sequences=16)
        ref = ChunkCache(1, 1, D, pool, chunk_size=c, dtype="float16", max_sequences=16)
        caches = (gpu, ref)
        doc = rng.integers(0, 3, int(rng.integers(0, 3 * c))).tolist()
        live = []
        for _ in range(n):
            p = doc + rng.integers(0, 3, int(rng.integers(0, 2 * c))).tolist()
            got = [_outcome(lambda cache=cache: cache.add_sequence(p, max_match=max(len(p) - 1, 0)))
                   for cache in caches]
            assert got[0] == got[1]
            if got[0][1] is not None:
                break
            s = got[0][0]
            done = [_outcome(lambda cache=cache: (cache.reserve(s, p[cache.seq_len(s):]), cache.commit(s))[1])
                    for cache in caches]
            assert done[0] == done[1]
            if done[0][1] is not None:  # the pool is full: this one stays a matched prefix
                for cache in caches:
                    cache.release(s)
                break
            live.append(s)
        if not live:
            return
        batches = [cache.decode_batch(live) for cache in caches]
        assert isinstance(batches[0], GpuDecodeBatch) and type(batches[1]) is DecodeBatch
        np.testing.assert_array_equal(batches[0].row_slots, batches[1].row_slots)
        for _ in range(steps):
            u = rng.random()
            if u < 0.06 and len(live) > 1:  # a release between steps: the old batch refuses, a new one
                s = live.pop(int(rng.integers(len(live))))
                for cache in caches:
                    cache.release(s)
                toks = [1] * (len(live) + 1)
                assert _outcome(lambda: batches[0].reserve(toks))[1] is CacheError
                assert _outcome(lambda: batches[1].reserve(toks))[1] is CacheError
                batches = [cache.decode_batch(live) for cache in caches]
            elif u < 0.12 and len(live) < 8:  # a fork of a member joins a new batch
                s = live[int(rng.integers(len(live)))]
                got = [_outcome(lambda cache=cache: cache.fork(s)) for cache in caches]
                assert got[0] == got[1]
                if got[0][1] is None:
                    live.append(got[0][0])
                    batches = [cache.decode_batch(live) for cache in caches]
            elif u < 0.18:  # a prompt that repeats a member's tokens: matches its complete chunks
                s = live[int(rng.integers(len(live)))]
                p = ref.seq_tokens(s)[:int(rng.integers(0, ref.seq_len(s) + 1))]
                got = [_outcome(lambda cache=cache: cache.add_sequence(p)) for cache in caches]
                assert got[0] == got[1]
                if got[0][1] is None:
                    assert gpu.seq_len(got[0][0]) == ref.seq_len(got[0][0])
                    for cache in caches:
                        cache.release(got[0][0])
            elif u < 0.21:
                k = int(rng.integers(0, 3))
                assert gpu.evict(k) == ref.evict(k)
            toks = rng.integers(0, 3, len(live))
            got = [_outcome(lambda b=b: b.reserve(toks)) for b in batches]
            assert got[0][1] == got[1][1], got
            if got[0][1] is not None:  # a full pool: both refuse and nothing changed
                assert got[0][1] is CacheFullError
                _same(gpu, ref)
                break
            a, b = got[0][0], got[1][0]
            np.testing.assert_array_equal(a.chunk, b.chunk)
            np.testing.assert_array_equal(a.offset, b.offset)
            np.testing.assert_array_equal(batches[0].positions, batches[1].positions)
            np.testing.assert_array_equal(batches[0].opened, batches[1].opened)
            assert batches[0].num_opened == batches[1].num_opened == int(batches[1].opened.sum())
            kv = rng.standard_normal((2, len(live), 1, D)).astype(np.float16)
            for cache in caches:  # only rows reserved and not committed take K/V
                cache.write_kv(0, a if cache is gpu else b, kv[0], kv[1])
            v = rng.random()
            if v < 0.05:
                _same(gpu, ref)  # in the middle of a step
            elif v < 0.1:  # a second reserve before the commit: both refuse
                assert _outcome(lambda: batches[0].reserve(toks))[1] is CacheError
                assert _outcome(lambda: batches[1].reserve(toks))[1] is CacheError
            elif v < 0.2:  # a read in the middle of a step settles the arrays
                s = live[int(rng.integers(len(live)))]
                assert gpu.seq_len(s) == ref.seq_len(s) and gpu.seq_tokens(s) == ref.seq_tokens(s)
            elif v < 0.35:  # a planner's read in the middle of a step: lengths and paths exact, the batch active
                states = gpu.live_states(list(live))
                assert [st.n_tokens for st in states] == [ref.seq_len(s) for s in live]
                assert [[n.chunk for n in st.path] for st in states] == [ref.seq_chunks(s) for s in live]
            for batch in batches:
                batch.commit()
            if rng.random() < 0.2:
                _same(gpu, ref)
        _same(gpu, ref)


def test_decode_batch_checks_like_the_reference():
    with get_backend("emulated") as be:
        from cpattn.chunk_cache import GpuChunkCache

        c = be.chunk_size
        caches = [cls(1, 1, be.head_dim, 8, chunk_size=c, dtype="float16") for cls in (GpuChunkCache, ChunkCache)]
        for cache in caches:
            s = cache.add_sequence([1, 2])
            cache.reserve(s, [1, 2])
            assert _outcome(lambda: cache.decode_batch([s]))[1] is CacheError  # reserved, not committed
            cache.commit(s)
            for seqs in ([], [s, s], s, [s + 1], [True]):
                assert _outcome(lambda: cache.decode_batch(seqs))[1] is not None, seqs
        batches = [cache.decode_batch([0]) for cache in caches]
        before = snapshot(caches[0])
        for toks in ([3, 4], [True], [1.5], 3, [[3]], np.array([3.0])):
            got = [_outcome(lambda b=b: b.reserve(toks)) for b in batches]
            assert got[0][1] is not None and got[0][1] == got[1][1], (toks, got)
        assert_same_snapshot(before, snapshot(caches[0]))
        for b in batches:
            b.reserve(np.array([7]))
            assert b.positions.tolist() == [2] and b.opened.tolist() == [c == 2]
            b.commit()
            b.commit()  # nothing reserved: no change
        _same(*caches)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_the_steady_step_stays_in_the_arrays(chunk_size, monkeypatch):
    """Inside a tail chunk no per-sequence Python runs: the tree's own reserve and commit are not
    called, the tail nodes do not change until something reads them, and then they are exact."""
    with get_backend("emulated") as be:
        from cpattn.chunk_cache import GpuChunkCache

        gpu = GpuChunkCache(1, 1, be.head_dim, 64, chunk_size=chunk_size, dtype="float16")
        ids = [gpu.add_sequence([i]) for i in range(3)]
        for s in ids:
            gpu.reserve(s, [5])
            gpu.commit(s)
        batch = gpu.decode_batch(ids)
        calls = []
        monkeypatch.setattr(ChunkCache, "_reserve", lambda self, *a: calls.append("reserve"))
        monkeypatch.setattr(ChunkCache, "_commit", lambda self, *a: calls.append("commit"))
        tails = [n.tokens for n in gpu.root.children]
        for t in range(chunk_size - 2):  # fill the first chunk up to one row short of full
            batch.reserve(np.full(3, 10 + t))
            batch.commit()
        assert calls == [] and all(len(x) == 1 for x in tails)
        monkeypatch.undo()
        assert gpu.seq_tokens(ids[1]) == [5] + [10 + t for t in range(chunk_size - 2)]
        assert gpu.slot_lens[[gpu.seq_slot(s) for s in ids]].tolist() == [chunk_size - 1] * 3


def test_device_lens_advance_is_taken_only_when_it_did_the_reserves_work():
    """``lens_advanced`` / ``lens_current`` (what GraphedDecoder's steps rely on): after a step
    that advanced the device length table at the batch's rows (emulated here as the kernel does:
    +1 at each row's slot), the next reserve may take the device table as current; whenever that
    is claimed, and after ``sync_lens`` whenever it is not, device and host tables are equal.
    Anything else between two steps (a new sequence, a release, another batch's reserve, another
    reader's upload, a new chunk) withdraws the claim; other readers never see the advance."""
    rng = np.random.default_rng(5)
    with get_backend("emulated") as be:
        from cpattn.chunk_cache import GpuChunkCache

        c = be.chunk_size
        gpu = GpuChunkCache(1, 1, be.head_dim, 64, chunk_size=c, dtype="float16", max_sequences=8)
        ids = [gpu.add_sequence([i, 1, 2]) for i in range(3)]
        extra = gpu.add_sequence([9])
        for s in ids + [extra]:
            gpu.reserve(s, [5])
            gpu.commit(s)
        batch, other = gpu.decode_batch(ids), gpu.decode_batch([extra])
        device = lambda: gpu.d_slot_lens.get()[:gpu.max_sequences]  # noqa: E731
        claims, events = [], []
        for step in range(6 * c):
            event = rng.choice(["none"] * 5 + ["add", "other", "sync", "bare"])
            if step and event == "add":
                gpu.release(gpu.add_sequence([1, 2, 3]))
            elif step and event == "other":
                other.reserve([4])
                other.commit()
            elif step and event == "sync":  # another reader uploads: the advance is gone for everyone
                gpu.sync_lens()
                np.testing.assert_array_equal(device(), gpu.slot_lens)
            batch.reserve(rng.integers(0, 9, len(ids)))
            current = batch.lens_current()
            if not current:
                gpu.sync_lens()
            np.testing.assert_array_equal(device(), gpu.slot_lens, err_msg=f"step {step} {event} {current}")
            claims.append(current)
            events.append(event if step else "first")
            batch.commit()
            if event != "bare":  # a step without the device advance (e.g. an eager one) claims nothing
                batch.lens_advanced()
                gpu.d_slot_lens[batch.row_slots] += 1  # advance_step, once the step has read the table
                gpu.sync_lens()  # a reader outside the batch sees the host table, not the advance
                np.testing.assert_array_equal(device(), gpu.slot_lens)
                batch.lens_advanced()
                gpu.d_slot_lens[batch.row_slots] += 1
        # the claim is made exactly on the steps after an advance with nothing between and no new chunk
        # (a bare step's own claim is about the step before it)
        steady = [i for i, e in enumerate(events) if e in ("none", "bare") and events[i - 1] != "bare"]
        assert claims.count(True) >= len(steady) // 2 > 0
        assert not any(claims[i] for i in range(len(events)) if i not in steady)
