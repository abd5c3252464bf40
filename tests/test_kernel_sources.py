"""Kernel sources and their build options (CPU): the generated wgmma header is current, every
kernel file is in the loader's table, the constants Python and CUDA share come from one table
(cpattn/kernels.py CONSTANTS) and agree with what the kernels read, and the pieces written
once in CUDA (the state epilogue, the paged-prefill unit geometry) stay written once."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from cpattn import kernels
from cpattn.raw_kernels import gen_wgmma

CUDA_FILES = ("chunk_attention.cu", "chunk_cache.cu", "compact_attention.cu", "compact_attention_sm90.cu",
              "attend_core.cuh", "common.cuh", "compact_attention.cuh", "wgmma.cuh")


def raw(name: str) -> str:
    return kernels.read_source(name)


def without_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


# ------------------------------------------------------------------------- files and options
def test_generated_wgmma_header_is_current(tmp_path):
    assert gen_wgmma.render() == raw("wgmma.cuh"), "run python -m cpattn.raw_kernels.gen_wgmma"
    gen_wgmma.main(["--out", str(tmp_path / "wgmma.cuh")])
    assert (tmp_path / "wgmma.cuh").read_text() == raw("wgmma.cuh")


def test_every_kernel_file_is_loaded_and_hopper_file_targets_sm90a():
    import importlib.resources

    files = {p.name[:-3] for p in importlib.resources.files("cpattn.raw_kernels").iterdir() if p.name.endswith(".cu")}
    assert files == set(kernels.KERNELS)
    assert "-arch=sm_90a" in kernels.options("compact_attention_sm90")
    assert not any(o.startswith("-arch") for o in kernels.options("compact_attention"))
    src = kernels.source("compact_attention_sm90")
    assert "#include" not in src.replace("#include <cuda_fp16.h>", "").replace("#include <cuda_bf16.h>", "")
    assert "wgmma.mma_async" in src and "paged_prefill_wg" in src
    assert src.count("struct PagedUnit {") == 1  # each local header inlined once


def test_prefill_kernel_choice_is_checked_before_touching_the_gpu(monkeypatch):
    from cpattn.compact_attention import choose_kernel

    with pytest.raises(ValueError, match=r"kernel: expected one of \('auto', 'wgmma', 'mma'\), got 'fast'"):
        choose_kernel("fast")
    monkeypatch.setenv("CPATTN_PREFILL_KERNEL", "tensor")
    with pytest.raises(ValueError, match=r"CPATTN_PREFILL_KERNEL: expected one of .*, got 'tensor'"):
        choose_kernel("auto")
    monkeypatch.setenv("CPATTN_PREFILL_KERNEL", "mma")
    assert choose_kernel("auto") == "mma" and choose_kernel("mma") == "mma"


# ------------------------------------------------------------------------- one table of constants
def test_every_file_is_compiled_with_every_constant_as_a_define():
    expected = [f"-D{name}={value}" for name, value in kernels.CONSTANTS.items()]
    for file in kernels.KERNELS:
        opts = kernels.options(file)
        assert [o for o in opts if o.startswith("-DCPATTN_")] == expected, file
        assert "-std=c++17" in opts


def test_python_names_read_the_same_table():
    for name, value in kernels.CONSTANTS.items():
        assert name.startswith("CPATTN_") and isinstance(value, int) and value > 0, name
        assert getattr(kernels, name[len("CPATTN_"):]) == value, name
    assert kernels.WG_STAGES == {64: kernels.WG_STAGES_D64, 128: kernels.WG_STAGES_D128}
    assert kernels.phase1_rows(64) == kernels.DECODE_WIDE_ROWS and kernels.phase1_rows(128) == kernels.DECODE_ROWS


def test_the_backends_launch_with_the_table():
    from cpattn import chunk_attention, chunk_cache, compact_attention

    assert chunk_attention.THREADS is kernels.THREADS
    assert chunk_attention.ROWS_PER_UNIT == kernels.DECODE_ROWS
    assert chunk_attention.phase1_rows is kernels.phase1_rows
    assert compact_attention.PREFILL_ROWS == kernels.PREFILL_ROWS
    assert chunk_cache.APPEND_THREADS == kernels.APPEND_THREADS


def test_the_kernels_read_the_constants_and_define_none():
    used, defined = set(), []
    for name in CUDA_FILES:
        text = without_comments(raw(name))
        used |= set(re.findall(r"\bCPATTN_[A-Z0-9_]+\b", text))
        defined += re.findall(r"#\s*define\s+(CPATTN_\w+)", text)
    assert not defined, f"constants defined in CUDA instead of cpattn/kernels.py: {defined}"
    assert used == set(kernels.CONSTANTS), (sorted(used - set(kernels.CONSTANTS)),
                                           sorted(set(kernels.CONSTANTS) - used))
    # no stale copies of the old constexprs
    for old in ("kThreads", "kRows", "kPrefillRows", "kScoreRows", "kWgRows", "kWgThreads"):
        assert not any(re.search(rf"\b{old}\b", raw(n)) for n in CUDA_FILES), old


def test_a_compile_without_the_table_stops_at_an_error():
    guard = re.search(r"#if (.*?)\n#error \"([^\"]+)\"", raw("common.cuh"), re.S)
    assert guard, "common.cuh: expected one #if !defined(...) ... #error guard"
    assert set(re.findall(r"!defined\((CPATTN_\w+)\)", guard.group(1))) == set(kernels.CONSTANTS)
    assert "cpattn.kernels.options" in guard.group(2)
    for file in kernels.KERNELS:  # every kernel file sees the guard before any kernel
        src = kernels.source(file)
        assert src.index("#error") < src.index("__global__"), file


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (preprocessor only)")
def test_nvcc_preprocessor_rejects_a_missing_constant(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text(kernels.source("chunk_cache"))
    defines = [d for d in kernels.defines() if not d.startswith("-DCPATTN_APPEND_THREADS=")]
    bad = subprocess.run(["nvcc", "-E", "-std=c++17", *defines, str(src), "-o", str(tmp_path / "k.ii")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "cpattn constants missing" in bad.stderr
    good = subprocess.run(["nvcc", "-E", "-std=c++17", *kernels.defines(), str(src), "-o", str(tmp_path / "k.ii")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr


def test_unit_record_fields_match_the_kernel_enum():
    src = without_comments(raw("chunk_attention.cu"))
    body = re.search(r"enum\s*\{([^}]*)\}", src).group(1)
    names = [n.strip() for n in body.split(",") if n.strip()]
    assert names[-1] == "kUnitFields"
    assert [n[len("U_"):].lower() for n in names[:-1]] == list(kernels.UNIT_FIELDS)
    assert kernels.UNIT_WIDTH == len(kernels.UNIT_FIELDS) == 9
    assert re.search(r"static_assert\(kUnitFields == CPATTN_UNIT_WIDTH", src)


# ------------------------------------------------------------------------- shared memory
LAYOUTS = {"chunk_attention": "DecodeSmem", "compact_attention": "PrefillSmem", "compact_attention_sm90": "WgSmem"}


@pytest.mark.parametrize("file", sorted(LAYOUTS))
def test_every_compile_checks_the_python_shared_memory_size(file):
    """The launcher's size is a static_assert in the compiled program, so a kernel whose layout
    changed without cpattn/kernels.py changing too fails to compile (on every variant)."""
    layout, size = kernels.SMEM[file]
    assert layout == f"cpattn::{LAYOUTS[file]}"
    assert f"struct {LAYOUTS[file]} {{" in kernels.source(file)
    for d in kernels.HEAD_DIMS:
        for c in kernels.CHUNK_SIZES:
            line = f"static_assert({layout}<{d}, {c}>::bytes == {size(d, c)},"
            assert line in kernels.program(file, d, c)
            assert line in kernels.smem_asserts(file, d, c)
    assert kernels.smem_asserts("chunk_cache", 128, 64) == ""


def test_shared_memory_sizes_fit_the_hardware_and_follow_the_constants():
    per_block = 227 * 1024  # opt-in maximum per block on sm_90 (and sm_80)
    for d in kernels.HEAD_DIMS:
        for c in kernels.CHUNK_SIZES:
            dec, pre, wg = (kernels.decode_smem_bytes(d, c), kernels.prefill_smem_bytes(d, c),
                            kernels.prefill_wg_smem_bytes(d, c))
            assert dec <= per_block and wg <= per_block
            assert 2 * pre <= 228 * 1024 - 2 * 1024, (d, c)  # paged_prefill: two blocks per SM
            rows = kernels.phase1_rows(c)
            assert dec >= (rows + 4 * c) * (d + 8) * 2  # the Q tile and two K/V stages at least
    # the paged kernels stream keys in steps of a fixed size: a page of 128 keys takes no more
    # shared memory than a page of 64 (mma.sync), any page size the same (wgmma)
    assert kernels.prefill_smem_bytes(128, 128) == kernels.prefill_smem_bytes(128, 64)
    assert kernels.prefill_wg_smem_bytes(128, 16) == kernels.prefill_wg_smem_bytes(128, 128)


# ------------------------------------------------------------------------- written once
def test_state_epilogue_and_unit_geometry_are_written_once():
    code = {n: without_comments(raw(n)) for n in CUDA_FILES}
    everywhere = "".join(code.values())
    # the lse of a finished row, (m + log2 l) ln 2: store_state_row in common.cuh only
    assert len(re.findall(r"log2f\(", everywhere)) == 1 and "log2f(" in code["common.cuh"]
    for name in ("chunk_attention.cu", "compact_attention.cu", "compact_attention_sm90.cu"):
        assert "store_state_row<D>(" in code[name], name
    # table -> (t, kv head, sub-group) and the unit's key limits: compact_attention.cuh only
    assert len(re.findall(r"/ \(num_kv_heads \* S\)", everywhere)) == 1
    for name, text in code.items():  # the causal limits are computed from past_keys there alone
        assert ("past_keys +" in text) == (name == "compact_attention.cuh"), name
    for name in ("compact_attention.cu", "compact_attention_sm90.cu"):
        assert "paged_unit<C>(units, indptr" in code[name], name


# ------------------------------------------------------------------------- decode: one query, or many
def test_decode_has_one_query_kernels_and_multi_token_kernels():
    """chunk_attention instantiates the one-query kernels (chunk_attend, chunk_merge: none of the
    multi-token code, Multi = false) and the multi-token ones (Multi = true) from one body each,
    with one parameter list, so one launch serves both."""
    names = kernels.name_expressions("chunk_attention", "float16", 128, 64)
    assert names == {"chunk_attend": "cpattn::chunk_attend<__half, 128, 64>",
                     "chunk_merge": "cpattn::chunk_merge<__half, 128>",
                     "chunk_attend_multi": "cpattn::chunk_attend_multi<__half, 128, 64>",
                     "chunk_merge_multi": "cpattn::chunk_merge_multi<__half, 128>",
                     "chunk_attend_invariant": "cpattn::chunk_attend_invariant<__half, 128, 64>"}
    src = without_comments(raw("chunk_attention.cu"))
    for kernel, body, params in (("chunk_attend", "attend_units", "CHUNK_ATTEND"),
                                 ("chunk_merge", "merge_states", "CHUNK_MERGE")):
        for multi, name in (("false", kernel), ("true", kernel + "_multi")):
            assert re.search(rf"{name}\({params}_PARAMS\) \{{\s*{body}<T, D(, C)?, {multi}>\({params}_ARGS\);", src), name
    # batch-invariant plans: the multi-token body with its Invariant flag set (merged by chunk_merge_multi)
    assert re.search(r"chunk_attend_invariant\(CHUNK_ATTEND_PARAMS\) \{\s*attend_units<T, D, C, true, true>"
                     r"\(CHUNK_ATTEND_ARGS\);", src)
    # in the body, the multi-token arguments are read only as `Multi ? x` or inside the blocks of
    # `if constexpr (Multi) { ... }`
    attend = src[src.index("void attend_units("):src.index("__global__")]
    blocks = []
    for m in re.finditer(r"if constexpr \(Multi\) \{", attend):
        depth, at = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(attend[at], 0)
            at += 1
        blocks.append((m.end(), at))
    assert blocks
    for read in ("queries_per_seq", "pos_slots", "query_bits", "row_info"):
        uses = [m.start() for m in re.finditer(rf"\b{read}\b", attend)]
        assert uses, read
        for at in uses:
            guarded = attend[:at].rstrip().endswith("Multi ?") or any(b0 <= at < b1 for b0, b1 in blocks)
            assert guarded, (read, attend[at - 80:at + 20])


def test_one_query_plans_launch_the_one_query_kernels():
    from cpattn.chunk_attention import decode_kernels
    from cpattn.reference.chunk_attention import build_decode_plan
    from cpattn.testing.strategies import Workload

    w = Workload(seed=3, num_requests=5, chunk_size=4, levels=2, fanout=2, num_layers=1, num_kv_heads=2,
                 group=2, head_dim=8, dtype="float16")
    cache, ids = w.cache()
    assert min(cache.seq_len(s) for s in ids) >= 2  # room for queries_per_seq=2
    assert decode_kernels(build_decode_plan(cache, ids)) == ("chunk_attend", "chunk_merge")
    assert decode_kernels(build_decode_plan(cache, ids, queries_per_seq=1)) == ("chunk_attend", "chunk_merge")
    # a tree of one token is the one-query step, but a tree plan: the multi-token kernels (k = 1 there too)
    for mask in (np.ones((1, 1), bool), np.ones((len(ids), 1, 1), bool)):
        assert decode_kernels(build_decode_plan(cache, ids, tree_mask=mask)) == ("chunk_attend_multi",
                                                                                 "chunk_merge_multi")
    assert decode_kernels(build_decode_plan(cache, ids, queries_per_seq=2)) == ("chunk_attend_multi",
                                                                                "chunk_merge_multi")
    # batch-invariant plans, any k and mask: the invariant attend kernel and the multi-token merge
    for kw in (dict(), dict(queries_per_seq=2), dict(tree_mask=np.ones((1, 1), bool))):
        assert decode_kernels(build_decode_plan(cache, ids, batch_invariant=True, **kw)) == ("chunk_attend_invariant",
                                                                                           "chunk_merge_multi")
