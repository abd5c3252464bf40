"""Batch-invariant decode (docs/design.md, *Batch-invariant decode*): with ``batch_invariant=True``
one sequence's output is bitwise the same whatever batch it is decoded in.

A *scenario* is one target sequence (its last ``k`` tokens the queries) and the other sequences
that may join its batch: sequences that share the target's first tokens to drawn depths (on
block boundaries, one chunk either side, mid-chunk), and forks of the whole target grown by a few
tokens (they share its full chunks, the chunks of its new tokens included). The target's output
is computed alone in its cache, then in batches of drawn members, cache insertion orders, batch
orders and piece sizes, and in a cache with sharing off; every result must be bit for bit the
first, for one query, several, and per-sequence token trees. Hypothesis draws the structure;
NumPy generators seeded from it fill tokens, queries and trees.

* the reference (CPU): the storage output, lse and the float32 decode before rounding;
* the planners: the numba planner's invariant plan equals the textbook one, array for array, and
  the plan's blocks are what the design says;
* the kernel contract (CPU): plan_host's unit table read the way chunk_attend_invariant and
  chunk_merge_multi read it, each row's state from that row alone, is invariant and near the
  oracle;
* the CUDA kernels (marker ``gpu``): the same checks on a GpuChunkCache into NaN-filled buffers,
  fp16 and bf16, chunk sizes 16 to 128, head dims 64 and 128.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpattn import chunk_attention as fast
from cpattn.arrays import to_host
from cpattn.kernels import invariant_rows
from cpattn.reference import chunk_attention as ref
from cpattn.reference.chunk_attention import (INVARIANT_BLOCK_CHUNKS, attention_state, decode,
                                              key_starts, oracle_decode)
from cpattn.reference.chunk_cache import ChunkCache
from cpattn.reference.dtypes import STORAGE_DTYPES, to_float32
from cpattn.reference.workloads import TokenKV, random_queries
from cpattn.testing import assert_close_to_oracle, get_backend, poisoned, poisoned_lse

BLOCK = INVARIANT_BLOCK_CHUNKS
DECODE_BUDGET = 1e-4  # float32 two-phase decode vs the float64 oracle (tests/test_chunk_attention.py)
gpu = pytest.mark.skipif(not __import__("cpattn").gpu_available(), reason="needs CuPy and a CUDA GPU")


def rel_err(o, want):
    return float(np.abs(np.asarray(o, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def tree_from_parents(parents) -> np.ndarray:
    """[k, k] bool mask of a token tree given as a parent array (-1: a root)."""
    k = len(parents)
    m = np.zeros((k, k), bool)
    for j, p in enumerate(parents):
        m[j, j] = True
        if p >= 0:
            m[j] |= m[p]
    return m


# ---------------------------------------------------------------------- scenarios
@dataclasses.dataclass(frozen=True)
class Scenario:
    """The target (sequence 0: ``target_len`` tokens, its last ``k`` the queries) and the others
    that may share its batch: ``others`` (tokens shared with the target, own tokens) and
    ``forks`` (extra tokens of a fork of the target). Sequence ``i`` of ``members`` is spec
    ``i``: 0 the target, 1.. the others, then the forks."""

    seed: int
    chunk_size: int
    target_len: int
    k: int
    tree: bool  # a token tree per sequence (else causal)
    others: tuple
    forks: tuple
    num_kv_heads: int
    group: int
    head_dim: int
    dtype: str
    vocab: int = 40

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.group

    @property
    def specs(self) -> list:
        """Every sequence but the target: ("other", i) then ("fork", i)."""
        return [("other", i) for i in range(len(self.others))] + [("fork", i) for i in range(len(self.forks))]

    def kv(self) -> TokenKV:
        longest = self.target_len + max([0, *(d + o for d, o in self.others), *self.forks]) + 8
        return TokenKV(1, self.num_kv_heads, self.head_dim, self.dtype, seed=self.seed, vocab=self.vocab,
                       max_len=longest)

    def tokens(self, spec: int) -> list:
        rng = np.random.default_rng([self.seed, spec])
        target = np.random.default_rng([self.seed, 0]).integers(0, self.vocab, self.target_len).tolist()
        if spec == 0:
            return target
        kind, i = self.specs[spec - 1]
        if kind == "other":
            depth, own = self.others[i]
            return target[:depth] + rng.integers(0, self.vocab, max(own, self.k)).tolist()
        return target + rng.integers(0, self.vocab, self.forks[i]).tolist()

    def cache(self, backend=None, members=(), order=None, share_prefix=True):
        """(cache, ids): the target and the specs in ``members`` (ids by spec index), the
        non-forks added in ``order`` (a permutation of them, target included), then the forks."""
        backend = backend or get_backend("numpy")
        members = sorted(set(members) - {0})
        plain = [0] + [s for s in members if self.specs[s - 1][0] == "other"]
        forks = [s for s in members if self.specs[s - 1][0] == "fork"]
        c = self.chunk_size
        need = sum(len(self.tokens(s)) // c + 2 for s in [0, *members]) + 4
        cache = backend.make_cache(1, self.num_kv_heads, self.head_dim, need, chunk_size=c, dtype=self.dtype,
                                   share_prefix=share_prefix, max_sequences=len(members) + 4)
        kv, ids = self.kv(), {}
        for s in (plain if order is None else [plain[i] for i in order]):
            toks = self.tokens(s)
            k, v = kv(toks)
            ids[s] = cache.add_sequence(toks, backend.asarray(k), backend.asarray(v))
        for s in forks:
            ids[s] = cache.fork(ids[0])
            toks = self.tokens(s)[self.target_len:]
            if toks:
                k, v = kv(toks, start=self.target_len)
                cache.extend(ids[s], toks, backend.asarray(k), backend.asarray(v))
        return cache, ids

    def queries(self, batch) -> np.ndarray:
        """q [len(batch) * k, Hq, D] storage dtype: the k query rows of each spec of ``batch``."""
        return np.concatenate([random_queries(self.seed * 97 + s, self.k, self.num_q_heads, self.head_dim,
                                              self.dtype) for s in batch])

    def tree_mask(self, batch):
        """None (causal), or [len(batch), k, k]: each spec's own token tree."""
        if not self.tree:
            return None
        trees = []
        for s in batch:
            rng = np.random.default_rng([self.seed, s, 7])
            trees.append(tree_from_parents([int(rng.integers(-1, j)) for j in range(self.k)]))
        return np.stack(trees)


@st.composite
def scenarios(draw, chunk_sizes=st.sampled_from([1, 2, 4]), head_dims=st.sampled_from([8, 16]),
              groups=st.sampled_from([1, 2, 4]), dtypes=st.sampled_from(STORAGE_DTYPES), max_blocks=3,
              ks=st.integers(1, 6)):
    c = draw(chunk_sizes, label="chunk_size")
    k = draw(ks, label="k")
    n_chunks = draw(st.integers(1, max_blocks * BLOCK + 2), label="target_chunks")
    target_len = max(k, n_chunks * c - draw(st.integers(0, c - 1), label="tail_gap"))
    depth_chunks = st.one_of(st.integers(0, n_chunks), st.sampled_from([m * BLOCK for m in range(max_blocks + 1)]))
    depth = st.builds(lambda d, e: max(0, min(target_len, d * c + e)), depth_chunks, st.sampled_from([0, 0, 1, -1]))
    others = draw(st.lists(st.tuples(depth, st.integers(0, 2 * c)), max_size=5), label="others")
    forks = draw(st.lists(st.integers(0, 2 * c), max_size=2), label="forks")
    return Scenario(seed=draw(st.integers(0, 2**31 - 1), label="seed"), chunk_size=c, target_len=target_len, k=k,
                    tree=draw(st.booleans(), label="tree") and k > 1, others=tuple(others), forks=tuple(forks),
                    num_kv_heads=draw(st.integers(1, 2), label="num_kv_heads"), group=draw(groups, label="group"),
                    head_dim=draw(head_dims, label="head_dim"), dtype=draw(dtypes, label="dtype"))


def gpu_scenarios():
    return scenarios(chunk_sizes=st.sampled_from([16, 32, 64, 128]), head_dims=st.sampled_from([64, 128]),
                     groups=st.sampled_from([1, 4, 8]), max_blocks=2, ks=st.sampled_from([1, 2, 5, 16]))


@st.composite
def batches(draw, sc: Scenario):
    """(members, insertion order, batch order, piece size) of one batch holding the target."""
    n = len(sc.specs)
    members = [s for s in range(1, n + 1) if draw(st.booleans(), label=f"member {s}")]
    plain = 1 + sum(sc.specs[s - 1][0] == "other" for s in members)
    order = draw(st.permutations(range(plain)), label="insertion order")
    batch = draw(st.permutations([0, *members]), label="batch order")
    piece = draw(st.sampled_from(["auto", None, 1, 3, 8, 64]), label="piece_chunks")
    return members, list(order), list(batch), piece


# ---------------------------------------------------------------------- one run
@dataclasses.dataclass
class Result:
    o: np.ndarray  # the target's k output rows, storage bits (uint16)
    lse: np.ndarray  # float32 [k, Hq]
    o32: "np.ndarray | None"  # the float32 decode before rounding (reference only)
    lse32: "np.ndarray | None"

    def assert_equal(self, other: "Result", what: str):
        assert np.array_equal(self.o, other.o), f"{what}: output bits differ"
        assert np.array_equal(self.lse.view(np.uint32), other.lse.view(np.uint32)), f"{what}: lse bits differ"
        if self.o32 is not None and other.o32 is not None:
            assert np.array_equal(self.o32.view(np.uint32), other.o32.view(np.uint32)), f"{what}: float32 o differs"
            assert np.array_equal(self.lse32.view(np.uint32), other.lse32.view(np.uint32)), f"{what}: float32 lse"


def run_target(sc: Scenario, backend, cache, ids, batch, piece="auto", explicit_causal=False) -> Result:
    """The target's rows of a batch-invariant decode of ``batch`` (spec indices) into poisoned
    buffers; every row of the batch is also checked against the float64 oracle."""
    seqs = [ids[s] for s in batch]
    mask = sc.tree_mask(batch)
    if mask is None and explicit_causal:
        mask = np.tril(np.ones((sc.k, sc.k), bool))  # the causal tree, spelt out: a tree plan
    dec = backend.api.ChunkAttentionDecode(cache, piece, piece, batch_invariant=True)
    plan = dec.plan(seqs, sc.num_q_heads, queries_per_seq=sc.k, tree_mask=mask)
    assert plan.batch_invariant and fast.decode_kernels(plan) == ("chunk_attend_invariant", "chunk_merge_multi")
    q = sc.queries(batch)
    xp = backend.xp
    out, lse = poisoned(q.shape, sc.dtype, xp), poisoned_lse(q.shape[:2], xp)
    o, l = dec.run(backend.asarray(q), 0, out=out, lse_out=lse)
    assert o is out and l is lse
    rows = slice(batch.index(0) * sc.k, (batch.index(0) + 1) * sc.k)
    o_host, lse_host = to_host(out), to_host(lse)
    assert np.isfinite(lse_host).all()
    o32 = lse32 = None
    if isinstance(cache, ChunkCache) and not hasattr(cache, "d_slot_lens"):  # the reference on NumPy
        o32, lse32 = decode(cache, plan, q, 0, return_lse=True)
        o32, lse32 = o32[rows], lse32[rows]
    return Result(np.ascontiguousarray(o_host[rows]).view(np.uint16), lse_host[rows].copy(), o32, lse32), \
        (o_host, lse_host, q, seqs, mask)


def assert_near_oracle(sc, backend, cache, outputs):
    """Every row of one run within budget of the float64 oracle (K/V read back through the tree)."""
    o, lse, q, seqs, mask = outputs
    want, want_lse = oracle_decode(cache, seqs, q, 0, queries_per_seq=sc.k, tree_mask=mask)
    if not backend.kernels:  # the float32 lse is not rounded
        assert np.abs(lse - want_lse).max() <= DECODE_BUDGET * max(1.0, np.abs(want_lse).max())
    vmax = float(np.abs(to_float32(to_host(cache.v_pool), sc.dtype)).max())
    assert_close_to_oracle(o, want, sc.dtype, vmax, backend=backend)
    assert_close_to_oracle(lse, want_lse, sc.dtype, float(np.abs(want_lse).max()), backend=backend, kind="lse",
                           what="lse")


def check_invariance(sc: Scenario, backend, data, trials: int = 3):
    """The target alone, in ``trials`` drawn batches, and with sharing off: the same bits."""
    cache, ids = sc.cache(backend)
    alone, outputs = run_target(sc, backend, cache, ids, [0])
    assert_near_oracle(sc, backend, cache, outputs)
    if not sc.tree:
        again, _ = run_target(sc, backend, cache, ids, [0], explicit_causal=True)
        alone.assert_equal(again, "the causal tree spelt out")
    for t in range(trials):
        members, order, batch, piece = data.draw(batches(sc), label=f"batch {t}")
        cache, ids = sc.cache(backend, members, order)
        got, outputs = run_target(sc, backend, cache, ids, batch, piece)
        alone.assert_equal(got, f"batch {t} ({batch}, piece {piece})")
        if t == 0:
            assert_near_oracle(sc, backend, cache, outputs)
    every = list(range(len(sc.specs) + 1))
    flat, ids = sc.cache(backend, every, share_prefix=False)
    got, _ = run_target(sc, backend, flat, ids, every[::-1])
    alone.assert_equal(got, "sharing off")


# ---------------------------------------------------------------------- the reference
@given(sc=scenarios(), data=st.data())
def test_reference_output_is_bitwise_the_same_in_any_batch(sc, data):
    check_invariance(sc, get_backend("numpy"), data)


@given(sc=scenarios(chunk_sizes=st.sampled_from([2, 4]), max_blocks=2), data=st.data())
def test_emulated_gpu_cache_output_is_bitwise_the_same_in_any_batch(sc, data):
    """The GPU cache's host logic (device lengths, plan upload path) on the CPU stand-in."""
    with get_backend("emulated") as be:
        check_invariance(sc, be, data, trials=2)


@given(sc=scenarios(max_blocks=2), data=st.data())
def test_default_mode_agrees_to_rounding(sc, data):
    """The default mode is only promised to agree to rounding (its split and row counts change
    the last bits); this checks that and nothing more."""
    cache, ids = sc.cache(get_backend("numpy"), range(len(sc.specs) + 1))
    batch = data.draw(st.permutations(range(len(sc.specs) + 1)), label="batch order")
    seqs, q, mask = [ids[s] for s in batch], sc.queries(batch), sc.tree_mask(batch)
    default = decode(cache, ref.build_decode_plan(cache, seqs, 1, 1, queries_per_seq=sc.k, tree_mask=mask), q)
    inv = decode(cache, ref.build_decode_plan(cache, seqs, queries_per_seq=sc.k, tree_mask=mask,
                                              batch_invariant=True), q)
    assert rel_err(default, inv.astype(np.float64)) <= 1e-5


# ---------------------------------------------------------------------- the plan
def blocks_of(plan, pos):
    """[(kind, index, chunks)] of position ``pos``: its pieces, then its items, in plan order."""
    out = []
    for p in plan.seq_pieces[plan.seq_piece_indptr[pos]:plan.seq_piece_indptr[pos + 1]]:
        out.append(("piece", int(p), plan.piece_chunks[plan.piece_chunk_indptr[p]:plan.piece_chunk_indptr[p + 1]]))
    for i in range(plan.seq_item_indptr[pos], plan.seq_item_indptr[pos + 1]):
        out.append(("item", i, plan.private_chunks[plan.item_begin[i]:plan.item_end[i]]))
    return out


def assert_fixed_blocks(cache, plan, seqs):
    """Each position's pieces then items are its path's blocks of BLOCK chunks in path order; a
    full block is a piece exactly when two or more sequences of the batch hold its last chunk,
    and then the piece's range is those sequences."""
    paths = {pos: cache.seq_chunks(seqs[int(b)]) for pos, b in enumerate(plan.order)}
    holders = {}
    for pos, path in paths.items():
        for ch in path:
            holders.setdefault(ch, []).append(pos)
    for pos, path in paths.items():
        got = blocks_of(plan, pos)
        want = [path[m:m + BLOCK] for m in range(0, len(path), BLOCK)]
        assert [list(ch) for _, _, ch in got] == want, pos
        for (kind, idx, ch) in got:
            shared = len(ch) == BLOCK and len(holders[int(ch[-1])]) >= 2
            assert kind == ("piece" if shared else "item"), (pos, kind, list(ch))
            if kind == "piece":
                h = holders[int(ch[-1])]
                assert len(h) == max(h) + 1 - min(h)  # a contiguous range
                assert (plan.piece_begin[idx], plan.piece_end[idx]) == (min(h), max(h) + 1)
    assert plan.num_pieces == plan.num_segments and (np.diff(plan.piece_chunk_indptr) == BLOCK).all()
    piece_key0, item_key0 = key_starts(plan)
    c = plan.chunk_size
    assert (piece_key0 % (BLOCK * c) == 0).all() and (item_key0 % (BLOCK * c) == 0).all()


@given(sc=scenarios(), data=st.data())
def test_the_two_planners_give_the_same_fixed_blocks(sc, data):
    members, order, batch, piece = data.draw(batches(sc), label="batch")
    cache, ids = sc.cache(None, members, order)
    seqs = [ids[s] for s in batch]
    mask = sc.tree_mask(batch)
    p = None if piece == "auto" else piece
    old = ref.build_decode_plan(cache, seqs, p, p, queries_per_seq=sc.k, tree_mask=mask, batch_invariant=True)
    new = fast.build_decode_plan(cache, seqs, p, p, queries_per_seq=sc.k, tree_mask=mask, batch_invariant=True)
    for f in dataclasses.fields(ref.DecodePlan):
        a, b = getattr(new, f.name), getattr(old, f.name)
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype == np.int32 and np.array_equal(a, b), f.name
        else:
            assert a == b, f.name
    assert old.batch_invariant and "batch-invariant" in old.summary()
    assert_fixed_blocks(cache, old, seqs)
    # piece sizes are ignored: by the planners, by split_plan, by plan_host
    for size in (None, 1, 2, 64):
        for module, plan in ((ref, old), (fast, new)):
            again = module.split_plan(plan, size, size)
            assert all(np.array_equal(getattr(again, n), a) for n, a in plan.arrays().items())
            assert again.batch_invariant
    hp, buf, offs, n_units = fast.plan_host(cache, seqs, sc.num_q_heads, piece, piece, 4, 132,
                                            queries_per_seq=sc.k, tree_mask=mask, batch_invariant=True)
    assert all(np.array_equal(getattr(hp, n), a) for n, a in old.arrays().items())
    units = buf[:offs[1]].reshape(n_units, -1)
    assert (units[:, 6] <= invariant_rows(cache.chunk_size, sc.k)).all() and (units[:, 1] - units[:, 0] <= BLOCK).all()
    # the default planner is unchanged by the option's existence
    assert not ref.build_decode_plan(cache, seqs, queries_per_seq=sc.k, tree_mask=mask).batch_invariant


def test_one_shared_block_and_a_partial_tail():
    """A hand-made case: two sequences share 10 full chunks; the first block (8 chunks) is one
    piece for both, chunks 8 and 9 (shared, but not a full block) are in each one's item."""
    c = 2
    kv = TokenKV(1, 1, 8, "float16", seed=1)
    cache = ChunkCache(1, 1, 8, 40, chunk_size=c)
    base = list(range(20))
    a = cache.add_sequence(base + [30, 31, 32], *kv(base + [30, 31, 32]))
    b = cache.add_sequence(base + [33], *kv(base + [33]))
    for module in (ref, fast):
        plan = module.build_decode_plan(cache, [b, a], batch_invariant=True)
        assert plan.num_pieces == 1 and list(plan.piece_chunks) == cache.seq_chunks(a)[:8]
        assert (plan.piece_begin[0], plan.piece_end[0]) == (0, 2)
        assert plan.num_items == 2 and list(np.diff(plan.private_indptr)) == [4, 3]  # (a is first: older nodes)
        assert_fixed_blocks(cache, plan, [b, a])


# ---------------------------------------------------------------------- options
def test_the_option_is_a_bool_on_both_backends(unchanged):
    sc = Scenario(seed=3, chunk_size=2, target_len=20, k=1, tree=False, others=((10, 3),), forks=(), num_kv_heads=1,
                  group=2, head_dim=8, dtype="float16")
    for name in ("numpy", "emulated"):
        with get_backend(name) as be:
            cache, ids = sc.cache(be, [1])
            seqs = [ids[0], ids[1]]
            for bad in (1, 0, "yes", None, np.int32(1)):
                with pytest.raises(TypeError, match="^batch_invariant: "):
                    be.api.ChunkAttentionDecode(cache, batch_invariant=bad)
                for module in (ref, fast):
                    with unchanged(cache), pytest.raises(TypeError, match="^batch_invariant: "):
                        module.build_decode_plan(cache, seqs, batch_invariant=bad)
            with pytest.raises(TypeError):  # keyword only
                ref.ChunkAttentionDecode(cache, "auto", "auto", 4, True)
            dec = be.api.ChunkAttentionDecode(cache, batch_invariant=np.bool_(True))
            assert dec.plan(seqs, sc.num_q_heads).batch_invariant
    cache, ids = sc.cache(None, [1])
    with unchanged(cache), pytest.raises(TypeError, match="^batch_invariant: "):
        fast.plan_host(cache, [ids[0]], 2, batch_invariant=1)
    assert not ref.ChunkAttentionDecode(cache).batch_invariant


def test_plan_log_names_the_mode(caplog):
    sc = Scenario(seed=4, chunk_size=2, target_len=20, k=1, tree=False, others=(), forks=(), num_kv_heads=1,
                  group=1, head_dim=8, dtype="float16")
    cache, ids = sc.cache()
    with caplog.at_level(logging.DEBUG, logger="cpattn"):
        ref.ChunkAttentionDecode(cache, batch_invariant=True).plan([ids[0]], 1)
        ref.ChunkAttentionDecode(cache).plan([ids[0]], 1)
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decode plan rebuilt")]
    assert len(msgs) == 2 and "batch-invariant" in msgs[0] and "batch-invariant" not in msgs[1]


# ---------------------------------------------------------------------- the kernel contract (CPU)
def emulate_invariant_kernels(cache, plan, buf, offs, num_units, q, Hq, layer=0):
    """What chunk_attend_invariant and chunk_merge_multi compute from the uploaded arrays, in
    float32 NumPy: each unit row's state from that row alone over the unit's keys (the mma rows
    are independent), masked the multi-token way (the unit's first key position, the row's
    first new position and tree bits), stored at the kernel's indices; then each (position,
    query, head) merged the way chunk_merge_multi merges (max lse, weights, one sum in list
    order). Returns (o, lse) float32 in caller order."""
    d = {n: buf[offs[i]:offs[i + 1]] for i, n in enumerate(fast.DEVICE_ARRAYS)}
    units = d["units"].reshape(num_units, -1)
    assert (units[:, 6] <= invariant_rows(cache.chunk_size, plan.queries_per_seq)).all() and (units[:, 1] - units[:, 0] <= BLOCK).all()
    kq, c, Hkv, D = plan.queries_per_seq, cache.chunk_size, cache.num_kv_heads, cache.head_dim
    group = Hq // Hkv
    per_seq = group * kq
    lens = cache.slot_lens
    qf = to_float32(q, cache.dtype)
    kp, vp = to_float32(cache.k_pool[layer], cache.dtype), to_float32(cache.v_pool[layer], cache.dtype)
    rows = (plan.num_state_rows + plan.num_items) * kq * Hq
    o_st, l_st = np.full((rows, D), np.nan, np.float32), np.full(rows, np.nan, np.float32)
    for cb, ce, slot, minus, pos0, row0, n, kvh, out_base in units.tolist():
        nk = (ce - cb) * c if slot < 0 else lens[slot] - minus
        chunks = d["chunk_list"][cb:ce]
        keys, vals = kp[chunks, kvh].reshape(-1, D)[:nk], vp[chunks, kvh].reshape(-1, D)[:nk]
        for r in range(n):
            s, jg = divmod(row0 + r, per_seq)
            j, g = divmod(jg, group)
            b = int(d["order"][pos0 + s])
            delta = minus + np.arange(nk) - (lens[d["slots"][pos0 + s]] - kq)
            see = (delta < 0) | (((int(d["query_bits"][b * kq + j]) >> np.clip(delta, 0, 31)) & 1) == 1)
            o, lse = attention_state(qf[b * kq + j, kvh * group + g][None], keys, vals, np.float32(1 / np.sqrt(D)),
                                     np.float32, mask=see[None])
            idx = ((out_base + s) * kq + j) * Hq + kvh * group + g
            assert np.isnan(l_st[idx]), "two units wrote one state"
            o_st[idx], l_st[idx] = o[0], lse[0]
    out = np.full((plan.num_queries, Hq, D), np.nan, np.float32)
    out_lse = np.full((plan.num_queries, Hq), np.nan, np.float32)
    spo, spi, pb, sii = d["piece_state_offset"], d["seq_piece_indptr"], d["piece_begin"], d["seq_item_indptr"]
    for pos in range(plan.batch_size):
        srows = [spo[p] + pos - pb[p] for p in d["seq_pieces"][spi[pos]:spi[pos + 1]]]
        srows += [plan.num_state_rows + i for i in range(sii[pos], sii[pos + 1])]
        for j in range(kq):
            for h in range(Hq):
                idx = [(row * kq + j) * Hq + h for row in srows]
                mx = max(l_st[idx].max(), np.float32(-np.inf))
                base = np.float32(0) if mx == -np.inf else mx
                acc, wsum = np.zeros(D, np.float32), np.float32(0)
                for i in idx:
                    w = np.exp(l_st[i] - base).astype(np.float32)
                    wsum = np.float32(wsum + w)
                    acc = (acc + w * o_st[i]).astype(np.float32)
                r = d["order"][pos] * kq + j
                out[r, h] = acc * (np.float32(1) / wsum)
                out_lse[r, h] = base + np.log(wsum).astype(np.float32)
    return out, out_lse


@given(sc=scenarios(chunk_sizes=st.sampled_from([1, 2]), max_blocks=2, groups=st.sampled_from([1, 4])),
       data=st.data())
def test_the_kernel_contract_is_invariant_and_near_the_oracle(sc, data):
    """plan_host's unit table, read the way the invariant kernels read it (emulated, each row
    alone), gives the target the same bits alone, in drawn batches and with sharing off: every
    block of a sequence is one unit range with the same keys, lengths and masks however it is
    planned, and the merge takes the same states in the same order."""

    def run(cache, ids, batch, piece="auto"):
        seqs, q, mask = [ids[s] for s in batch], sc.queries(batch), sc.tree_mask(batch)
        plan, buf, offs, n_units = fast.plan_host(cache, seqs, sc.num_q_heads, piece, piece, 4, 132,
                                                  queries_per_seq=sc.k, tree_mask=mask, batch_invariant=True)
        o, lse = emulate_invariant_kernels(cache, plan, buf, offs, n_units, q, sc.num_q_heads)
        want, want_lse = oracle_decode(cache, seqs, q, 0, queries_per_seq=sc.k, tree_mask=mask)
        assert rel_err(o, want) <= DECODE_BUDGET
        assert np.abs(lse - want_lse).max() <= DECODE_BUDGET * max(1.0, np.abs(want_lse).max())
        t = batch.index(0) * sc.k
        return o[t:t + sc.k].view(np.uint32), lse[t:t + sc.k].view(np.uint32)

    cache, ids = sc.cache()
    alone = run(cache, ids, [0])
    for t in range(2):
        members, order, batch, piece = data.draw(batches(sc), label=f"batch {t}")
        cache, ids = sc.cache(None, members, order)
        got = run(cache, ids, batch, piece)
        assert np.array_equal(got[0], alone[0]) and np.array_equal(got[1], alone[1]), (batch, piece)
    every = list(range(len(sc.specs) + 1))
    flat, ids = sc.cache(None, every, share_prefix=False)
    got = run(flat, ids, every)
    assert np.array_equal(got[0], alone[0]) and np.array_equal(got[1], alone[1]), "sharing off"


# ---------------------------------------------------------------------- the CUDA kernels (device)
@pytest.mark.gpu
@gpu
@given(sc=gpu_scenarios(), data=st.data())
def test_kernels_are_bitwise_the_same_in_any_batch(sc, data):
    check_invariance(sc, get_backend("cupy"), data, trials=3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("c", [16, 32, 64, 128])
@pytest.mark.parametrize("head_dim,group,k,tree", [(128, 4, 1, False), (64, 8, 5, True), (128, 8, 16, False)])
def test_kernels_every_variant(dtype, c, head_dim, group, k, tree):
    """Every chunk size and storage dtype, with a shared first block, a partial second one,
    forks that share the target's full chunks, and a sharing-off copy: the target's bits never
    change, and neither does it against the oracle. Units of 1 to 128 rows per sequence."""
    sc = Scenario(seed=11 + c, chunk_size=c, target_len=(BLOCK + 3) * c - 5 + k, k=k, tree=tree,
                  others=((BLOCK * c, 3), (BLOCK * c + 1, c), (3 * c - 1, 2), (BLOCK * c - 1, 1)),
                  forks=(0, c + 2), num_kv_heads=2, group=group, head_dim=head_dim, dtype=dtype)
    be = get_backend("cupy")
    cache, ids = sc.cache(be)
    alone, outputs = run_target(sc, be, cache, ids, [0])
    assert_near_oracle(sc, be, cache, outputs)
    n = len(sc.specs)
    for members, order, batch, piece in (
            (list(range(1, n + 1)), None, list(range(n + 1)), "auto"),
            (list(range(1, n + 1)), list(range(n - len(sc.forks) + 1))[::-1], list(range(n + 1))[::-1], 1),
            ([1, 2], [2, 0, 1], [2, 0, 1], None),
            ([n], None, [n, 0], 3)):
        cache, ids = sc.cache(be, members, order)
        got, outputs = run_target(sc, be, cache, ids, batch, piece)
        alone.assert_equal(got, f"batch {batch}")
        assert_near_oracle(sc, be, cache, outputs)
    flat, ids = sc.cache(be, list(range(n + 1)), share_prefix=False)
    got, _ = run_target(sc, be, flat, ids, list(range(n + 1)))
    alone.assert_equal(got, "sharing off")
