"""Kernel loading: one table of compiled variants, one readable key per variant.

Sources live in ``raw_kernels/`` (installed as ``cpattn.raw_kernels``) and are read with
``importlib.resources``. Local ``#include "x.cuh"`` lines are inlined into the source string,
because CuPy's on-disk cache hashes the source and options only, not headers found with -I.
A variant is (kernel file, storage dtype, head_dim, chunk size); its key, e.g.
``chunk_attention_f16_d128_c64``, is the memo key and the name in logs.
"""
from __future__ import annotations

import functools
import importlib.resources
import re

DTYPES = {"float16": ("f16", "__half"), "bfloat16": ("bf16", "__nv_bfloat16")}
HEAD_DIMS = (64, 128)
CHUNK_SIZES = (16, 32, 64, 128)
NVRTC_OPTIONS = ("-std=c++17",)

# kernel file -> (template name, template-args builder) of every kernel instantiated per variant
KERNELS = {
    "chunk_attention": (
        ("cpattn::chunk_attend", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::chunk_merge", lambda t, d, c: f"{t}, {d}"),
    ),
    "chunk_cache": (
        ("cpattn::kv_append", lambda t, d, c: f"{t}, {d}, {c}"),
    ),
    "compact_attention": (
        ("cpattn::block_mean", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::block_score", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::paged_prefill", lambda t, d, c: f"{t}, {d}, {c}"),
        ("cpattn::block_union", None),
        ("cpattn::tables_csr", None),
    ),
    "compact_attention_sm90": (  # the paged prefill on Hopper warpgroup MMA: compute capability 9.0 only
        ("cpattn::paged_prefill_wg", lambda t, d, c: f"{t}, {d}, {c}"),
    ),
}
# kernel file -> the architecture it needs (NVRTC -arch / nvcc -arch); others: the device's own
ARCH = {"compact_attention_sm90": "sm_90a"}


def options(file: str) -> tuple:
    """NVRTC options of a kernel file."""
    return NVRTC_OPTIONS + ((f"-arch={ARCH[file]}",) if file in ARCH else ())


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


def _read(name: str) -> str:
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
            return inline(_read(inc))

        return re.sub(r'^#include "([^"]+)"\s*$', repl, text, flags=re.M)

    return inline(_read(file + ".cu"))


@functools.lru_cache(maxsize=None)
def _module(key: str, file: str, dtype: str, head_dim: int, chunk_size: int, device: int):
    import cupy

    names = name_expressions(file, dtype, head_dim, chunk_size)
    mod = cupy.RawModule(code=source(file), options=options(file), name_expressions=tuple(names.values()))
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
