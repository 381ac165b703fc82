"""Image and video loading: Pillow images (any mode -> RGB) and PyAV video sampled at a target fps.

Video frame sampling (the qwen-vl-utils rule, restated): with N decodable frames at native rate r,
  n = N / r * fps                                 (frames at the target fps over the whole clip)
  n = clamp(n, min_frames, min(max_frames, N)),   then floored to an even number (temporal patch of 2)
  indices = round(linspace(0, N - 1, n))
  sample_fps = n / N * r,   second_per_grid_t = temporal_patch / sample_fps.
A clip of a single frame gives n = 1 (the processor repeats it to fill the temporal patch). Frame i is the i-th
frame in presentation order (packet pts sorted); sparse sampling of long clips seeks to keyframes.
Failures raise BadRecord: 'missing_media' (no such file), 'corrupt_media' (undecodable; a video whose container
index lists more frames than decode, e.g. a truncated MP4 with its index at the front), 'zero_frames' (no video
stream, or no decodable frame), 'media_over_budget' (an image of more than MAX_IMAGE_PIXELS pixels, refused from its
header before decoding: a decompression bomb of a few KB on disk).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import numpy as np

from ral_jax import paths
from ral_jax.data.badinput import BadRecord

SEEK_SPARSITY = 8  # seek when the clip has at least this many frames per sampled frame
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb warning threshold (PIL.Image.MAX_IMAGE_PIXELS)


@dataclasses.dataclass(frozen=True)
class VideoConfig:
  fps: float = 1.0
  max_frames: int = 128
  min_frames: int = 4

  def __post_init__(self):
    if self.fps <= 0 or self.max_frames < 2 or not 1 <= self.min_frames <= self.max_frames:
      raise ValueError(f'bad video sampling config {self}: need fps > 0, max_frames >= 2, '
                       '1 <= min_frames <= max_frames')


def _check_exists(path: str) -> None:
  if not paths.isfile(path):
    raise BadRecord('missing_media', f'no such file {path}')


def _source(path: str):
  """What Pillow / PyAV open: the path, or a file object for a URL (gs://...)."""
  return paths.open(path, 'rb') if paths.is_remote(path) else path


def load_image(path: str) -> np.ndarray:
  """uint8 [H,W,3]; Pillow's convert('RGB') for any other mode, as transformers' convert_to_rgb."""
  from PIL import Image
  _check_exists(path)
  try:
    with Image.open(_source(path)) as img:
      w, h = img.size
      if w * h > MAX_IMAGE_PIXELS:
        raise BadRecord('media_over_budget', f'image {path} is {w}x{h} = {w * h} pixels, above the decoding limit '
                        f'{MAX_IMAGE_PIXELS} (media.MAX_IMAGE_PIXELS)')
      img.load()
      rgb = img if img.mode == 'RGB' else img.convert('RGB')
      arr = np.asarray(rgb, np.uint8)
  except Image.DecompressionBombError as e:   # Image.open refuses above 2 * PIL.Image.MAX_IMAGE_PIXELS itself
    raise BadRecord('media_over_budget', f'image {path} is too large to decode: {e}') from e
  except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
    raise BadRecord('corrupt_media', f'cannot decode image {path}: {e}') from e
  if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
    raise BadRecord('corrupt_media', f'image {path} has shape {arr.shape}')
  return arr


def sample_indices(num_frames: int, native_fps: float, cfg: VideoConfig) -> np.ndarray:
  """Indices of the frames to keep (see module docstring)."""
  n = num_frames / native_fps * cfg.fps
  n = min(max(n, cfg.min_frames), min(cfg.max_frames, num_frames))
  n = max(1, 2 * math.floor(n / 2)) if num_frames >= 2 else 1
  return np.round(np.linspace(0, num_frames - 1, n)).astype(np.int64)


def _index(path: str):
  """(native fps, presentation-ordered frame pts or None, keyframe pts or None, frame count) from one demux pass
  (no decoding). The pts lists are None when some packet has no pts (then only sequential decoding is used)."""
  import av
  with av.open(_source(path)) as c:
    if not c.streams.video:
      raise BadRecord('zero_frames', f'{path} has no video stream')
    s = c.streams.video[0]
    rate = float(s.average_rate or s.guessed_rate or 0) or 1.0
    pts, keys = [], []
    for p in c.demux(s):
      if p.size:
        pts.append(p.pts)
        if p.is_keyframe:
          keys.append(p.pts)
    n = len(pts) or s.frames
  if not pts or any(p is None for p in pts) or any(k is None for k in keys):
    return rate, None, None, int(n)
  return rate, np.sort(np.asarray(pts, np.int64)), np.sort(np.asarray(keys, np.int64)), int(n)


def _decode_seek(path: str, keep: np.ndarray, pts: np.ndarray, keys: np.ndarray) -> Optional[List[np.ndarray]]:
  """Frames at indices `keep` by seeking to the keyframe before each one that lies beyond the decoder's position,
  then decoding forward to the frame with exactly that pts. None if the stream does not behave (the caller then
  decodes sequentially)."""
  import av
  out = {}
  with av.open(_source(path)) as c:
    s = c.streams.video[0]
    s.thread_type = 'AUTO'
    frames, last = None, None
    for idx in sorted(set(int(i) for i in keep)):
      target = int(pts[idx])
      k = np.searchsorted(keys, target, side='right') - 1
      if k < 0:
        return None
      if frames is None or last is None or target <= last or keys[k] > last:
        c.seek(int(keys[k]), stream=s, backward=True, any_frame=False)
        frames = c.decode(s)
      got = None
      for frame in frames:
        if frame.pts is None or frame.pts > target:
          return None
        last = frame.pts
        if frame.pts == target:
          got = frame.to_ndarray(format='rgb24')
          break
      if got is None:
        return None
      out[idx] = got
  return [out[int(i)] for i in keep]


def _decode(path: str, keep: np.ndarray) -> Tuple[List[np.ndarray], int]:
  """The frames at sorted indices `keep` (repeats allowed) and the number of frames decoded."""
  import av
  out, want, i = [], list(keep), 0
  with av.open(_source(path)) as c:
    s = c.streams.video[0]
    s.thread_type = 'AUTO'
    for frame in c.decode(s):
      if want and want[0] == i:
        arr = frame.to_ndarray(format='rgb24')
        while want and want[0] == i:
          out.append(arr)
          want.pop(0)
      i += 1
      if not want:
        break
  return out, i


def load_video(path: str, cfg: VideoConfig) -> Tuple[np.ndarray, float]:
  """(uint8 frames [n,H,W,3], sample_fps). Sparse sampling (at most one frame in SEEK_SPARSITY, several
  keyframes) seeks instead of decoding every frame; any inconsistency falls back to sequential decoding."""
  import av
  _check_exists(path)
  try:
    rate, pts, keys, total = _index(path)
    if total <= 0:
      raise BadRecord('zero_frames', f'video {path} has no frames')
    keep = sample_indices(total, rate, cfg)
    frames = None
    if pts is not None and len(pts) == total and len(keys) > 1 and total >= SEEK_SPARSITY * len(keep):
      frames = _decode_seek(path, keep, pts, keys)
    if frames is None:
      frames, decoded = _decode(path, keep)
      if len(frames) < len(keep):
        if decoded == 0:
          raise BadRecord('zero_frames', f'video {path} has no decodable frames')
        if pts is not None:   # the demuxed packets promised `total` frames: the file is damaged or truncated
          raise BadRecord('corrupt_media', f'video {path}: only {decoded} of its {total} demuxed frames decode '
                          f'({len(frames)} of the {len(keep)} sampled frames); truncated or damaged file?')
        total = decoded       # the header over-reported its frame count: resample on the true count
        keep = sample_indices(total, rate, cfg)
        frames, _ = _decode(path, keep)
    frames = np.stack(frames)  # ValueError if the frame size changes mid-stream
  except (av.error.FFmpegError, ValueError, OSError) as e:
    raise BadRecord('corrupt_media', f'cannot decode video {path}: {type(e).__name__}: {e}') from e
  return frames, len(keep) / total * rate
