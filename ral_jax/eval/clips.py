"""Clip files for records the data pipeline cannot read directly: frame folders and clip bounds (MVBench).

The data pipeline decodes a media path that is one video file, whole. Two benchmark layouts need more:
  * a directory of frames (MVBench Episodic Reasoning: tvqa/frames_fps3_hq/<clip>/00001.jpg ..., taken at
    record['frames_fps']), and
  * a clip of a longer video (record['segment'] = [start_s, end_s]; MVBench Action Sequence, Action Prediction,
    Object Interaction, Action Localization, Episodic Reasoning).
`materialize(record, cache_dir)` writes that clip once as an H.264 mp4 (crf 4, near-lossless; mpeg4 where
libx264 is missing) under <cache_dir>/clips/, named by a hash of the source path, its size and mtime, the bounds
and the rate, and returns the record pointing at it. Frames of a folder are sorted by the number in their name;
with bounds the frames kept are round(start * fps) .. round(end * fps) (1-based frame numbers, MVBench's rule),
clipped to the folder. From a video file, the frames whose presentation time lies in [start, end] are kept at
the video's own rate. The dataset folder is only read.
"""
from __future__ import annotations

import hashlib
import itertools
import socket
import os
import re
from fractions import Fraction
from typing import Iterable, List, Optional, Tuple

import numpy as np

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


class ClipError(ValueError):
  """The clip cannot be made; args[0] is the short reason that gets counted."""


def needs_clip(record: dict) -> bool:
  return record.get('data_type') == 'video' and (bool(record.get('segment')) or bool(record.get('frames_fps')))


def _key(path: str, segment, fps) -> str:
  st = os.stat(path)
  raw = f'{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{segment}|{fps}'
  return hashlib.sha1(raw.encode()).hexdigest()[:20]


def _frame_files(folder: str) -> List[str]:
  names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)]
  num = lambda n: (int(m.group(0)) if (m := re.search(r'\d+', n)) else -1, n)
  return [os.path.join(folder, n) for n in sorted(names, key=num)]


def _even(frame: np.ndarray) -> np.ndarray:
  h, w = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
  return np.ascontiguousarray(frame[:h, :w, :3])


def _write(out: str, frames: Iterable[np.ndarray], rate) -> int:
  """Streams frames into an mp4 at `rate`; returns the number written (the file is removed when 0)."""
  import av
  codec = 'libx264' if 'libx264' in av.codecs_available else 'mpeg4'
  tmp = f'{out}.{socket.gethostname()}.{os.getpid()}.tmp.mp4'   # hosts may share the cache
  frames = iter(frames)
  first = next(frames, None)
  if first is None:
    return 0
  n, stream = 0, None
  with av.open(tmp, 'w') as container:
    for f in itertools.chain([first], frames):
      f = _even(f)
      if stream is None:
        stream = container.add_stream(codec, rate=Fraction(rate).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = f.shape[1], f.shape[0], 'yuv420p'
        stream.options = {'crf': '4'} if codec == 'libx264' else {'qscale': '1'}
      elif f.shape[:2] != (stream.height, stream.width):
        raise ClipError('frame size changes')
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
        container.mux(packet)
      n += 1
    if stream is not None:
      for packet in stream.encode():
        container.mux(packet)
  os.replace(tmp, out)
  return n


def _folder_frames(folder: str, fps: float, segment) -> Iterable[np.ndarray]:
  from PIL import Image
  files = _frame_files(folder)
  if not files:
    raise ClipError('no frames in folder')
  if segment:
    first = max(1, int(round(segment[0] * fps)))
    last = min(len(files), max(first, int(round(segment[1] * fps))))
    files = files[first - 1:last]
  for f in files:
    with Image.open(f) as im:
      yield np.asarray(im.convert('RGB'), np.uint8)


def _video_frames(path: str, segment) -> Tuple[Iterable[np.ndarray], float]:
  import av
  container = av.open(path)
  stream = container.streams.video[0]
  rate = float(stream.average_rate or stream.guessed_rate or 25)
  start, end = float(segment[0]), float(segment[1])

  def gen():
    try:
      for frame in container.decode(stream):
        t = float(frame.pts * stream.time_base) if frame.pts is not None else None
        if t is None:
          continue
        if t > end + 1e-6:
          break
        if t >= start - 1e-6:
          yield frame.to_ndarray(format='rgb24')
    finally:
      container.close()
  return gen(), rate


def materialize(record: dict, cache_dir: str) -> dict:
  """The record with 'path' at a clip file in `cache_dir` (made once) when it needs one; else the record."""
  if not needs_clip(record):
    return record
  src = record['path']
  segment = record.get('segment')
  fps = record.get('frames_fps')
  if not os.path.exists(src):
    return record   # the pipeline counts it as missing media
  if segment and not float(segment[1]) > float(segment[0]) >= 0:
    raise ClipError('bad clip bounds')
  out = os.path.join(cache_dir, 'clips', _key(src, segment, fps) + '.mp4')
  if not os.path.exists(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
      if os.path.isdir(src):
        if not fps:
          raise ClipError('frame folder without frames_fps')
        n = _write(out, _folder_frames(src, float(fps), segment), float(fps))
      else:
        frames, rate = _video_frames(src, segment)
        n = _write(out, frames, rate)
    except ClipError:
      raise
    except Exception as e:  # noqa: BLE001 - an undecodable source is one bad record
      raise ClipError(f'cannot cut clip ({type(e).__name__})') from e
    if n == 0:
      raise ClipError('no frame inside the clip bounds')
  return dict(record, path=out, source_path=src)


def materialize_all(records: List[dict], cache_dir: str) -> Tuple[List[dict], dict]:
  """(records with clip paths, {'clip: <reason>': count} of those that could not be cut)."""
  out, bad = [], {}
  for r in records:
    try:
      out.append(materialize(r, cache_dir))
    except ClipError as e:
      bad[f'clip: {e.args[0]}'] = bad.get(f'clip: {e.args[0]}', 0) + 1
  return out, bad


def frames_of(path: str) -> Optional[int]:
  """Number of decodable frames of a video file (tests and checks)."""
  import av
  with av.open(path) as c:
    return sum(1 for _ in c.decode(video=0))
