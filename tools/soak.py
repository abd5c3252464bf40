#!/usr/bin/env python3
"""Soak of the cache and its attention under a serving loop: `python -m cpattn.bench.soak` (the code is cpattn/bench/soak.py, installed with cpattn).

Runs from a checkout (after `pip install -e .`) and from an installed wheel.
"""
import sys

from cpattn.bench.soak import main

if __name__ == "__main__":
    sys.exit(main())
