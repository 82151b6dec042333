"""The command line: ``main`` (entry points and dispatch), ``parser`` (the parser), ``commands``
(the client's commands), ``daemons`` (broker and workers), ``up`` (a local cluster) and ``shell``
(the interactive shell)."""

from .main import client_main, daemon_main, main
from .parser import build_parser, parse_size

__all__ = ["build_parser", "client_main", "daemon_main", "main", "parse_size"]
