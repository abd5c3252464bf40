"""Recall against density of CompactAttention's selectors on real attention.

The real model (SmolLM2-135M-Instruct from its GGUF file, NumPy backend, dense prefill) reads a
real text; the post-RoPE queries of the prompt's last chunk and the keys of the whole prompt are
captured per layer (``capture``), exactly as the model's attention calls see them (read back from
the chunk cache in the storage dtype). On them ``analyse`` measures, per layer and pooled:

* the exact-mass **oracle** at the tables' granularity (``cpattn.bench.frontier``) and the
  **token oracle** (each row its own keys, no blocks);
* the **alpha rule** (``select_blocks(alpha=...)``) at a sweep of alphas;
* the **recall-target rule** (``select_blocks(recall=...)``) at a sweep of targets, with the
  mean-key block summary and with the spike-aware one (``summary="spike"``);

with recall of a (head, row) the exact share of its attention on the blocks its table reads
(own chunk included), density the share of past blocks read, averaged over (query head,
query block). The rules are the reference's own functions (``block_scores`` for alpha,
``estimated_mass`` and ``recall_rule`` for the recall target, as ``select_blocks`` calls them; a
test checks the masks equal ``select_blocks``'s on a cache holding the captured keys), each
estimate computed once per layer and reused for every target and table granularity.

    python tools/real_frontier.py --out bench        # bench/frontier_real_cpu.{json,md,png}
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..reference.checks import cdiv, check_int
from ..reference.dtypes import as_numpy, to_float32
from ..serving.llama import CacheAttention
from .table import markdown_table


def log(msg: str) -> None:
    sys.stderr.write(f"[real_frontier {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ============================================================================ 1. capture
@dataclass
class Capture:
    """Post-RoPE activations of the last prompt chunk, per captured layer.

    Arrays (storage dtype, as the cache holds them; bf16 as uint16 bit patterns):
        q  [num_captured, n, Hq, D]     the chunk's queries
        k  [num_captured, P + n, Hkv, D] every key of the prompt (past and chunk)
        v  [num_captured, P + n, Hkv, D] the values (for output-error checks)
    ``layers[i]`` is the model layer of entry i; ``past`` = P (a multiple of ``block``).
    """

    layers: list
    past: int
    chunk: int
    block: int
    dtype: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    text: str = ""
    meta: dict = field(default_factory=dict)

    def layer_index(self, layer: int) -> int:
        return self.layers.index(layer)


class RecordingAttention(CacheAttention):
    """The model's cache attention that also keeps q, K and V of chosen layers when the call is
    the prompt's last chunk (the sequence then has ``total`` tokens)."""

    def __init__(self, cache, num_q_heads: int, layers, total: int, **options):
        super().__init__(cache, num_q_heads, **options)
        self.record_layers, self.total = set(layers), total
        self.records: dict = {}

    def prefill(self, seq: int, q, layer: int):
        if layer in self.record_layers and self.cache.seq_len(seq) == self.total:
            k, v = self.cache.read_kv(seq, layer)
            self.records[layer] = tuple(np.array(as_numpy(x)) for x in (q, k, v))
        return super().prefill(seq, q, layer)


def capture(model, tokens, layers=None, *, chunk: int = 2048, block: int = 64, prefill_chunk: int | None = None,
            text: str = "") -> Capture:
    """Run ``model`` (a ``LlamaModel``, dense prefill) over ``tokens`` and capture the last
    ``chunk`` tokens' queries and every key and value, for ``layers`` (default all).

    The prompt before the chunk (``len(tokens) - chunk`` tokens, a multiple of ``block``) is
    prefilled in pieces of ``prefill_chunk`` (default ``chunk``), then the chunk in one call.
    """
    L = model.config.num_layers
    layers = list(range(L)) if layers is None else sorted({check_int(x, "layers", 0, L) for x in layers})
    tokens = list(tokens)
    check_int(block, "block", 1)
    if check_int(chunk, "chunk", 1) > len(tokens):
        raise ValueError(f"chunk: expected at most {len(tokens)} (the tokens given), got {chunk}")
    P = len(tokens) - chunk
    if P % block:
        raise ValueError(f"tokens: expected len(tokens) - chunk a multiple of block {block}, got {P}")
    prefill_chunk = chunk if prefill_chunk is None else prefill_chunk
    cache = model.new_cache(cdiv(len(tokens), block) + 2, chunk_size=block, max_sequences=2)
    attn = RecordingAttention(cache, model.config.num_q_heads, layers, len(tokens), alpha=0.0)
    seq = cache.add_sequence([])
    if P:
        model.prefill(attn, seq, tokens[:P], chunk_tokens=prefill_chunk, logits="none")
    model.prefill(attn, seq, tokens[P:], chunk_tokens=cdiv(chunk, block) * block, logits="none")
    q, k, v = (np.stack([attn.records[l][i] for l in layers]) for i in range(3))
    return Capture(layers=layers, past=P, chunk=chunk, block=block, dtype=model.dtype, q=q, k=k, v=v, text=text)


def capture_text(model, tokenizer, text: str, num_tokens: int, layers=None, *, chunk: int = 2048,
                 block: int = 64, prefill_chunk: int | None = None, name: str = "") -> Capture:
    """``capture`` over the first ``num_tokens`` tokens of ``text`` (encoded without a chat
    template; ``num_tokens - chunk`` must be a multiple of ``block``)."""
    ids = tokenizer.encode(text)
    if len(ids) < num_tokens:
        raise ValueError(f"text: expected at least {num_tokens} tokens, got {len(ids)}")
    return capture(model, ids[:num_tokens], layers, chunk=chunk, block=block, prefill_chunk=prefill_chunk,
                   text=name)


def synthetic_capture(past: int = 6144, chunk: int = 2048, block: int = 64, kv_heads=(0, 1), seed: int = 1) -> Capture:
    """The synthetic second workload in a ``Capture``: ``long_context_qkv`` as the selection
    frontier (``cpattn.bench.frontier``) builds it (32 q / 8 kv heads, head_dim 128, bf16),
    the chosen kv heads with their 4 query heads each."""
    from ..reference.workloads import long_context_qkv

    Hq, Hkv, D = 32, 8, 128
    G = Hq // Hkv
    w = long_context_qkv(seed, past + chunk, Hq, Hkv, D, dtype="bfloat16", needle_len=64, num_needles=16,
                         needle_queries=16, locality_len=512)
    kv = list(kv_heads)
    heads = [h * G + g for h in kv for g in range(G)]
    return Capture(layers=[0], past=past, chunk=chunk, block=block, dtype="bfloat16",
                   q=w.q[:1, past:past + chunk][:, :, heads], k=w.k[:1, :past + chunk][:, :, kv],
                   v=w.v[:1, :past + chunk][:, :, kv], text="long_context_qkv")


# ============================================================================ 2. estimates beside the reference's
def variance_estimate(q, k, kmean, c, scale):
    """A second-moment block summary, measured beside the reference's: each block's log-mass
    ``log c + scale q . mean + scale^2 / 2 * sum_d q_d^2 var_d`` (exact for Gaussian keys with
    independent channels), own blocks before the row's likewise, the row's own block exactly.
    Same shapes as ``estimated_mass``."""
    return _moment_estimate(q, k, kmean, c, scale, outliers=0, variance=True)


def outlier_estimate(q, k, kmean, c, scale, outliers: int = 2):
    """A spike-aware block summary, measured beside the reference's: each block stands for its
    ``outliers`` keys farthest from its mean (scored exactly) plus the rest at their mean."""
    return _moment_estimate(q, k, kmean, c, scale, outliers=outliers, variance=False)


def _moment_estimate(q, k, kmean, c, scale, outliers, variance):
    n, Hq, D = q.shape
    Pb, Hkv = kmean.shape[0], k.shape[1]
    G, P, Qb = Hq // Hkv, kmean.shape[0] * c, cdiv(n, c)
    past, own = np.zeros((Hq, Qb, Pb)), np.zeros((Hq, Qb))
    qblock = np.arange(n) // c
    full = (n // c) * c
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    for g in range(Hkv):
        kb = k64[: P + full, g].reshape(-1, c, D)  # past blocks then the chunk's full blocks
        mean, var = kb.mean(axis=1), kb.var(axis=1)
        if outliers:
            dev = np.linalg.norm(kb - mean[:, None], axis=2)
            idx = np.argsort(-dev, axis=1, kind="stable")[:, :outliers]
            out = np.take_along_axis(kb, idx[..., None], axis=1)  # [B, m, D]
            rest = (kb.sum(axis=1) - out.sum(axis=1)) / (c - outliers)
        for h in range(g * G, (g + 1) * G):
            qh = q64[:, h]
            if outliers:
                zr = (qh @ rest.T) * scale + np.log(c - outliers)
                zo = np.einsum("nd,bmd->nbm", qh, out) * scale
                allz = np.concatenate([zr[..., None], zo], axis=2)
                mx = allz.max(axis=2)
                z = mx + np.log(np.exp(allz - mx[..., None]).sum(axis=2))  # [n, B]
            else:
                z = (qh @ mean.T) * scale + np.log(c)
                if variance:
                    z = z + 0.5 * scale * scale * ((qh * qh) @ var.T)
            zp, zc = z[:, :Pb], z[:, Pb:]  # [n, Pb], [n, full / c]
            zc = np.where(np.arange(zc.shape[1])[None, :] < qblock[:, None], zc, -np.inf)
            zd = np.empty(n)
            for i in range(Qb):  # the row's own block exactly
                r = slice(i * c, min(n, (i + 1) * c))
                m_ = r.stop - r.start
                s = (qh[r] @ k64[P + r.start:P + r.stop, g].T) * scale
                s[np.arange(m_)[None, :] > np.arange(m_)[:, None]] = -np.inf
                mx = s.max(axis=1)
                zd[r] = mx + np.log(np.exp(s - mx[:, None]).sum(axis=1))
            m = np.maximum(np.maximum(zp.max(axis=1, initial=-np.inf), zc.max(axis=1, initial=-np.inf)), zd)
            ep = np.exp(zp - m[:, None])
            eo = np.exp(zc - m[:, None]).sum(axis=1) + np.exp(zd - m)
            tot = ep.sum(axis=1) + eo
            np.add.at(past[h], qblock, ep / tot[:, None])
            np.add.at(own[h], qblock, eo / tot)
    return past, own


# ============================================================================ 3. measurement
ALPHAS = (0.005, 0.02, 0.06, 0.2, 0.4)
TARGETS = (0.9, 0.95, 0.98, 0.99, 0.995)
# (query heads per table, query rows per table); None = the whole group / chunk
GRANULARITIES = ((None, None), (1, None), (None, 256), (1, 256))
# selectors of the recall rule: name -> (what estimates the mass, sample_rows)
ESTIMATORS = {"mean": ("mean", 0), "sampled-1": ("sampled", 1), "sampled-2": ("sampled", 2),
              "sampled-4": ("sampled", 4), "variance": ("variance", 0), "outliers-2": ("outliers", 2),
              "exact": ("exact", 0)}
STATS_PERCENTILE = 1.0  # the low tail reported: the 1st percentile of (head, row) recalls


def granularity_name(heads, rows, G, n) -> str:
    return f"{heads or G} x {rows or n}"


def kmean_of(k, P, c):
    """Block means of the past as ``BlockMeans`` keeps them: summed in float64, rounded to float32."""
    Pb = P // c
    return k[:P].astype(np.float64).reshape(Pb, c, *k.shape[1:]).mean(axis=1).astype(np.float32)


def per_head_mask(chosen, forced, G, s, tb, Qb):
    """A table mask [T, Hkv, S, Pb] (forced blocks added) as [Hq, Qb, Pb]."""
    T, Hkv, S, Pb = chosen.shape
    m = (chosen | forced).transpose(1, 2, 0, 3)[:, :, None].repeat(s, axis=2).reshape(Hkv * G, T, Pb)
    return m[:, np.arange(Qb) // tb]


def union_mask(keep, G, s, tb):
    """The alpha rule's unions: keep [Hq, Qb, Pb] OR-ed over each tile and sub-group, as [Hq, Qb, Pb]."""
    Hq, Qb, Pb = keep.shape
    T = cdiv(Qb, tb)
    pad = np.zeros((Hq, T * tb, Pb), bool)
    pad[:, :Qb] = keep
    m = pad.reshape(Hq // s, s, T, tb, Pb).any(axis=(1, 3))  # [Hq / s, T, Pb]
    return np.repeat(np.repeat(m, s, axis=0), tb, axis=1)[:, :Qb]


def recall_stats(mask, past, own, c):
    """mask [Hq, Qb, Pb], exact past [Hq, n, Pb] / own [Hq, n] -> (density, recalls [Hq, n])."""
    per_row = np.repeat(mask, c, axis=1)[:, : past.shape[1]]
    return float(mask.mean()), own + (past * per_row).sum(axis=2)


def point(density, rec, **extra):
    r = rec.ravel()
    return dict(extra, density=density, recall_mean=float(r.mean()),
                recall_p1=float(np.percentile(r, STATS_PERCENTILE)), recall_min=float(r.min()), rows=int(r.size),
                recalls=r)


def keep_recalls(sink, p) -> None:
    """Move a point's recalls into ``sink`` (or drop them): results keep summaries only."""
    r = p.pop("recalls")
    if sink is not None:
        sink[key_of(p)] = r


def analyse_layer(q, k, c, scale, *, sink=2, window=4, alphas=ALPHAS, targets=TARGETS,
                  granularities=GRANULARITIES, estimators=ESTIMATORS, token_every=8, recall_sink=None):
    """Every measurement of one layer's chunk: q float32 [n, Hq, D], k float32 [P + n, Hkv, D].

    Returns a dict: ``oracle_parts`` {granularity: [frontier.oracle_parts per kv head]},
    ``points`` [dict(rule, estimator, knob, granularity, density, recall_mean, recall_p1,
    recall_min, rows)], ``token_hist`` (the token oracle's histogram), ``mass`` (mean own /
    sink / window / middle mass per row), ``seconds`` per part. ``recall_sink``: a dict that
    receives each point's recalls [Hq, n] under its (rule, estimator, knob, granularity).
    """
    from ..reference.compact_attention import block_scores, estimated_mass, recall_rule
    from . import frontier as fr

    n, Hq, D = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    G, P = Hq // Hkv, L - n
    Pb, Qb = P // c, cdiv(n, c)
    j = np.arange(Pb)
    forced = (j < sink) | (j >= Pb - window)
    t0 = time.perf_counter()
    hist = dict(count=np.zeros(len(fr.LOG_BINS) + 1), mass=np.zeros(len(fr.LOG_BINS) + 1), own=0.0, rows=0)
    past = np.empty((Hq, n, Pb), np.float32)
    own = np.empty((Hq, n), np.float32)
    for g in range(Hkv):
        hs = slice(g * G, (g + 1) * G)
        past[hs], own[hs] = fr.exact_mass(q[:, hs], k[:, g], P, c, scale, token_hist=hist, every=token_every)
    seconds = dict(exact=time.perf_counter() - t0)
    kmean = kmean_of(k, P, c)
    rows_in = np.minimum(c, n - np.arange(Qb) * c)
    ests = {}
    for name, (kind, m) in estimators.items():
        t1 = time.perf_counter()
        if kind in ("mean", "sampled"):
            ests[name] = estimated_mass(q, k, kmean, c, scale, kind, max(m, 1))
        elif kind == "variance":
            ests[name] = variance_estimate(q, k, kmean, c, scale)
        elif kind == "outliers":
            ests[name] = outlier_estimate(q, k, kmean, c, scale, m)
        elif kind == "exact":  # the rule with a perfect estimate: what the per-table rule costs by itself
            ex = np.add.reduceat(past.astype(np.float64), np.arange(0, n, c), axis=1)
            ests[name] = ex, np.add.reduceat(own.astype(np.float64), np.arange(0, n, c), axis=1)
        seconds[name] = time.perf_counter() - t1
    scores = block_scores(q, kmean, c, scale)  # the alpha rule's (mean keys)
    parts, points = {}, []
    for heads, rows in granularities:
        s = heads or G
        tb = (rows or Qb * c) // c
        gname = granularity_name(heads, rows, G, n)
        parts[gname] = [fr.oracle_parts(past[g * G:(g + 1) * G], own[g * G:(g + 1) * G], s, rows, c, forced)
                        for g in range(Hkv)]
        for a in alphas:
            keep = (scores >= np.float32(a) * scores.max(axis=2, keepdims=True)) | forced
            points.append(point(*recall_stats(union_mask(keep, G, s, tb), past, own, c), rule="alpha",
                                estimator="mean", knob=a, granularity=gname))
            keep_recalls(recall_sink, points[-1])
        for name, (est_p, est_o) in ests.items():
            for t in targets:
                chosen = recall_rule(est_p, est_o, rows_in, forced, t, Hkv, s, tb)
                mask = per_head_mask(chosen, forced, G, s, tb, Qb)
                points.append(point(*recall_stats(mask, past, own, c), rule="recall", estimator=name, knob=t,
                                    granularity=gname))
                keep_recalls(recall_sink, points[-1])
    mass = dict(own=float(own.mean()), sink=float(past[..., j < sink].sum(axis=2).mean()),
                window=float(past[..., j >= Pb - window].sum(axis=2).mean()),
                middle=float(past[..., ~forced].sum(axis=2).mean()))
    seconds["total"] = time.perf_counter() - t0
    return dict(oracle_parts=parts, points=points, token_hist=hist, mass=mass, seconds=seconds, past=P, chunk=n,
                block=c, heads=(Hq, Hkv))


def oracle_need(parts, recall) -> float:
    """The pooled exact-mass oracle's density at mean recall ``recall`` (1.0 when out of reach)."""
    from . import frontier as fr

    d, r = fr.pooled_curve(parts)
    ok = r >= recall - 1e-6  # recalls are float32 sums: a point a rounding above a step is on it
    return float(d[np.argmax(ok)]) if ok.any() else 1.0


def token_need(hist, P, recall) -> float:
    from . import frontier as fr

    d, r = fr.token_curve(hist, P)
    ok = r >= recall - 1e-12
    return float(d[np.argmax(ok)]) if ok.any() else 1.0


def add_oracle_ratio(points, parts_by_gran):
    """Each point's oracle density at its own mean recall and its density's ratio to it."""
    for p in points:
        need = oracle_need(parts_by_gran[p["granularity"]], p["recall_mean"])
        p["oracle_density"] = need
        p["ratio"] = p["density"] / need if need > 0 else float("inf")
    return points


# ============================================================================ 4. pooling and the report
RECALL_BINS = np.linspace(0.0, 1.0, 4001)  # recall histogram of a pooled point (resolution 2.5e-4)
SECTION = "CompactAttention selection on real attention"
DEFAULT_RANGES = "0-2,3-9,10-19,20-29"


def key_of(p) -> tuple:
    return (p["rule"], p["estimator"], p["knob"], p["granularity"])


class Pool:
    """Points of several layers merged: density and mean recall averaged (every layer has the same
    number of (head, query block, past block) triples and of rows), low tails from a recall
    histogram, the oracle from every layer's candidates together."""

    def __init__(self):
        self.parts: dict = {}
        self.acc: dict = {}
        self.hist = None
        self.layers = []

    def add(self, layer: int, res: dict, recalls: dict) -> None:
        from . import frontier as fr

        self.layers.append(layer)
        for g, parts in res["oracle_parts"].items():
            self.parts.setdefault(g, []).extend(parts)
        for p in res["points"]:
            a = self.acc.setdefault(key_of(p), dict(density=0.0, recall_sum=0.0, rows=0, layers=0,
                                                    hist=np.zeros(len(RECALL_BINS) + 1)))
            a["density"] += p["density"]
            a["recall_sum"] += p["recall_mean"] * p["rows"]
            a["rows"] += p["rows"]
            a["layers"] += 1
            a["hist"] += np.bincount(np.searchsorted(RECALL_BINS, recalls[key_of(p)].ravel()),
                                     minlength=len(RECALL_BINS) + 1)
        h = res["token_hist"]
        if self.hist is None:
            self.hist = {k: np.zeros_like(v) if isinstance(v, np.ndarray) else 0 for k, v in h.items()}
        for k2, v in h.items():
            self.hist[k2] = self.hist[k2] + v
        self.past = res["past"]

    def points(self) -> list:
        out = []
        for (rule, est, knob, g), a in self.acc.items():
            cdf = np.cumsum(a["hist"]) / a["rows"]
            p1 = float(RECALL_BINS[min(len(RECALL_BINS) - 1, np.argmax(cdf >= STATS_PERCENTILE / 100))])
            out.append(dict(rule=rule, estimator=est, knob=knob, granularity=g, density=a["density"] / a["layers"],
                            recall_mean=a["recall_sum"] / a["rows"], recall_p1=p1, rows=a["rows"]))
        return add_oracle_ratio(out, self.parts)

    def oracle(self, g, recall):
        return oracle_need(self.parts[g], recall)

    def token(self, recall):
        return token_need(self.hist, self.past, recall)


def run_analysis(cap: Capture, *, ranges: str = DEFAULT_RANGES, log_fn=log, **options) -> dict:
    """``analyse_layer`` on every captured layer; per layer, per layer range and pooled results."""
    from ..reference.checks import check_scale

    c, scale = cap.block, check_scale(None, cap.q.shape[-1])
    per_layer, total = [], Pool()
    spans = []
    for part in ranges.split(","):
        lo, hi = (int(x) for x in part.split("-")) if "-" in part else (int(part), int(part))
        spans.append((lo, hi, Pool()))
    for i, layer in enumerate(cap.layers):
        q, k = to_float32(cap.q[i], cap.dtype), to_float32(cap.k[i], cap.dtype)
        res, recalls = analyse_layer_with_recalls(q, k, c, scale, **options)
        add_oracle_ratio(res["points"], res["oracle_parts"])
        total.add(layer, res, recalls)
        for lo, hi, pool in spans:
            if lo <= layer <= hi:
                pool.add(layer, res, recalls)
        g0 = next(iter(res["oracle_parts"]))
        per_layer.append(dict(layer=layer, mass=res["mass"], points=res["points"], seconds=res["seconds"],
                              oracle_need={g: {str(t): oracle_need(parts, t) for t in TARGETS}
                                           for g, parts in res["oracle_parts"].items()},
                              token_need={str(t): token_need(res["token_hist"], res["past"], t) for t in TARGETS}))
        log_fn(f"layer {layer} ({i + 1}/{len(cap.layers)}) in {res['seconds']['total']:.1f} s: oracle@0.99 "
               f"{per_layer[-1]['oracle_need'][g0]['0.99']:.3f} ({g0})")
    grans = list(total.parts)
    pooled = dict(points=total.points(), oracle_need={g: {str(t): total.oracle(g, t) for t in TARGETS} for g in grans},
                  token_need={str(t): total.token(t) for t in TARGETS},
                  curves={g: curve_of(total.parts[g]) for g in grans},
                  token_curve=token_curve_of(total.hist, total.past))
    by_range = [dict(range=f"{lo}-{hi}", layers=pool.layers, points=pool.points(),
                     oracle_need={g: {str(t): pool.oracle(g, t) for t in TARGETS} for g in pool.parts})
                for lo, hi, pool in spans if pool.layers]
    return dict(per_layer=per_layer, pooled=pooled, ranges=by_range, granularities=grans)


def analyse_layer_with_recalls(q, k, c, scale, **options):
    """``analyse_layer`` that also returns every point's per-(head, row) recalls (for pooling)."""
    store = {}
    res = analyse_layer(q, k, c, scale, recall_sink=store, **options)
    return res, store


def curve_of(parts, grid=np.linspace(0, 1, 201)):
    from . import frontier as fr

    d, r = fr.pooled_curve(parts)
    return dict(density=grid.tolist(), recall=np.interp(grid, d, r).tolist())


def token_curve_of(hist, P, grid=np.linspace(0, 1, 201)):
    from . import frontier as fr

    d, r = fr.token_curve(hist, P)
    return dict(density=grid.tolist(), recall=np.interp(grid, d, r).tolist())


def find(points, rule, estimator, knob, granularity):
    return next((p for p in points if (p["rule"], p["estimator"], p["knob"], p["granularity"])
                 == (rule, estimator, knob, granularity)), None)


def cell(p, ratio: bool = True) -> str:
    if p is None:
        return "n/a"
    s = f"{p['density']:.3f} @ {p['recall_mean']:.4f} / {p['recall_p1']:.3f}"
    return s + (f" ({p['ratio']:.2f}x)" if ratio else "")


MAIN_TARGET = 0.99
CHOSEN = "sampled-2"  # the recall rule's default summary: summary="sampled", sample_rows=2


def markdown(result: dict, meta: dict) -> str:
    """The BENCHMARKS.md section (generated; never edited by hand)."""
    grans = result["granularities"]
    g_default = grans[0]
    pooled = result["pooled"]["points"]
    t = MAIN_TARGET
    lines = [f"## {SECTION} (CPU, {meta['date']})", "",
             f"Post-RoPE q/K captured from {meta['model']} (NumPy backend, fp16, dense prefill) on the first "
             f"{meta['tokens']} tokens of {meta['text']}: the last chunk of {meta['chunk']} queries after "
             f"{meta['past']} past tokens, block {meta['block']}, sink {meta['sink']}, window {meta['window']}, "
             f"layers {meta['layers_text']}. Recall of a (head, row) = the exact share of its attention on the "
             "blocks its table reads (own chunk included); density = past blocks read, per (query head, query "
             "block). Cells: **density @ mean recall / 1st-percentile row recall (density / exact-mass oracle's "
             "density at the same mean recall and table granularity)**. Generated by `python tools/real_frontier.py "
             "--out bench --benchmarks BENCHMARKS.md` (cpattn/bench/real_frontier.py); "
             "the synthetic workload's frontier is the section *Selection frontier* above.", "",
             "Selectors: **alpha** the FlashPrefill-style threshold on mean-key block scores (the default, "
             "alpha 0.06); **recall** `select_blocks(recall=...)`: per table, blocks in order of estimated mass "
             "until the estimate (own chunk, sink and window counted in) reaches the target, the mass estimated "
             "by: `mean` (each block at its mean key), `sampled-m` (exact scores of m rows per query block "
             "against every key, `summary=\"sampled\"`; m = 2 is the default), and two block summaries "
             "measured beside them in this tool only: `variance` (mean plus per-channel variance) and "
             "`outliers-2` (the two keys farthest from the mean scored exactly); `exact` is the rule fed "
             "the exact masses (what the per-table rule costs by itself).", ""]
    # pooled, every granularity
    head = ["table (heads x rows)", f"oracle density @ {t} (token oracle)", "alpha 0.06", "alpha 0.2"] + \
        [f"recall {t}: {e}" for e in ESTIMATORS]
    rows = []
    for g in grans:
        rows.append([g, f"{result['pooled']['oracle_need'][g][str(t)]:.3f} ({result['pooled']['token_need'][str(t)]:.3f})",
                     cell(find(pooled, "alpha", "mean", 0.06, g)), cell(find(pooled, "alpha", "mean", 0.2, g))]
                    + [cell(find(pooled, "recall", e, t, g)) for e in ESTIMATORS])
    lines += ["**All layers pooled.**", ""] + markdown_table(head, rows) + [""]
    # target tracking
    head = ["table", "estimator"] + [f"target {x}" for x in TARGETS]
    rows = []
    for g in grans:
        for e in ("mean", CHOSEN, "exact"):
            rows.append([g, e] + [f"{p['recall_mean']:.4f} / {p['recall_p1']:.3f} (d {p['density']:.3f})"
                                  for p in (find(pooled, "recall", e, x, g) for x in TARGETS)])
    lines += ["**Does the recall rule hit its target?** Mean recall / 1st percentile (density), all layers pooled.",
              ""] + markdown_table(head, rows) + [""]
    # ranges
    head = ["layers", f"oracle @ {t}", "alpha 0.06", f"recall {t}: mean", f"recall {t}: {CHOSEN}",
            f"recall {t}: sampled-4", f"recall {t}: exact"]
    for g in grans:
        rows = []
        for r in result["ranges"]:
            pts = r["points"]
            rows.append([r["range"], f"{r['oracle_need'][g][str(t)]:.3f}", cell(find(pts, "alpha", "mean", 0.06, g)),
                         cell(find(pts, "recall", "mean", t, g)), cell(find(pts, "recall", CHOSEN, t, g)),
                         cell(find(pts, "recall", "sampled-4", t, g)), cell(find(pts, "recall", "exact", t, g))])
        lines += [f"**Per layer range, tables {g}.**", ""] + markdown_table(head, rows) + [""]
    # per layer, default tables
    head = ["layer", "mass own / sink / window / middle", f"oracle @ {t} (token)", "alpha 0.06",
            f"recall {t}: mean", f"recall {t}: {CHOSEN}"]
    rows = []
    for L in result["per_layer"]:
        m = L["mass"]
        rows.append([L["layer"], f"{m['own']:.2f} / {m['sink']:.2f} / {m['window']:.2f} / {m['middle']:.2f}",
                     f"{L['oracle_need'][g_default][str(t)]:.3f} ({L['token_need'][str(t)]:.3f})",
                     cell(find(L["points"], "alpha", "mean", 0.06, g_default)),
                     cell(find(L["points"], "recall", "mean", t, g_default)),
                     cell(find(L["points"], "recall", CHOSEN, t, g_default))])
    lines += [f"**Per layer, tables {g_default}** (the default: whole GQA group, whole chunk).", ""] + \
        markdown_table(head, rows) + [""]
    syn = result.get("synthetic")
    if syn:
        pts = syn["pooled"]["points"]
        head = ["table (heads x rows)", f"oracle @ {t} (token oracle)", "alpha 0.06", "alpha 0.2",
                f"recall {t}: mean", f"recall {t}: {CHOSEN}", f"recall {t}: exact"]
        rows = [[g, f"{syn['pooled']['oracle_need'][g][str(t)]:.3f} ({syn['pooled']['token_need'][str(t)]:.3f})",
                 cell(find(pts, "alpha", "mean", 0.06, g)), cell(find(pts, "alpha", "mean", 0.2, g)),
                 cell(find(pts, "recall", "mean", t, g)), cell(find(pts, "recall", CHOSEN, t, g)),
                 cell(find(pts, "recall", "exact", t, g))] for g in syn["granularities"]]
        lines += [f"**Second workload, synthetic** (`long_context_qkv`, seed 1, as *Selection frontier* builds it: "
                  f"{syn['meta']}).", ""] + markdown_table(head, rows) + [""]
    lines += [f"Run: capture {meta['capture_s']:.0f} s, analysis {meta['analysis_s']:.0f} s on {meta['cpus']} CPU "
              "cores. Plot: `bench/frontier_real_cpu.png`.", ""]
    return "\n".join(lines)


def update_benchmarks(path: str, text: str) -> None:
    """Replace this tool's section of ``path`` (a '## ' heading starting with ``SECTION``, up to the
    next '## ' heading) with ``text``, or append it when there is none; the rest is untouched."""
    with open(path) as f:
        old = f.read().split("\n")
    start = next((i for i, l in enumerate(old) if l.startswith(f"## {SECTION}")), None)
    new = text.rstrip("\n").split("\n")
    if start is None:
        out = old + ([""] if old and old[-1] != "" else []) + new
    else:
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        out = old[:start] + new + ([""] + old[end:] if end < len(old) else [])
    with open(path, "w") as f:
        f.write("\n".join(out).rstrip("\n") + "\n")


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    grans = result["granularities"]
    pooled = result["pooled"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    styles = {"mean": "s--", "sampled-2": "o-", "sampled-4": "^-", "variance": "d:", "exact": "x-"}
    for i, g in enumerate(grans[:2]):
        col = f"C{i}"
        cv = pooled["curves"][g]
        ax.plot(cv["density"], cv["recall"], color=col, lw=2, label=f"oracle {g}")
        pts = [find(pooled["points"], "alpha", "mean", a, g) for a in ALPHAS]
        ax.plot([p["density"] for p in pts], [p["recall_mean"] for p in pts], "v:", color=col, ms=4,
                label=f"alpha {g}")
        for e, st in styles.items():
            pts = [find(pooled["points"], "recall", e, t, g) for t in TARGETS]
            ax.plot([p["density"] for p in pts], [p["recall_mean"] for p in pts], st, color=col, ms=3, lw=0.8,
                    alpha=0.8, label=f"recall rule {e} {g}")
    tc = pooled["token_curve"]
    ax.plot(tc["density"], tc["recall"], "k:", label="token oracle")
    ax.set_xlim(0, 1)
    ax.set_ylim(0.85, 1.001)
    ax.axhline(0.99, color="grey", lw=0.5)
    ax.set_xlabel("density (past blocks read)")
    ax.set_ylabel("mean attention-mass recall")
    ax.set_title("real attention, all layers pooled")
    ax.legend(fontsize=5.5, ncol=2)
    ax = axes[1]
    g = grans[0]
    layers = [L["layer"] for L in result["per_layer"]]
    ax.plot(layers, [L["oracle_need"][g]["0.99"] for L in result["per_layer"]], "k-", lw=2, label="oracle @ 0.99")
    ax.plot(layers, [L["token_need"]["0.99"] for L in result["per_layer"]], "k:", label="token oracle @ 0.99")
    for e, st in (("mean", "s--"), (CHOSEN, "o-")):
        pts = [find(L["points"], "recall", e, 0.99, g) for L in result["per_layer"]]
        ax.plot(layers, [p["density"] for p in pts], st, ms=3, label=f"recall 0.99 {e}: density")
        ax.plot(layers, [p["recall_mean"] for p in pts], st, ms=3, alpha=0.4, label=f"recall 0.99 {e}: mean recall")
    pts = [find(L["points"], "alpha", "mean", 0.06, g) for L in result["per_layer"]]
    ax.plot(layers, [p["density"] for p in pts], "v:", ms=3, label="alpha 0.06: density")
    ax.set_xlabel("layer")
    ax.set_ylabel("density / recall")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"per layer, tables {g}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ============================================================================ 5. the tool
def parse_layers(text: str | None, num_layers: int):
    if text in (None, "", "all"):
        return list(range(num_layers))
    if text.startswith("every"):
        return list(range(0, num_layers, int(text[5:])))
    return [int(x) for x in text.split(",")]


def main(argv=None) -> int:
    from . import table

    ap = argparse.ArgumentParser(prog="python tools/real_frontier.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model name of cpattn.serving.fetch (default smollm2)")
    ap.add_argument("--text", default="rust-book", help="load_text name or a file (default rust-book)")
    ap.add_argument("--tokens", type=int, default=8192, help="prompt tokens (default 8192)")
    ap.add_argument("--chunk", type=int, default=2048, help="queries of the last chunk (default 2048)")
    ap.add_argument("--block", type=int, default=64, help="block = chunk size of the cache (default 64)")
    ap.add_argument("--layers", default="all", help="'all', 'every3' or a list '0,3,6' (default all)")
    ap.add_argument("--ranges", default=DEFAULT_RANGES, help=f"layer ranges reported (default {DEFAULT_RANGES})")
    ap.add_argument("--sink", type=int, default=2)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--out", default="frontier_real_out", help="directory of frontier_real_cpu.{md,csv,json,png}")
    ap.add_argument("--benchmarks", default=None, help="a BENCHMARKS.md whose section this run replaces")
    ap.add_argument("--synthetic-kv-heads", default="0,1",
                    help="kv heads of the synthetic second workload ('' skips it; default 0,1)")
    args = ap.parse_args(argv)
    from ..serving import fetch as fetch_mod
    from ..serving.generate import load_text
    from ..serving.gguf import GGUFFile
    from ..serving.llama import LlamaModel

    t0 = time.perf_counter()
    f = GGUFFile(str(fetch_mod.model_path(args.model)))
    model = LlamaModel(f.config(), f.tensor, dtype="float16")
    layers = parse_layers(args.layers, model.config.num_layers)
    log(f"capturing {len(layers)} layers over {args.tokens} tokens of {args.text}")
    cap = capture_text(model, f.tokenizer(), load_text(args.text), args.tokens, layers, chunk=args.chunk,
                       block=args.block, name=args.text)
    t1 = time.perf_counter()
    log(f"captured in {t1 - t0:.0f} s; analysing")
    result = run_analysis(cap, ranges=args.ranges, sink=args.sink, window=args.window)
    if args.synthetic_kv_heads:
        kv = [int(x) for x in args.synthetic_kv_heads.split(",")]
        syn = synthetic_capture(cap.past, args.chunk, args.block, kv)
        log(f"synthetic workload: kv heads {kv}")
        sr = run_analysis(syn, ranges="0-0", sink=args.sink, window=args.window, log_fn=lambda m: None)
        result["synthetic"] = dict(pooled=sr["pooled"], granularities=sr["granularities"],
                                   meta=f"past {syn.past}, chunk {syn.chunk}, block {syn.block}, kv heads {kv} "
                                        f"of 8 (4 q heads each), head_dim 128, bf16")
    t2 = time.perf_counter()
    date = datetime.date.today().isoformat()
    c = model.config
    text_name = {"rust-book": "the Rust book (rustup's offline docs)",
                 "python-docs": "Python's language reference"}.get(args.text, args.text)
    meta = dict(device="CPU", date=date, model=f"{args.model} ({c.num_layers} layers, {c.num_q_heads} q / "
                f"{c.num_kv_heads} kv heads, head_dim {c.head_dim})", text=text_name, tokens=args.tokens,
                chunk=args.chunk, past=cap.past, block=args.block, sink=args.sink, window=args.window,
                layers=layers, layers_text=args.layers if args.layers != "all" else f"all {len(layers)}",
                capture_s=t1 - t0, analysis_s=t2 - t1, cpus=os.cpu_count())
    md = markdown(result, meta)
    rows = [dict(device="CPU", date=date, config=f"{p['granularity']} {p['rule']} {p['estimator']} {p['knob']}",
                 density=p["density"], recall_mean=p["recall_mean"], recall_p1=p["recall_p1"],
                 oracle_density=p["oracle_density"], ratio=p["ratio"]) for p in result["pooled"]["points"]]
    slim = dict(result)
    paths = table.write_tables(args.out, "frontier_real_cpu", rows, dict(meta), md + "\n", extra=dict(result=slim))
    log(f"wrote {paths['md']}, {paths['json']}")
    if plot(result, os.path.join(args.out, "frontier_real_cpu.png")):
        log(f"wrote {os.path.join(args.out, 'frontier_real_cpu.png')}")
    if args.benchmarks:
        update_benchmarks(args.benchmarks, md)
        log(f"updated the section '{SECTION}' of {args.benchmarks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
