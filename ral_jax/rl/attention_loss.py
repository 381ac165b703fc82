"""The attention-policy terms: JSD over keys, the RAL loss (ral_jax/docs/method.md s.3) and attention distillation
(s.5).

Attention policies are [B,R,S] float32 rows p^t(i) (head-averaged, self weight dropped, renormalised: model output),
with a row mask [B,R] (= response_mask for R = Tr rows) and a key mask [B,S] (1 = real key).

  JSD(P || Q) = 1/2 KL(P || M) + 1/2 KL(Q || M),  M = (P + Q) / 2,  natural log, in [0, ln 2]
              = sum_i (P_i + Q_i)/4 * f(d_i),  d_i = (P_i - Q_i)/(P_i + Q_i),  f(d) = 2 d atanh(d) + log1p(-d^2)
                (the stable form used: every term >= 0, accurate to ~1e-6 relative down to JSD ~ 1e-12 in float32)
  L_RAL     = aggregate_t( A_b * JSD(p_theta^t || p_old^t) )      p_old held fixed (stop_gradient)
  L_attn_kd = aggregate_t( JSD(p_student^t || p_teacher^t) )       teacher held fixed; no advantage
Masked keys are set to 0 (rows are not renormalised: the model already gives them zero weight); masked rows count
nowhere. Zeros are handled with the double-where rule, so exact zeros in either input give finite values and finite
(not NaN) gradients. The gradient is written by hand (custom_vjp): d JSD / d P_i = 1/2 log(P_i / M_i) (= 1/2
log1p(d_i) near P_i = Q_i), taken as 0 where P_i == 0 (the true one-sided limit is -inf; through a softmax it is
multiplied by P_i = 0 anyway); the backward pass keeps only P and Q. At p_theta == p_old the JSD and its gradient
are exactly 0.
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


def _masked_pair(p, q, key_mask):
  """p, q in float32 with masked keys set to 0. key_mask: [B,S] for [B,R,S] inputs (broadcast over rows), else any
  shape broadcastable to p."""
  chex.assert_equal_shape([p, q])
  p, q = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
  if key_mask is None:
    return p, q
  km = as_mask(key_mask)
  if p.ndim == 3 and km.shape == (p.shape[0], p.shape[2]):
    km = km[:, None, :]
  km = jnp.broadcast_to(km, p.shape)
  return jnp.where(km, p, 0.0), jnp.where(km, q, 0.0)


def jsd(p, q, key_mask=None) -> jnp.ndarray:
  """Jensen-Shannon divergence over the last (key) axis, float32. p, q [..., S] -> [...].

  key_mask: [B,S] for [B,R,S] inputs (broadcast over rows), else any shape broadcastable to p; masked keys count 0.
  """
  p, q = _masked_pair(p, q, key_mask)
  return _jsd(p, q)


def _jsd_terms(p, q):
  """Per-key JSD terms, stable in float32: with s = P + Q and d = (P - Q) / s (so P/M = 1 + d, Q/M = 1 - d),
    JSD_i = s/4 * f(d),  f(d) = (1 + d) log(1 + d) + (1 - d) log(1 - d) = 2 d atanh(d) + log(1 - d^2)
                                                                          (= d^2 + d^4/6 + ...)
  The atanh form loses at most a factor 2 to cancellation near d = 0 (where the naive sum of x log x terms loses
  everything: at JSD ~ 1e-7 it is off by 45-325% and often negative); the log1p form is used for |d| > 1/2, and
  f(+-1) = 2 ln 2 (one of P_i, Q_i zero). Every term is >= 0, so the JSD is >= 0 and accurate to a few ulp per term."""
  s = p + q
  d = jnp.where(s > 0, (p - q) / jnp.where(s > 0, s, 1.0), 0.0)
  a = jnp.abs(d)
  small = a <= 0.5
  d_s = jnp.where(small, d, 0.0)
  f_small = 2.0 * d_s * jnp.arctanh(d_s) + jnp.log1p(-d_s * d_s)
  one_minus = jnp.where(small | (a >= 1.0), 0.5, 1.0 - a)                       # 1 - |d| in (0, 1/2)
  f_large = (1.0 + a) * jnp.log1p(a) + one_minus * jnp.log(one_minus)
  f = jnp.where(small, f_small, jnp.where(a >= 1.0, 2.0 * jnp.log(2.0), f_large))
  return jnp.maximum(0.25 * s * f, 0.0)


@jax.custom_vjp
def _jsd(p, q):
  return jnp.sum(_jsd_terms(p, q), axis=-1)


def _jsd_fwd(p, q):
  return _jsd(p, q), (p, q)


def _half_log_ratio(x, y, d):
  """1/2 log(x / ((x + y)/2)) for x > 0 (else 0), with d = (x - y)/(x + y): 1/2 log1p(d) where |d| <= 1/2 (no
  cancellation when x ~ y), else 1/2 (log x - log m) (d rounds to -1 when x << y, where log1p(d) would be -inf)."""
  m = 0.5 * (x + y)
  near = jnp.abs(d) <= 0.5
  small = 0.5 * jnp.log1p(jnp.where(near, d, 0.0))
  far = 0.5 * (jnp.log(jnp.where(x > 0, x, 1.0)) - jnp.log(jnp.where(m > 0, m, 1.0)))
  return jnp.where(x > 0, jnp.where(near, small, far), 0.0)


def _jsd_bwd(res, g):
  """d JSD / d P_i = 1/2 log(P_i / M_i) (and alike for Q), taken as 0 where P_i == 0 (_half_log_ratio); only p and
  q are kept for the backward pass (no [..., S] intermediates), and the value is exactly 0 where P == Q."""
  p, q = res
  s = p + q
  d = jnp.where(s > 0, (p - q) / jnp.where(s > 0, s, 1.0), 0.0)
  g = g[..., None]
  return g * _half_log_ratio(p, q, d), g * _half_log_ratio(q, p, -d)


_jsd.defvjp(_jsd_fwd, _jsd_bwd)


def kl(p, q, key_mask=None) -> jnp.ndarray:
  """KL(P || Q) over the last axis in float32, as sum_i Q_i g(P_i / Q_i) with g(r) = r log r - r + 1 >= 0 (the
  same value for normalised rows, but every term >= 0); keys with Q_i = 0 count 0 (attention rows from a softmax
  are positive on every real key). Autodiff gradient: d/dP_i = log(P_i / Q_i). For the 'kl' divergence variant."""
  p, q = _masked_pair(p, q, key_mask)
  ok = q > 0
  qs = jnp.where(ok, q, 1.0)
  x = jnp.where(ok, (p - q) / qs, 0.0)                       # P/Q - 1
  xs = jnp.where(x > -1.0, x, 0.0)
  g = jnp.where(x > -1.0, (1.0 + xs) * jnp.log1p(xs) - xs, 1.0)   # g(0) = 1 at P_i = 0
  return jnp.sum(jnp.where(ok, qs * g, 0.0), axis=-1)


DIVERGENCES = {'jsd': jsd, 'kl': kl}


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
             denominator=None, divergence: str = 'jsd') -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """L_RAL = aggregate(A_b * JSD(p_theta || p_old)) over valid rows. policy, old_policy [B,R,S]; advantages [B].

  Metrics 'ral/...': loss, jsd (mean over valid rows), jsd_max, jsd_pos_adv / jsd_neg_adv (mean over rows of
  sequences with A > 0 / A < 0; 0 when there are none), frac_rows_pos_adv / frac_rows_neg_adv, and with a visual key
  mask [B,S]: visual_mass (current rows) and visual_mass_old. denominator: see aggregation.aggregate.
  divergence: 'jsd' (paper) or 'kl' = KL(p_theta || p_old) (an open-question variant; the metrics keep the
  'ral/jsd' names and then hold the KL values).
  """
  chex.assert_shape(advantages, policy.shape[:1])
  policy, old_policy, rm = _prepare(policy, old_policy, row_mask, key_mask)
  if divergence not in DIVERGENCES:
    raise ValueError(f'divergence={divergence!r}; choose one of {sorted(DIVERGENCES)}')
  d = DIVERGENCES[divergence](policy, old_policy, key_mask)          # [B,R]
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
