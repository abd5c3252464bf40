#!/usr/bin/env python3
"""CompactAttention chunked-prefill benchmark: `cpattn bench prefill` (the code is cpattn/bench/prefill.py, installed with cpattn).

Runs from a checkout (after `pip install -e .`) and from an installed wheel.
"""
import sys

from cpattn.bench.prefill import main

if __name__ == "__main__":
    sys.exit(main())
