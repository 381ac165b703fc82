"""Data benchmark: samples/s per CPU core, decoded and preprocessed, for the two shapes of the issue.

    python -m ral_jax.bench.data [--repeats 8] [--pipeline] [--long-video]

  video: 16-frame 448 x 448 H.264 clips (crf 23, moving gradients + noise) at 1 fps, sampled at 1 fps, frames resized to the paper's budget
         (at most 128 x 28 x 28 px: 308 x 308, 3872 patches, 968 visual tokens)
  image: 896 x 896 PNG, 1024 visual tokens (4096 patches; image_max_pixels = 1024 * 28 * 28)
Each is timed in this process in CPU time (time.process_time, all threads: samples per CPU-second = per core,
independent of other load on the machine): ours = decode (PyAV / Pillow) +
`processor.process_video/process_image`; the peer = the same decode + transformers 4.57's Qwen2VLImageProcessor
(`videos=` / `images=`) on the decoded frames; the ratio peer / ours is printed. `--pipeline` also times the
whole per-example transform (features.ExampleProcessor: media, patches, chat prompt, tokens, rope index) and
the Grain pipeline with batching (read_threads = 1, no workers).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from ral_jax.data import media, processor, synthetic

VIDEO_CFG = processor.ProcessorConfig(image_min_pixels=4 * 28 * 28, image_max_pixels=1024 * 28 * 28,
                                      video_min_pixels=4 * 28 * 28, video_max_pixels=128 * 28 * 28)


def _make_media(root: str, frames: int, vsize: int, isize: int):
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:vsize, 0:vsize]
  clip = np.stack([np.stack([(xx + 9 * t) % 256, (yy + 5 * t) % 256, (xx + yy) // 4 % 256], -1)
                   for t in range(frames)]).astype(np.uint8)
  clip = np.clip(clip.astype(int) + rng.integers(-20, 20, clip.shape), 0, 255).astype(np.uint8)
  vpath = os.path.join(root, 'clip.mp4')
  synthetic.write_video(vpath, clip, fps=1.0, crf=23)  # a typical web-video quality
  from PIL import Image
  yy, xx = np.mgrid[0:isize, 0:isize]
  img = np.stack([xx % 256, yy % 256, (xx * yy) % 256], -1).astype(np.uint8)
  ipath = os.path.join(root, 'image.png')
  Image.fromarray(img).save(ipath)
  return vpath, ipath


def _time(fn, repeats: int) -> float:
  """Samples per CPU-second of this process (all its threads): the per-core rate, robust to a busy machine."""
  fn()  # warm up
  t = time.process_time()
  for _ in range(repeats):
    fn()
  return repeats / (time.process_time() - t)


def bench_media(vpath: str, ipath: str, frames: int, repeats: int):
  from transformers import Qwen2VLImageProcessor
  vcfg = media.VideoConfig(fps=1.0, max_frames=frames, min_frames=4)
  hf_video = Qwen2VLImageProcessor(min_pixels=VIDEO_CFG.video_min_pixels, max_pixels=VIDEO_CFG.video_max_pixels)
  hf_image = Qwen2VLImageProcessor(min_pixels=VIDEO_CFG.image_min_pixels, max_pixels=VIDEO_CFG.image_max_pixels)
  import transformers
  transformers.logging.set_verbosity_error()
  rows = []
  for name, ours, peer in (
      ('video', lambda: processor.process_video(media.load_video(vpath, vcfg)[0], VIDEO_CFG),
       lambda: hf_video(images=None, videos=[list(media.load_video(vpath, vcfg)[0])], return_tensors='np')),
      ('image', lambda: processor.process_image(media.load_image(ipath), VIDEO_CFG),
       lambda: hf_image(images=[media.load_image(ipath)], return_tensors='np'))):
    patches, grid = ours()
    a, b = _time(ours, repeats), _time(peer, repeats)
    rows.append((name, grid, patches.shape[0], a, b))
  return rows


def _long_video(root: str, frames: int, size: int, gop: int) -> str:
  import av
  path = os.path.join(root, 'long.mp4')
  yy, xx = np.mgrid[0:size, 0:size]
  with av.open(path, 'w') as c:
    s = c.add_stream('libx264', rate=30)
    s.width, s.height, s.pix_fmt = size, size, 'yuv420p'
    s.codec_context.gop_size = gop
    s.options = {'crf': '23'}
    for t in range(frames):
      f = np.stack([(xx + 3 * t) % 256, (yy + 2 * t) % 256, (xx + yy + t) // 4 % 256], -1).astype(np.uint8)
      for pkt in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)
  return path


def bench_long_video(root: str, repeats: int, frames: int = 600, size: int = 448, gop: int = 30):
  """Sparse sampling of a long clip (30 fps, keyframe every `gop` frames, sampled at 1 fps): seek vs decoding
  every frame (media._decode), both returning the same frames."""
  path = _long_video(root, frames, size, gop)
  cfg = media.VideoConfig(fps=1.0, max_frames=128)
  rate, pts, keys, total = media._index(path)
  keep = media.sample_indices(total, rate, cfg)
  seek = _time(lambda: media.load_video(path, cfg), max(2, repeats // 2))
  seq = _time(lambda: media._decode(path, keep), max(2, repeats // 2))
  return len(keep), seek, seq


def bench_pipeline(root: str, vpath: str, ipath: str, repeats: int):
  from ral_jax.data import pipeline
  from ral_jax.data.features import ExampleProcessor
  from ral_jax.data.tokenizer import load_tokenizer, text_encoder
  from ral_jax.data.records import load_manifest
  from ral_jax.data.badinput import BadInputCounter
  from ral_jax.models.config import get_preset
  mcfg = get_preset('qwen2_5_vl_7b')  # real geometry; the embedded tokenizer stands in (same ids not needed)
  mcfg = mcfg.replace(image_token_id=1021, video_token_id=1022, vision_start_token_id=1019, vision_end_token_id=1020,
                      vocab_size=1031)
  out = []
  for name, key, path in (('video', 'video', vpath), ('image', 'images', [ipath])):
    man = os.path.join(root, f'{name}.jsonl')
    with open(man, 'w') as f:
      for i in range(4):
        f.write(json.dumps({'id': f'{name}{i}', 'question': 'What happens?', 'options': ['a', 'b'],
                            'answer': 'A', key: path}) + '\n')
    dcfg = pipeline.DataConfig(manifests=(man,), processor=VIDEO_CFG, video=media.VideoConfig(fps=1.0, max_frames=16),
                               batch_size=4, prompt_buckets=(2048,), patch_buckets=(4096,), read_threads=1)
    ex = load_manifest(man, BadInputCounter())[0]
    proc = ExampleProcessor(dcfg, mcfg, text_encoder(load_tokenizer()))
    per_example = _time(lambda: proc(ex), repeats)
    # The whole pipeline: CPU time over n batches includes up to one prefetch buffer (8 examples) of work beyond
    # them, so the rate is a slight underestimate; the iterator is closed before the next measurement.
    it = iter(pipeline.make_pipeline(dcfg, mcfg).dataset)
    next(it)
    n = 2 * repeats
    t = time.process_time()
    for _ in range(n):
      next(it)
    out.append((name, per_example, 4 * n / (time.process_time() - t)))
    getattr(it, 'close', lambda: None)()
    del it
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--repeats', type=int, default=8)
  p.add_argument('--video-frames', type=int, default=16)
  p.add_argument('--video-size', type=int, default=448)
  p.add_argument('--image-size', type=int, default=896)
  p.add_argument('--pipeline', action='store_true', help='also time ExampleProcessor and the Grain pipeline')
  p.add_argument('--long-video', action='store_true', help='also time sparse sampling of a 20 s 30 fps clip')
  a = p.parse_args(argv)
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  with tempfile.TemporaryDirectory() as root:
    vpath, ipath = _make_media(root, a.video_frames, a.video_size, a.image_size)
    print(f'cpu cores visible: {os.cpu_count()}; rates are samples per CPU-second of this process (per core)')
    for name, grid, n, ours, peer in bench_media(vpath, ipath, a.video_frames, a.repeats):
      print(f'{name:5s} grid {tuple(int(g) for g in grid)} ({n} patches): ours {ours:7.2f} samples/s, '
            f'transformers Qwen2VLImageProcessor {peer:7.2f} samples/s, ratio ours/peer {ours / peer:5.2f}x')
    if a.long_video:
      n, seek, seq = bench_long_video(root, a.repeats)
      print(f'long video 600 frames 448x448 @30 fps, keyframe every 30, {n} frames at 1 fps: load_video (seek) '
            f'{seek:6.2f} samples/s, decoding every frame {seq:6.2f} samples/s, ratio {seek / seq:5.2f}x')
    if a.pipeline:
      for name, per_example, batched in bench_pipeline(root, vpath, ipath, a.repeats):
        print(f'{name:5s} ExampleProcessor {per_example:7.2f} samples/s; Grain pipeline (batch 4, 1 thread) '
              f'{batched:7.2f} samples/s')


if __name__ == '__main__':
  main()
