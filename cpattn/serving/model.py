"""A small decoder-only transformer whose attention a caller routes anywhere, and its dense check.

``TinyLM`` is written against an array module ``xp`` (NumPy, or CuPy on a GPU): random weights
from a seed, RMSNorm, RoPE, GQA attention, a SwiGLU MLP and a tied or random vocabulary
projection, greedy decoding. Each layer is split where attention happens::

    q, k, v = model.qkv(layer, x, pos)      # x [n, hidden]; q [n, Hq, D], k, v [n, Hkv, D] storage dtype
    x = model.finish_layer(layer, x, o)     # o [n, Hq, D]: attention output, storage dtype

``dense_generate`` is the check: the same model with no cache, no sharing and no sparsity, full
causal attention recomputed over the whole sequence at every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..reference.checks import check_choice, check_int, check_real, check_token_ids
from ..reference.dtypes import STORAGE_DTYPES, round_to_storage, storage_numpy_dtype, to_float32, to_storage


@dataclass(frozen=True)
class ModelConfig:
    """Shape of ``TinyLM``. ``dtype`` is the storage dtype of attention inputs and outputs
    (q, k, v, o), as in a half-precision model; everything else computes in ``compute_dtype``.

    ``locality`` sizes a bias added to queries and keys before RoPE, in logits at distance 0 on
    the last kv head, scaled down linearly to none on kv head 0 (which stays global): it makes
    attention prefer recent tokens, the structure block selection exploits in trained models.
    0 gives a plain random model.
    """

    vocab_size: int = 256
    num_layers: int = 2
    hidden: int = 128
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    mlp_hidden: int = 256
    rope_base: float = 10000.0
    eps: float = 1e-6
    tied_embeddings: bool = False
    locality: float = 24.0
    dtype: str = "float16"
    compute_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "hidden", "num_q_heads", "num_kv_heads", "head_dim", "mlp_hidden"):
            check_int(getattr(self, name), name, 1, 2**31 - 1)
        check_real(self.rope_base, "rope_base", lo=0.0, lo_open=True)
        check_real(self.eps, "eps", lo=0.0)
        check_real(self.locality, "locality", lo=0.0)
        check_choice(self.dtype, "dtype", STORAGE_DTYPES)
        check_choice(self.compute_dtype, "compute_dtype", ("float32", "float64"))
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads: expected a multiple of num_kv_heads {self.num_kv_heads}, "
                             f"got {self.num_q_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even number (RoPE rotates pairs), got {self.head_dim}")


MODEL_ARGUMENTS = (("layers", "num_layers"), ("hidden", "hidden"), ("q_heads", "num_q_heads"),
                   ("kv_heads", "num_kv_heads"), ("head_dim", "head_dim"), ("vocab", "vocab_size"))


def add_model_arguments(parser, **defaults) -> None:
    """``--layers --hidden --q-heads --kv-heads --head-dim --vocab --dtype`` on an argparse parser;
    ``defaults`` (by ``ModelConfig`` field name) override the config's own."""
    from ..cli import int_option

    base = ModelConfig()
    helps = dict(num_layers="model layers", hidden="model hidden size", num_q_heads="query heads",
                 num_kv_heads="kv heads (divides the query heads)", head_dim="head dimension (even; 64 or 128 "
                 "on the GPU)", vocab_size="vocabulary size")
    for flag, name in MODEL_ARGUMENTS:
        parser.add_argument("--" + flag.replace("_", "-"), type=int_option(1), metavar="N",
                            default=defaults.get(name, getattr(base, name)), help=helps[name])
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default=defaults.get("dtype", base.dtype),
                        help="storage dtype of q, k, v and o")


def config_from_args(args) -> ModelConfig:
    """The ``ModelConfig`` of ``add_model_arguments``' options (MLP width twice the hidden size)."""
    fields = {name: getattr(args, flag) for flag, name in MODEL_ARGUMENTS}
    return ModelConfig(mlp_hidden=2 * fields["hidden"], dtype=args.dtype, **fields)


class TinyLM:
    """Decoder-only transformer with random weights: ``x -> [attention, MLP] * L -> logits``.

    The layer is split where attention happens, so a caller can route attention anywhere::

        q, k, v = model.qkv(layer, x, pos)      # x [n, hidden]; q [n, Hq, D], k, v [n, Hkv, D] storage dtype
        x = model.finish_layer(layer, x, o)     # o [n, Hq, D]: attention output (any float or storage dtype)
    """

    def __init__(self, config: ModelConfig, seed: int = 0, xp=np):
        self.config, self.xp = config, xp
        cfg, rng = config, np.random.default_rng(seed)
        self.dt = np.dtype(cfg.compute_dtype)
        H, Hq, Hkv, D, F = cfg.hidden, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden
        G = Hq // Hkv

        def w(*shape, std=1.0):  # drawn on the host from the seed, then moved: same weights on every xp
            return xp.asarray((std * rng.standard_normal(shape)).astype(self.dt))

        def gain(n):
            return xp.asarray((1.0 + 0.1 * rng.standard_normal(n)).astype(self.dt))

        self.embed_table = w(cfg.vocab_size, H)
        self.layers = []
        for _ in range(cfg.num_layers):
            # locality bias: b_k per kv head, b_q = b_k times a per-query-head factor, sized so
            # that scale * b_q . b_k = locality * factor logits at distance 0 (RoPE turns it into
            # a function of distance that decays as the high frequencies lose phase)
            bk = rng.standard_normal((Hkv, D))
            strength = cfg.locality * np.arange(Hkv) / max(1, Hkv - 1)  # kv head 0 global, the last most local
            bk *= np.sqrt(strength)[:, None] * D ** 0.25 / np.linalg.norm(bk, axis=1, keepdims=True)
            factor = rng.uniform(0.5, 1.0, Hq)
            bq = bk[np.arange(Hq) // G] * factor[:, None]
            self.layers.append(dict(
                attn_norm=gain(H), wq=w(H, Hq * D, std=H ** -0.5), wk=w(H, Hkv * D, std=H ** -0.5),
                wv=w(H, Hkv * D, std=H ** -0.5), wo=w(Hq * D, H, std=2.0 * (Hq * D) ** -0.5),
                bq=xp.asarray(bq.astype(self.dt)), bk=xp.asarray(bk.astype(self.dt)),
                mlp_norm=gain(H), w_gate=w(H, F, std=H ** -0.5), w_up=w(H, F, std=H ** -0.5),
                w_down=w(F, H, std=F ** -0.5)))
        self.final_norm = gain(H)
        self.lm_head = self.embed_table.T if cfg.tied_embeddings else w(H, cfg.vocab_size, std=H ** -0.5)
        half = D // 2
        self._inv_freq = xp.asarray((cfg.rope_base ** (-np.arange(half) / half)).astype(np.float64))

    # ---------------------------------------------------------------- pieces
    def _rmsnorm(self, x, g):
        return x / self.xp.sqrt((x * x).mean(axis=-1, keepdims=True) + self.config.eps) * g

    def _rope(self, x, pos):
        """Rotate pairs (i, i + D/2) of x [n, H, D] by pos [n] * inv_freq (computed in float64)."""
        xp, half = self.xp, x.shape[-1] // 2
        ang = xp.asarray(pos, dtype=np.float64)[:, None] * self._inv_freq[None, :]  # [n, D/2]
        cos, sin = xp.cos(ang)[:, None, :].astype(self.dt), xp.sin(ang)[:, None, :].astype(self.dt)
        x1, x2 = x[..., :half], x[..., half:]
        return xp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def embed(self, tokens):
        """tokens: ints [n] in [0, vocab_size) -> x [n, hidden] compute dtype."""
        tokens = check_token_ids(tokens, "tokens", self.config.vocab_size)
        return self.embed_table[self.xp.asarray(np.asarray(tokens, np.int64))]

    def qkv(self, layer: int, x, pos):
        """x [n, hidden], pos int [n] -> q [n, Hq, D], k [n, Hkv, D], v [n, Hkv, D] in storage dtype."""
        cfg, p = self.config, self.layers[layer]
        n = x.shape[0]
        h = self._rmsnorm(x, p["attn_norm"])
        q = (h @ p["wq"]).reshape(n, cfg.num_q_heads, cfg.head_dim) + p["bq"]
        k = (h @ p["wk"]).reshape(n, cfg.num_kv_heads, cfg.head_dim) + p["bk"]
        v = (h @ p["wv"]).reshape(n, cfg.num_kv_heads, cfg.head_dim)
        q, k = self._rope(q, pos), self._rope(k, pos)
        return tuple(to_storage(self.xp.ascontiguousarray(a.astype(np.float32)), cfg.dtype) for a in (q, k, v))

    def attention_values(self, o):
        """Attention output as the model sees it: rounded to the storage dtype, in compute dtype.

        Backends return the storage dtype; the dense check passes float32, rounded here the same
        way, so both feed the model the same numbers.
        """
        dtype = self.config.dtype
        if np.dtype(o.dtype) == np.dtype(storage_numpy_dtype(dtype)):
            return to_float32(o, dtype).astype(self.dt)
        return round_to_storage(o.astype(np.float32), dtype).astype(self.dt)

    def finish_layer(self, layer: int, x, o):
        """x [n, hidden] plus the output projection of o [n, Hq, D], then the MLP block."""
        p, n = self.layers[layer], x.shape[0]
        x = x + self.attention_values(o).reshape(n, -1) @ p["wo"]
        h = self._rmsnorm(x, p["mlp_norm"])
        gate = h @ p["w_gate"]
        return x + (gate / (1 + self.xp.exp(-gate)) * (h @ p["w_up"])) @ p["w_down"]

    def logits(self, x):
        """x [n, hidden] -> logits [n, vocab] compute dtype."""
        return self._rmsnorm(x, self.final_norm) @ self.lm_head

    def greedy(self, x) -> list[int]:
        """Next token of every row of x [n, hidden] (argmax of the logits)."""
        return [int(t) for t in self.xp.argmax(self.logits(x), axis=-1).tolist()]  # one device copy


# ============================================================================ the check: dense, no cache
def causal_attention(xp, q, k, v):
    """Full causal attention in float64: q [n, Hq, D], k, v [n, Hkv, D] (storage dtype values
    as float) -> o float32 [n, Hq, D]. Query t sees keys 0..t; GQA head h reads kv head h // G."""
    n, Hq, D = q.shape
    G = Hq // k.shape[1]
    q, k, v = (a.astype(np.float64).transpose(1, 0, 2) for a in (q, k, v))  # [H, n, D]
    k, v = xp.repeat(k, G, axis=0), xp.repeat(v, G, axis=0)  # [Hq, n, D]
    s = (q @ k.transpose(0, 2, 1)) / math.sqrt(D)  # [Hq, n, n]
    s = xp.where(xp.tril(xp.ones((n, n), bool))[None], s, -xp.inf)
    p = xp.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).transpose(1, 0, 2).astype(np.float32)  # [n, Hq, D]


def dense_generate(model: TinyLM, prompt, max_new_tokens: int) -> list[int]:
    """Greedy generation with no KV cache: every step recomputes the whole sequence densely."""
    xp, dtype, tokens, out = model.xp, model.config.dtype, list(prompt), []
    for _ in range(max_new_tokens):
        x, pos = model.embed(tokens), np.arange(len(tokens))
        for layer in range(model.config.num_layers):
            q, k, v = (to_float32(a, dtype) for a in model.qkv(layer, x, pos))
            x = model.finish_layer(layer, x, causal_attention(xp, q, k, v))
        out.append(model.greedy(x[-1:])[0])
        tokens.append(out[-1])
    return out
