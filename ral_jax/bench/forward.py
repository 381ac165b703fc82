"""Scoring forward+backward benchmark: ral_jax (with / without the attention record) vs transformers (sdpa, eager).

  python -m ral_jax.bench.forward                       # 7B preset, bf16, 1 x 4096 tokens, on the first GPU
  python -m ral_jax.bench.forward --preset=tiny --seq=64 --visual=32 --rows=16 --torch=   # CPU smoke test

One step = forward + backward of a scoring loss over one sequence of `--seq` tokens: `--visual` vision tokens
(visual embeddings given as input: the frozen tower runs once per rollout batch) then text; the last `--rows`
positions are the recorded response rows. Loss = mean response-token log-prob (float32 log-softmax over the full
vocabulary) [+ sum(record * w), standing in for the RAL JSD, when the record is on]. Gradients w.r.t. all decoder
parameters, remat per layer (cfg.remat_policy, default 'nothing_saveable'), random bf16 weights.

Model FLOPs per step (PaLM-style; remat recomputation and the record are not counted, so MFU with the record on
shows its overhead): 6 * T * P_dense + 12 * L * T^2 * N * H, with P_dense = L * (D*(N+2K)*H + N*H*D + 3*D*F) + D*V
(every matmul weight; the embedding lookup excluded), attention counted non-causal. MFU = FLOPs / time / peak,
peak = 989e12 (H100/H200 SXM dense bf16 datasheet). Peak memory: the device's peak bytes in use (jax: after the
no-record runs, then after the record runs; torch: max_memory_allocated per implementation), and per jax program
its compiled memory analysis (arguments + outputs + temporaries).
transformers runs in a subprocess (its own CUDA context) with gradient checkpointing, use_cache=False.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from ral_jax import bench

PEAK_FLOPS = 989e12


def model_flops(cfg, T: int) -> float:
  L, D, N, K, H, F, V = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                         cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
  dense = L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F) + D * V
  return 6.0 * T * dense + 12.0 * L * T * T * N * H


def _inputs(cfg, T, n_vis, n_rows, seed=0):
  """ids [1,T], positions [3,1,T] (vision block as an h x w grid at t=0, text after it), rows [1,R]."""
  import numpy as np
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, min(cfg.vocab_size, 150000), (1, T)).astype(np.int32)
  ids[0, :n_vis] = cfg.image_token_id
  w = 1
  while w * w < n_vis:
    w *= 2
  h = -(-n_vis // w)
  i = np.arange(n_vis)
  pos = np.zeros((3, 1, T), np.int32)
  pos[1, 0, :n_vis], pos[2, 0, :n_vis] = i // w, i % w
  start = max(h, w)
  pos[:, 0, n_vis:] = start + np.arange(T - n_vis)
  rows = np.arange(T - n_rows, T, dtype=np.int32)[None]
  return ids, pos, rows


def _timeit(fn, iters):
  """Two warm-up calls, then the mean of `iters` calls; each result is dropped before the next call starts, so
  the peak memory is one step's."""
  for _ in range(2):
    out = fn()
    _block(out)
    del out
  t = time.perf_counter()
  for _ in range(iters):
    out = fn()
    _block(out)
    del out
  return (time.perf_counter() - t) / iters


def _block(x):
  import jax
  if hasattr(x, 'block_until_ready') or isinstance(x, (tuple, list, dict)):
    jax.block_until_ready(x)


def run_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ral_jax.models.config import get_preset
  from ral_jax.models.vlm import Qwen25VL, init_params
  remats = [r for r in args.remat.split(',') if r]
  cfg = get_preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, remat_policy=remats[0],
                   attention_impl=args.attention_impl or None, record_chunk=args.record_chunk)
  T, n_vis, R = args.seq, args.visual, args.rows
  ids, pos, rows = _inputs(cfg, T, n_vis, R)
  dev = jax.devices()[0]
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  params = jax.tree.unflatten(tree, [
      jax.jit(lambda k, s=s: 0.02 * jax.random.normal(k, s.shape, s.dtype))(kk)
      for kk, s in zip(keys, leaves)])
  vis = (0.02 * jax.random.normal(jax.random.PRNGKey(1), (1, n_vis, cfg.hidden_size))).astype(cfg.dtype)
  weights = jax.random.uniform(jax.random.PRNGKey(2), (1, R, T), jnp.float32)
  model = Qwen25VL(cfg)
  ids, pos, rows = jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(rows)
  mask = jnp.ones_like(ids) if args.mask else None

  data = dict(ids=ids, pos=pos, mask=mask, vis=vis, rows=rows, weights=weights)   # jit arguments, not constants

  def loss(p, d, record):
    ids = d['ids']
    out = model.apply({'params': p}, ids, d['pos'], d['mask'], visual_embeds=d['vis'],
                      record_rows=d['rows'] if record else None)
    logp = jax.nn.log_softmax(out.logits[:, T - R - 1:T - 1], axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, T - R:, None], axis=-1)
    val = -jnp.mean(tok)
    if record:
      val = val + jnp.sum(out.record[cfg.num_hidden_layers - 1]['policy'] * d['weights'])
    return val

  flops = model_flops(cfg, T)
  res = {'device': dev.device_kind, 'preset': args.preset, 'dtype': args.dtype, 'seq': T, 'visual': n_vis,
         'rows': R, 'remat': args.remat, 'attention_impl': args.attention_impl, 'mask': bool(args.mask),
         'model_flops': flops}
  for remat in remats:
    cfg = cfg.replace(remat_policy=remat)
    model = Qwen25VL(cfg)
    for record in (False, True):
      step = jax.jit(jax.value_and_grad(lambda p, d: loss(p, d, record)))
      t0 = time.perf_counter()
      try:
        compiled = step.lower(params, data).compile()
      except Exception as e:    # e.g. cuDNN attention unavailable: fall back to XLA attention, say so
        if cfg.attention_impl != 'cudnn':
          raise
        print(f'cuDNN attention failed ({type(e).__name__}: {str(e)[:300]}); falling back to xla', flush=True)
        cfg = cfg.replace(attention_impl='xla')
        model = Qwen25VL(cfg)
        res['attention_impl'] = 'xla (cudnn failed)'
        step = jax.jit(jax.value_and_grad(lambda p, d: loss(p, d, record)))
        compiled = step.lower(params, data).compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      dt = _timeit(lambda: compiled(params, data), args.iters)
      stats = dev.memory_stats() or {}
      key = ('jax_record' if record else 'jax_no_record') + ('' if remat == remats[0] else f'_{remat}')
      res[key] = {'step_s': dt, 'mfu': flops / dt / PEAK_FLOPS, 'compile_s': compile_s, 'remat': remat,
                  'temp_bytes': getattr(mem, 'temp_size_in_bytes', None),
                  'argument_bytes': getattr(mem, 'argument_size_in_bytes', None),
                  'output_bytes': getattr(mem, 'output_size_in_bytes', None),
                  'peak_bytes_in_use': stats.get('peak_bytes_in_use')}
      print(key, json.dumps(res[key]), flush=True)
  return res


def run_torch(args, impl: str) -> dict:
  import numpy as np
  import torch
  import transformers
  from ral_jax.models.config import get_preset
  cfg = get_preset(args.preset)
  T, n_vis, R = args.seq, args.visual, args.rows
  ids, pos, _ = _inputs(cfg, T, n_vis, R)
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  dtype = torch.bfloat16 if args.dtype == 'bfloat16' else torch.float32
  flat = {k: v for k, v in cfg.to_hf().items() if k not in ('torch_dtype', 'dtype')}
  vis_cfg = dict(flat.pop('vision_config'))
  if float(vis_cfg['tokens_per_second']).is_integer():
    vis_cfg['tokens_per_second'] = int(vis_cfg['tokens_per_second'])     # transformers 5.x wants an int
  tokens = {k: flat[k] for k in cfg._TOKEN_KEYS}
  hcfg = transformers.Qwen2_5_VLConfig(text_config=flat, vision_config=vis_cfg, **tokens)
  hcfg._attn_implementation = impl
  torch.set_default_dtype(dtype)
  with torch.device(dev):
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(hcfg, attn_implementation=impl)
  torch.set_default_dtype(torch.float32)
  model = model.to(dtype)
  n_text = sum(p.numel() for n, p in model.named_parameters() if 'visual' not in n)
  print(f'transformers decoder parameters: {n_text} (dtype {next(model.parameters()).dtype}, '
        f'attn {model.config._attn_implementation})', flush=True)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.02)
  model.train()
  if args.remat != 'none':
    model.gradient_checkpointing_enable()
  for p in model.model.visual.parameters():
    p.requires_grad_(False)
  ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
  pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
  vis = 0.02 * torch.randn(1, n_vis, cfg.hidden_size, device=dev, dtype=dtype)

  def step():
    emb = model.get_input_embeddings()(ids_t)
    emb = torch.cat([vis, emb[:, n_vis:]], dim=1)
    out = model(inputs_embeds=emb, position_ids=pos_t, use_cache=False)
    logp = torch.log_softmax(out.logits[:, T - R - 1:T - 1].float(), dim=-1)
    loss = -logp.gather(-1, ids_t[:, T - R:, None]).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
  if dev == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  step(); step(); sync()
  t = time.perf_counter()
  for _ in range(args.iters):
    step()
  sync()
  dt = (time.perf_counter() - t) / args.iters
  flops = model_flops(cfg, T)
  res = {'step_s': dt, 'mfu': flops / dt / PEAK_FLOPS,
         'peak_bytes': torch.cuda.max_memory_allocated() if dev == 'cuda' else None,
         'device': torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
         'transformers': transformers.__version__, 'torch': torch.__version__}
  print(f'torch_{impl}', json.dumps(res), flush=True)
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--preset', default='qwen2_5_vl_7b')
  ap.add_argument('--dtype', default='bfloat16')
  ap.add_argument('--seq', type=int, default=4096)
  ap.add_argument('--visual', type=int, default=3072)
  ap.add_argument('--rows', type=int, default=1024)
  ap.add_argument('--remat', default='nothing_saveable',
                  help='comma list of cfg.remat_policy values; the first is the headline (torch: checkpointing on)')
  ap.add_argument('--attention_impl', default='cudnn', help="'cudnn' | 'xla' | '' (auto)")
  ap.add_argument('--record_chunk', type=int, default=256)
  ap.add_argument('--mask', type=int, default=0, help='1: pass an all-ones attention_mask (the masked path)')
  ap.add_argument('--iters', type=int, default=3)
  ap.add_argument('--torch', default='sdpa,eager', help="transformers attention implementations ('' = none)")
  ap.add_argument('--out', default=os.path.join(os.environ.get('OUT', '.'), 'bench_forward.json'))
  ap.add_argument('--_torch_only', default='', help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args._torch_only:
    res = run_torch(args, args._torch_only)
    print('RESULT ' + json.dumps(res), flush=True)
    return
  torch_res = {}
  for impl in [s for s in args.torch.split(',') if s]:   # first, before JAX takes the GPU memory
    cmd = [sys.executable, '-m', 'ral_jax.bench.forward', '--_torch_only', impl] + [
        f'--{k}={getattr(args, k)}' for k in ('preset', 'dtype', 'seq', 'visual', 'rows', 'iters')] + [
        f'--remat={args.remat.split(",")[0]}']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not lines:
      print(f'transformers {impl} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}', flush=True)
      torch_res[f'torch_{impl}'] = {'error': proc.stderr[-2000:]}
      continue
    print(proc.stdout[-1500:], flush=True)
    torch_res[f'torch_{impl}'] = json.loads(lines[-1][len('RESULT '):])
  res = run_jax(args)
  res.update(torch_res)
  base = res['jax_no_record']['step_s']
  res['ratios'] = {'record_over_no_record': res['jax_record']['step_s'] / base}
  for k in list(res):
    if k.startswith('jax_record_'):
      res['ratios'][f'record_over_no_record_{k[11:]}'] = res[k]['step_s'] / res['jax_no_record_' + k[11:]]['step_s']
  for impl in ('sdpa', 'eager'):
    t = res.get(f'torch_{impl}', {}).get('step_s')
    if t:
      res['ratios'][f'torch_{impl}_over_jax_record'] = t / res['jax_record']['step_s']
      res['ratios'][f'torch_{impl}_over_jax_no_record'] = t / base
  bench.report(res, args.out)


if __name__ == '__main__':
  main()
