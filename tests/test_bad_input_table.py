"""Bad input across the public API, as one table; and NaN confinement.

Each row is ``(name, call, expected exception, argument name)``. The call must raise that
exception with a message ``"<argument>: expected ..., got ..."``, and every cache of the world
must be byte-for-byte unchanged afterwards (``conftest.snapshot``: tree, free list, lengths,
pending rows, pools). The same table is in docs/guarantees.md. GPU-API rows run under the
``gpu`` marker on a GpuChunkCache world.

NaN in one sequence's query is not an error (checking values would need a device sync); it
must stay in that sequence's output: every other sequence's output is bit-for-bit what it is
without the NaN.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pytest

from cpattn import gpu_available
from cpattn.arrays import to_host
from cpattn.reference import compact_attention as ca
from cpattn.reference.chunk_attention import build_decode_plan, decode, oracle_decode
from cpattn.reference.dtypes import to_float32
from cpattn.reference.chunk_cache import CacheError, CacheFullError, ChunkCache, Slots
from cpattn.reference.workloads import TokenKV, fill_cache, prefix_tree_prompts, random_queries
from cpattn.testing import assert_same_snapshot, get_backend, snapshot

L, HKV, HQ = 2, 2, 4


@dataclass
class World:
    """Caches in every state the table needs. Sequences of ``cache``:

    a, b      live, sharing one full chunk; a has a partial tail
    p         live, length 2c (aligned, committed: ready for a prefill chunk)
    gone      released (its full chunk stays cached)
    away      forked into ``child`` and then released
    mid       mid-prefill: 2 tokens reserved, not committed (``mid_slots``)
    empty     live with no tokens
    ``full`` has no free or evictable chunk; ``no_slots`` has no free sequence slot.
    """

    backend: object
    D: int
    C: int
    cache: ChunkCache = None
    full: ChunkCache = None
    no_slots: ChunkCache = None
    kv: TokenKV = None
    ids: dict = field(default_factory=dict)

    def __getattr__(self, name):  # w.a, w.b, ... are sequence ids
        ids = self.__dict__.get("ids", {})
        if name in ids:
            return ids[name]
        raise AttributeError(name)

    @property
    def caches(self):
        return [self.cache, self.full, self.no_slots]

    def k_v(self, tokens, start=0, layers=None):
        k, v = self.kv(tokens, start=start)
        return self.backend.asarray(k), self.backend.asarray(v)

    def q(self, batch, heads=HQ, seed=0):
        return random_queries(seed, batch, heads, self.D, self.cache.dtype)


def make_world(backend, D, C) -> World:
    w = World(backend=backend, D=D, C=C)
    w.kv = TokenKV(L, HKV, D, seed=2, vocab=16, max_len=64)
    w.cache = backend.make_cache(L, HKV, D, 16, chunk_size=C, max_sequences=12)

    def add(cache, tokens):
        return cache.add_sequence(tokens, *w.k_v(tokens))

    full_chunk = list(range(1, C + 1))
    w.ids["a"] = add(w.cache, full_chunk + [5, 6])
    w.ids["b"] = add(w.cache, full_chunk + [7])
    w.ids["p"] = add(w.cache, [4] * (2 * C))
    w.ids["gone"] = add(w.cache, [9] * (C + 1))
    w.cache.release(w.gone)
    w.ids["away"] = add(w.cache, [5] * C + [6])
    w.ids["child"] = w.cache.fork(w.away)
    w.cache.release(w.away)
    w.ids["mid"] = add(w.cache, [2] * C)
    w.mid_slots = w.cache.reserve(w.mid, [3, 3])
    w.ids["empty"] = w.cache.add_sequence([])
    w.committed_slots = Slots(np.array(w.cache.seq_chunks(w.a)[:1], np.int32), np.array([1], np.int32))
    w.means = backend.api.BlockMeans(w.cache)

    w.full = backend.make_cache(L, HKV, D, 3, chunk_size=C)  # every chunk referenced
    w.ids["f"] = add(w.full, [1] * (C + 1))  # a full chunk and a partial tail
    w.ids["g"] = add(w.full, [3] * C)  # one full chunk: its next token needs a new one
    w.no_slots = backend.make_cache(L, HKV, D, 4, chunk_size=C, max_sequences=1)
    w.ids["only"] = add(w.no_slots, [1])
    w.plan = build_decode_plan(w.cache, [w.a, w.b])
    w.stale_plan = build_decode_plan(w.cache, [w.b])
    w.cache.extend(w.a, [8] * C, *w.k_v([8] * C, start=w.cache.seq_len(w.a)))  # a new chunk: stale
    w.plan = build_decode_plan(w.cache, [w.a, w.b])
    for cache in w.caches:
        if hasattr(cache, "sync_lens"):
            cache.sync_lens()
    return w


def bad_kv(w, tokens, start=0, which="k", how="tokens"):
    """K/V for ``tokens`` with one of them spoiled."""
    k, v = w.kv(tokens, start=start)
    x = {"k": k, "v": v}[which]
    x = {"tokens": x[:, :-1], "layers": x[:1], "heads": x[:, :, :1], "head_dim": x[..., :-1],
         "dtype": x.astype(np.float32)}[how]
    k, v = (x, v) if which == "k" else (k, x)
    return w.backend.asarray(k), w.backend.asarray(v)


def prefill_q(w, n, heads=HQ):
    return random_queries(1, n, heads, w.D, w.cache.dtype)


# (name, call, expected exception, argument the message must name)
CASES = [
    # ---- K/V: shape, dtype
    ("add: k with a token missing", lambda w: w.cache.add_sequence([1, 2, 3], *bad_kv(w, [1, 2, 3])), ValueError, "k"),
    ("add: k without v", lambda w: w.cache.add_sequence([1, 2], w.k_v([1, 2])[0]), ValueError, "k, v"),
    ("extend: v float32", lambda w: w.cache.extend(w.b, [1], *bad_kv(w, [1], which="v", how="dtype")),
     TypeError, "v"),
    ("extend: k with one layer", lambda w: w.cache.extend(w.b, [1], *bad_kv(w, [1], how="layers")), ValueError, "k"),
    ("append: v heads not num_kv_heads", lambda w: w.cache.append([w.a, w.b], [1, 1], *bad_kv(
        w, [1, 1], which="v", how="heads")), ValueError, "v"),
    ("write_kv: k head_dim short", lambda w: w.cache.write_kv(
        0, w.mid_slots, bad_kv(w, [3, 3], how="head_dim")[0][0], w.k_v([3, 3])[1][0]), ValueError, "k"),
    ("write_kv: stale slots (committed, shared chunk)", lambda w: w.cache.write_kv(
        0, w.committed_slots, *(x[0, :1] for x in w.k_v([3]))), ValueError, "slots"),
    ("write_kv: slots outside the pool", lambda w: w.cache.write_kv(
        0, Slots(np.array([10**6], np.int32), np.array([0], np.int32)), *(x[0, :1] for x in w.k_v([3]))),
     ValueError, "slots"),
    ("write_kv: layer out of range", lambda w: w.cache.write_kv(
        L, w.mid_slots, *(x[0] for x in w.k_v([3, 3]))), ValueError, "layer"),
    # ---- tokens and counts
    ("add: float tokens", lambda w: w.cache.add_sequence([1.5, 2.0]), TypeError, "tokens"),
    ("add: max_match a string", lambda w: w.cache.add_sequence([1], max_match="2"), TypeError, "max_match"),
    ("append: fewer tokens than sequences", lambda w: w.cache.reserve_batch([w.a, w.b], [1]), ValueError, "tokens"),
    ("evict: negative count", lambda w: w.cache.evict(-1), ValueError, "max_chunks"),
    ("evict: fractional count", lambda w: w.cache.evict(1.5), TypeError, "max_chunks"),
    # ---- sequences: unknown, released, forked away, mid-prefill, empty/duplicate batches
    ("extend: unknown sequence", lambda w: w.cache.extend(12345, [1], *w.k_v([1])), CacheError, "seq"),
    ("fork: released sequence", lambda w: w.cache.fork(w.gone), CacheError, "seq"),
    ("read_kv: forked-away (released) parent", lambda w: w.cache.read_kv(w.away, 0), CacheError, "seq"),
    ("extend: forked-away parent", lambda w: w.cache.extend(w.away, [1], *w.k_v([1])), CacheError, "seq"),
    ("plan: released sequence in the batch", lambda w: build_decode_plan(w.cache, [w.a, w.gone]), CacheError, "seqs"),
    ("extend: sequence mid-prefill", lambda w: w.cache.extend(w.mid, [1], *w.k_v([1])), CacheError, "seq"),
    ("append: sequence mid-prefill", lambda w: w.cache.append([w.a, w.mid], [1, 1], *w.k_v([1, 1])),
     CacheError, "seqs"),
    ("fork: sequence mid-prefill", lambda w: w.cache.fork(w.mid), CacheError, "seq"),
    ("plan: empty batch", lambda w: build_decode_plan(w.cache, []), ValueError, "seqs"),
    ("append: empty batch", lambda w: w.cache.append([], [], *(x[:, :0] for x in w.k_v([1]))), ValueError, "seqs"),
    ("plan: duplicate ids", lambda w: build_decode_plan(w.cache, [w.a, w.b, w.a]), ValueError, "seqs"),
    ("append: duplicate ids", lambda w: w.cache.append([w.a, w.a], [1, 1], *w.k_v([1, 1])), ValueError, "seqs"),
    ("oracle_decode: sequence id True", lambda w: oracle_decode(w.cache, [True], w.q(1)), CacheError, "seqs"),
    # ---- resources
    ("add: pool full, nothing evictable", lambda w: w.full.add_sequence([2] * 3, *w.k_v([2] * 3)),
     CacheFullError, "pool"),
    ("append: pool full, nothing evictable", lambda w: w.full.append(
        [w.g], [1], *w.k_v([1], start=w.C)), CacheFullError, "pool"),
    ("extend: pool full, nothing evictable", lambda w: w.full.extend(
        w.f, [1] * w.C, *w.k_v([1] * w.C, start=w.C + 1)), CacheFullError, "pool"),
    ("fork: pool full (tail copy)", lambda w: w.full.fork(w.f), CacheFullError, "pool"),
    ("add: no sequence slot left", lambda w: w.no_slots.add_sequence([1]), CacheError, "max_sequences"),
    # ---- decode
    ("decode: q heads not a multiple of kv heads", lambda w: decode(w.cache, w.plan, w.q(2, heads=3)),
     ValueError, "q"),
    ("decode: q float32", lambda w: decode(w.cache, w.plan, w.q(2).astype(np.float32)), TypeError, "q"),
    ("decode: q batch != plan batch", lambda w: decode(w.cache, w.plan, w.q(3)), ValueError, "q"),
    ("oracle_decode: q head_dim", lambda w: oracle_decode(w.cache, [w.a], w.q(1)[..., :-1]), ValueError, "q"),
    ("decode: stale plan", lambda w: decode(w.cache, w.stale_plan, w.q(1)), CacheError, "plan"),
    ("decode: layer out of range", lambda w: decode(w.cache, w.plan, w.q(2), L), ValueError, "layer"),
    ("plan: piece_chunks 0", lambda w: build_decode_plan(w.cache, [w.a], piece_chunks=0), ValueError, "piece_chunks"),
    # ---- prefill (CompactAttention)
    ("prefill: chunk not aligned (P % c != 0)", lambda w: ca.compact_prefill(w.cache, w.means, w.a, prefill_q(w, 1)),
     ValueError, "q"),
    ("chunked_prefill: sequence length not aligned", lambda w: ca.chunked_prefill(
        w.cache, w.means, w.a, [1], prefill_q(w, 1)[None].repeat(L, 0), *w.k_v([1]), chunks=w.C), ValueError, "seq"),
    ("chunked_prefill: chunk length not a multiple of c", lambda w: ca.chunked_prefill(
        w.cache, w.means, w.p, [1] * (w.C + 1), prefill_q(w, w.C + 1)[None].repeat(L, 0), *w.k_v([1] * (w.C + 1)),
        chunks=w.C - 1), ValueError, "chunks"),
    ("prefill: q longer than the sequence", lambda w: ca.compact_prefill(w.cache, w.means, w.p, prefill_q(w, 3 * w.C)),
     ValueError, "q"),
    ("prefill: alpha above 1", lambda w: ca.compact_prefill(w.cache, w.means, w.p, prefill_q(w, w.C), alpha=1.5),
     ValueError, "alpha"),
    ("prefill: alpha NaN", lambda w: ca.compact_prefill(w.cache, w.means, w.p, prefill_q(w, w.C), alpha=float("nan")),
     ValueError, "alpha"),
    ("prefill: scale 0", lambda w: ca.compact_prefill(w.cache, w.means, w.p, prefill_q(w, w.C), scale=0.0),
     ValueError, "scale"),
    ("prefill: q heads not a multiple", lambda w: ca.compact_prefill(w.cache, w.means, w.p, prefill_q(w, w.C, 3)),
     ValueError, "q"),
    ("prefill: block means of another cache", lambda w: ca.compact_prefill(
        w.cache, w.backend.api.BlockMeans(w.full), w.p, prefill_q(w, w.C)), ValueError, "cache"),
    # ---- construction
    ("cache: head_dim 0", lambda w: w.backend.make_cache(L, HKV, 0, 4), ValueError, "head_dim"),
    ("cache: chunk_size not a power of two", lambda w: w.backend.make_cache(L, HKV, w.D, 4, chunk_size=3),
     ValueError, "chunk_size"),
    ("cache: dtype float32", lambda w: w.backend.make_cache(L, HKV, w.D, 4, dtype="float32"), ValueError, "dtype"),
]

MESSAGE = re.compile(r"^(?P<arg>[^:]+): expected .+, got .+", re.S)


def check_case(w, call, exc, arg):
    before = [snapshot(c) for c in w.caches]
    with pytest.raises(exc) as info:
        call(w)
    msg = str(info.value)
    m = MESSAGE.match(msg)
    assert m and m["arg"] == arg, f"message should read '{arg}: expected ..., got ...': {msg!r}"
    for snap, cache in zip(before, w.caches):
        assert_same_snapshot(snap, snapshot(cache))


def test_table_is_large_and_distinct():
    assert len(CASES) >= 20 and len({name for name, *_ in CASES}) == len(CASES)
    assert len(GPU_CASES) >= 15 and len({name for name, *_ in GPU_CASES}) == len(GPU_CASES)


@pytest.mark.parametrize("name,call,exc,arg", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend_name", ["numpy", "emulated"])
def test_bad_input(backend_name, name, call, exc, arg):
    """Every row on the NumPy cache and on the emulated GPU cache: same error, same message."""
    with get_backend(backend_name) as backend:
        check_case(make_world(backend, D=8, C=4), call, exc, arg)


def test_the_check_fails_on_a_change_or_a_vague_message():
    """check_case itself: a call that changes a cache, or names no argument, fails it."""
    w = make_world(get_backend("numpy"), D=8, C=4)

    def change_then_raise(w):
        w.cache.evict(1)
        raise ValueError("max_chunks: expected nothing, got something")

    with pytest.raises(AssertionError, match="changed"):
        check_case(w, change_then_raise, ValueError, "max_chunks")
    with pytest.raises(AssertionError, match="should read"):
        check_case(w, lambda w: (_ for _ in ()).throw(ValueError("bad input")), ValueError, "x")


# ============================================================================ GPU API
def gpu_decoder(w, seqs=None):
    dec = w.backend.api.ChunkAttentionDecode(w.cache)
    dec.plan([w.a, w.b] if seqs is None else seqs, HQ)
    return dec


def cq(w, batch=2, heads=HQ, dtype=None):
    import cupy

    q = cupy.asarray(w.q(batch, heads))
    return q if dtype is None else q.astype(dtype)


def gpu_prefill(w, q, **kw):
    return w.backend.api.compact_prefill(w.cache, kw.pop("means", w.means), kw.pop("seq", w.p), q, **kw)


def _noncontiguous(w):
    import cupy

    return cupy.asarray(w.q(2, 2 * HQ))[:, ::2]  # [2, HQ, D], stride 2 over heads


def _stale_run(w):
    dec = gpu_decoder(w, [w.b])
    w.cache.release(w.cache.add_sequence([]))  # any structural change (and its undo) makes it stale
    return dec


GPU_CASES = [
    ("run: q on the host (NumPy)", lambda w: gpu_decoder(w).run(w.q(2)), TypeError, "q"),
    ("run: q float32", lambda w: gpu_decoder(w).run(cq(w, dtype=np.float32)), TypeError, "q"),
    ("run: q batch != plan batch", lambda w: gpu_decoder(w).run(cq(w, batch=3)), ValueError, "q"),
    ("run: q heads != planned heads", lambda w: gpu_decoder(w).run(cq(w, heads=2 * HQ)), ValueError, "q"),
    ("run: q not contiguous", lambda w: gpu_decoder(w).run(_noncontiguous(w)), ValueError, "q"),
    ("run: out on the host", lambda w: gpu_decoder(w).run(cq(w), out=w.q(2)), TypeError, "out"),
    ("run: out wrong shape", lambda w: gpu_decoder(w).run(cq(w), out=cq(w, batch=3)), ValueError, "out"),
    ("run: lse_out float16", lambda w: gpu_decoder(w).run(cq(w), lse_out=cq(w)[:, :, 0].copy()), TypeError,
     "lse_out"),
    ("run: layer out of range", lambda w: gpu_decoder(w).run(cq(w), L), ValueError, "layer"),
    ("plan: num_q_heads not a multiple", lambda w: gpu_decoder(w).plan([w.a], 3), ValueError, "num_q_heads"),
    ("plan: empty batch", lambda w: gpu_decoder(w).plan([], HQ), ValueError, "seqs"),
    ("plan: duplicate ids", lambda w: gpu_decoder(w).plan([w.b, w.b], HQ), ValueError, "seqs"),
    ("plan: released sequence", lambda w: gpu_decoder(w).plan([w.gone], HQ), CacheError, "seqs"),
    ("plan: forked-away sequence", lambda w: gpu_decoder(w).plan([w.child, w.away], HQ), CacheError, "seqs"),
    ("extend: k float32 on the GPU", lambda w: w.cache.extend(w.b, [1], *bad_kv(w, [1], how="dtype")), TypeError, "k"),
    ("extend: v with a token missing on the GPU", lambda w: w.cache.extend(
        w.b, [1, 2], *bad_kv(w, [1, 2], which="v")), ValueError, "v"),
    ("append: sequence mid-prefill", lambda w: w.cache.append([w.a, w.mid], [1, 1], *w.k_v([1, 1])),
     CacheError, "seqs"),
    ("write_kv: slots outside the pool", lambda w: w.cache.write_kv(
        0, Slots(np.array([w.cache.num_chunks], np.int32), np.array([0], np.int32)), *(x[0, :1] for x in w.k_v([3]))),
     ValueError, "slots"),
    ("add: pool full", lambda w: w.full.add_sequence([2] * 3, *w.k_v([2] * 3)), CacheFullError, "pool"),
    ("cache: head_dim 96 (no kernel variant)", lambda w: w.backend.make_cache(L, HKV, 96, 4, chunk_size=w.C),
     ValueError, "head_dim"),
    ("cache: chunk_size 8 (no kernel variant)", lambda w: w.backend.make_cache(L, HKV, w.D, 4, chunk_size=8),
     ValueError, "chunk_size"),
    ("prefill: q on the host", lambda w: gpu_prefill(w, prefill_q(w, w.C)), TypeError, "q"),
    ("prefill: chunk not aligned", lambda w: gpu_prefill(w, cq(w, batch=1), seq=w.a), ValueError, "q"),
    ("prefill: q longer than the sequence", lambda w: gpu_prefill(w, cq(w, batch=3 * w.C)), ValueError, "q"),
    ("prefill: alpha negative", lambda w: gpu_prefill(w, cq(w, batch=w.C), alpha=-0.1), ValueError, "alpha"),
    ("prefill: block means of another cache", lambda w: gpu_prefill(
        w, cq(w, batch=w.C), means=w.backend.api.BlockMeans(w.full)), ValueError, "cache"),
]


@pytest.mark.parametrize("name,call,exc,arg", GPU_CASES, ids=[c[0] for c in GPU_CASES])
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_bad_input_gpu(name, call, exc, arg):
    check_case(make_world(get_backend("cupy"), D=64, C=16), call, exc, arg)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_stale_plan_refused_and_nothing_changes():
    w = make_world(get_backend("cupy"), D=64, C=16)
    dec = _stale_run(w)
    before = [snapshot(c) for c in w.caches]
    with pytest.raises(CacheError, match="^plan:"):
        dec.run(cq(w, batch=1))
    for snap, cache in zip(before, w.caches):
        assert_same_snapshot(snap, snapshot(cache))


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_gpu_strided_and_misaligned_kv_are_copied_not_refused():
    """The NumPy cache takes strided K/V; so does the GPU cache (a copy), and a contiguous view
    whose address is not 16-byte aligned is copied too (kv_append loads 16-byte vectors)."""
    import cupy

    from cpattn.chunk_cache import GpuChunkCache

    D, C = 64, 16
    kv = TokenKV(L, HKV, D, seed=4, vocab=16)
    toks = list(range(2 * C + 3))
    k, v = kv(toks)
    cpu = ChunkCache(L, HKV, D, 8, chunk_size=C)
    gpu = GpuChunkCache(L, HKV, D, 8, chunk_size=C)
    for cache in (cpu, gpu):
        cache.add_sequence([])
    cpu.extend(0, toks, k, v)
    wide = cupy.zeros((L, len(toks), HKV, 2 * D), k.dtype)
    wide[..., ::2] = cupy.asarray(k)
    strided = wide[..., ::2]
    assert not strided.flags.c_contiguous
    flat = cupy.zeros(k.size + 1, k.dtype)  # offset by one element: 2 bytes off alignment
    flat[1:] = cupy.asarray(v).ravel()
    misaligned = flat[1:].reshape(v.shape)
    assert misaligned.flags.c_contiguous and misaligned.data.ptr % 16
    gpu.extend(0, toks, strided, misaligned)
    for layer in range(L):
        for a, b in zip(cpu.read_kv(0, layer), gpu.read_kv(0, layer)):
            assert a.tobytes() == cupy.asnumpy(b).tobytes()


# ============================================================================ NaN confinement
def nan_world(backend, D, C, seed=5):
    """A prefix-sharing batch of 9 sequences (one decode token each)."""
    prompts = prefix_tree_prompts(seed, 9, C, levels=2, fanout=3, max_chunks=3, vocab=6)
    kv = TokenKV(1, HKV, D, seed=seed, vocab=6, max_len=max(map(len, prompts)) + 4)
    need = sum(-(-(len(p) + 1) // C) for p in prompts) + 4
    cache = backend.make_cache(1, HKV, D, need, chunk_size=C)
    ids = fill_cache(cache, prompts, kv)
    return cache, ids, kv


def confined(backend, D, C, per_head: bool):
    cache, ids, _ = nan_world(backend, D, C)
    assert cache.dtype == "float16"
    q = random_queries(3, len(ids), HQ, D, cache.dtype)
    j = 4  # the poisoned sequence
    bad = q.copy()
    if per_head:
        bad[j, 1, 5] = np.nan
    else:
        bad[j] = np.nan
    shared = [n for n in cache.seq_nodes(ids[j]) if n.ref > 1]
    assert shared, "the poisoned sequence must share chunks with others"
    for split in (None, 1):
        dec = backend.api.ChunkAttentionDecode(cache, piece_chunks=split, private_piece_chunks=split)
        dec.plan(ids, HQ)
        before = snapshot(cache)
        clean, dirty = (to_float32(to_host(dec.run(backend.asarray(x))), cache.dtype) for x in (q, bad))
        assert_same_snapshot(before, snapshot(cache))
        others = [i for i in range(len(ids)) if i != j]
        assert np.isfinite(clean).all()
        assert clean[others].tobytes() == dirty[others].tobytes(), "NaN leaked into another sequence"
        if per_head:
            heads = [h for h in range(HQ) if h != 1]
            assert np.isnan(dirty[j, 1]).all()
            yield clean[j, heads], dirty[j, heads]
        else:
            assert np.isnan(dirty[j]).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_query_stays_in_its_sequence():
    list(confined(get_backend("numpy"), 8, 4, per_head=False))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_query_stays_in_its_head_in_the_reference():
    for clean, dirty in confined(get_backend("numpy"), 8, 4, per_head=True):
        assert clean.tobytes() == dirty.tobytes()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_key_in_a_private_chunk_stays_in_its_sequence():
    """A NaN K/V row (model blow-up) in one sequence's own tail chunk reaches no other sequence,
    even those sharing its prefix: phase 1 reads only shared chunks."""
    cache, ids, kv = nan_world(get_backend("numpy"), 8, 4)
    j = 4
    twin, _, _ = nan_world(get_backend("numpy"), 8, 4)
    n = cache.seq_len(ids[j])
    k, v = kv([1], start=n)
    k[:] = np.nan
    cache.append([ids[j]], [1], k, v)
    twin.append([ids[j]], [1], *kv([1], start=n))
    q = random_queries(3, len(ids), HQ, 8, cache.dtype)
    others = [i for i in range(len(ids)) if i != j]
    for split in (None, 1):
        o = decode(cache, build_decode_plan(cache, ids, split, split), q)
        o_twin = decode(twin, build_decode_plan(twin, ids, split, split), q)
        assert o[others].tobytes() == o_twin[others].tobytes()
        assert np.isnan(o[j]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
def test_nan_query_stays_in_its_sequence_gpu():
    list(confined(get_backend("cupy"), 64, 16, per_head=False))
    list(confined(get_backend("cupy"), 64, 16, per_head=True))  # the rest of the sequence may differ


def test_docs_list_every_case():
    """docs/guarantees.md carries the table: every case of both tables is a row there."""
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guarantees.md").read_text()
    rows = {line.split("|")[1].strip() for line in doc.splitlines() if line.startswith("| ")}
    missing = [name for name, *_ in CASES + GPU_CASES if name not in rows]
    assert not missing, missing


def test_named_errors_not_yet_in_expected_got_form():
    """Errors from files owned elsewhere (reference/plan.py): the argument is named and nothing
    changes, but the wording is not 'expected ..., got ...' yet (see docs/guarantees.md)."""
    w = make_world(get_backend("numpy"), D=8, C=4)
    before = [snapshot(c) for c in w.caches]
    with pytest.raises(CacheError, match=r"^seqs: "):
        build_decode_plan(w.cache, [w.a, w.empty])
    for snap, cache in zip(before, w.caches):
        assert_same_snapshot(snap, snapshot(cache))
