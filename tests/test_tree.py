"""Exact tree shapes of the chunk cache at chunk sizes 2 and 4.

Each test builds a small scenario and checks the nodes (tokens, ref, parent, children), the
pool chunk ids of every sequence, the accounting of ``stats()`` and, through ``TokenKV``, that
``read_kv`` gives back exactly the K/V that was written for each token and position.
"""
from __future__ import annotations

import numpy as np
import pytest

from cpattn.reference.chunk_cache import CacheError, CacheFullError, ChunkCache
from cpattn.reference.workloads import TokenKV

L, HKV, D = 2, 2, 4
C_SIZES = pytest.mark.parametrize("c", [2, 4])


def make(c, num_chunks=16, **kw):
    return ChunkCache(L, HKV, D, num_chunks, chunk_size=c, **kw), TokenKV(L, HKV, D, seed=1)


def add(cache, kv, tokens, **kw):
    k, v = kv(tokens)
    return cache.add_sequence(tokens, k, v, **kw)


def append(cache, kv, seqs, tokens):
    ks, vs = zip(*(kv([t], start=cache.seq_len(s)) for s, t in zip(seqs, tokens)))
    cache.append(seqs, tokens, np.concatenate(ks, axis=1), np.concatenate(vs, axis=1))


def assert_kv(cache, kv, sid):
    """read_kv of every layer equals TokenKV of the sequence's tokens at positions 0.."""
    k, v = kv(cache.seq_tokens(sid))
    for layer in range(L):
        rk, rv = cache.read_kv(sid, layer)
        np.testing.assert_array_equal(rk, k[layer])
        np.testing.assert_array_equal(rv, v[layer])


def shape(cache):
    """The tree as (chunk, parent chunk, tokens, ref, registered) in depth-first order."""
    return [(n.chunk, n.parent.chunk, list(n.tokens), n.ref, n.registered) for n in cache.nodes()]


def node(cache, chunk):
    (n,) = [n for n in cache.nodes() if n.chunk == chunk]
    return n


def stats(cache, **want):
    got = cache.stats()
    assert {k: got[k] for k in want} == want
    assert got["chunks_free"] + got["chunks_cached"] + got["chunks_referenced"] == cache.num_chunks


@C_SIZES
def test_mid_chunk_divergence_duplicates_the_common_part(c):
    h = c // 2
    P = list(range(1, c + 1))                 # one full chunk, shared
    common = [10 + i for i in range(h)]       # both prompts continue with these, then diverge
    A = P + common + [20 + i for i in range(c - h)] + [30]
    B = P + common + [40 + i for i in range(c - h)]
    cache, kv = make(c)
    a, b = add(cache, kv, A), add(cache, kv, B)
    assert shape(cache) == [
        (0, -1, P, 2, True),
        (1, 0, common + A[c + h: 2 * c], 1, True),
        (2, 1, [30], 1, False),
        (3, 0, common + B[c + h:], 1, True),
    ]
    assert node(cache, 1).tokens[:h] == node(cache, 3).tokens[:h] == common  # stored twice
    assert cache.seq_chunks(a) == [0, 1, 2] and cache.seq_chunks(b) == [0, 3]
    assert [n.chunk for n in node(cache, 0).children] == [1, 3]
    stats(cache, sequences=2, chunks_free=12, chunks_cached=0, chunks_referenced=4,
          tokens_stored=3 * c + 1, tokens_flat=len(A) + len(B))
    assert cache.seq_tokens(a) == A and cache.seq_tokens(b) == B
    assert_kv(cache, kv, a)
    assert_kv(cache, kv, b)


@C_SIZES
def test_prompt_ending_on_a_chunk_boundary(c):
    A = list(range(1, 2 * c + 1))
    cache, kv = make(c)
    a = add(cache, kv, A)
    assert shape(cache) == [(0, -1, A[:c], 1, True), (1, 0, A[c:], 1, True)]  # no partial node
    b = add(cache, kv, A + [40])
    assert cache.seq_chunks(b) == [0, 1, 2]
    assert shape(cache)[-1] == (2, 1, [40], 1, False)
    free = cache.num_free
    d = add(cache, kv, A)  # the same prompt again: all of it matched, nothing allocated
    assert cache.seq_chunks(d) == [0, 1] and cache.seq_len(d) == 2 * c and cache.num_free == free
    assert [n.ref for n in cache.nodes()] == [3, 3, 1]
    append(cache, kv, [d], [41])  # a full shared chunk is never appended to
    assert cache.seq_chunks(d) == [0, 1, 3]
    assert node(cache, 1).tokens == A[c:] and node(cache, 3).tokens == [41]
    stats(cache, sequences=3, chunks_referenced=4, tokens_stored=2 * c + 2,
          tokens_flat=2 * c + (2 * c + 1) * 2)
    for s in (a, b, d):
        assert_kv(cache, kv, s)


@C_SIZES
def test_strict_prefix_prompt_shorter_first(c):
    h = c // 2
    A = list(range(1, c + h + 1))             # one chunk and a half
    B = A + [40 + i for i in range(c - h)] + [45]
    cache, kv = make(c)
    a = add(cache, kv, A)
    b = add(cache, kv, B)  # A's partial chunk is private: B stores those tokens again
    assert shape(cache) == [
        (0, -1, A[:c], 2, True),
        (1, 0, A[c:], 1, False),
        (2, 0, B[c: 2 * c], 1, True),
        (3, 2, [45], 1, False),
    ]
    assert cache.seq_chunks(a) == [0, 1] and cache.seq_chunks(b) == [0, 2, 3]
    assert_kv(cache, kv, a)
    assert_kv(cache, kv, b)


@C_SIZES
def test_strict_prefix_prompt_longer_first(c):
    h = c // 2
    B = list(range(1, 2 * c + 2))             # two chunks and one token
    cache, kv = make(c)
    b = add(cache, kv, B)
    a = add(cache, kv, B[: c + h])  # matches B's first chunk; B's second is longer than what is left
    assert cache.seq_chunks(a) == [0, 3]
    assert node(cache, 3).tokens == B[c: c + h] and node(cache, 3).parent is node(cache, 0)
    e = add(cache, kv, B[: 2 * c])  # ends on B's second chunk boundary: all matched
    assert cache.seq_chunks(e) == [0, 1]
    assert [n.ref for n in cache.nodes()] == [3, 2, 1, 1]
    stats(cache, chunks_referenced=4, tokens_stored=2 * c + 1 + h)
    for s in (a, b, e):
        assert_kv(cache, kv, s)


@C_SIZES
def test_release_of_a_middle_sequence(c):
    P = list(range(1, c + 1))
    own = [[10 + 5 * i + j for j in range(c + 1)] for i in range(3)]  # a full chunk and one token each
    cache, kv = make(c)
    ids = [add(cache, kv, P + o) for o in own]
    before = {s: (cache.seq_tokens(s), cache.seq_chunks(s), cache.read_kv(s, 1)) for s in ids}
    assert node(cache, 0).ref == 3
    a, b, d = ids
    b_chunks = cache.seq_chunks(b)
    cache.release(b)
    assert cache.sequences == [a, d] and not cache.is_live(b)
    with pytest.raises(CacheError, match="seq"):
        cache.seq_len(b)
    assert node(cache, 0).ref == 2
    # B's complete chunk is cached (ref 0, still in the tree); its partial chunk went back free
    assert node(cache, b_chunks[1]).ref == 0 and [n.chunk for n in cache.cached_nodes()] == [b_chunks[1]]
    assert b_chunks[2] in cache.free_chunks() and b_chunks[2] not in [n.chunk for n in cache.nodes()]
    stats(cache, sequences=2, chunks_cached=1, chunks_referenced=5, chunks_free=10,
          tokens_stored=c + 3 * c + 2, tokens_flat=2 * (2 * c + 1))
    for s in (a, d):  # the others are untouched and keep their ids
        toks, chunks, (k1, v1) = before[s]
        assert cache.seq_tokens(s) == toks and cache.seq_chunks(s) == chunks
        k2, v2 = cache.read_kv(s, 1)
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(v1, v2)
        assert_kv(cache, kv, s)


@C_SIZES
def test_fork_shares_full_chunks_and_copies_the_tail(c):
    h = c // 2
    A = list(range(1, 2 * c + h + 1))
    cache, kv = make(c)
    a = add(cache, kv, A)
    f = cache.fork(a)
    assert cache.seq_chunks(a) == [0, 1, 2] and cache.seq_chunks(f) == [0, 1, 3]
    assert [n.ref for n in cache.nodes()] == [2, 2, 1, 1]
    assert node(cache, 3).tokens == node(cache, 2).tokens == A[2 * c:]
    assert cache.seq_len(f) == len(A) and cache.seq_tokens(f) == A
    for layer in range(L):
        for x, y in zip(cache.read_kv(a, layer), cache.read_kv(f, layer)):
            np.testing.assert_array_equal(x, y)
    append(cache, kv, [f], [33])  # appending to the fork does not touch the original
    assert cache.seq_tokens(a) == A and cache.seq_len(a) == len(A)
    assert node(cache, 2).tokens == A[2 * c:]
    assert cache.seq_tokens(f) == A + [33]
    append(cache, kv, [a], [44])
    assert cache.seq_tokens(f) == A + [33] and cache.seq_tokens(a) == A + [44]
    assert_kv(cache, kv, a)
    assert_kv(cache, kv, f)


@C_SIZES
def test_fork_on_a_boundary_copies_nothing(c):
    A = list(range(1, 2 * c + 1))
    cache, kv = make(c)
    a = add(cache, kv, A)
    free = cache.num_free
    f = cache.fork(a)
    assert cache.seq_chunks(f) == cache.seq_chunks(a) == [0, 1] and cache.num_free == free
    assert [n.ref for n in cache.nodes()] == [2, 2]
    append(cache, kv, [a, f], [7, 8])  # each opens its own new chunk
    assert cache.seq_chunks(a) == [0, 1, 2] and cache.seq_chunks(f) == [0, 1, 3]
    assert cache.seq_tokens(a) == A + [7] and cache.seq_tokens(f) == A + [8]
    assert_kv(cache, kv, a)
    assert_kv(cache, kv, f)


@C_SIZES
def test_reuse_after_release(c):
    h = c // 2
    A = list(range(1, 2 * c + h + 1))
    cache, kv = make(c)
    a = add(cache, kv, A)
    chunks = cache.seq_chunks(a)
    cache.release(a)
    stats(cache, sequences=0, chunks_cached=2, chunks_free=14, tokens_stored=2 * c)
    b = cache.add_sequence(A)  # no K/V: takes the cached prefix only
    assert cache.seq_len(b) == 2 * c and cache.seq_chunks(b) == chunks[:2]
    assert cache.seq_tokens(b) == A[: 2 * c]
    stats(cache, sequences=1, chunks_cached=0, chunks_referenced=2)
    k, v = kv(A[2 * c:], start=2 * c)
    cache.extend(b, A[2 * c:], k, v)
    assert cache.seq_tokens(b) == A
    assert_kv(cache, kv, b)
    # max_match caps reuse to whole chunks within the cap
    assert cache.seq_len(cache.add_sequence(A, max_match=2 * c)) == 2 * c
    assert cache.seq_len(cache.add_sequence(A, max_match=2 * c - 1)) == c
    assert cache.seq_len(cache.add_sequence(A, max_match=0)) == 0
    assert cache.seq_len(cache.add_sequence(A[: 2 * c - 1])) == c
    # with K/V and max_match: the capped part is written again into a new (duplicate) chunk
    pool = cache.k_pool.copy()
    d = add(cache, kv, A[: 2 * c], max_match=2 * c - 1)
    assert cache.seq_chunks(d)[0] == chunks[0] and cache.seq_chunks(d)[1] not in chunks
    np.testing.assert_array_equal(cache.k_pool[:, chunks[:2]], pool[:, chunks[:2]])
    assert_kv(cache, kv, d)


@C_SIZES
def test_eviction_is_lru_and_leaf_first(c):
    P, X = [1] * c, [2] * c
    Q, Y = [3] * c, [4] * c
    cache, kv = make(c, num_chunks=6)
    a, b = add(cache, kv, P + X), add(cache, kv, Q + Y)
    pc, xc = cache.seq_chunks(a)
    qc, yc = cache.seq_chunks(b)
    cache.release(a)
    cache.release(b)
    assert [n.chunk for n in cache.cached_nodes()] == [xc, pc, yc, qc]  # leaves first
    cache.release(add(cache, kv, P + X))  # A's chunks reused: now more recent than B's
    assert [n.chunk for n in cache.cached_nodes()] == [yc, qc, xc, pc]
    v0 = cache.version
    assert cache.evict(1) == 1
    assert cache._free[-1] == yc and cache.version > v0
    assert [n.chunk for n in cache.nodes()] == [pc, xc, qc]
    assert cache.evict(0) == 0
    assert cache.evict(2) == 2
    assert [n.chunk for n in cache.nodes()] == [pc]
    assert cache.add_sequence(P + X) is not None and cache.num_cached == 0  # P matched, X gone
    assert cache.evict() == 0
    stats(cache, sequences=1, chunks_free=5, chunks_referenced=1, tokens_stored=c)


@C_SIZES
def test_allocation_evicts_when_the_free_list_is_empty(c):
    P, X, Q, Y = [1] * c, [2] * c, [3] * c, [4] * c
    cache, kv = make(c, num_chunks=4)
    a = add(cache, kv, P + X)
    pc, xc = cache.seq_chunks(a)
    cache.release(a)
    b = add(cache, kv, Q + Y)
    assert cache.num_free == 0 and cache.num_cached == 2
    d = add(cache, kv, [5])  # evicts X, the LRU leaf, and takes its chunk
    assert cache.seq_chunks(d) == [xc] and [n.chunk for n in cache.cached_nodes()] == [pc]
    # P is matched (revived), X needs a chunk, and the only cached chunk is P: the pool is full
    with pytest.raises(CacheFullError, match="pool"):
        add(cache, kv, P + X)
    assert [n.chunk for n in cache.cached_nodes()] == [pc] and cache.num_free == 0
    cache.release(d)
    e = add(cache, kv, P + X)
    assert cache.seq_chunks(e) == [pc, xc]
    for s in (b, e):
        assert_kv(cache, kv, s)


@C_SIZES
def test_share_prefix_off_stores_everything_separately(c):
    h = c // 2
    A = list(range(1, 2 * c + h + 1))
    cache, kv = make(c, share_prefix=False)
    a, b = add(cache, kv, A), add(cache, kv, A)
    assert cache.seq_chunks(a) == [0, 1, 2] and cache.seq_chunks(b) == [3, 4, 5]
    assert all(n.ref == 1 and not n.registered for n in cache.nodes())
    assert cache.root.index == {} and [n.chunk for n in cache.root.children] == [0, 3]
    assert cache.seq_len(cache.add_sequence(A)) == 0  # nothing to match
    f = cache.fork(a)
    assert cache.seq_chunks(f) == [6, 7, 8]
    stats(cache, sequences=4, chunks_referenced=9, tokens_stored=3 * len(A), tokens_flat=3 * len(A))
    cache.release(a)
    stats(cache, chunks_cached=0, chunks_free=16 - 6)
    for s in (b, f):
        assert_kv(cache, kv, s)
