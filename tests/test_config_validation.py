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
    assert run.rl.lambda_attn == 0
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
