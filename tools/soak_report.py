#!/usr/bin/env python3
"""The BENCHMARKS.md section of a soak summary: ``python tools/soak_report.py bench/soak_h100.json``
(the code is ``cpattn.bench.soak.markdown_section``). Runs from a checkout (after
``pip install -e .``) and from an installed wheel.
"""
import json
import sys

from cpattn.bench.soak import markdown_section

if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(markdown_section(json.load(fh), sys.argv[1]))
