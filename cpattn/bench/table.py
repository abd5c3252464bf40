"""The one table writer of the benchmarks: every run writes ``<name>.md``, ``.csv`` and ``.json``.

Every row starts with the same summary columns, so results of all benchmarks line up:

    device, date, config, ours, peer, ratio, floor

``ours`` and ``peer`` are the time of cpattn and of the best peer measured in the same run (in
the unit the benchmark states), ``ratio = peer / ours`` (above 1: ours is faster), ``floor`` the
lower bound where the benchmark has one (bytes over bandwidth), else empty. The benchmark's own
columns follow, sorted by name.
"""
from __future__ import annotations

import json
import math
import os

SUMMARY_COLUMNS = ("device", "date", "config", "ours", "peer", "ratio", "floor")


def is_missing(v) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def fmt(v, spec: str = "{:.2f}") -> str:
    """A table cell: ``spec.format(v)``, or "n/a" for a missing value (None, "", NaN)."""
    return "n/a" if is_missing(v) else spec.format(v)


def summary(device: str, date: str, config: str, ours, peer, floor=None) -> dict:
    """The leading columns of a row; ``ratio`` is ``peer / ours`` when both are measured."""
    ratio = float("nan") if is_missing(ours) or is_missing(peer) or not ours else peer / ours
    return dict(device=device, date=date, config=config, ours=ours, peer=peer, ratio=ratio,
                floor="" if floor is None else floor)


def columns(rows: list) -> list:
    keys = {k for r in rows for k in r}
    return [k for k in SUMMARY_COLUMNS if k in keys] + sorted(keys - set(SUMMARY_COLUMNS))


def csv_text(rows: list) -> str:
    """One header line (summary columns first) and one line per row; missing cells empty."""
    keys = columns(rows)

    def cell(v):
        s = "" if v is None else str(v)
        return f'"{s}"' if ("," in s or '"' in s) and not s.startswith('"') else s

    return "\n".join([",".join(keys)] + [",".join(cell(r.get(k, "")) for k in keys) for r in rows]) + "\n"


def markdown_table(header: list, lines: list) -> list:
    """A markdown table as a list of lines: the header, the rule, one line per list of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(str, cells)) + " |" for cells in lines]


def write_tables(out: str, name: str, rows: list, meta: dict, markdown: str, extra: dict | None = None) -> dict:
    """``out/name.md`` (the given text), ``out/name.csv`` (the rows) and ``out/name.json``
    (``meta``, ``rows`` and ``extra``); returns {"md": path, "csv": path, "json": path}."""
    os.makedirs(out, exist_ok=True)
    paths = {ext: os.path.join(out, f"{name}.{ext}") for ext in ("md", "csv", "json")}
    with open(paths["md"], "w") as fh:
        fh.write(markdown)
    with open(paths["csv"], "w") as fh:
        fh.write(csv_text(rows))
    with open(paths["json"], "w") as fh:
        json.dump(dict(meta, rows=rows, **(extra or {})), fh, indent=1,
                  default=lambda x: x.item() if hasattr(x, "item") else str(x))
    return paths


def replot_json(path: str, plot) -> str:
    """Draw ``plot(result, png)`` again from a JSON a benchmark wrote, the PNG next to it; returns the PNG's path."""
    import json

    with open(path) as fh:
        result = json.load(fh)
    png = os.path.splitext(path)[0] + ".png"
    plot(result, png)
    return png
