"""The README and the pages in docs/ stand on their own: a short README whose set-up commands are
the ones CI runs, links that resolve, and nothing that points outside the repository."""

import os
import re

import pytest
from harness import ROOT

README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))
INSTALL_AND_UP = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/fms up"
INSTALL_AND_TEST = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_the_readme_is_short_and_links_each_page_of_docs():
    text = _read(README)
    assert len(text.splitlines()) <= 120
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:3] == ["Quick start", "A tour", "Documentation"]
    for page in PAGES:
        assert f"(docs/{os.path.basename(page)})" in text, page


def test_the_readme_holds_the_two_set_up_commands_and_ci_runs_its_test_command():
    text = _read(README)
    assert INSTALL_AND_UP in text and INSTALL_AND_TEST in text
    ci = _read(os.path.join(ROOT, ".ci", "run"))
    assert "python3 -m venv .venv" in ci and ".venv/bin/pip install -q -e '.[test]'" in ci
    assert ci.rstrip().endswith(".venv/bin/python -m pytest")


@pytest.mark.parametrize("path", [README, *PAGES], ids=os.path.basename)
def test_every_relative_link_resolves_and_nothing_points_outside_the_repository(path):
    text = _read(path)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        assert resolved.startswith(ROOT + os.sep), target
        assert os.path.exists(resolved), f"{path}: {target} does not exist"
    assert "../shared" not in text and "DESIGN.md" not in text
    assert not re.search(r"\binvariants? \d", text, re.I), "invariants are not in the repository"
