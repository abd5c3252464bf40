"""Benchmarks behind ``cpattn bench decode`` and ``cpattn bench prefill`` (GPU only).

Each run measures cpattn and the peers a user would pick instead in the same process, and
writes a markdown table (the BENCHMARKS.md section), CSV, JSON and a PNG plot.
"""
import sys


def progress(i: int, n: int, label: str, width: int = 24) -> None:
    """One line of progress: [#####.....] 3/10 label (to stderr, so tables stay clean)."""
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:60]:<60}")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()
