"""Recall against density of CompactAttention's selectors on real attention.

The real model (SmolLM2-135M-Instruct from its GGUF file, NumPy backend, dense prefill) reads a
real text; the post-RoPE queries of the prompt's last chunk and the keys of the whole prompt are
captured per layer (``capture``), exactly as the model's attention calls see them (read back from
the chunk cache in the storage dtype). On them ``analyse`` measures, per layer and pooled:

* the exact-mass **oracle** at the tables' granularity (``cpattn.bench.frontier``) and the
  **token oracle** (each row its own keys, no blocks);
* the **alpha rule** (``select_blocks(alpha=...)``) at a sweep of alphas;
* the **recall-target rule** (``select_blocks(recall=...)``) at a sweep of targets, with the
  mean-key block summary and with the spike-aware one (``summary="spike"``);

with recall of a (head, row) the exact share of its attention on the blocks its table reads
(own chunk included), density the share of past blocks read, averaged over (query head,
query block). Everything runs through the reference's own ``select_blocks`` on a chunk cache
holding the captured keys, so what is measured is what ``compact_prefill`` would read.

    python tools/real_frontier.py --out bench        # bench/frontier_real_cpu.{json,md,png}
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..reference.checks import cdiv, check_int
from ..reference.dtypes import as_numpy, to_float32
from ..serving.llama import CacheAttention


def log(msg: str) -> None:
    sys.stderr.write(f"[real_frontier {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ============================================================================ 1. capture
@dataclass
class Capture:
    """Post-RoPE activations of the last prompt chunk, per captured layer.

    Arrays (storage dtype, as the cache holds them; bf16 as uint16 bit patterns):
        q  [num_captured, n, Hq, D]     the chunk's queries
        k  [num_captured, P + n, Hkv, D] every key of the prompt (past and chunk)
        v  [num_captured, P + n, Hkv, D] the values (for output-error checks)
    ``layers[i]`` is the model layer of entry i; ``past`` = P (a multiple of ``block``).
    """

    layers: list
    past: int
    chunk: int
    block: int
    dtype: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    text: str = ""
    meta: dict = field(default_factory=dict)

    def layer_index(self, layer: int) -> int:
        return self.layers.index(layer)


class RecordingAttention(CacheAttention):
    """The model's cache attention that also keeps q, K and V of chosen layers when the call is
    the prompt's last chunk (the sequence then has ``total`` tokens)."""

    def __init__(self, cache, num_q_heads: int, layers, total: int, **options):
        super().__init__(cache, num_q_heads, **options)
        self.record_layers, self.total = set(layers), total
        self.records: dict = {}

    def prefill(self, seq: int, q, layer: int):
        if layer in self.record_layers and self.cache.seq_len(seq) == self.total:
            k, v = self.cache.read_kv(seq, layer)
            self.records[layer] = tuple(np.array(as_numpy(x)) for x in (q, k, v))
        return super().prefill(seq, q, layer)


def capture(model, tokens, layers=None, *, chunk: int = 2048, block: int = 64, prefill_chunk: int | None = None,
            text: str = "") -> Capture:
    """Run ``model`` (a ``LlamaModel``, dense prefill) over ``tokens`` and capture the last
    ``chunk`` tokens' queries and every key and value, for ``layers`` (default all).

    The prompt before the chunk (``len(tokens) - chunk`` tokens, a multiple of ``block``) is
    prefilled in pieces of ``prefill_chunk`` (default ``chunk``), then the chunk in one call.
    """
    L = model.config.num_layers
    layers = list(range(L)) if layers is None else sorted({check_int(x, "layers", 0, L) for x in layers})
    tokens = list(tokens)
    check_int(block, "block", 1)
    if check_int(chunk, "chunk", 1) > len(tokens):
        raise ValueError(f"chunk: expected at most {len(tokens)} (the tokens given), got {chunk}")
    P = len(tokens) - chunk
    if P % block:
        raise ValueError(f"tokens: expected len(tokens) - chunk a multiple of block {block}, got {P}")
    prefill_chunk = chunk if prefill_chunk is None else prefill_chunk
    cache = model.new_cache(cdiv(len(tokens), block) + 2, chunk_size=block, max_sequences=2)
    attn = RecordingAttention(cache, model.config.num_q_heads, layers, len(tokens), alpha=0.0)
    seq = cache.add_sequence([])
    if P:
        model.prefill(attn, seq, tokens[:P], chunk_tokens=prefill_chunk, logits="none")
    model.prefill(attn, seq, tokens[P:], chunk_tokens=cdiv(chunk, block) * block, logits="none")
    q, k, v = (np.stack([attn.records[l][i] for l in layers]) for i in range(3))
    return Capture(layers=layers, past=P, chunk=chunk, block=block, dtype=model.dtype, q=q, k=k, v=v, text=text)


def capture_text(model, tokenizer, text: str, num_tokens: int, layers=None, *, chunk: int = 2048,
                 block: int = 64, prefill_chunk: int | None = None, name: str = "") -> Capture:
    """``capture`` over the first ``num_tokens`` tokens of ``text`` (encoded without a chat
    template; ``num_tokens - chunk`` must be a multiple of ``block``)."""
    ids = tokenizer.encode(text)
    if len(ids) < num_tokens:
        raise ValueError(f"text: expected at least {num_tokens} tokens, got {len(ids)}")
    return capture(model, ids[:num_tokens], layers, chunk=chunk, block=block, prefill_chunk=prefill_chunk,
                   text=name)
