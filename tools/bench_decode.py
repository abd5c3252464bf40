#!/usr/bin/env python3
"""Same as `cpattn bench decode` (see cpattn/bench/decode.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cpattn.bench.decode import main  # noqa: E402

if __name__ == "__main__":
    main()
