"""Benchmarks: ``cpattn bench decode|prefill|serving|mixed`` (GPU; mixed also on NumPy), the soak and
the selection frontier.

Each benchmark measures cpattn and the peers a user would pick instead in the same process, and
writes a markdown table (the BENCHMARKS.md section), CSV, JSON and a PNG plot.

* ``timing``: the one GPU timer (CUDA events after warm-up, L2 flushed, median);
* ``table``: the one table writer (md / csv / json, leading columns device, date, config,
  ours, peer, ratio, floor);
* ``decode``, ``prefill``, ``serving``: the three benchmarks; ``flat_cache`` and
  ``torch_interop``: the serving benchmark's torch SDPA peer;
* ``soak`` (``python -m cpattn.bench.soak``): a long serving loop checked for leaks and
  corruption; ``frontier`` (``python -m cpattn.bench.frontier``): recall against density of
  block selection and of the exact-mass oracle (CPU);
* ``model_serving`` and ``mixed_serving`` (``cpattn bench mixed``): the real model (SmolLM2-135M)
  against transformers, one batch, and mixed steps under Poisson arrivals in wall-clock time.
"""
import sys


def progress(i: int, n: int, label: str, width: int = 24) -> None:
    """One line of progress: [#####.....] 3/10 label (to stderr, so tables stay clean)."""
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:60]:<60}")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    return plt


def bar_chart(rows, series, labels, ylabel, title, path, log=False, annotate=None):
    """Grouped bars, one group per row and one bar per (name, key) of ``series``; saves a PNG.

    ``annotate(ax, x, rows)`` may add text on top. Missing values are drawn as gaps.
    """
    import numpy as np

    plt = pyplot()
    if plt is None:
        return
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5 + 0.15 * max(str(lb).count("\n") for lb in labels)))
    for k, (name, key) in enumerate(series):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, [r.get(key, float("nan")) for r in rows], width, label=name)
    if annotate is not None:
        annotate(ax, x, rows)
    ax.set_xticks(x, labels, fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")
