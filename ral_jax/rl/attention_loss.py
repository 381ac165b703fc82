"""The attention-policy terms: JSD over keys, the RAL loss (ral_jax/docs/method.md s.3) and attention distillation
(s.5).

Attention policies are [B,R,S] float32 rows p^t(i) (head-averaged, self weight dropped, renormalised: model output),
with a row mask [B,R] (= response_mask for R = Tr rows) and a key mask [B,S] (1 = real key).

  JSD(P || Q) = 1/2 KL(P || M) + 1/2 KL(Q || M),  M = (P + Q) / 2,  natural log, in [0, ln 2]
              = sum_i [ 1/2 P_i log P_i + 1/2 Q_i log Q_i - M_i log M_i ]     (0 log 0 = 0)
  L_RAL     = aggregate_t( A_b * JSD(p_theta^t || p_old^t) )      p_old held fixed (stop_gradient)
  L_attn_kd = aggregate_t( JSD(p_student^t || p_teacher^t) )       teacher held fixed; no advantage
Masked keys are set to 0 (rows are not renormalised: the model already gives them zero weight); masked rows count
nowhere. Zeros are handled with the double-where rule, so exact zeros in either input give finite values and finite
(not NaN) gradients. The gradient is written by hand (custom_vjp): d JSD / d P_i = 1/2 log(P_i / M_i), taken as 0
where P_i == 0 (the true one-sided limit is -inf; through a softmax it is multiplied by P_i = 0 anyway); the backward
pass keeps only P and Q. At p_theta == p_old the JSD and its gradient are exactly 0.
A > 0 pulls p_theta toward p_old; A < 0 pushes it away (no clipping).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from ral_jax.rl.aggregation import aggregate, as_mask, masked_max, masked_mean
from ral_jax.rl.config import ROW_VARIANTS


def record_rows(batch: int, prompt_len: int, response_len: int, rows: str = 'response') -> jnp.ndarray:
  """Query positions whose attention is recorded, [B,R] int32 with R = Tr (sequence = prompt bucket Tp | response).

  'response': Tp .. Tp+Tr-1, the response tokens' own rows (paper).  'producing': Tp-1 .. Tp+Tr-2, the rows whose
  outputs predict the response tokens. Either way row r belongs to response token r, so row_mask = response_mask.
  """
  if rows not in ROW_VARIANTS:
    raise ValueError(f'rows={rows!r} is not supported; use one of {list(ROW_VARIANTS)}')
  start = prompt_len if rows == 'response' else prompt_len - 1
  if start < 0 or prompt_len < 1:
    raise ValueError(f'prompt_len={prompt_len} must be >= 1')
  return jnp.broadcast_to(start + jnp.arange(response_len, dtype=jnp.int32), (batch, response_len))


def _xlogx(x):
  safe = jnp.where(x > 0, x, 1.0)
  return jnp.where(x > 0, x * jnp.log(safe), 0.0)


def jsd(p, q, key_mask=None) -> jnp.ndarray:
  """Jensen-Shannon divergence over the last (key) axis, float32. p, q [..., S] -> [...].

  key_mask: [B,S] for [B,R,S] inputs (broadcast over rows), else any shape broadcastable to p; masked keys count 0.
  """
  chex.assert_equal_shape([p, q])
  p, q = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
  if key_mask is not None:
    km = as_mask(key_mask)
    if p.ndim == 3 and km.shape == (p.shape[0], p.shape[2]):
      km = km[:, None, :]
    km = jnp.broadcast_to(km, p.shape)
    p, q = jnp.where(km, p, 0.0), jnp.where(km, q, 0.0)
  return _jsd(p, q)


def _safe_log(x):
  return jnp.log(jnp.where(x > 0, x, 1.0))


@jax.custom_vjp
def _jsd(p, q):
  m = 0.5 * (p + q)
  return jnp.sum(0.5 * _xlogx(p) + 0.5 * _xlogx(q) - _xlogx(m), axis=-1)


def _jsd_fwd(p, q):
  return _jsd(p, q), (p, q)


def _jsd_bwd(res, g):
  """d JSD / d P_i = 1/2 log(P_i / M_i) (and alike for Q), taken as 0 where P_i == 0; only p and q are kept for the
  backward pass (no [..., S] intermediates), and the value is exactly 0 where P == Q."""
  p, q = res
  log_m = _safe_log(0.5 * (p + q))
  g = g[..., None]
  gp = jnp.where(p > 0, 0.5 * (_safe_log(p) - log_m), 0.0)
  gq = jnp.where(q > 0, 0.5 * (_safe_log(q) - log_m), 0.0)
  return g * gp, g * gq


_jsd.defvjp(_jsd_fwd, _jsd_bwd)


def visual_mass(policy, row_mask, visual_key_mask) -> jnp.ndarray:
  """Mean over valid rows of sum_s p[b,r,s] * visual[b,s]: the share of attention on visual tokens."""
  vis = as_mask(visual_key_mask)[:, None, :]
  mass = jnp.sum(jnp.where(vis, jnp.asarray(policy, jnp.float32), 0.0), axis=-1)   # [B,R]
  return masked_mean(mass, row_mask)


def _prepare(policy, other, row_mask, key_mask):
  """Shape/dtype checks; float32 rows with masked rows zeroed (so padding never reaches a value or a gradient)."""
  chex.assert_rank(policy, 3)
  chex.assert_equal_shape([policy, other])
  chex.assert_shape(row_mask, policy.shape[:2])
  chex.assert_type([policy, other], [float, float])
  if key_mask is not None:
    chex.assert_shape(key_mask, (policy.shape[0], policy.shape[2]))
  rm = as_mask(row_mask)
  zero_pad = lambda x: jnp.where(rm[..., None], jnp.asarray(x, jnp.float32), 0.0)
  return zero_pad(policy), zero_pad(jax.lax.stop_gradient(other)), rm


def ral_loss(policy, old_policy, advantages, row_mask, key_mask=None, aggregation: str = 'token_mean',
             max_len: Optional[int] = None, visual_key_mask=None,
             denominator=None) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """L_RAL = aggregate(A_b * JSD(p_theta || p_old)) over valid rows. policy, old_policy [B,R,S]; advantages [B].

  Metrics 'ral/...': loss, jsd (mean over valid rows), jsd_max, jsd_pos_adv / jsd_neg_adv (mean over rows of
  sequences with A > 0 / A < 0; 0 when there are none), frac_rows_pos_adv / frac_rows_neg_adv, and with a visual key
  mask [B,S]: visual_mass (current rows) and visual_mass_old. denominator: see aggregation.aggregate.
  """
  chex.assert_shape(advantages, policy.shape[:1])
  policy, old_policy, rm = _prepare(policy, old_policy, row_mask, key_mask)
  d = jsd(policy, old_policy, key_mask)                              # [B,R]
  adv = jnp.asarray(advantages, jnp.float32)[:, None]
  loss = aggregate(adv * d, rm, aggregation, max_len, denominator)
  pos, neg = rm & (adv > 0), rm & (adv < 0)
  metrics = {
      'ral/loss': loss,
      'ral/jsd': masked_mean(d, rm),
      'ral/jsd_max': masked_max(d, rm),
      'ral/jsd_pos_adv': masked_mean(d, pos),
      'ral/jsd_neg_adv': masked_mean(d, neg),
      'ral/frac_rows_pos_adv': masked_mean(pos, rm),
      'ral/frac_rows_neg_adv': masked_mean(neg, rm),
  }
  if visual_key_mask is not None:
    metrics['ral/visual_mass'] = visual_mass(policy, rm, visual_key_mask)
    metrics['ral/visual_mass_old'] = visual_mass(old_policy, rm, visual_key_mask)
  return loss, metrics


def attention_distill_loss(policy, teacher_policy, row_mask, key_mask=None, aggregation: str = 'token_mean',
                           max_len: Optional[int] = None,
                           visual_key_mask=None, denominator=None) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """L_attn_distill = aggregate(JSD(p_student || p_teacher)) over valid rows; [B,R,S] inputs, teacher fixed.

  Metrics 'attn_distill/...': loss, jsd (mean over valid rows), and with a visual key mask visual_mass_teacher.
  """
  policy, teacher_policy, rm = _prepare(policy, teacher_policy, row_mask, key_mask)
  d = jsd(policy, teacher_policy, key_mask)
  loss = aggregate(d, rm, aggregation, max_len, denominator)
  metrics = {'attn_distill/loss': loss, 'attn_distill/jsd': masked_mean(d, rm)}
  if visual_key_mask is not None:
    metrics['attn_distill/visual_mass_teacher'] = visual_mass(teacher_policy, rm, visual_key_mask)
  return loss, metrics
