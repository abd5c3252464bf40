#!/usr/bin/env python3
"""Paste the generated pictures into docs/*.md (run after changing what they show).

    python docs/make_figures.py           # rewrite the figure blocks in place
    python docs/make_figures.py --check   # exit 1 if any page holds a stale figure

A page asks for a figure with a marker pair; everything between the two lines is replaced by
the output of ``cpattn.examples.figures`` (the NumPy reference, so a picture cannot drift from
the code it shows)::

    <!-- figure: tree -->
    <!-- /figure -->
"""
from __future__ import annotations

import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
MARKER = re.compile(r"(<!-- figure: (\w+) -->\n)(.*?)(<!-- /figure -->)", re.S)


def render(name: str) -> str:
    from cpattn.examples.figures import FIGURES

    return f"```text\n$ python -m cpattn.examples.figures {name}\n{FIGURES[name]()}\n```\n"


def update(text: str) -> str:
    """The page with every figure block regenerated."""
    return MARKER.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(4), text)


def stale_pages() -> list[str]:
    return [p.name for p in sorted(DOCS.glob("*.md")) if update(p.read_text()) != p.read_text()]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--check"]:
        stale = stale_pages()
        for name in stale:
            print(f"{name}: figures are stale; run python docs/make_figures.py")
        return 1 if stale else 0
    for page in sorted(DOCS.glob("*.md")):
        old = page.read_text()
        new = update(old)
        if new != old:
            page.write_text(new)
            print(f"updated {page.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
