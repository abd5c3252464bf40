#!/usr/bin/env python3
"""Compare two builds of a kernel file with nvcc: registers, spills and SASS per variant.

The question it answers: does a change leave a kernel's machine code as it was? Typical use,
the k = 1 decode kernel against the kernels from before multi-token decode:

    python tools/compare_decode_sass.py OLD.cu --header attend_core.cuh=OLD_attend_core.cuh
    python tools/compare_decode_sass.py --old-rev f5553ba~1 --file compact_attention [NEW.cu]

Each side is a kernel file whose ``#include "x.cuh"`` lines are inlined (each once): from
``--header x.cuh=PATH`` where given (the old side only), else from the file's own directory,
else from the package's raw_kernels/. OLD is a path or ``--old-rev REV`` (raw_kernels/ of this repository at
git revision REV); NEW is a path, default the installed package's current source. For every
(dtype, head_dim, chunk) variant, each side is compiled as the loader compiles it (the
cpattn.kernels options and shared-memory checks; the kernels' name expressions from the
KERNELS table, ``--kernels`` picks which, default the k = 1 decode kernel chunk_attend for
chunk_attention and every kernel otherwise) to a cubin with ``nvcc -cubin -arch=sm_90``, and
``cuobjdump -sass`` of the two is compared function by function, symbol names (``_Z...``)
blanked. Needs nvcc and cuobjdump (the CUDA toolkit, or pip's nvidia-cuda-cuobjdump;
``--cuobjdump PATH`` or $CUOBJDUMP). Exit 1 when any variant's registers or SASS differ.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_kernels import demangle, find_nvcc, parse_report  # noqa: E402

DEFAULT_KERNELS = {"chunk_attention": ("chunk_attend",)}


def find_cuobjdump(given=None):
    cands = [given, os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:  # pip install nvidia-cuda-cuobjdump
        import nvidia  # noqa: F401

        for base in getattr(nvidia, "__path__", []):
            cands += [str(p) for p in pathlib.Path(base).glob("cu*/bin/cuobjdump")]
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.exists(c)), None)


def inline(text: str, read_header, seen=None) -> str:
    """``#include "x.cuh"`` lines replaced by the header (each once), recursively."""
    seen = set() if seen is None else seen

    def repl(m):
        inc = m.group(1)
        if inc in seen:
            return ""
        seen.add(inc)
        return inline(read_header(inc), read_header, seen)

    return re.sub(r'^#include "([^"]+)"\s*$', repl, text, flags=re.M)


def path_side(path: str, headers: dict):
    """The source of a kernel file on disk, headers found as the module docstring says."""
    from cpattn import kernels

    here = pathlib.Path(path).resolve().parent

    def read_header(name):
        if name in headers:
            return pathlib.Path(headers[name]).read_text()
        if (here / name).exists():
            return (here / name).read_text()
        return kernels.read_source(name)

    return inline(pathlib.Path(path).read_text(), read_header)


def rev_side(rev: str, file: str):
    """The source of raw_kernels/FILE.cu at git revision REV of this repository."""
    root = pathlib.Path(__file__).resolve().parent.parent

    def show(name):
        res = subprocess.run(["git", "-C", str(root), "show", f"{rev}:raw_kernels/{name}"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"--old-rev: expected raw_kernels/{name} at revision {rev!r}, got: {res.stderr.strip()}")
        return res.stdout

    return inline(show(file + ".cu"), show)


def translation_unit(source: str, file: str, variants, kernel_names) -> str:
    from cpattn import kernels

    lines = [source]
    lines += sorted({kernels.smem_asserts(file, d, c) for (_, d, c) in variants})
    exprs = sorted({e for (dt, d, c) in variants for n, e in kernels.name_expressions(file, dt, d, c).items()
                    if n in kernel_names})
    lines += [f"void* cpattn_instance_{i} = (void*)&{e};" for i, e in enumerate(exprs)]
    return "\n".join(lines) + "\n"


def build(nvcc, cuobjdump, tu: str, file: str, arch: str, workdir: str, tag: str):
    """-> {demangled kernel name without its parameters: (ptxas row, [SASS lines])}"""
    from cpattn import kernels

    src, cubin = os.path.join(workdir, f"{tag}.cu"), os.path.join(workdir, f"{tag}.cubin")
    pathlib.Path(src).write_text(tu)
    opts = [o for o in kernels.options(file) if not o.startswith("-arch")]
    arch = kernels.ARCH.get(file, arch)
    cmd = [nvcc, "-cubin", f"-arch={arch}", *opts, "-Xptxas", "-v", "-o", cubin, src]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{tag}: compile failed: {' '.join(cmd)}\n{res.stderr[-6000:]}")
    rows = parse_report(res.stderr)
    report = dict(zip(demangle([r["kernel"] for r in rows]), rows))
    dump = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
    if dump.returncode != 0:
        raise SystemExit(f"{tag}: cuobjdump failed: {dump.stderr[-2000:]}")
    sass, cur = {}, None
    for line in dump.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = demangle([m.group(1)])[0]
            sass[cur] = []
        elif cur is not None and line.strip() and not line.strip().startswith((".", "-")):
            sass[cur].append(re.sub(r"_Z\w+", "<sym>", line.strip()))
    return {name: (report.get(name), sass.get(name, [])) for name in set(report) | set(sass)}


def normalize(lines):
    """SASS lines without their addresses and column padding (encodings and control bits kept)."""
    return [" ".join(re.sub(r"^/\*[0-9a-f]+\*/", "", s).split()) for s in lines]


def spills(row) -> int:
    return row["spill_stores"] + row["spill_loads"]


def find(side: dict, key: str):
    """The (ptxas row, SASS) of kernel ``key`` (e.g. 'chunk_attend<__half,128,64>') on one side."""
    return next((v for k, v in side.items() if k.split("::", 1)[-1].replace(" ", "") == key), (None, []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", nargs="?", help="the old kernel file (path); or --old-rev")
    ap.add_argument("new", nargs="?", help="the new kernel file (path; default: the package's current source)")
    ap.add_argument("--old-rev", help="the old side: raw_kernels/ at this git revision")
    ap.add_argument("--header", action="append", default=[], metavar="NAME=PATH",
                    help="read #include \"NAME\" of the old side from PATH")
    ap.add_argument("--file", default="chunk_attention", help="kernel file (cpattn.kernels.KERNELS key)")
    ap.add_argument("--kernels", help="comma-separated short kernel names (default: see above)")
    ap.add_argument("--variants", help="comma-separated variant keys, e.g. f16_d128_c64 (default: all)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--cuobjdump")
    ap.add_argument("--keep", help="keep the generated sources, cubins and SASS here")
    ap.add_argument("--show", type=int, default=12, help="differing SASS lines to print per kernel")
    args = ap.parse_args(argv)
    from cpattn import kernels

    if args.old_rev is not None and args.old is not None and args.new is None:  # --old-rev REV NEW.cu
        args.old, args.new = None, args.old
    if (args.old is None) == (args.old_rev is None):
        ap.error("old: expected exactly one of a path and --old-rev")
    if args.file not in kernels.KERNELS:
        ap.error(f"--file: expected one of {sorted(kernels.KERNELS)}, got {args.file!r}")
    headers = {}
    for h in args.header:
        if "=" not in h:
            ap.error(f"--header: expected NAME=PATH, got {h!r}")
        name, path = h.split("=", 1)
        headers[name] = path
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump(args.cuobjdump)
    if nvcc is None or cuobjdump is None:
        print(f"nvcc ({nvcc}) and cuobjdump ({cuobjdump}) needed: nothing compared")
        return 0
    short = [n.split("::")[-1] for n, _ in kernels.KERNELS[args.file]]
    names = tuple(args.kernels.split(",")) if args.kernels else DEFAULT_KERNELS.get(args.file, tuple(short))
    if set(names) - set(short):
        ap.error(f"--kernels: expected some of {short}, got {sorted(set(names) - set(short))}")
    variants = [(dt, d, c) for dt in kernels.DTYPES for d in kernels.HEAD_DIMS for c in kernels.CHUNK_SIZES]
    if args.variants:
        want = set(args.variants.split(","))
        variants = [v for v in variants if kernels.variant_key(args.file, *v)[len(args.file) + 1:] in want]
        if not variants:
            ap.error(f"--variants: expected keys like f16_d128_c64, got {args.variants!r}")

    old_src = rev_side(args.old_rev, args.file) if args.old_rev else path_side(args.old, headers)
    new_src = path_side(args.new, {}) if args.new else kernels.source(args.file)
    work = args.keep or tempfile.mkdtemp(prefix="cpattn_sass_")
    os.makedirs(work, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        old, new = ex.map(lambda side: build(nvcc, cuobjdump, translation_unit(side[1], args.file, variants, names),
                                             args.file, args.arch, work, side[0]),
                          [("old", old_src), ("new", new_src)])
    if args.keep:
        for tag, side in (("old", old), ("new", new)):
            pathlib.Path(work, f"{tag}.sass").write_text(
                "".join(f"== {k}\n" + "\n".join(v[1]) + "\n" for k, v in sorted(side.items())))

    bad = 0
    print(f"{args.file}: {'old rev ' + args.old_rev if args.old_rev else args.old} vs "
          f"{args.new or 'current source'}; kernels {', '.join(names)}; nvcc -cubin -arch={args.arch}")
    print(f"  {'kernel':<44} {'regs old/new':>12} {'spills o/n':>11} {'SASS lines':>11}  SASS")
    for (dt, d, c) in variants:
        for n, expr in kernels.name_expressions(args.file, dt, d, c).items():
            if n not in names:
                continue
            key = expr.split("::", 1)[-1].replace(" ", "")
            (ro, so), (rn, sn) = find(old, key), find(new, key)
            if ro is None or rn is None:
                print(f"  {key:<44} missing on the {'old' if ro is None else 'new'} side")
                bad += 1
                continue
            same = normalize(so) == normalize(sn)
            diff = [x for x in difflib.unified_diff(normalize(so), normalize(sn), lineterm="", n=0)
                    if x[:1] in "+-" and not x.startswith(("+++", "---"))]
            verdict = "identical" if same else f"differ ({len(diff)} lines)"
            print(f"  {key:<44} {ro['registers']:>5}/{rn['registers']:<6} {spills(ro):>5}/{spills(rn):<5} "
                  f"{len(so):>5}/{len(sn):<5}  {verdict}")
            if not same:
                for x in diff[: args.show]:
                    print(f"      {x[:150]}")
            bad += (not same) or ro["registers"] != rn["registers"]
    print("all identical (registers and SASS)" if not bad else f"{bad} kernel variants differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
