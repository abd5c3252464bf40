"""Text in, text out: a pretrained GGUF model generating through the chunk tree.

    gen = Generator.load("smollm2", backend="numpy")       # fetched on first use
    result = gen.generate("What is a borrow checker?", on_text=print)   # streamed
    report = gen.batch_run(document, questions, max_new_tokens=32)
    print(report)

``generate`` runs one request: the chat template around the prompt, chunked prefill
(CompactAttention; alpha 0 is dense), then ChunkAttention decode, the text streamed as it comes.
``batch_run`` runs N requests that share a long document as their system prompt, each with its
own question: the first request's prefill fills the document's chunks, every later one reuses
them (``add_sequence`` matches complete chunks) and computes only its own tail; then all decode
together, one plan per step for every layer. The report gives decode tokens/s, time to first
token, prompt tokens reused vs computed, and K/V memory against a flat per-request cache.

Texts for long-context runs (``load_text``): ``rust-book`` (The Rust Programming Language from
rustup's offline docs, MIT / Apache-2.0) where rustup is installed, and ``python-docs`` (the
language reference topics every CPython ships in ``pydoc_data``, PSF license), which CI has.
"""
from __future__ import annotations

import glob
import html.parser
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..reference.checks import cdiv, check_bool, check_int, check_real
from ..reference.compact_attention import DEFAULT_SAMPLE_ROWS
from .backends import resolve_backend
from .llama import CacheAttention, LlamaModel, recall_options

# ============================================================================ texts
class _MainText(html.parser.HTMLParser):
    """The visible text inside an mdBook page's <main> element (code blocks kept)."""

    SKIP = {"script", "style", "nav", "button"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth, self.skip, self.parts = 0, 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.depth += 1
        elif tag in self.SKIP:
            self.skip += 1
        elif self.depth and tag in ("p", "h1", "h2", "h3", "h4", "li", "pre", "br", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag == "main":
            self.depth -= 1
        elif tag in self.SKIP:
            self.skip = max(0, self.skip - 1)

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data)


def rust_book_dir() -> str | None:
    """The folder of the Rust book's HTML in rustup's offline docs, or None."""
    homes = [os.environ.get("RUSTUP_HOME") or os.path.join(os.path.expanduser("~"), ".rustup")]
    for home in homes:
        hits = sorted(glob.glob(os.path.join(home, "toolchains", "*", "share", "doc", "rust", "html", "book")))
        hits = [h for h in hits if glob.glob(os.path.join(h, "ch01-*.html"))]
        if hits:
            return next((h for h in hits if "stable" in h), hits[0])
    return None


def load_text(name: str, max_chars: int | None = None) -> str:
    """A long real text: ``rust-book``, ``python-docs``, or a path to a UTF-8 file."""
    if name == "rust-book":
        folder = rust_book_dir()
        if folder is None:
            raise FileNotFoundError("rust-book: expected rustup's offline docs (~/.rustup/toolchains/*/share/doc/"
                                    "rust/html/book), not found; use 'python-docs' or a text file")
        parts = []
        for page in sorted(glob.glob(os.path.join(folder, "ch[0-9][0-9]-*.html"))):
            p = _MainText()
            with open(page, encoding="utf-8") as f:
                p.feed(f.read())
            parts.append("".join(p.parts))
            if max_chars and sum(map(len, parts)) >= max_chars:
                break
        text = "\n".join(parts)
    elif name == "python-docs":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    elif os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            text = f.read()
    else:
        raise ValueError(f"text: expected 'rust-book', 'python-docs' or a file path, got {name!r}")
    text = "\n".join(line.rstrip() for line in text.splitlines())
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()[:max_chars] if max_chars else text.strip()


# ============================================================================ results
@dataclass
class Generation:
    """One request's output and its timings (seconds)."""

    prompt_tokens: int
    reused_tokens: int
    tokens: list = field(default_factory=list)
    text: str = ""
    ttft: float = 0.0  # request start -> first token
    decode_time: float = 0.0  # first token -> last token

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_time if self.decode_time > 0 and len(self.tokens) > 1 else 0.0


@dataclass
class BatchReport:
    """``batch_run``: N requests sharing a document, decoded together."""

    backend: str
    requests: list  # Generation per request
    doc_tokens: int
    prefill_time: float
    decode_time: float
    decode_steps: int
    kv_tokens_stored: int
    kv_tokens_flat: int
    kv_bytes_per_token: int
    chunk_size: int
    alpha: float
    prefill_density: float | None = None  # mean fraction of K/V blocks prefill read (alpha > 0 or a recall)
    step_times: dict | None = None  # GraphedDecoder's host times per step (graph=True)
    recall: float | None = None  # the recall-target rule's target, when prefill used it

    @property
    def generated(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    @property
    def reused_tokens(self) -> int:
        return sum(r.reused_tokens for r in self.requests)

    def summary(self) -> dict:
        ttft = np.array([r.ttft for r in self.requests])
        return dict(
            backend=self.backend, requests=len(self.requests), doc_tokens=self.doc_tokens,
            prompt_tokens=self.prompt_tokens, prefill_reused=self.reused_tokens,
            prefill_computed=self.prompt_tokens - self.reused_tokens, prefill_s=self.prefill_time,
            ttft_mean_s=float(ttft.mean()), ttft_max_s=float(ttft.max()), ttft_first_s=float(ttft[0]),
            decode_steps=self.decode_steps, generated=self.generated, decode_s=self.decode_time,
            decode_tokens_per_s=(self.generated - len(self.requests)) / self.decode_time if self.decode_time else 0.0,
            step_ms=1e3 * self.decode_time / max(1, self.decode_steps),
            kv_mib=self.kv_tokens_stored * self.kv_bytes_per_token / 2**20,
            kv_flat_mib=self.kv_tokens_flat * self.kv_bytes_per_token / 2**20, prefill_density=self.prefill_density)

    def __str__(self) -> str:
        s = self.summary()
        saved = 1 - s["kv_mib"] / s["kv_flat_mib"] if s["kv_flat_mib"] else 0.0
        return "\n".join([
            f"batch run on {s['backend']}: {s['requests']} requests sharing a {s['doc_tokens']}-token document "
            f"(chunk size {self.chunk_size}, prefill "
            + (f"alpha {self.alpha:g})" if self.recall is None else f"recall target {self.recall:g})"),
            f"  prefill: {s['prompt_tokens']} prompt tokens, {s['prefill_reused']} reused from the cache, "
            f"{s['prefill_computed']} computed, in {s['prefill_s']:.2f} s"
            + ("" if self.prefill_density is None else
               f", reading {100 * self.prefill_density:.1f}% of the K/V blocks (CompactAttention)"),
            f"  time to first token: first request {s['ttft_first_s']:.2f} s, mean {s['ttft_mean_s']:.2f} s, "
            f"max {s['ttft_max_s']:.2f} s",
            f"  decode: {s['generated']} tokens in {s['decode_steps']} steps, {s['decode_s']:.2f} s, "
            f"{s['decode_tokens_per_s']:.1f} tokens/s, {s['step_ms']:.1f} ms per step",
            f"  K/V memory at the peak: {s['kv_mib']:.1f} MiB in the chunk tree vs {s['kv_flat_mib']:.1f} MiB in a "
            f"flat per-request cache ({100 * saved:.1f}% saved)",
        ])


# ============================================================================ the generator
class Generator:
    """A model, its tokenizer and a chunk cache on one backend.

    Args:
        model: a ``LlamaModel``; tokenizer: its ``Tokenizer``.
        chunk_size: cache chunk size (16 to 128 for the GPU kernels).
        prefill_chunk: prompt tokens per prefill call (a multiple of chunk_size).
        alpha, sink, window: CompactAttention selection for prefill (alpha 0: dense).
        recall, summary, sample_rows: the recall-target rule instead of alpha (``CacheAttention``;
            recall None: the alpha rule, alpha then 0 or None with a recall).
        row_floor: the recall rule's per-row floor (``CacheAttention``; None: off).
    """

    def __init__(self, model: LlamaModel, tokenizer, *, chunk_size: int = 64, prefill_chunk: int = 256,
                 alpha: float = 0.0, sink: int = 2, window: int = 4, recall: float | None = None,
                 summary: str = "auto", sample_rows: int = DEFAULT_SAMPLE_ROWS, row_floor: float | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.backend = "numpy" if model.xp is np else "cupy"
        self.chunk_size = check_int(chunk_size, "chunk_size", 1)
        self.prefill_chunk = check_int(prefill_chunk, "prefill_chunk", chunk_size)
        if prefill_chunk % chunk_size:
            raise ValueError(f"prefill_chunk: expected a multiple of chunk_size {chunk_size}, got {prefill_chunk}")
        rule = recall_options(alpha, recall, summary, sample_rows, row_floor)  # CacheAttention's checks, up front
        self.alpha = check_real(alpha, "alpha", 0.0, 1.0) if recall is None else 0.0
        self.recall, self.summary, self.sample_rows = rule.get("recall"), summary, sample_rows
        self.row_floor = rule.get("row_floor")
        self.sink, self.window = sink, window

    @classmethod
    def load(cls, model: str = "smollm2", *, backend: str = "auto", dtype: str = "float16", log=None, **options):
        """From a model name (fetched on first use) or a .gguf path."""
        from .fetch import model_path
        from .gguf import GGUFFile

        backend = resolve_backend(backend)
        path = model_path(model, log=log)
        f = GGUFFile(path)
        if backend == "cupy":
            import cupy as xp
        else:
            xp = np
        return cls(LlamaModel(f.config(), f.tensor, dtype=dtype, xp=xp), f.tokenizer(), **options)

    # ------------------------------------------------------------------ prompts
    def prompt_tokens(self, prompt: str, system: str | None = None, chat: bool = True) -> list[int]:
        """Token ids of a user prompt, wrapped in the chat template unless ``chat`` is False."""
        if not chat:
            return self.tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.tokenizer.encode(self.tokenizer.chat(messages))

    def new_session(self, num_tokens: int, max_sequences: int = 256):
        """A cache with room for ``num_tokens`` of K/V (in chunks), and its attention."""
        cache = self.model.new_cache(cdiv(num_tokens, self.chunk_size) + 2, chunk_size=self.chunk_size,
                                     max_sequences=max_sequences)
        return CacheAttention(cache, self.model.config.num_q_heads, alpha=self.alpha, sink=self.sink,
                              window=self.window, recall=self.recall, summary=self.summary,
                              sample_rows=self.sample_rows, row_floor=self.row_floor)

    def _pick(self, logits, temperature: float, rng) -> np.ndarray:
        """Next token per row of logits [B, V]: greedy at temperature 0, else sampled."""
        xp = self.model.xp
        if temperature <= 0:
            return np.asarray(xp.argmax(logits, axis=-1).get() if xp is not np else logits.argmax(-1)).reshape(-1)
        z = logits / np.float32(temperature)
        z = z - z.max(axis=-1, keepdims=True)
        p = xp.exp(z)
        p = p / p.sum(axis=-1, keepdims=True)
        p = np.asarray(p.get() if xp is not np else p, np.float64)
        return np.array([rng.choice(p.shape[-1], p=row / row.sum()) for row in p])

    def _text(self, tokens: list, stop_at_eos: bool) -> str:
        """The text of generated tokens, without the end-of-turn token that stopped them."""
        if stop_at_eos and tokens and tokens[-1] in self.tokenizer.eos_ids:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens)

    def admit(self, attn: CacheAttention, tokens: list[int]) -> tuple[int, int, object]:
        """Start a sequence, reusing its cached prefix; returns (seq, reused, last logits)."""
        seq = attn.cache.add_sequence(tokens, max_match=len(tokens) - 1)
        reused = attn.cache.seq_len(seq)
        logits = self.model.prefill(attn, seq, tokens[reused:], chunk_tokens=self.prefill_chunk)
        return seq, reused, logits

    def use_graph(self, graph) -> bool:
        """``graph`` (True, False or "auto") resolved: "auto" is True on CuPy with float16."""
        if graph == "auto" and not isinstance(graph, bool):
            return self.backend == "cupy" and self.model.dtype == "float16"
        graph = check_bool(graph, "graph")
        if graph and (self.backend != "cupy" or self.model.dtype != "float16"):
            raise ValueError(f"graph: expected False or 'auto' on {self.backend} with {self.model.dtype} (CUDA graphs "
                             f"need the CuPy backend and float16), got True")
        return graph

    def graphed_decoder(self, attn: CacheAttention):
        from .graphed import GraphedDecoder

        return GraphedDecoder(self.model, attn)

    def batch_session(self, prompts: list[list[int]], max_new_tokens: int):
        """A session with room for ``prompts`` (token ids) sharing their common prefix, each
        growing by ``max_new_tokens``."""
        shared, c = _common_prefix(prompts), self.chunk_size
        need = (shared // c) * c + sum(len(p) - (shared // c) * c + max_new_tokens + c for p in prompts)
        return self.new_session(need, max_sequences=len(prompts) + 1)

    # ------------------------------------------------------------------ one request
    def generate(self, prompt: str | list[int], *, max_new_tokens: int = 128, system: str | None = None,
                 chat: bool = True, temperature: float = 0.0, seed: int = 0, on_text=None,
                 stop_at_eos: bool = True, graph="auto") -> Generation:
        """Generate a continuation of ``prompt`` (text, or token ids used as they are).

        ``on_text(str)`` receives the text as it is produced (decoded incrementally).
        ``graph``: decode steps as one CUDA graph (``GraphedDecoder``); "auto": on CuPy with
        float16, the only place it runs.
        """
        graph = self.use_graph(graph)
        check_int(max_new_tokens, "max_new_tokens", 1)
        tokens = list(prompt) if not isinstance(prompt, str) else self.prompt_tokens(prompt, system, chat)
        attn = self.new_session(len(tokens) + max_new_tokens, max_sequences=4)
        rng = np.random.default_rng(seed)
        stream = self.tokenizer.stream()
        t0 = time.perf_counter()
        seq, reused, logits = self.admit(attn, tokens)
        out = Generation(prompt_tokens=len(tokens), reused_tokens=reused)
        graphed = self.graphed_decoder(attn) if graph else None
        nxt = int(self._pick(logits[None], temperature, rng)[0])
        out.ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        while True:
            out.tokens.append(nxt)
            if stop_at_eos and nxt in self.tokenizer.eos_ids:
                break
            piece = stream.push(nxt)
            if on_text is not None and piece:
                on_text(piece)
            if len(out.tokens) == max_new_tokens:
                break
            if graphed is not None:
                greedy = graphed.step([seq], [nxt])
                nxt = int(greedy[0]) if temperature <= 0 else int(
                    self._pick(graphed.logits.astype(np.float32), temperature, rng)[0])
            else:
                logits = self.model.decode(attn, [seq], [nxt])
                nxt = int(self._pick(logits, temperature, rng)[0])
        out.decode_time = time.perf_counter() - t1
        out.text = self._text(out.tokens, stop_at_eos)
        attn.cache.release(seq)
        return out

    # ------------------------------------------------------------------ N requests, one document
    def batch_run(self, document: str, questions: list[str], *, max_new_tokens: int = 32,
                  stop_at_eos: bool = True, graph="auto") -> BatchReport:
        """N requests, each the chat template around (system: ``document``, user: its question).

        Requests are admitted one after another (each reusing the cached document), then decoded
        as one batch until each has ``max_new_tokens`` tokens or its end-of-turn token.
        ``graph``: decode with ``GraphedDecoder`` (the whole step one CUDA graph, captured again
        when the plan changes; "auto": on CuPy with float16); its host times go to
        ``BatchReport.step_times``.
        """
        graph = self.use_graph(graph)
        if not questions:
            raise ValueError("questions: expected at least one question, got none")
        check_int(max_new_tokens, "max_new_tokens", 1)
        prompts = [self.prompt_tokens(q, system=document) for q in questions]
        c = self.chunk_size
        attn = self.batch_session(prompts, max_new_tokens)
        cache, model = attn.cache, self.model
        gens, seqs = [], []
        t0 = time.perf_counter()
        for p in prompts:
            seq, reused, logits = self.admit(attn, p)
            g = Generation(prompt_tokens=len(p), reused_tokens=reused)
            g.tokens.append(int(self._pick(logits[None], 0.0, None)[0]))
            g.ttft = time.perf_counter() - t0
            gens.append(g)
            seqs.append(seq)
        prefill_time = time.perf_counter() - t0
        density = (float(np.mean([d["tables"] for _, d in attn.densities]))
                   if (self.alpha > 0 or self.recall is not None) and attn.densities else None)
        peak = cache.stats()
        live = [i for i, g in enumerate(gens) if not _done(g, max_new_tokens, self.tokenizer.eos_ids, stop_at_eos)]
        steps = 0
        graphed = self.graphed_decoder(attn) if graph else None
        t1 = time.perf_counter()
        while live:
            st = cache.stats()
            if st["tokens_flat"] > peak["tokens_flat"]:
                peak = st
            batch, last = [seqs[i] for i in live], [gens[i].tokens[-1] for i in live]
            if graphed is not None:
                picked = graphed.step(batch, last)
            else:
                picked = self._pick(model.decode(attn, batch, last), 0.0, None)
            steps += 1
            now = time.perf_counter()
            for i, t in zip(live, picked):
                gens[i].tokens.append(int(t))
                gens[i].decode_time = now - t1
            done = [i for i in live if _done(gens[i], max_new_tokens, self.tokenizer.eos_ids, stop_at_eos)]
            for i in done:
                cache.release(seqs[i])
            live = [i for i in live if i not in done]
        decode_time = time.perf_counter() - t1
        for g in gens:
            g.text = self._text(g.tokens, stop_at_eos)
        doc_tokens = len(self.tokenizer.encode(document))
        return BatchReport(backend=self.backend, requests=gens, doc_tokens=doc_tokens, prefill_time=prefill_time,
                           decode_time=decode_time, decode_steps=steps, kv_tokens_stored=peak["tokens_stored"],
                           kv_tokens_flat=peak["tokens_flat"], kv_bytes_per_token=model.kv_bytes_per_token(),
                           chunk_size=c, alpha=self.alpha, prefill_density=density, recall=self.recall,
                           step_times=None if graphed is None else graphed.times.summary())


def _done(g: Generation, max_new: int, eos_ids, stop_at_eos: bool) -> bool:
    return len(g.tokens) >= max_new or (stop_at_eos and g.tokens[-1] in eos_ids)


def _common_prefix(prompts: list[list[int]]) -> int:
    n = min(map(len, prompts))
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return n


__all__ = ["Generator", "Generation", "BatchReport", "load_text", "rust_book_dir"]
