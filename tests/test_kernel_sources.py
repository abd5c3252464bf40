"""Kernel sources and their build options (CPU): the generated wgmma header is current, every
kernel file is in the loader's table, and the Hopper-only file asks for its architecture."""
from __future__ import annotations


from conftest import ROOT, load_script
from cpattn import kernels

def test_generated_wgmma_header_is_current(tmp_path, monkeypatch):
    gen = load_script("tools/gen_wgmma.py")
    monkeypatch.setattr(gen, "OUT", tmp_path / "wgmma.cuh")
    gen.main()
    shipped = (ROOT / "raw_kernels" / "wgmma.cuh").read_text()
    assert (tmp_path / "wgmma.cuh").read_text() == shipped, "run python tools/gen_wgmma.py"


def test_every_kernel_file_is_loaded_and_hopper_file_targets_sm90a():
    files = {p.stem for p in (ROOT / "raw_kernels").glob("*.cu")}
    assert files == set(kernels.KERNELS)
    assert "-arch=sm_90a" in kernels.options("compact_attention_sm90")
    assert not any(o.startswith("-arch") for o in kernels.options("compact_attention"))
    src = kernels.source("compact_attention_sm90")
    assert "#include" not in src.replace("#include <cuda_fp16.h>", "").replace("#include <cuda_bf16.h>", "")
    assert "wgmma.mma_async" in src and "paged_prefill_wg" in src


def test_prefill_kernel_choice_is_checked_before_touching_the_gpu(monkeypatch):
    import pytest

    from cpattn.compact_attention import choose_kernel, use_wgmma

    with pytest.raises(ValueError, match=r"kernel: expected one of \('auto', 'wgmma', 'mma'\), got 'fast'"):
        use_wgmma("fast")
    monkeypatch.setenv("CPATTN_PREFILL_KERNEL", "tensor")
    with pytest.raises(ValueError, match=r"CPATTN_PREFILL_KERNEL: expected one of .*, got 'tensor'"):
        use_wgmma("auto")
    monkeypatch.setenv("CPATTN_PREFILL_KERNEL", "mma")
    assert use_wgmma("auto") is False and use_wgmma("mma") is False and choose_kernel("auto") == "mma"
