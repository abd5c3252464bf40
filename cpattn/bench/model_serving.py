#!/usr/bin/env python3
"""Real-model serving benchmark: SmolLM2-135M through cpattn against the same model in transformers.

The workload: ``--requests`` requests share one real document (``--doc-tokens`` tokens of the
Python language reference that every CPython ships, PSF license) as their system prompt, each
with its own question (a topic of that reference), and generate ``--new-tokens`` tokens greedily
(no early stop, so both sides run the same number of steps at the same batch).

  cpattn        ``LlamaModel`` on CuPy (float16) over a ``GpuChunkCache``: requests admitted one
                after another, each reusing the cached document (chunked prefill, CompactAttention
                dense at alpha 0), then decoded together by ``GraphedDecoder`` (the whole step one
                CUDA graph, ChunkAttention for attention, captured again when the plan changes)
  transformers  the same GGUF file in ``AutoModelForCausalLM`` (float16, SDPA attention, its own
                dynamic KV cache), one batched ``generate`` over left-padded prompts: what a user
                would run instead

Measured: decode throughput (generated tokens after the first, per second of decode), time to
first token, step time, K/V memory (cpattn's chunk tree at its peak vs transformers' flat cache
of the same tokens), token agreement (first token where each request's continuation differs),
and where cpattn's step goes: device time of the captured step and of its attention and
model parts (CUDA events, L2 flushed, median) and host time per step.
Writes ``model_serving_<device>.{md,csv,json,png}`` under ``--out``.

    python -m cpattn.bench.model_serving --out bench [--requests 64 --doc-tokens 4096 --new-tokens 128]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

from . import progress
from .table import fmt, markdown_table, replot_json, summary, write_tables


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cpattn.bench.model_serving", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="model name (fetched on first use) or a .gguf path")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--doc-tokens", type=int, default=4096, help="tokens of the shared document")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens each request generates")
    ap.add_argument("--agree-tokens", type=int, default=32, help="leading tokens that must agree (reported)")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true", help="cpattn only (no transformers run)")
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="only draw the plot again from a JSON this benchmark wrote (PNG next to it); no GPU")
    return ap.parse_args(argv)


def workload(tokenizer, doc_tokens: int, requests: int):
    """(document text, questions): a real document cut to ``doc_tokens`` tokens, one question per
    request about a distinct topic of the same reference."""
    from pydoc_data.topics import topics

    from ..serving.generate import load_text

    text = load_text("python-docs")
    document = tokenizer.decode(tokenizer.encode(text)[:doc_tokens])
    names = sorted(topics)
    questions = [f"In two sentences, what does the reference say about '{names[(7 * i) % len(names)]}'?"
                 for i in range(requests)]
    return document, questions


# ============================================================================ cpattn
def run_cpattn(args, gen, prompts, timer, new_tokens=None, label="cpattn") -> dict:
    from ..serving.graphed import GraphedDecoder

    cp = gen.model.xp
    new_tokens = args.new_tokens if new_tokens is None else new_tokens
    attn = gen.batch_session(prompts, new_tokens)
    cache = attn.cache
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    seqs, tokens, ttft, reused = [], [], [], 0
    for i, p in enumerate(prompts):
        seq, r, logits = gen.admit(attn, p)
        tokens.append([int(cp.argmax(logits).get())])  # waits for the request's prefill
        ttft.append(time.perf_counter() - t0)
        seqs.append(seq)
        reused += r
        progress(i + 1, len(prompts), f"{label} prefill")
    prefill_s = time.perf_counter() - t0
    peak = cache.stats()
    dec = GraphedDecoder(gen.model, attn)
    steps, profile, step_s = new_tokens - 1, None, []
    t1 = time.perf_counter()
    nxt = np.array([t[-1] for t in tokens], np.int64)
    for s in range(steps):
        a = time.perf_counter()
        nxt = dec.step(seqs, nxt)  # the last step's tokens as they came back (host int64 [B])
        step_s.append(time.perf_counter() - a)
        for t, n in zip(tokens, nxt):
            t.append(int(n))
        if s == steps // 2 and timer is not None:  # where the step goes, mid-run (not counted in the decode time)
            p0 = time.perf_counter()
            profile = dec.profile(timer)
            t1 += time.perf_counter() - p0
        progress(s + 1, steps, f"{label} decode")
    decode_s = time.perf_counter() - t1
    st = cache.stats()
    peak = st if st["tokens_stored"] > peak["tokens_stored"] else peak
    kvb = gen.model.kv_bytes_per_token()
    return dict(tokens=tokens, prefill_s=prefill_s, ttft_first_s=ttft[0], ttft_mean_s=float(np.mean(ttft)),
                ttft_max_s=ttft[-1], decode_s=decode_s, decode_tok_s=len(prompts) * steps / decode_s,
                step_ms=1e3 * float(np.median(step_s)), prefill_reused=reused,
                prefill_computed=sum(map(len, prompts)) - reused, kv_mib=peak["tokens_stored"] * kvb / 2**20,
                profile=profile, host=dec.times.summary(), step_ms_all=[1e3 * t for t in step_s])


# ============================================================================ transformers
def run_hf(args, path, prompts, pad_id: int) -> dict:
    import torch
    import transformers

    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float16, attn_implementation="sdpa").cuda().eval()
    model.generation_config.eos_token_id = None  # every request runs all steps, as on our side
    model.generation_config.pad_token_id = pad_id
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    ids, mask = ids.cuda(), mask.cuda()

    def generate(n, m=model):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return out, time.perf_counter() - t

    generate(2)  # warm-up (kernels, allocator)
    _, first_s = min((generate(1) for _ in range(2)), key=lambda r: r[1])
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, full_s = generate(args.new_tokens)
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    steps = args.new_tokens - 1
    decode_s = full_s - first_s
    c = model.config
    kv_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    # the judge of agreement: the same model in float32 (no fp16 rounding anywhere), with the
    # top-2 logit gap at every step, so a difference can be told a near-tie or not
    del model  # a GGUF model cannot be cast (transformers refuses .float()): load it again in float32
    torch.cuda.empty_cache()
    model32 = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="sdpa").cuda().eval()
    model32.generation_config.eos_token_id = None  # as above: no request stops (and is padded) early
    model32.generation_config.pad_token_id = pad_id
    with torch.no_grad():
        g = model32.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.agree_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack([sc.float().topk(2, dim=-1).values for sc in g.scores], 1)  # [B, steps, 2]
    gaps = (top2[..., 0] - top2[..., 1]).cpu().numpy()
    judge = g.sequences[:, L:].tolist()
    del model32
    torch.cuda.empty_cache()
    return dict(tokens=out[:, L:].tolist(), judge_tokens=judge, judge_gaps=gaps, ttft_s=first_s, decode_s=decode_s,
                decode_tok_s=len(prompts) * steps / decode_s, step_ms=1e3 * decode_s / steps,
                kv_mib=len(prompts) * (L + args.new_tokens) * kv_token / 2**20, peak_alloc_mib=peak_mib)


def agreement(a: list, b: list, n: int, gaps=None) -> dict:
    """First differing position per request; how many requests agree on the first ``n`` tokens;
    with ``gaps`` ([B, steps] top-2 logit gaps of b's model), the gap where each one differs."""
    first = []
    for x, y in zip(a, b):
        k = next((i for i, (u, v) in enumerate(zip(x[:n], y[:n])) if u != v), n)
        first.append(k)
    first = np.array(first)
    out = dict(agree_first_n=int((first >= n).sum()), requests=len(first), first_diff_min=int(first.min()),
               tokens_equal=float(np.mean([np.mean(np.array(x[:n]) == np.array(y[:n])) for x, y in zip(a, b)])))
    if gaps is not None:
        diff = [(i, int(k)) for i, k in enumerate(first) if k < n]
        out["gaps_at_difference"] = [float(gaps[i, k]) for i, k in diff]
        out["median_gap"] = float(np.median(gaps[:, :n]))
    return out


# ============================================================================ report
def section(meta, ours, hf, agree) -> str:
    p = ours["profile"] or {}
    h = ours["host"]
    lines = [f"## Real model served: SmolLM2-135M, cpattn vs transformers ({meta['device']}, {meta['date']})", "",
             f"{meta['requests']} requests share a {meta['doc_tokens']}-token real document (the Python language "
             f"reference) as system prompt, each with its own question, {meta['new_tokens']} greedy tokens each, "
             f"float16, one batch. cpattn: chunk tree (chunk {meta['chunk_size']}), dense chunked prefill with "
             "document reuse, decode as one CUDA graph per plan (`GraphedDecoder`). transformers "
             f"{meta['transformers']}: batched `generate`, SDPA, dynamic cache, left padding. "
             "Generated by `python -m cpattn.bench.model_serving`.", ""]
    rows = [["decode throughput (tokens/s)", fmt(ours["decode_tok_s"], "{:.0f}"),
             fmt(hf.get("decode_tok_s"), "{:.0f}"), fmt(ours["decode_tok_s"] / hf["decode_tok_s"], "{:.1f}x")
             if hf else "n/a"],
            ["decode step (ms, median)", fmt(ours["step_ms"], "{:.2f}"), fmt(hf.get("step_ms"), "{:.2f}"), ""],
            ["time to first token, first request (s)", fmt(ours["ttft_first_s"], "{:.2f}"),
             fmt(hf.get("ttft_s"), "{:.2f}"), ""],
            ["time to first token, mean (s)", fmt(ours["ttft_mean_s"], "{:.2f}"), fmt(hf.get("ttft_s"), "{:.2f}"), ""],
            ["prompt tokens computed / reused", f"{ours['prefill_computed']} / {ours['prefill_reused']}",
             f"{meta['prompt_tokens']} / 0", ""],
            ["K/V memory (MiB)", fmt(ours["kv_mib"], "{:.0f}"), fmt(hf.get("kv_mib"), "{:.0f}"),
             fmt(hf["kv_mib"] / ours["kv_mib"], "{:.1f}x less") if hf else "n/a"]]
    lines += markdown_table(["", "cpattn", "transformers", "ratio"], rows) + [""]
    if agree:
        n = meta["agree_tokens"]

        def said(a, who):
            gaps = a.get("gaps_at_difference")
            tail = (f"; where they differ, float32's top-2 logit gap is {', '.join(f'{g:.3f}' for g in sorted(gaps))} "
                    f"(median gap over all steps {a['median_gap']:.2f})") if gaps else ""
            return (f"{who}: {a['agree_first_n']} of {a['requests']} requests identical on the first {n} tokens "
                    f"({100 * a['tokens_equal']:.1f}% of those tokens equal){tail}.")

        lines += ["Greedy tokens, first " + str(n) + " of each request: " +
                  said(agree["fp16"], "cpattn vs transformers float16 (the timed peer)") + " " +
                  said(agree["fp32"], "cpattn vs transformers float32 (the judge)") + " " +
                  said(agree["hf16_vs_fp32"], "transformers float16 vs float32") + "", ""]
    lines += [f"Where cpattn's decode step goes (device, CUDA events, L2 flushed, median): whole step "
              f"{fmt(p.get('all_ms'), '{:.3f}')} ms = attention (K/V writes + ChunkAttention, 30 layers) "
              f"{fmt(p.get('attention_ms'), '{:.3f}')} ms + the rest of the model (norms, products, RoPE, MLP, "
              f"logits, pick) {fmt(p.get('model_ms'), '{:.3f}')} ms (parts timed as separate graphs). " + host_sentence(h) +
              f" launch to tokens on the host {h['launch_to_tokens_us']:.0f} us; "
              + (f"{h['replans']} of {h['steps']} steps rebuilt the plan because some sequence started a chunk, "
                 f"{h['captures']} of them captured the step again ({h['capture_ms']:.1f} ms; the others wrote the "
                 "plan into the captured one's buffers); first step " if "replans" in h else
                 f"{h['captures']} of {h['steps']} steps rebuilt the plan ({h['plan_ms']:.2f} ms) and captured the "
                 f"step again ({h['capture_ms']:.1f} ms), because some sequence started a chunk; first step ") +
              f"{h['first_step_s']:.3f} s. Decode throughput counts every step, captures included.", ""]
    return "\n".join(lines)


def host_sentence(h: dict) -> str:
    """Host time per replayed step from ``StepTimes.summary()`` (an older JSON: its own keys)."""
    if "host_check_us" not in h:
        return (f"Host per step before the launch: {h['host_us_replay_steps']:.0f} us (reserve + uploads "
                f"{h['host_reserve_us']:.0f} us; the commits, {h['host_commit_us']:.0f} us, overlap the replay);")
    return (f"Host per replayed step (median; p90 {h['host_step_us_p90']:.0f} us): {h['host_step_us']:.1f} us = checks "
            f"{h['host_check_us']:.1f} + reserve {h['host_reserve_us']:.1f} + uploads {h['host_upload_us']:.1f} + "
            f"plan or length table {h['host_lens_us']:.1f} + launch call {h['host_launch_call_us']:.1f} + commits "
            f"{h['host_commit_us']:.1f} (overlapping the replay); {h['fresh_steps']} of {h['steps']} steps found the "
            f"device state advanced by the last step and uploaded nothing;")


def plot(d: dict, path: str) -> None:
    """Two panels from the benchmark's JSON: decode throughput of both, and where cpattn's step
    goes (device parts and host) next to transformers' step."""
    from . import pyplot

    plt = pyplot()
    if plt is None:
        return
    r, p, h = d["rows"][0], d.get("profile") or {}, d["host"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.bar(["cpattn\n(CUDA graph)", "transformers\ngenerate"], [r["ours"], r["peer"] or 0], color=["C0", "C1"])
    a.set_ylabel("decode tokens/s")
    a.set_title(f"decode throughput: {r['ratio']:.1f}x")
    for x, v in enumerate([r["ours"], r["peer"] or 0]):
        a.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=9)
    parts = [("attention (30 layers)", p.get("attention_ms", 0.0)), ("rest of the model", p.get("model_ms", 0.0)),
             ("host per step", h.get("host_step_us", h.get("host_us_replay_steps", 0.0)) / 1e3)]
    left = 0.0
    for k, (name, v) in enumerate(parts):
        b.barh(0, v, left=left, color=f"C{k + 2}", label=f"{name}: {v:.2f} ms")
        left += v
    b.set_yticks([])
    b.set_xlabel("ms per decode step")
    b.set_title(f"where cpattn's step goes (transformers' step: {r.get('hf_step_ms') or 0:.1f} ms)")
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)
    fig.suptitle(f"SmolLM2-135M served ({d['device']}, {d['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        replot_json(args.replot, plot)
        return 0
    import cupy

    from ..serving.fetch import model_path
    from ..serving.generate import Generator
    from .timing import GpuTimer

    dev = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    date = datetime.date.today().isoformat()
    path = model_path(args.model)
    gen = Generator.load(path, backend="cupy", chunk_size=args.chunk_size, prefill_chunk=args.prefill_chunk)
    document, questions = workload(gen.tokenizer, args.doc_tokens, args.requests)
    prompts = [gen.prompt_tokens(q, system=document) for q in questions]
    # one-time costs first (kernel loading, cuBLAS heuristics at this batch), as transformers
    # gets warm-up calls: the same requests over a short document, 3 tokens each
    small = [gen.prompt_tokens(q, system=document[:200]) for q in questions]
    run_cpattn(args, gen, small, None, new_tokens=3, label="warm-up")
    ours = run_cpattn(args, gen, prompts, GpuTimer(warmup=3, iters=30))
    hf, agree, hf_version = {}, None, "n/a"
    if not args.skip_hf:
        import transformers

        hf_version = transformers.__version__
        hf = run_hf(args, path, prompts, pad_id=gen.tokenizer.eos_ids[0] if gen.tokenizer.eos_ids else 0)
        agree = dict(fp16=agreement(ours["tokens"], hf["tokens"], args.agree_tokens),
                     fp32=agreement(ours["tokens"], hf["judge_tokens"], args.agree_tokens, hf["judge_gaps"]),
                     hf16_vs_fp32=agreement(hf["tokens"], hf["judge_tokens"], args.agree_tokens, hf["judge_gaps"]))
        hf.pop("judge_gaps")
    short = "".join(ch for ch in dev.lower().split()[-1] if ch.isalnum()) if dev else "gpu"
    meta = dict(device=dev, date=date, requests=args.requests, doc_tokens=args.doc_tokens, new_tokens=args.new_tokens,
                chunk_size=args.chunk_size, agree_tokens=args.agree_tokens, transformers=hf_version,
                prompt_tokens=sum(map(len, prompts)))
    config = f"SmolLM2-135M fp16, {args.requests} req x ({args.doc_tokens} shared + own), {args.new_tokens} new"
    rows = [dict(summary(dev, date, config, ours["decode_tok_s"], hf.get("decode_tok_s"), None),
                 metric="decode tokens/s (ratio = ours / peer here: higher is better)")]
    rows[0]["ratio"] = ours["decode_tok_s"] / hf["decode_tok_s"] if hf else float("nan")
    for k in ("step_ms", "ttft_first_s", "ttft_mean_s", "prefill_s", "kv_mib", "decode_s"):
        rows[0][f"ours_{k}"] = ours[k]
    for k in ("step_ms", "ttft_s", "kv_mib", "decode_s", "peak_alloc_mib"):
        rows[0][f"hf_{k}"] = hf.get(k)
    md = section(meta, ours, hf, agree)
    name = f"model_serving_{short}"
    extra = dict(profile=ours["profile"], host=ours["host"], agreement=agree,
                 ours_tokens=ours["tokens"][:4], hf_tokens=hf.get("tokens", [])[:4])
    paths = write_tables(args.out, name, rows, meta, md, extra=extra)
    if hf:
        plot(dict(meta, rows=rows, **extra), os.path.join(args.out, f"{name}.png"))
    print(md)
    print("wrote", ", ".join(paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
