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

With ``step_tokens=N`` the server runs **mixed steps** instead (docs/design.md, *Mixed steps
and preemption*): one step is one pass of the model over the decode tokens of the running
requests plus prefill pieces of admitted and newly arrived requests, at most N tokens in all;
when the pool runs out the most recently admitted requests are preempted (released, their
complete chunks left cached) and recomputed later from their prompt plus the tokens they had.

A backend that runs **whole steps** itself (``StepBackend``: a ``mixed_step`` method, e.g.
``cpattn.serving.llama.MixedStepBackend`` for the real model, whose decode rows are one CUDA
graph and whose prefill pieces are one ``BatchedPrefill`` per layer) gets each mixed step as
it was scheduled here: the same admission, budget and preemption, one call per step.
``run(poll=...)`` lets a caller submit requests while the server runs (arrivals in wall-clock
time: the benchmark admits what has arrived by the start of each step).
"""
from __future__ import annotations

import time
from bisect import insort
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


@dataclass(frozen=True)
class Piece:
    """One prefill piece of a mixed step, reserved by the scheduler: ``tokens`` appended to
    sequence ``seq`` from position ``start`` (a multiple of the chunk size; the earlier tokens are
    committed), their K/V to be written at ``slots`` (what ``cache.reserve`` returned). ``last``:
    the piece ends the sequence's prefill, so its last row gives the request's next token."""

    seq: int
    start: int
    tokens: list
    slots: object
    last: bool


@runtime_checkable
class StepBackend(Protocol):
    """A backend that runs a whole mixed step (``Server(step_tokens=N)`` only): its cache,
    ``stats`` (an ``AttentionStats``), ``label``, ``sync`` as ``AttentionBackend`` has, and

        mixed_step(seqs, tokens, slots, pieces) -> next tokens (Python ints)

    ``seqs`` / ``tokens``: the decode rows (one token per running sequence, reserved together at
    ``slots``, what ``cache.reserve_batch`` returned; empty lists and None slots when no request
    decodes), ``pieces``: the step's ``Piece`` list. It writes every row's K/V, runs the model,
    commits every sequence of the step, and returns one token per decode row, then one per piece
    with ``last`` set, in order (greedy)."""

    cache: object
    stats: object
    label: str

    def sync(self) -> None: ...
    def mixed_step(self, seqs: list, tokens: list, slots, pieces: list) -> list: ...


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
    state: str = "waiting"  # waiting -> running -> finished (mixed steps: waiting -> prefilling ->
    # running -> finished, and back to "preempted" (waiting again) when the pool runs out)
    preemptions: int = 0  # times released to make room, recomputed later (mixed steps)
    waited: int = 0  # steps after its arrival, before it finished, in which it got no token of work
    first_token_step: int | None = None  # the step that produced its first generated token
    ttft_s: float | None = None  # server time from the start of its arrival step to its first token
    kv_tokens: int = 0  # K/V rows computed for it (prefill and decode), recomputation included

    @property
    def recomputed(self) -> int:
        """K/V rows computed again after a preemption: ``kv_tokens`` less what one pass needs
        (the prompt not reused from the cache, and every generated token but the last)."""
        return max(0, self.kv_tokens - self.computed - max(0, len(self.output) - 1))

    def summary(self) -> dict:
        """Per-request numbers of the report: time to first token (steps and server seconds),
        steps waited, preemptions, recomputed K/V rows, tokens generated."""
        ttft_steps = None if self.first_token_step is None else self.first_token_step - self.arrival + 1
        return dict(rid=self.rid, arrival=self.arrival, prompt=len(self.prompt), tokens=len(self.output),
                    first_token_step=self.first_token_step, ttft_steps=ttft_steps, ttft_s=self.ttft_s,
                    waited=self.waited, preemptions=self.preemptions, reused=self.reused,
                    recomputed=self.recomputed)


@dataclass
class ServingReport:
    """Numbers of one ``Server.run`` (times exclude the dense check).

    Mixed steps (``mode == "mixed"``): prefill and decode share every step, so ``prefill_s`` is 0,
    ``decode_s`` is the time of all steps, ``prefill_request_s``, ``decode_step_s`` and
    ``decode_step_batch`` stay empty and the per-step lists are ``step_s``, ``step_tokens``
    (tokens of the step, decode and prefill, never above ``token_budget``) and ``step_decode``
    (its decode tokens); ``decode_steps`` counts the steps with a decode token.
    """

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
    mode: str = "prefill-then-decode"  # or "mixed" (Server(step_tokens=...))
    token_budget: int | None = None  # step_tokens of a mixed run
    step_s: list = field(default_factory=list)  # mixed: seconds of each step
    step_tokens: list = field(default_factory=list)  # mixed: tokens of each step (decode + prefill)
    step_decode: list = field(default_factory=list)  # mixed: decode tokens of each step
    preemptions: int = 0
    recomputed: int = 0  # K/V rows computed again after preemptions
    per_request: list = field(default_factory=list)  # Request.summary() of every request served

    def ttft(self) -> dict:
        """Time to first token over the requests: median and max, in steps and server seconds."""
        steps = [r["ttft_steps"] for r in self.per_request if r["ttft_steps"] is not None]
        secs = [r["ttft_s"] for r in self.per_request if r["ttft_s"] is not None]
        if not steps:
            return {}
        return dict(median_steps=float(np.median(steps)), max_steps=int(max(steps)),
                    median_s=float(np.median(secs)), max_s=float(max(secs)))

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
        if self.mode == "mixed":
            n, t = len(self.step_s), self.ttft()
            total = sum(self.step_tokens)
            out.append(
                f"  mixed steps (budget {self.token_budget} tokens): {n} steps, {total / max(1, n):.1f} tokens/step "
                f"(max {max(self.step_tokens, default=0)}), {self.decode_tokens} decode + "
                f"{total - self.decode_tokens} prefill tokens; {self.preemptions} preemptions "
                f"({self.recomputed} K/V rows recomputed)")
            if t:
                out.append(f"  time to first token: median {t['median_steps']:.1f} steps / {1e3 * t['median_s']:.1f} ms, "
                           f"max {t['max_steps']} steps / {1e3 * t['max_s']:.1f} ms; steps waited: max "
                           f"{max(r['waited'] for r in self.per_request)}")
            out.append(f"  speed ({self.backend}): {total / max(self.decode_s, 1e-9):.0f} tok/s "
                       f"({1e3 * self.decode_s / max(1, n):.1f} ms/step); {self.plans_built} decode plans for "
                       f"{self.decode_steps} steps with decode tokens x {len(self.recall)} layers")
            return self._agreement_lines(out)
        out.append(
            f"  speed ({self.backend}): prefill {self.prefill_computed / max(self.prefill_s, 1e-9):.0f} tok/s, "
            f"decode {self.decode_tokens / max(self.decode_s, 1e-9):.0f} tok/s "
            f"({1e3 * self.decode_s / steps:.1f} ms/step, {self.decode_tokens / steps:.1f} requests/step); "
            f"{self.plans_built} decode plans for {self.decode_steps} steps x {len(self.recall)} layers")
        return self._agreement_lines(out)

    def _agreement_lines(self, out: list) -> list[str]:
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
            running request, all layers), or ``"step"`` (a mixed step: the requests it served);
            seconds between two ``backend.sync()`` calls.
        step_tokens: None (the default) serves as described in the module docstring: each
            admitted request's whole prompt, then one decode step for all. An integer N >=
            ``chunk_size`` runs mixed steps of at most N tokens (docs/design.md, *Mixed steps
            and preemption*): first one decode token per running request, then prefill pieces
            (each a multiple of ``chunk_size`` but a prompt's last, at most ``prefill_chunk``)
            of admitted and then newly arrived requests in order until the budget is used; at
            most ``min(max_batch, N)`` requests are admitted at once. Admission needs room for
            the first piece only; when the pool runs out the most recently admitted requests
            are preempted and recomputed later, so nothing is lost. A ``StepBackend`` (one that
            runs whole steps, e.g. ``MixedStepBackend`` of the real model) needs it.
    """

    def __init__(self, model: ServingModel, num_chunks: int, chunk_size: int = 16, prefill_chunk: int = 64,
                 backend: str | AttentionBackend = "numpy", options: PrefillOptions = PrefillOptions(),
                 measure_recall: bool = True, max_batch: int = 256, trace: bool = False,
                 on_step: StepHook | None = None, step_tokens: int | None = None):
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
        check_optional_int(step_tokens, "step_tokens", chunk_size)
        self.model, self.chunk_size, self.prefill_chunk, self.max_batch = model, chunk_size, prefill_chunk, max_batch
        self.step_tokens = step_tokens
        self._whole_steps = callable(getattr(backend, "mixed_step", None))  # a StepBackend
        if self._whole_steps:
            if step_tokens is None:
                raise ValueError(f"step_tokens: expected an integer >= chunk_size {chunk_size} with a backend that "
                                 f"runs whole mixed steps ({type(backend).__name__}), got None")
            if backend.cache.chunk_size != chunk_size:
                raise ValueError(f"chunk_size: expected the backend cache's chunk size {backend.cache.chunk_size}, "
                                 f"got {chunk_size}")
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
        self._clock += dt
        if self.on_step is not None:
            self.on_step(kind, dt, requests)
        return dt

    # ---------------------------------------------------------------- the loop
    def run(self, poll: Callable[["Server"], bool] | None = None) -> ServingReport:
        """Serve every submitted request that is not finished; returns this run's numbers.

        ``poll`` (mixed steps only): called as ``poll(server)`` at the start of every step; it
        may ``submit`` requests (arriving at the current step by default) and returns whether
        more will come. While it says so the run goes on when nothing is live, calling it again
        each idle turn (no step runs, ``server.step`` does not advance): a poll that waits for
        its next arrival (e.g. sleeps until it) serves requests arriving in wall-clock time.
        """
        if poll is not None and not callable(poll):
            raise TypeError(f"poll: expected None or a callable, got {type(poll).__name__}")
        if self.step_tokens is not None:
            return self._run_mixed(poll)
        if poll is not None:
            raise ValueError("poll: expected None without step_tokens (requests submitted during a run are served "
                             "by mixed steps only), got a callable")
        cfg, cache = self.model.config, self.cache
        todo = [r for r in self.requests if r.state != "finished"]
        waiting = sorted((r for r in todo if r.state in ("waiting", "queued")), key=lambda r: (r.arrival, r.rid))
        running = [r for r in todo if r.state == "running"]
        self.backend.stats = AttentionStats(cfg.num_layers)
        self._n_chunks, evictions = 0, 0
        prefill_s, step_s, step_batch = [], [], []
        peak = cache.stats()
        self._clock, step_clock, first = 0.0, {}, self.step

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
            step_clock[self.step] = self._clock
            # admit arrived requests in order while they fit (FIFO: no overtaking)
            while waiting and waiting[0].arrival <= self.step and len(running) < self.max_batch \
                    and self._admit(waiting[0], running):
                r = waiting.pop(0)
                before = self._lru()
                self._timed("prefill", lambda r=r: self._prefill(r), [r], prefill_s)
                r.first_token_step, r.kv_tokens = self.step, r.kv_tokens + r.computed
                r.ttft_s = self._clock - step_clock[max(r.arrival, first)]
                evictions += evicted(before)
                if len(r.output) >= r.max_new_tokens:
                    finish(r)
                else:
                    running.append(r)
            for r in waiting:
                r.waited += r.arrival <= self.step
            if running:
                before, plans = self._lru(), self.backend.stats.plans_built
                step_batch.append(len(running))
                for r in running:
                    r.kv_tokens += 1
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
            decode_step_batch=step_batch, per_request=[r.summary() for r in todo])

    # ---------------------------------------------------------------- mixed steps
    def _tokens(self, r: Request) -> list:
        """What a request's sequence holds when caught up: its prompt and every generated token
        (the last one's K/V is the next decode step's, or the end of a recompute's prefill)."""
        return r.prompt + r.output

    def _room(self) -> int:
        """Chunks a reservation may take now: free, or cached and evictable (LRU)."""
        return self.cache.num_free + self.cache.num_cached

    def _preempt(self, r: Request, admitted: list, waiting: list, why: str) -> None:
        """Release ``r`` (its complete chunks stay cached, matchable) and queue it again in
        arrival order, to be recomputed from its prompt plus the tokens it generated."""
        self.cache.release(r.seq)
        admitted.remove(r)
        r.seq, r.state = None, "preempted"
        r.preemptions += 1
        insort(waiting, r, key=lambda x: (x.arrival, x.rid))
        self._note(f"r{r.rid} preempted ({why}): {len(r.output)} tokens kept for its recompute; the pool holds "
                   f"{self.cache.num_cached} cached, {self.cache.num_free} free chunks")

    def _piece(self, r: Request, left: int) -> int:
        """Tokens of ``r``'s next prefill piece within ``left`` budget tokens: the rest of its
        tokens when that fits, else the largest multiple of the chunk size (0: none fits)."""
        rest = len(self._tokens(r)) - self.cache.seq_len(r.seq)
        limit = min(left, self.prefill_chunk)
        return rest if rest <= limit else limit // self.chunk_size * self.chunk_size

    def _reserve_piece(self, r: Request, n: int):
        """Reserve up to ``n`` tokens of ``r``'s prefill, fewer (a multiple of the chunk size)
        when the pool has less room; returns (start, tokens, slots) or None when nothing fits.
        A piece starts at a chunk boundary (a matched prefix and earlier pieces are whole
        chunks), so n tokens take ceil(n / c) new chunks."""
        c, start = self.chunk_size, self.cache.seq_len(r.seq)
        fit = n if cdiv(n, c) <= self._room() else self._room() * c
        if fit <= 0:
            return None
        toks = self._tokens(r)[start:start + fit]
        try:
            return start, toks, self.cache.reserve(r.seq, toks)
        except CacheFullError:  # a cache whose counters say more than it has (not the chunk tree)
            return None

    def _schedule(self, admitted: list, waiting: list):
        """Reserve this step's work: (decode requests, their slots, prefill pieces
        [(request, start, tokens, slots)]); preempts and admits as the module docstring says."""
        cache, budget = self.cache, self.step_tokens
        decode = [r for r in admitted if r.state == "running"]
        slots, preempted = None, False
        while decode:  # 1. one decode token per running request; preempt the latest until they fit
            try:
                slots = cache.reserve_batch([r.seq for r in decode], [r.output[-1] for r in decode])
                break
            except CacheFullError:
                if len(admitted) == 1:
                    raise CacheFullError(f"pool: request {decode[0].rid} alone needs more than the "
                                         f"{cache.num_chunks} chunks of the pool; make the pool larger") from None
                victim = admitted[-1]
                self._preempt(victim, admitted, waiting, "decode needs room")
                preempted = True
                if victim in decode:
                    decode.remove(victim)
        left, pieces, stuck = budget - len(decode), [], False
        i = 0
        while i < len(admitted) and left > 0:  # 2. pieces of requests admitted earlier, in order
            r = admitted[i]
            i += 1
            if r.state != "prefilling":
                continue
            n = self._piece(r, left)
            if n == 0:
                break
            got = self._reserve_piece(r, n)
            while got is None:  # preempt the latest request still prefilling (it holds no slots yet)
                later = [x for x in admitted[i:] if x.state == "prefilling"]
                if not later:
                    break
                self._preempt(later[-1], admitted, waiting, f"r{r.rid}'s prefill needs room")
                preempted = True
                got = self._reserve_piece(r, n)
            if got is None:
                stuck = True  # it waits for running requests to finish; nobody overtakes it
                break
            pieces.append((r,) + got)
            left -= len(got[1])
        # 3. admit arrived requests in order (FIFO: no overtaking), not in a step that preempted
        cap = min(self.max_batch, budget)
        while waiting and waiting[0].arrival <= self.step and len(admitted) < cap and left > 0 \
                and not stuck and not preempted:
            r = waiting[0]
            toks = self._tokens(r)
            need = self._chunks_for(len(r.prompt) + r.max_new_tokens - 1)
            if need > cache.num_chunks:
                raise CacheFullError(f"pool: request {r.rid} needs {need} chunks, the pool has "
                                     f"{cache.num_chunks}; make the pool larger")
            r.seq = cache.add_sequence(toks, max_match=len(toks) - 1)  # takes the cached prefix only
            n = self._piece(r, left)
            got = self._reserve_piece(r, n) if n else None
            if got is None:
                cache.release(r.seq)  # not now: its matched chunks go back to the prefix cache
                r.seq = None
                if r.state == "waiting":
                    self._note(f"r{r.rid} waits: {self._room()} free or evictable chunks, "
                               f"{left} budget tokens")
                    r.state = "queued"
                break
            waiting.pop(0)
            if r.preemptions == 0:  # its first admission
                r.reused, r.computed = got[0], len(r.prompt) - got[0]
            self._note(f"r{r.rid} admitted: {len(toks)} tokens, {got[0]} reused from the cache")
            r.state = "prefilling"
            admitted.append(r)
            pieces.append((r,) + got)
            left -= len(got[1])
        return decode, slots, pieces

    def _mixed_step(self, decode: list, slots, pieces: list) -> list:
        """One pass of the model over the step's tokens: the decode rows, then each piece.
        Per layer: q, k, v of every row, K/V written, ChunkAttention for the decode rows and
        CompactAttention per piece, one ``finish_layer`` for all. Returns the requests that got
        a token (decode rows, and pieces that ended their sequence's prefill). A ``StepBackend``
        runs the whole step instead (``mixed_step``)."""
        model, cache, backend = self.model, self.cache, self.backend
        if self._whole_steps:
            work = [Piece(r.seq, start, ptoks, ps, start + len(ptoks) == len(self._tokens(r)))
                    for r, start, ptoks, ps in pieces]
            nxt = backend.mixed_step([r.seq for r in decode], [r.output[-1] for r in decode], slots, work)
            got = list(decode) + [r for (r, *_), p in zip(pieces, work) if p.last]
            if len(nxt) != len(got):
                raise RuntimeError(f"{type(backend).__name__}.mixed_step: expected {len(got)} next tokens (decode "
                                   f"rows, then pieces that end a prefill), got {len(nxt)}")
            self._n_chunks += len(pieces)
            for r, t in zip(got, nxt):
                r.output.append(int(t))
            return got
        nd = len(decode)
        seqs = [r.seq for r in decode]
        toks = [r.output[-1] for r in decode]
        pos = [cache.seq_len(s) - 1 for s in seqs]
        bounds = []
        for r, start, ptoks, _ in pieces:
            bounds.append((len(toks), len(toks) + len(ptoks)))
            toks += ptoks
            pos += range(start, start + len(ptoks))
        pos = np.asarray(pos, np.int64)
        xp = getattr(model, "xp", np)
        x = model.embed(toks)
        for layer in range(model.config.num_layers):
            q, k, v = model.qkv(layer, x, pos)
            if nd:
                cache.write_kv(layer, slots, k[:nd], v[:nd])
            for (lo, hi), (_, _, _, ps) in zip(bounds, pieces):
                cache.write_kv(layer, ps, k[lo:hi], v[lo:hi])
            outs = [backend.decode(seqs, q[:nd], layer)] if nd else []
            outs += [backend.prefill(r.seq, q[lo:hi], layer) for (lo, hi), (r, *_) in zip(bounds, pieces)]
            x = model.finish_layer(layer, x, outs[0] if len(outs) == 1 else xp.concatenate(outs))
        for s in seqs:
            cache.commit(s)
        got, rows = list(decode), list(range(nd))
        for (lo, hi), (r, start, ptoks, _) in zip(bounds, pieces):
            cache.commit(r.seq)  # the piece's full pages are now matchable by other prompts
            self._n_chunks += 1
            if start + len(ptoks) == len(self._tokens(r)):  # caught up: its last row gives the next token
                got.append(r)
                rows.append(hi - 1)
        for r, t in zip(got, model.greedy(x[xp.asarray(np.asarray(rows, np.int64))]) if rows else []):
            r.output.append(t)
        return got

    def _run_mixed(self, poll=None) -> ServingReport:
        """``run`` with mixed steps (``step_tokens``)."""
        cfg, cache = self.model.config, self.cache
        more = bool(poll(self)) if poll is not None else False  # requests it submits now are in todo
        todo = [r for r in self.requests if r.state != "finished"]
        admitted = [r for r in todo if r.seq is not None]  # left live by an interrupted run
        for r in admitted:
            r.state = "running" if cache.seq_len(r.seq) == len(self._tokens(r)) - 1 else "prefilling"
        waiting = sorted((r for r in todo if r.seq is None), key=lambda r: (r.arrival, r.rid))
        self.backend.stats = AttentionStats(cfg.num_layers)
        self._n_chunks, evictions, self._clock = 0, 0, 0.0
        step_s, step_tokens, step_decode, step_clock, first = [], [], [], {}, self.step
        peak = cache.stats()

        def finish(r):
            cache.release(r.seq)
            admitted.remove(r)
            r.state, r.seq = "finished", None
            self._note(f"r{r.rid} finished ({len(r.output)} tokens) and released; the pool holds "
                       f"{cache.num_cached} cached, {cache.num_referenced} referenced, {cache.num_free} free chunks")

        known, polled = len(self.requests), True
        while waiting or admitted or more:
            if poll is not None and not polled:
                more = bool(poll(self))
            polled = False
            for r in self.requests[known:]:  # submitted by poll during the run
                todo.append(r)
                insort(waiting, r, key=lambda x: (x.arrival, x.rid))
            known = len(self.requests)
            if not (admitted or waiting):  # nothing live, nothing to come at a later step
                if more:
                    continue  # idle: poll again (no step)
                break
            step_clock[self.step] = self._clock
            live = [r for r in todo if r.state != "finished" and r.arrival <= self.step]
            served: list = []
            plan = {}

            def work():
                before = {id(n): n for n in cache.cached_nodes()}
                plan["decode"], slots, plan["pieces"] = self._schedule(admitted, waiting)
                served.extend(plan["decode"] + [p[0] for p in plan["pieces"]])
                if served:
                    plan["got"] = self._mixed_step(plan["decode"], slots, plan["pieces"])
                now = {id(n) for n in cache.cached_nodes()}
                plan["evicted"] = sum(1 for k, n in before.items() if k not in now and n.ref == 0)

            if admitted or (waiting and waiting[0].arrival <= self.step):
                self._timed("step", work, served, step_s)
                if not served:  # cannot happen while one request fits the pool alone: never loop idle
                    raise CacheFullError(f"pool: no request could run in step {self.step} ({cache.num_referenced} "
                                         f"of {cache.num_chunks} chunks referenced); make the pool larger")
            evictions += plan.get("evicted", 0)
            if served:
                n_tok = len(plan["decode"]) + sum(len(p[2]) for p in plan["pieces"])
                step_tokens.append(n_tok)
                step_decode.append(len(plan["decode"]))
                for r in plan["decode"]:
                    r.kv_tokens += 1
                for r, _, ptoks, _ in plan["pieces"]:
                    r.kv_tokens += len(ptoks)
                self._note(f"step: decode {' '.join(f'r{r.rid}' for r in plan['decode']) or '-'}; prefill "
                           + (" ".join(f"r{r.rid}+{len(t)}" for r, _, t, _ in plan["pieces"]) or "-")
                           + f" ({n_tok} of {self.step_tokens} tokens)")
                for r in plan["got"]:
                    if r.first_token_step is None:
                        r.first_token_step = self.step
                        r.ttft_s = self._clock - step_clock[max(r.arrival, first)]
                    r.state = "running"
                st = cache.stats()
                if st["tokens_flat"] > peak["tokens_flat"]:
                    peak = st
                for r in [r for r in plan["got"] if len(r.output) >= r.max_new_tokens]:
                    finish(r)
            for r in live:
                r.waited += r not in served
            self.step += 1

        st = self.backend.stats
        return ServingReport(
            backend=self.backend.label, requests=len(todo), prompt_tokens=sum(len(r.prompt) for r in todo),
            prefill_reused=sum(r.reused for r in todo), prefill_computed=sum(r.computed for r in todo),
            prefill_chunks=self._n_chunks, prefill_s=0.0, decode_steps=sum(1 for d in step_decode if d),
            decode_tokens=sum(step_decode), decode_s=sum(step_s), plans_built=st.plans_built,
            decode_calls=st.decode_calls, peak=peak,
            bytes_per_token=2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2, evictions=evictions,
            density=st.density, recall=st.recall, mode="mixed", token_budget=self.step_tokens, step_s=step_s,
            step_tokens=step_tokens, step_decode=step_decode, preemptions=sum(r.preemptions for r in todo),
            recomputed=sum(r.recomputed for r in todo), per_request=[r.summary() for r in todo])


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
