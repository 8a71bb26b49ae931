"""The shape ARCHITECTURE.md promises, checked on the source: a model family is named only
in its own module (studio/families/)."""
from __future__ import annotations

import io
import re
import tokenize

from tests.conftest import ROOT

PRODUCT = ("studio", "trainers", "ui")
FAMILY_NAMES = re.compile(r"\b(sd15|sdxl)\b")


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
            if path.is_relative_to(ROOT / "studio" / "families"):
                continue
            for line, text in _code_tokens(path):
                if FAMILY_NAMES.search(text):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {text[:60]}")
    assert not found, "\n".join(found)
