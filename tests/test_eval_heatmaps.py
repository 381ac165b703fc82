"""Attention heat maps: pixels rebuilt from HF-order patches, visual tokens mapped to the right place."""
import os

import numpy as np
import pytest

from ral_jax.eval import heatmaps
from ral_jax.models.config import get_preset


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_frames_from_patches_inverts_transformers_image_processor():
  from transformers import Qwen2VLImageProcessor
  img = _image(56, 84)
  proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 84 * 4)
  out = proc(images=[img], return_tensors='np')
  grid = out['image_grid_thw']
  assert grid.tolist() == [[1, 4, 6]]
  frames = heatmaps.frames_from_patches(out['pixel_values'], grid, [1])
  assert len(frames) == 1 and frames[0].shape == (2, 56, 84, 3)
  np.testing.assert_allclose(frames[0][0].astype(int), img.astype(int), atol=1)
  np.testing.assert_array_equal(frames[0][0], frames[0][1])  # an image is its frame repeated


def test_frames_from_patches_video_and_padding():
  from ral_jax.data import processor
  cfg = processor.ProcessorConfig(video_min_pixels=28 * 28, video_max_pixels=56 * 56)
  video = np.stack([_image(56, 56, s) for s in range(4)])
  pv, grid = processor.process_video(video, cfg)
  assert tuple(grid) == (2, 4, 4)
  padded = np.concatenate([pv, np.full((10, pv.shape[1]), 9.0, np.float32)])  # padding rows are ignored
  frames = heatmaps.frames_from_patches(padded, [grid, (0, 0, 0)], [2, 0])
  assert len(frames) == 1
  np.testing.assert_allclose(frames[0].astype(int), video.astype(int), atol=1)


def test_split_visual_places_tokens_in_merged_grid_order():
  grid = np.array([[1, 4, 6], [2, 4, 4], [0, 0, 0]])
  kinds = np.array([1, 2, 0])
  n_img, n_vid = 1 * 2 * 3, 2 * 2 * 2
  attn = np.zeros(n_img + n_vid + 5)            # 5 padding tokens at the end
  attn[1 * 3 + 2] = 1.0                         # image token at merged row 1, col 2
  attn[n_img + (1 * 2 + 0) * 2 + 1] = 2.0       # video: temporal patch 1, row 0, col 1
  img, vid = heatmaps.split_visual(attn, grid, kinds, merge=2)
  assert img.shape == (1, 2, 3) and vid.shape == (2, 2, 2)
  assert img[0, 1, 2] == 1.0 and img.sum() == 1.0
  assert vid[1, 0, 1] == 2.0 and vid.sum() == 2.0
  with pytest.raises(ValueError, match='visual weights'):
    heatmaps.split_visual(attn[:n_img + 3], grid, kinds)


def test_answer_visual_attention_picks_visual_keys_and_weights_rows():
  ids = np.array([5, 9, 9, 9, 8, 7, 7])      # 9 = image pad token, 8 = video pad token
  policy = np.array([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0],
                     [0.0, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0],
                     [9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
  got = heatmaps.answer_visual_attention(policy, ids, [1, 1, 0], (9, 8))
  np.testing.assert_allclose(got, [0.35, 0.15, 0.2, 0.25])
  got = heatmaps.answer_visual_attention(policy, ids, [0, 1, 0], (9, 8))
  np.testing.assert_allclose(got, [0.5, 0.0, 0.0, 0.5])
  with pytest.raises(ValueError, match='select no row'):
    heatmaps.answer_visual_attention(policy, ids, [0, 0, 0], (9,))


def test_render_one_png_per_image_and_per_video_step_hot_spot_in_place(tmp_path):
  from PIL import Image
  from ral_jax.data import processor
  cfg = processor.ProcessorConfig(image_min_pixels=28 * 28, image_max_pixels=56 * 84, video_min_pixels=28 * 28,
                                  video_max_pixels=56 * 56)
  grey_img = np.full((56, 84, 3), 128, np.uint8)
  pv_i, g_i = processor.process_image(grey_img, cfg)
  pv_v, g_v = processor.process_video(np.full((4, 56, 56, 3), 128, np.uint8), cfg)
  pv = np.concatenate([pv_i, pv_v])
  grid, kinds = np.array([g_i, g_v]), np.array([1, 2])
  attn = np.full(6 + 8, 1e-3)
  attn[0 * 3 + 2] = 0.5          # image: top-right merged token (pixels 0..27 x 56..83)
  attn[6 + 4 + 3] = 0.3          # video: second temporal step, bottom-right token
  paths, images = heatmaps.render(str(tmp_path), 'ex0', pv, grid, kinds, attn, title='test', total_mass=1.0)
  assert [os.path.basename(p) for p in paths] == ['ex0_m0.png', 'ex0_m1_t0.png', 'ex0_m1_t1.png']
  assert all(Image.open(p).size[0] > 0 for p in paths)
  img, v0, v1 = images
  assert img.shape == (56, 84, 3) and v1.shape == (56, 56, 3)
  hot = lambda a: np.unravel_index(np.argmax(a[..., 0].astype(int) - a[..., 2].astype(int)), a.shape[:2])  # noqa: E731
  r, c = hot(img)
  assert r < 28 and c >= 56
  r, c = hot(v1)
  assert r >= 28 and c >= 28
  # both frames of the video share one colour scale: the quiet step stays blue (cold) everywhere
  assert (v0[..., 2].astype(int) > v0[..., 0].astype(int)).all()


def test_render_batch_with_tensorboard_writer(tmp_path):
  cfg = get_preset('tiny')
  from ral_jax.data import processor
  pcfg = processor.ProcessorConfig(image_min_pixels=28 * 28, image_max_pixels=56 * 56)
  pv, g = processor.process_image(_image(56, 56), pcfg)
  s = 9
  ids = np.array([[3, cfg.image_token_id, cfg.image_token_id, cfg.image_token_id, cfg.image_token_id, 4, 5, 6, 7]] * 2)
  policy = np.random.default_rng(0).dirichlet(np.ones(s), size=(2, 3)).astype(np.float32)
  batch = {'input_ids': ids, 'pixel_values': np.stack([pv, pv]), 'grid_thw': np.array([[g], [g]]),
           'media_kind': np.array([[1], [1]])}

  class FakeWriter:
    def __init__(self):
      self.calls = []

    def add_image(self, tag, img, step, dataformats):
      self.calls.append((tag, img.shape, step, dataformats))

  w = FakeWriter()
  out = heatmaps.render_batch(str(tmp_path), 'before', batch, policy, np.array([[1, 1, 0], [0, 0, 1]]), cfg,
                              examples=(0, 1), tb_writer=w, step=3)
  assert sorted(out) == [0, 1] and all(os.path.exists(p) for ps in out.values() for p in ps)
  assert w.calls == [('attention/before_ex0_m0', (56, 56, 3), 3, 'HWC'), ('attention/before_ex1_m0', (56, 56, 3), 3, 'HWC')]


def test_render_outlines_evidence_shares_one_scale_and_writes_caption(tmp_path):
  from PIL import Image
  from ral_jax.data import processor
  cfg = processor.ProcessorConfig(image_min_pixels=28 * 28, image_max_pixels=56 * 84)
  pv, g = processor.process_image(np.full((56, 84, 3), 128, np.uint8), cfg)
  pv2, g2 = processor.process_image(np.full((56, 84, 3), 128, np.uint8), cfg)
  attn = np.full(12, 0.01)
  attn[4] = 0.2                       # image 0, bottom-middle token
  attn[6 + 0] = 0.02                  # image 1: weak everywhere -> must stay cold on the shared scale
  ev = np.zeros(12, bool)
  ev[4] = True
  paths, (img0, img1) = heatmaps.render(str(tmp_path), 'ex', np.concatenate([pv, pv2]), np.array([g, g2]),
                                        np.array([1, 1]), attn, evidence_v=ev, caption='Q: where?\nreference: B',
                                        title='t', total_mass=1.0)
  white = (img0 == 255).all(-1)
  assert white[28, 28:56].all() and white[55, 28:56].all() and white[28:56, 28].all()   # outline of the token
  assert not white[:27].any() and not white[:, :27].any()                                 # nowhere else
  assert (img1[..., 2].astype(int) > img1[..., 0].astype(int)).all()                     # cold: shared scale
  big = Image.open(paths[0])
  assert big.size[0] > 256                                                                # colour bar beside it
