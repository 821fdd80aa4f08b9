#!/usr/bin/env bash
# Install the project into ./.venv and start a local domain: `hsm-domain up`.
# Usage: bash scripts/up.sh [hsm-domain up ARGS...]
# The tools land in .venv/bin, not on a new shell's PATH: what `up` prints to try next names
# them by that path (relative to the repository root, where this script runs them), and
# `source .venv/bin/activate` puts them on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh

hsm_ensure_venv '.'
if [ ! -x "$HSM_VENV/bin/hsm-domain" ] ||
  ! "$HSM_VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("deploy.cli") is None)' 2>/dev/null; then
  hsm_die "the hsm-domain command (deploy/cli.py) does not exist yet: it arrives with the running-domain work. The venv is ready at $HSM_VENV."
fi
exec "$HSM_VENV/bin/hsm-domain" up "$@"
