#!/usr/bin/env python3
"""Shared-prefix decode benchmark: `cpattn bench decode` (the code is cpattn/bench/decode.py, installed with cpattn).

Runs from a checkout (after `pip install -e .`) and from an installed wheel.
"""
import sys

from cpattn.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
