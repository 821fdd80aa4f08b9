# shellcheck shell=bash
# Sourced by scripts/up.sh and scripts/test.sh, never run on its own. One copy of:
#  - installing Debian packages as root (directly or via password-less sudo) when possible;
#  - finding a Python >= 3.11 that can create a venv with pip;
#  - creating (or reusing) ./.venv and installing the project into it, only again when
#    pyproject.toml or the set of top-level packages changed since the last install.
# The caller has `set -euo pipefail` and has cd'ed to the repository root.

HSM_ROOT=$(pwd -P)
HSM_VENV="$HSM_ROOT/.venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

hsm_say() { printf '%s\n' "$*"; }
hsm_die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

hsm_can_be_root() {
  [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }
}

hsm_as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

# hsm_apt_install PKG...: install Debian packages. Returns non-zero, after saying why, when
# that is not possible here (no apt-get, not root and no sudo, apt failed).
hsm_apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    hsm_say "cannot install $*: apt-get not found; install them with your system's package manager"
    return 1
  fi
  if ! hsm_can_be_root; then
    hsm_say "cannot install $*: not root and no password-less sudo; run: sudo apt-get install $*"
    return 1
  fi
  hsm_say "installing Debian packages: $* (apt-get, about 15 s)"
  local log
  log=$(mktemp)
  if hsm_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >"$log" 2>&1 &&
    hsm_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      -o DPkg::Lock::Timeout=120 "$@" </dev/null >>"$log" 2>&1; then
    rm -f "$log"
    return 0
  fi
  tail -n 20 "$log"
  rm -f "$log"
  hsm_say "apt-get could not install $* (output above)"
  return 1
}

hsm_python_is_311() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
hsm_python_has_venv() { "$1" -c 'import ensurepip, venv' >/dev/null 2>&1; }

# hsm_pick_python: set HSM_PY to a Python >= 3.11 that can make a venv with pip. HSM_PYTHON
# (a command or path) overrides the search. Installs python3-venv when only that is missing.
hsm_pick_python() {
  local c p candidates
  if [ -n "${HSM_PYTHON:-}" ]; then
    candidates=("$HSM_PYTHON")
  else
    candidates=(python3 python3.13 python3.12 python3.11 /usr/bin/python3)
  fi
  local attempt
  for attempt in 1 2; do
    local newest="" seen=""
    for c in "${candidates[@]}"; do
      p=$(command -v "$c" 2>/dev/null) || continue
      seen="$seen $p ($("$p" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'))"
      hsm_python_is_311 "$p" || continue
      newest=${newest:-$p}
      if hsm_python_has_venv "$p"; then
        HSM_PY=$p
        return 0
      fi
    done
    if [ -z "$newest" ]; then
      hsm_die "Python >= 3.11 is required; found:${seen:- no python3 on PATH}. Install python3.11 or newer (or set HSM_PYTHON=/path/to/python3.11)."
    fi
    if [ "$attempt" -eq 1 ]; then
      hsm_say "$newest cannot create a venv (the venv/ensurepip modules are missing)"
      hsm_apt_install python3-venv || break
    fi
  done
  hsm_die "no Python >= 3.11 with a working venv module; on Debian: apt-get install python3-venv"
}

# The venv is usable if its Python is >= 3.11, it has pip, and it was made at this path (a
# copied or moved venv keeps the old path in its scripts).
hsm_venv_ok() {
  [ -f "$HSM_VENV/pyvenv.cfg" ] && [ -x "$HSM_VENV/bin/python" ] || return 1
  hsm_python_is_311 "$HSM_VENV/bin/python" || return 1
  "$HSM_VENV/bin/python" -m pip --version >/dev/null 2>&1 || return 1
  head -n 3 "$HSM_VENV/bin/pip" 2>/dev/null | grep -qF "$HSM_VENV/bin/python"
}

# hsm_ensure_venv TARGET: make ./.venv and `pip install -e TARGET` ("." or ".[test]") unless
# the stamp says this pyproject.toml and this set of packages are already installed.
hsm_ensure_venv() {
  local target=$1 key stamp
  if ! hsm_venv_ok; then
    if [ -e "$HSM_VENV" ]; then
      hsm_say "removing unusable $HSM_VENV (wrong Python, no pip, or moved from elsewhere)"
      rm -rf "$HSM_VENV"
    fi
    hsm_pick_python
    hsm_say "creating $HSM_VENV with $HSM_PY ($("$HSM_PY" -c 'import platform; print(platform.python_version())'))"
    "$HSM_PY" -m venv "$HSM_VENV"
  fi
  # The install depends on pyproject.toml and on which top-level packages exist (an editable
  # install maps only the packages present when it ran).
  key=$({ cat pyproject.toml; ls -1 -- */__init__.py 2>/dev/null || true; } | sha256sum | cut -d' ' -f1)
  stamp="$HSM_VENV/.installed-$key"
  if [ -f "$stamp" ] && grep -qxF -e "$target" -e '.[test]' "$stamp"; then
    return 0
  fi
  hsm_say "installing the project into $HSM_VENV (pip install -e '$target')"
  "$HSM_VENV/bin/python" -m pip install -q -U pip
  "$HSM_VENV/bin/python" -m pip install -q -e "$target"
  find "$HSM_VENV" -maxdepth 1 -name '.installed-*' ! -name ".installed-$key" -delete
  printf '%s\n' "$target" >>"$stamp"
}
