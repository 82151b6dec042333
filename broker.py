#!/usr/bin/env python3
"""Run the fms broker: `python broker.py --help`."""

import sys

from fms.cli import daemon_main

if __name__ == "__main__":
    sys.exit(daemon_main("broker"))
