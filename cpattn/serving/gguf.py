"""A GGUF model file read into NumPy: its metadata, dequantised tensors, tokenizer and chat template.

GGUF is llama.cpp's single-file format: a table of typed metadata (``llama.block_count``,
``tokenizer.ggml.tokens``, ...) and a list of tensors, each in its own quantisation (``F32``,
``Q8_0``, ``Q4_1``, ...). The ``gguf`` package reads both and dequantises every type to float32;
this module turns that into what a decoder needs::

    f = GGUFFile(path)
    f.config()               # LlamaConfig: layers, heads, head_dim, RoPE theta and scaling, ...
    f.tensor("blk.0.attn_q.weight")   # float32 [out_features, in_features] (row-major, x @ W.T)
    f.tokenizer()            # Tokenizer: encode / decode / chat template, from the file's vocab
    f.license                # general.license (the model card's license, e.g. "apache-2.0")

Two facts of llama.cpp's converter matter to a reader of these tensors:

* Shapes are stored innermost first (``ne[0]`` is the input dimension); NumPy order reverses
  them, so a linear layer comes out as ``[out, in]``, the layout ``torch.nn.Linear`` uses.
* The rows of ``attn_q`` and ``attn_k`` are permuted within each head so that RoPE rotates
  *adjacent* pairs ``(x[2i], x[2i+1])`` (the "normal" RoPE of llama.cpp), where Hugging Face
  checkpoints rotate the two halves ``(x[i], x[i + D/2])``. Both Q and K carry the same
  permutation, so ``q . k`` and the attention output are unchanged; ``cpattn.serving.llama``
  applies adjacent-pair RoPE to these weights as they are.

Needs the ``models`` extra: ``pip install cpattn[models]`` (gguf, tokenizers, jinja2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .llama import LlamaConfig

MODELS_EXTRA = "pip install 'cpattn[models]'  (gguf, tokenizers, jinja2)"

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"cpattn.serving.gguf needs the '{module}' package: {MODELS_EXTRA}") from e


class GGUFFile:
    """One ``.gguf`` file, memory-mapped; tensors are dequantised when asked for.

    Args:
        path: the file.
    """

    def __init__(self, path: str | os.PathLike):
        gguf = _require("gguf")
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"path: expected a GGUF file, got {self.path!r} (no such file); "
                                    f"fetch the model with `cpattn models fetch smollm2`")
        self._reader = gguf.GGUFReader(self.path)
        self._tensors = {t.name: t for t in self._reader.tensors}

    # ------------------------------------------------------------------ metadata
    def get(self, key: str, default=None):
        """The metadata value under ``key`` (a str, number or list), or ``default``."""
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def __getitem__(self, key: str):
        value = self.get(key)
        if value is None:
            raise KeyError(f"{key}: expected in the metadata of {self.path}, not there")
        return value

    @property
    def architecture(self) -> str:
        return self["general.architecture"]

    @property
    def license(self) -> str | None:
        return self.get("general.license")

    @property
    def name(self) -> str:
        return self.get("general.name", os.path.basename(self.path))

    # ------------------------------------------------------------------ tensors
    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_type(self, name: str) -> str:
        """The stored quantisation of a tensor ("F32", "Q4_1", ...)."""
        return self._tensor(name).tensor_type.name

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantised to float32, in NumPy (row-major) order: [out, in] for a weight."""
        from gguf import quants

        t = self._tensor(name)
        a = quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape))
        return np.ascontiguousarray(a.reshape(shape), dtype=np.float32)

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{name}: expected a tensor of {self.path}, not there") from None

    # ------------------------------------------------------------------ model and tokenizer
    def config(self) -> LlamaConfig:
        """The decoder's geometry from the metadata (Llama-family architectures only)."""
        arch = self.architecture
        if arch not in ("llama", "mistral", "granite") and not arch.startswith("llama"):
            raise ValueError(f"general.architecture: expected a Llama-family model, got {arch!r}")

        def meta(key, default=None):
            value = self.get(f"{arch}.{key}", default)
            if value is None:
                raise KeyError(f"{arch}.{key}: expected in the metadata of {self.path}, not there")
            return value

        hidden = int(meta("embedding_length"))
        heads = int(meta("attention.head_count"))
        head_dim = int(meta("attention.key_length", hidden // heads))
        scaling = self.get(f"{arch}.rope.scaling.type", "none")
        factor = float(self.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
        if scaling not in ("none", "linear") and factor != 1.0:
            raise ValueError(f"{arch}.rope.scaling.type: expected 'none' or 'linear', got {scaling!r}")
        freq_factors = self.tensor("rope_freqs.weight") if self.has_tensor("rope_freqs.weight") else None
        vocab = self.get(f"{arch}.vocab_size") or len(self["tokenizer.ggml.tokens"])
        return LlamaConfig(
            vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(meta("feed_forward_length")),
            num_layers=int(meta("block_count")), num_q_heads=heads,
            num_kv_heads=int(meta("attention.head_count_kv", heads)), head_dim=head_dim,
            rope_theta=float(meta("rope.freq_base", 10000.0)),
            rope_scale=factor if scaling == "linear" else 1.0, rope_freq_factors=freq_factors,
            rms_eps=float(meta("attention.layer_norm_rms_epsilon")),
            context_length=int(meta("context_length", 2048)),
            tied_embeddings=not self.has_tensor("output.weight"))

    def tokenizer(self) -> "Tokenizer":
        return Tokenizer.from_gguf(self)


# ============================================================================ tokenizer
@dataclass
class Tokenizer:
    """Byte-level BPE built from a GGUF vocabulary (the ``tokenizers`` library does the work).

    ``encode(text)`` gives token ids with special tokens (``<|im_start|>``, ...) recognised in the
    text; ``decode(ids)`` gives the text back; ``chat(messages)`` renders the file's chat template.
    """

    backend: object  # tokenizers.Tokenizer
    bos_id: int | None
    eos_ids: tuple
    add_bos: bool
    chat_template: str | None
    special_ids: frozenset

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Tokenizer":
        tokenizers = _require("tokenizers")
        from tokenizers import decoders, models, pre_tokenizers

        kind = f["tokenizer.ggml.model"]
        if kind != "gpt2":
            raise ValueError(f"tokenizer.ggml.model: expected 'gpt2' (byte-level BPE), got {kind!r}")
        tokens = f["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
        types = f.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        tk = tokenizers.Tokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(f.get("tokenizer.ggml.add_space_prefix", False)),
                                              use_regex=True)
        pre = f.get("tokenizer.ggml.pre", "default")
        # llama.cpp's "smollm" / "starcoder" pre-tokenizers split every digit on its own before the GPT-2 regex
        if pre in ("smollm", "starcoder", "refact"):
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("gpt2", "default", "gpt-2"):
            tk.pre_tokenizer = byte_level
        else:
            raise ValueError(f"tokenizer.ggml.pre: expected one of 'gpt2', 'smollm', 'starcoder', got {pre!r}")
        tk.decoder = decoders.ByteLevel()
        special = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        tk.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False) for i in special])
        eos = f.get("tokenizer.ggml.eos_token_id")
        eot = f.get("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(sorted({int(x) for x in (eos, eot) if x is not None}))
        bos = f.get("tokenizer.ggml.bos_token_id")
        return cls(backend=tk, bos_id=None if bos is None else int(bos), eos_ids=eos_ids,
                   add_bos=bool(f.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=f.get("tokenizer.chat_template"), special_ids=frozenset(special))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_text(self, token: int) -> str:
        return self.backend.id_to_token(int(token))

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (``[{"role": "user", "content": ...}, ...]``),
        rendered with the file's chat template (Jinja, sandboxed)."""
        if not self.chat_template:
            raise ValueError("chat_template: expected one in the model file, got none; pass plain text instead")
        _require("jinja2")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.token_text(self.bos_id) if self.bos_id is not None else "",
                               eos_token=self.token_text(self.eos_ids[0]) if self.eos_ids else "")

    def stream(self) -> "TextStream":
        return TextStream(self)


def _raise(message):
    raise ValueError(f"chat template: {message}")


class TextStream:
    """Incremental detokenisation: ``push(token)`` returns the new text, holding back bytes of a
    character that a later token completes (byte-level BPE splits UTF-8 anywhere)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the next token
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


__all__ = ["GGUFFile", "Tokenizer", "TextStream", "MODELS_EXTRA"]
