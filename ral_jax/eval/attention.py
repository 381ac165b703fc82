"""Attention snapshots of a model on a data batch: greedy answer, its attention-policy rows, heat-map PNGs.

`snapshot(ctx, params, batch, out_dir, tag, ...)` is what the trainer calls every E steps (and the evaluation
loop on its first batch): it decodes greedily, runs the training forward once over `prompt | response` with the
attention record of one layer (rows of the response tokens, ral_jax/docs/method.md s.1), and draws, for the first few
examples, the visual-token attention averaged over the answer (heatmaps.render_batch). Only process 0 writes.

Everything device-side reuses the trainer's pieces: stages.Context (vision tower, sampling config), rollout.generate,
batches.sequence_inputs, rl.attention_loss.record_rows.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ral_jax.train import inputs as batches
from ral_jax.rollout import engine as rollout
from ral_jax.eval import heatmaps
from ral_jax.models.vlm import Qwen25VL
from ral_jax.rl.attention_loss import record_rows


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _policy_rows(cfg, params, x, keep, tr, layer, rows):
  """Attention-policy rows [keep,Tr,S] of the first `keep` sequences of x (one recorded layer)."""
  x = jax.tree.map(lambda a: a[:keep] if a is not None else None, x)
  n, t = x.input_ids.shape
  out = Qwen25VL(cfg).apply({'params': params}, x.input_ids, jnp.swapaxes(x.positions, 0, 1), x.attention_mask,
                            visual_embeds=x.visual_embeds, record_rows=record_rows(n, t - tr, tr, rows),
                            record_layers=(layer,), return_hidden=True)
  return next(iter(out.record.values()))['policy']


def greedy_with_policy(ctx, params, batch: Dict, keep: int, rng=None, layer: int = -1,
                       rows: str = 'response', greedy: bool = True) -> Dict[str, np.ndarray]:
  """Greedy responses of a data batch and the attention rows of its first `keep` examples (host arrays).
  greedy=False samples with the config's sampling settings (temperature, top-k, top-p) instead.

  Returns {'texts' [B] (decoded), 'tokens' [B,Tr], 'response_mask' [B,Tr], 'lengths' [B], 'input_ids'
  [keep,S], 'policy' [keep,Tr,S]} for this process's rows.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  cfg = ctx.model_cfg
  dev = batches.to_device(batch, ctx.mesh)
  vis = ctx.encode(params, cfg, dev)
  prompts = {k: dev[k] for k in ('prompt_ids', 'prompt_mask', 'positions')}
  out = rollout.generate(params, cfg, prompts, vis, rng, ctx.sampling(greedy=greedy), 1, mesh=ctx.mesh,
                         rules=ctx.rules)
  x = batches.sequence_inputs(dev['prompt_ids'], dev['prompt_mask'], dev['positions'], out.tokens,
                              out.response_mask, vis)
  tr = out.tokens.shape[1]
  keep = max(1, min(keep, x.input_ids.shape[0]))
  layer = layer if layer >= 0 else cfg.num_hidden_layers + layer
  policy = _policy_rows(cfg, params, x, keep, tr, layer, rows)
  tokens, lengths = batches.host_rows(out.tokens), batches.host_rows(out.lengths)
  return {
      'texts': np.array(batches.decode_responses(ctx.tokenizer, tokens, lengths, ctx.ids.eos)),
      'tokens': tokens, 'lengths': lengths, 'response_mask': batches.host_rows(out.response_mask),
      'input_ids': np.asarray(jax.device_get(x.input_ids[:keep])), 'policy': np.asarray(jax.device_get(policy)),
  }


def captions(ctx, batch: Dict, texts, examples) -> Dict[int, str]:
  """{b: 'Q: question / reference: X / model: response (correct|wrong)'} for the heat-map pictures."""
  from ral_jax.rl import rewards as rewards_lib
  try:
    _, per, _ = rewards_lib.compute_rewards(list(texts), batches.reward_records(batch), ctx.score_config(), 1)
    ok = np.asarray(per['accuracy'])
  except Exception:  # noqa: BLE001  (a picture without the verdict beats no picture)
    ok = None
  out = {}
  for b in examples:
    q = str(batch['question'][b]) if 'question' in batch else ''
    verdict = '' if ok is None else (' (correct)' if ok[b] > 0 else ' (wrong)')
    out[b] = f'Q: {q}\nreference: {batch["answer"][b]!s}   model: {str(texts[b])!r}{verdict}'
  return out


def snapshot(ctx, params, batch: Dict, out_dir: str, tag: str, step: Optional[int] = None,
             examples: Sequence[int] = (0, 1), tb_writer=None, rng=None, layer: int = -1,
             rows: str = 'response', token: Optional[int] = None) -> Dict[int, List[str]]:
  """Heat maps of where the model looks while answering the first `examples` of `batch`.

  By default the attention rows are averaged over each answer (all its response tokens); `token=j` draws the
  row of response token j only (clipped to the answer's last token).

  ctx: stages.Context; params: the policy parameters; batch: a host data batch (as from the eval pipeline);
  out_dir/tag: files <out_dir>/<tag>_ex<b>_m<j>[_t<k>].png plus <tag>_answers.txt (the greedy answers);
  tb_writer: optional tensorboardX SummaryWriter for image summaries at `step`. Returns {example: [paths]}.
  """
  examples = [b for b in examples if b < len(batch['prompt_ids'])]
  res = greedy_with_policy(ctx, params, batch, max(examples) + 1 if examples else 1, rng, layer, rows)
  if jax.process_index() != 0 or not examples:
    return {}
  row_weights = res['response_mask'][:res['policy'].shape[0]].astype(np.float32)
  if token is not None:
    last = np.maximum(row_weights.sum(1).astype(int) - 1, 0)
    pick = np.minimum(token, last)
    row_weights = np.zeros_like(row_weights)
    row_weights[np.arange(len(pick)), pick] = 1.0
  host = {'input_ids': res['input_ids'], 'pixel_values': batch['pixel_values'], 'grid_thw': batch['grid_thw'],
          'media_kind': batch['media_kind']}
  host.update({k: batch[k] for k in ('evidence_mask', 'has_evidence') if k in batch})
  paths = heatmaps.render_batch(out_dir, tag, host, res['policy'], row_weights, ctx.model_cfg, examples,
                                tb_writer=tb_writer, step=step, captions=captions(ctx, batch, res['texts'], examples))
  with open(os.path.join(out_dir, f'{tag}_answers.txt'), 'w', encoding='utf-8') as f:
    for b in examples:
      f.write(f"ex{b} id={batch['id'][b] if 'id' in batch else b} answer={batch['answer'][b]!s}\n"
              f"  response: {str(res['texts'][b])!r}\n")
  return paths
