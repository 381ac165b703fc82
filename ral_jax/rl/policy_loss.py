"""The GRPO token loss: clipped importance ratio times the advantage, plus beta * KL to the reference
(ral_jax/docs/method.md s.2).

Per valid response token t of sequence b, with A = A_b, log r = log pi_theta - log pi_old (clipped to [-20, 20]
before exp, against overflow), r = exp(log r):
  pg   = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))                       (PPO clip)
  pg   = min(pg, -A c)  where A < 0, when dual_clip = c is set                    (dual-clip PPO)
  kl   = k1: log q      k2: (log q)^2 / 2      k3: exp(-log q) + log q - 1        with log q = log pi_theta - log pi_ref
         (-log q clipped to [-20, 20] before exp; k3 >= 0, unbiased for KL(pi_theta || pi_ref) under pi_theta samples)
  loss = aggregate(pg + beta * kl)   (aggregation.py; default token mean)
At r == 1 and beta == 0 the gradient is -A grad log pi_theta per token: REINFORCE with a group baseline.

Metrics (token means over valid tokens, whatever the aggregation mode):
  clip_frac_low   fraction with A < 0 and r < 1 - eps_low  (clip active: no gradient)
  clip_frac_high  fraction with A > 0 and r > 1 + eps_high
  clip_frac       their sum;  dual_clip_frac  fraction with A < 0 and r > c
  approx_kl       mean k3 between pi_old and pi_theta (estimate of KL(pi_theta || pi_old) drift)
  kl_ref          mean of the configured estimator (when beta > 0 or reference log-probs are given)
  ratio_mean / ratio_max,  entropy (when per-token entropies are given)
"""
from __future__ import annotations

from typing import Dict, Tuple

import chex
import jax
import jax.numpy as jnp

from ral_jax.rl.aggregation import aggregate, as_mask, masked_max, masked_mean
from ral_jax.rl.config import GRPOConfig

_LOG_CLAMP = 20.0


def kl_penalty(logprobs, ref_logprobs, estimator: str = 'k3') -> jnp.ndarray:
  """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs (formulas in the module docstring)."""
  log_q = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(ref_logprobs, jnp.float32)
  if estimator == 'k1':
    return log_q
  if estimator == 'k2':
    return 0.5 * log_q ** 2
  if estimator == 'k3':
    neg = jnp.clip(-log_q, -_LOG_CLAMP, _LOG_CLAMP)
    return jnp.exp(neg) - neg - 1.0
  raise ValueError(f"kl estimator {estimator!r} is not supported; use 'k1', 'k2' or 'k3'")


def grpo_loss(logprobs, old_logprobs, advantages, mask, cfg: GRPOConfig = GRPOConfig(), ref_logprobs=None,
              entropy=None, denominator=None) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """GRPO token loss. logprobs, old_logprobs, ref_logprobs, entropy, mask: [B,T]; advantages [B].

  Returns (scalar loss, metrics dict of scalars keyed 'grpo/...'). ref_logprobs may be None only when beta == 0.
  old_logprobs and ref_logprobs are constants (stop_gradient); only logprobs carries the gradient.
  denominator: see aggregation.aggregate (micro-batch accumulation); None = this batch's own.
  """
  chex.assert_rank([logprobs, advantages], [2, 1])
  chex.assert_equal_shape([logprobs, old_logprobs, mask])
  chex.assert_shape(advantages, logprobs.shape[:1])
  chex.assert_type([logprobs, old_logprobs, advantages], [float, float, float])
  if cfg.beta > 0 and ref_logprobs is None:
    raise ValueError(f'grpo.beta={cfg.beta} > 0 needs ref_logprobs (the frozen reference model); pass them or set '
                     'grpo.beta=0')
  m = as_mask(mask)
  lp = jnp.where(m, jnp.asarray(logprobs, jnp.float32), 0.0)
  old = jnp.where(m, jax.lax.stop_gradient(jnp.asarray(old_logprobs, jnp.float32)), 0.0)
  adv = jnp.asarray(advantages, jnp.float32)[:, None]

  ratio = jnp.exp(jnp.clip(lp - old, -_LOG_CLAMP, _LOG_CLAMP))
  pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high))
  if cfg.dual_clip is not None:
    pg = jnp.where(adv < 0, jnp.minimum(pg, -adv * cfg.dual_clip), pg)
  per_token = pg
  metrics = {}
  if ref_logprobs is not None:
    chex.assert_equal_shape([logprobs, ref_logprobs])
    ref = jnp.where(m, jax.lax.stop_gradient(jnp.asarray(ref_logprobs, jnp.float32)), 0.0)
    kl = kl_penalty(lp, ref, cfg.kl_estimator)
    metrics['grpo/kl_ref'] = masked_mean(kl, m)
    if cfg.beta > 0:
      per_token = per_token + cfg.beta * kl
  loss = aggregate(per_token, m, cfg.aggregation, cfg.max_response_length, denominator)

  low = (adv < 0) & (ratio < 1.0 - cfg.clip_eps_low)
  high = (adv > 0) & (ratio > 1.0 + cfg.clip_eps_high)
  metrics.update({
      'grpo/loss': loss,
      'grpo/pg_loss': aggregate(pg, m, cfg.aggregation, cfg.max_response_length, denominator),
      'grpo/clip_frac_low': masked_mean(low, m),
      'grpo/clip_frac_high': masked_mean(high, m),
      'grpo/clip_frac': masked_mean(low | high, m),
      'grpo/approx_kl': masked_mean(kl_penalty(lp, old, 'k3'), m),
      'grpo/ratio_mean': masked_mean(ratio, m),
      'grpo/ratio_max': masked_max(ratio, m),
  })
  if cfg.dual_clip is not None:
    metrics['grpo/dual_clip_frac'] = masked_mean((adv < 0) & (ratio > cfg.dual_clip), m)
  if entropy is not None:
    chex.assert_equal_shape([logprobs, entropy])
    metrics['grpo/entropy'] = masked_mean(entropy, m)
  return loss, metrics
