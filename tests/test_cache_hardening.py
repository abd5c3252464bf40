"""Cache bugs found by adversarial use (issue 17), each pinned by a test.

1. ``append`` with a batch that is not a list (a scalar id, a NumPy int, a 0-d or 2-D array)
   used to reserve and write, then fail: the sequence was left mid-prefill.
2. A bool layer (``write_kv(True, ...)``) passed the layer check; NumPy read ``True`` as a new
   axis and overwrote other sequences' committed K/V.
3. A complete chunk that duplicates a registered one (two prompts written at once) never
   became matchable, even after the original was evicted.
"""
from __future__ import annotations

import numpy as np
import pytest

from cpattn.reference.chunk_cache import ChunkCache
from cpattn.reference.workloads import TokenKV

L, HKV, D, C = 2, 2, 8, 4


def snapshot(cache):
    return (cache.k_pool.copy(), cache.v_pool.copy(), cache.stats(), cache.version,
            {s: (cache.seq_len(s), cache.seq_chunks(s)) for s in cache.sequences})


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2:] == b[2:]


@pytest.fixture
def cache_and_kv():
    cache = ChunkCache(L, HKV, D, num_chunks=16, chunk_size=C)
    kv = TokenKV(L, HKV, D, "float16", seed=3, vocab=50)
    return cache, kv


@pytest.mark.parametrize("seqs", [0, np.int64(0), np.array(0), np.array([[0]])],
                         ids=["int", "np-int", "0-d", "2-D"])
def test_append_with_a_non_list_batch_changes_nothing(cache_and_kv, seqs):
    cache, kv = cache_and_kv
    toks = [1, 2, 3, 4, 5]
    a = cache.add_sequence(toks, *kv(toks))
    before = snapshot(cache)
    with pytest.raises(TypeError, match=r"^seqs: expected a 1-D list"):
        cache.append(seqs, [7], *kv([7], start=len(toks)))
    assert same(snapshot(cache), before)
    cache.extend(a, [7], *kv([7], start=len(toks)))  # still usable: nothing left mid-prefill
    assert cache.seq_len(a) == 6


@pytest.mark.parametrize("layer", [True, False, np.bool_(True)])
def test_bool_layer_is_refused_before_any_write(cache_and_kv, layer):
    cache = ChunkCache(L, 4, D, num_chunks=16, chunk_size=4)  # num_kv_heads == chunk_size: the old overwrite case
    kv = TokenKV(L, 4, D, "float16", seed=4)
    other = cache.add_sequence([1, 2, 3, 4], *kv([1, 2, 3, 4]))
    s = cache.add_sequence([9])
    slots = cache.reserve(s, [8])
    k, v = kv([8])
    before = snapshot(cache)
    with pytest.raises(TypeError, match=r"^layer: expected an integer"):
        cache.write_kv(layer, slots, k[0], v[0])
    assert same(snapshot(cache), before)
    with pytest.raises(TypeError, match=r"^layer:"):
        cache.read_kv(other, layer)


def test_a_duplicate_chunk_becomes_matchable_when_the_original_is_evicted(cache_and_kv):
    cache, kv = cache_and_kv
    toks = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    # two sequences reserve the same prompt before either commits: the second's chunks are twins
    a, b = cache.add_sequence([]), cache.add_sequence([])
    sa, sb = cache.reserve(a, toks), cache.reserve(b, toks)
    k, v = kv(toks)
    for layer in range(L):
        cache.write_kv(layer, sa, k[layer], v[layer])
        cache.write_kv(layer, sb, k[layer], v[layer])
    cache.commit(a)
    cache.commit(b)  # b's full chunks duplicate a's registered ones: not registered
    b_chunks = cache.seq_chunks(b)
    cache.release(a)
    assert cache.evict() >= 2  # a's full chunks were the registered ones
    c = cache.add_sequence(toks[:8])
    assert cache.seq_len(c) == 8, "the twins took the evicted chunks' place in the index"
    assert cache.seq_chunks(c) == b_chunks[:2]
    k_c, v_c = cache.read_kv(c, 1)
    assert np.array_equal(k_c, k[1][:8]) and np.array_equal(v_c, v[1][:8])


def test_a_pool_over_a_tebibyte_is_refused_naming_num_chunks():
    with pytest.raises(ValueError, match=r"^num_chunks: expected a pool of at most 1 TiB, got num_chunks=1073741824"):
        ChunkCache(32, 8, 128, 2**30, chunk_size=64)


def test_a_pool_that_does_not_fit_reraises_naming_num_chunks():
    """The allocation itself failing (here a stand-in array module) names num_chunks too."""
    import types

    def zeros(shape, dtype):
        raise MemoryError("out of memory")

    with pytest.raises(MemoryError, match=r"^num_chunks: expected a pool that fits in memory, got num_chunks=4"):
        ChunkCache(L, HKV, D, 4, chunk_size=C, xp=types.SimpleNamespace(zeros=zeros))
