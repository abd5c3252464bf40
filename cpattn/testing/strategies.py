"""Hypothesis strategies for prefix-sharing attention workloads and chunk-tree operations.

Needs the ``test`` extra (``pip install cpattn[test]``: hypothesis). Hypothesis draws the
*structure* (tree shape, lengths, sizes, dtype, seeds) so failures shrink to small readable
cases; NumPy's ``default_rng(seed)`` fills the bulk arrays (prompts, K/V, queries) from the
drawn seeds (``cpattn.reference.workloads``).

* ``workloads()``: a ``Workload``, prompts sharing prefixes through a tree of awkward lengths
  (one past a chunk boundary, on one, divergence mid-chunk), a GQA geometry and odd batch
  sizes; ``Workload.cache(backend)`` fills a cache of any backend and appends each
  sequence's decode token, ``Workload.queries()`` gives the decode queries.
* ``prompts(c)``: token lists made of whole chunks from a tiny alphabet (so prefixes collide
  at any chunk size) plus a partial tail.
* ``tree_ops(c)``: lists of ``TreeOp`` (add, extend, append, fork, release, evict); run them
  with ``apply_tree_ops``, which keeps a model of every live sequence's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from ..reference.chunk_cache import CacheError, CacheFullError
from ..reference.dtypes import STORAGE_DTYPES
from ..reference.workloads import TokenKV, fill_cache, prefix_tree_prompts, random_queries

ODD_BATCH_SIZES = (1, 2, 3, 5, 7, 8, 13, 77)

seeds = st.integers(0, 2**32 - 1)
storage_dtypes = st.sampled_from(STORAGE_DTYPES)


@dataclass(frozen=True)
class Workload:
    """A decode workload: ``num_requests`` prompts sharing prefixes, with its geometry.

    Everything bulky is a function of ``seed``; the rest is what hypothesis drew."""

    seed: int
    num_requests: int
    chunk_size: int
    levels: int
    fanout: int
    num_layers: int
    num_kv_heads: int
    group: int  # query heads per kv head
    head_dim: int
    dtype: str

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.group

    def prompts(self) -> list[list[int]]:
        """Token ids of each request, prefixes shared through a ``levels``-deep tree."""
        return prefix_tree_prompts(self.seed, self.num_requests, self.chunk_size, levels=self.levels,
                                   fanout=self.fanout)

    def kv(self) -> TokenKV:
        """K/V as a function of (token, position): the same prefix has the same K/V."""
        return TokenKV(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, seed=self.seed)

    def num_chunks(self, chunk_size: int | None = None) -> int:
        """A pool large enough for every prompt stored on its own, plus the decode tokens."""
        c = chunk_size or self.chunk_size
        return sum(len(p) // c + 2 for p in self.prompts())

    def cache(self, backend=None, *, chunk_size=None, share_prefix=True, order=None):
        """``(cache, ids)``: a cache of ``backend`` (a ``cpattn.testing`` backend; default a
        NumPy ``ChunkCache``) holding every prompt (inserted in ``order``) plus one decode token
        each; ids in prompt order."""
        from .backends import NumpyBackend

        c = chunk_size or self.chunk_size
        make = (backend or NumpyBackend()).make_cache
        cache = make(self.num_layers, self.num_kv_heads, self.head_dim, self.num_chunks(c), chunk_size=c,
                     dtype=self.dtype, share_prefix=share_prefix, max_sequences=max(8, self.num_requests))
        return cache, fill_cache(cache, self.prompts(), self.kv(), order=order)

    def queries(self, scale: float = 1.0) -> np.ndarray:
        """Decode queries ``[num_requests, num_q_heads, head_dim]`` in the storage dtype."""
        return random_queries(self.seed + 1, self.num_requests, self.num_q_heads, self.head_dim, self.dtype, scale)


@st.composite
def workloads(draw, head_dims=st.sampled_from([8, 16, 64, 128]), chunk_sizes=st.sampled_from([2, 4, 8, 16]),
              batch_sizes=st.sampled_from(ODD_BATCH_SIZES), dtypes=storage_dtypes,
              groups=st.sampled_from([1, 2, 4]), num_kv_heads=st.integers(1, 2), num_layers=st.integers(1, 2)):
    """Prefix-sharing decode workloads (``Workload``). Pass strategies to narrow a dimension,
    e.g. ``workloads(head_dims=st.just(64), chunk_sizes=st.sampled_from([16, 64]))`` for the
    sizes the CUDA kernels compile for."""
    return Workload(seed=draw(seeds, label="seed"), num_requests=draw(batch_sizes, label="num_requests"),
                    chunk_size=draw(chunk_sizes, label="chunk_size"), levels=draw(st.integers(1, 3), label="levels"),
                    fanout=draw(st.integers(1, 3), label="fanout"), num_layers=draw(num_layers, label="num_layers"),
                    num_kv_heads=draw(num_kv_heads, label="num_kv_heads"), group=draw(groups, label="group"),
                    head_dim=draw(head_dims, label="head_dim"), dtype=draw(dtypes, label="dtype"))


piece_sizes = st.none() | st.integers(1, 4)  # ChunkAttentionDecode piece sizes: None is one piece


def prompts(chunk_size: int, vocab: int = 3, max_chunks: int = 3):
    """Whole chunks of one repeated token (``vocab`` choices) plus a tail of up to ``chunk_size
    + 1`` tokens: prefixes collide at chunk granularity and diverge mid-chunk."""
    return st.builds(lambda blocks, tail: [b for b in blocks for _ in range(chunk_size)] + tail,
                     st.lists(st.integers(0, vocab - 1), max_size=max_chunks),
                     st.lists(st.integers(0, vocab - 1), max_size=chunk_size + 1))


# ----------------------------------------------------------------------------- tree operations
@dataclass(frozen=True)
class TreeOp:
    """One cache operation. ``target`` picks a live sequence (index into the sorted live ids,
    modulo their count), ``tokens`` are the new tokens, ``arg`` is ``max_match`` (add),
    ``max_chunks`` (evict), or the batch size (append)."""

    kind: str  # add | extend | staged | append | fork | release | evict
    target: int = 0
    tokens: tuple = ()
    arg: int | None = None


TREE_OP_KINDS = ("add", "extend", "staged", "append", "fork", "release", "evict")


def tree_ops(chunk_size: int, vocab: int = 3, max_ops: int = 20, kinds=TREE_OP_KINDS):
    """Lists of ``TreeOp`` over a cache of chunk size ``chunk_size``."""
    toks = st.lists(st.integers(0, vocab - 1), max_size=2 * chunk_size + 1).map(tuple)
    target = st.integers(0, 63)
    one = st.one_of(*[
        {"add": st.builds(TreeOp, st.just("add"), st.just(0), prompts(chunk_size, vocab).map(tuple),
                          st.none() | st.integers(0, 12)),
         "extend": st.builds(TreeOp, st.just("extend"), target, toks),
         "staged": st.builds(TreeOp, st.just("staged"), target, toks.filter(len)),
         "append": st.builds(TreeOp, st.just("append"), target, st.just(()), st.integers(1, 4)),
         "fork": st.builds(TreeOp, st.just("fork"), target),
         "release": st.builds(TreeOp, st.just("release"), target),
         "evict": st.builds(TreeOp, st.just("evict"), st.just(0), st.just(()), st.none() | st.integers(0, 3)),
         }[k] for k in kinds])
    return st.lists(one, max_size=max_ops)


def apply_tree_op(cache, op: TreeOp, model: dict, kv: TokenKV, asarray=np.asarray):
    """Run ``op`` on ``cache`` and update ``model`` (id -> tokens) to match. Returns the error
    when the cache refused for want of room (pool full, no free sequence slot), else None;
    any other error propagates. ``asarray`` makes the K/V this backend's arrays."""
    live = sorted(model)
    seq = live[op.target % len(live)] if live else None
    tokens = list(op.tokens)
    try:
        if op.kind == "add":
            k, v = kv(tokens)
            sid = cache.add_sequence(tokens, asarray(k), asarray(v), max_match=op.arg)
            model[sid] = tokens
        elif op.kind == "evict":
            cache.evict(op.arg)
        elif seq is None:
            return None
        elif op.kind == "extend":
            k, v = kv(tokens, start=len(model[seq]))
            cache.extend(seq, tokens, asarray(k), asarray(v))
            model[seq] = model[seq] + tokens
        elif op.kind == "staged":  # reserve, write layer by layer, commit: a model's prefill
            k, v = kv(tokens, start=len(model[seq]))
            slots = cache.reserve(seq, tokens)
            for layer in range(cache.num_layers):
                cache.write_kv(layer, slots, asarray(k[layer]), asarray(v[layer]))
            cache.commit(seq)
            model[seq] = model[seq] + tokens
        elif op.kind == "append":  # one decode token for each of a batch
            batch = [live[(op.target + i) % len(live)] for i in range(min(op.arg or 1, len(live)))]
            toks = [(op.target + i) % kv.vocab for i in range(len(batch))]
            ks, vs = zip(*(kv([t], start=len(model[s])) for s, t in zip(batch, toks)))
            cache.append(batch, toks, asarray(np.concatenate(ks, axis=1)), asarray(np.concatenate(vs, axis=1)))
            for s, t in zip(batch, toks):
                model[s] = model[s] + [t]
        elif op.kind == "fork":
            model[cache.fork(seq)] = list(model[seq])
        elif op.kind == "release":
            cache.release(seq)
            del model[seq]
        else:
            raise ValueError(f"op.kind: expected one of {TREE_OP_KINDS}, got {op.kind!r}")
    except CacheFullError as e:
        return e
    except CacheError as e:
        if str(e).startswith("max_sequences:"):
            return e
        raise
    return None


def apply_tree_ops(cache, ops, kv: TokenKV, asarray=np.asarray, model: dict | None = None) -> dict:
    """Run every op (``apply_tree_op``); returns the model: live id -> its tokens."""
    model = {} if model is None else model
    for op in ops:
        apply_tree_op(cache, op, model, kv, asarray)
    return model
