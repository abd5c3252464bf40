#!/usr/bin/env python3
"""Compile every kernel variant with NVRTC, as CuPy does at run time, without a GPU.

nvcc accepts things NVRTC rejects (NVRTC has no <math.h>, different default headers), so CI
checks the real path too: each variant's program and options exactly as the loader
(cpattn.kernels.program, cpattn.kernels.options) gives them to CuPy, for compute_90 where the
file names no architecture. Uses libnvrtc from the pip package nvidia-cuda-nvrtc (or the CUDA
toolkit); imports the installed cpattn. Exit 1 on any compile error; 0 with a message when no
libnvrtc is found.
"""
from __future__ import annotations

import os
import sys

from cpattn import kernels
from cpattn.raw_kernels import nvrtc


def main() -> int:
    path = nvrtc.find_libnvrtc()
    if path is None:
        print("libnvrtc not found (pip install nvidia-cuda-nvrtc): NVRTC compile check skipped")
        return 0
    lib = nvrtc.load_libnvrtc(path)
    incs = nvrtc.cuda_include_dirs(path)
    if not incs:
        print("cuda_fp16.h not found (no CUDA headers): NVRTC compile check skipped")
        return 0
    failed = 0
    for (f, dt, d, c) in kernels.all_variants():
        names = list(kernels.name_expressions(f, dt, d, c).values())
        opts = kernels.options(f)
        if not any(o.startswith("-arch") for o in opts):  # CuPy adds the device's; check on Hopper's
            opts += ("-arch=compute_90",)
        rc, log = nvrtc.compile_program(lib, kernels.program(f, d, c), names, opts + (f"-I{incs[0]}",))
        if rc != 0:
            failed += 1
            print(f"NVRTC FAILED {kernels.variant_key(f, dt, d, c)}:\n{log[-4000:]}")
    n = len(kernels.all_variants())
    print(f"NVRTC ({os.path.basename(path)}): {n - failed}/{n} variants compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
