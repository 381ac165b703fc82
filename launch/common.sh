#!/usr/bin/env bash
# Shared helpers of the launch scripts (sourced, not run).
# DRY_RUN=1 makes `run` print each command, shell-quoted and prefixed with '+ ', instead of running it.

DRY_RUN="${DRY_RUN:-0}"

# run CMD ARGS...: runs a command, or prints it in dry-run mode.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# die MESSAGE: prints to stderr and exits 1.
die() {
  echo "error: $*" >&2
  exit 1
}

# repo_root: the repository this script belongs to.
repo_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

# quote ARGS...: one shell-quoted string, safe to pass through `ssh --command`.
quote() {
  local out='' a
  for a in "$@"; do
    out+="$(printf '%q' "${a}") "
  done
  printf '%s' "${out% }"
}
