"""The peer of the serving benchmark: a flat per-request K/V cache and torch SDPA attention.

``FlatKVCache`` implements ``cpattn.serving.ServingCache`` (what ``Server`` calls) over torch
tensors; ``TorchSdpaBackend`` implements ``cpattn.serving.AttentionBackend`` with
``torch.nn.functional.scaled_dot_product_attention``. The server, the model and the workload
are the ones cpattn runs with; only the cache and the attention call differ.
"""
from __future__ import annotations

from ..reference.checks import cdiv
from ..reference.chunk_cache import CacheFullError
from ..reference.dtypes import check_dtype_name
from ..serving.backends import AttentionStats
from .torch_interop import from_torch, to_torch


class FlatSlots:
    """Where a reservation's tokens go: per token a cache row and a position in it."""

    def __init__(self, rows: list, pos: list, device):
        import torch

        self.rows, self.pos = rows, pos
        b = len(rows)
        self.row_range = rows[0] if rows == list(range(rows[0], rows[0] + b)) else None
        self.one_row = len(set(rows)) == 1 and pos == list(range(pos[0], pos[0] + b))
        self.same_pos = len(set(pos)) == 1
        self._rows_t = self._pos_t = None
        self._device, self._torch = device, torch

    def index(self):
        """Device index tensors (rows, positions), made once per reservation."""
        if self._rows_t is None:
            self._rows_t = self._torch.tensor(self.rows, dtype=self._torch.int64, device=self._device)
            self._pos_t = self._torch.tensor(self.pos, dtype=self._torch.int64, device=self._device)
        return self._rows_t, self._pos_t


class FlatKVCache:
    """What a PyTorch user would write first: a static per-request K/V cache (as HF's StaticCache).

    Per layer, ``k[layer]`` and ``v[layer]`` are torch tensors [num_slots, Hkv, max_len, D] of
    the storage dtype, allocated up front; each live sequence owns one row and its K/V are
    contiguous in it, no sharing: a shared system prompt is stored (and prefilled) once per
    request. It has the methods ``Server`` calls on a chunk-tree cache; "chunks" are
    ``chunk_size``-token pieces of the rows (admission accounting only), and nothing is ever
    cached after release (``num_cached`` 0). ``Server.max_batch`` at most ``num_slots`` keeps
    admission from asking for a row when none is free.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_slots: int, max_len: int,
                 chunk_size: int = 64, dtype: str = "float16", device="cuda"):
        import torch

        self.torch = torch
        self.num_layers, self.num_kv_heads, self.head_dim = int(num_layers), int(num_kv_heads), int(head_dim)
        self.num_slots, self.chunk_size = int(num_slots), int(chunk_size)
        self.dtype = check_dtype_name(dtype)
        self.max_len = cdiv(int(max_len), self.chunk_size) * self.chunk_size
        self.chunks_per_row = self.max_len // self.chunk_size
        self.num_chunks = self.num_slots * self.chunks_per_row
        self.device = torch.device(device)
        tdt = torch.float16 if self.dtype == "float16" else torch.bfloat16
        shape = (self.num_slots, self.num_kv_heads, self.max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=tdt, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=tdt, device=self.device) for _ in range(self.num_layers)]
        self._free_rows = list(range(self.num_slots - 1, -1, -1))  # pop() gives the lowest row
        self._seqs: dict[int, list] = {}  # seq -> [row, tokens]
        self._next_id = 0
        self.version = 0

    # ---------------------------------------------------------------- introspection
    @property
    def sequences(self) -> list[int]:
        return list(self._seqs)

    def seq_len(self, seq: int) -> int:
        return self._seqs[seq][1]

    def row(self, seq: int) -> int:
        return self._seqs[seq][0]

    def seq_chunks(self, seq: int) -> list[int]:
        row, n = self._seqs[seq]
        return list(range(row * self.chunks_per_row, row * self.chunks_per_row + cdiv(n, self.chunk_size)))

    @property
    def num_referenced(self) -> int:
        return sum(cdiv(n, self.chunk_size) for _, n in self._seqs.values())

    @property
    def num_free(self) -> int:
        return self.num_chunks - self.num_referenced

    @property
    def num_cached(self) -> int:
        return 0

    def cached_nodes(self) -> list:
        """Complete chunks no sequence uses: none, nothing stays cached after release."""
        return []

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    def stats(self) -> dict:
        flat = sum(n for _, n in self._seqs.values())
        return dict(sequences=len(self._seqs), chunks_free=self.num_free, chunks_cached=0,
                    chunks_referenced=self.num_referenced, tokens_stored=flat, tokens_flat=flat,
                    tokens_allocated=self.num_slots * self.max_len)

    # ---------------------------------------------------------------- sequences
    def add_sequence(self, tokens=(), *, max_match: int | None = None) -> int:
        """A new sequence in a free row; nothing is reused (``seq_len`` 0)."""
        if not self._free_rows:
            raise CacheFullError(f"flat cache: all {self.num_slots} rows are in use")
        sid, self._next_id = self._next_id, self._next_id + 1
        self._seqs[sid] = [self._free_rows.pop(), 0]
        self.version += 1
        return sid

    def _grow(self, seq: int, n: int) -> tuple[int, int]:
        row, start = self._seqs[seq]
        if start + n > self.max_len:
            raise CacheFullError(f"flat cache: sequence {seq} would hold {start + n} tokens, rows hold {self.max_len}")
        self._seqs[seq][1] = start + n
        return row, start

    def reserve(self, seq: int, tokens) -> FlatSlots:
        n = len(tokens)
        row, start = self._grow(seq, n)
        self.version += 1
        return FlatSlots([row] * n, list(range(start, start + n)), self.device)

    def reserve_batch(self, seqs, tokens) -> FlatSlots:
        rows, pos = [], []
        for s in seqs:
            row, start = self._grow(int(s), 1)
            rows.append(row)
            pos.append(start)
        self.version += 1
        return FlatSlots(rows, pos, self.device)

    def write_kv(self, layer: int, slots: FlatSlots, k, v) -> None:
        """k, v [n, Hkv, D] (storage dtype: NumPy, CuPy or torch) into their rows and positions."""
        for pool, x in ((self.k[layer], k), (self.v[layer], v)):
            t = to_torch(x, self.dtype)
            if slots.one_row:  # a prefill chunk: one slice copy
                pool[slots.rows[0], :, slots.pos[0]:slots.pos[0] + t.shape[0]].copy_(t.transpose(0, 1))
            elif slots.row_range is not None and slots.same_pos:  # a decode step in lockstep
                pool[slots.row_range:slots.row_range + t.shape[0], :, slots.pos[0]].copy_(t)
            else:
                rows, pos = slots.index()
                pool[rows, :, pos] = t  # index_put_: value [n, Hkv, D]

    def commit(self, seq: int) -> None:
        if seq not in self._seqs:
            raise KeyError(f"seq: no live sequence {seq}")

    def release(self, seq: int) -> None:
        row, _ = self._seqs.pop(seq)
        self._free_rows.append(row)
        self._free_rows.sort(reverse=True)
        self.version += 1


class TorchSdpaBackend:
    """The serving example's two attention methods on torch SDPA over a ``FlatKVCache``.

    prefill: the chunk's queries against the sequence's own K/V rows; ``is_causal=True`` when the
    chunk is the whole prompt so far (the default: every prompt prefilled in one call), a
    lower-right causal boolean mask otherwise. decode: one batched call over the running
    sequences' rows, a view of the cache when the rows are consecutive (a copy of the rows
    otherwise), padded to the longest, with a key mask only when lengths differ. GQA through
    ``enable_gqa``. Inputs and outputs are NumPy/CuPy storage-dtype arrays exchanged with torch
    by DLPack (no copies); the model around it is unchanged.
    """

    name, label = "torch-sdpa", "torch SDPA"

    def __init__(self, cache: FlatKVCache, xp, num_q_heads: int):
        import torch
        import torch.nn.functional as F

        self.cache, self.xp, self.torch, self.F = cache, xp, torch, F
        self.num_q_heads = int(num_q_heads)
        self.gqa = dict(enable_gqa=True) if num_q_heads != cache.num_kv_heads else {}
        self.stats = AttentionStats(cache.num_layers)
        self.masked_calls = self.gathered_calls = 0
        self._batch_key, self._batch = None, None
        self._prefill_key, self._prefill_mask = None, None

    def sync(self) -> None:
        if self.cache.device.type == "cuda":
            self.torch.cuda.synchronize()

    def prefill(self, seq: int, q, layer: int):
        """q [n, Hq, D] (the sequence's last n tokens, K/V written) -> o [n, Hq, D] storage dtype."""
        c, torch = self.cache, self.torch
        row, total = c.row(seq), c.seq_len(seq)
        n = q.shape[0]
        start = total - n
        qt = to_torch(q, c.dtype).transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        k, v = c.k[layer][row:row + 1, :, :total], c.v[layer][row:row + 1, :, :total]  # [1, Hkv, total, D]
        if start == 0:
            o = self.F.scaled_dot_product_attention(qt, k, v, is_causal=True, **self.gqa)
        else:  # a later chunk: query i sees keys 0 .. start + i
            if self._prefill_key != (start, n):
                keys = torch.arange(total, device=c.device)
                rows = torch.arange(start, total, device=c.device)
                self._prefill_key, self._prefill_mask = (start, n), keys[None, :] <= rows[:, None]
            o = self.F.scaled_dot_product_attention(qt, k, v, attn_mask=self._prefill_mask, **self.gqa)
        self.stats.prefill_calls += 1
        return from_torch(o[0].transpose(0, 1), self.xp, c.dtype)

    def decode(self, seqs, q, layer: int):
        """q [B, Hq, D], one token per sequence (K/V appended) -> o [B, Hq, D] storage dtype."""
        c = self.cache
        lo, idx, length, mask = self._batch_for(seqs)
        if idx is None:
            k, v = c.k[layer][lo:lo + len(seqs), :, :length], c.v[layer][lo:lo + len(seqs), :, :length]
        else:
            k, v = c.k[layer][idx, :, :length], c.v[layer][idx, :, :length]
            self.gathered_calls += 1
        self.masked_calls += mask is not None
        qt = to_torch(q, c.dtype).unsqueeze(2)  # [B, Hq, 1, D]
        o = self.F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, **self.gqa)
        self.stats.decode_calls += 1
        return from_torch(o.squeeze(2), self.xp, c.dtype)

    def probe_kernels(self) -> dict:
        """Which SDPA kernels accept this backend's calls (same layouts: strided cache views, q from
        [n, Hq, D]): {"decode": "flash,...", "prefill": ..., "decode_default": the one torch picks, ...}."""
        import warnings

        from torch.nn.attention import SDPBackend, sdpa_kernel

        torch, c, F = self.torch, self.cache, self.F
        L, B, D = min(c.max_len, 4 * c.chunk_size), min(2, c.num_slots), c.head_dim
        k, v = c.k[0][:B, :, :L], c.v[0][:B, :, :L]
        q_dec = torch.zeros(B, self.num_q_heads, D, dtype=k.dtype, device=c.device).unsqueeze(2)
        q_pre = torch.zeros(L, self.num_q_heads, D, dtype=k.dtype, device=c.device).transpose(0, 1).unsqueeze(0)
        args = dict(decode=((q_dec, k, v), dict(is_causal=False)), prefill=((q_pre, k[:1], v[:1]), dict(is_causal=True)))
        names = {m.value: name for name, m in SDPBackend.__members__.items()}
        out = {}
        for what, (qkv, kw) in args.items():
            def fn(qkv=qkv, kw=kw):
                return F.scaled_dot_product_attention(*qkv, **kw, **self.gqa)

            try:  # what torch picks by default (a private call: diagnostic only)
                choice = torch._fused_sdp_choice(*qkv, attn_mask=None, dropout_p=0.0, scale=None,
                                                 enable_gqa=bool(self.gqa), **kw)
                out[f"{what}_default"] = names.get(int(choice), str(choice)).split("_")[0].lower()
            except Exception:  # noqa: BLE001
                out[f"{what}_default"] = "unknown"
            ok = []
            for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
                backend = getattr(SDPBackend, name, None)
                if backend is None:
                    continue
                try:
                    with warnings.catch_warnings(), sdpa_kernel(backend):
                        warnings.simplefilter("ignore")
                        fn()
                    ok.append(name.split("_")[0].lower())
                except RuntimeError:
                    pass
            out[what] = ",".join(ok) or "none"
        return out

    def _batch_for(self, seqs):
        """(first row or None, row index tensor or None, padded length, key mask or None), once per step."""
        key = (tuple(int(s) for s in seqs), self.cache.version)
        if key != self._batch_key:
            torch, c = self.torch, self.cache
            rows = [c.row(s) for s in key[0]]
            lens = [c.seq_len(s) for s in key[0]]
            length = max(lens)
            lo, idx = rows[0], None
            if rows != list(range(lo, lo + len(rows))):
                lo, idx = None, torch.tensor(rows, dtype=torch.int64, device=c.device)
            mask = None
            if min(lens) != length:
                lt = torch.tensor(lens, dtype=torch.int64, device=c.device)
                mask = (torch.arange(length, device=c.device)[None, :] < lt[:, None]).view(len(rows), 1, 1, length)
            self._batch_key, self._batch = key, (lo, idx, length, mask)
        return self._batch
