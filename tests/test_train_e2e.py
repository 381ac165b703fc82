"""End-to-end trainer tests on CPU: every preset's tiny variant, resume after a kill, mesh-shape invariance.

The runs happen in subprocesses of this file (`python tests/test_train_e2e.py MODE ...`) so that they can be
killed, and so that they can use XLA's fast-compile CPU flags and one persistent compilation cache shared by all of
them (the tiny model's programs are compiled once per session, not once per preset). The subprocesses see 8 fake
CPU devices like tests/conftest.py; the tiny presets use a (2, 1, 1) mesh on the first two.

A test reward 'test_length' (response length in characters / 100) is registered in the runner so that advantages are non-zero
from the first step (the random tiny model earns no accuracy or format reward), which makes the RAL term act;
the ral_zero run keeps the real reward (accuracy + answer-only format).
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# Runner (subprocess side)
# ---------------------------------------------------------------------------------------------------------------

def _tiny(algo: str, task: str = 'video', **over):
  from configs import common
  c = common.get_config_for(task, 'tiny_' + algo)
  c.rl.reward = 'default' if algo == 'ral_zero' else 'test_length'   # ral_zero: the real answer-only reward
  for k, v in over.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _register_test_reward():
  from ral_jax.rl import rewards
  if 'test_length' not in rewards.registered_rewards():
    @rewards.register_reward('test_length')
    def _length(response, record):  # noqa: ARG001
      return len(response) / 100.0


def _run_presets(out_dir: str, presets):
  from ral_jax.train import loop as train
  results = {}
  for name in presets:
    algo, task = (name.split(':') + ['video'])[:2]
    wd = os.path.join(out_dir, name.replace(':', '_'))
    # 'ral' has exactly the programs of the resume test (rl_steps=4 sets the LR horizon), so it also warms the
    # compilation cache for it: XLA:CPU executables loaded from the cache can differ from fresh compiles in the
    # last bits, and the resume test compares runs bit for bit.
    over = {'sft': {'train.sft_steps': 3, 'train.export_hf': True},
            'ral': {'train.rl_steps': 4},
            # the student starts from the SFT run's HF export (the trainer's HF import path)
            'distill': {'model.hf_checkpoint': os.path.join(out_dir, 'sft', 'hf_export'), 'model.dtype': 'float32',
                        'model.remat_policy': 'none'}}.get(algo if task == 'video' else '', {})
    if task == 'image':   # heat maps of one held-out example before and after training
      over = {'train.heatmap_examples': 1}
    final = train.run(_tiny(algo, task, **over), wd)
    rows = [json.loads(line) for line in open(os.path.join(wd, 'metrics.jsonl'))]
    export = os.path.join(wd, 'hf_export')
    results[name] = {'final': final, 'rows': rows, 'export': sorted(os.listdir(export)) if os.path.isdir(export) else []}
    att = os.path.join(wd, 'attention')
    results[name]['attention'] = sorted(os.listdir(att)) if os.path.isdir(att) else []
    with open(os.path.join(wd, 'eval_summary.json')) as f:
      results[name]['summary'] = json.load(f)
    from ral_jax.train.checkpoint import Checkpointer
    ck = Checkpointer(wd, 1, 10, False)
    results[name]['meta_eval_points'] = ck.read_meta(ck.latest_step()).get('eval_points')
    ck.close()
    if os.path.isdir(export):   # the export reads back (models.hf_io) to the last checkpoint's parameters
      import jax
      from ral_jax.models import hf_io
      _, loaded = hf_io.load_hf(export)
      _, saved = _final_params(wd)
      got = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
      results[name]['export_max_diff'] = max(float(np.max(np.abs(got[k] - saved["['params']" + k]))) for k in got)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f)


def _run_resume(workdir: str, kill_after: int):
  """6 outer steps (2 SFT + 4 RL), a checkpoint every step; with kill_after > 0 the process SIGKILLs itself right
  after that step's checkpoint is committed."""
  from ral_jax.train import loop as train
  c = _tiny('ral', **{'train.rl_steps': 4, 'checkpoint.every': 1, 'checkpoint.keep': 10,
                      'checkpoint.async_save': True, 'train.eval_examples': 0})
  if kill_after:
    c.train.stop_after = kill_after
    try:
      train.run(c, workdir)
    except train.Preempted:
      os.kill(os.getpid(), signal.SIGKILL)
  else:
    train.run(c, workdir)


def _run_mesh(out: str):
  """One RL update (2 mini-batches, RAL on) on a 1-device mesh and on a (2, 4, 1) mesh; saves params + metrics."""
  import jax
  from ral_jax import sharding
  from ral_jax.train import build as train_init
  from ral_jax.train import run_setup
  from ral_jax.rl.objective import RLBatch
  from ral_jax.train.step import ModelInputs
  c = _tiny('ral')
  c.rl.prompts_per_batch, c.rl.group_size = 4, 4      # 16 rows: 2 mini-batches of 8 over 8 batch shards
  c.train.sft_steps = 0
  results = {}
  for shape in ((1, 1, 1), (2, 4, 1)):
    c.mesh.shape = shape
    ctx = run_setup.build_run(c, warn=False, tokenizer=False)
    run, mesh, rules, cfg = ctx.run, ctx.mesh, ctx.rules, ctx.run.model
    params = train_init.init_model_params(cfg, mesh, rules, seed=0)
    state = train_init.create_state(params, train_init.optim.make_optimizer(run.rl_optim), 0)
    steps = train_init.make_steps(run, cfg, 'rl', train_init.state_shardings_of(state))
    n, tp, tr, nv = 16, 9, 7, 4
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (n, tp + tr)).astype(np.int32)
    ids[:, 2:2 + nv] = cfg.video_token_id
    mask = np.ones((n, tp + tr), np.int32)
    mask[::2, :2] = 0
    rmask = (np.arange(tr)[None] < rng.integers(2, tr + 1, n)[:, None]).astype(np.int32)
    mask[:, tp:] = rmask
    pos = np.broadcast_to(np.arange(tp + tr, dtype=np.int32)[None, None], (n, 3, tp + tr)).copy()
    host = {'input_ids': ids, 'positions': pos, 'attention_mask': mask,
            'visual_embeds': rng.normal(size=(n, nv, cfg.hidden_size)).astype(np.float32),
            'response_ids': ids[:, tp:], 'response_mask': rmask,
            'advantages': rng.normal(size=n).astype(np.float32)}
    dev = sharding.shard_batch(host, mesh, {'positions': 0})
    x = ModelInputs(dev['input_ids'], dev['positions'], dev['attention_mask'], dev['visual_embeds'])
    old_lp, old_pol, ref_lp = steps.score(state.params, train_init.reference_of(state.params), x,
                                          dev['response_ids'])
    batch = RLBatch(response_ids=dev['response_ids'], response_mask=dev['response_mask'],
                    advantages=dev['advantages'], old_logprobs=old_lp, ref_logprobs=ref_lp, old_policy=old_pol,
                    key_mask=dev['attention_mask'])
    state, m = steps.update(state, x, batch)
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
    results[str(shape)] = {'params': flat, 'metrics': {k: float(v) for k, v in m.items()}}
  np.savez(out, **{f'{s}|{k}': v for s, r in results.items() for k, v in r['params'].items()})
  with open(out + '.json', 'w') as f:
    json.dump({s: r['metrics'] for s, r in results.items()}, f)


def _main(argv):
  import jax
  jax.config.update('jax_default_matmul_precision', 'highest')
  _register_test_reward()
  mode = argv[1]
  if mode == 'presets':
    _run_presets(argv[2], argv[3].split(','))
  elif mode == 'resume':
    _run_resume(argv[2], int(argv[3]))
  elif mode == 'mesh':
    _run_mesh(argv[2])
  else:
    raise SystemExit(f'unknown mode {mode}')


# ---------------------------------------------------------------------------------------------------------------
# Tests (pytest side)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


def _spawn(args, cache_dir, timeout=400, check=True):
  env = dict(os.environ)
  env.update({
      'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 '
                   '--xla_llvm_disable_expensive_passes=true',
      'JAX_PLATFORMS': 'cpu', 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false',
      'JAX_COMPILATION_CACHE_DIR': cache_dir, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
      'PYTHONPATH': ROOT + os.pathsep + env.get('PYTHONPATH', '')})
  p = subprocess.run([sys.executable, os.path.abspath(__file__)] + list(args), env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f'runner {args} failed (rc={p.returncode}):\n{p.stderr[-6000:]}')
  return p


PRESETS = ['ral', 'grpo', 'ral_zero', 'sft', 'distill', 'ral:image']   # 'distill' starts from the 'sft' export


@pytest.fixture(scope='session')
def preset_runs(tmp_path_factory, compile_cache):
  out = tmp_path_factory.mktemp('presets')
  _spawn(['presets', str(out), ','.join(PRESETS)], compile_cache, timeout=900)
  with open(out / 'results.json') as f:
    return json.load(f)


def _finite(row):
  bad = {k: v for k, v in row.items() if isinstance(v, float) and not np.isfinite(v)}
  assert not bad, f'non-finite metrics {bad}'


def _stage_rows(runs, name, stage):
  return [r for r in runs[name]['rows'] if r['stage'] == stage]


@pytest.mark.parametrize('name', PRESETS)
def test_tiny_preset_runs_with_finite_metrics(preset_runs, name):
  rows = preset_runs[name]['rows']
  for r in rows:
    _finite(r)
  evals = [r for r in rows if r['stage'] == 'eval']
  two_stages = bool(_stage_rows(preset_runs, name, 'sft')) and bool(_stage_rows(preset_runs, name, 'rl'))
  assert len(evals) == (3 if two_stages else 2) and all('eval/accuracy' in r for r in evals), \
      'held-out accuracy before training, after SFT (when followed by RL) and after training'
  rl = _stage_rows(preset_runs, name, 'rl')
  if name == 'sft':
    assert not rl and len(_stage_rows(preset_runs, name, 'sft')) == 3
    return
  assert len(rl) == (4 if name == 'ral' else 2)
  for r in rl:
    for k in ('reward', 'accuracy', 'format', 'adv/mean_abs', 'grpo/pg_loss', 'grpo/kl_ref', 'grpo/clip_frac',
              'grpo/entropy', 'resp_len', 'time/rollout', 'time/scoring', 'time/update', 'tokens_per_s',
              'sampler_logprob_gap', 'data/bad'):
      assert k in r, f'{name}: metric {k} missing'
    assert r['skipped'] == 0
    assert r['sampler_logprob_gap'] < 1e-3, 'sampler log-probs must match the training forward'


@pytest.mark.parametrize('name', ['ral', 'ral:image'])
def test_ral_term_is_zero_at_first_update_and_acts_later(preset_runs, name):
  for r in _stage_rows(preset_runs, name, 'rl'):
    for k in ('ral/loss', 'ral/jsd_pos_adv', 'ral/jsd_neg_adv', 'ral/visual_mass'):
      assert k in r
    assert abs(r['first/ral/jsd']) < 1e-6, 'p_theta == p_old at the first mini-batch (ral_jax/docs/method.md s.3)'
    assert r['last/ral/jsd'] > 1e-9, 'after one update the attention policy has moved'
    assert r['adv/mean_abs'] > 0


@pytest.mark.parametrize('name', ['ral', 'grpo', 'sft'])
def test_eval_summary_has_one_point_per_milestone(preset_runs, name):
  """<workdir>/eval_summary.json: before, after SFT, after RL (those the run has), each equal to the held-out
  evaluation row logged at that step, also in the returned metrics and in the last checkpoint's meta (a resumed
  run reports them)."""
  run = preset_runs[name]
  evals = {r['step']: r for r in run['rows'] if r['stage'] == 'eval'}
  last_sft = max([r['step'] for r in run['rows'] if r['stage'] == 'sft'], default=None)
  total = max(r['step'] for r in run['rows'])
  want = {'ral': ['before', 'after_sft', 'after_rl'], 'grpo': ['before', 'after_rl'], 'sft': ['before', 'after_sft']}
  points = run['summary']['points']
  assert [p['point'] for p in points] == want[name]
  steps = {'before': 0, 'after_sft': last_sft, 'after_rl': total}
  for p in points:
    assert p['step'] == steps[p['point']]
    row = evals[p['step']]
    for k in ('accuracy', 'format', 'evidence_mass', 'evidence_chance', 'examples'):
      assert p[k] == row[f'eval/{k}'], (p['point'], k)
    flat = 'eval_' + p['point']
    assert run['final'][flat] == p['accuracy'] and run['final'][flat + '_evidence_mass'] == p['evidence_mass']
  assert run['summary']['sft_steps'] == (last_sft or 0) and run['summary']['algo'] == name
  if name == 'ral':   # the SFT milestone is kept in the checkpoint meta for a resumed run
    assert run['meta_eval_points']['after_sft']['accuracy'] == points[1]['accuracy']


def test_grpo_has_no_attention_term(preset_runs):
  for r in _stage_rows(preset_runs, 'grpo', 'rl'):
    assert 'ral/loss' not in r and 'grpo/loss' in r


def test_ral_zero_uses_answer_only_format(preset_runs):
  r = _stage_rows(preset_runs, 'ral_zero', 'rl')[0]
  assert 'reward/format_answer_only' in r and 'reward/format_think_answer' not in r
  assert 'ral/loss' in r


def test_distill_has_token_and_attention_distillation(preset_runs):
  for r in _stage_rows(preset_runs, 'distill', 'rl'):
    assert r['kd/loss'] > 0 and r['attn_distill/loss'] > 0 and 'ral/loss' not in r


def test_sft_run_exports_an_hf_checkpoint(preset_runs):
  files = preset_runs['sft']['export']
  assert 'config.json' in files and 'model.safetensors' in files and 'tokenizer.json' in files
  assert preset_runs['sft']['export_max_diff'] == 0.0


def test_trainer_writes_attention_heatmaps_before_and_after(preset_runs):
  files = preset_runs['ral:image']['attention']
  assert any(f.startswith('step0_before_ex0') and f.endswith('.png') for f in files), files
  assert any(f.startswith('step4_after_ex0') and f.endswith('.png') for f in files), files
  assert not preset_runs['ral']['attention'], 'heat maps are off in the tiny presets unless asked for'


def test_sft_loss_decreases(preset_runs):
  losses = [r['loss'] for r in _stage_rows(preset_runs, 'sft', 'sft')]
  assert losses[-1] < losses[0]


def _final_params(workdir):
  import orbax.checkpoint as ocp
  from ral_jax.train.checkpoint import Checkpointer
  ck = Checkpointer(str(workdir), 1, 10, False)
  step = ck.latest_step()
  path = os.path.join(ck.directory, str(step), 'state')
  ck.close()
  tree = ocp.StandardCheckpointer().restore(path)
  import jax
  return step, {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _last_rows(workdir):
  rows = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    rows[(r['step'], r['stage'])] = r
  return rows


def test_resume_after_kill_equals_straight_run(tmp_path, compile_cache, preset_runs):
  del preset_runs  # runs first: all three runs below load the same executables from the compilation cache
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  _spawn(['resume', str(straight), '0'], compile_cache)
  p = _spawn(['resume', str(killed), '3'], compile_cache, check=False)
  assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
  assert max(s for s, _ in _last_rows(killed)) == 3
  _spawn(['resume', str(killed), '0'], compile_cache)
  s1, p1 = _final_params(straight)
  s2, p2 = _final_params(killed)
  assert s1 == s2 == 6
  assert p1.keys() == p2.keys()
  for k in p1:
    np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
  r1, r2 = _last_rows(straight), _last_rows(killed)
  for key in [(s, 'rl') for s in (4, 5, 6)]:
    a = {k: v for k, v in r1[key].items() if not k.startswith('time') and k != 'tokens_per_s'}
    b = {k: v for k, v in r2[key].items() if not k.startswith('time') and k != 'tokens_per_s'}
    assert a.keys() == b.keys()
    for k in a:
      if k.startswith('data/') or not isinstance(a[k], float):
        continue  # bad-input counters are per process (not part of the iterator state); 'stage' is a string
      np.testing.assert_allclose(b[k], a[k], rtol=0, atol=0, err_msg=f'{key} {k}')


def test_update_step_is_mesh_shape_invariant(tmp_path, compile_cache):
  out = str(tmp_path / 'mesh')
  _spawn(['mesh', out], compile_cache)
  arrays = np.load(out + '.npz')
  with open(out + '.json') as f:
    metrics = json.load(f)
  one, many = '(1, 1, 1)', '(2, 4, 1)'
  names = [k.split('|', 1)[1] for k in arrays.files if k.startswith(one + '|')]
  assert names
  # Two Adam steps of lr 1e-3: an element whose gradient is ~0 moves by up to ~lr on float noise alone, so params
  # are compared to 5% of one step; the pre-Adam quantities (loss parts, grad norm, JSD) to 1e-3 relative.
  for n in names:
    np.testing.assert_allclose(arrays[f'{many}|{n}'], arrays[f'{one}|{n}'], rtol=0, atol=5e-5, err_msg=n)
  for k, v in metrics[one].items():
    np.testing.assert_allclose(metrics[many][k], v, rtol=1e-3, atol=1e-6, err_msg=k)
  assert metrics[one]['last/ral/jsd'] > 0


if __name__ == '__main__':
  _main(sys.argv)
