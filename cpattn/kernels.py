"""Kernel loading, and the one table of constants Python and CUDA share.

Sources live in ``raw_kernels/`` (installed as ``cpattn.raw_kernels``) and are read with
``importlib.resources``. Local ``#include "x.cuh"`` lines are inlined into the source string,
because CuPy's on-disk cache hashes the source and options only, not headers found with -I.
A variant is (kernel file, storage dtype, head_dim, chunk size); its key, e.g.
``chunk_attention_f16_d128_c64``, is the memo key and the name in logs.

Constants: ``CONSTANTS`` is the only place thread counts, rows per unit and the decode unit
record are written down. The loader passes them to NVRTC as ``-D`` options (``options(file)``,
so CuPy's disk cache hashes them), ``tools/compile_kernels.py`` and ``tools/nvrtc_check.py``
pass the same to nvcc and offline NVRTC, and a kernel file compiled without them stops at an
``#error`` (raw_kernels/common.cuh). Python reads the same values under the names without the
``CPATTN_`` prefix (``kernels.DECODE_ROWS``). The shared-memory sizes are computed here
(``decode_smem_bytes``, ``prefill_smem_bytes``, ``prefill_wg_smem_bytes``); every compiled
program ends with ``static_assert``s that the kernels' own layouts take the same number of
bytes (``smem_asserts``), so the two cannot drift apart silently.
"""
from __future__ import annotations

import functools
import importlib.resources
import re

DTYPES = {"float16": ("f16", "__half"), "bfloat16": ("bf16", "__nv_bfloat16")}
HEAD_DIMS = (64, 128)
CHUNK_SIZES = (16, 32, 64, 128)
NVRTC_OPTIONS = ("-std=c++17",)

# The decode unit record, int32 [num_units, len(UNIT_FIELDS)], built by cpattn/chunk_attention.py
# and read by chunk_attend; raw_kernels/chunk_attention.cu names the same fields in the same
# order (enum U_CHUNK_BEGIN, ...; tests/test_kernel_sources.py compares them).
UNIT_FIELDS = (
    "chunk_begin",  # first entry of the unit in chunk_list
    "chunk_end",    # one past its last entry
    "len_slot",     # -1: every chunk full; else keys = slot_lens[len_slot] - len_minus
    "len_minus",    # tokens on the sequence's path before the unit's first chunk
    "pos_begin",    # batch position (depth-first order) of row 0 of the unit's row space
    "row0",         # first row of the unit within that row space
    "row_count",    # rows in the unit
    "kv_head",
    "out_base",     # state row of the row space's first sequence
)

# The per-sequence record of a batched varlen prefill, int32 [len(PREFILL_SEQ_FIELDS), B] (field
# f of sequence b at f * B + b), built by cpattn/compact_attention.py; raw_kernels/
# compact_attention.cuh names the same fields in the same order (enum SQ_CHUNK_LEN, ...).
PREFILL_SEQ_FIELDS = (
    "chunk_len",     # n
    "past_blocks",   # Pb
    "query_blocks",  # Qb = Cb, the chunk's own pages
    "tile_blocks",   # q_tile / chunk_size
    "row0",          # first row of the chunk in the packed q, o, lse
    "table0",        # first table of the sequence in the batch
    "block0",        # first entry of the sequence in the packed block list
    "score0",        # first float of the sequence in the packed block scores
)

CONSTANTS = {
    # every mma.sync kernel: 4 warps (chunk_attend, chunk_merge, block_score, tables_csr, paged_prefill)
    "CPATTN_THREADS": 128,
    # chunk_attend: rows of a one-tile unit (4 warps x 16): phase-2 units, and phase-1 units
    # at chunk sizes above DECODE_WIDE_MAX_CHUNK
    "CPATTN_DECODE_ROWS": 64,
    # rows of a two-tile phase-1 unit (4 warps x 32, two mma tiles per K/V fragment), used up
    # to chunk size DECODE_WIDE_MAX_CHUNK (beyond it the K/V stages leave no room for them)
    "CPATTN_DECODE_WIDE_ROWS": 128,
    "CPATTN_DECODE_WIDE_MAX_CHUNK": 64,
    "CPATTN_UNIT_WIDTH": len(UNIT_FIELDS),  # int32 columns of the decode unit record
    # kv_append: threads per block (one thread per 16-byte vector)
    "CPATTN_APPEND_THREADS": 256,
    # block_score: query rows per block (4 warps x 32)
    "CPATTN_SCORE_ROWS": 128,
    # sampled_block_mass (summary="sampled"): rows per block (4 warps x 32; rows of the G heads of
    # one kv head x the sampled rows) and keys per pipeline step
    "CPATTN_SAMPLED_ROWS": 128,
    "CPATTN_SAMPLED_KEYS": 64,
    # block_union: threads per block (one past block per thread and sweep)
    "CPATTN_UNION_THREADS": 256,
    # paged_prefill and paged_prefill_wg: query rows per unit (a block)
    "CPATTN_PREFILL_ROWS": 128,
    # paged_prefill: keys per pipeline step at most (a page of 128 keys is two steps)
    "CPATTN_PREFILL_KEYS": 64,
    # paged_prefill_wg: two warpgroups of 64 rows, keys per step, cp.async stages per head_dim
    "CPATTN_WG_THREADS": 256,
    "CPATTN_WG_KEYS": 128,
    "CPATTN_WG_STAGES_D64": 4,
    "CPATTN_WG_STAGES_D128": 3,
}

THREADS = CONSTANTS["CPATTN_THREADS"]
DECODE_ROWS = CONSTANTS["CPATTN_DECODE_ROWS"]
DECODE_WIDE_ROWS = CONSTANTS["CPATTN_DECODE_WIDE_ROWS"]
DECODE_WIDE_MAX_CHUNK = CONSTANTS["CPATTN_DECODE_WIDE_MAX_CHUNK"]
UNIT_WIDTH = CONSTANTS["CPATTN_UNIT_WIDTH"]
APPEND_THREADS = CONSTANTS["CPATTN_APPEND_THREADS"]
SCORE_ROWS = CONSTANTS["CPATTN_SCORE_ROWS"]
SAMPLED_ROWS = CONSTANTS["CPATTN_SAMPLED_ROWS"]
SAMPLED_KEYS = CONSTANTS["CPATTN_SAMPLED_KEYS"]
UNION_THREADS = CONSTANTS["CPATTN_UNION_THREADS"]
PREFILL_ROWS = CONSTANTS["CPATTN_PREFILL_ROWS"]
PREFILL_KEYS = CONSTANTS["CPATTN_PREFILL_KEYS"]
WG_THREADS = CONSTANTS["CPATTN_WG_THREADS"]
WG_KEYS = CONSTANTS["CPATTN_WG_KEYS"]
WG_STAGES_D64 = CONSTANTS["CPATTN_WG_STAGES_D64"]
WG_STAGES_D128 = CONSTANTS["CPATTN_WG_STAGES_D128"]
WG_STAGES = {64: WG_STAGES_D64, 128: WG_STAGES_D128}  # head_dim -> cp.async stages of paged_prefill_wg

_ELEM = 2  # bytes of a storage element (fp16, bf16)
_PAD = 8   # elements of padding per shared-memory row of the mma.sync kernels (16 bytes: conflict-free ldmatrix)


def phase1_rows(chunk_size: int) -> int:
    """Rows of a decode phase-1 unit at this chunk size (the unit's Q tile in chunk_attend)."""
    return DECODE_WIDE_ROWS if chunk_size <= DECODE_WIDE_MAX_CHUNK else DECODE_ROWS


def invariant_rows(chunk_size: int, queries_per_seq: int = 1) -> int:
    """Rows of a batch-invariant decode unit. chunk_attend_invariant splits every unit's keys
    over its 4 warps by a fixed rule of (chunk size, k), never of the row count: with one query
    per sequence 4 ways at chunk >= 64, 2 at 32, none below (each warp needs >= 16 keys of a
    page); with k > 1 none (many rows per sequence fill the warps). A unit holds 16 rows per
    warp that does not share keys. Measured choice: docs/design.md, "Batch-invariant decode"."""
    if queries_per_seq > 1:
        return DECODE_ROWS
    return DECODE_ROWS // (4 if chunk_size >= 64 else 2 if chunk_size >= 32 else 1)


def decode_smem_bytes(head_dim: int, chunk_size: int) -> int:
    """Dynamic shared memory of chunk_attend (DecodeSmem<D, C> in raw_kernels/chunk_attention.cu):
    the Q tile of ``phase1_rows`` rows and two K/V stages of one page, rows padded by 16 bytes;
    where keys are split over warps (chunk size >= 32) the partial states of the 4 warps
    (16 rows x head_dim floats, then 16 maxima and 16 sums each) overlay the K/V stages."""
    ld = head_dim + _PAD
    q = phase1_rows(chunk_size) * ld * _ELEM
    kv = 2 * 2 * chunk_size * ld * _ELEM
    warps, rows = THREADS // 32, DECODE_ROWS // (THREADS // 32)
    split = warps * (rows * head_dim + 2 * rows) * 4 if chunk_size >= 32 else 0  # (>= 16 keys per warp of 2)
    return q + max(kv, split)


def prefill_smem_bytes(head_dim: int, chunk_size: int) -> int:
    """Dynamic shared memory of paged_prefill (PrefillSmem<D, C>): the Q tile and two K/V stages
    of min(chunk_size, PREFILL_KEYS) keys, rows padded by 16 bytes."""
    keys = min(chunk_size, PREFILL_KEYS)
    return (PREFILL_ROWS + 2 * 2 * keys) * (head_dim + _PAD) * _ELEM


def prefill_wg_smem_bytes(head_dim: int, chunk_size: int) -> int:
    """Dynamic shared memory of paged_prefill_wg (WgSmem<D, C>): 1024 bytes of slack to align the
    swizzled tiles, the Q tile, K and V of WG_KEYS keys per stage, and two mbarriers per stage."""
    stages = WG_STAGES[head_dim]
    return 1024 + PREFILL_ROWS * head_dim * _ELEM + 2 * stages * WG_KEYS * head_dim * _ELEM + 2 * stages * 8


# kernel file -> (template name, template-args builder) of every kernel instantiated per variant
KERNELS = {
    "chunk_attention": (  # one query per sequence; and the multi-token decode (queries_per_seq, tree masks)
        ("cpattn::chunk_attend", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::chunk_merge", lambda t, d, c: f"{t}, {d}"),
        ("cpattn::chunk_attend_multi", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::chunk_merge_multi", lambda t, d, c: f"{t}, {d}"),
        # batch-invariant plans (any k): fixed per-row arithmetic; merged by chunk_merge_multi
        ("cpattn::chunk_attend_invariant", lambda t, d, c: f"{t}, {d}, {c}"),
    ),
    "chunk_cache": (
        ("cpattn::kv_append", lambda t, d, c: f"{t}, {d}, {c}"),
    ),
    "compact_attention": (
        ("cpattn::block_mean", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::block_score", lambda t, d, c: f"{t}, {d}, {c}"),
        # summary="sampled": the sampled rows' exact mass per key block (estimate_mass's kernel)
        ("cpattn::sampled_block_mass", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::paged_prefill", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::block_union", None),
        ("cpattn::tables_csr", None),
        # batched varlen prefill (cpattn.compact_attention.BatchedPrefill): one launch per stage
        ("cpattn::block_score_varlen", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::block_union_varlen", None),
        ("cpattn::paged_prefill_varlen", lambda t, d, c: f"{t}, {d}, {c}"),
    ),
    "compact_attention_sm90": (  # the paged prefill on Hopper warpgroup MMA: compute capability 9.0 only
        ("cpattn::paged_prefill_wg", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::paged_prefill_wg_varlen", lambda t, d, c: f"{t}, {d}, {c}"),
    ),
    "model_ops": (  # the model's fused steps of the CUDA-graphed decode step (cpattn/serving/graphed.py)
        ("cpattn::embed_rows", lambda t, d, c: t),
        ("cpattn::add_rms_norm", lambda t, d, c: t),
        ("cpattn::rope_split", lambda t, d, c: f"{t}, {d}"),
        ("cpattn::silu_mul", lambda t, d, c: t),
        ("cpattn::argmax_rows", lambda t, d, c: t),
        ("cpattn::advance_step", None),
    ),
}
# kernel file -> the architecture it needs (NVRTC -arch / nvcc -arch); others: the device's own
ARCH = {"compact_attention_sm90": "sm_90a"}
# kernel file -> (its shared-memory layout in C++, the Python size of it), checked equal in every compile
SMEM = {
    "chunk_attention": ("cpattn::DecodeSmem", decode_smem_bytes),
    "compact_attention": ("cpattn::PrefillSmem", prefill_smem_bytes),
    "compact_attention_sm90": ("cpattn::WgSmem", prefill_wg_smem_bytes),
}


def defines() -> tuple:
    """The constants table as compiler options: ('-DCPATTN_THREADS=128', ...)."""
    return tuple(f"-D{name}={value}" for name, value in CONSTANTS.items())


def options(file: str) -> tuple:
    """Compiler options of a kernel file: C++17, the constants (-D) and, where the file needs
    one, its architecture (-arch=sm_90a). NVRTC takes them as they are; nvcc too, with its own
    target in place of -arch."""
    return NVRTC_OPTIONS + defines() + ((f"-arch={ARCH[file]}",) if file in ARCH else ())


def variant_key(file: str, dtype: str, head_dim: int, chunk_size: int) -> str:
    return f"{file}_{DTYPES[dtype][0]}_d{head_dim}_c{chunk_size}"


def all_variants():
    """Every (file, dtype, head_dim, chunk_size) the package compiles."""
    return [(f, dt, d, c) for f in KERNELS for dt in DTYPES for d in HEAD_DIMS for c in CHUNK_SIZES]


def name_expressions(file: str, dtype: str, head_dim: int, chunk_size: int) -> dict:
    """short kernel name -> C++ name expression, e.g. 'chunk_attend' -> 'cpattn::chunk_attend<__half, 128, 64>'."""
    ctype = DTYPES[dtype][1]
    return {name.split("::")[-1]: (f"{name}<{args(ctype, head_dim, chunk_size)}>" if args else name)
            for name, args in KERNELS[file]}


def smem_asserts(file: str, head_dim: int, chunk_size: int) -> str:
    """C++ that stops the compile unless the kernel's shared-memory layout takes the bytes the
    launcher asks for (empty for files with no dynamic shared memory)."""
    if file not in SMEM:
        return ""
    layout, size = SMEM[file]
    return (f"static_assert({layout}<{head_dim}, {chunk_size}>::bytes == {size(head_dim, chunk_size)}, "
            f"\"{size.__name__}({head_dim}, {chunk_size}) in cpattn/kernels.py disagrees with {layout}\");\n")


def read_source(name: str) -> str:
    """One file of raw_kernels/ as it is (no includes inlined), e.g. 'wgmma.cuh'."""
    return importlib.resources.files("cpattn.raw_kernels").joinpath(name).read_text()


@functools.lru_cache(maxsize=None)
def source(file: str) -> str:
    """The kernel file with its local includes inlined (each once)."""
    seen = set()

    def inline(text: str) -> str:
        def repl(m):
            inc = m.group(1)
            if inc in seen:
                return ""
            seen.add(inc)
            return inline(read_source(inc))

        return re.sub(r'^#include "([^"]+)"\s*$', repl, text, flags=re.M)

    return inline(read_source(file + ".cu"))


def program(file: str, head_dim: int, chunk_size: int) -> str:
    """What is compiled for one variant: the source and its shared-memory check."""
    return source(file) + "\n" + smem_asserts(file, head_dim, chunk_size)


@functools.lru_cache(maxsize=None)
def _module(key: str, file: str, dtype: str, head_dim: int, chunk_size: int, device: int):
    import cupy

    names = name_expressions(file, dtype, head_dim, chunk_size)
    mod = cupy.RawModule(code=program(file, head_dim, chunk_size), options=options(file),
                         name_expressions=tuple(names.values()))
    return {short: mod.get_function(expr) for short, expr in names.items()}


def get_kernels(file: str, dtype: str, head_dim: int, chunk_size: int) -> dict:
    """Compiled kernels of one variant on the current device: {'chunk_attend': Function, ...}."""
    import cupy

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: expected one of {HEAD_DIMS} for the CUDA kernels, got {head_dim}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size: expected one of {CHUNK_SIZES} for the CUDA kernels, got {chunk_size}")
    key = variant_key(file, dtype, head_dim, chunk_size)
    return _module(key, file, dtype, head_dim, chunk_size, cupy.cuda.Device().id)


# ---------------------------------------------------------------------- logging
# Kernel compiles go to the standard logger "cpattn" (INFO: which variant, on which device, how
# long; a variant is compiled once per process and device, later calls hit the cache).
def log_compiles(compile_variant):
    import logging
    import time

    log = logging.getLogger("cpattn")

    @functools.wraps(compile_variant)
    def call(key, file, dtype, head_dim, chunk_size, device):
        misses = compile_variant.cache_info().misses
        t0 = time.perf_counter()
        out = compile_variant(key, file, dtype, head_dim, chunk_size, device)
        if compile_variant.cache_info().misses > misses:
            log.info("compiled kernels %s on device %d in %.2f s", key, device, time.perf_counter() - t0)
        return out

    call.cache_info, call.cache_clear = compile_variant.cache_info, compile_variant.cache_clear
    return call


_module = log_compiles(_module)
