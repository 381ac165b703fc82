"""The command line under faults, run for real (`python -m ral_jax.main` subprocesses, tiny SFT, held-out eval off):
SIGTERM and SIGINT save, print one line and exit 143 / 130; resume drops metrics lines past the restored step; a
finished run says it is complete; a diverged run stops without saving; config errors are one message; a run that
fails at start leaves no workdir; --show_config lists every knob with its default and doc."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--config=configs/video.py:tiny_sft', '--config.train.eval_examples=0', '--config.data.num_train=8',
        '--config.checkpoint.every=1', '--config.checkpoint.keep=10', '--config.mesh.shape=(2,1,1)']
LINE = 'checkpoint saved; run the same command to resume'


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  e = dict(os.environ)
  e.update({'XLA_FLAGS': '--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 '
                         '--xla_llvm_disable_expensive_passes=true',
            'JAX_PLATFORMS': 'cpu', 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false',
            'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax_cache')),
            'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'PYTHONPATH': ROOT})
  return e


def _cmd(workdir, *extra):
  return [sys.executable, '-m', 'ral_jax.main', f'--workdir={workdir}', *BASE, *extra]


def _run(env, workdir, *extra, timeout=300):
  return subprocess.run(_cmd(workdir, *extra), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l)['step'] for l in f.read().splitlines() if l.endswith('}')]


def _interrupt(env, workdir, sig, after_steps, *extra):
  """Starts a run, sends `sig` once metrics.jsonl holds `after_steps` steps, waits for the exit."""
  p = subprocess.Popen(_cmd(workdir, *extra), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  t0 = time.time()
  while len(_steps(workdir)) < after_steps and p.poll() is None and time.time() - t0 < 300:
    time.sleep(0.2)
  p.send_signal(sig)
  out, err = p.communicate(timeout=300)
  return p.returncode, out, err


def _saved(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def test_interrupts_resume_and_completion(env, tmp_path):
  wd = str(tmp_path / 'run')
  rc, out, err = _interrupt(env, wd, signal.SIGTERM, 1, '--config.train.sft_steps=5')
  assert rc == 143, err[-3000:]
  n = _saved(wd)[-1]
  assert f'interrupted at step {n}, {LINE}' in out and 'Traceback' not in err, (out, err[-3000:])
  assert n < 5

  rc, out, err = _interrupt(env, wd, signal.SIGINT, n + 1, '--config.train.sft_steps=5')
  assert rc == 130, err[-3000:]
  m = _saved(wd)[-1]
  assert f'interrupted at step {m}, {LINE}' in out and 'Traceback' not in err and m > n, (out, err[-3000:])

  with open(os.path.join(wd, 'metrics.jsonl'), 'a') as f:   # what a session killed after logging step m+1 leaves
    f.write(json.dumps({'step': m + 1, 'stage': 'sft', 'loss': 12345.0}) + '\n')
  p = _run(env, wd, '--config.train.sft_steps=5')
  assert p.returncode == 0, p.stderr[-3000:]
  assert _steps(wd) == [1, 2, 3, 4, 5], 'each step logged once: lines past the restored step were dropped'
  rows = [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))]
  assert all(r['loss'] != 12345.0 for r in rows)

  p = _run(env, wd, '--config.train.sft_steps=5')
  assert p.returncode == 0 and 'already complete' in p.stdout and _steps(wd) == [1, 2, 3, 4, 5], p.stdout
  p = _run(env, wd, '--config.train.sft_steps=3')
  assert p.returncode == 0 and 'beyond' in p.stdout, p.stdout


def test_diverged_run_stops_without_saving(env, tmp_path):
  wd = str(tmp_path / 'div')
  p = _run(env, wd, '--config.train.sft_steps=6', '--config.sft.lr=1e30', '--config.train.max_skipped_updates=2')
  assert p.returncode == 1, p.stderr[-3000:]
  assert 'optimizer updates were all skipped' in p.stderr and 'Traceback' not in p.stderr, p.stderr[-3000:]
  stopped = int(p.stderr.split('error: step ')[1].split(':')[0])
  assert stopped < 6 and max(_saved(wd)) < stopped, (stopped, _saved(wd))


def test_config_errors_are_one_message(env, tmp_path):
  p = _run(env, tmp_path / 'a', '--config.train.sft_stepz=3')
  assert p.returncode == 2 and 'Traceback' not in p.stderr
  assert p.stderr.strip() == ('config error: unknown config key \'sft_stepz\'. Did you mean "sft_steps" instead of '
                              '"sft_stepz"?'), p.stderr
  p = _run(env, tmp_path / 'b', '--config.sft.batch_size=3')
  assert p.returncode == 2 and p.stderr.startswith('config error: sft.batch_size = 3 is not divisible'), p.stderr
  assert len(p.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')


def test_failed_run_leaves_no_empty_workdir(env, tmp_path):
  (tmp_path / 'empty.jsonl').write_text('')
  wd = tmp_path / 'never'
  p = _run(env, wd, '--config.data.source=manifest', f'--config.data.train_manifest={tmp_path / "empty.jsonl"}')
  assert p.returncode == 1 and 'empty.jsonl is empty' in p.stderr and 'Traceback' not in p.stderr, p.stderr[-3000:]
  assert not os.path.exists(wd)


def test_show_config_lists_every_knob_with_default_and_doc(env):
  from configs import common
  from ral_jax import knobs
  p = subprocess.run([sys.executable, '-m', 'ral_jax.main', '--config=configs/video.py:tiny_ral', '--show_config',
                      '--config.rl.beta=0.5'], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  lines = {l.split(' = ')[0]: l for l in p.stdout.splitlines()}
  names = [k for k, _ in knobs._flatten(common.base_config())]
  assert set(names) == set(lines)
  docs = knobs.docs_from_source(common.__file__)
  assert all(docs[k] for k in names), [k for k in names if not docs[k]]
  assert lines['rl.beta'].startswith('rl.beta = 0.5  [default: 0.04]') and 'KL' in lines['rl.beta']
  assert lines['train.rl_steps'].startswith('train.rl_steps = 2  [default: 30]')
