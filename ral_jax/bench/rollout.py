"""Rollout benchmark: ral_jax's KV-cache sampler vs transformers' `generate`, same shapes, same card.

  python -m ral_jax.bench.rollout                       # 7B, 8 prompts x G=8, ~2000 visual + 100 text, 512 new
  python -m ral_jax.bench.rollout --runs=jax:qwen2_5_vl_7b:8,jax:qwen2_5_vl_3b:8,hf:qwen2_5_vl_7b:8
  python -m ral_jax.bench.rollout --preset=tiny --visual=16 --text=8 --new=8 --runs=jax:tiny:2,hf:tiny:2  # CPU check

Each run is `impl:preset:prompts` and goes in its own subprocess (JAX and PyTorch never share the card; peak
memory is per run). Random weights in bfloat16, sampling at temperature 1 with no top-k/top-p, stop ids ignored
(every row produces --new tokens).
- jax: prompts of `--text` text tokens around one image block of `--visual` pad tokens (M-RoPE positions from
  models.positions), random visual embeddings standing in for the vision tower (it runs once per rollout, outside
  the sampler); one prefill per prompt, its KV cache shared by the prompt's G samples (one copy per prompt plus a
  response cache per row), decode in one while_loop. Prefill and decode are timed separately after a warm-up call
  of the same shapes (compilation excluded).
- hf: transformers' Qwen2_5_VLForConditionalGeneration, sdpa attention, bf16, `generate(do_sample=True,
  num_return_sequences=G, min_new_tokens=max_new_tokens=--new)` on text prompts of the same length (visual +
  text tokens; the LLM work is the same, the vision tower is skipped as on the jax side). Its prefill is timed as one
  forward pass of the G-fold expanded batch (what generate does), its decode as total - prefill.
Memory-bandwidth bound of decoding: every decode step reads the decoder weights (all layers, final norm, lm_head;
not the embedding table of an untied model) and the live KV cache once: each prompt's cache once (shared by its G
samples) plus each row's tokens so far:
  KV_j = (prompts * Tp + rows * j) * kv bytes per token,
  t_bound = sum_{j=1}^{Tr-1} (W + KV_j) / HBM_bandwidth,  tokens/s bound = rows * Tr / t_bound.
(Before the shared prompt cache, KV_j counted rows * (Tp + j): figures measured then are against that bound.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HBM_BANDWIDTH = (('H200', 4.8e12), ('H100 PCIe', 2.0e12), ('H100 NVL', 3.9e12), ('H100', 3.35e12),
                 ('A100', 2.0e12))


def _bandwidth(kind: str):
  for name, bw in HBM_BANDWIDTH:
    if name.lower() in kind.lower():
      return bw
  return None


def _shapes(cfg, args):
  """(side of the merged visual grid (gh, gw), number of visual tokens, prompt length)."""
  gh = max(1, int(round(args.visual ** 0.5)))
  gw = max(1, args.visual // gh)
  nv = gh * gw
  return (gh, gw), nv, nv + args.text + 2


def _kv_per_token(cfg, dtype_bytes=2):
  return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def _bound(cfg, prompts, rows, prompt_len, new, weight_bytes):
  """(bytes read by the decode steps, bytes of the final KV cache): prompt caches once per prompt, responses per row."""
  kv = _kv_per_token(cfg)
  total = 0.0
  for j in range(1, new):
    total += weight_bytes + (prompts * prompt_len + rows * j) * kv
  return total, (prompts * prompt_len + rows * new) * kv


def _decoder_weight_bytes(cfg, dtype_bytes=2):
  D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
  N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  per_layer = D * N * H + N * H + 2 * (D * K * H + K * H) + N * H * D + 3 * D * F + 2 * D
  return (L * per_layer + D + D * V) * dtype_bytes


def run_jax(args, preset: str, prompts):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ral_jax.rollout import engine as rollout
  from ral_jax.models.config import get_preset
  from ral_jax.models.positions import rope_index
  from ral_jax.models.vlm import init_params
  from ral_jax.rollout.sampling import SamplingConfig

  cfg = get_preset(preset, dtype='bfloat16', param_dtype='bfloat16')
  (gh, gw), nv, tp = _shapes(cfg, args)
  G, new = args.G, args.new
  kv_prompt = _kv_per_token(cfg) * (tp + G * new)   # one prompt's cache + its G rows' response caches
  if prompts == 'fill':   # as many prompts (multiple of the prefill batch) as the card holds
    limit = (jax.devices()[0].memory_stats() or {}).get('bytes_limit', 2 ** 30)   # CPU: 1 GiB
    wb = _decoder_weight_bytes(cfg) + cfg.vocab_size * cfg.hidden_size * 2
    free = 0.92 * limit - 2 * wb - args.prefill_batch * 1.2 * 2 ** 30 - 3 * 2 ** 30
    prompts = max(1, int(free // kv_prompt) // args.prefill_batch) * args.prefill_batch
  prompts = int(prompts)
  rng = np.random.default_rng(0)
  m = cfg.vision.spatial_merge_size
  ids_list, pos_list = [], []
  for _ in range(prompts):
    pre = rng.integers(0, 1000, args.text // 2)
    post = rng.integers(0, 1000, args.text - args.text // 2)
    ids = np.concatenate([pre, [cfg.vision_start_token_id], np.full(nv, cfg.image_token_id), [cfg.vision_end_token_id],
                          post]).astype(np.int32)
    pos = rope_index(ids, np.ones_like(ids), [[1, gh * m, gw * m]], [1], [0.0], cfg)
    ids_list.append(ids)
    pos_list.append(pos)
  batch = rollout.pad_prompts(ids_list, pos_list, tp)
  t0 = time.perf_counter()
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.PRNGKey(0))
  vis = (jax.random.normal(jax.random.PRNGKey(1), (prompts, nv, cfg.hidden_size), jnp.float32) * 0.02
         ).astype(jnp.bfloat16)
  jax.block_until_ready((params, vis))
  t_init = time.perf_counter() - t0
  pb = args.prefill_batch if prompts % max(args.prefill_batch, 1) == 0 else 0
  sc = SamplingConfig(max_new_tokens=new, ignore_stop=True, dtype='bfloat16', prefill_batch=pb)
  weights = rollout.sampler_weights(params, cfg, sc, G)

  def timed(seed, warm=False):
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    state = rollout.prefill(params, cfg, batch, vis, key, sc, G)
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    if warm:   # compiles the decode program; all rows done, so the loop exits at once
      state = state.replace(done=jnp.ones_like(state.done))
    out = rollout.decode(weights, cfg, state, key, sc, G)
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out

  t0 = time.perf_counter()
  timed(0, warm=True)
  t_compile = time.perf_counter() - t0
  t_pre, t_dec, out = timed(1)
  rows = prompts * G
  lengths = np.asarray(out.lengths)
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  wbytes = _decoder_weight_bytes(cfg)
  bound_bytes, kv_final = _bound(cfg, prompts, rows, tp, new, wbytes)
  bw = _bandwidth(dev.device_kind)
  res = dict(impl='jax', preset=preset, device=dev.device_kind, jax=jax.__version__,
             prompts=prompts, G=G, rows=rows, prompt_len=tp,
             new_tokens=new, init_s=t_init, first_call_s=t_compile, prefill_s=t_pre, decode_s=t_dec,
             decode_tok_s=rows * (new - 1) / t_dec, total_s=t_pre + t_dec, new_tok_s=rows * new / (t_pre + t_dec),
             step_ms=1e3 * t_dec / (new - 1), peak_gib=stats.get('peak_bytes_in_use', 0) / 2 ** 30,
             weight_gib=wbytes / 2 ** 30, kv_cache_gib=kv_final / 2 ** 30, kv_layout='shared_prompt', hbm_bw=bw,
             lengths_ok=bool((lengths == new).all()), min_length=int(lengths.min()),
             lengths_seen=sorted(set(lengths.tolist()))[:6])
  if bw:
    t_bound = bound_bytes / bw
    res.update(bound_decode_s=t_bound, bound_decode_tok_s=rows * (new - 1) / t_bound,
               fraction_of_bound=t_bound / t_dec)
  return res


def run_hf(args, preset: str, prompts: int):
  import torch
  import transformers
  from ral_jax.models.config import get_preset

  cfg = get_preset(preset)
  _, nv, tp = _shapes(cfg, args)
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  d = cfg.to_hf()
  tps = d['vision_config']['tokens_per_second']
  d['vision_config']['tokens_per_second'] = int(tps) if float(tps).is_integer() else tps   # transformers 5 wants int
  hf_cfg = transformers.Qwen2_5_VLConfig(**d)
  text_cfg = getattr(hf_cfg, 'text_config', hf_cfg)
  assert text_cfg.hidden_size == cfg.hidden_size and text_cfg.num_hidden_layers == cfg.num_hidden_layers, text_cfg
  t0 = time.perf_counter()
  torch.manual_seed(0)
  with torch.device(dev):
    try:
      model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
          hf_cfg, dtype=torch.bfloat16, attn_implementation='sdpa')
    except TypeError:
      model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
          hf_cfg, torch_dtype=torch.bfloat16, attn_implementation='sdpa')
  model = model.to(torch.bfloat16).eval()   # some sub-configs keep float32 otherwise
  t_init = time.perf_counter() - t0
  G, new = args.G, args.new
  ids = torch.randint(0, 1000, (prompts, tp), device=dev)
  mask = torch.ones_like(ids)
  gen = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G, pad_token_id=0,
             eos_token_id=None)
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
  if dev == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  with torch.no_grad():
    model.generate(input_ids=ids[:1, :64], attention_mask=mask[:1, :64], max_new_tokens=4, min_new_tokens=4, **gen)
    sync()
    big_ids, big_mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    t0 = time.perf_counter()
    model(input_ids=big_ids, attention_mask=big_mask, use_cache=True, logits_to_keep=1)
    sync()
    t_pre = time.perf_counter() - t0
    del big_ids, big_mask
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **gen)
    sync()
    t_tot = time.perf_counter() - t0
  rows = prompts * G
  assert out.shape == (rows, tp + new), out.shape
  peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev == 'cuda' else 0.0
  kind = torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'
  return dict(impl='hf', preset=preset, device=kind, transformers=transformers.__version__, prompts=prompts, G=G,
              rows=rows, prompt_len=tp, new_tokens=new, init_s=t_init, prefill_s=t_pre, total_s=t_tot,
              decode_s=t_tot - t_pre, decode_tok_s=rows * (new - 1) / max(t_tot - t_pre, 1e-9),
              new_tok_s=rows * new / t_tot, peak_gib=peak)


def _print(res):
  keys = ('impl', 'preset', 'device', 'rows', 'prompt_len', 'new_tokens', 'prefill_s', 'decode_s', 'total_s',
          'decode_tok_s', 'new_tok_s', 'step_ms', 'peak_gib', 'kv_cache_gib', 'bound_decode_tok_s', 'fraction_of_bound',
          'lengths_ok')
  print('  '.join(f'{k}={res[k]:.4g}' if isinstance(res.get(k), float) else f'{k}={res.get(k)}'
                  for k in keys if k in res), flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--runs', default='jax:qwen2_5_vl_7b:8,hf:qwen2_5_vl_7b:8',
                  help='comma list of impl:preset:prompts; impl jax (the rollout engine) or hf (transformers '
                       'generate); prompts an integer or fill (jax: as many as the card holds)')
  ap.add_argument('--G', type=int, default=8)
  ap.add_argument('--visual', type=int, default=2000, help='visual tokens per prompt (after merging)')
  ap.add_argument('--text', type=int, default=100, help='text tokens per prompt')
  ap.add_argument('--new', type=int, default=512, help='new tokens per sample (stop ids ignored)')
  ap.add_argument('--prefill_batch', type=int, default=8, help='prompts per prefill pass (jax)')
  ap.add_argument('--timeout', type=int, default=300, help='seconds per run')
  ap.add_argument('--out', default=os.environ.get('OUT', '.'), help='folder for rollout_bench.jsonl')
  ap.add_argument('--one', default=None, help=argparse.SUPPRESS)   # internal: run one spec in this process
  ap.add_argument('--preset', default=None, help='shortcut: replaces the preset of every run')
  args = ap.parse_args(argv)
  if args.one:
    impl, preset, prompts = args.one.split(':')
    fn = {'jax': run_jax, 'hf': run_hf}[impl]
    print('RESULT ' + json.dumps(fn(args, preset, prompts if prompts == 'fill' else int(prompts))), flush=True)
    return
  results = []
  for spec in args.runs.split(','):
    impl, preset, prompts = spec.split(':')
    preset = args.preset or preset
    cmd = [sys.executable, '-m', 'ral_jax.bench.rollout', f'--one={impl}:{preset}:{prompts}', f'--G={args.G}',
           f'--visual={args.visual}', f'--text={args.text}', f'--new={args.new}',
           f'--prefill_batch={args.prefill_batch}']
    print('#', ' '.join(cmd[2:]), flush=True)
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
      print(f'  TIMEOUT after {args.timeout}s', flush=True)
      results.append(dict(spec=spec, error=f'timeout {args.timeout}s'))
      continue
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not lines:
      print(f'  FAILED rc={proc.returncode}\n' + (proc.stdout + proc.stderr)[-3000:], flush=True)
      results.append(dict(spec=spec, error=(proc.stderr or proc.stdout)[-2000:]))
      continue
    res = json.loads(lines[-1][7:])
    results.append(res)
    _print(res)
  by = {(r.get('impl'), r.get('preset'), r.get('rows')): r for r in results}
  for (impl, preset, rows), r in by.items():
    peer = by.get(('hf', preset, rows))
    if impl == 'jax' and peer:
      print(f'speed-up {preset} rows={rows}: new tokens/s {r["new_tok_s"] / peer["new_tok_s"]:.2f}x, '
            f'decode tokens/s {r["decode_tok_s"] / peer["decode_tok_s"]:.2f}x, '
            f'prefill {peer["prefill_s"] / r["prefill_s"]:.2f}x', flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'rollout_bench.jsonl'), 'a') as f:
    for r in results:
      f.write(json.dumps(r) + '\n')


if __name__ == '__main__':
  main()
