"""The shape ARCHITECTURE.md promises, checked on the source: a model family is named only
in its own module (studio/models/families/)."""
from __future__ import annotations

import io
import re
import tokenize

from tests.conftest import ROOT

PRODUCT = ("studio", "trainers", "ui")
FAMILY_NAMES = re.compile(r"\b(sd15|sdxl|flux)\b")


def _code_tokens(path):
    """(line, text) of the names and strings of a Python file (comments left out)."""
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NAME, tokenize.STRING):
            yield token.start[0], token.string


def test_no_source_outside_the_family_modules_names_a_family():
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(ROOT / "studio" / "models" / "families"):
                continue
            for line, text in _code_tokens(path):
                if FAMILY_NAMES.search(text):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {text[:60]}")
    assert not found, "\n".join(found)


def _method_branches(path, names: set[str]):
    """(line, text) of comparisons with a method's name: `x == "tlora"`, `x in ("loha", ...)`."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        constants = [c for o in operands for c in ([o] if isinstance(o, ast.Constant) else
                                                   getattr(o, "elts", []) if isinstance(o, (ast.Tuple, ast.List, ast.Set))
                                                   else []) if isinstance(c, ast.Constant)]
        if any(c.value in names for c in constants):
            yield node.lineno, ast.unparse(node)


def test_no_source_outside_the_method_modules_branches_on_a_method_name():
    """Adapter methods live in studio/adapters/methods; the file kinds (lora / loha / lokr
    layouts) are studio/adapters/formats' own axis, so both are left out."""
    from studio.adapters.methods import METHODS

    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if any(path.is_relative_to(ROOT / "studio" / "adapters" / home) for home in ("methods", "formats")):
                continue
            found += [f"{path.relative_to(ROOT)}:{line}: {text}" for line, text in _method_branches(path, set(METHODS))]
    assert not found, "\n".join(found)


def _imports(path) -> list[tuple[int, str]]:
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or ""))
    return out


def _importers(packages, target: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: {name}" for package in packages
            for path in sorted((ROOT / package).rglob("*.py")) for line, name in _imports(path)
            if name == target or name.startswith(target + ".")]


def test_only_trainers_import_trainers():
    """The studio and the UI reach the worker by starting its process, never by import."""
    found = _importers(("studio", "ui"), "trainers")
    assert not found, "\n".join(found)


def test_the_toy_world_is_outside_the_product():
    found = _importers(PRODUCT, "toyworld")
    assert not found, "\n".join(found)
