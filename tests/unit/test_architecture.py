"""The layout rules of docs/architecture.md, checked on the import graph of every module of the project (imports
inside functions included): no cycle, no entry script imported by anything, util/ below the top-level files, its
packages layered, its leaf modules leaves; and every model name has a definition."""

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

import models_cross_scale_mae

FOLDERS = ("util", "tools", "benchmarks", "configs")
LEAVES = {"util.config", "util.errors", "util.files"}  # may import util.errors and nothing else of the project
# What each util/ package may import besides the leaves: packages lower in the list never import higher ones.
LAYERS = {
    "util.run": {"util.run"},
    "util.data": {"util.run", "util.data"},
    "util.weights": {"util.run", "util.weights"},
    "util.eval": {"util.run", "util.data", "util.eval"},
}


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for the top-level modules and every module under ``FOLDERS``."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in it; ``from package import module`` counts as the module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and (name not in ("util", *FOLDERS) or not names[0].startswith(name + ".")):
                found.add(name)
    return found - {"util", *FOLDERS}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_the_import_graph_has_no_cycle(graph):
    done, path = set(), []

    def visit(name):
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for imported in sorted(graph.get(name, ())):
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_no_module_imports_an_entry_script(graph):
    offenders = {name: sorted(m for m in imported if m.startswith("main_")) for name, imported in graph.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_util_is_below_the_top_level_files_and_layered(graph):
    top_level = {path.stem for path in REPO.glob("*.py")}
    assert top_level >= {"models_cross_scale_mae", "models_vit", "model_loading", "engine_pretrain", "main_pretrain"}
    problems = []
    for name, imported in graph.items():
        if not name.startswith("util."):
            continue
        project = {m for m in imported if m.startswith("util.") or m in top_level}
        if name in LEAVES:
            allowed = {"util.errors"}
        else:
            package = ".".join(name.split(".")[:2])
            allowed = LEAVES | {m for m in project if ".".join(m.split(".")[:2]) in LAYERS.get(package, set())}
        if project - allowed:
            problems.append(f"{name} imports {sorted(project - allowed)}")
    assert problems == []


def test_the_rules_can_fail():
    """The cycle and layering checks find what they look for (a graph with a cycle and an upward import)."""
    with pytest.raises(AssertionError, match="import cycle: a -> b -> a"):
        test_the_import_graph_has_no_cycle({"a": {"b"}, "b": {"a"}})
    with pytest.raises(AssertionError):
        test_util_is_below_the_top_level_files_and_layered({"util.run.loop": {"util.data.loaders"}})
    with pytest.raises(AssertionError):
        test_no_module_imports_an_entry_script({"tools.x": {"main_segment"}})


def test_models_import_nothing_above_them(graph):
    allowed = {"models_vit"}
    for name in ("models_vit", "models_cross_scale_mae"):
        assert {m for m in graph[name] if not m.startswith("util.")} <= allowed, name


def test_every_registered_model_is_a_function_grep_can_find():
    source = (REPO / "models_cross_scale_mae.py").read_text()
    defined = set(re.findall(r"^def (\w+)\(\*\*kwargs\) -> CrossScaleMAE:", source, flags=re.M))
    assert defined == set(models_cross_scale_mae.MODEL_NAMES)
    sizes, variants = 5, 8  # tiny..huge; plain MAE, six upstream ablations, the paper model
    assert len(defined) == sizes * variants
    assert all(callable(models_cross_scale_mae.__dict__[name]) for name in defined)  # upstream's lookup still works
