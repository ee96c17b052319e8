"""The layout rules of docs/architecture.md: imports point downward, and every model name has a definition."""

import ast
import re
from pathlib import Path

from conftest import REPO

import models_cross_scale_mae

TOP_LEVEL_MODULES = {path.stem for path in REPO.glob("*.py")}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_util_never_imports_a_top_level_module():
    assert TOP_LEVEL_MODULES >= {
        "models_cross_scale_mae",
        "models_vit",
        "model_loading",
        "engine_pretrain",
        "main_pretrain",
    }
    offenders = {path.name: sorted(imported_modules(path) & TOP_LEVEL_MODULES) for path in (REPO / "util").glob("*.py")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_models_import_nothing_above_them():
    allowed = {"models_vit", "util"}
    for name in ("models_vit.py", "models_cross_scale_mae.py"):
        imported = imported_modules(REPO / name) & (TOP_LEVEL_MODULES | {"util"})
        assert imported <= allowed, (name, imported)
    assert imported_modules(REPO / "models_vit.py") & TOP_LEVEL_MODULES == set()


def test_engines_do_not_import_entry_points():
    for name in ("engine_pretrain.py", "engine_finetune.py"):
        assert not {m for m in imported_modules(REPO / name) if m.startswith("main_")}, name


def test_every_registered_model_is_a_function_grep_can_find():
    source = (REPO / "models_cross_scale_mae.py").read_text()
    defined = set(re.findall(r"^def (\w+)\(\*\*kwargs\) -> CrossScaleMAE:", source, flags=re.M))
    assert defined == set(models_cross_scale_mae.MODEL_NAMES)
    sizes, variants = 5, 8  # tiny..huge; plain MAE, six upstream ablations, the paper model
    assert len(defined) == sizes * variants
    assert all(callable(models_cross_scale_mae.__dict__[name]) for name in defined)  # upstream's lookup still works
