"""The recall-target selector and the block summaries of the reference (``select_blocks(recall=...,
summary=...)``, ``estimated_mass``, ``recall_rule``) against the float64 oracle ``attention_mass``.

Hypothesis draws the structure (seed, chunk size, past and chunk lengths, GQA ratio, tiles,
sub-groups, targets); ``long_context_qkv`` fills the arrays from the seed, so prompts have sinks,
local attention and needles. What must hold:

* every estimate is a distribution per row: past + own mass = rows of each query block;
* summary='sampled' with every row sampled is the exact mass, and summary='mean' is exact when
  every block's keys are equal (then the rule's guarantee is a measured one: each table's mean
  recall reaches the target);
* the rule keeps a prefix of the blocks in estimated order, the shortest that reaches the
  target (dropping the last one falls short), nested in the target; recall 1 reads every block;
* compact_prefill(recall=...) reads what select_blocks chose, and its lse gives that recall;
* the per-row floor (``row_floor``): every sampled row's estimated recall reaches it, the pooled
  target still holds, every block it adds is in some sampled row's minimal set, and a floor
  of None (the default) or 0 leaves the recall rule as it was;
* bad options name the argument and change nothing; the alpha rule's default is unchanged.
The GPU backend is checked against this reference in tests/test_gpu_prefill.py-style tests at
the end (marked gpu).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn.reference.checks import cdiv
from cpattn.reference.chunk_cache import ChunkCache
from cpattn.reference.compact_attention import (
    BlockMeans, attention_mass, compact_prefill, estimated_mass, mass_recall, oracle_prefill, recall_rule,
    row_floor_rule, sampled_row_mass, sampled_rows, select_blocks)
from cpattn.reference.dtypes import to_float32, to_storage
from cpattn.reference.workloads import long_context_qkv


def setup(seed, c, past_blocks, n, Hq, Hkv, D=16, dtype="float16", equal_in_block=False):
    """A cache with one sequence of P + n tokens (K/V of a structured prompt); returns
    (cache, means, seq, q [n, Hq, D] storage dtype)."""
    P = past_blocks * c
    w = long_context_qkv(seed, P + n, Hq, Hkv, D, dtype=dtype, num_sinks=2, locality_len=2 * c, needle_len=c,
                         num_needles=2, needle_queries=2)
    k, v = w.k, w.v
    if equal_in_block:  # every key of a block equal to its first: the mean summary is then exact
        kf = to_float32(k, dtype)
        idx = (np.arange(P + n) // c) * c
        k = to_storage(kf[:, idx], dtype)
    cache = ChunkCache(1, Hkv, D, cdiv(P + n, c) + 2, chunk_size=c, dtype=dtype)
    seq = cache.add_sequence([])
    cache.extend(seq, list(range(P)), k[:, :P], v[:, :P])
    cache.extend(seq, list(range(P, P + n)), k[:, P:P + n], v[:, P:P + n])
    return cache, BlockMeans(cache), seq, w.q[0, P:P + n]


def exact_per_block(cache, seq, q, c, P):
    """Oracle masses summed per query block: past [Hq, Qb, Pb], own [Hq, Qb]."""
    mass = attention_mass(cache, seq, q)  # [n, Hq, blocks]
    n = q.shape[0]
    Pb = P // c
    past = np.add.reduceat(mass[:, :, :Pb], np.arange(0, n, c), axis=0).transpose(1, 0, 2)
    own = np.add.reduceat(mass[:, :, Pb:].sum(axis=2), np.arange(0, n, c), axis=0).T
    return past, own, mass


def inputs(cache, means, seq, q):
    P = cache.seq_len(seq) - q.shape[0]
    c = cache.chunk_size
    means.update(cache, seq, num_tokens=P)
    kmean = means.gather(cache, seq, 0, P // c)
    k = to_float32(cache.read_kv(seq, 0)[0], cache.dtype)
    return to_float32(q, cache.dtype), k, kmean, P


@st.composite
def geometry(draw):
    c = draw(st.sampled_from([4, 8, 16]))
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 3]))
    return dict(seed=draw(st.integers(0, 2**31)), c=c, past_blocks=draw(st.integers(1, 12)),
                n=draw(st.integers(1, 3 * c)), Hq=Hkv * G, Hkv=Hkv,
                dtype=draw(st.sampled_from(["float16", "bfloat16"])))


# ============================================================================ estimates
@settings(max_examples=25, deadline=None)
@given(g=geometry(), summary=st.sampled_from(["mean", "sampled"]), rows=st.integers(1, 5))
def test_estimates_are_distributions(g, summary, rows):
    cache, means, seq, q = setup(**g)
    qf, k, kmean, P = inputs(cache, means, seq, q)
    past, own = estimated_mass(qf, k, kmean, g["c"], 1 / np.sqrt(16), summary, rows)
    rows_in = np.minimum(g["c"], g["n"] - np.arange(cdiv(g["n"], g["c"])) * g["c"])
    np.testing.assert_allclose(past.sum(axis=2) + own, np.broadcast_to(rows_in, own.shape), rtol=1e-9)
    assert (past >= 0).all() and (own > 0).all()


@settings(max_examples=25, deadline=None)
@given(g=geometry())
def test_sampling_every_row_is_the_exact_mass(g):
    cache, means, seq, q = setup(**g)
    qf, k, kmean, P = inputs(cache, means, seq, q)
    past, own = estimated_mass(qf, k, kmean, g["c"], 1 / np.sqrt(16), "sampled", g["c"])
    ex_past, ex_own, _ = exact_per_block(cache, seq, q, g["c"], P)
    np.testing.assert_allclose(past, ex_past, atol=1e-9)
    np.testing.assert_allclose(own, ex_own, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(g=geometry())
def test_mean_summary_is_exact_when_a_block_keys_are_equal(g):
    cache, means, seq, q = setup(**g, equal_in_block=True)
    qf, k, kmean, P = inputs(cache, means, seq, q)
    past, own = estimated_mass(qf, k, kmean, g["c"], 1 / np.sqrt(16), "mean")
    ex_past, ex_own, _ = exact_per_block(cache, seq, q, g["c"], P)
    # kmean is float32 (summed in float64): the scores differ from the oracle's by its rounding
    np.testing.assert_allclose(past, ex_past, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(own, ex_own, rtol=1e-4, atol=1e-6)


def test_sampled_rows_cover_every_query_block():
    assert sampled_rows(10, 4, 2).tolist() == [0, 3, 4, 7, 8, 9]
    assert sampled_rows(9, 4, 3).tolist() == [0, 2, 3, 4, 6, 7, 8]  # rounded linspace, a block of one row
    assert sampled_rows(8, 4, 1).tolist() == [0, 4]
    assert sampled_rows(5, 4, 9).tolist() == [0, 1, 2, 3, 4]
    # the floor's rows: every row of the last query block besides
    assert sampled_rows(10, 4, 2, last_block=True).tolist() == [0, 3, 4, 7, 8, 9]  # (a block of 2: all already)
    assert sampled_rows(12, 4, 2, last_block=True).tolist() == [0, 3, 4, 7, 8, 9, 10, 11]
    assert sampled_rows(12, 4, 1, last_block=True).tolist() == [0, 4, 8, 9, 10, 11]


# ============================================================================ the rule
def table_view(sel):
    """(kept [T, Hkv, S, Pb] from the group union, forced [Pb])."""
    return sel.group_union, sel.forced


@settings(max_examples=30, deadline=None)
@given(g=geometry(), data=st.data())
def test_rule_keeps_the_shortest_prefix_that_reaches_the_target(g, data):
    cache, means, seq, q = setup(**g)
    c, Hq, Hkv, n = g["c"], g["Hq"], g["Hkv"], g["n"]
    G = Hq // Hkv
    s = data.draw(st.sampled_from([d for d in range(1, G + 1) if G % d == 0]))
    q_tile = c * data.draw(st.integers(1, 3))
    summary = data.draw(st.sampled_from(["mean", "sampled"]))
    target = data.draw(st.floats(0.5, 0.999))
    sink, window = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))
    sel = select_blocks(cache, means, seq, q, recall=target, summary=summary, sample_rows=2, q_tile=q_tile,
                        group_size=s, sink=sink, window=window)
    assert sel.alpha is None and sel.recall == target and sel.summary == summary
    qf, k, kmean, P = inputs(cache, means, seq, q)
    past, own = estimated_mass(qf, k, kmean, c, 1 / np.sqrt(16), summary, 2)
    Pb, Qb, tb = P // c, cdiv(n, c), q_tile // c
    T, S = cdiv(Qb, tb), G // s
    rows_in = np.minimum(c, n - np.arange(Qb) * c)
    E = np.zeros((T, Hkv, S, Pb))
    base = np.zeros((T, Hkv, S))
    for h in range(Hq):
        hk, gg = h // G, (h % G) // s
        for i in range(Qb):
            E[i // tb, hk, gg] += past[h, i]
            base[i // tb, hk, gg] += own[h, i]
    forced = sel.forced
    assert forced.sum() == min(Pb, len(set(range(min(sink, Pb))) | set(range(max(0, Pb - window), Pb))))
    for t in range(T):
        rows = rows_in[t * tb:(t + 1) * tb].sum() * s
        for hk in range(Hkv):
            for gg in range(S):
                kept = sel.group_union[t, hk, gg]
                est = base[t, hk, gg] + E[t, hk, gg][kept].sum()
                chosen = kept & ~forced
                if chosen.any():  # the last one chosen was needed; none left out is worth more
                    last = np.min(E[t, hk, gg][chosen])
                    assert est - last < target * rows * (1 + 1e-12)
                    assert (E[t, hk, gg][~kept] <= last).all()
                if (~kept).any():
                    assert est >= target * rows * (1 - 1e-12)
    # the per-(head, query block) stage repeats the table's choice
    assert (sel.keep == sel.q_union[:, np.arange(Qb) // tb]).all()


@settings(max_examples=20, deadline=None)
@given(g=geometry(), data=st.data())
def test_targets_are_nested_and_recall_one_reads_everything(g, data):
    cache, means, seq, q = setup(**g)
    summary = data.draw(st.sampled_from(["mean", "sampled"]))
    a, b = sorted(data.draw(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2)))
    sa = select_blocks(cache, means, seq, q, recall=a, summary=summary)
    sb = select_blocks(cache, means, seq, q, recall=b, summary=summary)
    assert (sa.group_union <= sb.group_union).all()
    assert select_blocks(cache, means, seq, q, recall=1.0, summary=summary).group_union.all()
    none = select_blocks(cache, means, seq, q, recall=0.0, summary=summary, sink=0, window=0)
    assert not none.group_union.any()


@settings(max_examples=20, deadline=None)
@given(g=geometry(), data=st.data())
def test_exact_estimate_gives_the_measured_recall(g, data):
    # sampling every row makes the estimate exact: each table's measured mean recall (from the
    # attention's own lse against the float64 oracle) reaches the target
    cache, means, seq, q = setup(**g)
    c, n, Hq, Hkv = g["c"], g["n"], g["Hq"], g["Hkv"]
    target = data.draw(st.floats(0.5, 0.995))
    r = compact_prefill(cache, means, seq, q, recall=target, summary="sampled", sample_rows=c, sink=0, window=0,
                        group_size=1, q_tile=c)
    _, lse = oracle_prefill(cache, seq, q)
    rec = mass_recall(r.lse, lse)  # [n, Hq]
    tol = 5e-3 if g["dtype"] == "bfloat16" else 2e-3  # lse float32 of storage-rounded inputs
    for h in range(Hq):
        for i in range(cdiv(n, c)):
            assert rec[i * c:(i + 1) * c, h].mean() >= target - tol, (h, i)
    # and the tables are the selection's
    assert r.block_tables.to_dense()[..., : cache.seq_len(seq) // c - cdiv(n, c) + 0].shape[-1] >= 0
    np.testing.assert_array_equal(r.block_tables.to_dense()[..., :r.selection.past_len // c],
                                  r.selection.group_union)


def test_recall_rule_by_hand():
    # one table, 4 past blocks, estimated masses 0.1 0.4 0.2 0.05 (own 0.25): target 0.8 needs
    # own + 0.4 + 0.2 = 0.85 -> blocks 1 and 2; target 0.9 adds block 0; 0.85 exactly is reached
    past = np.array([[[0.1, 0.4, 0.2, 0.05]]])
    own = np.array([[0.25]])
    rows = np.array([1])
    none = np.zeros(4, bool)
    pick = lambda t, forced=none: recall_rule(past, own, rows, forced, t, 1, 1, 1)[0, 0, 0].tolist()
    assert pick(0.8) == [False, True, True, False]
    assert pick(0.85) == [False, True, True, False]
    assert pick(0.9) == [True, True, True, False]
    assert pick(0.25) == [False] * 4
    assert pick(1.0) == [True] * 4
    forced = np.array([False, True, False, False])  # a forced block counts, and is not "chosen"
    assert pick(0.8, forced) == [False, False, True, False]


# ============================================================================ the per-row floor
def sampled_row_recall(sel, cache, means, seq, q, rows, last_block=True):
    """Each floored row's estimated recall under ``sel``'s tables: float [Hq, m] (own chunk,
    forced and kept past blocks of the row's table), and the rows (the sampled ones and, with
    ``last_block``, every row of the last query block: those the floor holds on)."""
    qf, k, kmean, P = inputs(cache, means, seq, q)
    c = cache.chunk_size
    sel_rows, row_past, row_own = sampled_row_mass(qf, k, kmean, c, 1 / np.sqrt(16), rows, last_block)
    Hq, m, Pb = row_past.shape
    G, s, tb = Hq // cache.num_kv_heads, sel.group_size, sel.q_tile // c
    kept = np.stack([sel.group_union[sel_rows[i] // c // tb, h // G, (h % G) // s] for h in range(Hq)
                     for i in range(m)]).reshape(Hq, m, Pb)
    return row_own + (row_past * kept).sum(axis=2), sel_rows, row_past, row_own


@settings(max_examples=30, deadline=None)
@given(g=geometry(), data=st.data())
def test_row_floor_holds_on_every_sampled_row(g, data):
    cache, means, seq, q = setup(**g)
    c, Hq, Hkv = g["c"], g["Hq"], g["Hkv"]
    G = Hq // Hkv
    opt = dict(recall=data.draw(st.floats(0.3, 0.99)), sample_rows=data.draw(st.integers(1, 3)),
               q_tile=c * data.draw(st.integers(1, 3)), sink=data.draw(st.integers(0, 2)),
               window=data.draw(st.integers(0, 2)),
               group_size=data.draw(st.sampled_from([d for d in range(1, G + 1) if G % d == 0])))
    floor = data.draw(st.floats(0.3, 0.999))
    plain = select_blocks(cache, means, seq, q, **opt)
    sel = select_blocks(cache, means, seq, q, row_floor=floor, **opt)
    assert sel.row_floor == floor and plain.row_floor is None
    assert (plain.group_union <= sel.group_union).all()  # the pooled target's choice is kept
    rec, sel_rows, row_past, row_own = sampled_row_recall(sel, cache, means, seq, q, opt["sample_rows"])
    assert (rec >= floor * (1 - 1e-12)).all(), rec.min()
    # every block the floor adds is in the minimal set of some sampled row of its table
    Pb = row_past.shape[2]
    tb, s = opt["q_tile"] // c, opt["group_size"]
    added = sel.group_union & ~plain.group_union
    for t, kvh, gg, j in np.argwhere(added):
        needed = False
        for h in range(kvh * G + gg * s, kvh * G + gg * s + s):
            for i in np.flatnonzero(sel_rows // c // tb == t):
                base = row_own[h, i] + row_past[h, i, sel.forced].sum()
                heavier = ~sel.forced & ((row_past[h, i] > row_past[h, i, j]) |
                                         ((row_past[h, i] == row_past[h, i, j]) & (np.arange(Pb) < j)))
                needed |= base + row_past[h, i, heavier].sum() < floor  # the row had not reached it before j
        assert needed, (t, kvh, gg, j)


def test_row_floor_is_needed_without_it():
    # a fixed prompt where the pooled target leaves sampled rows below the floor: the floor lifts them
    cache, means, seq, q = setup(seed=11, c=8, past_blocks=12, n=24, Hq=4, Hkv=2)
    opt = dict(recall=0.6, sample_rows=2, sink=0, window=0)
    plain = select_blocks(cache, means, seq, q, **opt)
    rec, *_ = sampled_row_recall(plain, cache, means, seq, q, 2)
    assert rec.min() < 0.9, rec.min()
    sel = select_blocks(cache, means, seq, q, row_floor=0.9, **opt)
    rec, *_ = sampled_row_recall(sel, cache, means, seq, q, 2)
    assert rec.min() >= 0.9 and sel.density["group_union"] > plain.density["group_union"]


@settings(max_examples=15, deadline=None)
@given(g=geometry(), target=st.sampled_from([0.0, 0.5, 0.9, 0.99]))
def test_row_floor_off_leaves_the_rule_as_it_was(g, target):
    cache, means, seq, q = setup(**g)
    base = select_blocks(cache, means, seq, q, recall=target)
    for kw in (dict(row_floor=None), dict(row_floor=0.0), dict(row_floor=0)):
        other = select_blocks(cache, means, seq, q, recall=target, **kw)
        np.testing.assert_array_equal(other.group_union, base.group_union)
        np.testing.assert_array_equal(other.scores, base.scores)
    assert select_blocks(cache, means, seq, q, recall=target, row_floor=1.0).group_union.all()


def test_row_floor_rule_by_hand():
    # one kv head, two heads per table, one query block, 4 past blocks, two sampled rows per head;
    # the pooled estimate ranks block 1 first, row (0, 1) needs block 3
    row_past = np.array([[[0.1, 0.5, 0.2, 0.0], [0.0, 0.1, 0.0, 0.6]],
                         [[0.1, 0.6, 0.1, 0.0], [0.3, 0.3, 0.1, 0.1]]])  # [Hq 2, m 2, Pb 4]
    row_own = 1 - row_past.sum(axis=2)  # 0.2 0.3 / 0.2 0.2
    none = np.zeros(4, bool)
    pick = lambda f, forced=none, s=2: row_floor_rule(row_past, row_own, np.array([0, 0]), forced, f, 1, s, 1)
    # row (0,0): 0.2 + 0.5 = 0.7, + 0.2 = 0.9; (0,1): 0.3 + 0.6; (1,0): 0.2 + 0.6 = 0.8; (1,1): 0.2 + .3 + .3
    assert pick(0.7)[0, 0, 0].tolist() == [True, True, False, True]
    assert pick(0.9)[0, 0, 0].tolist() == [True, True, True, True]
    # at 0.3 row (0,1) needs nothing (own 0.3), row (1,1) block 0 (tied with block 1: the earlier)
    assert pick(0.3)[0, 0, 0].tolist() == [True, True, False, False]
    assert pick(0.15)[0, 0, 0].tolist() == [False] * 4  # every own chunk holds 0.2 or more
    per_head = pick(0.7, s=1)[0, 0]  # per-head tables: head 0 needs 1 and 3, head 1 needs 1 and 0
    assert per_head.tolist() == [[False, True, False, True], [True, True, False, False]]
    forced = np.array([False, False, False, True])  # a forced block counts for every row
    assert pick(0.7, forced)[0, 0, 0].tolist() == [True, True, False, False]
    assert pick(1.0)[0, 0, 0].all()


# ============================================================================ options
@pytest.fixture()
def small():
    return setup(seed=3, c=8, past_blocks=6, n=12, Hq=4, Hkv=2)


@pytest.mark.parametrize("kw,err,words", [
    (dict(recall=0.9, alpha=0.2), ValueError, ["alpha:", "None", "recall=0.9", "0.2"]),
    (dict(recall=1.5), ValueError, ["recall:", "[0, 1]", "1.5"]),
    (dict(recall=float("nan")), ValueError, ["recall:", "nan"]),
    (dict(recall="0.9"), TypeError, ["recall:", "'0.9'"]),
    (dict(recall=True), TypeError, ["recall:", "True"]),
    (dict(alpha=None), TypeError, ["alpha:", "None"]),
    (dict(summary="max"), ValueError, ["summary:", "'mean'", "'max'"]),
    (dict(summary=None), TypeError, ["summary:", "None"]),
    (dict(sample_rows=0), ValueError, ["sample_rows:", "0"]),
    (dict(sample_rows=2.0), TypeError, ["sample_rows:", "2.0"]),
    (dict(row_floor=0.9), ValueError, ["row_floor:", "recall=None", "0.9"]),
    (dict(recall=0.9, summary="mean", row_floor=0.9), ValueError, ["row_floor:", "summary='mean'", "0.9"]),
    (dict(recall=0.9, row_floor=True), TypeError, ["row_floor:", "True", "bool"]),
    (dict(recall=0.9, row_floor="0.9"), TypeError, ["row_floor:", "'0.9'"]),
    (dict(recall=0.9, row_floor=1.5), ValueError, ["row_floor:", "[0, 1]", "1.5"]),
    (dict(recall=0.9, row_floor=float("nan")), ValueError, ["row_floor:", "nan"]),
])
@pytest.mark.parametrize("fn", [select_blocks, compact_prefill], ids=["select_blocks", "compact_prefill"])
def test_bad_options_name_the_argument_and_change_nothing(small, fn, kw, err, words):
    cache, means, seq, q = small
    before = (means.kmean.tobytes(), means.is_current(cache, seq, 6), cache.version)
    with pytest.raises(err) as e:
        fn(cache, means, seq, q, **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert (means.kmean.tobytes(), means.is_current(cache, seq, 6), cache.version) == before


def test_alpha_rule_default_unchanged(small):
    cache, means, seq, q = small
    a = select_blocks(cache, means, seq, q)
    b = select_blocks(cache, means, seq, q, alpha=0.06, summary="mean")
    c = select_blocks(cache, means, seq, q, alpha=0.06, summary="auto", sample_rows=5)
    for x in (b, c):
        np.testing.assert_array_equal(a.scores, x.scores)
        np.testing.assert_array_equal(a.group_union, x.group_union)
    assert a.summary == "mean" and a.recall is None and a.alpha == 0.06
    # recall with alpha None or alpha left at its default: the same selection
    r1 = select_blocks(cache, means, seq, q, recall=0.95)
    r2 = select_blocks(cache, means, seq, q, recall=0.95, alpha=None)
    np.testing.assert_array_equal(r1.group_union, r2.group_union)
    assert r1.summary == "sampled"


def test_alpha_rule_on_the_sampled_summary(small):
    cache, means, seq, q = small
    sel = select_blocks(cache, means, seq, q, alpha=0.1, summary="sampled", sample_rows=8, sink=0, window=0)
    qf, k, kmean, P = inputs(cache, means, seq, q)
    ex_past, _, _ = exact_per_block(cache, seq, q, 8, P)
    s = ex_past / ex_past.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(sel.scores, s, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(sel.keep, sel.scores >= np.float32(0.1) * sel.scores.max(axis=2, keepdims=True))


# ============================================================================ the GPU's array code, on the host
# cpattn.compact_attention's estimate_mass / recall_choice / choice_scores / sequence_keys are written
# for any array module; with NumPy they run here and must agree with the reference.
from cpattn import compact_attention as gca  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(g=geometry(), summary=st.sampled_from(["mean", "sampled"]), rows=st.integers(1, 4))
def test_device_estimate_is_the_reference_estimate(g, summary, rows):
    cache, means, seq, q = setup(**g)
    qf, k, kmean, P = inputs(cache, means, seq, q)
    ref_p, ref_o = estimated_mass(qf, k, kmean, g["c"], 1 / np.sqrt(16), summary, rows)
    kk = gca.sequence_keys(np, cache.k_pool[0], np.array(cache.seq_chunks(seq)), P + g["n"], cache.dtype)
    np.testing.assert_array_equal(kk, k.transpose(1, 0, 2))
    past, own = gca.estimate_mass(np, qf, kk, kmean, g["c"], 1 / np.sqrt(16), summary, rows)
    assert past.dtype == own.dtype == np.float32
    np.testing.assert_allclose(past, ref_p, rtol=2e-4, atol=1e-6 * g["c"])
    np.testing.assert_allclose(own, ref_o, rtol=2e-4, atol=1e-6 * g["c"])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4]),
       Qb=st.integers(1, 6), Pb=st.integers(1, 20), data=st.data())
def test_device_recall_choice_is_the_reference_rule(seed, Hkv, G, Qb, Pb, data):
    rng = np.random.default_rng(seed)
    s = data.draw(st.sampled_from([d for d in range(1, G + 1) if G % d == 0]))
    tb = data.draw(st.integers(1, Qb))
    raw = rng.gamma(0.3, size=(Hkv * G, Qb, Pb + 1))  # heavy-tailed masses, no ties
    rows_in = np.full(Qb, 8)
    raw = raw / raw.sum(axis=2, keepdims=True) * 8
    past, own = raw[..., :Pb], raw[..., Pb]
    forced = rng.random(Pb) < 0.2
    target = data.draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]))
    want = recall_rule(past, own, rows_in, forced, target, Hkv, s, tb)
    got = gca.recall_choice(np, past, own, rows_in, forced, target, Hkv, s, tb)
    np.testing.assert_array_equal(got, want)
    # choice_scores: the block_union kernel's rule (keep = forced or v >= alpha * max(0, max_j v))
    # with alpha 1 keeps exactly the choice, per (head, query block)
    v = gca.choice_scores(np, got, G, tb, Qb)
    kept = forced | (v >= 1.0 * np.maximum(0, v.max(axis=2, keepdims=True)))
    per_head = np.repeat(got.transpose(1, 2, 0, 3), s, axis=1).reshape(Hkv * G, -1, Pb)[:, np.arange(Qb) // tb]
    np.testing.assert_array_equal(kept, per_head | forced)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4]),
       Qb=st.integers(1, 6), Pb=st.integers(1, 20), rows=st.integers(1, 3), data=st.data())
def test_device_row_floor_choice_is_the_reference_rule(seed, Hkv, G, Qb, Pb, rows, data):
    rng = np.random.default_rng(seed)
    s = data.draw(st.sampled_from([d for d in range(1, G + 1) if G % d == 0]))
    tb = data.draw(st.integers(1, Qb))
    m = Qb * rows
    raw = rng.gamma(0.3, size=(Hkv * G, m, Pb + 1))  # heavy-tailed row masses, no ties
    raw /= raw.sum(axis=2, keepdims=True)
    row_past, row_own = raw[..., :Pb], raw[..., Pb]
    row_block = np.repeat(np.arange(Qb), rows)
    forced = rng.random(Pb) < 0.2
    floor = data.draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]))
    want = row_floor_rule(row_past, row_own, row_block, forced, floor, Hkv, s, tb)
    got = gca.row_floor_choice(np, row_past, row_own, row_block, forced, floor, Hkv, s, tb)
    assert got.shape == want.shape == (cdiv(Qb, tb), Hkv, G // s, Pb)
    np.testing.assert_array_equal(got, want)


# ============================================================================ on the device (marker gpu)
def _gpu_ok():
    from cpattn import gpu_available

    return gpu_available()


@pytest.fixture()
def gpu_marker():
    if not _gpu_ok():
        pytest.skip("needs CuPy and a CUDA GPU")


def _pair(seed, P, n, c, Hq, Hkv, D, dtype):
    """The same prompt in a NumPy cache and a GPU cache: (w, cpu, means, gpu, gmeans, seq)."""
    from cpattn.chunk_cache import GpuChunkCache
    from cpattn.compact_attention import BlockMeans as GpuMeans

    w = long_context_qkv(seed, P + n, Hq, Hkv, D, dtype=dtype, num_sinks=2, locality_len=2 * c, needle_len=c,
                         num_needles=2, needle_queries=2)
    out = []
    for make in (ChunkCache, GpuChunkCache):
        cache = make(1, Hkv, D, (P + n) // c + 2, chunk_size=c, dtype=dtype)
        seq = cache.add_sequence([])
        cache.extend(seq, list(range(P)), w.k[:, :P], w.v[:, :P])
        cache.extend(seq, list(range(P, P + n)), w.k[:, P:], w.v[:, P:])
        out.append((cache, seq))
    (cpu, seq), (gpu_cache, _) = out
    return w, cpu, BlockMeans(cpu), gpu_cache, GpuMeans(gpu_cache), seq


def _gpu_mask(r, cpu, seq, T, Hkv, S, Pb):
    indptr, indices = r.tables()
    pos = {cid: i for i, cid in enumerate(cpu.seq_chunks(seq))}
    mask = np.zeros((T * Hkv * S, Pb), bool)
    for t in range(T * Hkv * S):
        for cid in indices[indptr[t]: indptr[t + 1]]:
            if pos[int(cid)] < Pb:
                mask[t, pos[int(cid)]] = True
    return mask.reshape(T, Hkv, S, Pb)


@pytest.mark.gpu
@pytest.mark.parametrize("summary", ["sampled", "mean"])
@pytest.mark.parametrize("rule", [dict(recall=0.95), dict(recall=0.99), dict(alpha=0.06)],
                         ids=["recall0.95", "recall0.99", "alpha0.06"])
@pytest.mark.parametrize("dtype,D,c", [("float16", 64, 64), ("bfloat16", 128, 32), ("float16", 128, 16)])
@pytest.mark.parametrize("q_tile,group_size", [(None, None), (1, 1)])
def test_gpu_selection_matches_the_reference(gpu_marker, summary, rule, dtype, D, c, q_tile, group_size):
    import cupy

    from cpattn.compact_attention import compact_prefill as gpu_prefill

    Hkv, Hq, P, n = 2, 8, 24 * c, 3 * c - 5
    w, cpu, means, gc, gmeans, seq = _pair(7, P, n, c, Hq, Hkv, D, dtype)
    q = w.q[0, P:]
    opt = dict(rule, summary=summary, q_tile=None if q_tile is None else q_tile * c, group_size=group_size)
    ref = compact_prefill(cpu, means, seq, q, **opt)
    r = gpu_prefill(gc, gmeans, seq, cupy.asarray(q), **opt)
    sel = ref.selection
    T, Hkv_, S, Pb = sel.group_union.shape
    got = _gpu_mask(r, cpu, seq, T, Hkv_, S, Pb)
    diff = int((got != sel.group_union).sum())
    assert diff <= max(2, 0.02 * got.size), diff  # float32 estimates: ties at the cut only
    # the measured recall of both against the oracle agrees
    _, lse = oracle_prefill(cpu, seq, q)
    rec_ref = mass_recall(ref.lse, lse).mean()
    rec_gpu = mass_recall(cupy.asnumpy(r.lse), lse).mean()
    assert abs(rec_ref - rec_gpu) <= 2e-3, (rec_ref, rec_gpu)
    d = r.density()
    for k in ("select", "q_union", "group_union"):
        assert abs(d[k] - sel.density[k]) <= 0.03, (k, d, sel.density)


@pytest.mark.gpu
def test_gpu_recall_one_is_dense(gpu_marker):
    import cupy

    from cpattn.compact_attention import compact_prefill as gpu_prefill

    c, P, n = 32, 10 * 32, 64
    w, cpu, means, gc, gmeans, seq = _pair(3, P, n, c, 4, 2, 64, "float16")
    r = gpu_prefill(gc, gmeans, seq, cupy.asarray(w.q[0, P:]), recall=1.0)
    assert r.density() == dict(select=1.0, q_union=1.0, group_union=1.0, tables=1.0)
    none = gpu_prefill(gc, gmeans, seq, cupy.asarray(w.q[0, P:]), recall=0.0, sink=1, window=1)
    assert none.density()["group_union"] == pytest.approx(2 / 10)
