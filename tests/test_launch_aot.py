"""Ahead-of-time compile check: topology parsing, the CPU fallback, and a real compile of the RL step."""
import importlib.util

import pytest

from ral_jax import aot


def test_parse_topology():
  assert aot.parse_topology('v5e:4x4') == ('v5e', (4, 4), 16)
  assert aot.parse_topology('v4:2x2x2') == ('v4', (2, 2, 2), 8)
  assert aot.parse_topology('v3:2x2') == ('v3', (2, 2), 8)      # two TensorCores per v3 chip
  assert aot.parse_topology('V5P-2x2x4') == ('v5p', (2, 2, 4), 16)
  with pytest.raises(ValueError, match='GENERATION:AxBxC'):
    aot.parse_topology('v5e')


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is not None, reason='libtpu installed: no fallback')
def test_topology_without_libtpu_falls_back_to_labelled_fake_cpu_mesh():
  target = aot.choose_target('v5e:2x2')
  assert target.fake and len(target.devices) == 4 and target.hbm_gib is None
  assert 'FAKE CPU MESH of 4 devices' in target.label and 'v5e:2x2' in target.label
  assert "pip install 'jax[tpu]==0.10.2'" in target.label


def test_fake_cpu_mesh_needs_enough_devices():
  with pytest.raises(RuntimeError, match='xla_force_host_platform_device_count=64'):
    aot.fake_cpu_target(64)     # conftest started JAX with 8 devices
  with pytest.raises(ValueError, match='--topology'):
    aot.choose_target('', 0)


def test_compile_rl_step_on_fake_mesh_reports_memory():
  from configs import video
  config = video.get_config('tiny_ral')
  config.mesh.shape = (2, 1, 1)
  target = aot.choose_target('', 2)
  stats = aot.compile_steps(config, target, stages=('rl',), prompt_len=48, response_len=8, patches=16)
  s = stats['rl']
  assert s['argument'] > 0 and s['peak_estimate'] >= s['argument'] - s['alias']
  assert s['alias'] > 0          # the train state is donated
  text = aot.format_report(target, stats, 'Tp=48')
  assert 'FAKE CPU MESH of 2 devices' in text and text.splitlines()[3].startswith('rl')


def test_report_verdicts_and_out_of_memory():
  gib = 2 ** 30
  ok = {'argument': 10 * gib, 'output': 10 * gib, 'alias': 10 * gib, 'temp': 5 * gib, 'generated_code': 0,
        'peak_estimate': 15 * gib}
  big = dict(ok, temp=100 * gib, peak_estimate=110 * gib)
  tpu = aot.Target([], 'TPU v5p:2x2x2 (8 devices, compile-only)', 95, False)
  text = aot.format_report(tpu, {'score': ok, 'rl': big}, 'Tp=1')
  assert 'fits' in text.splitlines()[3] and 'DOES NOT FIT in 95 GiB' in text.splitlines()[4]
  assert aot.fits(tpu, {'score': ok}) and not aot.fits(tpu, {'score': ok, 'rl': big})
  oom = {'sft': {'error': 'RESOURCE_EXHAUSTED: Ran out of memory on HBM'}}
  assert 'sft     DOES NOT FIT: RESOURCE_EXHAUSTED' in aot.format_report(tpu, oom, '')
  assert not aot.fits(tpu, oom)
  fake = aot.Target([], 'FAKE CPU MESH', None, True)
  assert aot.fits(fake, {'rl': big})        # no HBM figure for a fake mesh: no verdict


def _tiny(preset='tiny_ral'):
  from configs import video
  return video.get_config(preset)


def test_aot_compiles_the_trainers_state_layout():
  """The AOT check and the trainer build the RL state through the same constructor: a tiny preset on an
  fsdp x tensor mesh of 8 fake devices: the state the trainer builds has the shardings the AOT compile takes, Adam moments sharded
  like their parameters, and the donated state returned on the shardings it came in on."""
  import jax
  from ral_jax import sharding
  from ral_jax.train import build, optim
  from ral_jax.train import config as run_config
  config = _tiny()
  config.mesh.shape = (1, 4, 2)
  target = aot.choose_target('', 8)
  exes = {}
  aot.compile_steps(config, target, stages=('rl',), prompt_len=48, response_len=8, patches=16, compiled=exes)
  aot_in, aot_out = exes['rl'].input_shardings[0][0], exes['rl'].output_shardings[0]

  # The trainer's way: real parameters on the mesh, create_state, make_steps, its update lowered on that state.
  run = run_config.build(config, 8, warn=False)
  mesh, rules = sharding.make_mesh(run.mesh.shape), sharding.logical_rules(run.mesh.rules)
  cfg = run.model
  params = build.init_model_params(cfg, mesh, rules, seed=0)
  state = build.create_state(params, optim.make_optimizer(run.rl_optim), 0)
  trainer_sh = build.state_shardings_of(state)
  steps = build.make_steps(run, cfg, 'rl', trainer_sh)
  assert isinstance(steps.update, sharding.MeshJit)

  def same(a, b, x):
    assert a.is_equivalent_to(b, x.ndim), (a, b, x.shape)
  leaves = jax.tree.leaves(state)
  for x, a, b, c in zip(leaves, jax.tree.leaves(trainer_sh), jax.tree.leaves(aot_in), jax.tree.leaves(aot_out)):
    same(a, b, x)
    same(a, c, x)
  assert len(jax.tree.leaves(aot_in)) == len(leaves)
  # Adam's moments follow the parameters: the embedding is split over fsdp, its moments too.
  emb = state.params['model']['embed_tokens']['embedding']
  assert 'fsdp' in str(emb.sharding.spec)
  mus = [x for x in jax.tree.leaves(state.opt_state) if x.shape == emb.shape]
  assert mus and all(m.sharding.is_equivalent_to(emb.sharding, 2) for m in mus)
