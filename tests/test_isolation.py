"""Isolation: what happens to other sequences never changes a live sequence.

A *victim* sequence is written once. Then hypothesis drives random operations on everything
else: new prompts that share the victim's prefix (and diverge mid-chunk), extends, staged
reserve/write/commit, decode-step appends, forks (of the victim too: the fork's writes land in
its copied tail), releases, evictions, and calls that fail for want of room. After every
operation the victim's K/V (every layer) is byte-for-byte what was written, and its decode
output alone is bit-for-bit the first one; decoded in a batch with the others it stays within
the error budget of that (the plan differs, so the float32 merge order may too).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cpattn.arrays import to_host
from cpattn.reference.chunk_cache import CacheError, CacheFullError
from cpattn.reference.dtypes import to_float32
from cpattn.reference.workloads import TokenKV, random_queries
from cpattn.testing import budget, v_absmax

L, HKV, HQ, VOCAB = 2, 2, 4, 3
OPS = ["add", "add_shared", "extend", "staged", "append", "fork", "fork_victim_and_write", "release", "evict"]


def victim_view(backend, cache, victim, q):
    """(K/V bytes of every layer, decode output of the victim alone for each layer)."""
    kv = [to_host(x).tobytes() for layer in range(L) for x in cache.read_kv(victim, layer)]
    dec = backend.api.ChunkAttentionDecode(cache, piece_chunks=None, private_piece_chunks=None)
    dec.plan([victim], HQ)
    return kv, [to_host(dec.run(backend.asarray(q), layer)).tobytes() for layer in range(L)]


def check_isolation(backend, data):
    D, C = backend.head_dim, backend.chunk_size
    share = data.draw(st.booleans(), label="share_prefix")
    dtype = data.draw(st.sampled_from(["float16", "bfloat16"]), label="dtype")
    kv = TokenKV(L, HKV, D, dtype=dtype, seed=data.draw(st.integers(0, 99)), vocab=VOCAB, max_len=512)
    prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3 * C), label="victim")
    need = -(-len(prompt) // C)
    cache = backend.make_cache(L, HKV, D, need + data.draw(st.integers(1, 8), label="spare chunks"),
                               chunk_size=C, dtype=dtype, share_prefix=share, max_sequences=6)
    victim = cache.add_sequence(prompt, *map(backend.asarray, kv(prompt)))
    q = random_queries(7, 1, HQ, D, dtype)
    first = victim_view(backend, cache, victim, q)
    others: dict[int, list[int]] = {}

    def dev_kv(tokens, start):
        return map(backend.asarray, kv(tokens, start=start))

    def attempt(fn):
        """fn() -> (True, its result), or (False, None) when the pool or the slots ran out."""
        try:
            return True, fn()
        except CacheFullError:
            event("pool full")
        except CacheError as e:
            assert str(e).startswith("max_sequences:"), e
        return False, None

    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        op = data.draw(st.sampled_from(OPS), label="op")
        tokens = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=2 * C + 1), label="tokens")
        other = data.draw(st.sampled_from(sorted(others)), label="other") if others else None
        if op in ("add", "add_shared"):
            if op == "add_shared":  # the victim's prefix, then a divergence (maybe mid-chunk)
                tokens = prompt[: data.draw(st.integers(0, len(prompt)), label="cut")] + tokens
            ok, sid = attempt(lambda: cache.add_sequence(tokens, *dev_kv(tokens, 0)))
            if ok:
                others[sid] = tokens
        elif op == "extend" and other is not None:
            if attempt(lambda: cache.extend(other, tokens, *dev_kv(tokens, len(others[other]))))[0]:
                others[other] += tokens
        elif op == "staged" and other is not None:
            ok, slots = attempt(lambda: cache.reserve(other, tokens))
            if ok:
                k, v = kv(tokens, start=len(others[other]))
                for layer in range(L):
                    cache.write_kv(layer, slots, backend.asarray(k[layer]), backend.asarray(v[layer]))
                cache.commit(other)
                others[other] += tokens
        elif op == "append" and others:
            batch = sorted(others)[: len(tokens)]
            toks = tokens[: len(batch)]
            ks, vs = zip(*(kv([t], start=len(others[s])) for s, t in zip(batch, toks)))
            k, v = np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)
            if attempt(lambda: cache.append(batch, toks, backend.asarray(k), backend.asarray(v)))[0]:
                for s, t in zip(batch, toks):
                    others[s].append(t)
        elif op == "fork" and other is not None:
            ok, sid = attempt(lambda: cache.fork(other))
            if ok:
                others[sid] = list(others[other])
        elif op == "fork_victim_and_write":
            ok, sid = attempt(lambda: cache.fork(victim))
            if ok:
                others[sid] = list(prompt)
                tokens = tokens[: data.draw(st.integers(1, len(tokens)), label="n")]
                if attempt(lambda: cache.extend(sid, tokens, *dev_kv(tokens, len(prompt))))[0]:
                    others[sid] += tokens
                    event("wrote into a fork of the victim")
        elif op == "release" and other is not None:
            cache.release(other)
            del others[other]
        elif op == "evict":
            cache.evict(data.draw(st.none() | st.integers(0, 3), label="max_chunks"))
        event(op)
        assert sorted(cache.sequences) == sorted([victim, *others])
        for s, toks in others.items():
            assert cache.seq_tokens(s) == toks
        now = victim_view(backend, cache, victim, q)
        assert now[0] == first[0], f"the victim's K/V changed after {op}"
        assert now[1] == first[1], f"the victim's decode output changed after {op}"

    # decoded together with the others (a different plan): the same within budget
    batch = [victim] + [s for s, t in others.items() if t]
    dec = backend.api.ChunkAttentionDecode(cache, piece_chunks=1, private_piece_chunks=1)
    dec.plan(batch, HQ)
    qs = backend.asarray(np.concatenate([q, random_queries(8, len(batch) - 1, HQ, D, dtype)]))
    vmax = v_absmax(cache)
    store = to_host(cache.k_pool).dtype
    for layer in range(L):
        alone = to_float32(np.frombuffer(first[1][layer], store).reshape(HQ, D), dtype)
        together = to_float32(to_host(dec.run(qs, layer))[0], dtype)
        assert np.abs(together - alone).max() <= 2 * budget("decode", dtype, vmax, backend=backend)


@settings(max_examples=max(100, settings.default.max_examples))
@given(data=st.data())
def test_isolation(backend, data):
    check_isolation(backend, data)
