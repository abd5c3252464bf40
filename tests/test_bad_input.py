"""Bad input raises ValueError/TypeError/CacheError naming the argument, and changes nothing.

Every call below runs inside ``unchanged(cache)``: stats, version, every sequence's length,
tokens and chunks, the free list, the tree, and the pool bytes are compared before and after.
"""
from __future__ import annotations

import numpy as np
import pytest

from cpattn.reference.chunk_attention import build_decode_plan, decode, oracle_decode
from cpattn.reference.chunk_cache import CacheError, CacheFullError, ChunkCache
from cpattn.reference.workloads import TokenKV

L, HKV, D, C = 2, 2, 8, 4


@pytest.fixture
def setup():
    """A cache with a full chunk shared by two sequences, a cached chunk, and room for more."""
    cache = ChunkCache(L, HKV, D, num_chunks=8, chunk_size=C, max_sequences=8)
    kv = TokenKV(L, HKV, D, seed=2)

    def add(tokens):
        return cache.add_sequence(tokens, *kv(tokens))

    a = add([1, 2, 3, 4, 5, 6])
    b = add([1, 2, 3, 4, 7])
    gone = add([9, 9, 9, 9, 9])
    cache.release(gone)  # [9]*4 stays cached, its tail chunk is freed
    return cache, kv, a, b, gone


def test_the_snapshot_sees_every_kind_of_change(setup, unchanged):
    """The guard used below fails on a change to the pool, the free list, lengths or the tree."""
    cache, kv, a, b, _ = setup
    changes = [lambda: cache.k_pool.__setitem__((1, 0, 0, 0, 0), 1.0),
               lambda: cache.v_pool.reshape(-1).__setitem__(-1, -0.0),  # sign bit only
               lambda: cache._free.reverse(),
               lambda: cache.evict(),
               lambda: cache.extend(a, [1], *kv([1], start=cache.seq_len(a))),
               lambda: cache.reserve(b, [2])]
    for change in changes:
        with pytest.raises(AssertionError):
            with unchanged(cache):
                change()


def raises(exc, name):
    """pytest.raises whose message must start with the argument's name."""
    return pytest.raises(exc, match=rf"^{name}:")


def one(kv, tok=3, start=0, batch=1):
    k, v = kv([tok] * batch, start=start)
    return k, v


# ---------------------------------------------------------------------- K/V shapes and dtypes
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("bad", ["layers", "tokens", "heads", "head_dim", "ndim", "dtype", "list"])
def test_bad_kv_in_add_extend_append(setup, unchanged, which, bad):
    cache, kv, a, b, _ = setup
    exc = TypeError if bad in ("dtype", "list") else ValueError

    def spoil(k, v):
        x = {"k": k, "v": v}[which]
        x = {"layers": x[:1], "tokens": x[:, :-1], "heads": x[:, :, :1], "head_dim": x[..., :-1],
             "ndim": x[0], "dtype": x.astype(np.float32), "list": x.tolist()}[bad]
        return (x, v) if which == "k" else (k, x)

    toks = [5, 6, 7]
    with unchanged(cache), raises(exc, which):
        cache.add_sequence(toks, *spoil(*kv(toks)))
    with unchanged(cache), raises(exc, which):
        cache.extend(a, toks, *spoil(*kv(toks, start=cache.seq_len(a))))
    with unchanged(cache), raises(exc, which):
        k, v = kv([8, 8])
        cache.append([a, b], [8, 8], *spoil(k, v))


def test_bad_kv_in_write_kv(setup, unchanged):
    cache, kv, a, _, _ = setup
    slots = cache.reserve(a, [4, 4])
    k, v = kv([4, 4], start=6)
    with unchanged(cache):
        with raises(ValueError, "k"):
            cache.write_kv(0, slots, k[0, :1], v[0])
        with raises(TypeError, "v"):
            cache.write_kv(0, slots, k[0], v[0].astype(np.float64))
        with raises(ValueError, "layer"):
            cache.write_kv(L, slots, k[0], v[0])


def test_k_without_v(setup, unchanged):
    cache, kv, *_ = setup
    k, _ = kv([1, 2])
    with unchanged(cache), pytest.raises(ValueError, match="k, v"):
        cache.add_sequence([1, 2], k)
    with unchanged(cache), pytest.raises(ValueError, match="k, v"):
        cache.add_sequence([1, 2], v=k)


# ---------------------------------------------------------------------- tokens
@pytest.mark.parametrize("tokens", [[1.0, 2.0], [1, 2.5], ["a", "b"], [[1, 2], [3, 4]], [[1, 2], [3]],
                                    [1, None], 7, [True, False]],
                         ids=["floats", "mixed", "strings", "2d", "ragged", "none", "scalar", "bools"])
def test_tokens_not_integers(setup, unchanged, tokens):
    cache, kv, a, b, _ = setup
    k, v = kv([1, 2])
    with unchanged(cache), raises(TypeError, "tokens"):
        cache.add_sequence(tokens)
    with unchanged(cache), raises(TypeError, "tokens"):
        cache.extend(a, tokens, k, v)
    with unchanged(cache), raises(TypeError, "tokens"):
        cache.append([a, b], tokens, k, v)
    with unchanged(cache), raises(TypeError, "tokens"):
        cache.reserve(a, tokens)


def test_append_needs_one_token_per_sequence(setup, unchanged):
    cache, kv, a, b, _ = setup
    k, v = kv([1, 2])
    with unchanged(cache), raises(ValueError, "tokens"):
        cache.append([a, b], [1], k, v)


@pytest.mark.parametrize("max_match", ["2", 1.5, [3]])
def test_max_match_not_an_integer(setup, unchanged, max_match):
    cache, kv, *_ = setup
    with unchanged(cache), raises(TypeError, "max_match"):
        cache.add_sequence([9, 9, 9, 9], max_match=max_match)


# ---------------------------------------------------------------------- sequence ids
def test_unknown_and_released_sequences(setup, unchanged):
    cache, kv, a, b, gone = setup
    k, v = one(kv)
    for bad in (gone, 12345, -1, "x", None, 0.0 + a + 0.5, True):
        with unchanged(cache):
            for call in (lambda: cache.extend(bad, [3], k, v), lambda: cache.fork(bad),
                         lambda: cache.release(bad), lambda: cache.reserve(bad, [3]),
                         lambda: cache.commit(bad), lambda: cache.read_kv(bad, 0),
                         lambda: cache.seq_len(bad), lambda: cache.seq_tokens(bad)):
                with raises(CacheError, "seq"):
                    call()
            with raises(CacheError, "seqs"):
                cache.append([a, bad], [3, 3], *one(kv, batch=2))
            with raises(CacheError, "seqs"):
                build_decode_plan(cache, [bad, a])
            q = np.zeros((2, HKV, D), np.float16)
            with raises(CacheError, "seqs"):
                oracle_decode(cache, [a, bad], q)
    assert not cache.is_live(gone)


@pytest.mark.parametrize("seqs", [[], (), np.zeros(0, np.int64)], ids=["list", "tuple", "array"])
def test_empty_batch(setup, unchanged, seqs):
    cache, kv, *_ = setup
    k, v = kv([])
    with unchanged(cache):
        with raises(ValueError, "seqs"):
            cache.append(seqs, [], k, v)
        with raises(ValueError, "seqs"):
            build_decode_plan(cache, seqs)
        with raises(ValueError, "seqs"):
            oracle_decode(cache, seqs, np.zeros((0, HKV, D), np.float16))


def test_duplicate_ids(setup, unchanged):
    cache, kv, a, b, _ = setup
    with unchanged(cache):
        with raises(ValueError, "seqs") as e:
            cache.append([a, b, a], [1, 2, 3], *one(kv, batch=3))
        assert str(a) in str(e.value)
        with raises(ValueError, "seqs"):
            build_decode_plan(cache, np.array([b, b]))


def test_plan_of_an_empty_sequence(setup, unchanged):
    cache, kv, a, _, _ = setup
    e = cache.add_sequence([7, 7])  # nothing cached matches: no tokens
    assert cache.seq_len(e) == 0
    with unchanged(cache), raises(CacheError, "seqs"):
        build_decode_plan(cache, [a, e])


@pytest.mark.parametrize("arg,val,exc", [("piece_chunks", 0, ValueError), ("private_piece_chunks", -1, ValueError),
                                         ("piece_chunks", 2**31, ValueError), ("piece_chunks", 1.5, TypeError),
                                         ("piece_chunks", True, TypeError)])
def test_bad_piece_sizes(setup, unchanged, arg, val, exc):
    cache, _, a, b, _ = setup
    with unchanged(cache), raises(exc, arg):
        build_decode_plan(cache, [a, b], **{arg: val})


# ---------------------------------------------------------------------- pool full
def full_cache():
    """A 4-chunk pool: one live sequence with a partial tail, one cached chunk, one free."""
    cache = ChunkCache(L, HKV, D, num_chunks=4, chunk_size=C)
    kv = TokenKV(L, HKV, D, seed=2)
    s = cache.add_sequence(list(range(6)), *kv(list(range(6))))  # chunks 0 (full), 1 (2 tokens)
    cache.release(cache.add_sequence([9] * 4, *kv([9] * 4)))  # chunk 2 cached
    assert (cache.num_free, cache.num_cached) == (1, 1)
    return cache, kv, s


def test_pool_full_in_add_sequence(unchanged):
    cache, kv, s = full_cache()
    toks = list(range(20, 20 + 3 * C))  # 3 chunks; 2 available
    with unchanged(cache), raises(CacheFullError, "pool"):
        cache.add_sequence(toks, *kv(toks))
    # reviving the cached chunk makes it unavailable for the rest of the prompt
    toks = [9] * 4 + list(range(20, 20 + 2 * C))
    with unchanged(cache), raises(CacheFullError, "pool"):
        cache.add_sequence(toks, *kv(toks))


def test_pool_full_in_extend_and_reserve(unchanged):
    cache, kv, s = full_cache()
    toks = [5] * (2 + 2 * C + 1)  # fills the tail (2), then needs 3 chunks; 2 available
    k, v = kv(toks, start=6)
    with unchanged(cache), raises(CacheFullError, "pool"):
        cache.extend(s, toks, k, v)
    with unchanged(cache), raises(CacheFullError, "pool"):
        cache.reserve(s, toks)
    cache.extend(s, toks[:-1], k[:, :-1], v[:, :-1])  # exactly what fits: evicts the cached chunk
    assert cache.num_free == cache.num_cached == 0


def test_pool_full_in_append(unchanged):
    cache, kv, s = full_cache()
    toks = [5] * (2 + C)
    cache.extend(s, toks, *kv(toks, start=6))  # tail full again, 1 free (or cached) chunk left
    t = cache.fork(s)  # all full: nothing copied
    u = cache.add_sequence(list(range(4)))  # matched chunk 0 only
    assert cache.seq_len(u) == C and cache.num_free + cache.num_cached == 1
    k, v = kv([1, 1, 1], start=cache.seq_len(s))
    with unchanged(cache), raises(CacheFullError, "pool"):  # 2 chunks needed (s, t), u shares none
        cache.append([s, t], [1, 1], k[:, :2], v[:, :2])
    with unchanged(cache), raises(CacheFullError, "pool"):
        cache.append([u, s, t], [1, 1, 1], k, v)


def test_pool_full_in_fork(unchanged):
    cache, kv, s = full_cache()
    cache.add_sequence([8] * 5, *kv([8] * 5))  # takes the free and the cached chunk
    assert cache.num_free + cache.num_cached == 0
    with unchanged(cache), raises(CacheFullError, "pool"):
        cache.fork(s)  # its partial tail needs a copy


def test_out_of_sequence_slots(unchanged):
    cache = ChunkCache(L, HKV, D, num_chunks=4, chunk_size=C, max_sequences=2)
    a = cache.add_sequence([])
    cache.add_sequence([])
    with unchanged(cache), raises(CacheError, "max_sequences"):
        cache.add_sequence([1])
    with unchanged(cache), raises(CacheError, "max_sequences"):
        cache.fork(a)


# ---------------------------------------------------------------------- mid-prefill, stale plans
def test_reserve_with_uncommitted_tokens(setup, unchanged):
    cache, kv, a, b, _ = setup
    cache.reserve(a, [1, 2, 3])
    k, v = one(kv)
    with unchanged(cache):
        for call in (lambda: cache.reserve(a, [4]), lambda: cache.extend(a, [4], k, v),
                     lambda: cache.fork(a)):
            with raises(CacheError, "seq"):
                call()
        with raises(CacheError, "seqs"):  # the batch calls name their own argument
            cache.append([b, a], [4, 4], *one(kv, batch=2))


def test_stale_plan(setup, unchanged):
    cache, kv, a, b, gone = setup
    plan = build_decode_plan(cache, [a, b])
    q = np.zeros((2, HKV, D), np.float16)
    decode(cache, plan, q)
    cache.append([b], [1], *one(kv, start=cache.seq_len(b)))  # b's tail had room: plan still valid
    decode(cache, plan, q)
    k, v = kv([1, 2, 3], start=cache.seq_len(a))
    cache.extend(a, [1, 2, 3], k, v)  # a opens a new chunk
    with unchanged(cache), raises(CacheError, "plan"):
        decode(cache, plan, q)
    plan = build_decode_plan(cache, [a, b])
    cache.release(cache.add_sequence([]))  # any structural change, even elsewhere
    with unchanged(cache), raises(CacheError, "plan"):
        decode(cache, plan, q)


# ---------------------------------------------------------------------- q
@pytest.mark.parametrize("shape,exc", [((3, HKV, D), ValueError), ((2, HKV, D + 1), ValueError),
                                       ((2, HKV + 1, D), ValueError), ((2, 3 * HKV + 1, D), ValueError),
                                       ((2, 0, D), ValueError), ((2, HKV * D), ValueError),
                                       ((2, 1, HKV, D), ValueError)],
                         ids=["batch", "head_dim", "heads", "heads2", "no_heads", "2d", "4d"])
def test_bad_q_shape(setup, unchanged, shape, exc):
    cache, _, a, b, _ = setup
    plan = build_decode_plan(cache, [a, b])
    q = np.zeros(shape, np.float16)
    with unchanged(cache):
        with raises(exc, "q"):
            decode(cache, plan, q)
        with raises(exc, "q"):
            oracle_decode(cache, [a, b], q)


@pytest.mark.parametrize("q", [np.zeros((2, HKV, D), np.float32), np.zeros((2, HKV, D), np.uint16),
                               np.zeros((2, HKV, D), np.int16)], ids=["float32", "uint16", "int16"])
def test_bad_q_dtype(setup, unchanged, q):
    cache, _, a, b, _ = setup
    plan = build_decode_plan(cache, [a, b])
    with unchanged(cache):
        with raises(TypeError, "q"):
            decode(cache, plan, q)
        with raises(TypeError, "q"):
            oracle_decode(cache, [a, b], q)


def test_q_not_an_array(setup, unchanged):
    cache, _, a, b, _ = setup
    plan = build_decode_plan(cache, [a, b])
    with unchanged(cache), raises(TypeError, "q"):  # a list is not an array: a wrong type
        decode(cache, plan, np.zeros((2, HKV, D), np.float16).tolist())


@pytest.mark.parametrize("layer,exc", [(-1, ValueError), (L, ValueError), (0.0, TypeError), ("0", TypeError),
                                       (True, TypeError), (np.int64(L), ValueError)])
def test_bad_layer(setup, unchanged, layer, exc):
    cache, _, a, b, _ = setup
    plan = build_decode_plan(cache, [a, b])
    q = np.zeros((2, HKV, D), np.float16)
    with unchanged(cache):
        for call in (lambda: decode(cache, plan, q, layer), lambda: oracle_decode(cache, [a, b], q, layer),
                     lambda: cache.read_kv(a, layer)):
            with raises(exc, "layer"):
                call()


# ---------------------------------------------------------------------- construction
@pytest.mark.parametrize("kw,name", [
    (dict(chunk_size=3), "chunk_size"), (dict(chunk_size=256), "chunk_size"),
    (dict(chunk_size=0), "chunk_size"), (dict(dtype="float32"), "dtype"), (dict(dtype=np.float32), "dtype"),
    (dict(num_chunks=0), "num_chunks"), (dict(num_layers=0), "num_layers"),
    (dict(head_dim=-8), "head_dim"), (dict(max_sequences=0), "max_sequences"),
])
def test_bad_construction(kw, name):
    args = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, num_chunks=4) | kw
    with raises(ValueError, name):
        ChunkCache(**args)


@pytest.mark.parametrize("kw,name", [
    (dict(num_kv_heads=2.0), "num_kv_heads"), (dict(num_layers=True), "num_layers"),
    (dict(chunk_size=True), "chunk_size"), (dict(num_chunks="4"), "num_chunks"),
])
def test_bad_construction_type(kw, name):
    args = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, num_chunks=4) | kw
    with raises(TypeError, name):
        ChunkCache(**args)
