"""`python -m operator_tool`: the same as the `hsm-operator` command."""

from __future__ import annotations

import sys

from operator_tool.cli import main

if __name__ == "__main__":
    sys.exit(main())
