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


# --- commands as a fresh user runs them (issue 26: "says `python client.py`, which fails") ---

# What a line of a shell block, or a part of it after `&&`, `;`, `|` or `$(`, may not start with:
# a command a fresh machine with only Python 3.11 and the clone's .venv does not have on PATH.
BARE = re.compile(
    r"(?:^|&&|;|\||\$\()\s*(?:[A-Z_]+=\S*\s+)*(python3?|pip3?|pytest|fms|client\.py)(?=\s|$)"
)


def _blocks(text: str) -> list:
    """The body of every fenced block that holds commands (```sh, ```text, untagged)."""
    return [
        body
        for tag, body in re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S)
        if tag in ("", "sh", "text", "console", "bash")
    ]


@pytest.mark.parametrize("path", [README, *PAGES], ids=os.path.basename)
def test_every_command_in_the_pages_runs_from_the_venv(path):
    """Commands in blocks run `.venv/bin/fms`, `.venv/bin/python`, `.venv/bin/pip`, never a
    bare `fms`, `python`, `pip` or `python client.py`; only `python3 -m venv` makes the venv.
    Inline, `python ...`, `pip ...` and `pytest ...` are written the same way (`fms up` in prose
    names a command)."""
    text = _read(path)
    for body in _blocks(text):
        for line in body.splitlines():
            code = line.split(" #")[0].strip()
            if code.startswith("#") or code.startswith("usage:"):
                continue
            for match in BARE.finditer(code.replace("python3 -m venv", "")):
                # a synopsis (`fms [--broker ENDPOINT] ...`) shows the command's shape
                if not re.match(r"\s*fms\s+(\[|[a-z]+\s+\[)", code[match.start(1) :]):
                    raise AssertionError(f"{os.path.basename(path)}: {line!r}")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"`([^`]+)`", re.sub(r"\s+", " ", prose)):
        if span.startswith("python3 -m venv"):
            continue
        assert not re.match(r"(CI=\S+\s+)?(python3?|pip3?|pytest)( |$)", span), span
    assert not re.search(r"(?<![/\w])python3? client\.py", re.sub(r"\s+", " ", text))


# --- docs/SECURITY.md's recipe in short, against the real commands ---


def _security_recipe() -> list:
    """The argv (after ``.venv/bin/fms``) of each fms command in SECURITY.md's short recipe,
    with its continuation lines joined and its comments dropped."""
    import shlex

    text = _read(os.path.join(DOCS, "SECURITY.md"))
    block = re.search(r"in short.*?^```text\n(.*?)^```", text, re.M | re.S)
    assert block, "SECURITY.md has no recipe in short"
    joined = re.sub(r"\\\n\s*", " ", block.group(1))
    commands = []
    for line in joined.splitlines():
        code = "" if line.lstrip().startswith("#") else line.split(" #")[0]
        for part in re.split(r"&&|;|\$\(|\)", code):
            words = shlex.split(part)
            if words and words[0].startswith("STORE="):
                words = words[1:]
            if words and words[0] == ".venv/bin/fms":
                commands.append(words[1:])
    return commands


def test_the_security_recipe_names_only_commands_and_options_that_exist():
    """Each fms command of the recipe parses as the real fms parses it: the command exists, and
    so does every option it gives (a renamed or dropped flag fails here)."""
    from fms.cli.main import parse
    from fms.cli.parser import build_parser, command_in

    commands = _security_recipe()
    assert {argv[0] for argv in commands if not argv[0].startswith("-")} >= {
        "keygen",
        "broker",
        "cache",
        "storage",
    }
    for argv in commands:
        parser = build_parser("fms", only=command_in(argv) or "")
        try:
            parse(parser, argv)
        except SystemExit as exc:
            raise AssertionError(f"SECURITY.md: fms {' '.join(argv)} does not parse") from exc
        # spelled out, as argparse would also take an abbreviation
        name = command_in(argv)
        known = {o for a in parser._actions for o in a.option_strings}
        if name:
            known |= {o for a in parser.commands[name]._actions for o in a.option_strings}
        for word in argv:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"SECURITY.md: fms {name}: no option {word}"


def test_the_docs_and_keygen_give_each_allow_folder_one_name():
    """The folder of --allow is `allow-clients/` and that of --allow-workers `allow-workers/`,
    in SECURITY.md, SEVERAL-MACHINES.md and keygen's advice alike; no recipe copies a worker's
    key into the clients' folder."""
    from fms.cli.commands import ALLOW_CLIENTS_DIR, ALLOW_WORKERS_DIR

    assert (ALLOW_CLIENTS_DIR, ALLOW_WORKERS_DIR) == ("allow-clients", "allow-workers")
    for page in ("SECURITY.md", "SEVERAL-MACHINES.md"):
        text = _read(os.path.join(DOCS, page))
        assert set(re.findall(r"--allow (\S+)", text)) == {ALLOW_CLIENTS_DIR}, page
        assert set(re.findall(r"--allow-workers (\S+)", text)) == {ALLOW_WORKERS_DIR}, page
        for source, folder in re.findall(r"cp (\S+) (allow[\w-]*)/", text):
            role = "clients" if folder == ALLOW_CLIENTS_DIR else "workers"
            assert folder in (ALLOW_CLIENTS_DIR, ALLOW_WORKERS_DIR), (page, folder)
            worker = any(w in source for w in ("cache", "storage", "worker"))
            assert worker == (role == "workers"), (page, source, folder)
        # every folder named allow-something in the page is one of the two
        named = set(re.findall(r"\b(allow(?:-[a-z]+)?)/", text))
        assert named <= {ALLOW_CLIENTS_DIR, ALLOW_WORKERS_DIR}, (page, named)
