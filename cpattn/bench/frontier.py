"""Recall against density for CompactAttention's selector and for the exact-mass oracle.

On the benchmark's structured prompt (``long_context_qkv``, seed 1, the same arguments as
``cpattn bench prefill``), for one chunk of ``n`` rows after ``P`` past tokens, this computes
the exact share of every (query head, row) on every past block and asks, per table
granularity (query heads per table x query rows per table):

* **oracle**: the best mean recall any selector can reach at a given density, i.e. the
  past blocks taken in decreasing order of their exact attention mass summed over the table's
  rows and heads (a sum objective, so the greedy order is optimal), pooled over all tables of
  all kv heads analysed;
* **alpha rule**: the FlashPrefill-style score threshold of the reference (``select_blocks``
  semantics: sink, window, Q-block union, group union) at a sweep of alphas.

Recall of a (head, row) = the chunk's own blocks' mass + the mass of the table's past blocks;
density = past blocks read / past blocks, averaged over (head, query block), as the benchmark
counts it. Prints a table, writes ``frontier.json`` and (with matplotlib) ``frontier.png``.

    python -m cpattn.bench.frontier [--past 8192] [--chunk 1024] [--block 64]
                                    [--kv-heads 0,1] [--out frontier_out]
    python -m cpattn.bench.frontier --benchmark-size --out bench   # bench/frontier.md

(``tools/selection_frontier.py`` runs the same.)

CPU only. The default is small (8K past, seconds); ``--benchmark-size`` builds the prefill
benchmark's 139K-token prompt (about 200 s and 2 GB; 128K x 4096 then takes about 20 s per kv
head on two cores). Nothing tracked is overwritten unless ``--out bench`` is given.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

from ..reference.checks import cdiv
from ..reference.dtypes import to_float32
from ..reference.workloads import long_context_qkv
from .prefill import PROMPT_LEN
from .table import markdown_table, write_tables

ALPHAS = (0.0, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.4)
# (query heads per table, query rows per table); rows None = the whole chunk
GRANULARITIES = ((4, None), (1, None), (4, 1024), (1, 1024), (1, 256), (1, 64))


SMALL = dict(past=8192, chunk=1024, kv_heads="0,1")  # seconds on a laptop
BENCHMARK = dict(past=131072, chunk=4096, kv_heads="0,1,2,3,4,5,6,7")  # bench/frontier.md


def granularities(n: int) -> list:
    """The table granularities for a chunk of ``n`` rows, each once: a row count >= n is the
    whole chunk, so (4, 1024) and (4, None) are the same table at n <= 1024 and are not
    computed, printed or stored twice."""
    out, seen = [], set()
    for heads, rows in GRANULARITIES:
        key = (heads, min(rows or n, n))
        if key not in seen:
            seen.add(key)
            out.append((heads, rows if rows is not None and rows < n else None))
    return out


LOG_BINS = np.linspace(-16, 0, 3201)  # log10 of a key's probability, for the token oracle


def exact_mass(q, k, P, c, scale, slab=256, token_hist=None, every=8):
    """q [n, G, D], k [P + n, D] float32 -> (past mass [G, n, Pb], own mass [G, n]).

    ``token_hist``: optional dict of float64 arrays ``count``, ``mass`` and ``own`` (len(LOG_BINS)+1
    bins / a scalar) that receive, for every ``every``-th row, the histogram of its past keys'
    probabilities (how many keys, how much mass per log10 bin) and its own blocks' mass."""
    n, G, _ = q.shape
    L, Pb = k.shape[0], P // c
    past = np.empty((G, n, Pb), np.float32)
    own = np.empty((G, n), np.float32)
    pos = np.arange(L)
    for g in range(G):
        for a in range(0, n, slab):
            rows = np.arange(a, min(n, a + slab))
            s = (q[rows, g] @ k.T) * np.float32(scale)
            s[pos[None, :] > (P + rows)[:, None]] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            past[g, rows] = np.add.reduceat(p[:, :P], np.arange(0, P, c), axis=1)
            own[g, rows] = p[:, P:].sum(axis=1)
            if token_hist is not None:
                sub = p[rows % every == 0]
                pp = sub[:, :P].ravel()
                b = np.searchsorted(LOG_BINS, np.log10(np.maximum(pp, 1e-30)))
                token_hist["count"] += np.bincount(b, minlength=len(LOG_BINS) + 1)
                token_hist["mass"] += np.bincount(b, weights=pp, minlength=len(LOG_BINS) + 1)
                token_hist["own"] += sub[:, P:].sum()
                token_hist["rows"] += len(sub)
    return past, own


def token_curve(hist, P):
    """Token-level oracle (no blocks, no tables; each row its own keys, budget pooled over rows):
    keys taken in decreasing probability -> (density of past keys, mean recall)."""
    cnt, mass = hist["count"][::-1], hist["mass"][::-1]  # most probable bin first
    dens = np.concatenate([[0], np.cumsum(cnt)]) / (hist["rows"] * P)
    rec = (hist["own"] + np.concatenate([[0], np.cumsum(mass)])) / hist["rows"]
    return dens, rec


def alpha_scores(q, kmean, c, scale):
    """The reference's block scores: q [n, G, D], kmean [Pb, D] -> s [G, Qb, Pb] (rows sum 1)."""
    z = np.einsum("ngd,jd->gnj", q, kmean) * np.float32(scale)
    e = np.exp(z - z.max(axis=2, keepdims=True))
    s = np.add.reduceat(e, np.arange(0, q.shape[0], c), axis=1)
    return s / s.sum(axis=2, keepdims=True)


def tables(mask_hqb, heads, rows_per_tile, c):
    """OR a per-(head, query block) mask [G, Qb, Pb] over tables of `heads` x `rows_per_tile`."""
    G, Qb, Pb = mask_hqb.shape
    tb = Qb if rows_per_tile is None else rows_per_tile // c
    T = cdiv(Qb, tb)
    pad = np.zeros((G, T * tb, Pb), bool)
    pad[:, :Qb] = mask_hqb
    m = pad.reshape(G // heads, heads, T, tb, Pb).any(axis=(1, 3))  # [G/heads, T, Pb]
    return np.broadcast_to(m[:, None, :, None], (G // heads, heads, T, tb, Pb)).reshape(G, T * tb, Pb)[:, :Qb]


def recall_of(mask_hqb, past, own, c):
    """Per-(head, row) recall of a per-(head, query block) mask."""
    per_row = np.repeat(mask_hqb, c, axis=1)[:, : past.shape[1]]  # [G, n, Pb]
    return own + (past * per_row).sum(axis=2)


def oracle_parts(past, own, heads, rows_per_tile, c, forced):
    """One kv head's share of the greedy exact-mass frontier: a dict of the recall mass every
    (table, past block) candidate adds (`gain`), the density triples it costs (`cost`), and the
    totals that do not depend on the choice (own and forced blocks, rows, triples)."""
    G, n, Pb = past.shape
    r = n if rows_per_tile is None else rows_per_tile
    T = cdiv(n, r)
    pad = np.zeros((G, T * r, Pb), np.float64)
    pad[:, :n] = past
    tot = pad.reshape(G // heads, heads, T, r, Pb).sum(axis=(1, 3))  # [tables, T, Pb] mass summed
    rows_in = np.minimum(r, n - np.arange(T) * r)  # rows per tile
    free = tot[..., ~forced]  # candidates
    # every candidate costs heads x (query blocks of its tile) triples of density
    qb_in = cdiv(rows_in, c)
    cost = np.broadcast_to((heads * qb_in)[None, :, None], free.shape).ravel()
    return dict(gain=free.ravel(), cost=cost, base=own.sum() + tot[..., forced].sum(), rows=G * n,
                triples=G * cdiv(n, c) * Pb, forced=G * cdiv(n, c) * forced.sum())


def pooled_curve(parts):
    """(density, mean recall) at every budget, candidates of all parts (kv heads) pooled: the
    best mean recall any selection with these tables reaches at each density."""
    gain = np.concatenate([p["gain"] for p in parts])
    cost = np.concatenate([p["cost"] for p in parts])
    order = np.argsort(-gain / cost, kind="stable")
    triples, rows = sum(p["triples"] for p in parts), sum(p["rows"] for p in parts)
    dens = (sum(p["forced"] for p in parts) + np.concatenate([[0], np.cumsum(cost[order])])) / triples
    rec = (sum(p["base"] for p in parts) + np.concatenate([[0], np.cumsum(gain[order])])) / rows
    return dens, rec


def oracle_curve(past, own, heads, rows_per_tile, c, forced):
    """Greedy exact-mass frontier of one kv head: (density, mean recall) at every budget."""
    return pooled_curve([oracle_parts(past, own, heads, rows_per_tile, c, forced)])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cpattn.bench.frontier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--past", type=int, default=None, help=f"past tokens (default {SMALL['past']}; "
                    f"--benchmark-size: {BENCHMARK['past']})")
    ap.add_argument("--chunk", type=int, default=None, help=f"rows of the chunk (default {SMALL['chunk']}; "
                    f"--benchmark-size: {BENCHMARK['chunk']})")
    ap.add_argument("--block", type=int, default=64, help="block = chunk size of the cache (default 64)")
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="prompt length generated (default past + chunk; --benchmark-size: the prefill "
                         f"benchmark's {PROMPT_LEN}, so the data are the benchmark's)")
    ap.add_argument("--kv-heads", default=None, help=f"kv heads analysed (default {SMALL['kv_heads']}; "
                    f"--benchmark-size: {BENCHMARK['kv_heads']})")
    ap.add_argument("--benchmark-size", action="store_true",
                    help="the sizes of bench/frontier.md: the 139K-token benchmark prompt, past 131072, chunk "
                         "4096, all 8 kv heads (minutes and about 2 GB)")
    ap.add_argument("--sink", type=int, default=2, help="sink blocks (default 2)")
    ap.add_argument("--window", type=int, default=4, help="window blocks (default 4)")
    ap.add_argument("--out", default="frontier_out",
                    help="directory of frontier.md/.csv/.json/.png (default frontier_out; the tracked results "
                         "live in bench/, pass --out bench to replace them)")
    args = ap.parse_args(argv)
    size = BENCHMARK if args.benchmark_size else SMALL
    P = size["past"] if args.past is None else args.past
    n = size["chunk"] if args.chunk is None else args.chunk
    c = args.block
    prompt_len = args.prompt_len or (PROMPT_LEN if args.benchmark_size else P + n)
    args.kv_heads = args.kv_heads or size["kv_heads"]
    args.prompt_len = prompt_len
    Hq, Hkv, D = 32, 8, 128
    G = Hq // Hkv
    scale = 1.0 / np.sqrt(D)
    t0 = time.time()
    w = long_context_qkv(1, max(args.prompt_len, P + n), Hq, Hkv, D, dtype="bfloat16", needle_len=64,
                         num_needles=16, needle_queries=16, locality_len=512)
    print(f"workload generated in {time.time() - t0:.0f}s", flush=True)
    Pb = P // c
    j = np.arange(Pb)
    forced = (j < args.sink) | (j >= Pb - args.window)
    kvh = [int(x) for x in args.kv_heads.split(",")]
    grans = granularities(n)
    curves = {str(g): [] for g in grans}
    hist = dict(count=np.zeros(len(LOG_BINS) + 1), mass=np.zeros(len(LOG_BINS) + 1), own=0.0, rows=0)
    alpha_pts = {str(g): {a: [] for a in ALPHAS} for g in grans}
    for i, h in enumerate(kvh):
        t1 = time.time()
        q = to_float32(w.q[0, P:P + n, h * G:(h + 1) * G], "bfloat16")
        k = to_float32(w.k[0, :P + n, h], "bfloat16")
        past, own = exact_mass(q, k, P, c, scale, token_hist=hist)
        kmean = k[:P].reshape(Pb, c, D).mean(axis=1)
        s = alpha_scores(q, kmean, c, scale)
        for gran in grans:
            heads, rows = gran
            curves[str(gran)].append(oracle_parts(past, own, heads, rows, c, forced))
            for a in ALPHAS:
                keep = (s >= np.float32(a) * s.max(axis=2, keepdims=True)) | forced
                m = tables(keep, heads, rows, c)
                rec = recall_of(m, past, own, c)
                alpha_pts[str(gran)][a].append((m.mean(), rec.mean(), rec.min(), rec.size))
        print(f"kv head {h} ({i + 1}/{len(kvh)}) in {time.time() - t1:.0f}s", flush=True)

    # pool the kv heads: the oracle curve at a common density grid, the alpha points averaged
    grid = np.linspace(0, 1, 1001)
    result = {"past": P, "chunk": n, "block": c, "kv_heads": kvh, "granularities": {}}
    targets = (0.95, 0.98, 0.99, 0.995)
    print(f"\npast {P}, chunk {n}, block {c}, kv heads {kvh}")
    print("table = heads x rows | oracle density at mean recall " + " / ".join(map(str, targets))
          + " | alpha rule: alpha -> density, mean recall, min recall")
    for gran in grans:
        key = str(gran)
        d_all, r_all = pooled_curve(curves[key])
        rec_grid = np.interp(grid, d_all, r_all)
        need = [float(grid[np.argmax(rec_grid >= t)]) if (rec_grid >= t).any() else 1.0 for t in targets]
        pts = []
        for a in ALPHAS:
            arr = np.array(alpha_pts[key][a])
            pts.append(dict(alpha=a, density=float(arr[:, 0].mean()), recall_mean=float(arr[:, 1].mean()),
                            recall_min=float(arr[:, 2].min())))
        heads, rows = gran
        name = f"{heads} x {rows or n}"
        result["granularities"][name] = dict(oracle_density=grid[::10].tolist(), oracle_recall=rec_grid[::10].tolist(),
                                             oracle_need=dict(zip(map(str, targets), need)), alpha=pts)
        print(f"{name:>12} | " + " / ".join(f"{x:.3f}" for x in need) + " | "
              + ", ".join(f"{p['alpha']}: {p['density']:.3f} {p['recall_mean']:.4f} {p['recall_min']:.3f}"
                          for p in pts if p["alpha"] in (0.02, 0.06, 0.2)))
    td, tr = token_curve(hist, P)
    tneed = [float(td[np.argmax(tr >= t)]) if (tr >= t).any() else 1.0 for t in targets]
    result["token_oracle"] = dict(need=dict(zip(map(str, targets), tneed)), rows=int(hist["rows"]),
                                  density=grid[::10].tolist(), recall=np.interp(grid[::10], td, tr).tolist())
    print(f"{'token oracle':>12} | " + " / ".join(f"{x:.3f}" for x in tneed) + f" ({hist['rows']} sampled rows)")
    date = datetime.date.today().isoformat()
    lines = []
    for name, gr in result["granularities"].items():
        pts = {p["alpha"]: p for p in gr["alpha"]}
        lines.append([name, " / ".join(f"{x:.3f}" for x in gr["oracle_need"].values())]
                     + [f"{pts[a]['density']:.3f}, {pts[a]['recall_mean']:.4f} / {pts[a]['recall_min']:.3f}"
                        for a in (0.02, 0.06, 0.2)])
    lines.append(["token oracle (each row its own keys, no blocks)", " / ".join(f"{x:.3f}" for x in tneed),
                  f"({hist['rows']} sampled rows)", "", ""])
    md = [f"## Selection frontier: how sparse can a block selection be? (CPU, {date})", "",
          f"The prompt (`long_context_qkv`, seed 1, the prefill benchmark's with --benchmark-size; {max(args.prompt_len, P + n)} tokens), past {P}, "
          f"chunk {n}, block {c}, kv heads {kvh} (query heads {G} each), float32 exact masses. "
          "**Oracle**: past blocks taken by exact attention mass summed over each table's heads and rows "
          "(the best any selector with those tables can do); **alpha rule**: the FlashPrefill-style threshold "
          "with sink 2, window 4 and both unions. Generated by `python -m cpattn.bench.frontier`.", ""]
    md += markdown_table(["table (heads x rows)", "oracle density for mean recall 0.95 / 0.98 / 0.99 / 0.995",
                          "alpha 0.02: density, recall mean / min", "alpha 0.06", "alpha 0.2"], lines)
    rows = [dict(device="CPU", date=date, config=f"table {name}", **{f"oracle_need_{k}": v for k, v in
                                                                     gr["oracle_need"].items()})
            for name, gr in result["granularities"].items()]
    paths = write_tables(args.out, "frontier", rows, dict(device="CPU", date=date), "\n".join(md) + "\n",
                         extra=result)
    print(f"wrote {paths['json']}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, gr) in enumerate(result["granularities"].items()):
        col = f"C{i}"
        ax.plot(gr["oracle_density"], gr["oracle_recall"], color=col, label=f"oracle {name}")
        ax.plot([p["density"] for p in gr["alpha"]], [p["recall_mean"] for p in gr["alpha"]], "o--", color=col,
                ms=3, label=f"alpha rule {name}")
    ax.plot(result["token_oracle"]["density"], result["token_oracle"]["recall"], "k:", label="token oracle")
    ax.set_xlabel("density (past blocks read)")
    ax.set_ylabel("mean attention-mass recall")
    ax.set_ylim(0.9, 1.001)
    ax.set_xlim(0, 1)
    ax.axhline(0.99, color="grey", lw=0.5)
    ax.set_title(f"selection frontier: past {P}, chunk {n}, block {c}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "frontier.png"), dpi=120)
    plt.close(fig)
    print(f"wrote {os.path.join(args.out, 'frontier.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
