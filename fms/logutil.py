"""Logging helpers: one line per event with key=value fields, configured only by entry points."""

import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

LOG_FORMAT = "%(asctime)s level=%(levelname)s proc=%(name)s %(message)s"
RATE_WINDOW = 10.0  # seconds
RATE_BURST = 5  # lines per window before further lines of the same kind are counted only
LOG_TEXT_MAX = 200  # characters of one text argument (attacker-supplied text is cut to this)


def clip(text: str | bytes, limit: int = LOG_TEXT_MAX) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


# Libraries whose INFO lines say nothing an operator of fms needs ("Found credentials in
# environment variables"): they log from WARNING up, unless fms logs at DEBUG.
QUIET_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3")


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger; called once by each entry point."""
    import logging  # here: the client's commands log nothing unless asked (--log-level)

    level_no = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(
        level=level_no,
        format=LOG_FORMAT,
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(level_no if level_no <= logging.DEBUG else logging.WARNING)


class RateLimitedLog:
    """Log lines about hostile or broken input without letting a flood fill the disk.

    At most RATE_BURST lines per RATE_WINDOW; the lines held back are counted and reported in
    the next line that is let through.  Text arguments are cut to LOG_TEXT_MAX characters, so
    a line never echoes more of what an attacker sent than that.
    """

    def __init__(self, log: "logging.Logger") -> None:
        self.log = log
        self._window_start = 0.0
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start > RATE_WINDOW:
            if self._suppressed:
                self.log.warning("event=log_suppressed lines=%d", self._suppressed)
            self._window_start, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count <= RATE_BURST:
            self.log.warning(msg, *(clip(a) if isinstance(a, (str, bytes)) else a for a in args))
        else:
            self._suppressed += 1
