"""What a checkpoint save costs the loop, kept exact: the host-snapshot save (a pinned host copy, Orbax in a
background thread) restores the values the state had when `save` was called although the next step donates and
overwrites the state at once, also after `prepare` warmed its pinned host memory; its errors surface in `wait`;
`wait` says it is still finalizing; the reference's checksum is exact on any mesh; the trainer re-derives the
reference at restore (RL from the initial parameters) or holds none (beta = 0), and refuses a changed source."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ral_jax.train import checkpoint as ckpt
from ral_jax.train import optim
from ral_jax.train.config import OptimConfig
from ral_jax.train.state import TrainState

TX = optim.make_optimizer(OptimConfig(lr=0.1))


def _mesh():
  return jax.make_mesh((2, 4), ('a', 'b'), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _state(seed=0):
  """A TrainState whose leaves are sharded over 8 devices, replicated, and bf16 (odd sizes)."""
  mesh, k = _mesh(), jax.random.PRNGKey(seed)
  params = {'params': {
      'model': {'w': jax.device_put(jax.random.normal(k, (36, 20)), NamedSharding(mesh, P('a', 'b'))),
                'b': jax.device_put(jnp.arange(7.0), NamedSharding(mesh, P()))},
      'lm_head': {'k': jax.device_put(jax.random.normal(k, (12, 8), jnp.bfloat16), NamedSharding(mesh, P(None, 'b')))}}}
  state = TrainState.create(params, TX, jax.random.PRNGKey(3))
  return state.apply_gradients(jax.tree.map(jnp.ones_like, params), TX)


_bump = jax.jit(lambda t: jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, t),
                donate_argnums=0)


def _finish_and_restore(ck, tmp_path, state_like, ref_like, want):
  """Waits for `ck`'s save of step 1, restores it with a fresh Checkpointer and checks every leaf (state, then
  reference) against `want`, dtype included; returns (restored state, meta)."""
  ck.wait(progress_every=0)
  ck.close()
  ck = ckpt.Checkpointer(str(tmp_path), 1, 2)
  got, got_ref, meta = ck.restore(1, state_like, ref_like=ref_like)
  ck.close()
  for a, b in zip(jax.tree.leaves((got, got_ref)), want):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), b)
  return got, meta


@pytest.mark.parametrize('snapshot', [True, False])
def test_save_restores_the_values_at_save_time_although_the_state_is_donated_next(tmp_path, snapshot):
  state = _state()
  ref = jax.tree.map(lambda x: x * 2, state.params)
  want = [np.asarray(x) for x in jax.tree.leaves((state, ref))]
  ck = ckpt.Checkpointer(str(tmp_path), 1, 2, async_save=True, host_snapshot=snapshot)
  assert ck.host_snapshot == snapshot
  assert ck.save(1, state, {'outer_step': 1, 'stage': 'rl'}, ref=ref)
  state, ref = _bump((state, ref))                     # the next step: overwrites the donated buffers at once
  assert not ck.save(1, state, {'outer_step': 1})      # a step saved (or being saved) is not saved again
  got, meta = _finish_and_restore(ck, tmp_path, state, ref, want)
  assert got.params['params']['model']['w'].sharding == state.params['params']['model']['w'].sharding
  assert meta['stage'] == 'rl'


def _pinned_alive():
  return {id(x) for x in jax.live_arrays() if x.sharding.memory_kind == 'pinned_host'}


@pytest.mark.parametrize('abstract_then_save_at_once', [False, True])
def test_prepare_warms_pinned_host_memory_and_the_save_stays_exact(tmp_path, abstract_then_save_at_once):
  """The warm-up's real path (CPU has a pinned_host memory space; host_warmup=True forces what is automatic on
  GPU): it allocates the snapshot's leaves and frees them, compiles the finite check ahead, and a save right after
  it (also one that does not wait for it first) restores the values at save time."""
  state = _state()
  ref = jax.tree.map(lambda x: x * 2, state.params)
  want = [np.asarray(x) for x in jax.tree.leaves((state, ref))]
  before = _pinned_alive()
  ck = ckpt.Checkpointer(str(tmp_path), 1, 2, async_save=True, host_snapshot=True, host_warmup=True)
  arg = (ckpt.abstract_like(state), ckpt.abstract_like(ref)) if abstract_then_save_at_once else (state, ref)
  warm = ck.prepare(*arg)
  assert warm is not None
  if not abstract_then_save_at_once:
    out = warm.result()
    assert 'error' not in out
    assert out['leaves'] == len(jax.tree.leaves((state, ref)))
    assert out['bytes'] == sum(x.nbytes for x in jax.tree.leaves((state, ref)))
    assert _pinned_alive() <= before                   # every warm-up buffer freed again
    n_jit = ckpt._all_finite._cache_size()
    assert ckpt.params_finite(state.params)            # the program compiled ahead, not the jitted one
    bad = jax.tree.map(lambda x: x, state.params)
    bad['params']['model']['b'] = bad['params']['model']['b'].at[3].set(jnp.nan)
    assert not ckpt.params_finite(bad)
    assert ckpt._all_finite._cache_size() == n_jit
  assert ck.save(1, state, {'outer_step': 1, 'stage': 'rl'}, ref=ref)
  state, ref = _bump((state, ref))
  _finish_and_restore(ck, tmp_path, state, ref, want)


def test_prepare_does_nothing_without_a_host_snapshot_nor_by_default_on_cpu(tmp_path):
  state = _state()
  for kw in ({'host_snapshot': False, 'host_warmup': True}, {'host_snapshot': True}):
    ck = ckpt.Checkpointer(str(tmp_path / str(len(kw))), 1, 2, async_save=True, **kw)
    assert not ck.host_warmup and ck.prepare(state) is None
    ck.close()


def test_an_error_of_a_background_save_is_raised_by_wait(tmp_path):
  ck = ckpt.Checkpointer(str(tmp_path), 1, 2, async_save=True, host_snapshot=True)
  assert ck.save(1, _state(), {'outer_step': 1}, ref={'x': object()})   # Orbax refuses it in the save thread
  with pytest.raises(ValueError, match='Unsupported type'):
    ck.wait()
  ck.close()


def test_wait_says_it_is_still_finalizing(tmp_path, capsys):
  big = {'params': {'model': {'w': jnp.ones((2048, 2048))}}}     # 16 MB: its write outlasts 1 ms
  ck = ckpt.Checkpointer(str(tmp_path), 1, 2, async_save=True)
  assert ck.save(1, TrainState.create(big, TX, jax.random.PRNGKey(0)), {'outer_step': 1})
  ck.wait(progress_every=0.001)
  ck.close()
  assert 'checkpoint: still finalizing the last save in ' + str(tmp_path) in capsys.readouterr().out


def test_tree_checksum_is_exact_on_any_mesh_and_sees_one_bit_and_a_swap():
  state = _state()
  on_one = jax.device_put(state, jax.devices()[0])
  assert ckpt.tree_checksum(state) == ckpt.tree_checksum(on_one)
  w = np.asarray(state.params['params']['model']['w'])
  flipped = w.copy()
  flipped.view(np.uint32)[5, 3] ^= 1                   # one ulp
  swapped = w.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  for other in (flipped, swapped):
    p = jax.tree.map(lambda x: x, state.params)
    p['params']['model']['w'] = jnp.asarray(other)
    assert ckpt.tree_checksum(p) != ckpt.tree_checksum(state.params)
  bf = state.params['params']['lm_head']['k']
  assert ckpt.tree_checksum(bf) != ckpt.tree_checksum(bf.at[0, 0].add(1))


def test_reference_source():
  assert ckpt.reference_source(0.0, True) == ckpt.reference_source(0.0, False) == 'none'
  assert ckpt.reference_source(0.04, True) == 'init'
  assert ckpt.reference_source(0.04, False) == 'saved'


# ---------------------------------------------------------------------------------------------------------------
# the trainer: RL from the initial parameters (no SFT), one step, one checkpoint

def _rl_only(beta, seed=0):
  """The tiny GRPO preset on images, RL from the first step, small enough to compile fast."""
  from configs import common
  c = common.get_config_for('image', 'tiny_grpo')
  c.train.sft_steps, c.train.rl_steps, c.train.eval_examples = 0, 1, 0
  c.rl.prompts_per_batch, c.rl.group_size, c.rl.num_minibatches = 2, 2, 1
  c.sampling.max_new_tokens = 4
  c.rl.beta, c.seed = beta, seed
  c.checkpoint.every = 1
  return c


def _train(tmp_path_factory, beta, warm=False):
  """One RL step and its checkpoint; warm: an async host-snapshot save, the checkpointer's warm-up forced on
  (automatic on GPU only)."""
  from ral_jax.train import loop
  wd = str(tmp_path_factory.mktemp(f'rl_only_beta{beta}'))
  c = _rl_only(beta)
  c.checkpoint.async_save = warm
  t = loop.Trainer(c, wd)
  t.ckpt.host_warmup, compiled = warm, len(ckpt._finite_compiled)
  t.run()
  assert len(ckpt._finite_compiled) == compiled + warm        # the trainer's prepare() ran (or did nothing)
  return wd


def test_rl_from_the_initial_parameters_saves_no_reference_and_restores_it_exactly(tmp_path_factory):
  import orbax.checkpoint as ocp
  from ral_jax.train import build, loop, run_setup
  wd = _train(tmp_path_factory, 0.04, warm=True)
  step_dir = os.path.join(wd, 'checkpoints', '1')
  assert not os.path.exists(os.path.join(step_dir, 'ref'))
  t = loop.Trainer(_rl_only(0.04), wd)
  done, stage, state, ref, meta = t.restore_or_init()
  assert (done, stage, meta['ref']['source']) == (1, 'rl', 'init')
  assert meta['ref']['checksum'] == ckpt.tree_checksum(ref)
  initial = run_setup.restore_params(t.ctx)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(build.reference_of(initial))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  raw = ocp.StandardCheckpointer().restore(os.path.join(step_dir, 'state'))   # the state, read without the trainer
  flat = lambda tree: {jax.tree_util.keystr(k, simple=True, separator='/'): np.asarray(v)
                       for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = flat(state), flat(raw)
  assert sorted(got) == sorted(want)
  for k in got:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # other initial weights (another seed, HF checkpoint or init_checkpoint) would give another reference: refused
  other = jax.tree.map(lambda x: x.at[(0,) * x.ndim].add(1), initial)
  with pytest.raises(ValueError, match="re-derives its reference model from the run's initial parameters"):
    t._restored_reference(1, None, meta['ref'], other)
  with pytest.raises(ValueError, match='saved with rl.beta=0'):    # a beta = 0 checkpoint resumed with beta > 0
    t._restored_reference(1, None, {'source': 'none'}, initial)
  t.ckpt.close()


def test_a_beta_zero_run_holds_no_reference_and_resumes_without_one(tmp_path_factory):
  from ral_jax.train import loop
  wd = _train(tmp_path_factory, 0.0)            # rl_step with no reference at all
  assert not os.path.exists(os.path.join(wd, 'checkpoints', '1', 'ref'))
  t = loop.Trainer(_rl_only(0.0), wd)
  meta = t.ckpt.read_meta(1)
  assert meta['ref'] == {'source': 'none'} and t._restored_reference(1, None, meta['ref'], None) is None
  t.ckpt.close()
