"""One outer step of each stage, orchestrated (no math here): SFT step, RL step, held-out evaluation.

RL step (ral_jax/docs/design.md): prompts -> vision tower once -> rollout (G samples per prompt) -> decode +
rewards (host) -> group advantages -> scoring pass with the current params (old log-probs, old attention policy)
and the frozen reference (reference log-probs) [-> teacher forward for distillation] -> epochs x mini-batch updates.
Every function returns (state, metrics dict of scalars); timings are wall-clock seconds of each phase.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from ral_jax import sharding
from ral_jax.train import inputs as batches
from ral_jax.rollout import engine as rollout
from ral_jax.rollout import sampling as sampling_lib
from ral_jax.eval import evidence as eval_evidence
from ral_jax.rl import advantages as adv_lib
from ral_jax.rl import evidence as evidence_lib
from ral_jax.rl import rewards as rewards_lib
from ral_jax.rl.objective import RLBatch
from ral_jax.train.step import encode_vision


@dataclasses.dataclass
class Context:
  """What every stage needs: model config, mesh, tokenizer and its special ids, configs."""
  run: Any             # RunConfig
  model_cfg: Any
  mesh: Any
  rules: Any
  tokenizer: Any
  ids: Any             # data.tokenizer.SpecialIds
  teacher_cfg: Any = None
  teacher_params: Any = None
  _encode: Any = None

  def encode(self, params, cfg, dev):
    if self._encode is None:
      self._encode = jax.jit(encode_vision, static_argnums=0)
    return self._encode(cfg, params, dev['pixel_values'], dev['vision_meta'])

  def sampling(self, greedy: bool = False) -> sampling_lib.SamplingConfig:
    """The run's sampling config with the tokenizer's stop and pad ids (greedy=True: argmax decoding)."""
    s = self.run.sampling
    return dataclasses.replace(s, greedy=greedy or s.greedy, stop_ids=tuple(self.ids.eos), pad_id=self.ids.pad)

  def format_reward(self) -> str:
    return 'format_answer_only' if self.run.rl.format == 'answer_only' else 'format_think_answer'

  def reward_config(self) -> rewards_lib.RewardConfig:
    """The training reward: 'default' = accuracy_weight * accuracy + format_weight * format, else the named
    registered reward (rl.rewards.register_reward) with weight 1."""
    r = self.run.rl
    if r.reward != 'default':
      return rewards_lib.RewardConfig(terms=((r.reward, 1.0),))
    return rewards_lib.RewardConfig(terms=(('accuracy', r.accuracy_weight), (self.format_reward(), r.format_weight)))

  def score_config(self) -> rewards_lib.RewardConfig:
    """What is reported as accuracy and format rate, whatever the training reward."""
    return rewards_lib.RewardConfig(terms=(('accuracy', 1.0), (self.format_reward(), 1.0)))


def sft_step(ctx: Context, steps, state, batch: Dict):
  dev = batches.to_device(batch, ctx.mesh)
  vis = ctx.encode(state.params, ctx.model_cfg, dev)
  x = batches.sequence_inputs(dev['prompt_ids'], dev['prompt_mask'], dev['positions'], dev['target_ids'],
                              dev['target_mask'], vis)
  state, m = steps.update(state, x, dev['target_ids'], dev['target_mask'])
  return state, dict(m)


def _rollout(ctx: Context, params, dev, vis, rng, G: int, greedy: bool):
  prompts = {k: dev[k] for k in ('prompt_ids', 'prompt_mask', 'positions')}
  return rollout.generate(params, ctx.model_cfg, prompts, vis, rng, ctx.sampling(greedy), G, mesh=ctx.mesh,
                          rules=ctx.rules)


def _texts_and_rewards(ctx: Context, out, batch, G: int):
  tokens, lengths = batches.host_rows(out.tokens), batches.host_rows(out.lengths)
  texts = batches.decode_responses(ctx.tokenizer, tokens, lengths, ctx.ids.eos)
  records = batches.reward_records(batch)
  total, _, metrics = rewards_lib.compute_rewards(texts, records, ctx.reward_config(), G)
  _, per, _ = rewards_lib.compute_rewards(texts, records, ctx.score_config(), G)
  per = {'accuracy': per['accuracy'], 'format': per[ctx.format_reward()]}
  return texts, total, per, metrics, lengths


def rl_step(ctx: Context, steps, state, ref_params, batch: Dict, rng):
  """One rollout batch and its updates. Returns (state, metrics, sample_texts)."""
  run, G = ctx.run, ctx.run.rl.group_size
  cfg = ctx.model_cfg
  t0 = time.perf_counter()
  dev = batches.to_device(batch, ctx.mesh)
  vis = ctx.encode(state.params, cfg, dev)
  out = _rollout(ctx, state.params, dev, vis, rng, G, greedy=False)
  texts, rewards, per, rmetrics, lengths = _texts_and_rewards(ctx, out, batch, G)
  t1 = time.perf_counter()
  a = np.asarray(adv_lib.group_advantages(jnp.asarray(rewards), G, run.advantage))
  adv = sharding.shard_batch({'a': a}, ctx.mesh)['a']
  x = batches.sequence_inputs(dev['prompt_ids'], dev['prompt_mask'], dev['positions'], out.tokens,
                              out.response_mask, vis, repeats=G)
  old_lp, old_pol, ref_lp = steps.score(state.params, ref_params, x, out.tokens)
  teacher_hidden = teacher_policy = teacher_kernel = None
  if steps.teacher is not None:
    tvis = ctx.encode(ctx.teacher_params, ctx.teacher_cfg, dev)
    tx_in = x.replace(visual_embeds=jnp.repeat(tvis, G, axis=0))
    teacher_hidden, teacher_policy = steps.teacher(ctx.teacher_params, tx_in, out.tokens)
    from ral_jax.models.vlm import lm_head_kernel
    teacher_kernel = lm_head_kernel(ctx.teacher_params, ctx.teacher_cfg)
    if steps.sc.objective.distill.mu == 0:
      teacher_hidden = teacher_kernel = None
  rl_batch = RLBatch(
      response_ids=out.tokens, response_mask=out.response_mask, advantages=adv, old_logprobs=old_lp,
      ref_logprobs=ref_lp, old_policy=old_pol, key_mask=x.attention_mask,
      visual_key_mask=batches.visual_key_mask(x.input_ids, cfg.image_token_id, cfg.video_token_id),
      teacher_policy=teacher_policy, **evidence_lib.batch_fields(dev, out.tokens.shape[1], G))
  # Sanity metric: sampler log-probs vs the training forward (same params, same temperature).
  mask = out.response_mask.astype(jnp.float32)
  lp_gap = jnp.sum(jnp.abs(out.logprobs - old_lp) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  jax.block_until_ready(old_lp)
  t2 = time.perf_counter()
  if teacher_hidden is not None:
    state, m = steps.update(state, x, rl_batch, teacher_hidden, teacher_kernel)
  else:
    state, m = steps.update(state, x, rl_batch)
  jax.block_until_ready(state.step)
  t3 = time.perf_counter()
  n_tok = float(np.sum(lengths))
  groups = a.reshape(-1, G)
  metrics = dict(m)
  metrics.update({
      'reward': float(rewards.mean()), 'accuracy': float(per['accuracy'].mean()),
      'format': float(per['format'].mean()),
      'adv/mean_abs': float(np.abs(a).mean()), 'adv/std': float(a.std()),
      'adv/frac_zero_groups': float(np.mean(np.all(groups == 0, axis=1))),
      'resp_len': float(lengths.mean()), 'resp_len_max': float(lengths.max()),
      'stop_eos_frac': float(np.mean(batches.host_rows(out.stop_reason) == rollout.STOP_EOS)),
      'sampler_logprob_gap': lp_gap,
      'time/rollout': t1 - t0, 'time/scoring': t2 - t1, 'time/update': t3 - t2, 'time/step': t3 - t0,
      'tokens_per_s': n_tok / max(t1 - t0, 1e-9),
  })
  metrics.update({k: v for k, v in rmetrics.items() if k.startswith('reward/')})
  return state, metrics, texts


def evaluate(ctx: Context, params, eval_batches, rng) -> Dict[str, float]:
  """Greedy held-out accuracy and format rate over a fixed list of data batches; with evidence in the data also
  'eval/evidence_mass' and 'eval/evidence_chance' (eval/evidence.py), and 'eval/accuracy/<data_source>' per
  record data_source (the synthetic tasks write their task name there) with train.eval_by_source (single process)."""
  acc, fmt, n = 0.0, 0.0, 0
  ev = {'sum': 0.0, 'chance_sum': 0.0, 'n': 0.0}
  has_ev = False
  by_source = {}   # data_source -> [correct, count]
  t0 = time.perf_counter()
  for batch in eval_batches:
    dev = batches.to_device(batch, ctx.mesh)
    vis = ctx.encode(params, ctx.model_cfg, dev)
    out = _rollout(ctx, params, dev, vis, rng, 1, greedy=True)
    _, _, per, _, _ = _texts_and_rewards(ctx, out, batch, 1)
    has_ev = has_ev or 'evidence_mask' in batch
    for k, v in eval_evidence.heldout_evidence(ctx, params, dev, out, vis).items():
      ev[k] += v
    for src, a in zip(batch.get('data_source', ()), per['accuracy']):
      c = by_source.setdefault(str(src), [0.0, 0])
      c[0], c[1] = c[0] + float(a), c[1] + 1
    acc += float(per['accuracy'].sum())
    fmt += float(per['format'].sum())
    n += len(per['accuracy'])
  n = max(n, 1)
  res = {'eval/accuracy': acc / n, 'eval/format': fmt / n, 'eval/examples': float(n),
         'time/eval': time.perf_counter() - t0}
  # Per-task keys depend on the rows a host saw, so they are single-process only (hosts must log the same keys).
  if ctx.run.loop.eval_by_source and jax.process_count() == 1 and by_source:
    res.update({f'eval/accuracy/{s or "other"}': c / k for s, (c, k) in sorted(by_source.items())})
  if has_ev:   # the same keys on every host (the manifests decide); nan where no example had evidence
    res.update({'eval/evidence_mass': ev['sum'] / ev['n'] if ev['n'] else float('nan'),
                'eval/evidence_chance': ev['chance_sum'] / ev['n'] if ev['n'] else float('nan')})
  return res
