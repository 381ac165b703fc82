#!/usr/bin/env bash
# Run ral_jax on a Cloud TPU VM slice: every worker runs the same program; jax.distributed.initialize joins them.
#
# Usage: launch/tpu_pod.sh [--dry-run] STEP... [-- EXTRA_FLAGS_FOR_ral_jax.main...]
#   STEP: create | copy | setup | run | logs | stop | delete | all (= copy setup run)
#
# Required environment (the script stops at the first one that is missing):
#   TPU_NAME   name of the TPU VM slice           ZONE      its zone, e.g. us-central2-b
#   CONFIG     config path (and preset) relative to the repository, e.g. configs/video.py:paper
#   WORKDIR    run directory shared by all workers (a gs:// bucket path for multi-host runs)
# Only for `create`: ACCELERATOR_TYPE (e.g. v4-32, v5litepod-16) and RUNTIME_VERSION (e.g. tpu-ubuntu2204-base).
# Optional: PROJECT (gcloud's default otherwise), SPOT=1 (spot capacity), REMOTE_DIR (default ral_jax, in the
#   workers' home), RUN_NAME (log name, default the UTC time), JAX_TPU_PIN (default jax[tpu]==0.10.2),
#   LOCAL_LOG_DIR (default logs/RUN_NAME, where `logs` copies the per-host logs).
#
# Each worker writes its own log, ~/ral_jax_logs/RUN_NAME.<hostname>.log (launch/tpu_worker.sh); `logs` copies
# them back. --dry-run prints every gcloud command instead of running it.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

steps=()
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --) shift; extra=("$@"); break ;;
    create|copy|setup|run|logs|stop|delete) steps+=("$1") ;;
    all) steps+=(copy setup run) ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (steps: create copy setup run logs stop delete all; flags: --dry-run)" ;;
  esac
  shift
done
[[ ${#steps[@]} -gt 0 ]] || die "no step given; try: $0 --dry-run all"

: "${TPU_NAME?set TPU_NAME to the TPU VM slice name}"
: "${ZONE?set ZONE to the slice zone, e.g. us-central2-b}"
REMOTE_DIR="${REMOTE_DIR:-ral_jax}"
LOG_PATTERN="${RUN_NAME:-*}"   # `logs` without RUN_NAME copies every run's logs
RUN_NAME="${RUN_NAME:-$(date -u +%Y%m%d-%H%M%S)}"
JAX_TPU_PIN="${JAX_TPU_PIN:-jax[tpu]==0.10.2}"
ROOT="$(repo_root)"
gc=(gcloud compute tpus tpu-vm)
where=("--zone=${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then where+=("--project=${PROJECT}"); fi

on_all() {  # on_all CMD: one command on every worker at once
  run "${gc[@]}" ssh "${TPU_NAME}" "${where[@]}" --worker=all --command="$1"
}

step_create() {
  : "${ACCELERATOR_TYPE?set ACCELERATOR_TYPE, e.g. v4-32}"
  : "${RUNTIME_VERSION?set RUNTIME_VERSION, e.g. tpu-ubuntu2204-base}"
  local spot=()
  if [[ "${SPOT:-0}" == 1 ]]; then spot=(--spot); fi
  run "${gc[@]}" create "${TPU_NAME}" "${where[@]}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --version="${RUNTIME_VERSION}" "${spot[@]}"
}

step_copy() {
  # Only tracked files travel (no workdirs, checkpoints or caches).
  local tarball="/tmp/ral_jax_${RUN_NAME}.tgz"
  run git -C "${ROOT}" archive --format=tar.gz -o "${tarball}" HEAD
  run "${gc[@]}" scp "${tarball}" "${TPU_NAME}:ral_jax.tgz" "${where[@]}" --worker=all
  on_all "rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar xzf ral_jax.tgz -C ${REMOTE_DIR}"
}

step_setup() {
  on_all "cd ${REMOTE_DIR} && python3 -m pip install -q -r requirements.txt '${JAX_TPU_PIN}'"
}

step_run() {
  : "${CONFIG?set CONFIG, e.g. configs/video.py:paper}"
  : "${WORKDIR?set WORKDIR, e.g. gs://my-bucket/ral/run1}"
  local cmd
  cmd="cd ${REMOTE_DIR} && RUN_NAME=$(quote "${RUN_NAME}") bash launch/tpu_worker.sh $(quote "${CONFIG}" "${WORKDIR}" "${extra[@]}")"
  on_all "${cmd}"
}

step_logs() {
  local dest="${LOCAL_LOG_DIR:-${ROOT}/logs/${LOG_PATTERN//\*/all}}"
  run mkdir -p "${dest}"
  run "${gc[@]}" scp "${TPU_NAME}:ral_jax_logs/${LOG_PATTERN}.*.log" "${dest}/" "${where[@]}" --worker=all
}

step_stop() {
  # SIGTERM lets the run checkpoint before it exits (the trainer saves on SIGTERM).
  # shellcheck disable=SC2016  # expands on the workers, not here
  on_all 'if [ -f ral_jax_logs/main.pid ]; then kill "$(cat ral_jax_logs/main.pid)" || true; fi'
}

step_delete() {
  run "${gc[@]}" delete "${TPU_NAME}" "${where[@]}" --quiet
}

for s in "${steps[@]}"; do
  "step_${s}"
done
