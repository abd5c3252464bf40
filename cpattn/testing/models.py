"""A small Llama with random weights, for tests and tools that need the real model's code path
without a model file (``cpattn.serving.llama.LlamaModel`` in GGUF naming)."""
from __future__ import annotations

import numpy as np


def random_llama(seed: int, xp=np, *, vocab: int = 97, hidden: int = 64, inter: int = 96, layers: int = 2,
                 hq: int = 4, hkv: int = 2, d: int = 16, gain: float = 3.0, rope_theta: float = 1e4,
                 context_length: int = 4096, dtype: str = "float16"):
    """Weights drawn standard normal from ``seed`` (norm weights 1 + 0.1 w, matrices
    ``gain * w / sqrt(fan_in)``), rounded by the model to ``dtype``, on array module ``xp``."""
    from ..serving.llama import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                      num_q_heads=hq, num_kv_heads=hkv, head_dim=d, rope_theta=rope_theta,
                      context_length=context_length)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (hidden,), p + "ffn_norm.weight": (hidden,),
                       p + "attn_q.weight": (hq * d, hidden), p + "attn_k.weight": (hkv * d, hidden),
                       p + "attn_v.weight": (hkv * d, hidden), p + "attn_output.weight": (hidden, hq * d),
                       p + "ffn_gate.weight": (inter, hidden), p + "ffn_up.weight": (inter, hidden),
                       p + "ffn_down.weight": (hidden, inter)})
    rng = np.random.default_rng(seed)
    t = {}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape)
        t[name] = (1 + 0.1 * w if len(shape) == 1 else gain * w / np.sqrt(shape[-1])).astype(np.float32)
    return LlamaModel(cfg, t, dtype=dtype, xp=xp)


__all__ = ["random_llama"]
