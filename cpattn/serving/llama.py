"""A Llama-family decoder whose every attention call goes through cpattn's chunk tree.

The model is a pretrained one read from a GGUF file (``cpattn.serving.gguf``); only attention
is cpattn's, the rest is a few array operations on NumPy or CuPy::

    x = embed[tokens]                                               [n, hidden] float32
    per layer:
        h = rmsnorm(x) ; q, k, v = h @ Wq.T, h @ Wk.T, h @ Wv.T     [n, Hq | Hkv, D]
        q, k = rope(q, pos), rope(k, pos)                            (the file's theta and scaling)
        K/V written into the cache; o = attention through cpattn     [n, Hq, D] storage dtype
        x = x + o @ Wo.T
        h = rmsnorm(x) ; x = x + (silu(h @ Wg.T) * (h @ Wu.T)) @ Wd.T
    logits = rmsnorm(x) @ embed.T  (tied embeddings) or @ output.T   [n, vocab] float32

Attention (docs/design.md, *One API for both backends*):

* **prefill** of a prompt chunk: ``cache.reserve`` once, per layer ``cache.write_kv`` then
  ``compact_prefill(cache, means, seq, q, layer, alpha=...)`` (alpha 0 is dense), then
  ``cache.commit`` and ``means.update``. A prompt's cached prefix (``add_sequence`` reuse) is
  never recomputed.
* **decode** of one token per sequence: ``cache.reserve_batch``, one ``dec.plan(seqs, Hq)`` per
  step, per layer ``cache.write_kv`` then ``dec.run(q, layer)``; then ``cache.commit``.

Q, K and V enter the cache post-RoPE, in the storage dtype. Weights are dequantised once and
rounded to the storage dtype (fp16 or bf16). On CuPy with fp16 they are held as fp16 and the
matmuls run on cuBLAS; NumPy has no fast half-precision matmul, so there (and for bf16, which
CuPy has no dtype for) the rounded values are held as float32. Norms, RoPE, softmax inputs and
the residual stream are float32.

RoPE rotates adjacent pairs ``(x[2i], x[2i+1])``, matching the row order of GGUF's q/k weights
(see ``cpattn.serving.gguf``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..reference.checks import check_choice, check_int, check_real, is_real
from ..reference.compact_attention import DEFAULT_SAMPLE_ROWS, check_row_floor, check_summary
from ..reference.dtypes import STORAGE_DTYPES, to_float32, to_storage


@dataclass(frozen=True)
class LlamaConfig:
    """Geometry and constants of a Llama-family decoder (read from a GGUF file's metadata)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scale: float = 1.0  # linear position scaling (positions divided by it)
    rope_freq_factors: np.ndarray | None = field(default=None, repr=False, compare=False)  # [D/2] divisors
    rms_eps: float = 1e-5
    context_length: int = 2048
    tied_embeddings: bool = True

    def inv_freq(self) -> np.ndarray:
        """RoPE angle per position of each rotated pair, float64 [head_dim / 2]."""
        d = self.head_dim
        f = self.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d) / self.rope_scale
        if self.rope_freq_factors is not None:
            f = f / np.asarray(self.rope_freq_factors, np.float64)
        return f

    @property
    def num_params(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        qkv = h * (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        per_layer = qkv + self.num_q_heads * self.head_dim * h + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return L * per_layer + emb + h


# ============================================================================ attention through cpattn
def recall_options(alpha, recall, summary, sample_rows, row_floor=None) -> dict:
    """The selection rule of ``CacheAttention`` as ``compact_prefill`` keyword arguments:
    ``{"alpha": alpha}`` (the alpha rule, alpha 0 dense) when ``recall`` is None, else
    ``{"alpha": None, "recall": r, "summary": ..., "sample_rows": ...}`` (plus ``"row_floor"``
    when one is given: every sampled row's estimated recall reaches it). One rule at a time:
    with a recall target alpha must be 0 or None; without one, summary, sample_rows and
    row_floor must stay at their defaults (they are options of the recall rule here)."""
    if recall is None:
        alpha = check_real(alpha, "alpha", 0.0, 1.0)
        check_summary(summary, sample_rows, None)  # types and ranges first
        if row_floor is not None:
            check_row_floor(row_floor, 1.0, "sampled")  # its type and range first
            raise ValueError(f"row_floor: expected None with recall=None (an option of the recall rule), "
                             f"got {row_floor!r}")
        if summary != "auto":
            raise ValueError(f"summary: expected 'auto' with recall=None (an option of the recall rule), "
                             f"got {summary!r}")
        if sample_rows != DEFAULT_SAMPLE_ROWS:
            raise ValueError(f"sample_rows: expected {DEFAULT_SAMPLE_ROWS} (its default) with recall=None "
                             f"(an option of the recall rule), got {sample_rows!r}")
        return dict(alpha=alpha)
    if not is_real(recall):
        raise TypeError(f"recall: expected None or a number in [0, 1], got {recall!r} ({type(recall).__name__})")
    r = float(recall)
    if not 0.0 <= r <= 1.0:  # NaN fails too
        raise ValueError(f"recall: expected None or a number in [0, 1], got {recall!r}")
    if alpha is not None and not (is_real(alpha) and float(alpha) == 0.0):
        raise ValueError(f"alpha: expected 0 or None with recall={recall!r} (one selection rule at a time), "
                         f"got {alpha!r}")
    summary = check_summary(summary, sample_rows, r)
    rule = dict(alpha=None, recall=r, summary=summary, sample_rows=int(sample_rows))
    row_floor = check_row_floor(row_floor, r, summary)
    return rule if row_floor is None else dict(rule, row_floor=row_floor)


def attention_api():
    """``(ChunkAttentionDecode, BlockMeans, compact_prefill)`` of cpattn: the names at the top of
    the package, which dispatch on the cache's backend."""
    import cpattn

    return cpattn.ChunkAttentionDecode, cpattn.BlockMeans, cpattn.compact_prefill


class CacheAttention:
    """The model's view of a chunk cache: block means for prefill, one decoder for decode.

    Args:
        cache: a ``cpattn.reference.ChunkCache`` (NumPy) or ``cpattn.chunk_cache.GpuChunkCache``.
        num_q_heads: query heads of the model.
        alpha, sink, window, q_tile: CompactAttention selection (alpha 0: every block, dense prefill).
        group_size: None (a table per whole GQA group) or the query heads of a sub-group whose
            selection is one table (1: per-head tables; ``compact_prefill``'s ``group_size``).
        recall: None (the alpha rule) or a number in [0, 1]: the recall-target rule of
            ``compact_prefill`` (per table, past blocks by estimated mass until the estimate
            reaches ``recall``); alpha must then be 0 (its default here) or None.
        summary, sample_rows: the recall rule's estimate of the past ('auto' is 'sampled' there,
            ``sample_rows`` exact rows per query block); options of the recall rule only, so with
            recall None they must stay at their defaults.
        row_floor: None or, with the recall rule on the sampled summary, a number in [0, 1]:
            every sampled row's estimated recall reaches it besides the pooled target
            (``compact_prefill``'s ``row_floor``).

    ``densities`` keeps ``(layer, CompactPrefill.density())`` of every prefill call that has a past.
    """

    def __init__(self, cache, num_q_heads: int, *, alpha: float | None = 0.0, sink: int = 2, window: int = 4,
                 q_tile: int | None = None, recall: float | None = None, summary: str = "auto",
                 sample_rows: int = DEFAULT_SAMPLE_ROWS, group_size: int | None = None,
                 row_floor: float | None = None):
        options = recall_options(alpha, recall, summary, sample_rows, row_floor)  # checked before anything is built
        sink, window = check_int(sink, "sink", 0), check_int(window, "window", 0)
        num_q_heads = check_int(num_q_heads, "num_q_heads", 1)
        if group_size is not None:
            group_size = check_int(group_size, "group_size", 1)
            if num_q_heads % cache.num_kv_heads or (num_q_heads // cache.num_kv_heads) % group_size:
                raise ValueError(f"group_size: expected a divisor of the {num_q_heads} // {cache.num_kv_heads} query "
                                 f"heads per kv head, got {group_size}")
        decoder_cls, means_cls, self._prefill = attention_api()
        self.cache = cache
        self.num_q_heads = num_q_heads
        self.alpha = options["alpha"]  # None under the recall rule
        self.recall = options.get("recall")
        self.summary = options.get("summary", "mean")  # what the rule uses ('auto' resolved)
        self.sample_rows = int(sample_rows)
        self.row_floor = options.get("row_floor")
        self._rule = options  # the rule's keyword arguments of compact_prefill
        self.sink, self.window = sink, window
        self.means = means_cls(cache)
        self.decoder = decoder_cls(cache)
        self.q_tile = q_tile  # checked by compact_prefill against the chunk
        self.group_size = group_size
        self.densities: list[tuple[int, dict]] = []  # (layer, density) per prefill call with a past

    def prefill(self, seq: int, q, layer: int):
        """Attention of the sequence's last ``n`` tokens (K/V written): o [n, Hq, D] storage dtype."""
        r = self._prefill(self.cache, self.means, seq, q, layer, sink=self.sink, window=self.window,
                          q_tile=self.q_tile, group_size=self.group_size, return_lse=False, **self._rule)
        if self.cache.seq_len(seq) > q.shape[0]:
            self.densities.append((layer, r.density()))
        return r.o

    def committed(self, seq: int) -> None:
        """Summarise the pages the last commit filled (prefill of later chunks selects on them)."""
        self.means.update(self.cache, seq)

    def plan(self, seqs) -> None:
        self.decoder.plan(seqs, self.num_q_heads)

    def decode(self, q, layer: int):
        """Attention of one token per planned sequence: o [B, Hq, D] storage dtype."""
        return self.decoder.run(q, layer)


# ============================================================================ the model
class LlamaModel:
    """A Llama-family decoder over a chunk cache.

    Args:
        config: the geometry (``GGUFFile.config()``).
        tensors: name -> float32 array in GGUF naming (``token_embd.weight``,
            ``blk.{i}.attn_q.weight``, ...), or a callable that returns one by name.
        dtype: storage dtype of the weights and of the K/V cache, "float16" or "bfloat16".
        xp: numpy or cupy.
    """

    def __init__(self, config: LlamaConfig, tensors, *, dtype: str = "float16", xp=np):
        self.config = config
        self.dtype = check_choice(dtype, "dtype", STORAGE_DTYPES)
        self.xp = xp
        get = tensors if callable(tensors) else tensors.__getitem__
        on_gpu = xp is not np
        # fp16 weights stay fp16 on the GPU (cuBLAS); elsewhere the rounded values in float32
        self.weight_dtype = np.float16 if (on_gpu and dtype == "float16") else np.float32

        def weight(*names):
            w = np.concatenate([get(n) for n in names], axis=0) if len(names) > 1 else get(names[0])
            w = to_float32(to_storage(np.asarray(w, np.float32), dtype), dtype)  # rounded once
            return xp.asarray(w.astype(self.weight_dtype))

        def norm(name):
            return xp.asarray(np.asarray(get(name), np.float32))

        c = config
        self.embed = weight("token_embd.weight")  # [V, hidden]
        self.output = self.embed if c.tied_embeddings else weight("output.weight")
        self.final_norm = norm("output_norm.weight")
        self.layers = []
        for i in range(c.num_layers):
            p = f"blk.{i}."
            self.layers.append(dict(
                attn_norm=norm(p + "attn_norm.weight"), ffn_norm=norm(p + "ffn_norm.weight"),
                qkv=weight(p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"),  # [(Hq+2Hkv)D, h]
                o=weight(p + "attn_output.weight"),  # [h, Hq D]
                gate_up=weight(p + "ffn_gate.weight", p + "ffn_up.weight"),  # [2I, h]
                down=weight(p + "ffn_down.weight")))  # [h, I]
        self._inv_freq = c.inv_freq()
        self._rope_len = 0
        self._cos = self._sin = None

    @classmethod
    def from_gguf(cls, path_or_file, *, dtype: str = "float16", xp=np) -> "LlamaModel":
        from .gguf import GGUFFile

        f = path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)
        return cls(f.config(), f.tensor, dtype=dtype, xp=xp)

    # ------------------------------------------------------------------ cache
    def new_cache(self, num_chunks: int, *, chunk_size: int = 64, max_sequences: int = 256):
        """An empty chunk cache of this model's geometry on ``self.xp`` (NumPy or CuPy)."""
        c = self.config
        if self.xp is np:
            from ..reference.chunk_cache import ChunkCache

            return ChunkCache(c.num_layers, c.num_kv_heads, c.head_dim, num_chunks, chunk_size=chunk_size,
                              dtype=self.dtype, max_sequences=max_sequences)
        from ..chunk_cache import GpuChunkCache

        return GpuChunkCache(c.num_layers, c.num_kv_heads, c.head_dim, num_chunks, chunk_size=chunk_size,
                             dtype=self.dtype, max_sequences=max_sequences)

    def kv_bytes_per_token(self) -> int:
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2

    # ------------------------------------------------------------------ pieces
    def _mm(self, x, w):
        """x [n, k] float32 @ w.T ([m, k] weight) -> [n, m] float32."""
        return (x.astype(w.dtype, copy=False) @ w.T).astype(np.float32, copy=False)

    def _rmsnorm(self, x, w):
        xp = self.xp
        return x * (1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(self.config.rms_eps))) * w

    def _rope_tables(self, upto: int):
        if upto > self._rope_len:
            n = max(upto, 2 * self._rope_len, 1024)
            ang = np.arange(n, dtype=np.float64)[:, None] * self._inv_freq[None, :]  # [n, D/2]
            self._cos = self.xp.asarray(np.cos(ang).astype(np.float32))
            self._sin = self.xp.asarray(np.sin(ang).astype(np.float32))
            self._rope_len = n
        return self._cos, self._sin

    def _rope(self, x, pos):
        """x [n, H, D] float32 rotated by positions pos [n] (adjacent pairs)."""
        cos, sin = self._rope_tables(int(pos.max()) + 1)
        cos, sin = cos[pos][:, None, :], sin[pos][:, None, :]  # [n, 1, D/2]
        a, b = x[..., 0::2], x[..., 1::2]
        out = self.xp.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def _qkv(self, layer: int, x, pos):
        """q [n, Hq, D], k, v [n, Hkv, D], all post-RoPE, in the storage dtype."""
        c, w = self.config, self.layers[layer]
        h = self._rmsnorm(x, w["attn_norm"])
        qkv = self._mm(h, w["qkv"])
        n, D = x.shape[0], c.head_dim
        nq, nk = c.num_q_heads * D, c.num_kv_heads * D
        q = self._rope(qkv[:, :nq].reshape(n, c.num_q_heads, D), pos)
        k = self._rope(qkv[:, nq:nq + nk].reshape(n, c.num_kv_heads, D), pos)
        v = qkv[:, nq + nk:].reshape(n, c.num_kv_heads, D)
        return (to_storage(self.xp.ascontiguousarray(a), self.dtype) for a in (q, k, v))

    def _finish_layer(self, layer: int, x, o):
        """Residual adds of attention output o [n, Hq, D] (storage dtype) and the SwiGLU MLP."""
        w, n = self.layers[layer], x.shape[0]
        o = o if o.dtype == np.float32 else to_float32(o, self.dtype)
        x = x + self._mm(o.reshape(n, -1), w["o"])
        h = self._rmsnorm(x, w["ffn_norm"])
        gu = self._mm(h, w["gate_up"])
        g, u = gu[:, : self.config.intermediate_size], gu[:, self.config.intermediate_size:]
        return x + self._mm(g / (1.0 + self.xp.exp(-g)) * u, w["down"])

    def logits(self, x):
        """[n, hidden] float32 residual stream -> [n, vocab] float32 logits."""
        return self._mm(self._rmsnorm(x, self.final_norm), self.output)

    def check_vocab(self, tokens, name: str = "tokens") -> None:
        """Every id of ``tokens`` (checked integers: a list, or a 1-D int array) below vocab_size."""
        if isinstance(tokens, np.ndarray):
            bad = tokens[tokens >= self.config.vocab_size][:1].tolist() if tokens.size and \
                tokens.max() >= self.config.vocab_size else []
            bad = bad[0] if bad else None
        else:
            bad = next((t for t in tokens if t >= self.config.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{name}: expected token ids < vocab_size {self.config.vocab_size}, got {bad}")

    # ------------------------------------------------------------------ prefill and decode
    def prefill(self, attn: CacheAttention, seq: int, tokens, *, chunk_tokens: int = 256,
                logits: str = "last"):
        """Append ``tokens`` to sequence ``seq`` (whose length is a multiple of the chunk size,
        e.g. a fresh ``add_sequence`` with a reused prefix) and run them through the model.

        The prompt goes in chunks of ``chunk_tokens`` (a multiple of the cache's chunk size).
        Returns logits float32: ``[vocab]`` of the last token (``logits="last"``), ``[n, vocab]``
        of every token (``"all"``), or None (``"none"``).
        """
        cache, xp = attn.cache, self.xp
        check_choice(logits, "logits", ("last", "all", "none"))
        cs = cache.chunk_size
        if check_int(chunk_tokens, "chunk_tokens", 1) % cs:
            raise ValueError(f"chunk_tokens: expected a multiple of chunk_size {cs}, got {chunk_tokens}")
        tokens = cache.check_tokens(tokens, "tokens")
        if not tokens:
            raise ValueError("tokens: expected at least one token, got 0")
        self.check_vocab(tokens)
        start = cache.seq_len(seq)
        if start % cs:
            raise ValueError(f"seq: expected a length that is a multiple of chunk_size {cs}, got {start}")
        cache.check_room_for(cache.sequence(seq), len(tokens))
        out = []
        for a in range(0, len(tokens), chunk_tokens):
            piece = tokens[a:a + chunk_tokens]
            pos = xp.arange(start + a, start + a + len(piece))
            x = self.embed[xp.asarray(piece)].astype(np.float32)
            slots = cache.reserve(seq, piece)
            for layer in range(self.config.num_layers):
                q, k, v = self._qkv(layer, x, pos)
                cache.write_kv(layer, slots, k, v)
                x = self._finish_layer(layer, x, attn.prefill(seq, q, layer))
            cache.commit(seq)
            attn.committed(seq)
            if logits == "all":
                out.append(self.logits(x))
        if logits == "last":
            return self.logits(x[-1:])[0]
        return xp.concatenate(out) if logits == "all" else None

    def decode(self, attn: CacheAttention, seqs, tokens, *, slots=None):
        """One decode step: token ``tokens[b]`` appended to sequence ``seqs[b]``; returns the
        next-token logits float32 [batch, vocab]. One plan serves every layer of the step.
        ``slots``: what ``cache.reserve_batch(seqs, tokens)`` returned when the caller reserved
        the tokens already (a mixed step's scheduler does), else None (reserved here)."""
        cache, xp = attn.cache, self.xp
        seqs = cache.check_batch(seqs)
        self.check_vocab(cache.check_tokens(tokens, "tokens"))
        if slots is None:
            pos = xp.asarray(np.array([cache.seq_len(s) for s in seqs]))
            slots = cache.reserve_batch(seqs, tokens)
        else:
            if len(slots.chunk) != len(seqs) or len(tokens) != len(seqs):
                raise ValueError(f"slots: expected one reserved slot and one token per sequence ({len(seqs)}), got "
                                 f"{len(slots.chunk)} slots and {len(tokens)} tokens")
            pos = xp.asarray(np.array([cache.seq_len(s) - 1 for s in seqs]))
        attn.plan(seqs)
        x = self.embed[xp.asarray(np.asarray(tokens, np.int64))].astype(np.float32)
        for layer in range(self.config.num_layers):
            q, k, v = self._qkv(layer, x, pos)
            cache.write_kv(layer, slots, k, v)
            x = self._finish_layer(layer, x, attn.decode(q, layer))
        for s in seqs:
            cache.commit(s)
        return self.logits(x)

    def prefill_pieces(self, batched, pieces, options: dict):
        """One eager forward over the prefill pieces of several sequences (a mixed step's):
        ``pieces`` are ``cpattn.serving.server.Piece`` (seq, start, tokens, slots, last), each
        reserved already, starting on a chunk boundary after committed tokens, one per sequence.
        Attention is one ``batched.plan`` (a ``BatchedPrefill`` over the cache; ``options`` its
        selection keywords, alpha 0 dense) and one ``batched.run`` per layer over all pieces;
        K/V written per piece. Commits every piece's sequence. Returns the residual stream of
        each piece's last row, float32 [len(pieces), hidden]."""
        cache, xp = batched.cache, self.xp
        seqs = [p.seq for p in pieces]
        lens = [len(p.tokens) for p in pieces]
        toks = [t for p in pieces for t in p.tokens]
        self.check_vocab(toks)
        for p in pieces:
            if cache.seq_len(p.seq) != p.start + len(p.tokens):
                raise ValueError(f"pieces: expected sequence {p.seq} to hold {p.start + len(p.tokens)} tokens (its "
                                 f"piece reserved), got {cache.seq_len(p.seq)}")
        batched.plan(seqs, lens, self.config.num_q_heads, **options)  # checks the pieces against the tree
        pos = xp.asarray(np.concatenate([np.arange(p.start, p.start + len(p.tokens)) for p in pieces]))
        bounds = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        x = self.embed[xp.asarray(np.asarray(toks, np.int64))].astype(np.float32)
        for layer in range(self.config.num_layers):
            q, k, v = self._qkv(layer, x, pos)
            for b, p in enumerate(pieces):
                cache.write_kv(layer, p.slots, k[bounds[b]:bounds[b + 1]], v[bounds[b]:bounds[b + 1]])
            o, _ = batched.run(q, layer)
            x = self._finish_layer(layer, x, o)
        for s in seqs:
            cache.commit(s)
        return x[xp.asarray(bounds[1:] - 1)]


# ============================================================================ mixed steps of the server
def greedy_tokens(logits) -> list:
    """Argmax of every row of logits [n, vocab] (NumPy or CuPy) as Python ints (one download)."""
    picked = logits.argmax(axis=-1)
    return [int(t) for t in (picked if isinstance(picked, np.ndarray) else picked.get())]


class MixedStepBackend:
    """The real model's mixed steps for ``Server(model, ..., backend=MixedStepBackend(...),
    step_tokens=N)`` (a ``cpattn.serving.server.StepBackend``): the server schedules (budget,
    admission with prefix reuse, preemption), this runs each step:

    1. the decode rows, one token per running sequence: ``GraphedDecoder`` (the whole step one
       CUDA graph, replayed, captured again when the plan or the batch changes) on CuPy with
       float16 and ``graph`` True or "auto"; otherwise ``LlamaModel.decode`` (eager);
    2. then every prefill piece of the step in one eager forward (``LlamaModel.prefill_pieces``)
       whose attention is one ``BatchedPrefill`` plan and one run per layer over all pieces:
       dense (alpha 0) by default, CompactAttention's sparse selection with ``alpha`` > 0 or a
       ``recall`` target (``CacheAttention``'s rule and checks);
    3. the next token of every decode row and of every piece that ends its sequence's prefill
       (greedy, its last row): that request decodes from the next step on.

    Args:
        model: a ``LlamaModel``; cache: its chunk cache (``model.new_cache(...)``: a NumPy
            ``ChunkCache`` or a ``GpuChunkCache``).
        graph: True, False or "auto" (the CUDA graph where it runs: CuPy and float16).
        alpha, sink, window, q_tile, recall, summary, sample_rows, group_size, row_floor: prefill selection
            (``CacheAttention``; alpha 0 dense).
    ``stats`` (an ``AttentionStats``, replaced by the server at every run): decode plans built
    (graph captures on the graphed path), decode layer calls, prefill density with a sparse rule
    (of the last layer's run, per piece; it reads the GPU counters back, a sync per step).
    """

    def __init__(self, model: LlamaModel, cache, *, graph="auto", alpha: float | None = 0.0, sink: int = 2,
                 window: int = 4, q_tile: int | None = None, recall: float | None = None, summary: str = "auto",
                 sample_rows: int = DEFAULT_SAMPLE_ROWS, group_size: int | None = None,
                 row_floor: float | None = None):
        from ..compact_attention import BatchedPrefill
        from .backends import AttentionStats

        on_gpu = getattr(cache, "backend", None) == "cupy"
        if on_gpu != (model.xp is not np):
            raise ValueError(f"cache: expected a cache on the model's device ({model.xp.__name__}), got a "
                             f"{getattr(cache, 'backend', type(cache).__name__)} cache")
        graphable = on_gpu and model.dtype == "float16"
        if isinstance(graph, str) and graph == "auto":
            graph = graphable
        elif not isinstance(graph, bool):
            raise TypeError(f"graph: expected True, False or 'auto', got {graph!r} ({type(graph).__name__})")
        elif graph and not graphable:
            raise ValueError(f"graph: expected False or 'auto' on {model.xp.__name__} with {model.dtype} (CUDA graphs "
                             f"need CuPy and float16), got True")
        self.attn = CacheAttention(cache, model.config.num_q_heads, alpha=alpha, sink=sink, window=window,
                                   q_tile=q_tile, recall=recall, summary=summary, sample_rows=sample_rows,
                                   row_floor=row_floor,
                                   group_size=group_size)
        self.options = dict(recall_options(alpha, recall, summary, sample_rows, row_floor), sink=self.attn.sink,
                            window=self.attn.window, q_tile=q_tile, group_size=self.attn.group_size)
        self.sparse = self.attn.recall is not None or bool(self.attn.alpha)
        self.model, self.cache, self.graph = model, cache, graph
        self.batched = BatchedPrefill(cache, self.attn.means)
        self.decoder = None
        if graph:
            from .graphed import GraphedDecoder

            self.decoder = GraphedDecoder(model, self.attn)
        self.stats = AttentionStats(cache.num_layers)
        self.label = ("CUDA kernels, decode one CUDA graph" if graph else
                      "CUDA kernels, eager" if on_gpu else "NumPy reference") + ", batched prefill"
        self.captures = 0  # graph captures, over the backend's life

    def sync(self) -> None:
        if self.model.xp is not np:
            self.model.xp.cuda.Device().synchronize()  # the graph's stream and the current one

    def mixed_step(self, seqs, tokens, slots, pieces) -> list:
        out = []
        L = self.model.config.num_layers
        if seqs:  # 1. decode rows (their sequences commit inside)
            if self.decoder is not None:
                out += [int(t) for t in self.decoder.step(seqs, tokens, slots=slots)]
                new = self.decoder.times.capture[-1] > 0
                self.captures += new
                self.stats.plans_built += new
            else:
                out += greedy_tokens(self.model.decode(self.attn, seqs, tokens, slots=slots))
                self.stats.plans_built += 1
            self.stats.decode_calls += L
        if pieces:  # 2. every piece in one forward, attention one BatchedPrefill per layer
            from .backends import DENSITY_STAGES

            pasts = [p.start for p in pieces]
            x = self.model.prefill_pieces(self.batched, pieces, self.options)
            if self.sparse:
                for d, p, P in zip(self.batched.density(), pieces, pasts):  # of the last layer's run
                    d = {k: v for k, v in d.items() if k in DENSITY_STAGES}
                    self.stats.record_prefill(L - 1, P, (len(p.tokens), self.model.config.num_q_heads),
                                              self.cache.chunk_size, d, None)
            want = [i for i, p in enumerate(pieces) if p.last]
            if want:  # 3. the first token (or the next after a recompute) of finished prefills
                out += greedy_tokens(self.model.logits(x[self.model.xp.asarray(np.asarray(want, np.int64))]))
        return out


__all__ = ["LlamaConfig", "LlamaModel", "CacheAttention", "MixedStepBackend", "attention_api", "greedy_tokens"]
