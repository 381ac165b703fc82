"""Processor parity with transformers 4.57's Qwen2VLImageProcessor (the PIL/numpy one; torchvision is absent).

Images: `images=` path. Videos: the same class's (deprecated) `videos=` path, which applies the identical per-frame
resize / rescale / normalise and the temporal patchify with last-frame padding.
"""
import io

import numpy as np
import pytest
from PIL import Image

from ral_jax.data import media, processor

hf_ip = pytest.importorskip('transformers.models.qwen2_vl.image_processing_qwen2_vl')

MIN, MAX = 56 * 56, 28 * 28 * 80
CFG = processor.ProcessorConfig(image_min_pixels=MIN, image_max_pixels=MAX, video_min_pixels=MIN,
                                video_max_pixels=28 * 28 * 20)


def _hf(min_pixels, max_pixels):
  return hf_ip.Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)


@pytest.mark.parametrize('h,w', [(100, 37), (300, 500), (28, 28), (13, 90), (1000, 60), (224, 224)])
def test_image_matches_transformers(h, w):
  img = np.random.default_rng(h * 7 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
  ref = _hf(MIN, MAX)(images=[img], return_tensors='np')
  patches, grid = processor.process_image(img, CFG)
  assert tuple(ref['image_grid_thw'][0]) == grid
  assert patches.shape == ref['pixel_values'].shape == (np.prod(grid), 1176)
  np.testing.assert_allclose(patches, ref['pixel_values'], atol=1e-6, rtol=0)


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK'])
def test_image_modes_match_transformers(tmp_path, mode):
  rgb = np.random.default_rng(1).integers(0, 256, (61, 83, 3), dtype=np.uint8)
  pil = Image.fromarray(rgb).convert(mode)
  path = tmp_path / f'x.{"png" if mode != "CMYK" else "jpg"}'
  pil.save(path)
  with Image.open(path) as reloaded:
    ref = _hf(MIN, MAX)(images=[reloaded.copy()], return_tensors='np')
  patches, grid = processor.process_image(media.load_image(str(path)), CFG)
  assert tuple(ref['image_grid_thw'][0]) == grid
  np.testing.assert_allclose(patches, ref['pixel_values'], atol=1e-6, rtol=0)


@pytest.mark.parametrize('frames,h,w', [(4, 56, 56), (5, 60, 90), (1, 120, 40), (8, 240, 320)])
def test_video_matches_transformers_videos_path(frames, h, w):
  vid = np.random.default_rng(frames).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
  ref = _hf(CFG.video_min_pixels, CFG.video_max_pixels)(images=None, videos=[list(vid)], return_tensors='np')
  patches, grid = processor.process_video(vid, CFG)
  assert tuple(ref['video_grid_thw'][0]) == grid
  assert grid[0] == -(-frames // 2)
  np.testing.assert_allclose(patches, ref['pixel_values_videos'], atol=1e-6, rtol=0)


@pytest.mark.parametrize('h,w', [(1, 1), (27, 29), (4000, 30), (10, 1900), (5000, 5000), (333, 777)])
def test_smart_resize_matches_transformers(h, w):
  assert processor.smart_resize(h, w, 28, MIN, MAX) == hf_ip.smart_resize(h, w, 28, MIN, MAX)


def test_patch_layout_by_hand():
  """A patch holds C x tp x p x p values of one 14x14 square; patches of a 2x2 merge unit are consecutive."""
  cfg = processor.ProcessorConfig(image_min_pixels=1, image_max_pixels=56 * 56)
  x = np.random.default_rng(0).standard_normal((2, 56, 56, 3)).astype(np.float32)
  patches, (t, h, w) = processor.patchify(x, cfg)
  assert (t, h, w) == (1, 4, 4)
  # Patch 5 = merge unit (0, 1) [row-major over 2x2 units], inner index 1 -> rows 0..13, cols 42..55.
  want = x[:, 0:14, 42:56, :].transpose(3, 0, 1, 2).reshape(-1)
  np.testing.assert_array_equal(patches[5], want)
  # Patch 8 = merge unit (1, 0), inner index 0 -> rows 28..41, cols 0..13.
  np.testing.assert_array_equal(patches[8], x[:, 28:42, 0:14, :].transpose(3, 0, 1, 2).reshape(-1))


def test_aspect_ratio_error():
  with pytest.raises(ValueError, match='aspect ratio'):
    processor.smart_resize(10, 2500, 28, MIN, MAX)


def test_bad_budget_config():
  with pytest.raises(ValueError, match='image_min_pixels'):
    processor.ProcessorConfig(image_min_pixels=10, image_max_pixels=5)


def test_png_bytes_roundtrip(tmp_path):
  buf = io.BytesIO()
  Image.new('RGB', (30, 20), (10, 20, 30)).save(buf, format='PNG')
  (tmp_path / 'a.png').write_bytes(buf.getvalue())
  arr = media.load_image(str(tmp_path / 'a.png'))
  assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8 and tuple(arr[0, 0]) == (10, 20, 30)
