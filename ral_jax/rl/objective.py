"""The combined objective the update step differentiates (ral_jax/docs/method.md s.3, s.5):

  L = L_grpo + lambda_attn * L_RAL + mu * L_gkd + gamma_attn * L_attn_distill
      (the last two only with ObjectiveConfig.distill; L_RAL only with lambda_attn > 0)

`RLBatch` is everything fixed for one rollout batch (computed once by the scoring pass, sliced into mini-batches);
the current model's outputs come as `TokenStats` (+ the current attention policy). Shapes: B sequences (rows b*G+g),
Tr response positions, R = Tr recorded rows, S keys.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import flax.struct
import jax.numpy as jnp

from ral_jax.rl.aggregation import aggregation_denominator
from ral_jax.rl.attention_loss import attention_distill_loss, ral_loss, visual_mass
from ral_jax.rl.config import ObjectiveConfig
from ral_jax.rl.distill import token_distill_loss
from ral_jax.rl.evidence import evidence_mass
from ral_jax.rl.logprobs import TokenStats, token_stats_from_hidden
from ral_jax.rl.policy_loss import grpo_loss


@flax.struct.dataclass
class RLBatch:
  """Per-rollout arrays handed to the update step.

  response_ids [B,Tr] int32: sampled tokens.  response_mask [B,Tr]: 1 = valid response token (also the row mask).
  advantages [B] f32.  old_logprobs [B,Tr] f32: log pi_old(y_t), training forward with the pre-update parameters.
  ref_logprobs [B,Tr] f32 or None: frozen reference (needed when beta > 0).
  old_policy [B,R,S] f32 or None: attention rows of the pre-update parameters (needed when lambda_attn > 0).
  key_mask [B,S] or None: 1 = real key (prompt + response without padding).  visual_key_mask [B,S] or None: 1 =
  image/video token key (for the visual-mass metrics).  teacher_policy [B,R,S] f32 or None: the teacher's attention
  rows on the same rollouts (needed when distill.gamma_attn > 0).
  """
  response_ids: jnp.ndarray
  response_mask: jnp.ndarray
  advantages: jnp.ndarray
  old_logprobs: jnp.ndarray
  ref_logprobs: Optional[jnp.ndarray] = None
  old_policy: Optional[jnp.ndarray] = None
  key_mask: Optional[jnp.ndarray] = None
  visual_key_mask: Optional[jnp.ndarray] = None
  teacher_policy: Optional[jnp.ndarray] = None
  evidence_key_mask: Optional[jnp.ndarray] = None   # [B,S] 1 = visual key on the record's evidence (rl/evidence.py)
  has_evidence: Optional[jnp.ndarray] = None        # [B] 1 = the sequence's record has evidence


def loss_denominators(cfg: ObjectiveConfig, response_mask) -> Dict[str, jnp.ndarray]:
  """{aggregation mode: scalar denominator} of every mode cfg uses, computed on a whole mini-batch's mask [B,Tr].

  For gradient accumulation: pass the result to total_loss of each micro-batch and *sum* the micro-batch losses
  and gradients; that equals the loss of the whole mini-batch exactly, for every aggregation mode.
  """
  modes = {cfg.grpo.aggregation, cfg.ral_aggregation, cfg.kd_aggregation, cfg.attn_distill_aggregation}
  return {m: aggregation_denominator(response_mask, m, cfg.grpo.max_response_length) for m in sorted(modes)}


def total_loss(cfg: ObjectiveConfig, batch: RLBatch, stats: TokenStats, policy: Optional[jnp.ndarray] = None,
               denominators: Optional[Mapping[str, jnp.ndarray]] = None) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """(loss, metrics) for the current policy's TokenStats [B,Tr] and attention rows policy [B,R,S] (or None).

  denominators: None = each term normalises by this batch; or loss_denominators(cfg, mini-batch mask) for exact
  micro-batch accumulation by summation (the metrics stay per-micro-batch means).
  Raises (at trace time) when a term with a positive weight lacks its inputs. Metrics: the union of the terms'
  metrics, 'loss', and 'attn/visual_mass' of the current rows when a visual key mask is given; with an evidence
  key mask also 'attn/evidence_mass' (current rows) and 'attn/evidence_mass_old' (p_old), rl/evidence.py.
  """
  mask = batch.response_mask
  max_len = cfg.grpo.max_response_length
  den = (lambda mode: None) if denominators is None else (lambda mode: denominators[mode])
  loss, metrics = grpo_loss(stats.logprobs, batch.old_logprobs, batch.advantages, mask, cfg.grpo,
                            ref_logprobs=batch.ref_logprobs, entropy=stats.entropy,
                            denominator=den(cfg.grpo.aggregation))
  if cfg.ral.lambda_attn > 0:
    if policy is None or batch.old_policy is None:
      raise ValueError('ral.lambda_attn > 0 needs the current attention policy and batch.old_policy [B,R,S]; '
                       'record the attention rows in both forwards or set ral.lambda_attn=0')
    l_ral, m_ral = ral_loss(policy, batch.old_policy, batch.advantages, mask, batch.key_mask, cfg.ral_aggregation,
                            max_len, batch.visual_key_mask, den(cfg.ral_aggregation), cfg.ral.divergence)
    loss = loss + cfg.ral.lambda_attn * l_ral
    metrics.update(m_ral)
  d = cfg.distill
  if d is not None and d.mu > 0:
    l_kd, m_kd = token_distill_loss(mask, d.kd_estimator, reverse_kl=stats.reverse_kl, logprobs=stats.logprobs,
                                    teacher_logprobs=stats.teacher_logprobs, aggregation=cfg.kd_aggregation,
                                    max_len=max_len, denominator=den(cfg.kd_aggregation))
    loss = loss + d.mu * l_kd
    metrics.update(m_kd)
  if d is not None and d.gamma_attn > 0:
    if policy is None or batch.teacher_policy is None:
      raise ValueError('distill.gamma_attn > 0 needs the student attention policy and batch.teacher_policy '
                       '[B,R,S]; record both or set distill.gamma_attn=0')
    l_ad, m_ad = attention_distill_loss(policy, batch.teacher_policy, mask, batch.key_mask,
                                        cfg.attn_distill_aggregation, max_len, batch.visual_key_mask,
                                        den(cfg.attn_distill_aggregation))
    loss = loss + d.gamma_attn * l_ad
    metrics.update(m_ad)
  if policy is not None and batch.visual_key_mask is not None:
    metrics['attn/visual_mass'] = visual_mass(policy, mask, batch.visual_key_mask)
  if batch.evidence_key_mask is not None and batch.visual_key_mask is not None:
    for name, pol in (('attn/evidence_mass', policy), ('attn/evidence_mass_old', batch.old_policy)):
      if pol is not None:
        metrics[name] = evidence_mass(pol, mask, batch.visual_key_mask, batch.evidence_key_mask, batch.has_evidence)
  metrics['loss'] = loss
  return loss, metrics


def loss_from_hidden(cfg: ObjectiveConfig, batch: RLBatch, hidden, kernel, policy=None, teacher_hidden=None,
                     teacher_kernel=None, denominators=None) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """total_loss with TokenStats computed in chunks from the response hidden states.

  hidden [B,Tr,D]: the final-normed states that predict the response tokens (logprobs.response_slice of the model's
  hidden [B,Tp+Tr,D]); kernel [D,V] the lm-head kernel. teacher_hidden [B,Tr,Dt] / teacher_kernel [Dt,V] when the
  token distillation term is on. Log-probs use cfg.temperature and cfg.logprob_chunk.
  """
  stats = token_stats_from_hidden(hidden, kernel, batch.response_ids, cfg.logprob_chunk, cfg.temperature,
                                  with_entropy=True, teacher_hidden=teacher_hidden, teacher_kernel=teacher_kernel)
  return total_loss(cfg, batch, stats, policy, denominators)
