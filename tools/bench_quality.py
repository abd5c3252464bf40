#!/usr/bin/env python3
"""Quality of sparse prefill on real text (perplexity and needles, dense vs sparse, the real
model on the NumPy backend): the code is cpattn/bench/quality.py, installed with cpattn.

    python tools/bench_quality.py --out bench      (writes bench/quality_cpu.md and .json)
"""
import sys

from cpattn.bench.quality import main

if __name__ == "__main__":
    sys.exit(main())
