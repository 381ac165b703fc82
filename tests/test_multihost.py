"""Multi-host runs for real on CPU: 2 processes x 2 devices (jax.distributed over gloo) against 1 process x 4
devices, tiny SFT preset with held-out evaluation: same metrics and parameters, one checkpoint written by both
processes together and resumable on 1 process (same step-3 result as a straight 1-process run), synthetic data written once, console output from
process 0 only, eval/accuracy over all hosts' examples. Plus the data shards (in-process): disjoint, complete, and
the global batches of one host reading everything."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--config=configs/video.py:tiny_sft', '--config.mesh.shape=(-1,1,1)', '--config.data.num_train=8',
        '--config.train.eval_examples=4']
NOISE = ('[Gloo]',)   # the gloo library's own connection lines (C++ stderr), not ours


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices, cache):
  e = dict(os.environ)
  e.update({'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 '
                         '--xla_llvm_disable_expensive_passes=true',
            'JAX_PLATFORMS': 'cpu', 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false',
            'JAX_COMPILATION_CACHE_DIR': cache, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'PYTHONPATH': ROOT})
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    e.pop(k, None)
  return e


def _start(workdir, processes, cache, *extra):
  """Popen handles of one run: 1 process x 4 devices, or 2 processes x 2 devices."""
  cmd = [sys.executable, '-m', 'ral_jax.main', f'--workdir={workdir}', *ARGS, *extra]
  if processes == 1:
    return [subprocess.Popen(cmd, env=_env(4, cache), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)]
  port, procs = _free_port(), []
  for i in range(processes):
    e = _env(4 // processes, cache)
    e.update({'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': str(processes),
              'JAX_PROCESS_ID': str(i), 'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'})
    procs.append(subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  return procs


def _finish(procs, timeout=400):
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(out)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _rows(workdir):
  rows = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    rows[(r['step'], r['stage'])] = {k: v for k, v in r.items() if not k.startswith('time/')}
  return rows


def _params(workdir, step):
  """The saved train state of `step`, read onto this process's first device (the saved topology differs)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  ck = ocp.StandardCheckpointer()
  meta = ck.metadata(path)
  meta = getattr(meta, 'item_metadata', meta)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = ck.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _ours(out):
  return [l for l in out.splitlines() if l.strip() and not l.startswith(NOISE)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """one: 1 process x 4 devices, 3 steps straight (checkpoints at 2 and 3); two: 2 processes x 2 devices, 2 steps,
  then continued to step 3 by 1 process x 4 devices from the 2-process checkpoint."""
  root = tmp_path_factory.mktemp('multihost')
  cache = str(root / 'jax_cache')
  one, two = str(root / 'one'), str(root / 'two')
  p1 = _start(one, 1, cache, '--config.train.sft_steps=3')
  p2 = _start(two, 2, cache)
  out1, (out2a, out2b) = _finish(p1), _finish(p2)
  more = _finish(_start(two, 1, cache, '--config.train.sft_steps=3', '--config.train.eval_examples=0'))
  return dict(one=one, two=two, out1=out1[0], out2=(out2a, out2b), more=more[0])


def _close(a, b, what, atol=1e-6):
  assert a.keys() == b.keys(), what
  for k, v in a.items():
    if isinstance(v, float):
      np.testing.assert_allclose(b[k], v, rtol=1e-5, atol=atol, err_msg=f'{what} {k}')


def test_two_processes_match_one_process(runs):
  a, b = _rows(runs['one']), _rows(runs['two'])
  for key in ((0, 'eval'), (1, 'sft'), (2, 'sft')):
    _close(a[key], b[key], key)
  assert b[(0, 'eval')]['eval/examples'] == 4, 'held-out scores gathered over both hosts (2 examples each)'
  assert b[(2, 'sft')]['data/records'] == 8 and b[(2, 'sft')]['data/seen'] == 8, 'data counts over both hosts'
  pa, pb = _params(runs['one'], 2), _params(runs['two'], 2)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_checkpoint_written_once_and_restorable_on_the_other_process_count(runs):
  assert sorted(os.listdir(os.path.join(runs['two'], 'checkpoints'))) == ['2', '3']
  state = os.path.join(runs['two'], 'checkpoints', '2', 'state')
  assert sorted(d for d in os.listdir(state) if d.startswith('ocdbt.process_')) == ['ocdbt.process_0',
                                                                                      'ocdbt.process_1']
  assert 'resumed from' in runs['more'] and 'at step 2' in runs['more']
  # step 3 after moving from 2 processes to 1 == step 3 of the straight 1-process run (params, optimizer state and
  # the data position, which is stored per host and moved to the new host count)
  a, b = _rows(runs['one']), _rows(runs['two'])
  _close({k: v for k, v in a[(3, 'sft')].items() if not k.startswith('data/')},
         {k: v for k, v in b[(3, 'sft')].items() if not k.startswith('data/')}, 'step 3')
  pa, pb = _params(runs['one'], 3), _params(runs['two'], 3)
  for k in pa:   # Adam divides float noise by ~0 second moments: elements with ~0 gradient differ by up to ~1e-5
    np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=5e-5, err_msg=k)


def test_synthetic_data_written_once_and_console_from_process_0_only(runs):
  p0, p1 = runs['out2']
  assert _ours(p0) and sum('writing synthetic tasks' in l for l in _ours(p0)) == 1
  assert _ours(p1) == [], _ours(p1)[:10]
  files = sorted(os.listdir(os.path.join(runs['two'], 'synthetic')))
  assert 'DONE' in files and 'train.jsonl' in files and 'heldout.jsonl' in files
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))


def test_host_shards_are_disjoint_complete_and_give_the_one_host_batches(tmp_path):
  from ral_jax.data import pipeline, synthetic
  from ral_jax.models.config import get_preset
  synthetic.main(['--out', str(tmp_path), '--num-train', '10', '--num-heldout', '2', '--tasks', 'color'])
  cfg = get_preset('tiny')

  def batches(shard_count, shard_index, batch_size):
    dcfg = pipeline.synthetic_config([str(tmp_path / 'train.jsonl')], batch_size=batch_size, num_epochs=1,
                                     drop_remainder=False, shard_count=shard_count, shard_index=shard_index,
                                     prompt_buckets=(256,), patch_buckets=(64,), target_buckets=(64,))
    return [list(b['id']) for b in pipeline.make_pipeline(dcfg, cfg).dataset]

  one = batches(1, 0, 4)
  h0, h1 = batches(2, 0, 2), batches(2, 1, 2)
  ids0, ids1 = sum(h0, []), sum(h1, [])
  assert not set(ids0) & set(ids1) and len(ids0) + len(ids1) == 10 and len(set(ids0) | set(ids1)) == 10
  assert [a + b for a, b in zip(h0, h1)] == one[:len(h1)]          # global batch j = host 0 rows | host 1 rows
  assert h0[-1] == one[-1], 'the last, partial global batch (2 of 4 rows) falls to host 0'
