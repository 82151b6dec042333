"""Patterns on names and paths: ``--include`` / ``--exclude`` rules as rclone reads them, and the
patterns ``rm`` expands against stored names.

A pattern is a glob: ``*`` matches any characters but ``/``, ``**`` any characters, ``/``
included, ``?`` one character but ``/``, ``[...]`` one of a set (``[!...]``: not of it).  A
filter pattern that starts with ``/`` is matched from the top of the tree; one that does not
is matched against the end of the path, whole parts only: ``*.jpg`` matches ``a/b/c.jpg``,
``cache/**`` everything under any folder ``cache``.  The first rule that matches a path decides
(``--include``: in, ``--exclude``: out); a path no rule matches is in, unless there is an
``--include`` rule (then only what some rule includes is in), as with rclone's filters.
"""

import re
from collections.abc import Callable

GLOB_CHARS = re.compile(r"[*?\[]")


def has_glob(text: str) -> bool:
    """Whether ``text`` is a pattern rather than a plain name."""
    return GLOB_CHARS.search(text) is not None


def literal_prefix(pattern: str) -> str:
    """The part of ``pattern`` before its first glob character: every name it matches starts
    so (what to list to find them)."""
    match = GLOB_CHARS.search(pattern)
    return pattern if match is None else pattern[: match.start()]


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def name_matcher(pattern: str) -> Callable[[str], bool]:
    """``match(name)``: whether a stored name matches ``pattern`` whole."""
    regex = re.compile(_glob_regex(pattern) + r"\Z", re.DOTALL)
    return lambda name: regex.match(name) is not None


def path_matcher(pattern: str) -> Callable[[str], bool]:
    """``match(path)`` for a filter rule: from the top if ``pattern`` starts with ``/``, else
    against the end of ``path`` (whole parts)."""
    if pattern.startswith("/"):
        regex = re.compile(_glob_regex(pattern.lstrip("/")) + r"\Z", re.DOTALL)
    else:
        regex = re.compile(r"(?:.*/)?" + _glob_regex(pattern) + r"\Z", re.DOTALL)
    return lambda path: regex.match(path) is not None


def selector(rules: list | None) -> Callable[[str], bool] | None:
    """``wanted(relative path)`` for ``[("+" | "-", PATTERN), ...]`` in the order given, or
    None when there are no rules (everything is wanted)."""
    if not rules:
        return None
    compiled = [(sign == "+", path_matcher(pattern)) for sign, pattern in rules]
    default = not any(include for include, _ in compiled)

    def wanted(path: str) -> bool:
        for include, match in compiled:
            if match(path):
                return include
        return default

    return wanted
