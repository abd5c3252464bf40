"""The soak (cpattn/bench/soak.py, also tools/soak.py) in its small NumPy mode (a few hundred operations), and proof that it fails
when the cache leaks a chunk or corrupts K/V. The GPU run (10,000+ operations at realistic
sizes) is a device command: see docs/guarantees.md."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cpattn.bench import soak as soak_module
from cpattn.reference.chunk_cache import ChunkCache


@pytest.fixture(scope="module")
def soak():
    return soak_module


def run(soak, tmp_path, *extra):
    out = tmp_path / "soak.json"
    rc = soak.main(["--backend", "numpy", "--ops", "300", "--check-every", "50", "--num-chunks", "24",
                    "--out", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_soak_numpy_small(soak, tmp_path):
    rc, s = run(soak, tmp_path)
    assert rc == 0 and s["passed"] and not s["failures"]
    assert s["accounting"]["exact"] and s["accounting"]["refcount_errors"] == 0
    a = s["accounting"]
    assert a["free"] + a["cached"] + a["referenced"] == a["capacity"] == 24
    assert sum(s["op_counts"].values()) == 300 and set(s["op_counts"]) == set(soak.OPS)
    assert s["events"]["pool full"] > 0 and s["events"]["prefix tokens reused"] > 0  # pressure and reuse
    assert s["checks"]["decode"] >= 5 and s["checks"]["kv"] >= 5 and s["checks"]["max_err_over_budget"] <= 1
    assert s["tokens_decoded"] > 0 and s["ops_per_s"] > 0 and s["python_objects"]["bounded"]
    assert s["memory"]["flat"]


def test_soak_with_prefill_attention(soak, tmp_path):
    rc, s = run(soak, tmp_path, "--prefill-attn", "--ops", "150")
    assert rc == 0 and s["passed"] and s["op_counts"]["admit"] > 0


def test_soak_catches_a_leaked_chunk(soak, tmp_path, monkeypatch):
    """A cache that forgets to return an evicted chunk to the free list fails the accounting."""
    real = ChunkCache._free_node

    def leaky(self, n):
        real(self, n)
        if n.chunk % 3 == 0:
            self._free.remove(n.chunk)

    monkeypatch.setattr(ChunkCache, "_free_node", leaky)
    rc, s = run(soak, tmp_path)
    assert rc == 1 and not s["passed"] and not s["accounting"]["exact"]


def test_soak_catches_corrupted_kv(soak, tmp_path, monkeypatch):
    """A write that lands one row off is caught by the K/V and decode checks."""
    real = ChunkCache._scatter

    def off_by_one(self, layer, slots, k, v):
        bad = type(slots)(slots.chunk, np.minimum(slots.offset + (slots.chunk % 5 == 0), self.chunk_size - 1))
        real(self, layer, bad, k, v)

    monkeypatch.setattr(ChunkCache, "_scatter", off_by_one)
    rc, s = run(soak, tmp_path)
    assert rc == 1 and any("differs from what was written" in f for f in s["failures"])


def test_the_report_section_of_a_summary(soak, tmp_path):
    rc, s = run(soak, tmp_path, "--ops", "120")
    md = soak.markdown_section(s, "soak.json")
    assert md.startswith(f"## Soak (cpu, {s['date']})") and "`tools/soak_report.py soak.json`" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 3 and table[2].count("|") == table[0].count("|") == 10
    assert f"= {s['accounting']['capacity']} (exact: True" in table[2] and table[2].endswith(f"| {s['passed']} |")
