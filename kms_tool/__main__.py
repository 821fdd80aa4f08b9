"""`python -m kms_tool`: the same as the `hsm-kms` command."""

from __future__ import annotations

import sys

from kms_tool.cli import main

if __name__ == "__main__":
    sys.exit(main())
