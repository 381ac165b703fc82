"""Damaged checkpoints: a damaged newest Orbax step falls back to the newest intact one (saying which and why);
a truncated or NaN-holding safetensors file is refused at load naming the tensor; the skipped-update streak."""
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ral_jax.models import hf_io
from ral_jax.models.config import get_preset
from ral_jax.models.safetensors_io import SafetensorsFile, write_safetensors
from ral_jax.train import checkpoint as ckpt
from ral_jax.train import optim
from ral_jax.train.config import OptimConfig
from ral_jax.train.loop import Diverged, SkipStreak
from ral_jax.train.state import TrainState

TX = optim.make_optimizer(OptimConfig(lr=0.1))


def _state(seed):
  k = jax.random.PRNGKey(seed)
  return TrainState.create({'params': {'model': {'w': jax.random.normal(k, (32, 96))}}}, TX, jax.random.PRNGKey(3))


def _templates(step):
  del step
  return _state(0), None


@pytest.fixture()
def two_steps(tmp_path):
  ck = ckpt.Checkpointer(str(tmp_path), 1, 5, False)
  for s in (1, 2):
    assert ck.save(s, _state(s), {'outer_step': s, 'stage': 'sft', 'data_state': {}})
  ck.close()
  return tmp_path


def _data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True), key=os.path.getsize)


def _damage(root, kind):
  """Damages the newest step (2) or adds a damaged step 3; returns (damaged step, words the reason must hold)."""
  d = os.path.join(root, 'checkpoints')
  if kind == 'empty_dir':
    os.makedirs(os.path.join(d, '3'))
    return 3, 'empty'
  if kind == 'garbage':
    for name in ('state/_METADATA', 'state/manifest.ocdbt', 'meta/metadata', '_CHECKPOINT_METADATA'):
      os.makedirs(os.path.dirname(os.path.join(d, '3', name)), exist_ok=True)
      with open(os.path.join(d, '3', name), 'wb') as f:
        f.write(np.random.default_rng(0).bytes(300))
    return 3, 'does not restore'
  f = _data_file(os.path.join(d, '2'))
  if kind == 'truncated':
    data = open(f, 'rb').read()
    open(f, 'wb').write(data[:len(data) // 2])
    return 2, 'params'
  if kind == 'zeroed':
    open(f, 'wb').write(b'\0' * os.path.getsize(f))
    return 2, 'does not restore'
  if kind == 'meta_removed':
    shutil.rmtree(os.path.join(d, '2', 'meta'))
    return 2, "'meta' item is missing"
  raise ValueError(kind)


@pytest.mark.parametrize('kind', ['empty_dir', 'garbage', 'truncated', 'zeroed', 'meta_removed'])
def test_damaged_newest_step_falls_back_to_newest_intact(two_steps, kind, capsys):
  bad_step, why = _damage(str(two_steps), kind)
  ck = ckpt.Checkpointer(str(two_steps), 1, 5, False)
  step, state, ref, meta = ck.restore_newest_intact(_templates)
  good = 1 if bad_step == 2 else 2
  assert step == good and ref is None and meta['outer_step'] == good
  np.testing.assert_array_equal(state.params['params']['model']['w'], _state(good).params['params']['model']['w'])
  out = capsys.readouterr().out
  assert f'checkpoint step {bad_step}' in out and 'damaged and skipped' in out and why in out, out
  # set aside, so the resumed run can save that step number again
  assert os.path.isdir(os.path.join(ck.directory, f'{bad_step}.damaged'))
  assert bad_step not in ck.manager.all_steps()
  assert ck.save(bad_step, _state(7), {'outer_step': bad_step, 'stage': 'sft', 'data_state': {}})
  ck.wait()
  assert ck.latest_step() == bad_step
  ck.close()


def test_non_finite_tensor_in_a_checkpoint_is_refused_naming_it(two_steps, capsys):
  ck = ckpt.Checkpointer(str(two_steps), 1, 5, False)
  bad = _state(3)
  bad = bad.replace(params={'params': {'model': {'w': bad.params['params']['model']['w'].at[1, 2].set(jnp.nan)}}})
  ck.manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(bad),
                                            meta=ocp.args.JsonSave({'outer_step': 3})))   # bypasses save()'s check
  ck.wait()
  step, *_ = ck.restore_newest_intact(_templates)
  assert step == 2
  out = capsys.readouterr().out
  assert 'checkpoint step 3' in out and "params['params']['model']['w']" in out and 'NaN' in out
  ck.close()


def test_no_intact_step_stops_listing_every_reason_and_moves_nothing(two_steps):
  for s in ('1', '2'):
    shutil.rmtree(os.path.join(str(two_steps), 'checkpoints', s, 'meta'))
  ck = ckpt.Checkpointer(str(two_steps), 1, 5, False)
  with pytest.raises(ckpt.DamagedCheckpoint, match='step 2: .*meta.*step 1: .*meta'):
    ck.restore_newest_intact(_templates)
  assert sorted(ck.manager.all_steps()) == [1, 2]
  ck.close()


def test_empty_checkpoint_directory_is_a_fresh_start(tmp_path):
  ck = ckpt.Checkpointer(str(tmp_path), 1, 5, False)
  assert ck.restore_newest_intact(_templates) is None
  ck.close()


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
  x = np.arange(32 * 96, dtype=np.float32).reshape(32, 96)
  path = str(tmp_path / 'model.safetensors')
  write_safetensors(path, [('a.bias', (7,), 'F32', lambda: np.ones(7, np.float32)),
                           ('b.weight', (32, 96), 'F32', lambda: x)])
  np.testing.assert_array_equal(SafetensorsFile(path).get('b.weight'), x)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:-5000])
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'b\.weight' needs bytes .* truncated"):
    SafetensorsFile(path)


def test_nan_in_an_hf_checkpoint_is_refused_at_load_naming_the_tensor(tmp_path):
  from _model_ref import random_params
  cfg = get_preset('tiny')
  params = random_params(cfg, vision=True)
  hf_io.save_hf(jax.device_get(params), cfg, str(tmp_path))
  st = SafetensorsFile(str(tmp_path / 'model.safetensors'))
  name = next(n for n in st.keys() if n.endswith('layers.1.mlp.down_proj.weight'))
  dt, shape = st.header[name]
  tensors = [(n, st.header[n][1], st.header[n][0], (lambda n=n: np.array(st.get(n)))) for n in st.keys()]
  poisoned = np.array(st.get(name))
  poisoned.reshape(-1)[5] = np.nan
  tensors = [(n, s, d, (lambda: poisoned) if n == name else p) for n, s, d, p in tensors]
  write_safetensors(str(tmp_path / 'nan.safetensors'), tensors, st.metadata)
  del st
  os.replace(tmp_path / 'nan.safetensors', tmp_path / 'model.safetensors')
  with pytest.raises(ValueError, match=f"tensor '{name}' in .*model.safetensors holds 1 NaN"):
    hf_io.load_hf(str(tmp_path))


def test_skip_streak_stops_after_k_consecutive_skipped_updates():
  s = SkipStreak(limit=8)
  s.update(0.0, 4, 1)
  s.update(4.0, 4, 2)
  s.update(2.0, 4, 3)          # partly applied: the streak ends
  assert s.count == 0
  s.update(4.0, 4, 4)
  with pytest.raises(Diverged, match='step 5: the last 8 optimizer updates were all skipped.*max_skipped_updates'):
    s.update(4.0, 4, 5)
  off = SkipStreak(limit=0)
  for k in range(100):
    off.update(1.0, 1, k)
