"""Markdown table of two runs of the decode benchmark side by side (the same configs).

    python tools/compare_bench.py BEFORE.json AFTER.json --labels "before" "after" [--out FILE]

Rows are matched by config; the ratio is after / before of our graph-replay time. Used to check
that a change (e.g. the re-layout of issue 12) leaves the kernels' speed within noise.
"""
from __future__ import annotations

import argparse
import json
import sys


def config(r: dict) -> str:
    return r.get("config") or f"{r['layout']} batch {r['batch']} shared {r['shared']} own {r['own']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="JSON written by tools/bench_decode.py")
    ap.add_argument("after", help="JSON written by tools/bench_decode.py")
    ap.add_argument("--labels", nargs=2, default=["before", "after"], help="column names (default: before after)")
    ap.add_argument("--out", help="write the table here too")
    a = ap.parse_args(argv)
    runs = [json.load(open(p)) for p in (a.before, a.after)]
    rows = [{config(r): r for r in run["rows"]} for run in runs]
    common = [k for k in rows[0] if k in rows[1]]
    if not common:
        print("no config is in both runs", file=sys.stderr)
        return 1
    b, c = a.labels
    lines = [f"Decode benchmark, {runs[0]['device']}: {b} ({a.before}) vs {c} ({a.after}); ours = graph replay, us.", "",
             f"| config | ours {b} | ours {c} | {c} / {b} | cuDNN {b} | cuDNN {c} |", "|---|---|---|---|---|---|"]
    ratios = []
    for k in common:
        x, y = rows[0][k], rows[1][k]
        ratios.append(y["ours_graph_us"] / x["ours_graph_us"])
        lines.append(f"| {k} | {x['ours_graph_us']:.1f} | {y['ours_graph_us']:.1f} | {ratios[-1]:.3f} | "
                     f"{x['sdpa_cudnn_us']:.1f} | {y['sdpa_cudnn_us']:.1f} |")
    lines += ["", f"{c} / {b}: {min(ratios):.3f} to {max(ratios):.3f} (median {sorted(ratios)[len(ratios) // 2]:.3f}); "
              f"plan() for 256 sequences {runs[0]['plan_full_ms']:.2f} ms vs {runs[1]['plan_full_ms']:.2f} ms "
              f"(build_decode_plan {runs[0]['plan_build_ms']:.2f} vs {runs[1]['plan_build_ms']:.2f} ms)."]
    text = "\n".join(lines)
    print(text)
    if a.out:
        open(a.out, "w").write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
