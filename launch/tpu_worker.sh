#!/usr/bin/env bash
# Per-host wrapper, run on every TPU VM worker by launch/tpu_pod.sh (or by hand on a single-host TPU VM).
#
# Usage: launch/tpu_worker.sh [--dry-run] CONFIG WORKDIR [EXTRA_FLAGS...]
# Runs `python3 -m ral_jax.main --config=CONFIG --workdir=WORKDIR EXTRA_FLAGS...` from the repository root and
# writes this host's log to LOG_DIR/RUN_NAME.<hostname>.log (LOG_DIR default ~/ral_jax_logs, RUN_NAME default
# the UTC time); the python process id goes to LOG_DIR/main.pid. On a TPU VM, JAX finds the other workers by
# itself (jax.distributed.initialize with no arguments), so every host runs the same command.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
CONFIG="${1?usage: tpu_worker.sh [--dry-run] CONFIG WORKDIR [EXTRA_FLAGS...]}"
WORKDIR="${2?usage: tpu_worker.sh [--dry-run] CONFIG WORKDIR [EXTRA_FLAGS...]}"
shift 2
LOG_DIR="${LOG_DIR:-${HOME}/ral_jax_logs}"
RUN_NAME="${RUN_NAME:-$(date -u +%Y%m%d-%H%M%S)}"
PYTHON="${PYTHON:-python3}"
log="${LOG_DIR}/${RUN_NAME}.$(hostname).log"

cd "$(repo_root)"
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

cmd=("${PYTHON}" -m ral_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")
if [[ "${DRY_RUN}" == 1 ]]; then
  run "${cmd[@]}"
  echo "# log: ${log}"
  exit 0
fi
mkdir -p "${LOG_DIR}"
echo "[$(hostname)] $(date -u +%FT%TZ) ${cmd[*]}" | tee "${log}"
"${cmd[@]}" > >(tee -a "${log}") 2>&1 &
pid=$!
echo "${pid}" > "${LOG_DIR}/main.pid"
trap 'kill -TERM "${pid}" 2>/dev/null || true' TERM INT
status=0
wait "${pid}" || status=$?
# After a forwarded signal the first wait returns early: wait again while the run saves its checkpoint.
if kill -0 "${pid}" 2>/dev/null; then status=0; wait "${pid}" || status=$?; fi
if [[ ${status} -ne 0 ]]; then echo "[$(hostname)] exited with status ${status}; log: ${log}" >&2; fi
exit "${status}"
