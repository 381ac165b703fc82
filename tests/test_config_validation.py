"""Config presets and validation errors (configs/common.py, ral_jax/train/config.py)."""
import warnings

import pytest

from configs import common, image, video
from ral_jax.train import config as rc

PRESETS = ['', 'paper', 'grpo', 'ral', 'ral_zero', 'sft', 'distill',
           'tiny', 'tiny_grpo', 'tiny_ral', 'tiny_ral_zero', 'tiny_sft', 'tiny_distill']


def _manifest(c):
  if c.data.source == 'manifest':
    c.data.train_manifest = '/data/video_r1.json'
  return c


@pytest.mark.parametrize('arg', PRESETS)
@pytest.mark.parametrize('mod', [video, image])
def test_every_preset_builds(mod, arg):
  c = _manifest(mod.get_config(arg))
  with warnings.catch_warnings():
    warnings.simplefilter('error', rc.RALSingleUpdateWarning)
    run = rc.build(c, num_devices=8)
  assert run.algo == c.algo
  if arg.endswith('grpo'):
    assert run.objective.ral.lambda_attn == 0
  if 'ral_zero' in arg:
    assert run.rl.format == 'answer_only'
  if arg.endswith('sft'):
    assert run.loop.rl_steps == 0 and run.loop.sft_steps > 0


def test_presets_differ_where_promised():
  assert video.get_config('paper').model.preset == 'qwen2_5_vl_7b'
  assert video.get_config('paper_distill').distill.teacher_preset == 'qwen2_5_vl_32b'
  assert video.get_config('').train.sft_steps > 0 and video.get_config('').train.rl_steps > 0
  assert image.get_config('').data.task == 'image'


def test_unknown_preset_names_the_choices():
  with pytest.raises(ValueError, match='unknown preset'):
    video.get_config('tiny_ppo')


def test_single_update_with_ral_warns():
  c = video.get_config('tiny_ral')
  c.rl.num_minibatches = 1
  with pytest.warns(rc.RALSingleUpdateWarning, match='num_minibatches'):
    rc.build(c, num_devices=8)
  c.rl.lambda_attn = 0.0
  with warnings.catch_warnings():
    warnings.simplefilter('error', rc.RALSingleUpdateWarning)
    rc.build(c, num_devices=8)


@pytest.mark.parametrize('path,value,match', [
    ('rl.num_minibatches', 3, 'not divisible by rl.num_minibatches'),
    ('rl.group_size', 1, 'G >= 2'),
    ('rl.clip_eps_low', 1.5, 'rl.clip_eps_low'),
    ('rl.dual_clip', 0.5, 'rl.dual_clip'),
    ('rl.lambda_attn', -1.0, 'rl.lambda_attn'),
    ('rl.logprob_chunk', 0, 'logprob_chunk'),
    ('distill.kd_estimator', 'forward', 'kd_estimator'),
    ('sampling.temperature', -0.5, 'temperature'),
    ('sampling.top_p', 0.0, 'top_p'),
    ('model.remat_policy', 'everything', 'remat_policy'),
    ('model.record_layers', (-1, 0), 'record_layers'),
    ('rl.format', 'cot', 'style'),
    ('rl.kl_estimator', 'k4', 'kl_estimator'),
    ('rl.aggregation', 'sum', 'aggregation'),
    ('rl.advantage', 'ppo', 'advantage'),
    ('rl.rows', 'paper_rows', 'rows'),
    ('algo', 'dpo', 'algo'),
    ('model.preset', 'qwen9', 'model.preset'),
    ('optim.schedule', 'linear', 'schedule'),
    ('mesh.shape', (3, 1, 1), 'does not divide'),
    ('mesh.shape', (-1, -1, 1), 'at most one -1'),
    ('rl.group_size', 3, 'batch shards'),
    ('sft.batch_size', 3, 'sft.batch_size'),
    ('data.source', 'hub', 'data.source'),
    ('train.rl_steps', -1, 'rl_steps'),
])
def test_bad_config_says_what_to_change(path, value, match):
  c = video.get_config('tiny_ral')
  node = c
  *parents, leaf = path.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    rc.build(c, num_devices=8)


def test_batch_must_divide_mesh():
  c = video.get_config('tiny_ral')
  c.mesh.shape = (-1, 1, 1)  # 8 data shards; tiny mini-batch is 4
  with pytest.raises(ValueError, match='not divisible by the 8 batch shards'):
    rc.build(c, num_devices=8)


def test_manifest_source_needs_a_file():
  c = video.get_config('paper')
  with pytest.raises(ValueError, match='train_manifest'):
    rc.build(c, num_devices=8)


def test_unknown_keys_are_reported():
  c = video.get_config('tiny')
  c.rl.lamda_attn = 2.0
  with pytest.raises(ValueError, match='rl.lamda_attn'):
    rc.check_known_keys(c, common.base_config())


def test_single_update_can_be_an_error():
  c = video.get_config('tiny_ral')
  c.rl.num_minibatches = 1
  c.rl.allow_single_update = False
  with pytest.raises(ValueError, match='allow_single_update'):
    rc.build(c, num_devices=8)


def test_components_get_their_own_configs():
  """build returns the components' own frozen configs, with the ConfigDict's values."""
  from ral_jax.models.config import ModelConfig
  from ral_jax.rl import config as rlc
  from ral_jax.rollout.sampling import SamplingConfig
  c = video.get_config('tiny_distill')
  c.rl.kl_estimator, c.rl.dual_clip, c.rl.attn_aggregation = 'k2', 3.0, 'seq_mean_token_sum'
  c.distill.attention = False
  c.model.remat_policy = 'none'
  assert rc.build(c, num_devices=8).model.scan_layers is True
  c.model.scan_layers = False
  run = rc.build(c, num_devices=8)
  assert isinstance(run.model, ModelConfig) and run.model.remat_policy == 'none' and run.model.scan_layers is False
  assert isinstance(run.objective, rlc.ObjectiveConfig) and isinstance(run.sampling, SamplingConfig)
  assert run.objective.grpo.kl_estimator == 'k2' and run.objective.grpo.dual_clip == 3.0
  assert run.objective.ral_aggregation == 'seq_mean_token_sum'
  assert run.objective.distill.gamma_attn == 0.0            # distill.attention=False: the GKD baseline
  assert run.teacher.model == run.model and run.data.pipeline.tokenizer == 'embedded'
  assert run.objective.temperature == run.sampling.temperature == 1.0


def test_temperature_zero_is_greedy_at_t1_in_sampler_and_loss():
  c = video.get_config('tiny_ral')
  c.sampling.temperature = 0.0
  run = rc.build(c, num_devices=8)
  assert run.sampling.greedy and run.sampling.temperature == 1.0 and run.objective.temperature == 1.0


def test_every_objective_field_has_one_config_knob():
  """Each field of the objective's configs is read from exactly one ConfigDict key (rc.OBJECTIVE_KNOBS), which
  exists in configs/common.py: a new loss knob cannot be half wired."""
  import dataclasses
  from ral_jax.rl import config as rlc
  base = common.base_config()
  parts = {'grpo': rlc.GRPOConfig, 'ral': rlc.RALConfig, 'distill': rlc.DistillConfig,
           'advantage': rlc.AdvantageConfig, 'objective': rlc.ObjectiveConfig}
  derived = {('objective', 'grpo'), ('objective', 'ral'), ('objective', 'distill'), ('objective', 'temperature')}
  fields = {(p, f.name) for p, cls in parts.items() for f in dataclasses.fields(cls)} - derived
  assert fields == set(rc.OBJECTIVE_KNOBS)
  paths = [path for path, _ in rc.OBJECTIVE_KNOBS.values()]
  assert len(paths) == len(set(paths))
  for path in paths:
    section, key = path.split('.')
    assert key in base[section], path


@pytest.mark.parametrize('knob', ['clip_eps_low', 'clip_eps_high', 'dual_clip', 'kl_estimator', 'kd_estimator',
                                  'attn_aggregation', 'allow_single_update', 'max_response_length'])
def test_a_loss_knob_path_is_short(knob):
  """Outside its implementation in ral_jax/rl/, a loss knob appears in three files only: its default
  (configs/common.py), its typed field (ral_jax/rl/config.py) and its line in the boundary table
  (ral_jax/train/config.py)."""
  import os
  import re
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  found = set()
  for top in ('ral_jax', 'configs'):
    for d, _, files in os.walk(os.path.join(root, top)):
      for f in files:
        if f.endswith('.py'):
          path = os.path.relpath(os.path.join(d, f), root)
          with open(os.path.join(d, f)) as fh:
            if re.search(rf'\b{knob}\b', fh.read()):
              found.add(path)
  plumbing = {p for p in found if not (p.startswith('ral_jax/rl/') and p != 'ral_jax/rl/config.py')}
  assert plumbing <= {'configs/common.py', 'ral_jax/rl/config.py', 'ral_jax/train/config.py'}, plumbing


def test_config_error_fails_before_the_model_is_built(monkeypatch, tmp_path):
  from ral_jax.train import build, loop
  def no_model(*a, **k):
    raise AssertionError('the model was built before the config was validated')
  monkeypatch.setattr(build, 'init_model_params', no_model)
  c = video.get_config('tiny_ral')
  c.rl.clip_eps_low = 1.5
  with pytest.raises(ValueError, match='rl.clip_eps_low'):
    loop.Trainer(c, str(tmp_path))
