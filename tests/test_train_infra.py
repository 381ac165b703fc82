"""Optimizer, train state, checkpoints and metric writers (no model needed)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.train import checkpoint as ckpt
from ral_jax import metrics as metrics_lib
from ral_jax.train import optim
from ral_jax.train.config import OptimConfig
from ral_jax.train.state import TrainState, all_finite


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {'params': {'visual': {'w': jax.random.normal(k[0], (3, 5))},
                     'model': {'w': jax.random.normal(k[1], (5, 7)), 'b': jnp.zeros((7,))},
                     'lm_head': {'kernel': jax.random.normal(k[2], (7, 11))}}}


def test_schedule_warmup_then_cosine_to_end():
  cfg = OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, end_lr_ratio=0.1)
  s = optim.learning_rate_schedule(cfg)
  np.testing.assert_allclose([float(s(k)) for k in range(4)], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
  np.testing.assert_allclose(float(s(9)), 0.1 + 0.9 * 0.5, rtol=1e-6)  # half way through the decay
  np.testing.assert_allclose(float(s(14)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(s(100)), 0.1, rtol=1e-6)
  c = optim.learning_rate_schedule(OptimConfig(lr=2.0, warmup_steps=2, schedule='constant'))
  np.testing.assert_allclose([float(c(k)) for k in (0, 1, 5, 500)], [1.0, 2.0, 2.0, 2.0])


def test_frozen_subtree_has_no_state_and_no_update():
  params = _params()
  tx = optim.make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, grad_clip=1.0))
  state = TrainState.create(params, tx, jax.random.PRNGKey(1))
  leaves_with_visual_shape = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, 'shape', None) == (3, 5)]
  assert not leaves_with_visual_shape, 'the frozen vision subtree must have no optimizer state'
  grads = jax.tree.map(jnp.ones_like, params)
  new = state.apply_gradients(grads, tx)
  np.testing.assert_array_equal(new.params['params']['visual']['w'], params['params']['visual']['w'])
  assert not np.allclose(new.params['params']['model']['w'], params['params']['model']['w'])
  assert int(new.step) == 1


def test_clip_uses_trainable_norm_only():
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  grads['params']['visual']['w'] = 1e6 * grads['params']['visual']['w']
  n = optim.trainable_global_norm(grads)
  np.testing.assert_allclose(float(n), np.sqrt(5 * 7 + 7 + 7 * 11), rtol=1e-6)


def test_all_finite():
  assert bool(all_finite(_params()))
  p = _params()
  p['params']['model']['b'] = p['params']['model']['b'].at[0].set(jnp.nan)
  assert not bool(all_finite(p))


def test_checkpoint_round_trip_with_data_state_and_ref(tmp_path):
  params = _params()
  tx = optim.make_optimizer(OptimConfig(lr=0.1))
  state = TrainState.create(params, tx, jax.random.PRNGKey(3))
  state = state.apply_gradients(jax.tree.map(jnp.ones_like, params), tx)
  ck = ckpt.Checkpointer(str(tmp_path), every=2, keep=2, async_save=True)
  meta = {'outer_step': 4, 'stage': 'rl', 'data_state': {'rl': {'next_index': 17}, 'sft': b'\x00\x01raw'}}
  assert ck.save(4, state, meta, ref=params)
  ck.wait()
  assert ck.latest_step() == 4
  ck.close()
  ck = ckpt.Checkpointer(str(tmp_path), every=2, keep=2, async_save=True)   # a fresh process's view
  template = TrainState.create(_params(), tx, jax.random.PRNGKey(9))
  got, ref, meta2 = ck.restore(4, template, ref_like=jax.tree.map(jnp.zeros_like, params))
  assert ref is not None
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert meta2['data_state'] == meta['data_state'] and meta2['stage'] == 'rl'
  ck.close()


def test_checkpoint_refuses_non_finite_and_keeps_n(tmp_path):
  params = _params()
  tx = optim.make_optimizer(OptimConfig(lr=0.1))
  state = TrainState.create(params, tx, jax.random.PRNGKey(3))
  ck = ckpt.Checkpointer(str(tmp_path), every=1, keep=2, async_save=False)
  for s in (1, 2, 3):
    assert ck.save(s, state, {'outer_step': s})
  bad = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  assert not ck.save(4, bad, {'outer_step': 4})
  ck.wait()
  assert ck.manager.all_steps() == [2, 3]
  ck.close()


def test_metrics_writers(tmp_path):
  w = metrics_lib.MetricsWriter(str(tmp_path), total_steps=3, enabled=True)
  w.write(1, {'loss': jnp.float32(0.5), 'reward': 1.0, 'n': jnp.int32(3)}, stage='rl')
  w.advance(1, 'rl')
  w.write(2, {'loss': float('nan')}, stage='rl')
  w.close()
  lines = [json.loads(x) for x in open(tmp_path / 'metrics.jsonl')]
  assert lines[0] == {'step': 1, 'stage': 'rl', 'loss': 0.5, 'reward': 1.0, 'n': 3}
  assert np.isnan(lines[1]['loss'])
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tb'))
  with pytest.raises(ValueError, match='scalars'):
    metrics_lib.to_host({'x': jnp.zeros(3)})


def test_non_finite_update_is_skipped():
  from ral_jax.train import step as train_step
  params = _params()
  tx = optim.make_optimizer(OptimConfig(lr=0.1))
  state = TrainState.create(params, tx, jax.random.PRNGKey(3))
  grads = jax.tree.map(jnp.ones_like, params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.inf), grads)
  for loss, g in ((jnp.float32(jnp.nan), grads), (jnp.float32(1.0), bad)):
    new, m = jax.jit(lambda s, l, gg: train_step._guarded_apply(s, tx, l, gg, {}))(state, loss, g)
    assert float(m['skipped']) == 1.0 and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
      np.testing.assert_array_equal(a, b)
  new, m = train_step._guarded_apply(state, tx, jnp.float32(1.0), grads, {})
  assert float(m['skipped']) == 0.0 and int(new.step) == 1


def test_split_rows_is_strided_and_invertible():
  from ral_jax.train import step as train_step
  x = jnp.arange(12).reshape(6, 2)
  s = train_step.split_rows(x, 3)
  np.testing.assert_array_equal(s[1], x[1::3])
  np.testing.assert_array_equal(train_step.merge_rows(s), x)


def test_sigterm_sets_the_preemption_flag():
  import signal
  guard = ckpt.PreemptionGuard()
  try:
    assert not guard.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested
  finally:
    guard.close()


def test_optimizer_state_is_sharded_like_the_parameters():
  """Adam's moments live on their parameter's sharding (fsdp), not replicated; scalars are replicated."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ral_jax import sharding
  from ral_jax.train.build import create_state
  mesh = sharding.make_mesh((1, 4, 1))
  fsdp = NamedSharding(mesh, P('fsdp'))
  params = jax.tree.map(lambda x: jax.device_put(jnp.zeros((8,) + x.shape[1:]), fsdp), _params())
  tx = optim.make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, grad_clip=1.0))
  state = create_state(params, tx, seed=0)
  specs = [x.sharding.spec for x in jax.tree.leaves(state.opt_state) if x.ndim == 2 and x.shape[0] == 8]
  assert len(specs) >= 4, specs   # mu and nu of model.w and lm_head.kernel
  assert all(spec == P('fsdp') for spec in specs), specs
  assert state.rng.sharding.spec == P() and state.step.sharding.spec == P()


def test_eval_summary_table_json_and_flat_keys(tmp_path):
  from ral_jax.train import eval_summary
  ev = lambda acc, mass: {'eval/accuracy': acc, 'eval/format': 1.0, 'eval/evidence_mass': mass,  # noqa: E731
                          'eval/evidence_chance': 0.296, 'eval/examples': 64.0, 'time/eval': 3.0}
  # recorded out of order, as a resumed run may: printed and written in milestone order
  points = {'after_rl': eval_summary.point(ev(0.7031, 0.31), 230), 'before': eval_summary.point(ev(0.0, 0.296), 0),
            'after_sft': eval_summary.point({'eval/accuracy': 0.5, 'eval/examples': 64.0}, 200)}
  lines = eval_summary.table(points, algo='grpo')
  assert lines[0] == ('held-out results (64 examples, greedy decoding); evidence mass = share of visual attention '
                      'on the evidence, uniform = 0.296:')
  assert [ln[2:20].strip() for ln in lines[2:]] == ['before training', 'after SFT', 'after RL (grpo)']
  assert lines[2].split()[-4:] == ['0', '0.000', '1.000', '0.296']
  assert lines[3].split()[-4:] == ['200', '0.500', '-', '-'], 'a field the evaluation lacked prints as -'
  assert lines[4].split()[-4:] == ['230', '0.703', '1.000', '0.310']
  path = eval_summary.write(str(tmp_path), points, algo='ral', seed=3)
  with open(path) as f:
    data = json.load(f)
  assert [p['point'] for p in data['points']] == ['before', 'after_sft', 'after_rl'] and data['seed'] == 3
  assert data['points'][2] == {'point': 'after_rl', 'label': 'after RL', 'step': 230, 'accuracy': 0.7031,
                               'format': 1.0, 'evidence_mass': 0.31, 'evidence_chance': 0.296, 'examples': 64.0}
  flat = eval_summary.flat(points)
  assert flat['eval_after_rl'] == 0.7031 and flat['eval_before_evidence_mass'] == 0.296
  assert 'eval_after_sft_evidence_mass' not in flat and flat['eval_after_sft'] == 0.5
