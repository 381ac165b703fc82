"""HF checkpoint export/import at full size: time, file size and peak anonymous host memory.

  python -m ral_jax.bench.hf_io --preset=qwen2_5_vl_7b --dir=/tmp/ckpt7b      # on one GPU, ~16 GB of disk

Random bf16 parameters of the preset are created on the device, exported with `save_hf` (bf16, 5 GB shards as on
the hub), dropped, and imported again with `load_hf` onto the device. A sampler thread records the process's
anonymous resident memory (RssAnon: excludes the page cache the memory-mapped files occupy), so the import's host
peak can be compared with the model size. The import is checked bit-identical on a few leaves.
"""
from __future__ import annotations

import argparse
import os
import shutil
import threading
import time

import numpy as np


def _rss_anon() -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('RssAnon:'):
        return int(line.split()[1]) * 1024
  return 0


class PeakAnon:
  """Samples RssAnon every 20 ms while active."""

  def __enter__(self):
    self.peak, self.base, self._run = 0, _rss_anon(), True
    self._t = threading.Thread(target=self._loop, daemon=True)
    self._t.start()
    return self

  def _loop(self):
    while self._run:
      self.peak = max(self.peak, _rss_anon())
      time.sleep(0.02)

  def __exit__(self, *exc):
    self._run = False
    self._t.join()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--preset', default='qwen2_5_vl_7b')
  ap.add_argument('--dir', default='/tmp/ral_jax_ckpt')
  ap.add_argument('--shard_gb', type=float, default=5.0)
  a = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from ral_jax.models import hf_io, vision_inputs
  from ral_jax.models.config import get_preset
  from ral_jax.models.vlm import init_params
  cfg = get_preset(a.preset, param_dtype='bfloat16')
  m = cfg.vision.spatial_merge_size
  pix = jnp.zeros((1, 4 * m * m, cfg.vision.patch_dim))
  meta = vision_inputs.build_vision_inputs_batch(np.array([[[1, 2 * m, 2 * m]]]), 4 * m * m, cfg.vision)
  params = jax.jit(lambda: init_params(cfg, jax.random.key(0), (pix, meta)))()
  n = sum(x.size for x in jax.tree.leaves(params))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  probe = [('model', 'layers', 'mlp', 'up_proj', 'kernel'), ('visual', 'blocks_1', 'attn', 'qkv', 'kernel'),
           ('model', 'embed_tokens', 'embedding')]
  want = [np.asarray(hf_io._get(params, p)[-1]) for p in probe]
  shutil.rmtree(a.dir, ignore_errors=True)
  with PeakAnon() as pk:
    t0 = time.perf_counter()
    files = hf_io.save_hf(params, cfg, a.dir, max_shard_bytes=int(a.shard_gb * 2**30))
    save_s = time.perf_counter() - t0
  save_peak = pk.peak - pk.base
  disk = sum(os.path.getsize(os.path.join(a.dir, f)) for f in files)
  del params
  with PeakAnon() as pk:
    t0 = time.perf_counter()
    cfg2, loaded = hf_io.load_hf(a.dir, param_dtype='bfloat16')
    jax.block_until_ready(loaded)
    load_s = time.perf_counter() - t0
  load_peak = pk.peak - pk.base
  same = all(np.array_equal(np.asarray(hf_io._get(loaded, p)[-1]), w) for p, w in zip(probe, want))
  print(f'device: {jax.devices()[0].device_kind}; preset {a.preset}: {n / 1e9:.2f} B params, '
        f'{nbytes / 2**30:.1f} GiB in bf16, {len(files) - 1} files, {disk / 2**30:.1f} GiB on disk')
  print(f'save_hf: {save_s:.1f} s, peak anonymous host memory +{save_peak / 2**30:.2f} GiB')
  print(f'load_hf: {load_s:.1f} s ({disk / 2**30 / load_s:.2f} GiB/s), peak anonymous host memory '
        f'+{load_peak / 2**30:.2f} GiB; probes bit-identical: {same}')


if __name__ == '__main__':
  main()
