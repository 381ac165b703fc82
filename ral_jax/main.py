"""Entry point: `python -m ral_jax.main --config=configs/video.py[:PRESET] --workdir=DIR [--config.X=Y ...]`.

Parses flags, joins the distributed runtime on multi-host set-ups (TPU pod slices; GPU hosts with
JAX_COORDINATOR_ADDRESS / SLURM), logs on process 0 only, and calls `train.run(config, workdir)`.
`--show_config` lists every knob (value, default, doc) of the given --config and exits.

The console, on failure (README 'Failure handling'):
  SIGINT (Ctrl-C) / SIGTERM   save at the end of the current step, print one line, exit 130 / 143
  a config error              its message alone (no traceback), exit 2
  bad data, a damaged checkpoint directory, a diverged run   the message alone, exit 1
  anything else               the usual traceback
"""
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file with get_config(arg), e.g. configs/video.py',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', './workdir', 'Run directory: checkpoints, metrics, TensorBoard, data '
                                '(a local path or gs://bucket/dir).')
_SHOW_CONFIG = flags.DEFINE_bool('show_config', False, 'List every knob of --config (value, default, doc) and exit.')

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


def _message(e: BaseException) -> str:
  """The readable text of an exception: ml_collections wraps a KeyError (whose str() is a repr, with escaped
  quotes and a literal \\n) inside an AttributeError; unwrap to the original string."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = (e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)).strip()
  if isinstance(e, KeyError):   # ml_collections: "'sft_stepz'\nDid you mean ...?"
    text = 'unknown config key ' + text.replace('\n', '. ')
  return text


def _fail(kind: str, e: BaseException, code: int):
  sys.stderr.write(f'{kind}: {_message(e)}\n')
  sys.stderr.flush()
  sys.exit(code)


def _parse_flags(argv):
  """absl flag parsing, with errors in the config file or in --config.X overrides shown as one message."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if 'Traceback (most recent call last)' in text:   # ml_collections embeds the config file's traceback
      head = text.split('\n', 1)[0].rstrip(':')
      last = [l for l in text.splitlines() if l.strip()][-1]
      sys.stderr.write(f'config error: {head}: {last}\n')
      sys.exit(2)
    sys.stderr.write(f'FATAL Flags parsing error: {text}\nPass --helpshort or --helpfull to see help on flags.\n')
    sys.exit(1)
  except Exception as e:  # noqa: BLE001 - raised by the config file or an override: a config error
    _fail('config error', e, 2)


def _show_config(config) -> None:
  from configs import common
  from ral_jax import knobs
  print(knobs.describe(config, common.base_config(), knobs.docs_from_source(common.__file__)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: use --config.KEY=VALUE for overrides')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/video.py')
  if _SHOW_CONFIG.value:
    _show_config(config)
    return
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)   # the console shows the progress bar; pass --verbosity=0 for INFO
  import jax
  if _multihost():
    jax.distributed.initialize(**_explicit_process_args())
  if jax.process_index() != 0:
    logging.set_verbosity(logging.ERROR)     # logs and the progress bar on process 0 only
  from ral_jax.data.badinput import DataError
  from ral_jax.train import checkpoint as ckpt_lib
  from ral_jax.train import config as run_config
  from ral_jax.train import loop as train
  from configs import common
  try:
    run_config.check_known_keys(config, common.base_config())
    run_config.build(config, jax.device_count(), warn=False)   # every config check, before any work
  except (ValueError, KeyError, FileNotFoundError) as e:   # FileNotFoundError: e.g. model.hf_checkpoint
    _fail('config error', e, 2)
  logging.info('devices: %s', jax.devices())
  try:
    train.run(config, _WORKDIR.value)
  except train.Preempted as e:
    if e.signum is None:
      print(f'stopped after step {e.step} (train.stop_after), checkpoint saved; run the same command to resume',
            flush=True)
      return
    print(f'interrupted at step {e.step}, checkpoint saved; run the same command to resume', flush=True)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:
    print('interrupted before the first step ended; nothing saved', flush=True)
    sys.exit(128 + signal.SIGINT)
  except (DataError, ckpt_lib.DamagedCheckpoint, train.Diverged, FileNotFoundError) as e:
    _fail('error', e, 1)


if __name__ == '__main__':
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  app.run(main, flags_parser=_parse_flags)
