#!/usr/bin/env python3
"""The fms client: `python client.py --help`."""

import sys

from fms.cli import client_main

if __name__ == "__main__":
    sys.exit(client_main())
