"""Regular expressions compiled on first use.

Compiling a pattern takes tens to hundreds of microseconds, and a module that compiles its
patterns where it is defined makes every command that imports it pay, used or not: ``fms ls``
parses no sizes or durations.  :func:`compiled_on_use` returns what acts as the compiled pattern
(``.match``, ``.search``, ...), compiled when first used; from then on a method is an attribute of
its own, so a pattern in a hot path costs what the compiled one does.
"""

import re
from typing import Any, cast

__all__ = ["compiled_on_use"]


class _OnUse:
    """Stands for ``re.compile(pattern, flags)`` until an attribute is asked for."""

    def __init__(self, pattern: str, flags: int) -> None:
        self._pattern = pattern
        self._flags = flags

    def __getattr__(self, name: str) -> Any:  # only for what is not an attribute yet
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(re.compile(self._pattern, self._flags), name)
        setattr(self, name, value)  # the next use finds it here, without this call
        return value

    def __repr__(self) -> str:
        return f"compiled_on_use({self._pattern!r}, {self._flags!r})"


def compiled_on_use(pattern: str, flags: int = 0) -> "re.Pattern[str]":
    """``re.compile(pattern, flags)``, done when the pattern is first used."""
    return cast("re.Pattern[str]", _OnUse(pattern, flags))
