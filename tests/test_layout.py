"""Cheap guards on the code layout (style.md practice 13)."""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "GeneSegNet"
SCRIPT_DIRS = ("preprocess", "Inference", "Analysis")
SCRIPTS = [ROOT / "GeneSeg_train.py", ROOT / "GeneSeg_test.py"] + [
    p for d in SCRIPT_DIRS for p in (ROOT / d).glob("*.py") if p.name != "__init__.py"]
IMPORT_TO_REQUIREMENT = {"cv2": "opencv-python-headless", "skimage": "scikit-image",
                         "yaml": "pyyaml"}
MAX_MODULE_LINES = 600


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_modules_stay_small():
    too_long = {p.name: n for p in _modules()
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not too_long, f"split these modules by responsibility: {too_long}"


def test_no_public_function_defined_twice():
    seen = defaultdict(list)
    for path in _modules() + [p for p in SCRIPTS if p.exists()]:
        for node in _tree(path).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                seen[node.name].append(path.relative_to(ROOT).as_posix())
    script_entry_points = {"build_parser", "main"}
    dupes = {k: v for k, v in seen.items() if len(v) > 1 and k not in script_entry_points}
    assert not dupes, f"one implementation per concept: {dupes}"


def _third_party_imports(paths) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    local = {"GeneSegNet", "preprocess", "Inference", "Analysis", "tests", "common"}
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def test_every_third_party_import_is_a_requirement():
    text = (ROOT / "requirement.txt").read_text(encoding="utf-8").lower()
    required = {re.split(r"[<>=\[ ]", line.strip())[0] for line in text.splitlines()
                if line.strip() and not line.startswith(("#", "-"))}
    paths = _modules() + [p for p in SCRIPTS if p.exists()]
    missing = {n for n in _third_party_imports(paths)
               if IMPORT_TO_REQUIREMENT.get(n, n).lower() not in required}
    assert not missing, f"imported but not in requirement.txt: {missing}"


def test_scripts_are_thin_and_import_the_package_absolutely():
    for path in [p for p in SCRIPTS if p.exists()]:
        tree = _tree(path)
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"build_parser", "main"} <= functions, path.name
        assert not any(n.startswith("test") for n in functions), path.name  # pytest collects
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative import"
        source = path.read_text(encoding="utf-8")
        assert "sys.exit(main())" in source, path.name


def test_package_never_imports_scripts_prints_or_configures_logging():
    for path in _modules():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                assert top not in ("preprocess", "Inference", "Analysis"), path.name
                assert not top.startswith("GeneSeg_"), path.name
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                assert name != "print", f"{path.name}: print() in the package; use logging"
                if name == "basicConfig":
                    assert path.name == "log.py", f"{path.name}: configures logging"


def test_scripts_and_benchmarks_import_names_the_package_has():
    """A renamed or moved function must not leave a script or benchmark importing it."""
    import importlib
    import importlib.util

    paths = [p for p in SCRIPTS if p.exists()] + sorted((ROOT / "bench").glob("*.py"))
    missing = []
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] != "GeneSegNet":
                    continue
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{alias.name}" for alias in node.names
                            if not hasattr(module, alias.name)
                            and not (hasattr(module, "__path__") and importlib.util.find_spec(
                                f"{node.module}.{alias.name}") is not None)]
    assert not missing, f"imported names that do not exist: {missing}"


def _subpackage_imports() -> dict[str, set[str]]:
    """{first-level part of GeneSegNet: the other first-level parts it imports}."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in _modules():
        rel = path.relative_to(PACKAGE).parts
        source = rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("GeneSegNet."):
                target = node.module.split(".")[1]
                if target != source:
                    edges[source].add(target)
    return edges


def test_subpackages_import_one_way():
    edges = _subpackage_imports()

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in edges.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    assert not [s for s in edges if s in reachable(s)], f"import cycle among {dict(edges)}"
    foundations = {"io", "data", "dynamics", "model", "growth"}
    stages = {"slide", "training", "evaluation", "export", "vendors", "cli", "commands", "api"}
    upward = {s: edges[s] & stages for s in foundations if edges[s] & stages}
    assert not upward, f"foundations import the stages built on them: {upward}"
