#!/usr/bin/env bash
# One process drives all GPUs of this host (JAX single-process multi-device; the mesh spans the local GPUs).
#
# Usage: launch/gpu_single_host.sh [--dry-run] CONFIG WORKDIR [EXTRA_FLAGS_FOR_ral_jax.main...]
#   e.g. launch/gpu_single_host.sh configs/video.py:paper /data/runs/ral1 --config.model.hf_checkpoint=/ckpt/7b
# Optional environment: GPUS (CUDA_VISIBLE_DEVICES list, default all), MEM_FRACTION (XLA preallocation,
#   default 0.9), LOG_DIR (default WORKDIR/logs), PYTHON (default python3).
# The log goes to LOG_DIR/<hostname>.log as well as the console. Install with `pip install -r requirements.txt
# 'jax[cuda13]==0.10.2'` (or cuda12).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
CONFIG="${1?usage: gpu_single_host.sh [--dry-run] CONFIG WORKDIR [EXTRA_FLAGS...]}"
WORKDIR="${2?usage: gpu_single_host.sh [--dry-run] CONFIG WORKDIR [EXTRA_FLAGS...]}"
shift 2
LOG_DIR="${LOG_DIR:-${WORKDIR}/logs}"
PYTHON="${PYTHON:-python3}"

cd "$(repo_root)"
envs=("PYTHONPATH=${PWD}${PYTHONPATH:+:${PYTHONPATH}}" PYTHONUNBUFFERED=1 "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}"
      "XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.9}")
if [[ -n "${GPUS:-}" ]]; then envs+=("CUDA_VISIBLE_DEVICES=${GPUS}"); fi
cmd=(env "${envs[@]}" "${PYTHON}" -m ral_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")
log="${LOG_DIR}/$(hostname).log"

if [[ "${DRY_RUN}" == 1 ]]; then
  run "${cmd[@]}"
  echo "# log: ${log}"
  exit 0
fi
mkdir -p "${LOG_DIR}"
"${cmd[@]}" 2>&1 | tee -a "${log}"
exit "${PIPESTATUS[0]}"
