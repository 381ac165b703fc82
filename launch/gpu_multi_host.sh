#!/usr/bin/env bash
# Several GPU hosts, one process per host, all running the same program (jax.distributed joins them).
#
# Usage: launch/gpu_multi_host.sh [--dry-run] CONFIG WORKDIR [EXTRA_FLAGS_FOR_ral_jax.main...]
#
# Under SLURM (inside an allocation, e.g. from launch/slurm_gpu.sbatch): when SLURM_JOB_ID is set and this is
#   not yet a task, the script re-runs itself through `srun --ntasks-per-node=1` on every node; each task then
#   runs ral_jax.main, and JAX reads the process count, rank and coordinator from SLURM's variables.
# Without SLURM (plain environment variables), run this on every host with:
#   COORDINATOR_ADDRESS  host:port of process 0, reachable from all hosts, e.g. 10.0.0.2:1234
#   NUM_PROCESSES        number of hosts
#   PROCESS_ID           this host's rank, 0 .. NUM_PROCESSES-1
#   They are exported as JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID for ral_jax.main.
# Optional: LOG_DIR (default WORKDIR/logs; one log per host, <hostname>.log), PYTHON (default python3),
#   MEM_FRACTION (default 0.9). WORKDIR must be visible to all hosts (shared file system or a bucket).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
CONFIG="${1?usage: gpu_multi_host.sh [--dry-run] CONFIG WORKDIR [EXTRA_FLAGS...]}"
WORKDIR="${2?usage: gpu_multi_host.sh [--dry-run] CONFIG WORKDIR [EXTRA_FLAGS...]}"
shift 2
LOG_DIR="${LOG_DIR:-${WORKDIR}/logs}"
PYTHON="${PYTHON:-python3}"
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
dry=()
if [[ "${DRY_RUN}" == 1 ]]; then dry=(--dry-run); fi

if [[ -n "${SLURM_JOB_ID:-}" && -z "${SLURM_PROCID:-}" ]]; then
  : "${SLURM_JOB_NUM_NODES?SLURM_JOB_NUM_NODES is not set: run inside an allocation (sbatch or salloc)}"
  run srun --nodes="${SLURM_JOB_NUM_NODES}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash "${self}" "${dry[@]}" "${CONFIG}" "${WORKDIR}" "$@"
  exit 0
fi

envs=(PYTHONUNBUFFERED=1 "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}" "XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.9}")
if [[ -n "${SLURM_PROCID:-}" ]]; then
  rank="${SLURM_PROCID}"   # JAX's SLURM cluster detection supplies the rest
else
  : "${COORDINATOR_ADDRESS?set COORDINATOR_ADDRESS=host:port of process 0 (or run under SLURM)}"
  : "${NUM_PROCESSES?set NUM_PROCESSES to the number of hosts}"
  : "${PROCESS_ID?set PROCESS_ID to the rank of this host, 0 .. NUM_PROCESSES-1}"
  rank="${PROCESS_ID}"
  envs+=("JAX_COORDINATOR_ADDRESS=${COORDINATOR_ADDRESS}" "JAX_NUM_PROCESSES=${NUM_PROCESSES}"
         "JAX_PROCESS_ID=${PROCESS_ID}")
fi

cd "$(repo_root)"
envs+=("PYTHONPATH=${PWD}${PYTHONPATH:+:${PYTHONPATH}}")
cmd=(env "${envs[@]}" "${PYTHON}" -m ral_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")
log="${LOG_DIR}/$(hostname).log"
if [[ "${DRY_RUN}" == 1 ]]; then
  run "${cmd[@]}"
  echo "# rank ${rank} log: ${log}"
  exit 0
fi
mkdir -p "${LOG_DIR}"
"${cmd[@]}" 2>&1 | sed -u "s/^/[rank ${rank}] /" | tee -a "${log}"
exit "${PIPESTATUS[0]}"
