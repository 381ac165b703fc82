"""Optimizer: AdamW with warm-up + cosine (or constant) schedule, global-norm clipping, frozen subtrees.

Conventions:
- Learning rate at optimizer step k (0-based, counted by optax):
    warm-up   lr * (k + 1) / warmup_steps           for k < warmup_steps
    cosine    end + (lr - end) * (1 + cos(pi * min(1, (k - w) / (total - w)))) / 2,  end = end_lr_ratio * lr
    constant  lr
  (the first step already uses a non-zero rate.)
- Clipping is on the global norm of the *trainable* gradients, before AdamW.
- Frozen subtrees (default: the vision tower 'visual', ral_jax/docs/method.md s.1) get `optax.set_to_zero()` through
  `optax.multi_transform`: zero update and no optimizer state (no Adam moments for them).
- Gradient accumulation over micro-batches is done in `train/step.py` (a `lax.scan` that *sums* the micro-batch
  losses and gradients, each micro-batch loss already normalised by the whole mini-batch's denominator, so the sum is
  the mini-batch gradient exactly) before one optimizer update.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ral_jax.train.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
  w = cfg.warmup_steps
  end = cfg.lr * cfg.end_lr_ratio
  decay = max(1, cfg.total_steps - w)

  def schedule(count):
    k = jnp.asarray(count, jnp.float32)
    warm = cfg.lr * jnp.minimum(1.0, (k + 1.0) / max(w, 1)) if w else jnp.asarray(cfg.lr, jnp.float32)
    if cfg.schedule == 'constant':
      return warm
    frac = jnp.clip((k - w) / decay, 0.0, 1.0)
    cos = end + (cfg.lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(k < w, warm, cos)

  return schedule


def param_labels(params, freeze=('visual',)):
  """'frozen' for every leaf under a top-level key in `freeze`, else 'train'. Accepts {'params': {...}} too."""
  inner = params['params'] if set(params.keys()) == {'params'} else params
  labels = {k: jax.tree.map(lambda _: 'frozen' if k in freeze else 'train', v) for k, v in inner.items()}
  return {'params': labels} if inner is not params else labels


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW (+ clip) for trainable leaves, set_to_zero (stateless) for frozen subtrees."""
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  train = optax.chain(*parts)
  return optax.multi_transform({'train': train, 'frozen': optax.set_to_zero()},
                               lambda p: param_labels(p, cfg.freeze))


def trainable_global_norm(grads, freeze=('visual',)):
  """Global L2 norm of the gradients of trainable leaves only (what clipping sees)."""
  labels = param_labels(grads, freeze)
  sq = jax.tree.map(lambda g, l: jnp.sum(jnp.square(g.astype(jnp.float32))) if l == 'train' else 0.0,
                    grads, labels)
  return jnp.sqrt(sum(jax.tree.leaves(sq)))
