"""Entry point: `python -m ral_jax.main --config=configs/video.py[:PRESET] --workdir=DIR [--config.X=Y ...]`.

Parses flags, joins the distributed runtime on multi-host set-ups (TPU pod slices; GPU hosts with
JAX_COORDINATOR_ADDRESS / SLURM), logs on process 0 only, and calls `train.run(config, workdir)`.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file with get_config(arg), e.g. configs/video.py',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', './workdir', 'Run directory: checkpoints, metrics, TensorBoard, data.')

_MULTIHOST_ENV = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
                  'MEGASCALE_COORDINATOR_ADDRESS')


def _multihost() -> bool:
  """True when the environment describes several processes (TPU pod slice, SLURM, explicit coordinator)."""
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if ',' in hosts:
    return True
  if os.environ.get('SLURM_NTASKS', '1') not in ('', '1'):
    return True
  return bool(os.environ.get('JAX_COORDINATOR_ADDRESS') or os.environ.get('COORDINATOR_ADDRESS'))


def _explicit_process_args() -> dict:
  """Plain env-var launches (launch/gpu_multi_host.sh) name the process count and index; TPU pods and SLURM are
  auto-detected by jax.distributed.initialize() and need none."""
  names = (('coordinator_address', 'JAX_COORDINATOR_ADDRESS', str), ('num_processes', 'JAX_NUM_PROCESSES', int),
           ('process_id', 'JAX_PROCESS_ID', int))
  return {k: cast(os.environ[e]) for k, e, cast in names if os.environ.get(e)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: use --config.KEY=VALUE for overrides')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)   # the console shows the progress bar; pass --verbosity=0 for INFO
  import jax
  if _multihost():
    jax.distributed.initialize(**_explicit_process_args())
  if jax.process_index() != 0:
    logging.set_verbosity(logging.ERROR)     # logs and the progress bar on process 0 only
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/video.py')
  from ral_jax.train import config as run_config
  from ral_jax.train import loop as train
  from configs import common
  run_config.check_known_keys(config, common.base_config())
  logging.info('devices: %s', jax.devices())
  train.run(config, _WORKDIR.value)


if __name__ == '__main__':
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  app.run(main)
