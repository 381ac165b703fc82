"""End-to-end RL step benchmark: the trainer's own RL step vs the same step written with transformers + PyTorch.

  python -m ral_jax.bench.rl_step                                   # 3B headline: 16 prompts x G=8, one H200
  python -m ral_jax.bench.rl_step --runs=jax:qwen2_5_vl_7b --prompts=4 --steps=2   # 7B shapes, fewer rows
  python -m ral_jax.bench.rl_step --runs=jax:tiny,torch:tiny --prompts=2 --G=2 --frames=2 \
      --side=56 --text=40 --new=8 --steps=2 --micro=1 --ckpt=0      # CPU smoke test
  python -m ral_jax.bench.rl_step --runs=jax:qwen2_5_vl_3b --share_prompt  # each prompt once per group (#11)

Shapes (headline, the issue's 3B shape): `--prompts` prompts x G samples; each prompt one video of `--frames`
frames at `--side` px (16 x 448 px: 8192 patches -> 2048 visual tokens after the 2x2 merge) inside `--text` text
tokens (prompt 2304 tokens), `--new` new tokens (512, every row runs to the end: random weights never sample the
stop id in practice), random weights, bf16 compute (float32 parameters and Adam state for 3B; bfloat16 ones for 7B so
that the 7B state fits one card), remat nothing_saveable, RAL (lambda_attn = 1, beta = 0.04, 4 mini-batches).

jax (the trainer's code, nothing re-implemented): the config goes through train/config.build, parameters through
train/build.init_model_params (random, per leaf), the state through build.create_state, the jitted steps through
build.make_steps, and each step is `train.stages.rl_step` (vision tower once, rollout, rewards on the host,
advantages, scoring pass, mini-batch updates), which reports its own phase times. The benchmark substitutes only
the data: synthetic token ids and pixels (no tokenizer needed: responses are "decoded" as their id strings), and a
registered coin-flip reward of the response text (so advantages are non-zero). After the steps the state is saved
with the trainer's Checkpointer (async): the blocking part and the finalization are timed (--ckpt=0 skips it).

torch (the paper's stack as it reads attention): transformers' Qwen2_5_VLForConditionalGeneration with the same
config and shapes, sdpa attention everywhere except the last decoder layer, which runs eager attention so that its
weights can be read (a forward hook on that layer's attention), gradient checkpointing, bf16 autocast over float32
weights (bf16 weights for 7B). Rollout = `generate(do_sample=True, num_return_sequences=G, min_new_tokens =
max_new_tokens)` with the video's pixels (the tower runs inside generate); scoring = no-grad forwards of the policy
and of a frozen reference copy (old log-probs, reference log-probs, old attention rows of the last layer); update =
the same GRPO + beta KL + lambda JSD loss over the same mini- and micro-batches, AdamW.

Reported per run (JSON in $OUT/bench_rl_step.json): per phase (rollout incl. vision tower and rewards, scoring,
update) seconds, model FLOPs and MFU (peak 989e12 bf16 dense, H100/H200 datasheet; PaLM-style counts as in
bench/forward.py: 2 x dense params x tokens per forward token, 6 x for forward + backward, attention 4 x L x N x H
x (visible keys) per forward token; remat recomputation not counted; decoding counts the cache it reads; with
--share_prompt the scoring and update count each prompt once per group plus the responses: 'flop_count' says
which), tokens/s
per chip (generated tokens, and all sequence tokens), peak device memory, compile estimate (first step - steady
step), time to first step (from process start), GPU idle share (1 - nvidia-smi utilization sampled every 50 ms
over the steady steps), the checkpoint times, and the torch/jax ratio of the steady step time.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import subprocess
import sys
import threading
import time

from ral_jax import bench

T_PROCESS = time.perf_counter()
PEAK_FLOPS = 989e12


# ---------------------------------------------------------------------------------------------------------------
# shapes and FLOPs (shared by both sides)

def shapes(args, cfg):
  """(grid_thw (t, h, w) in patches, patches P, visual tokens Nv, prompt length Tp)."""
  vc = cfg.vision
  t = max(1, args.frames // vc.temporal_patch_size)
  h = w = args.side // vc.patch_size
  p = t * h * w
  nv = p // vc.merge_unit
  return (t, h, w), p, nv, nv + args.text + 2


def dense_params(cfg) -> int:
  L, D, N, K, H, F, V = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                         cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
  return L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F) + D * V


def fwd_flops(cfg, rows: int, t: int) -> float:
  """Forward FLOPs of `rows` causal sequences of t tokens (matmuls + causal attention)."""
  L, N, H = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
  return rows * (2.0 * t * dense_params(cfg) + 4.0 * L * N * H * t * (t + 1) / 2)


def shared_fwd_flops(cfg, prompts: int, G: int, tp: int, tr: int) -> float:
  """Forward FLOPs of the shared-prompt pass (rl.share_prompt): each prompt once (tp tokens, causal), then G x tr
  response tokens, response token i attending tp + i + 1 keys."""
  L, N, H = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
  dense = 2.0 * dense_params(cfg) * (prompts * tp + prompts * G * tr)
  attn = 4.0 * L * N * H * (prompts * tp * (tp + 1) / 2 + prompts * G * (tr * tp + tr * (tr + 1) / 2))
  return dense + attn


def rollout_flops(cfg, prompts: int, G: int, tp: int, new: int) -> float:
  """Prefill of each prompt once + G x new decode tokens, each reading its visible cache."""
  L, N, H = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
  decode = prompts * G * sum(2.0 * dense_params(cfg) + 4.0 * L * N * H * (tp + j) for j in range(new))
  return fwd_flops(cfg, prompts, tp) + decode


class Utilization:
  """Samples `nvidia-smi --query-gpu=utilization.gpu` (percent of time a kernel ran) in a thread, for the first GPU
  this process sees (nvidia-smi numbers GPUs ignoring CUDA_VISIBLE_DEVICES: with CUDA_VISIBLE_DEVICES=1 the
  process's GPU is nvidia-smi's 1)."""

  def __init__(self, period_ms: int = 50):
    self.samples, self.proc = [], None
    gpu = (os.environ.get('CUDA_VISIBLE_DEVICES') or '0').split(',')[0].strip() or '0'
    try:
      self.proc = subprocess.Popen(['nvidia-smi', '--query-gpu=utilization.gpu', '--format=csv,noheader,nounits',
                                    '-i', gpu, f'-lms={period_ms}'], stdout=subprocess.PIPE, text=True)
    except (OSError, ValueError):
      return
    self.on = False
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      if self.on and line.strip().isdigit():
        self.samples.append(int(line.strip()))

  def start(self):
    self.samples, self.on = [], True

  def stop(self):
    self.on = False
    return (sum(self.samples) / len(self.samples) / 100.0) if self.samples else None

  def close(self):
    if self.proc is not None:
      self.proc.terminate()


FLOP_COUNTS = {False: 'full sequences: every row computes prompt + response',
               True: 'shared prompt: each prompt once per group, then the G responses over prompt + response keys'}


def phase_report(cfg, args, times: dict, tp: int, tr: int, shared: bool = False) -> dict:
  """Per phase seconds, model FLOPs and MFU; `shared`: the scoring and update passes computed each prompt once
  (rl.share_prompt), and their FLOPs count the tokens actually computed (FLOP_COUNTS)."""
  rows = args.prompts * args.G
  t = tp + tr
  fwd = (shared_fwd_flops(cfg, args.prompts, args.G, tp, tr) if shared else fwd_flops(cfg, rows, t))
  fl = {'rollout': rollout_flops(cfg, args.prompts, args.G, tp, tr),
        'scoring': fwd * (2 if args.beta > 0 else 1),
        'update': 3 * fwd * args.epochs}
  out = {}
  for k, f in fl.items():
    s = times.get(k)
    out[k] = {'s': s, 'model_flops': f, 'mfu': (f / s / PEAK_FLOPS) if s else None}
  step = times.get('step')
  out['step'] = {'s': step, 'model_flops': sum(fl.values()),
                 'mfu': sum(fl.values()) / step / PEAK_FLOPS if step else None,
                 'generated_tokens_per_s_per_chip': rows * tr / step if step else None,
                 'sequence_tokens_per_s_per_chip': rows * t / step if step else None}
  return out


# ---------------------------------------------------------------------------------------------------------------
# jax: the trainer's step

def _config(args, preset: str):
  from configs import common
  c = common.get_config_for('video', 'ral')
  big = preset.startswith('qwen')
  c.model.preset = preset
  c.model.dtype = args.dtype
  c.model.param_dtype = 'bfloat16' if '7b' in preset else ''
  c.model.remat_policy = args.remat
  c.model.scan_layers = bool(args.scan_layers)
  c.model.attention_impl = args.attention_impl if big else ''
  c.data.source = 'manifest'
  c.data.train_manifest = '<bench: synthetic batch>'
  c.sampling.max_new_tokens = args.new
  c.rl.prompts_per_batch, c.rl.group_size = args.prompts, args.G
  c.rl.num_minibatches, c.rl.epochs = args.minibatches, args.epochs
  c.rl.micro_batches, c.rl.score_micro_batches = args.micro, args.score_micro
  c.rl.lambda_attn, c.rl.beta = 1.0, args.beta
  c.rl.reward = 'bench_coin'
  c.rl.logprob_chunk = args.logprob_chunk
  c.rl.share_prompt = bool(args.share_prompt)
  c.train.sft_steps, c.train.rl_steps = 0, args.steps
  c.mesh.shape = (1, 1, 1)
  return c


def _batch(args, cfg):
  import numpy as np
  from ral_jax.models.positions import rope_index
  from ral_jax.models.vision_inputs import build_vision_inputs_batch
  (gt, gh, gw), p, nv, tp = shapes(args, cfg)
  rng = np.random.default_rng(0)
  ids, pos = [], []
  for _ in range(args.prompts):
    pre, post = rng.integers(100, 1000, args.text // 2), rng.integers(100, 1000, args.text - args.text // 2)
    x = np.concatenate([pre, [cfg.vision_start_token_id], np.full(nv, cfg.video_token_id),
                        [cfg.vision_end_token_id], post]).astype(np.int32)
    ids.append(x)
    pos.append(rope_index(x, np.ones_like(x), [[gt, gh, gw]], [2], [1.0], cfg))
  grid = np.array([[[gt, gh, gw]]] * args.prompts)
  meta = build_vision_inputs_batch(grid, p, cfg.vision, media_kind=np.full((args.prompts, 1), 2, np.int32))
  return {'prompt_ids': np.stack(ids), 'prompt_mask': np.ones((args.prompts, tp), np.int32),
          'positions': np.stack(pos, axis=1).astype(np.int32),
          'pixel_values': rng.standard_normal((args.prompts, p, cfg.vision.patch_dim), np.float32),
          'vision_meta': meta, 'answer': ['A'] * args.prompts, 'problem_type': ['multiple choice'] * args.prompts,
          'options': [''] * args.prompts, '_grid': grid}


class IdsAsText:
  """The benchmark's 'tokenizer': a response is its token ids as text (rewards only need strings)."""

  def decode(self, ids, **kw):
    return ' '.join(str(int(i)) for i in ids)


def run_jax(args, preset: str) -> dict:
  import zlib
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.94')   # the 3B state + reference + rollout cache
  import jax
  import numpy as np
  from ral_jax.data.tokenizer import SpecialIds
  from ral_jax.rl import rewards
  from ral_jax import sharding
  from ral_jax.train import build, stages
  from ral_jax.train import config as rc
  from ral_jax.bench import profile_summary

  @rewards.register_reward('bench_coin')
  def coin(response, record):   # deterministic coin flip of the response text
    return float(zlib.crc32(response.encode()) % 2)

  config = _config(args, preset)
  run = rc.build(config, jax.device_count(), warn=False)
  mesh, rules = sharding.make_mesh(run.mesh.shape), sharding.logical_rules(run.mesh.rules)
  cfg = run.model
  (_, _, _), p, nv, tp = shapes(args, cfg)
  res = {'preset': preset, 'device': jax.devices()[0].device_kind, 'jax': jax.__version__, 'rows': args.prompts * args.G,
         'prompt_len': tp, 'new': args.new, 'patches': p, 'visual_tokens': nv, 'param_dtype': cfg.param_dtype,
         'dtype': cfg.dtype, 'attention_impl': cfg.attention_impl, 'micro_batches': args.micro,
         'score_micro_batches': args.score_micro or args.minibatches, 'share_prompt': bool(args.share_prompt),
         'remat': cfg.remat_policy, 'scan_layers': cfg.scan_layers, 'logprob_chunk': args.logprob_chunk}
  t0 = time.perf_counter()
  params = build.init_model_params(cfg, mesh, rules, run.seed)
  jax.block_until_ready(params)
  res['init_s'] = time.perf_counter() - t0
  print(f'[jax {preset}] random init {res["init_s"]:.1f} s', flush=True)
  t0 = time.perf_counter()
  state = build.create_state(params, build.optim.make_optimizer(run.rl_optim), run.seed)
  ref = build.reference_of(state.params)
  del params
  steps = build.make_steps(run, cfg, 'rl', build.state_shardings_of(state))
  jax.block_until_ready((state, ref))
  res['state_s'] = time.perf_counter() - t0
  v = cfg.vocab_size     # Qwen ids; the tiny smoke-test model takes its last ids
  pad, eos, start = (151643, 151645, 151644) if v > 151645 else (v - 1, v - 2, v - 3)
  ids = SpecialIds(pad=pad, eos=(eos, pad), end_of_turn=eos, im_start=start,
                   image_pad=cfg.image_token_id, video_pad=cfg.video_token_id,
                   vision_start=cfg.vision_start_token_id, vision_end=cfg.vision_end_token_id)
  ctx = stages.Context(run=run, model_cfg=cfg, mesh=mesh, rules=rules, tokenizer=IdsAsText(), ids=ids)
  batch = _batch(args, cfg)
  util = Utilization()
  per_step = []
  for i in range(args.steps):
    if i == 1:
      util.start()
    prof = (profile_summary.capture(os.path.join(args.profile, preset), args.profile_top)
            if args.profile and i == args.steps - 1 and i > 0 else contextlib.nullcontext({}))
    with prof as got:
      t = time.perf_counter()
      state, m, _ = stages.rl_step(ctx, steps, state, ref, batch, jax.random.PRNGKey(i))
      jax.block_until_ready(state)
      dt = time.perf_counter() - t
    if 'summary' in got or args.profile and i == args.steps - 1:
      res['profile'] = got.get('summary')
    if i == 0:
      res['time_to_first_step_s'] = time.perf_counter() - T_PROCESS
    per_step.append({'step': dt, 'rollout': m['time/rollout'], 'scoring': m['time/scoring'],
                     'update': m['time/update'], 'skipped': float(m.get('skipped', 0)),
                     'loss': float(m.get('loss', float('nan'))), 'ral/jsd': float(m.get('ral/jsd', float('nan')))})
    print(f'[jax {preset}] step {i}: {json.dumps(per_step[-1])}', flush=True)
  busy = util.stop()
  util.close()
  steady = per_step[1:] or per_step
  mean = {k: float(np.mean([s[k] for s in steady])) for k in ('step', 'rollout', 'scoring', 'update')}
  res['steps'] = per_step
  res['phases'] = phase_report(cfg, args, mean, tp, args.new, shared=bool(args.share_prompt))
  res['flop_count'] = FLOP_COUNTS[bool(args.share_prompt)]
  res['compile_estimate_s'] = per_step[0]['step'] - mean['step'] if len(per_step) > 1 else None
  res['gpu_idle_share'] = None if busy is None else 1.0 - busy
  stats = jax.devices()[0].memory_stats() or {}
  res['peak_bytes_in_use'] = stats.get('peak_bytes_in_use')
  if args.ckpt:
    import tempfile
    from ral_jax.train import checkpoint as ckpt_lib
    with tempfile.TemporaryDirectory(dir=args.ckpt_dir or None) as d:
      ck = ckpt_lib.Checkpointer(d, 1, 1, True)
      as_loop = ref if ckpt_lib.reference_source(args.beta, rl_from_start=True) == 'saved' else None
      what = {'all': (state, as_loop), 'state': (state, None), 'ref': (state.replace(params=ref, opt_state=()), None),
              'state+ref': (state, ref)}
      st, rf = what[args.ckpt_items]
      res['ckpt_items'] = args.ckpt_items
      res['ckpt_bytes'] = sum(x.nbytes for x in jax.tree.leaves((st, rf)))
      ckpt_lib.params_finite(st.params)   # compiled (and checked) before the save, as the loop does
      t = time.perf_counter()
      ck.save(1, st, {'outer_step': 1}, ref=rf)
      res['ckpt_blocking_s'] = time.perf_counter() - t
      t = time.perf_counter()
      ck.wait()
      res['ckpt_finalize_s'] = time.perf_counter() - t
      ck.close()
    print(f'[jax {preset}] checkpoint ({args.ckpt_items}, {res["ckpt_bytes"] / 1e9:.1f} GB): blocking '
          f'{res["ckpt_blocking_s"]:.1f} s, finalize {res["ckpt_finalize_s"]:.1f} s', flush=True)
  return res


# ---------------------------------------------------------------------------------------------------------------
# torch: the same step with transformers

def _merged_embeds(out, rows: int):
  """The vision tower's merged embeddings [rows, D]: a tensor in transformers 4.x, a BaseModelOutputWithPooling
  (the merger's output in one of its fields) in 5.x."""
  import torch
  if torch.is_tensor(out):
    return out
  fields = [getattr(out, k, None) for k in ('pooler_output', 'last_hidden_state')]
  return next(t for t in fields if t is not None and t.shape[0] == rows)


def run_torch(args, preset: str) -> dict:
  import copy
  import numpy as np
  import torch
  import transformers
  from ral_jax.models.config import get_preset
  cfg = get_preset(preset)
  (gt, gh, gw), p, nv, tp = shapes(args, cfg)
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  wdt = torch.bfloat16 if '7b' in preset else torch.float32
  flat = {k: v for k, v in cfg.to_hf().items() if k not in ('torch_dtype', 'dtype')}
  vis_cfg = dict(flat.pop('vision_config'))
  if float(vis_cfg['tokens_per_second']).is_integer():
    vis_cfg['tokens_per_second'] = int(vis_cfg['tokens_per_second'])
  tokens = {k: flat[k] for k in cfg._TOKEN_KEYS}
  hcfg = transformers.Qwen2_5_VLConfig(text_config=flat, vision_config=vis_cfg, **tokens)
  t0 = time.perf_counter()
  torch.set_default_dtype(wdt)
  with torch.device(dev):
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(hcfg, attn_implementation='sdpa')
  torch.set_default_dtype(torch.float32)
  with torch.no_grad():
    for q in model.parameters():
      q.normal_(0.0, 0.02)
  # The last decoder layer reads its attention weights: eager attention there only, weights caught by a hook.
  layers = model.model.language_model.layers
  last = layers[-1].self_attn
  sdpa_cfg = last.config
  eager_cfg = copy.copy(sdpa_cfg)
  eager_cfg._attn_implementation = 'eager'
  caught = {}
  last.register_forward_hook(lambda mod, inp, out: caught.__setitem__('w', out[1]))
  ref = copy.deepcopy(model.model.language_model).eval().to(torch.bfloat16)   # frozen reference decoder
  ref.layers[-1].self_attn._forward_hooks.clear()
  ref.layers[-1].self_attn.config = sdpa_cfg                                      # it records nothing
  ref_head = copy.deepcopy(model.lm_head).to(torch.bfloat16)
  for q in list(ref.parameters()) + list(ref_head.parameters()):
    q.requires_grad_(False)
  for q in model.model.visual.parameters():
    q.requires_grad_(False)
  opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-6, weight_decay=0.0)
  init_s = time.perf_counter() - t0
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
  b = _batch(args, cfg)
  ids = torch.tensor(b['prompt_ids'], dtype=torch.long, device=dev)
  pixels = torch.tensor(b['pixel_values'].reshape(-1, cfg.vision.patch_dim), device=dev, dtype=torch.bfloat16)
  grid = torch.tensor([[gt, gh, gw]] * args.prompts, device=dev)
  G, new, rows = args.G, args.new, args.prompts * args.G
  amp = torch.autocast(dev, dtype=torch.bfloat16)

  def policy_rows(w, resp_start):
    """Head-averaged attention rows of the response positions, renormalised over earlier keys (method Eq. 2)."""
    a = w[:, :, resp_start:, :].float().mean(1)                                  # [B,R,S]
    r = torch.arange(resp_start, w.shape[-1], device=w.device)[:, None]
    a = a * (torch.arange(w.shape[-1], device=w.device)[None, :] < r)
    return a / a.sum(-1, keepdim=True).clamp_min(1e-30)

  def token_logprobs(logits, seq, resp_start):
    lp = torch.log_softmax(logits[:, resp_start - 1:-1].float(), -1)
    return lp.gather(-1, seq[:, resp_start:, None])[..., 0]


  def one_step(seed):
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model.eval()
    last.config = sdpa_cfg        # sampling reads no attention (eager here: 40 GiB softmax at prefill, measured)
    with torch.no_grad(), amp:
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels,
                           video_grid_thw=grid, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           num_return_sequences=G, max_new_tokens=new, min_new_tokens=new,
                           pad_token_id=min(151643, cfg.vocab_size - 1))
    seqs = out                                                                   # [rows, Tp + new]
    texts = [' '.join(str(int(t)) for t in r[tp:]) for r in seqs.cpu().numpy()]
    import zlib
    rew = torch.tensor([float(zlib.crc32(s.encode()) % 2) for s in texts], device=dev).view(args.prompts, G)
    adv = ((rew - rew.mean(1, keepdim=True)) / (rew.std(1, keepdim=True) + 1e-6)).view(-1)
    sync()
    t1 = time.perf_counter()
    last.config = eager_cfg       # scoring and update read the last layer's weights
    # Scoring: old log-probs + old attention rows (policy), reference log-probs.
    mask = torch.ones_like(seqs)
    n_chunks = args.minibatches * args.micro     # update-sized chunks: eager weights of larger ones do not fit
    old_lp, old_pol, ref_lp = [], [], []
    with torch.no_grad(), amp:
      # the vision tower once per prompt, its embeddings reused by scoring and update (as the jax trainer does)
      vis = _merged_embeds(model.model.visual(pixels, grid_thw=grid), args.prompts * nv)
      vis = vis.view(args.prompts, nv, -1).to(torch.bfloat16)
      vis = vis.repeat_interleave(G, 0)
      rope_kw = {}
      if 'mm_token_type_ids' in inspect.signature(model.model.get_rope_index).parameters:   # transformers 5.x
        rope_kw['mm_token_type_ids'] = (seqs == cfg.video_token_id).long() * 2
      pos, _ = model.model.get_rope_index(input_ids=seqs, video_grid_thw=grid.repeat_interleave(G, 0),
                                          attention_mask=mask, **rope_kw)

    def embed(c, table):
      e = table(seqs[c])
      vm = (seqs[c] == cfg.video_token_id)
      return e.masked_scatter(vm[..., None], vis[c].to(e.dtype))

    with torch.no_grad(), amp:
      for c in torch.arange(rows, device=dev).chunk(n_chunks):
        o = model(inputs_embeds=embed(c, model.model.get_input_embeddings()), position_ids=pos[:, c],
                  attention_mask=mask[c], use_cache=False)
        old_lp.append(token_logprobs(o.logits, seqs[c], tp))
        old_pol.append(policy_rows(caught.pop('w'), tp))
        h = ref(inputs_embeds=embed(c, ref.embed_tokens), position_ids=pos[:, c], attention_mask=mask[c],
                use_cache=False).last_hidden_state
        ref_lp.append(token_logprobs(ref_head(h), seqs[c], tp))
    old_lp, old_pol, ref_lp = torch.cat(old_lp), torch.cat(old_pol), torch.cat(ref_lp)
    sync()
    t2 = time.perf_counter()
    # Update: num_minibatches optimizer steps, micro-batch accumulation, gradient checkpointing.
    model.train()
    model.gradient_checkpointing_enable()
    for e in range(args.epochs):
      for mbi in range(args.minibatches):
        mb = torch.arange(mbi, rows, args.minibatches, device=dev)
        n_tok = float(len(mb) * new)
        for c in mb.chunk(args.micro):
          with amp:
            o = model(inputs_embeds=embed(c, model.model.get_input_embeddings()), position_ids=pos[:, c],
                      attention_mask=mask[c], use_cache=False)
            lp = token_logprobs(o.logits, seqs[c], tp)
            pol = policy_rows(caught.pop('w'), tp)
          ratio = torch.exp(lp - old_lp[c])
          a = adv[c][:, None]
          pg = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
          kl = torch.exp(ref_lp[c] - lp) - (ref_lp[c] - lp) - 1
          q = old_pol[c]
          mid = 0.5 * (pol + q)
          jsd = 0.5 * ((pol * (torch.log(pol + 1e-12) - torch.log(mid + 1e-12))).sum(-1)
                       + (q * (torch.log(q + 1e-12) - torch.log(mid + 1e-12))).sum(-1))
          loss = ((pg + args.beta * kl).sum() + (a * jsd).sum()) / n_tok
          loss.backward()
          caught.pop('w', None)        # the checkpointed recomputation caught it again
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.gradient_checkpointing_disable()
    sync()
    t3 = time.perf_counter()
    return {'step': t3 - t0, 'rollout': t1 - t0, 'scoring': t2 - t1, 'update': t3 - t2}

  if dev == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  per_step = []
  util = Utilization() if dev == 'cuda' else None
  for i in range(args.torch_steps):
    if i == 1 and util:
      util.start()
    per_step.append(one_step(i))
    if i == 0:
      per_step[0]['time_to_first_step_s'] = time.perf_counter() - T_PROCESS
    print(f'[torch {preset}] step {i}: {json.dumps(per_step[-1])}', flush=True)
  busy = util.stop() if util else None
  if util:
    util.close()
  steady = per_step[1:] or per_step
  mean = {k: float(np.mean([s[k] for s in steady])) for k in ('step', 'rollout', 'scoring', 'update')}
  return {'preset': preset, 'device': torch.cuda.get_device_name() if dev == 'cuda' else 'cpu',
          'torch': torch.__version__, 'transformers': transformers.__version__, 'init_s': init_s,
          'weights_dtype': str(wdt), 'steps': per_step, 'phases': phase_report(cfg, args, mean, tp, new),
          'flop_count': FLOP_COUNTS[False],
          'gpu_idle_share': None if busy is None else 1.0 - busy,
          'peak_bytes': torch.cuda.max_memory_allocated() if dev == 'cuda' else None}


# ---------------------------------------------------------------------------------------------------------------

ARGS = ('prompts', 'G', 'frames', 'side', 'text', 'new', 'steps', 'torch_steps', 'minibatches', 'epochs', 'micro',
        'score_micro', 'beta', 'dtype', 'remat', 'attention_impl', 'logprob_chunk', 'ckpt', 'ckpt_dir', 'ckpt_items', 'profile',
        'share_prompt', 'profile_top', 'scan_layers')


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--runs', default='jax:qwen2_5_vl_3b,torch:qwen2_5_vl_3b',
                  help='comma list of impl:preset, impl in jax|torch; each in its own subprocess')
  ap.add_argument('--prompts', type=int, default=16)
  ap.add_argument('--G', type=int, default=8)
  ap.add_argument('--frames', type=int, default=16)
  ap.add_argument('--side', type=int, default=448)
  ap.add_argument('--text', type=int, default=254)
  ap.add_argument('--new', type=int, default=512)
  ap.add_argument('--steps', type=int, default=3, help='jax steps (the first compiles; the rest are averaged)')
  ap.add_argument('--torch_steps', type=int, default=2)
  ap.add_argument('--minibatches', type=int, default=4)
  ap.add_argument('--epochs', type=int, default=1)
  ap.add_argument('--micro', type=int, default=4, help='micro-batches per mini-batch (rl.micro_batches)')
  ap.add_argument('--score_micro', type=int, default=0, help='rl.score_micro_batches (0 = --minibatches)')
  ap.add_argument('--beta', type=float, default=0.04)
  ap.add_argument('--dtype', default='bfloat16')
  ap.add_argument('--remat', default='nothing_saveable')
  ap.add_argument('--attention_impl', default='cudnn')
  ap.add_argument('--logprob_chunk', type=int, default=256)
  ap.add_argument('--ckpt', type=int, default=1, help='1: time an async save of the final state (jax)')
  ap.add_argument('--ckpt_dir', default='', help='where the timed checkpoint goes (default: a temp dir)')
  ap.add_argument('--ckpt_items', default='all', help="what the timed save holds: 'all' (as the trainer: the "
                  "state, and the reference where it cannot be re-derived), 'state+ref', 'state', or 'ref' (the "
                  "reference alone: when the disk is small)")
  ap.add_argument('--profile', default='', help='a folder: profile the last jax step there and report where its '
                  'device time goes (bench/profile_summary.py); the profiled step is timed too (slightly slower)')
  ap.add_argument('--profile_top', type=int, default=25, help='kernels listed in the profile summary')
  ap.add_argument('--scan_layers', type=int, default=1, help='0: the decoder layers in a Python loop (model.scan_layers)')
  ap.add_argument('--share_prompt', type=int, nargs='?', const=1, default=0,
                  help='jax: rl.share_prompt (each prompt computed once for its G samples in scoring and update); '
                  'FLOPs and MFU then count the tokens actually computed')
  ap.add_argument('--timeout', type=int, default=420, help='seconds per run')
  ap.add_argument('--out', default=os.path.join(os.environ.get('OUT', '.'), 'bench_rl_step.json'))
  ap.add_argument('--_one', default='', help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args._one:
    impl, preset = args._one.split(':')
    res = (run_jax if impl == 'jax' else run_torch)(args, preset)
    print('RESULT ' + json.dumps(res), flush=True)
    return
  results = {}
  for spec in [s for s in args.runs.split(',') if s]:
    cmd = [sys.executable, '-m', 'ral_jax.bench.rl_step', f'--_one={spec}'] + [
        f'--{k}={getattr(args, k)}' for k in ARGS]
    print('$ ' + ' '.join(cmd), flush=True)
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
      out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      out, err, rc = (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or ''), \
          f'timed out after {args.timeout} s', -1
    lines = [l for l in out.splitlines() if l.startswith('RESULT ')]
    print('\n'.join(l for l in out.splitlines() if not l.startswith('RESULT '))[-4000:], flush=True)
    if rc or not lines:
      print(f'{spec} failed (rc {rc}):\n{err[-4000:]}', flush=True)
      results[spec] = {'error': err[-3000:]}
      continue
    results[spec] = json.loads(lines[-1][len('RESULT '):])
  ratios = {}
  for spec, r in results.items():
    if spec.startswith('torch:') and 'phases' in r:
      j = results.get('jax:' + spec.split(':', 1)[1], {})
      if 'phases' in j:
        ratios[spec.split(':', 1)[1]] = {k: r['phases'][k]['s'] / j['phases'][k]['s']
                                         for k in ('step', 'rollout', 'scoring', 'update')}
  results['torch_over_jax'] = ratios
  bench.report(results, args.out)


if __name__ == '__main__':
  main()
