"""Video sampling (reference: the qwen-vl-utils rule restated below), image loading and media failures."""
import math
import os

import numpy as np
import pytest

from _media_fixtures import write_audio_only
from ral_jax.data import media, synthetic
from ral_jax.data.badinput import BadRecord


def _ref_indices(total, native_fps, fps, min_frames, max_frames):
  """Hand restatement: n = duration * fps clamped to [min_frames, min(max_frames, total)], floored to even,
  spread evenly (rounded linspace) over the clip."""
  n = total / native_fps * fps
  n = min(max(n, min_frames), max_frames, total)
  n = 2 * math.floor(n / 2)
  return [round(i * (total - 1) / (n - 1)) for i in range(n)]


def _counting_video(path, n, fps, size=32):
  frames = np.stack([np.full((size, size, 3), 8 * i + 4, np.uint8) for i in range(n)])
  synthetic.write_video(path, frames, fps)


@pytest.mark.parametrize('n,native,fps,lo,hi', [(30, 10, 1.0, 4, 128), (30, 10, 2.0, 4, 4), (8, 2, 2.0, 4, 128),
                                                (5, 25, 1.0, 4, 128), (24, 4, 0.5, 2, 128)])
def test_video_sampling_rule(tmp_path, n, native, fps, lo, hi):
  path = str(tmp_path / 'v.mp4')
  _counting_video(path, n, native)
  cfg = media.VideoConfig(fps=fps, min_frames=lo, max_frames=hi)
  frames, sample_fps = media.load_video(path, cfg)
  want = _ref_indices(n, native, fps, lo, hi)
  got = [int(round((f.mean() - 4) / 8)) for f in frames]
  assert got == want
  assert sample_fps == pytest.approx(len(want) / n * native)
  assert frames.dtype == np.uint8 and frames.shape[1:] == (32, 32, 3)


def test_single_frame_video(tmp_path):
  path = str(tmp_path / 'one.mp4')
  _counting_video(path, 1, 1)
  frames, sample_fps = media.load_video(path, media.VideoConfig())
  assert frames.shape[0] == 1 and sample_fps == pytest.approx(1.0)


def test_missing_media(tmp_path):
  for fn, args in ((media.load_image, ()), (media.load_video, (media.VideoConfig(),))):
    with pytest.raises(BadRecord) as e:
      fn(str(tmp_path / 'nope'), *args)
    assert e.value.reason == 'missing_media'


def test_corrupt_media(tmp_path):
  rng = np.random.default_rng(0)
  for name, fn, args in (('x.png', media.load_image, ()), ('x.mp4', media.load_video, (media.VideoConfig(),))):
    p = tmp_path / name
    p.write_bytes(rng.bytes(3000))
    with pytest.raises(BadRecord) as e:
      fn(str(p), *args)
    assert e.value.reason == 'corrupt_media'


def test_zero_frames_audio_only(tmp_path):
  path = str(tmp_path / 'audio.mp4')
  write_audio_only(path)
  with pytest.raises(BadRecord) as e:
    media.load_video(path, media.VideoConfig())
  assert e.value.reason == 'zero_frames'


def test_video_config_validation():
  with pytest.raises(ValueError, match='fps'):
    media.VideoConfig(fps=0)
  assert os.path.basename(__file__).startswith('test_data_')


def _gop_video(path, n, fps, gop, size=32):
  import av
  from fractions import Fraction
  with av.open(path, 'w') as c:
    s = c.add_stream('libx264', rate=Fraction(fps))
    s.width, s.height, s.pix_fmt = size, size, 'yuv420p'
    s.codec_context.gop_size = gop
    s.options = {'crf': '4', 'keyint': str(gop), 'min-keyint': str(gop), 'scenecut': '0'}
    for i in range(n):
      f = np.full((size, size, 3), 4 * i + 4, np.uint8)
      for pkt in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)


@pytest.mark.parametrize('fps,lo,hi', [(1.0, 4, 128), (1.5, 4, 6), (0.5, 2, 128)])
def test_sparse_sampling_seeks_to_the_same_frames(tmp_path, monkeypatch, fps, lo, hi):
  """A long clip with keyframes every 6 frames (and B-frames): the seek path returns exactly the frames the
  index rule asks for, and sequential decoding is never called."""
  path = str(tmp_path / 'long.mp4')
  _gop_video(path, 60, 15, 6)
  cfg = media.VideoConfig(fps=fps, min_frames=lo, max_frames=hi)
  want = _ref_indices(60, 15, fps, lo, hi)
  sequential, _ = media._decode(path, np.asarray(want))

  def no_sequential(*a):
    raise AssertionError('sequential decode used')
  monkeypatch.setattr(media, '_decode', no_sequential)
  frames, sample_fps = media.load_video(path, cfg)
  assert [int(round((f.mean() - 4) / 4)) for f in frames] == want
  assert sample_fps == pytest.approx(len(want) / 60 * 15)
  np.testing.assert_array_equal(frames, np.stack(sequential))
