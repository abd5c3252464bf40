#!/usr/bin/env python3
"""Recall against density of CompactAttention's selection and the exact-mass oracle: `python -m cpattn.bench.frontier` (the code is cpattn/bench/frontier.py, installed with cpattn).

Runs from a checkout (after `pip install -e .`) and from an installed wheel.
"""
import sys

from cpattn.bench.frontier import main

if __name__ == "__main__":
    sys.exit(main())
