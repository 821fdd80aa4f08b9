#!/usr/bin/env bash
# Install what the tests need, then run every check: proto freshness, ruff, mypy, import
# rules (import-linter), pytest.
# Usage: bash scripts/test.sh [PYTEST ARGS...]    e.g. bash scripts/test.sh -m unit -x
# Stops at the first failing step. With HSM_REQUIRE_ALL=1 (as in .ci/run) a missing tool or
# any skipped test is a failure. Coverage (lines and branches of every production package,
# [tool.coverage] in pyproject.toml) is reported on every run; its floor (fail_under) is
# enforced when the whole suite runs, i.e. without PYTEST ARGS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh

export GRPC_VERBOSITY=ERROR

banner() { printf '\n==> %s\n' "$*"; }

find_softhsm2_module() {
  local p
  if [ -n "${HSM_SOFTHSM2_MODULE:-}" ] && [ -f "$HSM_SOFTHSM2_MODULE" ]; then
    printf '%s\n' "$HSM_SOFTHSM2_MODULE"
    return 0
  fi
  p=$(dpkg -L libsofthsm2 2>/dev/null | grep -m1 '/libsofthsm2\.so$' || true)
  if [ -n "$p" ] && [ -f "$p" ]; then
    printf '%s\n' "$p"
    return 0
  fi
  for p in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so \
    /usr/lib64/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    if [ -f "$p" ]; then
      printf '%s\n' "$p"
      return 0
    fi
  done
  return 1
}

banner "system tools: softhsm2, etcd, systemd (its analyze and sysusers tools check the units), iproute2 (network namespaces)"
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v softhsm2-util >/dev/null 2>&1 && find_softhsm2_module >/dev/null || missing+=(softhsm2)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  if ! hsm_apt_install "${missing[@]}"; then
    hsm_say "continuing without ${missing[*]}: the tests that need them will skip" \
      "(or fail, under HSM_REQUIRE_ALL=1)"
  fi
fi
if module=$(find_softhsm2_module); then
  export HSM_SOFTHSM2_MODULE=$module
fi
hsm_say "softhsm2-util: $(command -v softhsm2-util || echo missing)"
hsm_say "libsofthsm2.so: ${HSM_SOFTHSM2_MODULE:-missing}"
if command -v etcd >/dev/null 2>&1; then
  hsm_say "etcd: $(command -v etcd) ($(etcd --version 2>/dev/null | awk 'NR == 1' || echo 'version unknown'))"
else
  hsm_say "etcd: missing"
fi

banner "python venv: .venv"
hsm_ensure_venv '.[test]'
py="$HSM_VENV/bin/python"
hsm_say "$("$py" --version) at $HSM_VENV"
export VIRTUAL_ENV="$HSM_VENV" PATH="$HSM_VENV/bin:$PATH"

step() {
  local name=$1 rc=0
  shift
  banner "$name"
  "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    printf '\nFAILED: %s (exit %s)\n' "$name" "$rc" >&2
    exit "$rc"
  fi
}

if [ -f scripts/gen_proto.py ]; then
  step "generated protobuf code is up to date (scripts/gen_proto.py --check)" \
    "$py" scripts/gen_proto.py --check
fi
step "ruff check" "$py" -m ruff check .
step "ruff format --check" "$py" -m ruff format --check .
step "mypy" "$py" -m mypy
step "import rules (lint-imports, contracts in pyproject.toml)" \
  "$HSM_VENV/bin/lint-imports" --no-cache --no-logo

# Tests run in HSM_TEST_WORKERS processes (pytest-xdist; default 2, the cores CI has; 0 runs
# them in this process). Most of a cluster test's time is spent waiting on the processes it
# started, so two workers halve the run. A module's tests stay on one worker (loadscope):
# module fixtures are made once. Every test starts its processes on ports the OS chooses and
# in directories of its own, so workers never share anything.
workers=${HSM_TEST_WORKERS:-2}
banner "pytest ($workers worker processes; HSM_TEST_WORKERS=0 for none)"
coverage=(--cov --cov-report=term)
if [ $# -gt 0 ]; then
  coverage+=(--cov-fail-under=0) # a part of the suite covers less: report, do not enforce
fi
parallel=()
if [ "$workers" != 0 ]; then
  parallel=(-n "$workers" --dist loadscope)
fi
rc=0
"$py" -m pytest -p no:cacheprovider "${coverage[@]}" "${parallel[@]}" "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  printf '\nFAILED: pytest collected no tests (exit 5)\n' >&2
  exit 5
elif [ "$rc" -ne 0 ]; then
  printf '\nFAILED: pytest (exit %s)\n' "$rc" >&2
  exit "$rc"
fi
printf '\nall checks passed\n'
