#!/usr/bin/env python3
"""Recall against density of CompactAttention's selectors on real attention (the real model's
captured q/K): the code is cpattn/bench/real_frontier.py, installed with cpattn.

    python tools/real_frontier.py --out bench --benchmarks BENCHMARKS.md
        (bench/frontier_real_cpu.{md,csv,json,png} and the BENCHMARKS.md section; ~6 minutes on 2 cores)
"""
import sys

from cpattn.bench.real_frontier import main

if __name__ == "__main__":
    sys.exit(main())
