"""Token-level on-policy distillation: reverse KL(pi_student || pi_teacher) on the student's rollouts
(ral_jax/docs/method.md s.5).

Estimators of the per-token term, for response position t with sampled token y_t ~ pi_student:
  'full'     KL_t = sum_v p^s_v (log p^s_v - log p^te_v) over the whole vocabulary (logprobs.token_stats_from_hidden
             computes it in chunks); exact value and exact gradient for the student (on-policy GKD).
  'sampled'  d_t = log p^s(y_t) - log p^te(y_t), an unbiased one-sample estimate of KL_t. Its pathwise gradient
             (grad log p^s(y_t)) has expectation zero, so the loss uses the score-function form
                 value d_t,   gradient sg(d_t) * grad log p^s(y_t)
             written as sg(d_t) + sg(d_t) * (log p^s(y_t) - sg(log p^s(y_t))). Samples are taken as drawn from the
             current student (the mini-batch drift from pi_old is ignored, as in the token loss's KL penalty).
The teacher never receives a gradient. L_gkd = aggregate(per-token term) (aggregation.py).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from ral_jax.rl.aggregation import aggregate, as_mask, masked_mean
from ral_jax.rl.config import KD_ESTIMATORS


def sampled_kd_per_token(logprobs, teacher_logprobs) -> jnp.ndarray:
  """[B,T] per-token 'sampled' KD term: value log p^s - log p^te, gradient sg(value) * grad log p^s."""
  lp = jnp.asarray(logprobs, jnp.float32)
  d = jax.lax.stop_gradient(lp - jnp.asarray(teacher_logprobs, jnp.float32))
  return d + d * (lp - jax.lax.stop_gradient(lp))


def token_distill_loss(mask, estimator: str = 'full', *, reverse_kl=None, logprobs=None, teacher_logprobs=None,
                       aggregation: str = 'token_mean',
                       max_len: Optional[int] = None,
                       denominator=None) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """L_gkd over valid response tokens. mask [B,T]; 'full' needs reverse_kl [B,T], 'sampled' needs logprobs and
  teacher_logprobs [B,T] (both from logprobs.TokenStats).

  Metrics 'kd/...': loss; reverse_kl (mean full KL, when given); sampled_kl (mean one-sample estimate, when the
  log-probs are given). denominator: see aggregation.aggregate.
  """
  if estimator not in KD_ESTIMATORS:
    raise ValueError(f'kd estimator {estimator!r} is not supported; use one of {list(KD_ESTIMATORS)}')
  m = as_mask(mask)
  metrics = {}
  if reverse_kl is not None:
    chex.assert_equal_shape([reverse_kl, m])
    metrics['kd/reverse_kl'] = masked_mean(reverse_kl, m)
  if logprobs is not None and teacher_logprobs is not None:
    chex.assert_equal_shape([logprobs, teacher_logprobs, m])
    lp = jnp.where(m, jnp.asarray(logprobs, jnp.float32), 0.0)
    tlp = jnp.where(m, jnp.asarray(teacher_logprobs, jnp.float32), 0.0)
    metrics['kd/sampled_kl'] = masked_mean(jax.lax.stop_gradient(lp - tlp), m)
  if estimator == 'full':
    if reverse_kl is None:
      raise ValueError("kd_estimator='full' needs reverse_kl [B,T] (TokenStats.reverse_kl from "
                       "token_stats_from_hidden with teacher_hidden/teacher_kernel), or use kd_estimator='sampled'")
    per_token = jnp.where(m, jnp.asarray(reverse_kl, jnp.float32), 0.0)
  else:
    if logprobs is None or teacher_logprobs is None:
      raise ValueError("kd_estimator='sampled' needs logprobs and teacher_logprobs [B,T]")
    per_token = sampled_kd_per_token(lp, tlp)
  loss = aggregate(per_token, m, aggregation, max_len, denominator)
  metrics['kd/loss'] = loss
  return loss, metrics
