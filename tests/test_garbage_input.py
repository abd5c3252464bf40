"""Garbage in every argument position of every public call (issue 17), drawn by hypothesis.

``SPECS`` lists the public calls; each names its arguments and the *kind* of each (a count, an
index, a batch of ids, a scale, an array, an object of one class, ...). ``KINDS`` maps a kind to
the garbage it gets: bools, floats (NaN and infinities too), strings, None, negative and huge
integers, scalars where a list is asked for, wrong objects, arrays of the wrong dtype or shape,
released or made-up sequence ids, and slots that alias another sequence's committed rows. Each
garbage has the error it must raise. For every drawn example the test checks:

* the documented exception type (TypeError for a wrong type, ValueError for a wrong value,
  CacheError for a sequence that is not live, CacheFullError for no room);
* a message ``"<argument>: expected ..., got ..."`` naming that argument;
* every cache of the world byte-for-byte unchanged (``cpattn.testing.snapshot``).

``garbage_table()`` is the (call, argument, garbage kind, expected error) table;
docs/guarantees.md carries it with its counts (``test_docs_carry_the_table``). Run
``python tests/test_garbage_input.py`` to print it as markdown.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cpattn
from cpattn import chunk_attention as fast
from cpattn.reference import chunk_attention as cha
from cpattn.reference import compact_attention as ca
from cpattn.reference import dtypes
from cpattn.reference.chunk_cache import CacheError, ChunkCache, Slots
from cpattn.reference.workloads import TokenKV, random_queries
from cpattn.serving.model import ModelConfig, TinyLM
from cpattn.serving.server import Server
from cpattn.testing import assert_same_snapshot, snapshot

L, HKV, HQ, D, C = 2, 2, 4, 8, 4
INT32 = 2**31


# ---------------------------------------------------------------------------- the world
class World:
    """One cache in every state the calls need, built once per test (a refused call changes
    nothing, so every example of a test can reuse it; a call that changes it fails the test).

    a     live, 2 full chunks + 1 token (the decode batch is [a, b])
    b     live, shares a's first chunk, partial tail
    p     live, length 2c, committed: ready for a prefill chunk of c tokens (extended by c below)
    gone  released
    mid   2 tokens reserved and not committed (``mid_slots``)
    """

    def __init__(self):
        self.kv = TokenKV(L, HKV, D, seed=2, vocab=16, max_len=64)
        self.cache = c = ChunkCache(L, HKV, D, 32, chunk_size=C, max_sequences=16)
        first = list(range(1, C + 1))
        self.a = self.add(first + [5] * C + [6])
        self.b = self.add(first + [7])
        self.p = self.add([4] * (2 * C))
        self.gone = self.add([9] * (C + 1))
        c.release(self.gone)
        self.mid = self.add([2] * C)
        self.mid_slots = c.reserve(self.mid, [3, 3])
        self.means = ca.BlockMeans(c)
        self.means.update(c, self.p)
        c.extend(self.p, [8] * C, *self.kv([8] * C, start=2 * C))  # the prefill chunk: p's last c tokens
        self.committed_slots = Slots(np.array(c.seq_chunks(self.a)[:1], np.int32), np.array([1], np.int32))
        self.plan = cha.build_decode_plan(c, [self.a, self.b])
        self.dec = cha.ChunkAttentionDecode(c)
        self.dec.plan([self.a, self.b], HQ)
        self.q2 = random_queries(0, 2, HQ, D, c.dtype)  # a decode step of [a, b]
        self.qp = random_queries(1, C, HQ, D, c.dtype)  # p's prefill chunk
        self.selection = ca.select_blocks(c, self.means, self.p, self.qp)
        self.tables = ca.build_block_tables(c, self.p, self.selection)
        self.model = TinyLM(ModelConfig(vocab_size=32, num_layers=1, hidden=16, num_q_heads=2, num_kv_heads=1,
                                        head_dim=8, mlp_hidden=16))
        self.server = Server(self.model, num_chunks=16, chunk_size=C, prefill_chunk=C)

    def add(self, tokens):
        return self.cache.add_sequence(tokens, *self.kv(tokens))

    def k_v(self, n, start=0):
        return self.kv([1] * n, start=start)

    def state(self):
        """What must not change: the cache, the block means, the decoder's plan, the server."""
        return (snapshot(self.cache), self.means.kmean.tobytes(), self.dec.decode_plan.version,
                len(self.server.requests))


# ---------------------------------------------------------------------------- garbage kinds
@dataclass(frozen=True)
class Garbage:
    label: str  # the garbage kind, as the docs table names it
    draw: object  # World -> hypothesis strategy of values
    exc: type


def const(*values):
    return lambda w: st.sampled_from(values)


BOOL = Garbage("bool", const(True, False, np.bool_(True)), TypeError)
FLOAT = Garbage("float (also integral, NaN, inf)", lambda w: st.one_of(
    st.sampled_from([4.0, 0.5, float("nan"), float("inf"), -float("inf"), np.float32(2.0)]),
    st.floats(allow_nan=True, allow_infinity=True)), TypeError)
STRING = Garbage("string", lambda w: st.one_of(st.sampled_from(["8", "", "auto!", "float16x"]),
                                               st.text(max_size=5)), TypeError)
NONE = Garbage("None", const(None), TypeError)
OBJECT = Garbage("wrong object (object(), dict, set, complex)", const(object(), {"a": 1}, {1}, 1j), TypeError)
LIST = Garbage("a list where a scalar is asked", const([1], [4.9, 4.9], (2,), np.array([1])), TypeError)
NEG = Garbage("negative integer", lambda w: st.integers(max_value=-1), ValueError)
HUGE = Garbage("huge integer (>= 2**31)", lambda w: st.one_of(st.integers(min_value=INT32, max_value=10**40),
                                                              st.just(np.int64(INT32))), ValueError)
NAN_INF = Garbage("NaN or infinity", const(float("nan"), float("inf"), -float("inf"), np.float32("nan")), ValueError)
SCALAR = Garbage("a scalar where a list is asked", const(1, np.int64(1), np.array(1), "12"), TypeError)
ARRAY_2D = Garbage("a 2-D or float array where ids are asked", const(np.zeros((1, 1), np.int64),
                                                                      np.array([1.0, 2.0])), TypeError)
FLOAT_IDS = Garbage("floats inside the list", const([1.5, 2.0], [1, 2.5], [None]), TypeError)
NEG_ZERO = Garbage("zero or negative integer", lambda w: st.integers(max_value=0), ValueError)
SEQ_DEAD = Garbage("released or unknown sequence id", lambda w: st.sampled_from([w.gone, 10**6, -1]), CacheError)
SEQ_TYPE = Garbage("not an integer id (bool, float, str, None)", const(True, 0.0, "0", None), CacheError)


def wrong_obj(*labels):
    """Instances of other public classes (a plan where tables are asked, ...)."""
    def draw(w):
        pool = {"cache": w.cache, "plan": w.plan, "means": w.means, "selection": w.selection,
                "tables": w.tables, "slots": w.mid_slots, "array": w.q2, "int": 3, "none": None}
        return st.sampled_from([pool[k] for k in labels])
    return Garbage("another public object (" + ", ".join(labels) + ")", draw, TypeError)


def arr(label, make, exc):
    return Garbage(label, lambda w: st.just(None).map(lambda _: make(w)), exc)


def not_array():
    return Garbage("not an array (list, int, None, str)", lambda w: st.sampled_from(
        [w.q2.tolist(), 3, None, "q"]), TypeError)


INT_COUNT = (BOOL, FLOAT, STRING, NONE, OBJECT, LIST, NEG_ZERO, HUGE)  # an integer >= 1, < 2**31
INT_INDEX0 = (BOOL, FLOAT, STRING, NONE, OBJECT, LIST, NEG)  # an integer >= 0 (a count that may be 0)
INT_OPT0 = (BOOL, FLOAT, STRING, OBJECT, LIST, NEG)  # None or an integer >= 0
INT_OPT_COUNT = (BOOL, FLOAT, OBJECT, LIST, NEG_ZERO, HUGE)  # None or an integer >= 1
LAYER = (BOOL, FLOAT, STRING, NONE, OBJECT, LIST, NEG, Garbage("layer >= num_layers", lambda w: st.integers(
    min_value=L, max_value=10**30), ValueError))
SCALE = (BOOL, STRING, OBJECT, LIST, NAN_INF, Garbage("zero or negative number", lambda w: st.one_of(
    st.floats(max_value=0.0, allow_nan=False), st.integers(max_value=0)), ValueError))
BOOLEAN = (Garbage("not a bool (0, 1, None, str, float)", const(0, 1, None, "True", 1.0), TypeError),)
SEQ = (SEQ_DEAD, SEQ_TYPE)
SEQS = (SCALAR, ARRAY_2D, NONE, Garbage("empty batch", const([], ()), ValueError),
        Garbage("duplicate ids", lambda w: st.just([w.a, w.a]), ValueError),
        Garbage("a released id in the batch", lambda w: st.just([w.a, w.gone]), CacheError))
TOKENS = ((Garbage("a scalar where a list is asked", const(1, np.int64(1), np.array(1)), TypeError),
                        Garbage("floats inside the list", const([1.5, 2.0], [1, 2.5], np.array([1.0])), TypeError),
                        Garbage("a 2-D or ragged list", const([[1, 2]], [[1], [1, 2]], np.zeros((1, 2), int)),
                                TypeError), NONE))
CHOICE = (BOOL, NONE, OBJECT, FLOAT, Garbage("another string", lambda w: st.text(max_size=6).filter(
    lambda s: s not in ("auto", "wgmma", "mma")), ValueError))
DTYPE = (Garbage("not a dtype (int, None, float, object)", const(123, None, 1.5, object(), True), TypeError),
         Garbage("a non-storage dtype name or type", const("float32", "int8", np.float32, np.dtype("f8"), "bf16"),
                 ValueError))
ALPHA = (BOOL, STRING, NONE, OBJECT, LIST, NAN_INF, Garbage("outside [0, 1]", lambda w: st.one_of(
    st.floats(min_value=1.0, exclude_min=True, allow_infinity=False), st.floats(max_value=0.0, exclude_max=True,
                                                                                 allow_infinity=False)), ValueError))


def kv_garbage(n, seq_start=0):
    """K/V arrays [L, n, Hkv, D] spoiled one way each."""
    def spoil(how):
        def make(w):
            k = w.k_v(n, seq_start)[0]
            return {"dtype": k.astype(np.float32), "tokens": k[:, :-1] if n else k[:, :0],
                    "heads": k[:, :, :1], "layers": k[:1], "list": k.tolist()}[how]
        return make
    return (arr("float32 array", spoil("dtype"), TypeError), arr("one token short", spoil("tokens"), ValueError),
            arr("one kv head", spoil("heads"), ValueError), arr("one layer", spoil("layers"), ValueError),
            arr("a nested list", spoil("list"), TypeError), NONE)


def q_garbage(shape_of):
    """q spoiled: dtype, rank, head_dim, heads not a multiple of Hkv, not an array."""
    def spoil(how):
        def make(w):
            q = shape_of(w)
            return {"dtype": q.astype(np.float32), "rank": q[0], "head_dim": q[..., :-1],
                    "heads": np.concatenate([q, q[:, :1]], axis=1)}[how]
        return make
    return (arr("float32 array", spoil("dtype"), TypeError), arr("one dimension short", spoil("rank"), ValueError),
            arr("head_dim short", spoil("head_dim"), ValueError),
            arr("heads not a multiple of num_kv_heads", spoil("heads"), ValueError), not_array())


def out_garbage(shape_of, dtype):
    def make(how):
        def f(w):
            x = np.zeros(shape_of(w), dtype)
            if how == "dtype":
                return x.astype(np.float64)
            if how == "shape":
                return x[:1]
            x.setflags(write=False)
            return x
        return f
    return (arr("wrong dtype", make("dtype"), TypeError), arr("wrong shape", make("shape"), ValueError),
            arr("read-only", make("readonly"), ValueError), Garbage("not an array", const([0.0], 3, "out"),
                                                                     TypeError))


# ---------------------------------------------------------------------------- the calls
@dataclass(frozen=True)
class Spec:
    name: str
    call: object  # (World, dict of arguments) -> anything
    valid: object  # World -> dict of valid arguments
    args: dict  # argument -> tuple of Garbage
    message: dict = None  # argument -> the name the message must give, when it differs


def cache_new(w, a):
    return ChunkCache(**a)


CACHE_ARGS = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, num_chunks=4, chunk_size=C, dtype="float16",
                  share_prefix=True, max_sequences=8)

SPECS = [
    Spec("ChunkCache", cache_new, lambda w: dict(CACHE_ARGS),
         dict(num_layers=INT_COUNT, num_kv_heads=INT_COUNT, head_dim=INT_COUNT,
              num_chunks=INT_COUNT[:-1] + (Garbage("num_chunks=10**15 (int32 bound)", const(10**15, 2**31), ValueError),),
              chunk_size=INT_COUNT[:-1] + (Garbage("not a power of two in [1, 128]", const(3, 48, 256, 2**31),
                                                   ValueError),),
              dtype=DTYPE, share_prefix=BOOLEAN, max_sequences=INT_COUNT)),
    Spec("add_sequence", lambda w, a: w.cache.add_sequence(**a), lambda w: dict(tokens=[1, 2], k=None, v=None,
                                                                                  max_match=None),
         dict(tokens=TOKENS, max_match=(BOOL, FLOAT, STRING, OBJECT, LIST, NEG)),
         ),
    Spec("extend", lambda w, a: w.cache.extend(**a), lambda w: dict(seq=w.b, tokens=[1], k=w.k_v(1)[0],
                                                                      v=w.k_v(1)[1]),
         dict(seq=SEQ + (Garbage("a sequence mid-prefill", lambda w: st.just(w.mid), CacheError),),
              tokens=TOKENS, k=kv_garbage(1), v=kv_garbage(1))),
    Spec("append", lambda w, a: w.cache.append(**a), lambda w: dict(seqs=[w.a, w.b], tokens=[1, 1],
                                                                      k=w.k_v(2)[0], v=w.k_v(2)[1]),
         dict(seqs=SEQS, tokens=TOKENS[:1] + TOKENS[1:3] + (Garbage("one token short", const([1]), ValueError),),
              k=kv_garbage(2), v=kv_garbage(2))),
    Spec("reserve", lambda w, a: w.cache.reserve(**a), lambda w: dict(seq=w.b, tokens=[1]),
         dict(seq=SEQ, tokens=TOKENS)),
    Spec("reserve_batch", lambda w, a: w.cache.reserve_batch(**a), lambda w: dict(seqs=[w.a, w.b], tokens=[1, 1]),
         dict(seqs=SEQS, tokens=TOKENS)),
    Spec("write_kv", lambda w, a: w.cache.write_kv(**a),
         lambda w: dict(layer=0, slots=w.mid_slots, k=w.k_v(2)[0][0], v=w.k_v(2)[1][0]),
         dict(layer=LAYER,
              slots=(Garbage("slots aliasing another sequence's committed rows", lambda w: st.just(w.committed_slots),
                             ValueError),
                     Garbage("slots outside the pool", const(Slots(np.array([10**6], np.int32), np.array([0], np.int32)),
                                                             Slots(np.array([0], np.int32), np.array([-1], np.int32))),
                             ValueError),
                     Garbage("not Slots (tuple, None, list)", const((np.array([0]), np.array([0])), None, [0]),
                             TypeError)),
              k=(arr("float32 array", lambda w: w.k_v(2)[0][0].astype(np.float32), TypeError),
                 arr("one token short", lambda w: w.k_v(2)[0][0][:1], ValueError), NONE))),
    Spec("commit", lambda w, a: w.cache.commit(**a), lambda w: dict(seq=w.b), dict(seq=SEQ)),
    Spec("fork", lambda w, a: w.cache.fork(**a), lambda w: dict(seq=w.b),
         dict(seq=SEQ + (Garbage("a sequence mid-prefill", lambda w: st.just(w.mid), CacheError),))),
    Spec("release", lambda w, a: w.cache.release(**a), lambda w: dict(seq=w.b), dict(seq=SEQ)),
    Spec("evict", lambda w, a: w.cache.evict(**a), lambda w: dict(max_chunks=0),
         dict(max_chunks=(BOOL, FLOAT, STRING, OBJECT, LIST, NEG))),
    Spec("read_kv", lambda w, a: w.cache.read_kv(**a), lambda w: dict(seq=w.a, layer=0),
         dict(seq=SEQ, layer=LAYER)),
    # ---- decode
    Spec("build_decode_plan", lambda w, a: cha.build_decode_plan(**a),
         lambda w: dict(cache=w.cache, seqs=[w.a, w.b], piece_chunks=None, private_piece_chunks=None),
         dict(cache=(wrong_obj("plan", "means", "none", "int"),), seqs=SEQS,
              piece_chunks=INT_OPT_COUNT + (STRING,), private_piece_chunks=INT_OPT_COUNT)),
    Spec("build_decode_plan (fast planner)", lambda w, a: fast.build_decode_plan(**a),
         lambda w: dict(cache=w.cache, seqs=[w.a, w.b], piece_chunks=None, private_piece_chunks=None),
         dict(cache=(wrong_obj("plan", "none"),), seqs=SEQS, piece_chunks=INT_OPT_COUNT,
              private_piece_chunks=INT_OPT_COUNT)),
    Spec("split_plan", lambda w, a: cha.split_plan(**a), lambda w: dict(plan=w.plan, piece_chunks=1),
         dict(plan=(wrong_obj("cache", "tables", "none", "int"),), piece_chunks=INT_OPT_COUNT)),
    Spec("split_plan (fast planner)", lambda w, a: fast.split_plan(**a), lambda w: dict(plan=w.plan, piece_chunks=1),
         dict(plan=(wrong_obj("cache", "selection", "none"),), piece_chunks=INT_OPT_COUNT)),
    Spec("decode", lambda w, a: cha.decode(**a),
         lambda w: dict(cache=w.cache, plan=w.plan, q=w.q2, layer=0, scale=None, return_lse=False),
         dict(cache=(wrong_obj("plan", "means", "int"),), plan=(wrong_obj("cache", "tables", "int"),),
              q=q_garbage(lambda w: w.q2), layer=LAYER, scale=SCALE, return_lse=BOOLEAN)),
    Spec("oracle_decode", lambda w, a: cha.oracle_decode(**a),
         lambda w: dict(cache=w.cache, seqs=[w.a, w.b], q=w.q2, layer=0, scale=None),
         dict(cache=(wrong_obj("plan", "none"),), seqs=SEQS[:4], q=q_garbage(lambda w: w.q2), layer=LAYER,
              scale=SCALE)),
    Spec("ChunkAttentionDecode", lambda w, a: cpattn.ChunkAttentionDecode(**a),
         lambda w: dict(cache=w.cache, piece_chunks="auto", private_piece_chunks="auto", units_per_sm=4),
         dict(cache=(wrong_obj("plan", "means", "none", "int"),),
              piece_chunks=INT_OPT_COUNT + (Garbage("a string other than 'auto'", const("8", "Auto", ""), ValueError),),
              private_piece_chunks=INT_OPT_COUNT, units_per_sm=INT_COUNT)),
    Spec("ChunkAttentionDecode.plan", lambda w, a: cha.ChunkAttentionDecode(w.cache).plan(**a),
         lambda w: dict(seqs=[w.a, w.b], num_q_heads=HQ),
         dict(seqs=SEQS, num_q_heads=INT_COUNT + (Garbage("not a multiple of num_kv_heads", const(3, 5),
                                                         ValueError),))),
    Spec("ChunkAttentionDecode.run", lambda w, a: w.dec.run(**a),
         lambda w: dict(q=w.q2, layer=0, scale=None, out=None, return_lse=False, lse_out=None),
         dict(q=q_garbage(lambda w: w.q2), layer=LAYER, scale=SCALE, return_lse=BOOLEAN,
              out=out_garbage(lambda w: w.q2.shape, np.float16), lse_out=out_garbage(lambda w: (2, HQ), np.float32))),
    Spec("auto_piece_chunks", lambda w, a: fast.auto_piece_chunks(**a),
         lambda w: dict(plan=w.plan, num_q_heads=HQ, num_kv_heads=HKV, num_sms=132, units_per_sm=4),
         dict(num_q_heads=INT_COUNT, num_kv_heads=INT_COUNT, num_sms=INT_COUNT, units_per_sm=INT_COUNT)),
    Spec("plan_host", lambda w, a: fast.plan_host(**a),
         lambda w: dict(cache=w.cache, seqs=[w.a, w.b], num_q_heads=HQ, units_per_sm=4, num_sms=132),
         dict(cache=(wrong_obj("plan", "none"),), seqs=SEQS, num_q_heads=INT_COUNT, units_per_sm=INT_COUNT,
              num_sms=INT_COUNT)),
    # ---- prefill
    Spec("BlockMeans", lambda w, a: cpattn.BlockMeans(**a), lambda w: dict(cache=w.cache),
         dict(cache=(wrong_obj("plan", "means", "none", "int", "array"),))),
    Spec("BlockMeans.update", lambda w, a: ca.BlockMeans(w.cache).update(**a),
         lambda w: dict(cache=w.cache, seq=w.a, num_tokens=None),
         dict(cache=(wrong_obj("plan", "none"),), seq=SEQ,
              num_tokens=(BOOL, FLOAT, STRING, OBJECT, LIST, NEG, Garbage("more than the committed tokens",
                                                                          const(10**6), ValueError)))),
    Spec("BlockMeans.gather", lambda w, a: w.means.gather(**a),
         lambda w: dict(cache=w.cache, seq=w.p, layer=0, num_blocks=1),
         dict(seq=SEQ, layer=LAYER, num_blocks=(BOOL, FLOAT, STRING, NONE, OBJECT, NEG,
                                                Garbage("more blocks than the sequence has", const(4, 10**9),
                                                        ValueError)))),
    Spec("compact_prefill", lambda w, a: cpattn.compact_prefill(**a),
         lambda w: dict(cache=w.cache, means=w.means, seq=w.p, q=w.qp, layer=0),
         dict(cache=(wrong_obj("plan", "means", "none"),), means=(wrong_obj("cache", "plan", "tables", "none"),),
              seq=SEQ, q=q_garbage(lambda w: w.qp), layer=LAYER, scale=SCALE, alpha=ALPHA,
              sink=INT_INDEX0 + (HUGE,), window=INT_INDEX0 + (HUGE,),
              q_tile=(BOOL, FLOAT, STRING, OBJECT, HUGE,
                      Garbage("not a positive multiple of chunk_size", const(0, C - 1, C + 1, -C), ValueError)),
              group_size=(BOOL, FLOAT, STRING, OBJECT, HUGE,
                          Garbage("not a divisor of the GQA group", const(0, 3, -1), ValueError)),
              return_lse=BOOLEAN, out=out_garbage(lambda w: w.qp.shape, np.float16), kernel=CHOICE,
              events=(Garbage("not a list (tuple, dict, int)", const((), {}, 3, "x"), TypeError),))),
    Spec("dense_prefill", lambda w, a: cpattn.dense_prefill(**a),
         lambda w: dict(cache=w.cache, means=w.means, seq=w.p, q=w.qp, layer=0),
         dict(means=(wrong_obj("cache", "none"),), seq=SEQ, q=q_garbage(lambda w: w.qp), layer=LAYER,
              alpha=(Garbage("any alpha (dense keeps every block)", const(0.0, 0.5), TypeError),))),
    Spec("select_blocks", lambda w, a: ca.select_blocks(**a),
         lambda w: dict(cache=w.cache, means=w.means, seq=w.p, q=w.qp),
         dict(means=(wrong_obj("cache", "plan", "none"),), seq=SEQ, q=q_garbage(lambda w: w.qp), alpha=ALPHA)),
    Spec("build_block_tables", lambda w, a: ca.build_block_tables(**a),
         lambda w: dict(cache=w.cache, seq=w.p, selection=w.selection),
         dict(cache=(wrong_obj("plan", "none"),), selection=(wrong_obj("plan", "tables", "none", "int"),))),
    Spec("sparse_prefill", lambda w, a: ca.sparse_prefill(**a),
         lambda w: dict(cache=w.cache, tables=w.tables, q=w.qp, layer=0, scale=None),
         dict(cache=(wrong_obj("plan", "none"),), tables=(wrong_obj("plan", "selection", "none", "int"),),
              q=q_garbage(lambda w: w.qp), layer=LAYER, scale=SCALE)),
    Spec("oracle_prefill", lambda w, a: ca.oracle_prefill(**a),
         lambda w: dict(cache=w.cache, seq=w.p, q=w.qp, layer=0, scale=None),
         dict(cache=(wrong_obj("plan", "none"),), seq=SEQ, q=q_garbage(lambda w: w.qp), layer=LAYER, scale=SCALE)),
    Spec("chunked_prefill", lambda w, a: ca.chunked_prefill(**a),
         lambda w: dict(cache=w.cache, means=w.means, seq=w.p, tokens=[1] * C,
                        q=np.zeros((L, C, HQ, D), np.float16), k=w.k_v(C, 3 * C)[0], v=w.k_v(C, 3 * C)[1],
                        chunks=C),
         dict(means=(wrong_obj("cache", "none"),), tokens=TOKENS,
              chunks=(BOOL, NONE, OBJECT, Garbage("float or a string", const(4.0, "8", float("nan")), TypeError),
                      Garbage("a list with floats", const([4.9, 4.9], [2.0, 2.0]), TypeError),
                      Garbage("not a multiple of chunk_size / not summing to the prompt", const(C - 1, [1, C - 1],
                                                                                                [C, C], 0),
                              ValueError)),
              k=kv_garbage(C, 3 * C))),
    # ---- dtypes, serving
    Spec("to_storage", lambda w, a: dtypes.to_storage(**a), lambda w: dict(x=np.zeros(3, np.float32), dtype="float16"),
         dict(dtype=DTYPE)),
    Spec("to_float32", lambda w, a: dtypes.to_float32(**a), lambda w: dict(x=np.zeros(3, np.float16), dtype="float16"),
         dict(dtype=DTYPE)),
    Spec("TinyLM.embed", lambda w, a: w.model.embed(**a), lambda w: dict(tokens=[1, 2]),
         dict(tokens=TOKENS[:3] + (Garbage("ids outside the vocabulary (negative, >= vocab_size)",
                                           lambda w: st.one_of(st.integers(max_value=-1), st.integers(min_value=32,
                                                                                                      max_value=10**9)
                                                               ).map(lambda t: [1, t]), ValueError),))),
    Spec("Server.submit", lambda w, a: w.server.submit(**a), lambda w: dict(prompt=[1, 2], max_new_tokens=2),
         dict(prompt=TOKENS[:3] + (Garbage("ids outside the vocabulary (negative, >= vocab_size)",
                                           lambda w: st.one_of(st.integers(max_value=-1), st.integers(min_value=32,
                                                                                                      max_value=10**9)
                                                               ).map(lambda t: [t, 1]), ValueError),
                                   Garbage("empty prompt", const([]), ValueError)),
              max_new_tokens=INT_COUNT[:-1], arrival=INT_OPT0)),
    Spec("ModelConfig", lambda w, a: ModelConfig(**a), lambda w: dict(),
         dict(vocab_size=INT_COUNT, num_layers=INT_COUNT, head_dim=INT_COUNT[:-1],
              dtype=(BOOL, NONE, Garbage("a non-storage dtype name", const("float32", "fp16"), ValueError)))),
]

MESSAGE = re.compile(r"^(?P<arg>[^:]+): expected .+, got .+", re.S)
SEQ_NAMES = {"seq", "seqs"}

CASES = [(s, arg) for s in SPECS for arg in s.args]


def garbage_table():
    """(call, argument, garbage kind, expected error) for every garbage of every argument."""
    return [(s.name, arg, g.label, g.exc.__name__) for s, arg in CASES for g in s.args[arg]]


_WORLD = {}


def world() -> World:
    if "w" not in _WORLD:
        _WORLD["w"] = World()
    return _WORLD["w"]


@pytest.mark.parametrize("spec,arg", CASES, ids=[f"{s.name}-{a}" for s, a in CASES])
@settings(max_examples=max(10, settings().max_examples // 3))  # ci: 10, dev: 100
@given(data=st.data())
def test_garbage_is_refused_and_changes_nothing(spec, arg, data):
    w = world()
    garbage = data.draw(st.sampled_from(spec.args[arg]), label="garbage kind")
    value = data.draw(garbage.draw(w), label=f"{arg}")
    args = spec.valid(w)
    args[arg] = value
    before = w.state()
    with pytest.raises(garbage.exc) as info:
        spec.call(w, args)
    msg = str(info.value)
    m = MESSAGE.match(msg)
    want = (spec.message or {}).get(arg, arg)
    assert m and m["arg"] == want, f"message should read '{want}: expected ..., got ...': {msg!r}"
    after = w.state()
    assert_same_snapshot(before[0], after[0])
    assert before[1:] == after[1:], "block means, the decoder's plan or the server changed"


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_the_valid_call_works(spec):
    """Each spec's valid arguments pass (so every refusal above is the garbage's doing)."""
    w = World()
    spec.call(w, spec.valid(w))


def test_the_table_is_large():
    rows = garbage_table()
    assert len(rows) >= 250 and len(CASES) >= 90
    assert len(set(rows)) == len(rows)


def markdown_table() -> str:
    rows = garbage_table()
    counts = {}
    for _, _, _, exc in rows:
        counts[exc] = counts.get(exc, 0) + 1
    head = (f"{len(rows)} rows over {len(CASES)} argument positions of {len(SPECS)} calls "
            f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}).\n\n"
            "| call | argument | garbage | error |\n| --- | --- | --- | --- |\n")
    return head + "\n".join(f"| `{c}` | `{a}` | {g} | {e} |" for c, a, g, e in rows) + "\n"


def test_docs_carry_the_table():
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guarantees.md").read_text()
    assert markdown_table() in doc, "docs/guarantees.md: regenerate with python tests/test_garbage_input.py"


if __name__ == "__main__":
    print(markdown_table())
