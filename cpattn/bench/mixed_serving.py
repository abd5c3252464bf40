#!/usr/bin/env python3
"""Mixed-step serving of the real model under Poisson arrivals: cpattn vs transformers, same run.

The workload is ``model_serving.workload``: ``--requests`` requests share one real document
(``--doc-tokens`` tokens of the Python language reference) as their system prompt, each with its
own question, and generate ``--new-tokens`` tokens greedily (no early stop). They arrive as a
Poisson process in wall-clock time (``--rate`` requests per second, exponential gaps drawn from
``--seed``, the first at t = 0; ``cpattn.serving.workloads.arrival_times``), and both systems serve the same trace:

  cpattn        ``Server(step_tokens=--step-tokens)`` with ``MixedStepBackend`` (SmolLM2-135M,
                float16 storage; CuPy: decode rows one CUDA graph through ``GraphedDecoder``,
                prefill pieces one ``BatchedPrefill`` per layer; NumPy: the reference). Each step
                mixes decode tokens of running requests with prefill pieces of arrived ones;
                ``run(poll=...)`` submits every request whose arrival time has passed at the start
                of each step and sleeps until the next arrival when nothing is live.
  transformers  the same GGUF in ``AutoModelForCausalLM`` (SDPA; float16 on CUDA, float32 on a
                CPU), served as a user of ``generate`` would: static batches, each formed from the
                requests that have arrived when the previous batch finished, one left-padded
                batched ``generate`` of ``--new-tokens`` greedy tokens (no early stop). Also the
                ideal case for reference: every request at t = 0 in one ``generate``.

Measured per request: arrival, first token (time to first token = first token - arrival, the
queueing included), finish; over the run: throughput (generated tokens / makespan, the makespan
from the first arrival to the last token), TTFT median / p90 / max, steps, preemptions, and token
agreement (``model_serving.agreement``: first differing position) of cpattn with lone runs
(``--lone-checks`` requests, each alone in its own cache) and with transformers. Timestamps are
taken after a device sync (cpattn: ``backend.sync()`` in the server's ``on_step`` hook, which
sees the step's tokens already appended; transformers: its streamer gets host copies).
Writes ``mixed_serving_<device>.{md,csv,json,png}`` under ``--out``.

    python -m cpattn.bench.mixed_serving --out bench [--requests 64 --doc-tokens 2048 --new-tokens 64 --rate 4]

Tiny CPU run (NumPy reference, CI): ``--requests 3 --new-tokens 3 --doc-tokens 64 --skip-hf``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

from ..cli import int_option, real_option
from ..reference.checks import cdiv
from ..serving.workloads import arrival_times
from . import progress
from .model_serving import agreement, workload
from .table import fmt, markdown_table, replot_json, summary, write_tables


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cpattn.bench.mixed_serving", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="model name (fetched on first use) or a .gguf path")
    ap.add_argument("--out", default="bench_out", help="directory of the table, CSV, JSON and PNG")
    ap.add_argument("--requests", type=int_option(1), default=64, metavar="N")
    ap.add_argument("--rate", type=real_option(0.0, lo_open=True), default=4.0, metavar="R",
                    help="Poisson arrival rate, requests per second (wall clock)")
    ap.add_argument("--seed", type=int_option(0), default=0, metavar="N", help="seed of the arrival trace")
    ap.add_argument("--doc-tokens", type=int_option(1), default=2048, metavar="N",
                    help="tokens of the shared document")
    ap.add_argument("--new-tokens", type=int_option(1), default=64, metavar="N", help="tokens each request generates")
    ap.add_argument("--chunk-size", type=int_option(1, 128), default=64, metavar="C")
    ap.add_argument("--prefill-chunk", type=int_option(1), default=512, metavar="N",
                    help="most tokens of one request's prefill piece in a step (a multiple of --chunk-size)")
    ap.add_argument("--step-tokens", type=int_option(1), default=512, metavar="N",
                    help="token budget of a mixed step (decode + prefill tokens), >= --chunk-size")
    ap.add_argument("--pool-chunks", type=int_option(0), default=0, metavar="N",
                    help="cpattn pool size in chunks; 0 (default): room for every request at once")
    ap.add_argument("--lone-checks", type=int_option(0), default=4, metavar="N",
                    help="requests also run alone (own cache) to compare tokens with; 0: none")
    ap.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto",
                    help="cpattn backend: auto is CuPy when a GPU is visible, else the NumPy reference")
    ap.add_argument("--skip-hf", action="store_true", help="cpattn only (no transformers run)")
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="only draw the plot again from a JSON this benchmark wrote (PNG next to it); no model")
    a = ap.parse_args(argv)
    if a.prefill_chunk % a.chunk_size or a.prefill_chunk < a.chunk_size:
        ap.error(f"argument --prefill-chunk: expected a positive multiple of --chunk-size {a.chunk_size}, "
                 f"got {a.prefill_chunk}")
    if a.step_tokens < a.chunk_size:
        ap.error(f"argument --step-tokens: expected an integer >= --chunk-size {a.chunk_size}, got {a.step_tokens}")
    return a


def quantiles(xs) -> dict:
    """Median, p90 and max of a list of seconds (NaN when empty)."""
    if not len(xs):
        return dict(median=float("nan"), p90=float("nan"), max=float("nan"))
    x = np.asarray(xs, np.float64)
    return dict(median=float(np.median(x)), p90=float(np.percentile(x, 90)), max=float(x.max()))


def pool_chunks(prompts: list, new_tokens: int, chunk_size: int) -> int:
    """Chunks for every request at once: the shared prefix's whole chunks once, then each
    request's own tokens, its generated tokens and a partial chunk (no preemption needed)."""
    shared = 0
    for col in zip(*prompts):
        if any(t != col[0] for t in col):
            break
        shared += 1
    base = shared // chunk_size * chunk_size
    return cdiv(base, chunk_size) + sum(cdiv(len(p) - base + new_tokens, chunk_size) + 1 for p in prompts) + 2


def trace_summary(arrival: list, first: list, finish: list, tokens: list, t_start: float = 0.0) -> dict:
    """Numbers of one served trace (seconds from the first arrival): throughput over the
    makespan, TTFT quantiles, the makespan itself."""
    ttft = [f - a for f, a in zip(first, arrival)]
    makespan = max(finish) - t_start
    total = sum(len(t) for t in tokens)
    q = quantiles(ttft)
    return dict(tokens=total, makespan_s=makespan, tok_s=total / max(makespan, 1e-9), ttft_median_s=q["median"],
                ttft_p90_s=q["p90"], ttft_max_s=q["max"], ttft=ttft)


# ============================================================================ cpattn
def run_cpattn(args, model, prompts, arrivals, label="cpattn") -> dict:
    """Serve the trace through ``Server(step_tokens=...)`` with ``MixedStepBackend``; per request
    arrival / first-token / finish times (seconds since the first arrival) and tokens."""
    from ..serving.llama import MixedStepBackend
    from ..serving.server import Server

    c, n = args.chunk_size, len(prompts)
    pool = args.pool_chunks or pool_chunks(prompts, args.new_tokens, c)
    cache = model.new_cache(pool, chunk_size=c, max_sequences=n + 1)
    backend = MixedStepBackend(model, cache, graph="auto")
    first, finish, submitted, curve = [None] * n, [None] * n, [None] * n, []
    seen = [0] * n
    by_rid = {}
    state = dict(next=0, t0=None, done=0)

    def now() -> float:
        return time.perf_counter() - state["t0"]

    def on_step(kind, seconds, requests):  # after the step's sync; its tokens are already appended
        backend.sync()
        t = now()
        for r in requests:
            i = by_rid[r.rid]
            if len(r.output) > seen[i]:
                seen[i] = len(r.output)
                if first[i] is None:
                    first[i] = t
                if len(r.output) >= r.max_new_tokens and finish[i] is None:
                    finish[i] = t
                    state["done"] += 1
                    progress(state["done"], n, f"{label}: requests finished")
        curve.append((t, sum(seen)))

    server = Server(model, pool, chunk_size=c, prefill_chunk=args.prefill_chunk, backend=backend,
                    step_tokens=args.step_tokens, max_batch=max(1, n), on_step=on_step)

    def poll(srv) -> bool:
        """Submit what has arrived; with nothing live, sleep until the next arrival first."""
        k = state["next"]
        if k < n and all(r.state == "finished" for r in srv.requests):
            wait = arrivals[k] - now()
            if wait > 0:
                time.sleep(wait)
        t = now()
        while state["next"] < n and arrivals[state["next"]] <= t:
            i = state["next"]
            r = srv.submit(prompts[i], args.new_tokens)
            by_rid[r.rid] = i
            submitted[i] = t
            state["next"] += 1
        return state["next"] < n

    backend.sync()
    state["t0"] = time.perf_counter()
    rep = server.run(poll=poll)
    tokens = [None] * n
    for r in server.requests:
        tokens[by_rid[r.rid]] = list(r.output)
    out = trace_summary(arrivals, first, finish, tokens)
    out.update(label=backend.label, arrival_s=list(arrivals), submitted_s=submitted, first_token_s=first,
               finish_s=finish, tokens_out=tokens, curve=curve, steps=len(rep.step_s), preemptions=rep.preemptions,
               recomputed=rep.recomputed, step_ms_median=1e3 * float(np.median(rep.step_s)) if rep.step_s else 0.0,
               step_tokens_mean=float(np.mean(rep.step_tokens)) if rep.step_tokens else 0.0,
               prefill_reused=rep.prefill_reused, prefill_computed=rep.prefill_computed, pool_chunks=pool,
               captures=getattr(backend, "captures", 0), unfinished=sum(r.state != "finished" for r in server.requests))
    return out


def lone_tokens(model, prompts: list, new_tokens: int, chunk_size: int, prefill_chunk: int) -> list:
    """Each prompt alone (its own cache, prefill then decode; greedy, no early stop)."""
    from ..serving.llama import CacheAttention

    out = []
    for i, p in enumerate(prompts):
        cache = model.new_cache(cdiv(len(p) + new_tokens, chunk_size) + 2, chunk_size=chunk_size, max_sequences=2)
        attn = CacheAttention(cache, model.config.num_q_heads)
        seq = cache.add_sequence([])
        logits = model.prefill(attn, seq, p, chunk_tokens=prefill_chunk)
        toks = []
        while True:
            row = logits.reshape(-1, logits.shape[-1])[-1]
            toks.append(int(row.argmax().get() if hasattr(row, "get") else row.argmax()))
            if len(toks) == new_tokens:
                break
            logits = model.decode(attn, [seq], [toks[-1]])
        out.append(toks)
        progress(i + 1, len(prompts), "lone runs (token check)")
    return out


# ============================================================================ transformers
class _Stamps:
    """A ``generate`` streamer: host time (seconds since ``t0``) of every generated step; the
    first ``put`` is the prompt and is skipped. Tokens arrive as host tensors (the device synced)."""

    def __init__(self, clock):
        self.clock, self.times, self.prompt_seen = clock, [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(self.clock())

    def end(self):
        pass


def run_hf(args, path, prompts, arrivals, pad_id: int) -> dict:
    """transformers on the same trace (static batches), then the ideal one-batch reference."""
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    folder, name = os.path.split(str(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    model.generation_config.eos_token_id = None  # every request runs all steps, as on our side
    model.generation_config.pad_token_id = pad_id

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def generate(batch: list, clock, new_tokens: int = args.new_tokens) -> tuple:
        L = max(map(len, batch))
        ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding: every prompt ends at the last column
            ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
        stamps = _Stamps(clock)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new_tokens,
                                 do_sample=False, streamer=stamps)
        sync()
        return out[:, L:].tolist(), stamps.times

    t_warm = time.perf_counter()
    generate(prompts[:4], time.perf_counter, 2)  # warm-up (kernels, allocator): the first prompts, 2 tokens
    warm_s = time.perf_counter() - t_warm
    n = len(prompts)
    first, finish, tokens, batches, curve = [None] * n, [None] * n, [None] * n, [], []
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    done = 0
    while done < n:
        wait = arrivals[done] - clock()
        if wait > 0:
            time.sleep(wait)
        t = clock()
        members = [i for i in range(done, n) if arrivals[i] <= t]
        outs, times = generate([prompts[i] for i in members], clock)
        base = curve[-1][1] if curve else 0
        curve += [(s, base + (k + 1) * len(members)) for k, s in enumerate(times)]
        for i, o in zip(members, outs):
            tokens[i], first[i], finish[i] = o, times[0], times[-1]
        batches.append(dict(start_s=t, size=len(members), end_s=times[-1]))
        done += len(members)
        progress(done, n, f"transformers: requests finished ({len(batches)} batches)")
    out = trace_summary(arrivals, first, finish, tokens)
    out.update(first_token_s=first, finish_s=finish, tokens_out=tokens, curve=curve, batches=batches,
               steps=len(batches) * args.new_tokens, device=dev, dtype=str(dtype).replace("torch.", ""),
               warmup_s=warm_s)
    # the ideal case: every request at t = 0, one batched generate
    t1 = time.perf_counter()
    ideal_tokens, times = generate(prompts, lambda: time.perf_counter() - t1)
    ideal = trace_summary([0.0] * n, [times[0]] * n, [times[-1]] * n, ideal_tokens)
    ideal.update(tokens_out=ideal_tokens, curve=[(s, (k + 1) * n) for k, s in enumerate(times)])
    out["ideal"] = ideal
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


# ============================================================================ report
ROW_METRICS = (  # (metric, key, higher is better)
    ("throughput (generated tokens/s over the makespan)", "tok_s", True),
    ("time to first token, median (s)", "ttft_median_s", False),
    ("time to first token, p90 (s)", "ttft_p90_s", False),
    ("time to first token, max (s)", "ttft_max_s", False),
    ("makespan (s)", "makespan_s", False),
)


def rows_of(meta: dict, ours: dict, hf: dict) -> list:
    """One row per metric: ours (cpattn), peer (transformers, static batches), ratio (above 1:
    cpattn is better), hf_ideal (all requests at t = 0 in one generate)."""
    rows = []
    for metric, key, higher in ROW_METRICS:
        peer = hf.get(key) if hf else None
        r = summary(meta["device"], meta["date"], meta["config"], ours[key], peer)
        if peer is not None and ours[key]:
            r["ratio"] = ours[key] / peer if higher else peer / ours[key]
        r.update(metric=metric, hf_ideal=(hf.get("ideal") or {}).get(key) if hf else None)
        rows.append(r)
    return rows


def section(meta: dict, ours: dict, hf: dict, agree: dict) -> str:
    ideal = hf.get("ideal") if hf else None
    lines = [f"## Mixed-step serving under Poisson arrivals: SmolLM2-135M, cpattn vs transformers "
             f"({meta['device']}, {meta['date']})", "",
             f"{meta['requests']} requests share a {meta['doc_tokens']}-token real document (the Python language "
             f"reference) as system prompt, each with its own question, {meta['new_tokens']} greedy tokens each "
             f"(no early stop); they arrive as a Poisson process of {meta['rate']:g} requests/s (seed {meta['seed']}, "
             f"the last at {meta['last_arrival_s']:.2f} s). cpattn ({ours['label']}): mixed steps of at most "
             f"{meta['step_tokens']} tokens (prefill pieces of at most {meta['prefill_chunk']}, chunk "
             f"{meta['chunk_size']}, pool {ours['pool_chunks']} chunks), requests submitted as they arrive. "
             f"transformers {meta['transformers']} ({hf.get('dtype', 'n/a')}, SDPA): static batches, each the "
             "requests that arrived while the previous one ran, one left-padded batched `generate`; TTFT includes "
             "the queueing on both sides. Generated by `python -m cpattn.bench.mixed_serving`.", ""]
    cells = []
    for metric, key, higher in ROW_METRICS:
        spec = "{:.0f}" if key == "tok_s" else "{:.3f}"
        ratio = "n/a"
        if hf and hf.get(key) and ours[key]:
            ratio = fmt(ours[key] / hf[key] if higher else hf[key] / ours[key], "{:.2f}x")
        cells.append([metric, fmt(ours[key], spec), fmt(hf.get(key) if hf else None, spec), ratio,
                      fmt(ideal.get(key) if ideal else None, spec)])
    cells.append(["steps (cpattn: mixed steps; transformers: batches x new tokens)", ours["steps"],
                  f"{hf['steps']} ({len(hf['batches'])} batches)" if hf else "n/a", "",
                  meta["new_tokens"] if ideal else "n/a"])
    cells.append(["preemptions (K/V rows recomputed)", f"{ours['preemptions']} ({ours['recomputed']})", "", "", ""])
    cells.append(["prompt tokens computed / reused", f"{ours['prefill_computed']} / {ours['prefill_reused']}",
                  f"{meta['prompt_tokens']} / 0" if hf else "n/a", "", ""])
    lines += markdown_table(["", "cpattn (mixed steps)", "transformers (static batches)",
                             "cpattn better by", "transformers, all at t = 0 (reference)"], cells) + [""]
    lines.append(f"cpattn: median step {ours['step_ms_median']:.2f} ms, {ours['step_tokens_mean']:.1f} tokens per step"
                 + (f", {ours['captures']} decode graph captures" if ours["captures"] else "") + ".")
    said = []
    for key, who in (("lone", "lone runs of cpattn (each request alone in its own cache)"),
                     ("hf", "transformers, static batches"), ("hf_ideal", "transformers, one batch")):
        a = agree.get(key)
        if a:
            where = ("no difference" if a["agree_first_n"] == a["requests"] else
                     f"the earliest difference at token {a['first_diff_min']}")
            said.append(f"vs {who}: {a['agree_first_n']} of {a['requests']} requests identical on all "
                        f"{meta['agree_tokens']} tokens, {where} ({100 * a['tokens_equal']:.1f}% of tokens equal)")
    if said:
        lines += ["", "Greedy tokens of cpattn " + "; ".join(said) + "."]
    return "\n".join(lines) + "\n"


def plot(d: dict, path: str) -> None:
    """Two panels from the benchmark's JSON: TTFT per request against its arrival (both systems),
    and generated tokens over time (both systems, and transformers' one-batch reference)."""
    from . import pyplot

    plt = pyplot()
    if plt is None:
        return
    ours, hf = d["cpattn"], d.get("transformers") or {}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11.5, 4.3))
    a.plot(ours["arrival_s"], ours["ttft"], "o-", ms=3, lw=1, label="cpattn (mixed steps)")
    if hf:
        a.plot(ours["arrival_s"], hf["ttft"], "s-", ms=3, lw=1, label="transformers (static batches)")
    a.set_xlabel("arrival (s)")
    a.set_ylabel("time to first token (s)")
    a.set_title("time to first token per request")
    a.legend(fontsize=8)
    for name, run, style in (("cpattn", ours, "-"), ("transformers", hf, "-"),
                             ("transformers, all at t = 0", hf.get("ideal") or {}, "--")):
        if run.get("curve"):
            t, k = zip(*run["curve"])
            b.step(t, k, style, where="post", label=f"{name}: {run['tok_s']:.0f} tok/s")
    b.set_xlabel("time since the first arrival (s)")
    b.set_ylabel("generated tokens (cumulative)")
    b.set_title("tokens over time")
    b.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, {d['requests']} requests, Poisson {d['rate']:g}/s ({d['device']}, {d['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def device_name(backend: str) -> str:
    if backend == "cupy":
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    return "CPU (NumPy reference)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        replot_json(args.replot, plot)
        return 0
    from ..serving.backends import resolve_backend
    from ..serving.fetch import model_path
    from ..serving.generate import Generator

    backend = resolve_backend(args.backend)
    dev = device_name(backend)
    date = datetime.date.today().isoformat()
    path = model_path(args.model)
    gen = Generator.load(str(path), backend=backend, chunk_size=args.chunk_size, prefill_chunk=args.prefill_chunk)
    document, questions = workload(gen.tokenizer, args.doc_tokens, args.requests)
    prompts = [gen.prompt_tokens(q, system=document) for q in questions]
    arrivals = arrival_times(args.seed, args.requests, args.rate)
    if backend == "cupy":  # one-time costs first (kernel loading, cuBLAS), as transformers gets a warm-up
        small = [gen.prompt_tokens(q, system=document[:200]) for q in questions[:8]]
        run_cpattn(argparse.Namespace(**dict(vars(args), new_tokens=3, pool_chunks=0)), gen.model, small,
                   [0.0] * len(small), label="warm-up")
    ours = run_cpattn(args, gen.model, prompts, arrivals)
    agree, hf, hf_version = {}, {}, "n/a"
    n_agree = args.new_tokens
    if args.lone_checks:
        k = min(args.lone_checks, args.requests)
        lone = lone_tokens(gen.model, prompts[:k], args.new_tokens, args.chunk_size, args.prefill_chunk)
        agree["lone"] = agreement(ours["tokens_out"][:k], lone, n_agree)
    if not args.skip_hf:
        import transformers

        hf_version = transformers.__version__
        hf = run_hf(args, path, prompts, arrivals, pad_id=gen.tokenizer.eos_ids[0] if gen.tokenizer.eos_ids else 0)
        agree["hf"] = agreement(ours["tokens_out"], hf["tokens_out"], n_agree)
        agree["hf_ideal"] = agreement(ours["tokens_out"], hf["ideal"]["tokens_out"], n_agree)
    short = "".join(ch for ch in dev.lower().split()[-1] if ch.isalnum()) if backend == "cupy" else "cpu"
    config = (f"SmolLM2-135M, {args.requests} req x ({args.doc_tokens} shared + own), {args.new_tokens} new, "
              f"Poisson {args.rate:g}/s, step {args.step_tokens}")
    meta = dict(device=dev, date=date, config=config, backend=backend, requests=args.requests, rate=args.rate,
                seed=args.seed, doc_tokens=args.doc_tokens, new_tokens=args.new_tokens, chunk_size=args.chunk_size,
                prefill_chunk=args.prefill_chunk, step_tokens=args.step_tokens, agree_tokens=n_agree,
                transformers=hf_version, prompt_tokens=sum(map(len, prompts)), last_arrival_s=arrivals[-1],
                arrivals_s=arrivals)
    rows = rows_of(meta, ours, hf)
    md = section(meta, ours, hf, agree)
    name = f"mixed_serving_{short}"
    extra = dict(cpattn=ours, transformers=hf, agreement=agree)
    paths = write_tables(args.out, name, rows, meta, md, extra=extra)
    plot(dict(meta, **extra), os.path.join(args.out, f"{name}.png"))
    print(md)
    print("wrote", ", ".join(paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
