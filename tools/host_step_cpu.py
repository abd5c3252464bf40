#!/usr/bin/env python3
"""Host time of the graphed decode step on the CPU: ``GraphedDecoder.step``'s own host work
(checks, the batch's reserve, the upload decision and uploads, the length table, the commits)
on the emulated backend, for a batch of sequences that share a prompt.

The graph's replay here is the emulation's (NumPy, much slower than a GPU), so the launch call
is not a host cost worth reporting; the run is done twice: with the emulated replay (the
caches cold from it between steps, as after a real step's wait) and with the replay left out
(the tokens then stay the same: the host logic is the same). Writes
``host_step_cpu.{json,md}`` under ``--out``.

    python tools/host_step_cpu.py [--batch 256 --chunk 64 --steps 200 --out bench]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import numpy as np

PARTS = ("check", "reserve", "upload", "lens", "commit")


def run(batch: int, chunk: int, steps: int, replay: bool, same_length: bool) -> dict:
    import cpattn.serving.llama as llama
    from cpattn.testing import fake_cupy
    from cpattn.testing.backends import get_backend
    from cpattn.testing.models import random_llama

    with get_backend("emulated") as be:
        import cupy

        from cpattn.serving.graphed import GraphedDecoder

        from cpattn.chunk_attention import ChunkAttentionDecode

        api, saved = be.api, llama.attention_api  # the GPU decoder itself, its kernels emulated
        llama.attention_api = lambda: (ChunkAttentionDecode, api.BlockMeans, api.compact_prefill)
        launch = fake_cupy.FakeGraph.launch
        try:
            model = random_llama(0, cupy, vocab=96, hidden=32, inter=48, layers=1, hq=4, hkv=2, d=8)
            cache = model.new_cache(batch * (steps // chunk + 3) + 8, chunk_size=chunk, max_sequences=batch + 1)
            attn = llama.CacheAttention(cache, model.config.num_q_heads)
            rng = np.random.default_rng(0)
            doc = rng.integers(0, 96, 4 * chunk).tolist()
            seqs = []
            for _ in range(batch):  # a shared document and an own question of 1 .. chunk-1 tokens (or all 5)
                p = doc + rng.integers(0, 96, 5 if same_length else int(rng.integers(1, chunk))).tolist()
                s = cache.add_sequence(p, max_match=len(p) - 1)
                model.prefill(attn, s, p[cache.seq_len(s):], chunk_tokens=chunk)
                seqs.append(s)
            dec = GraphedDecoder(model, attn)
            nxt = np.zeros(batch, np.int64)
            nxt = dec.step(seqs, nxt)  # the first step: plan, capture
            if not replay:
                fake_cupy.FakeGraph.launch = lambda self, stream=None: None
            dec.times = type(dec.times)()
            for _ in range(steps):
                nxt = dec.step(seqs, nxt)  # the array it returned: the steady path
        finally:
            fake_cupy.FakeGraph.launch = launch
            llama.attention_api = saved
    t = dec.times
    steady = [i for i, c in enumerate(t.capture) if c == 0]
    part = dict(check=t.check, reserve=t.reserve, upload=t.upload, lens=t.plan, commit=t.commit)
    med = {k: float(np.median([v[i] for i in steady])) * 1e6 if steady else None for k, v in part.items()}
    total = [sum(part[k][i] for k in PARTS) for i in steady]
    new = [i for i, c in enumerate(t.capture) if c > 0]
    return dict(replay=replay, same_length=same_length, steps=steps, replayed_steps=len(steady), replans=t.replans,
                fresh_steps=int(sum(t.fresh)), parts_us=med,
                host_us=float(np.median(total)) * 1e6 if steady else None,
                host_us_p90=float(np.percentile(total, 90)) * 1e6 if steady else None,
                plan_ms=float(np.median([t.plan[i] for i in new])) * 1e3 if new else None)


def markdown(r: dict) -> str:
    f = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
    rows = [f"| {'all 5 tokens' if x['same_length'] else '1 to chunk-1 tokens'} | "
            f"{'emulated replay' if x['replay'] else 'replay left out'} | {x['replayed_steps']} of {x['steps']} | "
            f"{x['fresh_steps']} | " + " | ".join(f(x['parts_us'][k]) for k in PARTS)
            + f" | {f(x['host_us'])} | {f(x['host_us_p90'])} |" for x in r["runs"]]
    return "\n".join([
        f"## Host time of the graphed decode step, on the CPU ({r['cpu']}, {r['date']})", "",
        f"`GraphedDecoder.step` on the emulated backend (tools/host_step_cpu.py), {r['batch']} sequences sharing a "
        f"{4 * r['chunk']}-token prompt, chunk {r['chunk']}, each step fed the array the last one returned; median "
        "us per step without a recapture, by part; the launch call is left out (the emulation's replay is NumPy). "
        "fresh = steps that found the device state advanced by the last step and uploaded nothing. A CPU number: "
        "on the GPU the upload copies, the launch call and the device's own CPU add to it.", "",
        "| questions | run | steps without recapture | fresh | check | reserve | upload | plan or length table | commit | "
        "host | p90 |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "With questions of independent lengths some sequence starts a chunk on almost every step (about "
        f"batch / chunk = {r['batch'] / r['chunk']:g} a step), and every such step rebuilds the plan and captures "
        "the graph again: the steady path needs lengths that cross chunk boundaries together, until the plan "
        "survives a new chunk.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="bench")
    a = ap.parse_args()
    r = dict(date=datetime.date.today().isoformat(), cpu=f"{platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores", batch=a.batch, chunk=a.chunk,
             runs=[run(a.batch, a.chunk, a.steps, replay, same) for same in (True, False) for replay in (True, False)])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "host_step_cpu.json"), "w") as f:
        json.dump(r, f, indent=1)
    md = markdown(r)
    with open(os.path.join(a.out, "host_step_cpu.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
