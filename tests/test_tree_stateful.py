"""Random operation sequences against the chunk cache, checked against a plain model.

The model is just each live sequence's token list: K/V is a function of (token, position)
(``TokenKV``), so what ``read_kv`` must return follows from the tokens alone, whichever sequence
wrote a shared chunk. Prompts come from a three-token vocabulary so that prefixes collide often,
and the pool is small so that ``CacheFullError`` happens; a failed call must change nothing.
"""
from __future__ import annotations

import numpy as np
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cpattn.reference.chunk_attention import build_decode_plan, decode, oracle_decode
from cpattn.testing import assert_close_to_oracle, assert_same_snapshot, snapshot, v_absmax
from cpattn.reference.chunk_cache import CacheError, CacheFullError, ChunkCache
from cpattn.reference.workloads import TokenKV, random_queries

L, HKV, D = 2, 1, 2
tokens_st = st.lists(st.integers(0, 2), max_size=10)


def live(self):
    return bool(self.model)


class CacheMachine(RuleBasedStateMachine):
    @initialize(c=st.sampled_from([2, 4]), num_chunks=st.integers(3, 10),
                share=st.booleans(), dtype=st.sampled_from(["float16", "bfloat16"]))
    def setup(self, c, num_chunks, share, dtype):
        self.cache = ChunkCache(L, HKV, D, num_chunks, chunk_size=c, dtype=dtype, share_prefix=share,
                                max_sequences=6)
        self.kv = TokenKV(L, HKV, D, dtype=dtype, seed=3, vocab=3)
        self.model: dict[int, list[int]] = {}
        self.plan = None  # the last decode plan, reused while the cache version allows

    # ------------------------------------------------------------------ helpers
    def attempt(self, fn):
        """Run fn; on a cache error the cache must be exactly as before. Returns (ok, result)."""
        before = snapshot(self.cache)
        try:
            return True, fn()
        except CacheFullError as e:
            assert str(e).startswith("pool:"), e
            event("CacheFullError")
        except CacheError as e:  # only slot exhaustion is expected here
            assert str(e).startswith("max_sequences:"), e
            event("slots exhausted")
        assert_same_snapshot(before, snapshot(self.cache))
        return False, None

    def kv_at(self, tokens, start):
        return self.kv(tokens, start=start)

    def pick(self, data):
        return data.draw(st.sampled_from(sorted(self.model)), label="seq")

    # ------------------------------------------------------------------ rules
    @rule(tokens=tokens_st, with_kv=st.booleans(),
          max_match=st.none() | st.integers(0, 10))
    def add(self, tokens, with_kv, max_match):
        if with_kv:
            k, v = self.kv_at(tokens, 0)
            ok, sid = self.attempt(lambda: self.cache.add_sequence(tokens, k, v, max_match=max_match))
        else:
            ok, sid = self.attempt(lambda: self.cache.add_sequence(tokens, max_match=max_match))
        if not ok:
            return
        n = self.cache.seq_len(sid)
        if with_kv:
            assert n == len(tokens)
        else:
            cap = len(tokens) if max_match is None else min(max_match, len(tokens))
            assert n % self.cache.chunk_size == 0 and n <= cap
            if not self.cache.share_prefix:
                assert n == 0
        self.model[sid] = list(tokens[:n])
        if n:
            event("prefix reused")

    @precondition(live)
    @rule(data=st.data(), tokens=tokens_st)
    def extend(self, data, tokens):
        seq = self.pick(data)
        k, v = self.kv_at(tokens, len(self.model[seq]))
        ok, _ = self.attempt(lambda: self.cache.extend(seq, tokens, k, v))
        if ok:
            self.model[seq] += tokens

    @precondition(live)
    @rule(data=st.data(), tokens=tokens_st)
    def extend_staged(self, data, tokens):
        """reserve, write layer by layer, commit: what a model's prefill does."""
        seq = self.pick(data)
        k, v = self.kv_at(tokens, len(self.model[seq]))
        ok, slots = self.attempt(lambda: self.cache.reserve(seq, tokens))
        if not ok:
            return
        if tokens:
            before = snapshot(self.cache)
            try:  # uncommitted tokens block every other append to this sequence
                self.cache.extend(seq, [0], *self.kv_at([0], 0))
                raise AssertionError("extend on an uncommitted sequence did not raise")
            except CacheError as e:
                assert str(e).startswith("seq:")
            assert_same_snapshot(before, snapshot(self.cache))
        for layer in range(L):
            self.cache.write_kv(layer, slots, k[layer], v[layer])
        self.cache.commit(seq)
        self.model[seq] += tokens

    @precondition(live)
    @rule(data=st.data())
    def append(self, data):
        batch = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, unique=True))
        toks = data.draw(st.lists(st.integers(0, 2), min_size=len(batch), max_size=len(batch)))
        ks, vs = zip(*(self.kv_at([t], len(self.model[s])) for s, t in zip(batch, toks)))
        k, v = np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)
        ok, _ = self.attempt(lambda: self.cache.append(batch, toks, k, v))
        if ok:
            for s, t in zip(batch, toks):
                self.model[s].append(t)

    @precondition(live)
    @rule(data=st.data())
    def fork(self, data):
        seq = self.pick(data)
        free = self.cache.num_free + self.cache.num_cached
        ok, f = self.attempt(lambda: self.cache.fork(seq))
        if not ok:
            return
        self.model[f] = list(self.model[seq])
        c = self.cache.chunk_size
        src, dst = self.cache.seq_chunks(seq), self.cache.seq_chunks(f)
        if self.cache.share_prefix:  # full chunks shared, the partial tail (if any) copied
            n_full = len(self.model[seq]) // c
            assert dst[:n_full] == src[:n_full]
            assert len(src) == n_full or dst[-1] != src[-1]
            assert self.cache.num_free + self.cache.num_cached == free - (len(src) - n_full)
        else:
            assert not set(src) & set(dst)

    @precondition(live)
    @rule(data=st.data())
    def release(self, data):
        seq = self.pick(data)
        self.cache.release(seq)
        del self.model[seq]
        assert not self.cache.is_live(seq)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data(), seed=st.integers(0, 2**16))
    def decode(self, data, seed):
        """Two-phase decode over whatever tree the operations built equals the dense oracle."""
        ready = sorted(s for s, t in self.model.items() if t)
        batch = data.draw(st.lists(st.sampled_from(ready), min_size=1, unique=True), label="batch")
        self.plan = build_decode_plan(self.cache, batch, piece_chunks=data.draw(st.none() | st.just(1)))
        self.check_decode(self.plan, seed)

    @precondition(lambda self: self.plan is not None)
    @rule(seed=st.integers(0, 2**16))
    def decode_with_last_plan(self, seed):
        """A plan stays valid while the version is unchanged (appends inside tail chunks)."""
        if self.plan.version == self.cache.version:
            event("plan reused")
            self.check_decode(self.plan, seed)
        else:
            q = random_queries(seed, self.plan.batch_size, 2 * HKV, D, self.cache.dtype)
            before = snapshot(self.cache)
            try:
                decode(self.cache, self.plan, q)
                raise AssertionError("a stale plan was accepted")
            except CacheError as e:
                assert str(e).startswith("plan:")
            assert_same_snapshot(before, snapshot(self.cache))
            self.plan = None
            event("stale plan refused")

    def check_decode(self, plan, seed):
        q = random_queries(seed, plan.batch_size, 2 * HKV, D, self.cache.dtype)
        o = decode(self.cache, plan, q)  # the float32 two-phase partition, not rounded to storage
        oracle, _ = oracle_decode(self.cache, list(plan.batch), q)
        assert_close_to_oracle(o, oracle, self.cache.dtype, v_absmax(self.cache))

    @rule(max_chunks=st.none() | st.integers(0, 3))
    def evict(self, max_chunks):
        cached, free = self.cache.num_cached, self.cache.num_free
        n = self.cache.evict(max_chunks)
        assert n == (cached if max_chunks is None else min(cached, max_chunks))
        assert self.cache.num_cached == cached - n and self.cache.num_free == free + n

    # ------------------------------------------------------------------ invariants
    @invariant()
    def refs_count_live_paths(self):
        nodes = list(self.cache.nodes())
        for n in nodes:
            want = sum(1 for s in self.model if any(m is n for m in self.cache.seq_nodes(s)))
            assert n.ref == want, (n.chunk, n.ref, want)
            assert n.ref > 0 or (n in self.cache.cached_nodes() and n.registered)
            if n.registered:  # complete, and reachable by matching from the root
                assert len(n.tokens) == self.cache.chunk_size
                assert n.parent.registered and n.parent.index[tuple(n.tokens)] is n
        for s in self.model:  # only a path's last chunk may be partial
            assert all(len(n.tokens) == self.cache.chunk_size for n in self.cache.seq_nodes(s)[:-1])

    @invariant()
    def every_chunk_in_exactly_one_state(self):
        cache = self.cache
        nodes = list(cache.nodes())
        in_tree = [n.chunk for n in nodes]
        assert len(set(in_tree)) == len(in_tree)
        referenced = {n.chunk for n in nodes if n.ref > 0}
        cached = [n.chunk for n in cache.cached_nodes()]
        free = cache.free_chunks()
        assert len(set(cached)) == len(cached) and len(set(free)) == len(free)
        assert not referenced & set(cached) and not referenced & set(free) and not set(cached) & set(free)
        assert len(referenced) + len(cached) + len(free) == cache.num_chunks
        assert referenced | set(cached) | set(free) == set(range(cache.num_chunks))
        st_ = cache.stats()
        assert (st_["chunks_free"], st_["chunks_cached"], st_["chunks_referenced"]) == \
            (len(free), len(cached), len(referenced))
        assert st_["sequences"] == len(self.model)
        assert st_["tokens_flat"] == sum(len(t) for t in self.model.values())

    @invariant()
    def sequences_read_back_what_was_written(self):
        assert sorted(self.cache.sequences) == sorted(self.model)
        for s, toks in self.model.items():
            assert self.cache.seq_tokens(s) == toks
            assert self.cache.seq_len(s) == len(toks) == self.cache.slot_lens[self.cache.seq_slot(s)]
            k, v = self.kv_at(toks, 0)
            for layer in range(L):
                rk, rv = self.cache.read_kv(s, layer)
                assert rk.tobytes() == k[layer].tobytes() and rv.tobytes() == v[layer].tobytes()


# cheap per step: more examples than the profile's default, long enough runs to fill the pool
CacheMachine.TestCase.settings = settings(
    max_examples=max(100, settings.default.max_examples), stateful_step_count=50)
TestCacheMachine = CacheMachine.TestCase
