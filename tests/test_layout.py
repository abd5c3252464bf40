"""The house rules of docs/design.md ("Layout"), checked on the source tree.

* each algorithm family in three files of one name: reference/X.py, raw_kernels/X.cu, cpattn/X.py;
* no module imports another module's underscore names, or reaches into another module's
  objects through them (``other._name``); a class's own ``self._x`` and ``super()._x`` are its
  business;
* the reference needs no numba (it is the textbook), and nothing imports from tools/;
* every citation of the design points to docs/design.md, which exists.
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("cpattn", "reference", "raw_kernels")
FAMILIES = ("chunk_cache", "chunk_attention", "compact_attention")
THIRD_PARTY = {"torch", "cupy", "cupyx", "np", "numpy", "numba", "transformers"}


def sources(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def rel(path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("family", FAMILIES)
def test_three_files_of_one_name(family):
    for place in (f"reference/{family}.py", f"raw_kernels/{family}.cu", f"cpattn/{family}.py"):
        assert (ROOT / place).is_file(), f"{family}: expected {place}"


def test_no_stray_algorithm_modules():
    # an algorithm file outside a family would break the three-files rule again
    cu = {p.stem for p in (ROOT / "raw_kernels").glob("*.cu")}
    # besides the families: the Hopper prefill of compact_attention, and model_ops, the model's own
    # fused steps for the graphed decoder (not an algorithm; its reference is cpattn/serving/llama.py)
    assert cu - set(FAMILIES) <= {"compact_attention_sm90", "model_ops"}, sorted(cu)
    assert not (ROOT / "reference" / "plan.py").exists(), "the planner belongs to reference/chunk_attention.py"


def _underscore_uses(tree: ast.AST) -> list[str]:
    """Imports of underscore names, and attribute reads ``x._name`` where x is not self/cls/super()."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            root = base
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in THIRD_PARTY:
                continue  # the peers' own internals (torch._dynamo, torch.ops.aten._sdpa...): not ours
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _own_private_reads(tree: ast.AST) -> set:
    """``obj._x`` is fine where the module itself defines ``_x`` (its own class's attribute on
    another instance, e.g. ``other._seqs`` inside the cache class)."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_"):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            own.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
    return own


@pytest.mark.parametrize("path", list(sources(*PACKAGES)), ids=rel)
def test_no_underscore_names_across_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _own_private_reads(tree)
    bad = [u for u in _underscore_uses(tree)
           if " import " in u or u.rsplit(".", 1)[-1] not in own]
    assert not bad, f"{rel(path)} uses another module's private names:\n  " + "\n  ".join(bad)


def test_the_check_sees_a_private_import(tmp_path):
    tree = ast.parse("from x.y import _hidden\nimport z\nz._inner()\nself._mine = 1\n")
    uses = _underscore_uses(tree)
    assert any("_hidden" in u for u in uses) and any("z._inner" in u for u in uses)
    assert not any("_mine" in u for u in uses)


def test_reference_needs_no_numba():
    for path in sources("reference"):
        text = path.read_text()
        assert not re.search(r"^\s*(import numba|from numba)|\bnumba\.", text, re.M), \
            f"{rel(path)}: the reference is the textbook; numba belongs in cpattn/"


def test_nothing_imports_tools():
    for path in [*sources("cpattn", "reference", "tests")]:
        text = path.read_text()
        assert not re.search(r"sys\.path\.insert\([^)]*tools", text), f"{rel(path)} puts tools/ on sys.path"
        assert not re.search(r"load_script\([\"']tools/", text), f"{rel(path)} imports a tools/ script"


def test_design_citations_point_to_docs_design():
    assert (ROOT / "docs" / "design.md").is_file()
    for path in [*sources(*PACKAGES, "tests", "tools"), *(ROOT / "docs").glob("*.md"), *(ROOT / "raw_kernels").glob("*.cu*")]:
        if path.name == "test_layout.py":
            continue
        assert "DESIGN.md" not in path.read_text(), f"{rel(path)} cites DESIGN.md; the design is docs/design.md"
