"""Vision tower benchmark: ral_jax's VisionTower vs transformers' Qwen2.5-VL vision tower, same card, same weights.

  python -m ral_jax.bench.vision --preset=qwen2_5_vl_7b --case=images     # 4 examples x one 1288x980 image
  python -m ral_jax.bench.vision --preset=qwen2_5_vl_7b --case=video      # 1 example, 64 frames of 448x308
  python -m ral_jax.bench.vision --preset=tiny --case=tiny --device=cpu   # smoke run

bf16 parameters and compute on both sides. transformers runs its own attention choice (`--hf_attn`, default sdpa)
on the concatenated patches of the batch; ours runs the padded batch under jit (compile excluded). Printed: step
time (median of --iters), patches/s, model TFLOP/s (dense matmuls + the attention actually computed inside
segments, the same count for both), peak device memory, the speed ratio, and the relative error of our output
against transformers' (bf16 noise is ~1e-2).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')   # torch shares the card

import numpy as np  # noqa: E402

CASES = {  # per example: list of (t, h, w) grids in patches; examples; full_chunk
    'images': ([(1, 92, 70)], 4, None),
    'video': ([(32, 22, 16)], 1, 22 * 16),
    'tiny': ([(1, 6, 10), (2, 4, 6)], 2, None),
}


def model_flops(v, grids) -> float:
  """Forward FLOPs of the tower on the given grids (2 per multiply-add)."""
  c, f = v.hidden_size, v.intermediate_size
  n = sum(t * h * w for t, h, w in grids)
  dense = 2 * n * (v.patch_dim * c + v.depth * (4 * c * c + 3 * c * f))
  dense += 2 * (n // v.merge_unit) * ((v.merge_unit * c) ** 2 + v.merge_unit * c * v.out_hidden_size)
  m, ws = v.spatial_merge_size, v.window_size // (v.patch_size * v.spatial_merge_size)
  win = full = 0
  for t, h, w in grids:
    gh, gw = h // m, w // m
    rows = [min(ws, gh - i) for i in range(0, gh, ws)]
    cols = [min(ws, gw - j) for j in range(0, gw, ws)]
    win += t * sum((r * q * m * m) ** 2 for r in rows for q in cols)
    full += t * (h * w) ** 2
  n_full = len(v.fullatt_block_indexes)
  attn = 4 * c * ((v.depth - n_full) * win + n_full * full)
  return float(dense + attn)


def _hf_tower(v, device, attn, dtype):
  import torch
  from transformers.models.qwen2_5_vl import configuration_qwen2_5_vl as hc, modeling_qwen2_5_vl as hm
  from ral_jax.models.config import ModelConfig
  d = {k: getattr(v, k) for k in ModelConfig._VISION_KEYS}
  d.update(hidden_act='silu', fullatt_block_indexes=list(v.fullatt_block_indexes),
           tokens_per_second=int(v.tokens_per_second))   # transformers 5.x validates it as int
  vcfg = hc.Qwen2_5_VLVisionConfig(**d)
  vcfg._attn_implementation = attn
  torch.manual_seed(0)
  model = hm.Qwen2_5_VisionTransformerPretrainedModel(vcfg).to(getattr(torch, dtype))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.ndim == 1 and ('norm' in name or 'ln_q' in name)
              else 0.02 * torch.randn_like(p))
  return model.to(device).eval()


def _timed(fn, iters):
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run_hf(model, pix_list, grids, batch, device, iters):
  import torch
  pix = torch.from_numpy(np.concatenate(pix_list * batch)).to(device, next(model.parameters()).dtype)
  grid = torch.tensor(grids * batch, device=device)

  def fwd():
    with torch.no_grad():
      out = model(pix, grid)
    if not isinstance(out, torch.Tensor):   # transformers 5.x returns an output object
      pooled = getattr(out, 'pooler_output', None)
      out = pooled if pooled is not None else out[0]
    if device != 'cpu':
      torch.cuda.synchronize()
    return out
  out = fwd()
  if device != 'cpu':
    torch.cuda.reset_peak_memory_stats()
  dt = _timed(fwd, iters)
  peak = torch.cuda.max_memory_allocated() if device != 'cpu' else 0
  return dt, peak, out.float().cpu().numpy()


def run_ours(v, params_np, pix_list, grids, batch, full_chunk, iters, dtype, attn):
  import jax
  import jax.numpy as jnp
  from ral_jax.models import vision_inputs
  from ral_jax.models.vision import VisionTower
  n = sum(t * h * w for t, h, w in grids)
  p = -(-n // 64) * 64
  pix = np.zeros((batch, p, v.patch_dim), np.float32)
  pix[:, :n] = np.concatenate(pix_list)
  meta = vision_inputs.build_vision_inputs_batch(np.array([grids] * batch), p, v, full_chunk=full_chunk)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params_np)
  tower = VisionTower(v, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), attention_impl=attn)
  fwd = jax.jit(lambda prm, x, m: tower.apply({'params': prm}, x, m))
  args = (params, jnp.asarray(pix), jax.tree.map(jnp.asarray, meta))
  t0 = time.perf_counter()
  out = fwd(*args).block_until_ready()
  compile_s = time.perf_counter() - t0
  dt = _timed(lambda: fwd(*args).block_until_ready(), iters)
  stats = jax.devices()[0].memory_stats() or {}
  flat = np.asarray(out.astype(jnp.float32))[:, :n // v.merge_unit].reshape(-1, v.out_hidden_size)
  return dt, stats.get('peak_bytes_in_use', 0), flat, compile_s


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--preset', default='qwen2_5_vl_7b')
  ap.add_argument('--case', default='images', choices=sorted(CASES))
  ap.add_argument('--iters', type=int, default=10)
  ap.add_argument('--device', default='cuda', help="torch device: 'cuda' or 'cpu'")
  ap.add_argument('--hf_attn', default='sdpa', help="transformers attention: 'sdpa' | 'eager' | 'flash_attention_2'")
  ap.add_argument('--attn', default=None, help="ours: jax.nn.dot_product_attention implementation (None | 'cudnn')")
  ap.add_argument('--dtype', default='bfloat16', help="'bfloat16' or 'float32' (both sides; float32 = parity check)")
  ap.add_argument('--batch', type=int, default=None, help='override the case batch')
  a = ap.parse_args(argv)
  if a.dtype == 'float32':
    import jax
    import torch
    jax.config.update('jax_default_matmul_precision', 'highest')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  from ral_jax.models import hf_names
  from ral_jax.models.config import get_preset
  v = get_preset(a.preset).vision
  grids, batch, full_chunk = CASES[a.case]
  batch = a.batch or batch
  rng = np.random.default_rng(0)
  pix_list = [rng.normal(size=(t * h * w, v.patch_dim)).astype(np.float32) for t, h, w in grids]
  flops = model_flops(v, grids) * batch
  npatch = batch * sum(t * h * w for t, h, w in grids)

  import torch
  hf = _hf_tower(v, a.device, a.hf_attn, a.dtype)
  hf_dt, hf_peak, hf_out = run_hf(hf, pix_list, grids, batch, a.device, a.iters)
  sd = {k: t.float().cpu().numpy() for k, t in hf.state_dict().items()}
  del hf
  if a.device != 'cpu':
    torch.cuda.empty_cache()
  params = {}
  for spec in hf_names.vision_specs(get_preset(a.preset), ''):
    node = params
    for key in spec.path[1:-1]:
      node = node.setdefault(key, {})
    node[spec.path[-1]] = hf_names.to_flax(spec, sd.pop(spec.hf_name()))
  dt, peak, out, compile_s = run_ours(v, params, pix_list, grids, batch, full_chunk, a.iters, a.dtype, a.attn)

  import jax
  err = np.abs(out - hf_out).max() / np.abs(hf_out).max()
  mean_err = np.abs(out - hf_out).mean() / np.abs(hf_out).mean()
  card = torch.cuda.get_device_name() if a.device != 'cpu' else 'cpu'
  print(f'device: {jax.devices()[0].device_kind} | torch: {card}')
  print(f'case {a.case}: {batch} x {grids}, {npatch} patches, {flops / 1e12:.2f} TFLOP per step')
  for name, t, pk in (('ral_jax', dt, peak), (f'transformers/{a.hf_attn}', hf_dt, hf_peak)):
    print(f'{name:>24}: {t * 1e3:8.1f} ms  {npatch / t:10.0f} patches/s  {flops / t / 1e12:6.1f} TFLOP/s  '
          f'peak {pk / 2**30:6.2f} GiB')
  print(f'speed-up vs transformers: {hf_dt / dt:.2f}x   (ral_jax compile {compile_s:.1f} s)')
  print(f'relative error vs transformers ({a.dtype}, attn={a.attn}): max {err:.2e}, mean {mean_err:.2e}')


if __name__ == '__main__':
  main()
