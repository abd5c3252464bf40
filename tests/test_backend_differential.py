"""Backends side by side under random operation sequences (hypothesis state machine).

Every rule runs one body on each backend's cache (``cpattn.testing.backends``), through the same
names (``ChunkAttentionDecode``, ``BlockMeans``, ``compact_prefill``): the NumPy reference
first, then the emulated GPU cache (CPU CI) or the CuPy cache (marker ``gpu``). After every step:

* the tree state is identical (ids, lengths, tokens, chunk ids, refcounts, registration, free
  list, LRU list, slots, pending rows) and so are the pool bytes, whole pools compared;
* every live sequence reads back the K/V that was written (``TokenKV`` is a function of token
  and position, so the model is just each sequence's tokens);
* refcounts equal the live paths through each node; free + cached + referenced == capacity;
* after a decode plan, a GPU cache's device length table equals the host one (and the emulated
  decode, which reads the device table as the kernels do, equals the NumPy one bit for bit).

A call that fails must fail the same way on every backend and leave every cache unchanged.
Outputs land in NaN-poisoned buffers and are checked against the float64 oracle within each
backend's error budget (``cpattn.testing.budgets``): decode, and prefill with alpha 0 (every
block kept: dense causal attention). Backends that run the reference math (numpy, emulated)
must agree bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cpattn import gpu_available
from cpattn.arrays import to_host
from cpattn.reference.chunk_attention import oracle_decode
from cpattn.reference.compact_attention import oracle_prefill
from cpattn.reference.chunk_cache import CacheError, CacheFullError
from cpattn.reference.workloads import TokenKV, random_queries
from cpattn.testing import as_float32, assert_close_to_oracle, assert_same_snapshot, get_backend, poisoned, snapshot, v_absmax
from cpattn.testing.strategies import prompts

L, HKV, HQ = 2, 2, 4  # GQA group of 2
VOCAB = 3


def tree_invariants(cache, live) -> None:
    """Refcounts, registration and pool accounting of one cache (live: the model's ids)."""
    c = cache.chunk_size
    nodes = list(cache.nodes())
    cached_nodes = cache.cached_nodes()
    paths = {s: cache.seq_nodes(s) for s in live}
    for n in nodes:
        assert n.ref == sum(1 for p in paths.values() if any(m is n for m in p)), (n.chunk, n.ref)
        assert n.ref > 0 or (n in cached_nodes and n.registered)
        if n.registered:
            assert len(n.tokens) == c and n.parent.registered and n.parent.index[tuple(n.tokens)] is n
    for p in paths.values():  # only a path's tail may be partial
        assert all(len(n.tokens) == c for n in p[:-1])
    referenced = {n.chunk for n in nodes if n.ref > 0}
    cached, free = [n.chunk for n in cached_nodes], cache.free_chunks()
    assert len(referenced) + len(cached) + len(free) == cache.num_chunks
    assert referenced | set(cached) | set(free) == set(range(cache.num_chunks))
    assert (cache.num_free, cache.num_cached, cache.num_referenced) == (len(free), len(cached), len(referenced))


class DifferentialMachine(RuleBasedStateMachine):
    D, C = 8, 4
    BACKENDS = ("numpy", "emulated")

    @initialize(num_chunks=st.integers(4, 12), share=st.booleans(),
                dtype=st.sampled_from(["float16", "bfloat16"]), seed=st.integers(0, 2**16))
    def setup(self, num_chunks, share, dtype, seed):
        self.backends = [get_backend(name) for name in self.BACKENDS]
        self.entered = []
        for b in self.backends:
            b.__enter__()
            self.entered.append(b)
        self.dtype = dtype
        self.caches = [b.make_cache(L, HKV, self.D, num_chunks, chunk_size=self.C, dtype=dtype,
                                    share_prefix=share, max_sequences=6) for b in self.backends]
        self.means = [b.api.BlockMeans(c) for b, c in zip(self.backends, self.caches)]
        self.kv = TokenKV(L, HKV, self.D, dtype=dtype, seed=seed, vocab=VOCAB, max_len=256)
        self.model: dict[int, list[int]] = {}
        self.decoders = None  # the last decode's per-backend decoders (plans), reused while valid

    def teardown(self):
        for b in reversed(getattr(self, "entered", [])):
            b.__exit__(None, None, None)

    # ------------------------------------------------------------------ helpers
    @property
    def primary(self):
        return self.caches[0]

    def each(self, fn):
        """fn(backend, cache) on every backend. All succeed (their results are returned) or all
        fail with the same error, leaving every cache unchanged (then None)."""
        before = [snapshot(c) for c in self.caches]
        outs = []
        for b, cache in zip(self.backends, self.caches):
            try:
                outs.append((True, fn(b, cache)))
            except (CacheError, ValueError, TypeError) as e:
                outs.append((False, e))
        kinds = [(ok, None if ok else (type(r), str(r))) for ok, r in outs]
        assert len(set(kinds)) == 1, f"backends disagree: {list(zip([b.name for b in self.backends], kinds))}"
        if outs[0][0]:
            return [r for _, r in outs]
        for b, snap, cache in zip(self.backends, before, self.caches):
            assert_same_snapshot(snap, snapshot(cache))
        err = outs[0][1]
        # the machine only makes valid calls: the pool or the slots may run out, nothing else
        assert isinstance(err, CacheFullError) or str(err).startswith("max_sequences:"), err
        event(type(err).__name__)
        return None

    def pick(self, data, nonempty=False):
        ids = sorted(s for s, t in self.model.items() if t or not nonempty)
        return data.draw(st.sampled_from(ids), label="seq")

    def vmax(self):
        return v_absmax(self.primary)

    # ------------------------------------------------------------------ rules: the cache
    @rule(data=st.data(), with_kv=st.booleans(), max_match=st.none() | st.integers(0, 12))
    def add(self, data, with_kv, max_match):
        tokens = data.draw(prompts(self.C, VOCAB), label="tokens")
        k, v = self.kv(tokens)
        if with_kv:
            ids = self.each(lambda b, c: c.add_sequence(tokens, b.asarray(k), b.asarray(v), max_match=max_match))
        else:
            ids = self.each(lambda b, c: c.add_sequence(tokens, max_match=max_match))
        if ids is None:
            return
        assert len(set(ids)) == 1
        n = self.primary.seq_len(ids[0])
        assert n == len(tokens) if with_kv else n % self.C == 0
        self.model[ids[0]] = list(tokens[:n])
        if n and not with_kv:
            event("prefix reused")
            if data.draw(st.booleans(), label="decode it now"):
                self.decode_batch([ids[0]], seed=n)  # a matched prefix, nothing written yet

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def extend(self, data):
        seq = self.pick(data)
        tokens = data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=2 * self.C + 1), label="tokens")
        k, v = self.kv(tokens, start=len(self.model[seq]))
        if self.each(lambda b, c: c.extend(seq, tokens, b.asarray(k), b.asarray(v))) is not None:
            self.model[seq] += tokens

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def extend_staged(self, data):
        """reserve, write layer by layer, commit: a model's prefill."""
        seq = self.pick(data)
        tokens = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=2 * self.C + 1))
        k, v = self.kv(tokens, start=len(self.model[seq]))

        def staged(b, cache):
            slots = cache.reserve(seq, tokens)
            for layer in range(L):
                cache.write_kv(layer, slots, b.asarray(k[layer]), b.asarray(v[layer]))
            cache.commit(seq)
            return slots

        slots = self.each(staged)
        if slots is None:
            return
        for s in slots[1:]:
            assert np.array_equal(s.chunk, slots[0].chunk) and np.array_equal(s.offset, slots[0].offset)
        self.model[seq] += tokens

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def append(self, data):
        batch = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, unique=True), label="batch")
        toks = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=len(batch), max_size=len(batch)))
        ks, vs = zip(*(self.kv([t], start=len(self.model[s])) for s, t in zip(batch, toks)))
        k, v = np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)
        if self.each(lambda b, c: c.append(batch, toks, b.asarray(k), b.asarray(v))) is not None:
            for s, t in zip(batch, toks):
                self.model[s].append(t)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data):
        seq = self.pick(data)
        ids = self.each(lambda b, c: c.fork(seq))
        if ids is not None:
            assert len(set(ids)) == 1
            self.model[ids[0]] = list(self.model[seq])
            if self.model[seq] and data.draw(st.booleans(), label="decode the fork now"):
                self.decode_batch([ids[0], seq], seed=ids[0])  # before any write to it

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release(self, data):
        seq = self.pick(data)
        self.each(lambda b, c: c.release(seq))
        del self.model[seq]

    @rule(max_chunks=st.none() | st.integers(0, 3))
    def evict(self, max_chunks):
        counts = self.each(lambda b, c: c.evict(max_chunks))
        assert len(set(counts)) == 1

    # ------------------------------------------------------------------ rules: attention
    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data(), seed=st.integers(0, 2**16), split=st.sampled_from([None, 1, "auto"]))
    def decode(self, data, seed, split):
        ready = sorted(s for s, t in self.model.items() if t)
        batch = data.draw(st.lists(st.sampled_from(ready), min_size=1, unique=True), label="batch")
        self.decode_batch(batch, seed, split)

    def decode_batch(self, batch, seed, split="auto"):
        self.decoders = [b.api.ChunkAttentionDecode(c, piece_chunks=split, private_piece_chunks=split)
                         for b, c in zip(self.backends, self.caches)]
        for d, cache in zip(self.decoders, self.caches):
            plan = d.plan(batch, HQ)
            if hasattr(cache, "d_slot_lens"):  # plan uploads the lengths the kernels read
                assert np.array_equal(to_host(cache.d_slot_lens)[plan.slots], cache.slot_lens[plan.slots])
        self.check_decode(seed)

    @precondition(lambda self: self.decoders is not None)
    @rule(seed=st.integers(0, 2**16))
    def decode_with_last_plan(self, seed):
        """A plan serves later steps while the tree is unchanged (the tails grow in place, lengths
        come from the length table); after a structural change every backend refuses it."""
        plan = self.decoders[0].decode_plan
        if plan.version == self.primary.version:
            event("plan reused")
            self.check_decode(seed)
            return
        q = random_queries(seed, plan.batch_size, HQ, self.D, self.dtype)
        before = [snapshot(c) for c in self.caches]
        for b, d in zip(self.backends, self.decoders):
            with pytest.raises(CacheError, match="^plan:"):
                d.run(b.asarray(q))
        for snap, cache in zip(before, self.caches):
            assert_same_snapshot(snap, snapshot(cache))
        self.decoders = None
        event("stale plan refused")

    def check_decode(self, seed):
        batch = list(self.decoders[0].decode_plan.batch)
        q = random_queries(seed, len(batch), HQ, self.D, self.dtype)
        layer = seed % L
        oracle, _ = oracle_decode(self.primary, batch, q, layer)
        outs = []
        for b, d in zip(self.backends, self.decoders):
            out = poisoned(q.shape, self.dtype, b.xp)  # a row the backend does not write stays NaN
            o = d.run(b.asarray(q), layer, out=out)
            assert o is out, b.name
            outs.append(to_host(o))
        vmax = self.vmax()
        for b, o in zip(self.backends, outs):
            assert o.dtype == self.primary.k_pool.dtype, (b.name, o.dtype)  # the storage dtype
            assert_close_to_oracle(o, oracle, self.dtype, vmax, backend=b, what=f"{b.name} decode")
        for b, o in zip(self.backends[1:], outs[1:]):
            if not b.kernels:  # the same reference math on the device lengths
                assert o.tobytes() == outs[0].tobytes(), b.name

    @precondition(lambda self: any(len(t) % self.C == 0 for t in self.model.values()))
    @rule(data=st.data(), seed=st.integers(0, 2**16), alpha=st.sampled_from([0.0, 0.06]))
    def prefill(self, data, seed, alpha):
        """A prompt chunk written and attended layer by layer (CompactAttention), then committed."""
        aligned = sorted(s for s, t in self.model.items() if len(t) % self.C == 0)
        seq = data.draw(st.sampled_from(aligned), label="seq")
        n = data.draw(st.integers(1, 2 * self.C + 1), label="n")
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, VOCAB, n).tolist()
        P = len(self.model[seq])
        k, v = self.kv(tokens, start=P)
        q = np.stack([random_queries(seed + layer, n, HQ, self.D, self.dtype) for layer in range(L)])
        opt = dict(alpha=alpha, sink=1, window=1)

        def run(b, cache, means):
            slots = cache.reserve(seq, tokens)
            o = []
            for layer in range(L):
                cache.write_kv(layer, slots, b.asarray(k[layer]), b.asarray(v[layer]))
                r = b.api.compact_prefill(cache, means, seq, b.asarray(q[layer]), layer, **opt)
                o.append(to_host(r.o))
            cache.commit(seq)
            return np.stack(o)

        it = iter(self.means)
        outs = self.each(lambda b, c: run(b, c, next(it)))
        if outs is None:
            return
        self.model[seq] += tokens
        vmax = self.vmax()
        for b, o in zip(self.backends, outs):
            assert o.dtype == self.primary.k_pool.dtype and np.isfinite(as_float32(o, self.dtype)).all(), b.name
            if alpha == 0:  # every block kept: dense causal attention
                for layer in range(L):
                    oracle, _ = oracle_prefill(self.primary, seq, q[layer], layer)
                    assert_close_to_oracle(o[layer], oracle, self.dtype, vmax, backend=b, kind="prefill",
                                           what=f"{b.name} prefill layer {layer}")
        for b, o in zip(self.backends[1:], outs[1:]):
            if not b.kernels:
                assert o.tobytes() == outs[0].tobytes(), b.name
        event(f"prefill P={'0' if P == 0 else '>0'}")

    # ------------------------------------------------------------------ invariants
    @invariant()
    def backends_agree(self):
        if not hasattr(self, "caches"):
            return
        ref = snapshot(self.primary)
        for cache in self.caches[1:]:  # tree, free lists, lengths, pending rows and pool bytes
            assert_same_snapshot(ref, snapshot(cache), common=True)  # (not the device table)

    @invariant()
    def model_holds(self):
        if not hasattr(self, "caches"):
            return
        cache = self.primary
        assert sorted(cache.sequences) == sorted(self.model)
        tree_invariants(cache, self.model)
        for s, toks in self.model.items():
            assert cache.seq_tokens(s) == toks and cache.seq_len(s) == len(toks)
            k, v = self.kv(toks)
            for layer in range(L):
                rk, rv = cache.read_kv(s, layer)
                assert to_host(rk).tobytes() == k[layer].tobytes()
                assert to_host(rv).tobytes() == v[layer].tobytes()


# cheap steps: more runs than the profile's default, long enough to fill the pool
DifferentialMachine.TestCase.settings = settings(
    max_examples=max(150, settings.default.max_examples), stateful_step_count=50)
TestDifferentialCpu = DifferentialMachine.TestCase


class GpuDifferentialMachine(DifferentialMachine):
    """The same machine, NumPy vs CuPy, at sizes the CUDA kernels compile for."""

    D, C = 64, 16
    BACKENDS = ("numpy", "cupy")


GpuDifferentialMachine.TestCase.settings = settings(
    max_examples=max(25, settings.default.max_examples), stateful_step_count=30)
TestDifferentialGpu = pytest.mark.gpu(pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")(
    GpuDifferentialMachine.TestCase))
