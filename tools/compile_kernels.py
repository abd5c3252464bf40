#!/usr/bin/env python3
"""Compile every kernel variant with nvcc for sm_90 and report registers, spills and shared memory.

The same variant table as the runtime loader (cpattn.kernels) is instantiated explicitly in a
generated translation unit per kernel file, with the loader's options (the -D constants) and
its shared-memory checks, so CI checks exactly what users will run. Imports the installed
cpattn (``pip install -e .`` in a checkout).
Exit status: 1 on a compile error or on spills in a hot kernel; 0 with a message when nvcc is
absent (nothing to check on that machine).

    python tools/compile_kernels.py [--arch sm_90] [--keep DIR] [FILE ...]   (FILE: e.g. chunk_attention)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HOT = ("chunk_attend", "paged_prefill")  # (paged_prefill_wg too)  # kernels that must not spill


def find_nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def translation_unit(file: str) -> str:
    from cpattn import kernels

    lines = [kernels.source(file)]
    lines += [kernels.smem_asserts(file, d, c) for d in kernels.HEAD_DIMS for c in kernels.CHUNK_SIZES]
    exprs = sorted({e for (f, dt, d, c) in kernels.all_variants() if f == file
                    for e in kernels.name_expressions(f, dt, d, c).values()})
    for i, expr in enumerate(exprs):  # taking the address instantiates the template
        lines.append(f"void* cpattn_instance_{i} = (void*)&{expr};")
    return "\n".join(lines) + "\n"


def parse_report(text: str):
    """ptxas -v lines -> [{kernel, registers, spill_stores, spill_loads, smem, stack}]"""
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = {"kernel": m.group(1), "registers": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0, "stack": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            cur["smem"] = int(m.group(1))
    return rows


def demangle(names):
    cxxfilt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not cxxfilt:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return [re.sub(r"\(.*", "", o) for o in out[: len(names)]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--keep", default=None, help="keep the generated .cu files here")
    ap.add_argument("files", nargs="*", help="kernel files to compile (default: every one)")
    args = ap.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found: kernel compile check skipped (install the CUDA toolkit to run it)")
        return 0
    from cpattn import kernels

    failed, spilled = False, []
    tmp = args.keep or tempfile.mkdtemp(prefix="cpattn_nvcc_")
    os.makedirs(tmp, exist_ok=True)
    unknown = set(args.files) - set(kernels.KERNELS)
    if unknown:
        ap.error(f"files: expected some of {sorted(kernels.KERNELS)}, got {sorted(unknown)}")
    for file in args.files or kernels.KERNELS:
        src = os.path.join(tmp, f"{file}_all.cu")
        with open(src, "w") as fh:
            fh.write(translation_unit(file))
        arch = kernels.ARCH.get(file, args.arch)
        # -arch=sm_90a would also embed compute_90 PTX, which has no wgmma: name the target alone
        target = ["-gencode", f"arch=compute_{arch[3:]},code={arch}"] if arch.endswith("a") else [f"-arch={arch}"]
        opts = [o for o in kernels.options(file) if not o.startswith("-arch")]
        cmd = [nvcc, *target, *opts, "-c", "-o", os.path.join(tmp, f"{file}.o"), "-Xptxas", "-v", src]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"FAILED: {' '.join(cmd)}\n{res.stderr[-6000:]}")
            failed = True
            continue
        # ptxas serialises the wgmma pipeline (correct, but slow) when a register of an in-flight
        # wgmma is touched before its wait: a performance bug, so an error here
        serial = sorted(set(re.findall(r"wgmma.mma_async instructions are serialized.*?function '([^']+)'",
                                       res.stderr)))
        if serial:
            print(f"{file}.cu: wgmma serialised by ptxas in {demangle(serial)}")
            failed = True
        rows = parse_report(res.stderr)
        names = demangle([r["kernel"] for r in rows])
        print(f"{file}.cu: {len(rows)} kernels for {arch}")
        print(f"  {'kernel':<58} {'regs':>5} {'spill st/ld':>12} {'stack':>6} {'smem':>6}")
        for r, name in zip(rows, names):
            spill = r["spill_stores"] + r["spill_loads"]
            print(f"  {name[:58]:<58} {r['registers']:>5} {r['spill_stores']:>5}/{r['spill_loads']:<6} "
                  f"{r['stack']:>6} {r['smem']:>6}")
            if spill and any(h in name for h in HOT):
                spilled.append(name)
    if failed:
        return 1
    if spilled:
        print(f"spills in hot kernels: {spilled}")
        return 1
    print("all kernels compiled; no spills in hot kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
