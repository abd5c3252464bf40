"""Continuous batching over one KV cache: requests in, tokens out, a report of what happened.

The server

1. matches each prompt against the cache (``add_sequence(prompt, max_match=len - 1)``): the
   K/V of the longest cached prefix of complete chunks is reused, not recomputed;
2. prefills the rest of the prompt chunk by chunk (every chunk a multiple of the chunk size but
   the last), each chunk attending to the cached past through the backend's ``prefill``
   (CompactAttention on the chunk tree);
3. decodes all live requests together through the backend's ``decode`` (ChunkAttention: one
   plan serves every layer, rebuilt only when the tree or the batch changes);
4. releases finished requests: their complete chunks stay cached for later prompts, and the
   pool evicts least-recently-used prefixes when it needs room.

Every prefill and every decode step is timed between two ``backend.sync()`` calls; the times
are in the ``ServingReport`` (one entry per step), and ``on_step`` sees each as it happens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from ..reference.checks import cdiv, check_bool, check_int, check_optional_int, check_token_ids
from ..reference.chunk_cache import CacheFullError
from ..reference.compact_attention import split_chunks
from .backends import AttentionBackend, AttentionStats, PrefillOptions, make_backend
from .model import TinyLM, dense_generate


@runtime_checkable
class ServingModel(Protocol):
    """What ``Server`` calls on a model (``TinyLM`` implements it). ``config`` has
    ``num_layers``, ``num_kv_heads``, ``head_dim`` and ``dtype`` (the storage dtype name)."""

    config: object

    def embed(self, tokens): ...  # ints [n] -> x [n, hidden]
    def qkv(self, layer: int, x, pos): ...  # -> q [n, Hq, D], k, v [n, Hkv, D] storage dtype
    def finish_layer(self, layer: int, x, o): ...  # o [n, Hq, D] storage dtype -> x [n, hidden]
    def greedy(self, x) -> list: ...  # x [n, hidden] -> the next token of every row


@dataclass
class Request:
    """One request: its prompt, how many tokens to generate, and what happened to it."""

    rid: int
    prompt: list
    max_new_tokens: int
    arrival: int = 0  # the server step at which it arrives
    seq: int | None = None  # cache sequence id while live
    output: list = field(default_factory=list)
    reused: int = 0  # prompt tokens whose K/V came from the cache (prefill skipped)
    computed: int = 0  # prompt tokens prefilled
    state: str = "waiting"  # waiting -> running -> finished


@dataclass
class ServingReport:
    """Numbers of one ``Server.run`` (times exclude the dense check)."""

    backend: str
    requests: int
    prompt_tokens: int
    prefill_reused: int
    prefill_computed: int
    prefill_chunks: int
    prefill_s: float
    decode_steps: int
    decode_tokens: int
    decode_s: float
    plans_built: int
    decode_calls: int
    peak: dict  # cache.stats() when the most tokens were live
    bytes_per_token: int  # K and V of one token, all layers
    evictions: int
    density: dict
    recall: list
    agreement: dict | None = None  # filled by check_against_dense
    prefill_request_s: list = field(default_factory=list)  # per admitted request, its whole prefill
    decode_step_s: list = field(default_factory=list)  # per decode step (all layers)
    decode_step_batch: list = field(default_factory=list)  # requests in each decode step

    def lines(self) -> list[str]:
        pk, mb = self.peak, self.bytes_per_token / 2 ** 20
        saved = 1 - pk["tokens_stored"] / pk["tokens_flat"] if pk.get("tokens_flat") else 0.0
        out = [
            f"  requests: {self.requests}, {self.prompt_tokens} prompt tokens: {self.prefill_reused} reused "
            f"from the cache ({100 * self.prefill_reused / max(1, self.prompt_tokens):.1f}% of prefill "
            f"skipped), {self.prefill_computed} prefilled in {self.prefill_chunks} chunks",
            f"  memory at peak ({pk.get('sequences', 0)} live): {pk.get('tokens_stored', 0)} tokens stored vs "
            f"{pk.get('tokens_flat', 0)} in a flat cache ({100 * saved:.1f}% saved, "
            f"{pk.get('tokens_stored', 0) * mb:.2f} vs {pk.get('tokens_flat', 0) * mb:.2f} MiB of K/V); "
            f"{self.evictions} chunks evicted (LRU)",
        ]
        if self.density:
            out.append("  prefill density (share of past blocks read): " + ", ".join(
                f"{k} {v:.3f}" for k, v in self.density.items()))
        else:
            out.append("  prefill density: no chunk had a past (nothing to select)")
        rec = [f"layer {i} mean {r[0]:.4f} min {r[1]:.4f}" for i, r in enumerate(self.recall) if r]
        if rec:
            out.append("  prefill recall (attention mass read, vs dense): " + "; ".join(rec))
        steps = max(1, self.decode_steps)
        out.append(
            f"  speed ({self.backend}): prefill {self.prefill_computed / max(self.prefill_s, 1e-9):.0f} tok/s, "
            f"decode {self.decode_tokens / max(self.decode_s, 1e-9):.0f} tok/s "
            f"({1e3 * self.decode_s / steps:.1f} ms/step, {self.decode_tokens / steps:.1f} requests/step); "
            f"{self.plans_built} decode plans for {self.decode_steps} steps x {len(self.recall)} layers")
        if self.agreement:
            a = self.agreement
            out.append(f"  vs dense model (no cache, no sparsity): {a['tokens_equal']}/{a['tokens']} tokens "
                       f"equal, {a['requests_equal']}/{a['requests']} requests identical"
                       + (f" (first {a['requests']} of {self.requests} checked)" if a["requests"] < self.requests else ""))
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


StepHook = Callable[[str, float, list], None]


class Server:
    """Continuous batching over one cache (see the module docstring).

    Args:
        model: a ``ServingModel`` (e.g. ``TinyLM``), on the device of the backend's cache.
        num_chunks: pool capacity in chunks (the pool never grows; LRU eviction makes room).
        chunk_size: tokens per chunk = CompactAttention block size.
        prefill_chunk: tokens per prefill chunk, a multiple of ``chunk_size``.
        backend: "numpy", "cupy" or "auto" (a chunk-tree cache and its backend, made by
            ``make_backend``), or any ``AttentionBackend`` object, which brings its own cache
            (a ``ServingCache``); ``num_chunks``, ``options`` and ``measure_recall`` are then
            unused (``cpattn.bench`` plugs in torch SDPA over a flat cache this way).
        options: CompactAttention options; ``measure_recall`` compares every prefill chunk with
            the float64 dense oracle (slower; off for timing).
        max_batch: most requests decoding at once.
        trace: keep a line per event (admission, decode step, release, eviction) in ``log``.
        on_step: called as ``on_step(kind, seconds, requests)`` after every timed step: kind
            ``"prefill"`` (one request's whole prompt) or ``"decode"`` (one token for every
            running request, all layers); seconds between two ``backend.sync()`` calls.
    """

    def __init__(self, model: ServingModel, num_chunks: int, chunk_size: int = 16, prefill_chunk: int = 64,
                 backend: str | AttentionBackend = "numpy", options: PrefillOptions = PrefillOptions(),
                 measure_recall: bool = True, max_batch: int = 256, trace: bool = False,
                 on_step: StepHook | None = None):
        check_int(num_chunks, "num_chunks", 1)
        check_int(chunk_size, "chunk_size", 1, 129)
        check_int(prefill_chunk, "prefill_chunk", 1)
        check_int(max_batch, "max_batch", 1)
        check_bool(measure_recall, "measure_recall")
        check_bool(trace, "trace")
        if on_step is not None and not callable(on_step):
            raise TypeError(f"on_step: expected None or a callable, got {type(on_step).__name__}")
        if prefill_chunk < chunk_size or prefill_chunk % chunk_size:
            raise ValueError(f"prefill_chunk: expected a positive multiple of chunk_size {chunk_size}, "
                             f"got {prefill_chunk}")
        self.model, self.chunk_size, self.prefill_chunk, self.max_batch = model, chunk_size, prefill_chunk, max_batch
        if isinstance(backend, str):
            backend = make_backend(backend, model.config, num_chunks, chunk_size, options, measure_recall)
        self.backend, self.cache, self.on_step = backend, backend.cache, on_step
        self.requests: list[Request] = []
        self.step = 0
        self.log: list[str] | None = [] if trace else None

    def _note(self, text: str) -> None:
        if self.log is not None:
            self.log.append(f"step {self.step:>2}  {text}")

    def submit(self, prompt, max_new_tokens: int, arrival: int | None = None) -> Request:
        """Queue a request: ``prompt`` token ids in [0, vocab_size) of the model (when it has a
        ``config.vocab_size``), ``max_new_tokens >= 1``, ``arrival`` a step >= 0 (default now)."""
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        prompt = check_token_ids(prompt, "prompt", vocab)
        if not prompt:
            raise ValueError("prompt: expected at least one token, got none")
        check_int(max_new_tokens, "max_new_tokens", 1)
        check_optional_int(arrival, "arrival", 0)
        r = Request(len(self.requests), prompt, int(max_new_tokens),
                    self.step if arrival is None else int(arrival))
        self.requests.append(r)
        return r

    # ---------------------------------------------------------------- admission
    def _chunks_for(self, n_tokens: int) -> int:
        return cdiv(n_tokens, self.chunk_size)

    def _owed(self, r: Request) -> int:
        """Chunks a live request still needs to reach its last token (its path is full chunks
        and a partial tail, so the count is exact even when the path is shared)."""
        return self._chunks_for(len(r.prompt) + r.max_new_tokens - 1) - len(self.cache.seq_chunks(r.seq))

    def _admit(self, r: Request, running: list[Request]) -> bool:
        """Match the prompt against the cache and keep the request if the pool has room for
        the rest of its life after what the running requests may still need. Cached chunks
        count as room: they are evicted (LRU) when the free list runs out."""
        cache = self.cache
        r.seq = cache.add_sequence(r.prompt, max_match=len(r.prompt) - 1)  # takes the cached prefix only
        have = cache.num_free + cache.num_cached - sum(self._owed(x) for x in running)
        if self._owed(r) <= have:
            return True
        if r.state == "waiting":
            self._note(f"r{r.rid} waits: needs {self._owed(r)} more chunks, {have} free or evictable")
            r.state = "queued"
        cache.release(r.seq)  # not now: its matched chunks go back to the prefix cache
        r.seq = None
        return False

    def _lru(self) -> list:
        return list(self.cache.cached_nodes())  # complete chunks no sequence uses, least recently used first

    def _evicted_since(self, before: list) -> int:
        return sum(1 for n in before if n.ref == 0 and n not in self.cache.cached_nodes())

    # ---------------------------------------------------------------- prefill
    def _prefill(self, r: Request) -> None:
        """Match the prompt, prefill the rest chunk by chunk; the last logits give token 1."""
        model, cache, backend = self.model, self.cache, self.backend
        start = cache.seq_len(r.seq)  # matched by _admit: a multiple of chunk_size, < len(prompt)
        r.reused, r.computed = start, len(r.prompt) - start
        rest = r.prompt[start:]
        sizes = split_chunks(len(rest), self.prefill_chunk, self.chunk_size)
        self._note(f"r{r.rid} admitted: prompt {len(r.prompt)} tokens = {start} reused from the cache "
                   f"+ {len(rest)} prefilled in chunks {sizes}")
        for n in sizes:
            toks = rest[:n]
            rest = rest[n:]
            pos = np.arange(start, start + n)
            slots = cache.reserve(r.seq, toks)
            x = model.embed(toks)
            for layer in range(model.config.num_layers):
                q, k, v = model.qkv(layer, x, pos)
                cache.write_kv(layer, slots, k, v)
                x = model.finish_layer(layer, x, backend.prefill(r.seq, q, layer))
            cache.commit(r.seq)  # the chunk's full pages are now matchable by other prompts
            start += n
            self._n_chunks += 1
        r.output.append(model.greedy(x[-1:])[0])
        r.state = "running"

    # ---------------------------------------------------------------- decode
    def _decode_step(self, running: list[Request]) -> None:
        """One token for every running request: reserve, then per layer write K/V and attend."""
        model, cache, backend = self.model, self.cache, self.backend
        seqs = [r.seq for r in running]
        pos = np.array([cache.seq_len(s) for s in seqs])
        slots = cache.reserve_batch(seqs, [r.output[-1] for r in running])
        x = model.embed([r.output[-1] for r in running])
        for layer in range(model.config.num_layers):
            q, k, v = model.qkv(layer, x, pos)
            cache.write_kv(layer, slots, k, v)
            x = model.finish_layer(layer, x, backend.decode(seqs, q, layer))
        for s in seqs:
            cache.commit(s)
        for r, t in zip(running, model.greedy(x)):
            r.output.append(t)

    def _timed(self, kind: str, work, requests: list, times: list) -> float:
        """Run ``work()`` between two syncs; record the seconds (less any recall check) in ``times``."""
        self.backend.sync()
        t0, checked = time.perf_counter(), self.backend.stats.check_s
        work()
        self.backend.sync()
        dt = time.perf_counter() - t0 - (self.backend.stats.check_s - checked)
        times.append(dt)
        if self.on_step is not None:
            self.on_step(kind, dt, requests)
        return dt

    # ---------------------------------------------------------------- the loop
    def run(self) -> ServingReport:
        """Serve every submitted request that is not finished; returns this run's numbers."""
        cfg, cache = self.model.config, self.cache
        todo = [r for r in self.requests if r.state != "finished"]
        waiting = sorted((r for r in todo if r.state in ("waiting", "queued")), key=lambda r: (r.arrival, r.rid))
        running = [r for r in todo if r.state == "running"]
        self.backend.stats = AttentionStats(cfg.num_layers)
        self._n_chunks, evictions = 0, 0
        prefill_s, step_s, step_batch = [], [], []
        peak = cache.stats()

        def finish(r):
            cache.release(r.seq)
            r.state, r.seq = "finished", None
            self._note(f"r{r.rid} finished ({len(r.output)} tokens) and released; the pool holds "
                       f"{cache.num_cached} cached, {cache.num_referenced} referenced, {cache.num_free} free chunks")

        def evicted(before):
            n = self._evicted_since(before)
            if n:
                self._note(f"evicted {n} cached chunk(s), least recently used first")
            return n

        while waiting or running:
            # admit arrived requests in order while they fit (FIFO: no overtaking)
            while waiting and waiting[0].arrival <= self.step and len(running) < self.max_batch \
                    and self._admit(waiting[0], running):
                r = waiting.pop(0)
                before = self._lru()
                self._timed("prefill", lambda r=r: self._prefill(r), [r], prefill_s)
                evictions += evicted(before)
                if len(r.output) >= r.max_new_tokens:
                    finish(r)
                else:
                    running.append(r)
            if running:
                before, plans = self._lru(), self.backend.stats.plans_built
                step_batch.append(len(running))
                self._timed("decode", lambda: self._decode_step(running), list(running), step_s)
                self._note(f"decode {' '.join(f'r{r.rid}' for r in running)} "
                           f"({'new plan' if self.backend.stats.plans_built > plans else 'plan reused'})")
                evictions += evicted(before)
                st = cache.stats()
                if st["tokens_flat"] > peak["tokens_flat"]:
                    peak = st
                for r in [r for r in running if len(r.output) >= r.max_new_tokens]:
                    running.remove(r)
                    finish(r)
            elif waiting and waiting[0].arrival <= self.step:
                r = waiting[0]
                raise CacheFullError(f"pool: request {r.rid} needs "
                                     f"{self._chunks_for(len(r.prompt) + r.max_new_tokens - 1)} chunks, "
                                     f"the pool has {cache.num_chunks}; make the pool larger")
            self.step += 1

        st = self.backend.stats
        return ServingReport(
            backend=self.backend.label, requests=len(todo), prompt_tokens=sum(len(r.prompt) for r in todo),
            prefill_reused=sum(r.reused for r in todo), prefill_computed=sum(r.computed for r in todo),
            prefill_chunks=self._n_chunks, prefill_s=sum(prefill_s), decode_steps=len(step_s),
            decode_tokens=sum(step_batch), decode_s=sum(step_s), plans_built=st.plans_built,
            decode_calls=st.decode_calls, peak=peak,
            bytes_per_token=2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2, evictions=evictions,
            density=st.density, recall=st.recall, prefill_request_s=prefill_s, decode_step_s=step_s,
            decode_step_batch=step_batch)


def check_against_dense(model: TinyLM, requests, report: ServingReport | None = None) -> dict:
    """Generate every request again with ``dense_generate``; count equal tokens (position by
    position) and identical requests. Stored in ``report.agreement`` when a report is given."""
    tokens = equal = same = 0
    for r in requests:
        ref = dense_generate(model, r.prompt, r.max_new_tokens)
        tokens += len(ref)
        equal += sum(a == b for a, b in zip(ref, r.output))
        same += ref == r.output
    out = dict(tokens=tokens, tokens_equal=equal, requests=len(requests), requests_equal=same)
    if report is not None:
        report.agreement = out
    return out
