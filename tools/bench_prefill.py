#!/usr/bin/env python3
"""Same as `cpattn bench prefill` (see cpattn/bench/prefill.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cpattn.bench.prefill import main  # noqa: E402

if __name__ == "__main__":
    main()
