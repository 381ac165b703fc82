"""Qwen2.5-VL visual preprocessing in numpy + Pillow (runs in Grain workers).

Matches transformers 4.57's `Qwen2VLImageProcessor` (the PIL/numpy one) for images and its `videos=` path for
videos:
  1. smart_resize(h, w): round h, w to multiples of factor = patch * merge (28); if the area exceeds max_pixels
     scale down by beta = sqrt(h*w / max_pixels) and floor to the factor; if below min_pixels scale up by
     beta = sqrt(min_pixels / (h*w)) and ceil. Aspect ratio above 200 is an error.
  2. resize with Pillow BICUBIC (uint8 RGB in, uint8 out; no reducing_gap), as transformers.image_transforms.resize.
  3. x = float32(uint8 * float64(1/255)); x = (x - mean) / std in float32 (OPENAI CLIP mean/std); computed as
     a 256-entry table per channel, applied after patchifying the bytes (same values, less memory traffic).
  4. frames padded to a multiple of temporal_patch (last frame repeated); patchify
     [F, H, W, C] -> [t, tp, h/m, m, p, w/m, m, p, C] -> [t, h/m, w/m, m, m, C, tp, p, p] -> [t*h*w, C*tp*p*p],
     i.e. merge-unit-major order with each patch flattened channel-major (C, tp, p, p): patch_dim = 1176.
  grid_thw = (t, h, w) in patches. Video: second_per_grid_t = temporal_patch / sample_fps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
  """Pixel budgets per image and per video frame (paper: images 128..5120 patches of 28x28 px, video frames at
  most 128 x 28 x 28 px, as Video-R1/qwen-vl-utils; the embedded default uses much smaller ones)."""
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  image_min_pixels: int = 128 * 28 * 28
  image_max_pixels: int = 5120 * 28 * 28
  video_min_pixels: int = 4 * 28 * 28
  video_max_pixels: int = 128 * 28 * 28
  image_mean: Tuple[float, float, float] = CLIP_MEAN
  image_std: Tuple[float, float, float] = CLIP_STD

  def __post_init__(self):
    for kind in ('image', 'video'):
      lo, hi = getattr(self, f'{kind}_min_pixels'), getattr(self, f'{kind}_max_pixels')
      if not 0 < lo <= hi:
        raise ValueError(f'{kind}_min_pixels={lo} must be positive and <= {kind}_max_pixels={hi}')

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  @staticmethod
  def from_vision(vcfg, **budgets) -> 'ProcessorConfig':
    """Patch geometry from a models.config.VisionConfig, budgets from keyword arguments."""
    return ProcessorConfig(patch_size=vcfg.patch_size, temporal_patch_size=vcfg.temporal_patch_size,
                           merge_size=vcfg.spatial_merge_size, **budgets)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Tuple[int, int]:
  """(h, w) multiples of factor, area within [min_pixels, max_pixels], aspect ratio kept (Qwen2-VL rule)."""
  if min(height, width) <= 0:
    raise ValueError(f'image of size {height}x{width} is empty')
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f'aspect ratio {max(height, width) / min(height, width):.1f} above 200')
  h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [F,H,W,3] -> uint8 [F,height,width,3] with Pillow bicubic."""
  from PIL import Image
  if frames.shape[1:3] == (height, width):
    return frames
  return np.stack([np.asarray(Image.fromarray(f).resize((width, height), resample=Image.BICUBIC)) for f in frames])


def normalize_table(cfg: ProcessorConfig) -> np.ndarray:
  """[C*256] float32: entry c*256 + v = (float32(v * float64(1/255)) - mean[c]) / std[c], the exact value
  transformers computes for byte v of channel c (rescale in float64, cast, then normalise in float32)."""
  levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
  mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
  return ((levels[None] - mean[:, None]) / std[:, None]).reshape(-1)


def normalize(frames: np.ndarray, cfg: ProcessorConfig) -> np.ndarray:
  """uint8 [..., C] -> float32 (x/255 - mean) / std, bit-identical to transformers' rescale + normalize."""
  c = frames.shape[-1]
  return normalize_table(cfg)[frames.astype(np.uint16) + (256 * np.arange(c, dtype=np.uint16))]


def patchify(x: np.ndarray, cfg: ProcessorConfig) -> Tuple[np.ndarray, Tuple[int, int, int]]:
  """[F,H,W,C] (F a multiple of temporal_patch; any dtype) -> patches [t*h*w, C*tp*p*p], grid (t, h, w)."""
  f, hh, ww, c = x.shape
  p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  t, h, w = f // tp, hh // p, ww // p
  x = x.reshape(t, tp, h // m, m, p, w // m, m, p, c)
  x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
  return np.ascontiguousarray(x).reshape(t * h * w, c * tp * p * p), (t, h, w)


def _process(frames: np.ndarray, cfg: ProcessorConfig, min_pixels: int, max_pixels: int):
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f'expected uint8 frames [F,H,W,3], got {frames.dtype} {frames.shape}')
  h, w = smart_resize(frames.shape[1], frames.shape[2], cfg.factor, min_pixels, max_pixels)
  frames = resize_frames(frames, h, w)
  rem = frames.shape[0] % cfg.temporal_patch_size
  if rem:
    frames = np.concatenate([frames, np.repeat(frames[-1:], cfg.temporal_patch_size - rem, axis=0)])
  # Patchify the bytes first (4x less memory traffic), then normalise through the table: patch values are
  # channel-major (C, tp, p, p), so channel c occupies the c-th block of tp*p*p values of every patch.
  u8, grid = patchify(frames, cfg)
  n, c = u8.shape[0], frames.shape[-1]
  idx = u8.reshape(n, c, -1).astype(np.uint16) + (256 * np.arange(c, dtype=np.uint16))[None, :, None]
  return normalize_table(cfg)[idx].reshape(n, -1), grid


def process_image(image: np.ndarray, cfg: ProcessorConfig) -> Tuple[np.ndarray, Tuple[int, int, int]]:
  """uint8 [H,W,3] -> (patches [h*w, patch_dim] float32, grid (1, h, w)); the image fills both temporal slots."""
  return _process(image[None], cfg, cfg.image_min_pixels, cfg.image_max_pixels)


def process_video(frames: np.ndarray, cfg: ProcessorConfig) -> Tuple[np.ndarray, Tuple[int, int, int]]:
  """uint8 [F,H,W,3] -> (patches [t*h*w, patch_dim] float32, grid (t, h, w)), t = ceil(F / temporal_patch)."""
  return _process(frames, cfg, cfg.video_min_pixels, cfg.video_max_pixels)


def num_merged_tokens(grid: Tuple[int, int, int], cfg: ProcessorConfig) -> int:
  t, h, w = grid
  return t * h * w // cfg.merge_size ** 2
