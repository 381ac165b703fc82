"""Group advantages: one scalar per sequence, shared by all of its tokens (ral_jax/docs/method.md s.2).

Rewards come as [B*G] with row b*G + g = sample g of prompt b (np.repeat order, as the rollout returns them).
With r the G rewards of one group, mean = sum(r) / G and std = sqrt(sum((r - mean)^2) / (G - 1)) (ddof = 1, veRL):
  'grpo'   A_i = (r_i - mean) / (std + eps)
  'drgrpo' A_i = r_i - mean                                (Dr.GRPO drops the std division)
  'rloo'   A_i = r_i - (sum(r) - r_i) / (G - 1) = G / (G - 1) * (r_i - mean)     (leave-one-out baseline)
A group whose rewards are all equal gets A = 0 under every estimator. Computed in float32.
"""
from __future__ import annotations

import jax.numpy as jnp

from ral_jax.rl.config import ADVANTAGE_ESTIMATORS, AdvantageConfig


def group_advantages(rewards, group_size: int, cfg: AdvantageConfig = AdvantageConfig()) -> jnp.ndarray:
  """rewards [B*G] -> advantages [B*G] float32 (formulas in the module docstring)."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1:
    raise ValueError(f'rewards must be a flat [B*G] array (row b*G+g); got shape {rewards.shape}')
  if group_size < 1 or rewards.shape[0] % group_size:
    raise ValueError(f'group size G={group_size} must be >= 1 and divide the number of rewards {rewards.shape[0]}; '
                     'make the rollout batch a multiple of G')
  if cfg.estimator not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f'advantage estimator {cfg.estimator!r} is not one of {list(ADVANTAGE_ESTIMATORS)}')
  if group_size < 2 and cfg.estimator in ('grpo', 'rloo'):
    raise ValueError(f"advantage estimator {cfg.estimator!r} needs G >= 2 samples per prompt (got {group_size}); "
                     "raise G or use estimator='drgrpo'")
  r = rewards.reshape(-1, group_size)                                   # [B, G]
  centred = r - jnp.mean(r, axis=1, keepdims=True)
  if cfg.estimator == 'drgrpo':
    adv = centred
  elif cfg.estimator == 'rloo':
    adv = centred * (group_size / (group_size - 1))
  else:
    std = jnp.sqrt(jnp.sum(centred ** 2, axis=1, keepdims=True) / (group_size - 1))
    adv = centred / (std + cfg.eps)
  # Exactly zero for constant groups (the centring above can leave rounding noise of order 1e-8).
  constant = jnp.all(r == r[:, :1], axis=1, keepdims=True)
  return jnp.where(constant, 0.0, adv).reshape(-1)
