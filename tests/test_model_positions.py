"""3-D position ids vs transformers 4.57 `Qwen2_5_VLModel.get_rope_index`, and the fractional-second rule."""
import types

import numpy as np
import pytest
import torch
import transformers
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

from ral_jax.models import positions
from ral_jax.models.config import get_preset

CFG = get_preset('tiny')
M = CFG.vision.spatial_merge_size


def _hf_rope_index(ids, mask, media):
  """transformers' get_rope_index on a padded batch; media: per example list of (kind, (t,h,w), sec)."""
  hf_cfg = transformers.Qwen2_5_VLConfig(**CFG.to_hf())
  img = [g for ex in media for k, g, _ in ex if k == 1]
  vid = [g for ex in media for k, g, _ in ex if k == 2]
  sec = [s for ex in media for k, _, s in ex if k == 2]
  fake = types.SimpleNamespace(config=hf_cfg)
  pos, _ = hf.Qwen2_5_VLModel.get_rope_index(
      fake, torch.tensor(ids), torch.tensor(img) if img else None, torch.tensor(vid) if vid else None,
      torch.tensor(sec) if sec else None, torch.tensor(mask))
  return pos.numpy()


def _sequence(rng, pieces):
  """pieces: ints (text run lengths) or (kind, (t,h,w)) media; returns token ids."""
  out = []
  for p in pieces:
    if isinstance(p, int):
      out += rng.integers(0, 1000, p).tolist()
    else:
      kind, (t, h, w) = p
      pad = CFG.image_token_id if kind == 1 else CFG.video_token_id
      out += [CFG.vision_start_token_id] + [pad] * (t * h * w // M ** 2) + [CFG.vision_end_token_id]
  return out


def _batch(examples, sides, max_m=3):
  """examples: list of (pieces, media); sides: 'left'/'right' per example. Returns padded arrays."""
  rng = np.random.default_rng(0)
  seqs = [_sequence(rng, pieces) for pieces, _ in examples]
  T = max(len(s) for s in seqs) + 3
  ids = np.zeros((len(seqs), T), np.int64)
  mask = np.zeros((len(seqs), T), np.int64)
  for b, (s, side) in enumerate(zip(seqs, sides)):
    sl = slice(T - len(s), T) if side == 'left' else slice(0, len(s))
    ids[b, sl], mask[b, sl] = s, 1
  grid = np.zeros((len(seqs), max_m, 3), np.int32)
  kind = np.zeros((len(seqs), max_m), np.int32)
  sec = np.zeros((len(seqs), max_m), np.float32)
  for b, (_, media) in enumerate(examples):
    for j, (k, g, s) in enumerate(media):
      grid[b, j], kind[b, j], sec[b, j] = g, k, s
  return ids, mask, grid, kind, sec


def _examples():
  """Text + one image; two images of different sizes; a video (sec 2.0); image + two videos (sec 1.0, 2.0)."""
  im1, im2, v1, v2 = (1, 4, 6), (1, 6, 2), (3, 4, 4), (2, 2, 4)
  return [
      ([5, (1, im1), 7], [(1, im1, 0.0)]),
      ([3, (1, im1), 4, (1, im2), 6], [(1, im1, 0.0), (1, im2, 0.0)]),
      ([4, (2, v1), 5], [(2, v1, 2.0)]),
      ([2, (1, im2), 3, (2, v2), 2, (2, v1), 4], [(1, im2, 0.0), (2, v2, 1.0), (2, v1, 2.0)]),
  ]


@pytest.mark.parametrize('sides', [('left',) * 4, ('right',) * 4, ('left', 'right', 'right', 'left')])
def test_matches_transformers_padded_batch(sides):
  assert transformers.__version__ == '4.57.6'
  examples = _examples()
  ids, mask, grid, kind, sec = _batch(examples, sides)
  ours = positions.rope_index_batch(ids, mask, grid, kind, sec, CFG)
  want = _hf_rope_index(ids, mask, [media for _, media in examples])
  assert ours.dtype == np.int32 and ours.shape == (3,) + ids.shape
  np.testing.assert_array_equal(ours, want)


@pytest.mark.parametrize('side', ['left', 'right'])
def test_text_only_matches_transformers(side):
  ids, mask, grid, kind, sec = _batch([([9], []), ([4], [])], [side, side])
  ours = positions.rope_index_batch(ids, mask, grid, kind, sec, CFG)
  fake = types.SimpleNamespace(config=transformers.Qwen2_5_VLConfig(**CFG.to_hf()))
  want, _ = hf.Qwen2_5_VLModel.get_rope_index(fake, torch.tensor(ids), None, None, None, torch.tensor(mask))
  np.testing.assert_array_equal(ours, want.numpy())


def test_fractional_second_per_grid_t_follows_rule():
  """Video t=4 (grid 4x4 -> 2x2 merged), 0.5 s per temporal patch, tokens_per_second 2: t ids 0,1,2,3."""
  sec = 0.75  # t * 0.75 * 2 = 0, 1.5, 3, 4.5 -> floor 0, 1, 3, 4
  ids, mask, grid, kind, secs = _batch([([3, (2, (4, 4, 4)), 2], [(2, (4, 4, 4), sec)])], ['left'])
  pos = positions.rope_index(ids[0], mask[0], grid[0], kind[0], secs[0], CFG)
  real = pos[:, mask[0] == 1]
  # 3 text tokens + vision_start -> 0..3; the block starts at 4.
  np.testing.assert_array_equal(real[:, :4], np.tile(np.arange(4), (3, 1)))
  block = real[:, 4:4 + 16]
  np.testing.assert_array_equal(block[0], 4 + np.repeat([0, 1, 3, 4], 4))
  np.testing.assert_array_equal(block[1], 4 + np.tile([0, 0, 1, 1], 4))
  np.testing.assert_array_equal(block[2], 4 + np.tile([0, 1, 0, 1], 4))
  # vision_end then 2 text tokens continue from max (4 + 4) + 1 = 9.
  np.testing.assert_array_equal(real[:, 20:], np.tile(np.arange(9, 12), (3, 1)))
  assert (pos[:, mask[0] == 0] == 1).all()
  assert int(positions.text_positions_after(pos, mask[0])) == 12
  # transformers 4.57 truncates 0.75 -> 0: every frame at t = 4. Ours must differ from that.
  want = _hf_rope_index(ids, mask, [[(2, (4, 4, 4), sec)]])[:, 0]
  assert (want[0, mask[0] == 1][4:20] == 4).all() and not np.array_equal(pos, want)


def test_text_positions_after_batched_numpy_and_jax():
  import jax.numpy as jnp
  examples = _examples()
  ids, mask, grid, kind, sec = _batch(examples, ('left', 'right', 'left', 'right'))
  pos = positions.rope_index_batch(ids, mask, grid, kind, sec, CFG)
  nxt = positions.text_positions_after(pos, mask)
  want = [pos[:, b, mask[b] == 1].max() + 1 for b in range(len(examples))]
  np.testing.assert_array_equal(nxt, want)
  np.testing.assert_array_equal(np.asarray(positions.text_positions_after(jnp.asarray(pos), jnp.asarray(mask))), want)


def test_errors_name_the_problem():
  ids, mask, grid, kind, sec = _batch([([3, (1, (1, 4, 4)), 2], [(1, (1, 4, 4), 0.0)])], ['left'])
  with pytest.raises(ValueError, match='media_kind says video'):
    positions.rope_index(ids[0], mask[0], grid[0], np.array([2, 0, 0]), sec[0], CFG)
  with pytest.raises(ValueError, match='consecutive pad tokens'):
    positions.rope_index(ids[0], mask[0], np.array([[1, 4, 6]]), [1], [0.0], CFG)
  with pytest.raises(ValueError, match='fewer media'):
    positions.rope_index(ids[0], mask[0], np.zeros((0, 3)), [], [], CFG)
  with pytest.raises(ValueError, match='more media'):
    positions.rope_index(ids[0], mask[0], np.array([[1, 4, 4], [1, 2, 2]]), [1, 1], [0, 0], CFG)
  with pytest.raises(ValueError, match='divisible'):
    positions.rope_index(ids[0], mask[0], np.array([[1, 3, 4]]), [1], [0.0], CFG)


@pytest.mark.parametrize('sec', [0.7, 1 / 3, 0.5, 1.5, 2.0])
def test_fractional_times_match_the_original_float32_formula(sec):
  """t index = long(arange(t) * second_per_grid_t * tokens_per_second) in float32 torch (the pre-4.50 code)."""
  t = 10
  ids, mask, grid, kind, secs = _batch([([1, (2, (t, 2, 2)), 1], [(2, (t, 2, 2), sec)])], ['right'])
  pos = positions.rope_index(ids[0], mask[0], grid[0], kind[0], secs[0], CFG)
  want = (torch.arange(t).view(-1, 1) * torch.tensor(sec, dtype=torch.float32)
          * CFG.vision.tokens_per_second).long().flatten().numpy()
  np.testing.assert_array_equal(pos[0, 2:2 + t] - 2, want)
