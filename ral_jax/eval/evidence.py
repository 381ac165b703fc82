"""Held-out attention-on-evidence: the recorded attention policy of greedy answers, scored by rl/evidence.py.

`heldout_evidence(ctx, params, dev, out, vis)` runs the training forward once over `prompt | greedy response` with
the attention record of the training layer and rows (RunConfig.record_layer, objective.ral.rows) and returns the sums
that stages.evaluate averages into 'eval/evidence_mass' (mean over examples with evidence of the per-example
mean over response rows of the visual mass on evidence tokens) and 'eval/evidence_chance' (the share of visual
tokens that are evidence: what uniform attention over the visual tokens would score).
"""
from __future__ import annotations

import functools
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from ral_jax.models.vlm import Qwen25VL
from ral_jax.rl.aggregation import as_mask
from ral_jax.rl.attention_loss import record_rows
from ral_jax.rl.evidence import evidence_key_mask, evidence_rows
from ral_jax.train import inputs as batches


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _per_example(cfg, params, x, evidence, tr, layer, rows):
  """[B] mean over valid response rows of the evidence share, [B] rows counted, [B] chance level."""
  n, t = x.input_ids.shape
  out = Qwen25VL(cfg).apply({'params': params}, x.input_ids, jnp.swapaxes(x.positions, 0, 1), x.attention_mask,
                            visual_embeds=x.visual_embeds, record_rows=record_rows(n, t - tr, tr, rows),
                            record_layers=(layer,), return_hidden=True)
  policy = next(iter(out.record.values()))['policy']
  vis = batches.visual_key_mask(x.input_ids, cfg.image_token_id, cfg.video_token_id)
  ev = evidence_key_mask(evidence, tr)
  share, ok = evidence_rows(policy, vis, ev)
  valid = ok & as_mask(x.attention_mask[:, t - tr:])
  cnt = jnp.sum(valid, axis=1)
  mean = jnp.sum(jnp.where(valid, share, 0.0), axis=1) / jnp.maximum(cnt, 1)
  nv = jnp.sum(as_mask(vis), axis=1)
  chance = jnp.sum(as_mask(ev) & as_mask(vis), axis=1) / jnp.maximum(nv, 1)
  return mean, cnt, chance


def heldout_evidence(ctx, params, dev: Dict, out, vis) -> Dict[str, float]:
  """{'sum', 'chance_sum', 'n'} over this batch's examples that have evidence and a non-empty answer."""
  if 'evidence_mask' not in dev:
    return {'sum': 0.0, 'chance_sum': 0.0, 'n': 0.0}
  x = batches.sequence_inputs(dev['prompt_ids'], dev['prompt_mask'], dev['positions'], out.tokens,
                              out.response_mask, vis)
  layer = ctx.run.record_layer
  layer = layer if layer >= 0 else ctx.model_cfg.num_hidden_layers + layer
  mean, cnt, chance = _per_example(ctx.model_cfg, params, x, dev['evidence_mask'], out.tokens.shape[1], layer,
                                   ctx.run.objective.ral.rows)
  mean, cnt, chance = (batches.host_rows(a) for a in (mean, cnt, chance))
  keep = (batches.host_rows(dev['has_evidence']) > 0) & (cnt > 0)
  return {'sum': float(np.sum(mean[keep])), 'chance_sum': float(np.sum(chance[keep])), 'n': float(np.sum(keep))}
