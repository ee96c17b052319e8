"""The docs stay true to the code: every test docs/reliability.md names exists, and every figure a page shows is in
the repository."""

import ast
import re

from conftest import REPO

RELIABILITY = REPO / "docs" / "reliability.md"


def test_every_test_the_reliability_page_names_exists():
    text = RELIABILITY.read_text()
    files = dict(re.findall(r"^\| `(\w+)` \| `(tests/[\w/]+\.py)` \|$", text, flags=re.M))
    assert len(files) >= 10
    defined = {}
    for abbreviation, path in files.items():
        assert (REPO / path).is_file(), path
        tree = ast.parse((REPO / path).read_text())
        defined[abbreviation] = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    rows = "\n".join(line for line in text.splitlines() if line.startswith("| ") and "::" in line)
    cited = re.findall(r"`(\w+)::(\w+)`", rows)
    assert len(cited) > 50
    missing = [f"{a}::{name}" for a, name in cited if name not in defined.get(a, ())]
    assert missing == []


def test_every_figure_a_page_shows_is_in_the_repository():
    for page in (REPO / "docs").glob("*.md"):
        for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            assert (page.parent / figure).is_file(), (page.name, figure)


def test_every_repository_path_a_page_names_exists():
    """Test files, scripts and configs that README.md and docs/ name in code spans (six test paths had gone stale)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    pattern = r"`((?:tests|tools|benchmarks|configs|util)/[\w/.-]+\.(?:py|sh|yaml|json|md))(?:::\w+)?`"
    named = {(page.name, path) for page in pages for path in re.findall(pattern, page.read_text())}
    assert len(named) > 30
    assert sorted(f"{page}: {path}" for page, path in named if not (REPO / path).exists()) == []
