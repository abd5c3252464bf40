"""The whole decode step of a ``LlamaModel`` on the GPU as one CUDA graph.

Eager, a decode step of the 30-layer SmolLM2 is some 1800 small CuPy launches, each paying
Python and launch overhead: at batch 16 it took 225 ms. ``GraphedDecoder`` records the step once
and replays it:

    dec = GraphedDecoder(model, attn)            # attn: CacheAttention over a GpuChunkCache
    nxt = dec.step(seqs, tokens)                 # greedy next tokens, host int64 [B]

What one replay does (``forward``), per layer ~10 launches: the fused RMSNorm (+ residual add),
the q|k|v product (cuBLAS, called directly: ``cpattn.serving.cublas``), RoPE and the split into q, k, v (``rope_split``), the K/V write
(``GpuChunkCache.write_kv_device``), ChunkAttention's two launches, the output product, the
fused residual add + RMSNorm, the gate|up product, SwiGLU (``silu_mul``), the down product;
then the final norm, the logits product and the greedy pick (``argmax_rows``), all kernels of
raw_kernels/model_ops.cu and raw_kernels/chunk_*.cu. The numbers are the eager model's
(``LlamaModel.decode``), operation for operation; only the sums of squares of RMSNorm are added
in another order.

What stays on the host, per step: the batch's ``reserve`` (the tree; ``GpuDecodeBatch``), the
launch, the commits (while the graph replays) and the download of the B next tokens (the tree
needs them). The step's last launch, ``advance_step``, leaves the device ready for the next
step: the picked tokens as its input, every row's slot one row on, its position one on, and
the cache's device length table one longer at the row's slot. When the next reserve did exactly
that (no sequence started a chunk, nothing else changed the length table: the cache tracks it,
``GpuDecodeBatch.lens_current``) and the tokens are the ones the step returned, nothing is
checked again or uploaded. Otherwise the slots and positions go up in one copy from pinned
memory (int32 [3, B]) and the length table with ``sync_lens``.

The graph stays valid while the plan does: the decode plan reads sequence lengths from the
device, so it changes only when some sequence starts a new chunk (a reserved slot at offset 0)
or the batch changes; then the plan is rebuilt and the step captured again (about once per
``chunk_size`` steps).

Memory: every buffer the step reads or writes is allocated once per batch, outside the graph;
the capture runs on a private CuPy memory pool (a graph must own what it writes: memory freed
during the capture must never be handed to anyone else while the graph lives).

Only float16 storage is graphed (the fp16 weights are what cuBLAS multiplies; CuPy has no
bfloat16 dtype, so a bf16 model runs eager).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..arrays import host_jit
from ..reference.checks import check_bool
from ..reference.chunk_attention import check_plan
from .cublas import CublasGemm
from .llama import CacheAttention, LlamaModel

BLOCK = 256  # threads per block of the row kernels of model_ops.cu


@host_jit
def _next_meta(meta, chunk, offset, pos):
    """meta[:, b] = (chunk[b], offset[b], pos[b]), this step's slots and positions; returns True
    when every one is what advance_step made of the last step's (same chunk, the next offset,
    the next position)."""
    same = True
    for b in range(meta.shape[1]):
        if meta[0, b] != chunk[b] or meta[1, b] + 1 != offset[b] or meta[2, b] + 1 != pos[b]:
            same = False
        meta[0, b], meta[1, b], meta[2, b] = chunk[b], offset[b], pos[b]
    return same


@dataclass
class StepTimes:
    """Host seconds per decode step, by part (``GraphedDecoder.times``)."""

    check: list = field(default_factory=list)  # the batch and the tokens checked (skipped for the last step's own picks)
    reserve: list = field(default_factory=list)  # the batch's reserve
    upload: list = field(default_factory=list)  # the uploads of tokens and slots (none on most steps)
    plan: list = field(default_factory=list)  # plan rebuild, or the length table's upload (none on most steps)
    capture: list = field(default_factory=list)  # capture + instantiation (0 on replay steps)
    launch_call: list = field(default_factory=list)  # the graph launch call itself
    commit: list = field(default_factory=list)  # the commits, done while the graph replays
    launch: list = field(default_factory=list)  # graph launch until the next tokens are on the host
    fresh: list = field(default_factory=list)  # True: the device state was the last step's advance (no upload)
    replans: int = 0  # steps that built a new plan (a capture, or the plan written into the captured one's buffers)

    @property
    def captures(self) -> int:
        return sum(1 for c in self.capture if c > 0)

    def summary(self) -> dict:
        med = lambda a: float(np.median(a)) * 1e6 if a else 0.0  # noqa: E731
        replay = [i for i, c in enumerate(self.capture) if c == 0]
        new = [i for i, c in enumerate(self.capture) if c > 0]
        pick = lambda a, idx: [a[i] for i in idx]  # noqa: E731
        host = [self.check[i] + self.reserve[i] + self.upload[i] + self.plan[i] + self.launch_call[i] + self.commit[i]
                for i in range(len(self.launch))]
        return dict(steps=len(self.launch), captures=len(new), replans=self.replans, fresh_steps=int(sum(self.fresh)),
                    host_check_us=med(pick(self.check, replay)), host_reserve_us=med(pick(self.reserve, replay)),
                    host_upload_us=med(pick(self.upload, replay)), host_lens_us=med(pick(self.plan, replay)),
                    host_launch_call_us=med(pick(self.launch_call, replay)),
                    host_commit_us=med(pick(self.commit, replay)),
                    # everything the host does in a replayed step: checks, reserve, uploads, the
                    # launch call and the commits (not the wait for the tokens)
                    host_step_us=med(pick(host, replay)),
                    host_step_us_p90=float(np.percentile(pick(host, replay), 90)) * 1e6 if replay else 0.0,
                    launch_to_tokens_us=med(pick(self.launch, replay)),
                    plan_ms=1e3 * float(np.mean(pick(self.plan, new))) if new else 0.0,
                    capture_ms=1e3 * float(np.mean(pick(self.capture, new))) if new else 0.0,
                    first_step_s=(host[0] + self.capture[0] + self.launch[0]) if self.launch else 0.0)


@dataclass
class Captured:
    """A CUDA graph and the private memory pool that holds what it allocated (kept together)."""

    graph: object
    pool: object

    def launch(self, stream) -> None:
        self.graph.launch(stream)


class GraphedDecoder:
    """Greedy decode steps of ``model`` over ``attn.cache`` (a ``GpuChunkCache``), one CUDA graph
    per plan. ``graph=False`` runs the same launches eagerly (for comparison and profiling)."""

    def __init__(self, model: LlamaModel, attn: CacheAttention, *, graph: bool = True):
        import cupy

        from ..kernels import get_kernels

        cache = attn.cache
        if model.xp is not cupy or getattr(cache, "backend", None) != "cupy":
            raise ValueError("model, attn: expected a CuPy model over a GpuChunkCache (the graphed decoder is GPU "
                             f"only), got a model on {model.xp.__name__} and a {cache.backend} cache")
        if model.dtype != "float16" or cache.dtype != "float16":
            raise ValueError(f"model.dtype: expected 'float16' for the graphed decoder (a bfloat16 model runs "
                             f"eager), got {model.dtype!r}")
        c = model.config
        if (cache.num_layers, cache.num_kv_heads, cache.head_dim) != (c.num_layers, c.num_kv_heads, c.head_dim):
            raise ValueError(f"attn.cache: expected the model's geometry (layers, kv heads, head_dim) = "
                             f"{(c.num_layers, c.num_kv_heads, c.head_dim)}, got "
                             f"{(cache.num_layers, cache.num_kv_heads, cache.head_dim)}")
        self.model, self.attn, self.cache, self.cupy = model, attn, cache, cupy
        self.graph_enabled = check_bool(graph, "graph")
        self.kern = get_kernels("model_ops", cache.dtype, cache.head_dim, cache.chunk_size)
        self.gemm = CublasGemm()  # CuPy's own matmul refuses to run during a capture
        positions = cache.num_chunks * cache.chunk_size  # no sequence is longer than the pool
        ang = np.arange(positions, dtype=np.float64)[:, None] * c.inv_freq()[None, :]  # as LlamaModel's tables
        self.cos = cupy.asarray(np.cos(ang).astype(np.float32))
        self.sin = cupy.asarray(np.sin(ang).astype(np.float32))
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.times = StepTimes()
        self.seqs: tuple | None = None
        self.graph = None
        self._warm = False
        self._last = None  # the tokens the last step returned (host)
        self.batch = None  # the cache's decode batch of self.seqs (steps without given slots)

    # ------------------------------------------------------------------ buffers of one batch
    def _buffers(self, B: int) -> None:
        cp, c = self.cupy, self.model.config
        h, D, Hq, Hkv = c.hidden_size, c.head_dim, c.num_q_heads, c.num_kv_heads
        f16 = np.float16
        self.tok_in = cp.zeros(B, np.int64)
        self.tok_out = cp.zeros(B, np.int64)
        self.meta = cp.zeros((3, B), np.int32)  # slot chunk, slot offset, position
        self._meta_host = np.frombuffer(cp.cuda.alloc_pinned_memory(3 * B * 4), np.int32, 3 * B).reshape(3, B)
        self.row_slot = cp.zeros(B, np.int32)  # each row's slot in the cache's length table
        self._advanced = False  # the device state (meta, lengths, tok_in) is what advance_step made of the last step
        self.x = cp.empty((B, h), np.float32)
        self.h16 = cp.empty((B, h), f16)
        self.qkv = cp.empty((B, (Hq + 2 * Hkv) * D), f16)
        self.q = cp.empty((B, Hq, D), f16)
        self.k = cp.empty((B, Hkv, D), f16)
        self.v = cp.empty((B, Hkv, D), f16)
        self.o = cp.empty((B, Hq, D), f16)
        self.proj = cp.empty((B, h), f16)
        self.gu = cp.empty((B, 2 * c.intermediate_size), f16)
        self.act = cp.empty((B, c.intermediate_size), f16)
        self.logits = cp.empty((B, c.vocab_size), f16)

    # ------------------------------------------------------------------ the step's launches
    def forward(self, parts: str = "all", copy_back: bool = True) -> None:
        """Every launch of one step on the current stream (what the graph records).

        ``parts``: "all", or "attention" (K/V writes and attention only) / "model" (everything
        else) for the profile. ``copy_back`` feeds the picked tokens to the next step's input.
        """
        cp, m, c, cache = self.cupy, self.model, self.model.config, self.cache
        kern, B = self.kern, len(self.seqs)
        h, eps = c.hidden_size, np.float32(c.rms_eps)
        att, mod = parts in ("all", "attention"), parts in ("all", "model")
        none = np.uint64(0)  # a null pointer: no residual to add
        mm, st = self.gemm, cp.cuda.get_current_stream()
        if mod:
            kern["embed_rows"]((B,), (BLOCK,), (m.embed, self.tok_in, self.x, np.int32(h)))
        for layer, w in enumerate(m.layers):
            if mod:
                kern["add_rms_norm"]((B,), (BLOCK,), (self.x, none if layer == 0 else self.proj, w["attn_norm"],
                                                      self.h16, np.int32(h), eps))
                mm(self.h16, w["qkv"], self.qkv, st)
                kern["rope_split"]((B,), (BLOCK,), (self.qkv, self.meta[2], self.cos, self.sin, self.q, self.k,
                                                    self.v, np.int32(c.num_q_heads), np.int32(c.num_kv_heads)))
            if att:
                cache.write_kv_device(layer, self.meta[0], self.meta[1], self.k, self.v)
                self.attn.decoder.run(self.q, layer, out=self.o)
            if mod:
                mm(self.o.reshape(B, -1), w["o"], self.proj, st)
                kern["add_rms_norm"]((B,), (BLOCK,), (self.x, self.proj, w["ffn_norm"], self.h16, np.int32(h), eps))
                mm(self.h16, w["gate_up"], self.gu, st)
                n = B * c.intermediate_size
                kern["silu_mul"](((n + BLOCK - 1) // BLOCK,), (BLOCK,),
                                 (self.gu, self.act, np.int32(c.intermediate_size), np.int64(n)))
                mm(self.act, w["down"], self.proj, st)
        if mod:
            kern["add_rms_norm"]((B,), (BLOCK,), (self.x, self.proj, m.final_norm, self.h16, np.int32(h), eps))
            mm(self.h16, m.output, self.logits, st)
            kern["argmax_rows"]((B,), (BLOCK,), (self.logits, self.tok_out, np.int32(c.vocab_size)))
            if copy_back:  # the next step's tokens, slots, positions and lengths (advance_step)
                kern["advance_step"](((B + BLOCK - 1) // BLOCK,), (BLOCK,),
                                     (self.tok_out, self.tok_in, self.meta, cache.d_slot_lens, self.row_slot,
                                      np.int32(B)))

    def capture(self, parts: str = "all", copy_back: bool = True):
        """A CUDA graph of ``forward(parts)`` (on a private memory pool kept with it)."""
        cp = self.cupy
        pool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(pool.malloc), self.stream:
            if not self._warm:  # first use: kernels loaded, cuBLAS handles and heuristics made, outside a capture
                self.forward(parts, copy_back=False)
                self.stream.synchronize()
                self._warm = True
            self.stream.begin_capture()
            try:
                self.forward(parts, copy_back)
            finally:
                graph = self.stream.end_capture()
        return Captured(graph, pool)

    # ------------------------------------------------------------------ one step
    def step(self, seqs, tokens, *, slots=None) -> np.ndarray:
        """Append ``tokens[b]`` to ``seqs[b]`` and return the greedy next tokens (host int64 [B]).

        The sequences must be committed (prefilled); ``tokens`` are what the previous step (or
        the prefill) picked. Like ``LlamaModel.decode``, the step commits every sequence.

        ``slots``: None (the step reserves the tokens), or what ``cache.reserve_batch(seqs,
        tokens)`` returned when the caller reserved them already (the server's scheduler reserves
        a mixed step's decode rows before it runs; ``MixedStepBackend``): the step then writes
        the K/V there and reserves nothing.
        """
        cache = self.cache
        t0 = time.perf_counter()
        if slots is None:  # the batch's state in arrays (GpuDecodeBatch): no per-sequence Python on most steps
            key = seqs if isinstance(seqs, tuple) else tuple(seqs)
            if self.batch is None or key != self.batch.seqs:
                self.batch = cache.decode_batch(seqs)  # checks the batch: live, distinct, committed
            batch = self.batch
            if tokens is self._last and len(tokens) == len(batch):
                toks = tokens  # the last step's own picks: int64 ids below the vocabulary
            else:
                toks = batch.check_tokens(tokens)
                self.model.check_vocab(toks)  # the vocabulary: the cache cannot know it
            tc = time.perf_counter()
            slots = batch.reserve(toks)  # checks room and state; raises with nothing changed
            seqs, pos, opened = batch.seqs, batch.positions, batch.num_opened > 0
        else:
            batch = None
            self.model.check_vocab(cache.check_tokens(tokens, "tokens"))
            seqs, toks = tuple(cache.check_batch(seqs)), np.asarray(cache.check_tokens(tokens, "tokens"), np.int64)
            if len(slots.chunk) != len(seqs) or len(toks) != len(seqs):
                raise ValueError(f"slots: expected one reserved slot and one token per sequence ({len(seqs)}), got "
                                 f"{len(slots.chunk)} slots and {len(toks)} tokens")
            pos = np.array([cache.seq_len(s) - 1 for s in seqs], np.int32)  # of the token just reserved
            opened = bool((slots.offset == 0).any())
            tc = time.perf_counter()
        tr = time.perf_counter()
        new_batch = seqs != self.seqs
        if new_batch:
            self.seqs, self.graph = seqs, None
            self._buffers(len(seqs))
            self.row_slot.set(batch.row_slots if batch is not None else
                              np.array([cache.seq_slot(s) for s in seqs], np.int32))
        advanced, self._advanced = self._advanced, False  # False until this step's launch is on the stream
        self._input = toks
        with self.stream:
            if new_batch or (toks is not self._last and not np.array_equal(toks, self._last)):
                self.tok_in.set(toks, stream=self.stream)
            # The last step's advance_step moved every row one on; when this reserve did the same
            # (no new chunk, nothing else touched the length table) the device is current as it is.
            same = _next_meta(self._meta_host, slots.chunk, slots.offset, pos)
            fresh = (not new_batch and not opened and advanced and same and batch is not None
                     and batch.lens_current())
            if not fresh:
                self.meta.set(self._meta_host, stream=self.stream)  # pinned: an asynchronous copy
            tu = time.perf_counter()
            captured = 0.0
            if new_batch or opened:  # a new batch or a new chunk: a new plan
                self.attn.plan(seqs)  # uploads the plan and the lengths on this stream
                # the new plan in the old one's buffers, launched alike: the graph replays it as it is
                reused = not new_batch and self.graph is not None and self.attn.decoder.plan_reused
                if not reused:
                    tg = time.perf_counter()
                    self.graph = self.capture() if self.graph_enabled else None
                    captured = time.perf_counter() - tg
                self.times.replans += 1
            elif not fresh:
                cache.sync_lens()
            tp = time.perf_counter()
            if self.graph is not None:
                self.graph.launch(self.stream)
            else:
                self.forward()
            tl = time.perf_counter()
            # the step advances the device length table at the batch's rows (advance_step)
            if batch is not None:
                batch.lens_advanced()
            else:
                cache.lens_advanced()
            self._advanced = True
            if batch is not None:  # host bookkeeping only: overlaps the replay (the device keeps stream order)
                batch.commit()
            else:
                for s in seqs:
                    cache.commit(s)
            t3 = time.perf_counter()
            out = self.tok_out.get(stream=self.stream)  # waits for the step
        self._last = out
        t4 = time.perf_counter()
        t = self.times
        t.check.append(tc - t0), t.reserve.append(tr - tc), t.upload.append(tu - tr)
        t.plan.append(tp - tu - captured), t.capture.append(captured), t.launch_call.append(tl - tp)
        t.commit.append(t3 - tl), t.launch.append(t4 - tp), t.fresh.append(fresh)
        return out

    # ------------------------------------------------------------------ where the step goes
    def profile(self, timer) -> dict:
        """Device time of the captured step and of its parts (median ms of ``timer``, a
        ``cpattn.bench.timing.GpuTimer``), on the current plan. The parts replay the last step
        on its own inputs without feeding tokens back; then the whole step once more, so the
        cache and the next step are as the last step left them (a part alone is no step: the
        "attention" part writes every layer's K/V from the one k/v buffer, which holds the last
        layer's, and the "model" part feeds itself the last layer's attention output)."""
        if self.seqs is None or self.graph is None:
            raise RuntimeError("profile: expected a captured step (call step() with graph=True first)")
        check_plan(self.cache, self.attn.decoder.decode_plan)  # capturing anew needs the plan of now; nothing changed yet
        out = {}
        with self.stream:
            # the last step's own inputs (advance_step moved the device state on): the same K/V
            # rows, the same lengths
            self.tok_in.set(self._input, stream=self.stream)
            self.meta.set(self._meta_host, stream=self.stream)
            self.cache.sync_lens()  # the host table: the last step's lengths (the next reserve uploads again)
            self._advanced = False  # the next step uploads its slots and positions
            graphs = {}
            for part in ("all", "attention", "model"):
                graphs[part] = g = self.capture(part, copy_back=False)
                out[f"{part}_ms"] = timer.median_ms(lambda: g.launch(self.stream))
            graphs["all"].launch(self.stream)  # every layer's K/V and the picked tokens as the step made them
            self.tok_in.set(self._last, stream=self.stream)  # what the step's advance left for the next step
            self.stream.synchronize()
        return out


__all__ = ["GraphedDecoder", "StepTimes", "Captured"]
