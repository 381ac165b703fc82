"""Masked reductions: per-token (or per-row) losses [B,T] -> one scalar, by the mode the config names.

With x_bt the loss of token t of sequence b, m_bt in {0,1} its mask, n_b = sum_t m_bt, and V = {b : n_b > 0} the
sequences that have at least one valid token (the others never count):
  'token_mean'          sum_bt m x / sum_bt m                        (veRL default; the paper)
  'seq_mean_token_mean' 1/|V| sum_{b in V} (sum_t m x) / n_b
  'seq_mean_token_sum'  1/|V| sum_{b in V} sum_t m x
  'drgrpo'              sum_bt m x / (|V| * L)   with L = max_len, or the padded length T when max_len is None
Every mode is invariant to extra padded positions and padded sequences ('drgrpo' only with a fixed max_len).
Empty input (no valid token) gives 0. Reductions run in float32; masked entries are replaced by 0 *before* any
arithmetic, so a NaN or inf in a padded position reaches neither the value nor the gradient.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from ral_jax.rl.config import AGGREGATIONS


def as_mask(mask) -> jnp.ndarray:
  """Any 0/1 or boolean array -> bool."""
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def masked_sum(x, mask, axis=None) -> jnp.ndarray:
  mask = as_mask(mask)
  return jnp.sum(jnp.where(mask, jnp.asarray(x, jnp.float32), 0.0), axis=axis)


def masked_mean(x, mask, axis=None) -> jnp.ndarray:
  """sum(m * x) / max(sum(m), 1): 0 where nothing is valid."""
  mask = as_mask(mask)
  count = jnp.sum(mask.astype(jnp.float32), axis=axis)
  return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_max(x, mask) -> jnp.ndarray:
  """Largest valid entry; 0 when nothing is valid."""
  mask = as_mask(mask)
  return jnp.where(jnp.any(mask), jnp.max(jnp.where(mask, jnp.asarray(x, jnp.float32), -jnp.inf)), 0.0)


def aggregation_denominator(mask, mode: str, max_len: Optional[int] = None) -> jnp.ndarray:
  """The scalar every mode divides by: tokens ('token_mean'), valid sequences |V| ('seq_mean_*'), |V| * L
  ('drgrpo'); at least 1. Compute it on a whole mini-batch and pass it to `aggregate(..., denominator=)` of each
  micro-batch: the micro-batch losses then *sum* to the mini-batch loss exactly (gradient accumulation)."""
  if mode not in AGGREGATIONS:
    raise ValueError(f'aggregation mode {mode!r} is not supported; use one of {list(AGGREGATIONS)}')
  mask = as_mask(mask)
  n_tok = jnp.sum(mask.astype(jnp.float32), axis=-1)
  if mode == 'token_mean':
    return jnp.maximum(jnp.sum(n_tok), 1.0)
  n_seq = jnp.maximum(jnp.sum((n_tok > 0).astype(jnp.float32)), 1.0)
  if mode == 'drgrpo':
    return n_seq * float(max_len if max_len is not None else mask.shape[-1])
  return n_seq


def aggregate(x, mask, mode: str, max_len: Optional[int] = None, denominator=None) -> jnp.ndarray:
  """Reduces x [B,T] over its valid entries by `mode` (see the module docstring); returns a float32 scalar.

  denominator: None = this batch's own (aggregation_denominator(mask, mode, max_len)); or a scalar computed on the
  enclosing mini-batch, for micro-batch accumulation by summation.
  """
  x = jnp.asarray(x)
  mask = as_mask(mask)
  if x.ndim != 2 or x.shape != mask.shape:
    raise ValueError(f'aggregate expects x and mask of the same shape [B,T]; got {x.shape} and {mask.shape}')
  if denominator is None:
    denominator = aggregation_denominator(mask, mode, max_len)
  elif mode not in AGGREGATIONS:
    raise ValueError(f'aggregation mode {mode!r} is not supported; use one of {list(AGGREGATIONS)}')
  per_seq_sum = masked_sum(x, mask, axis=1)                         # [B]
  if mode == 'seq_mean_token_mean':
    n_tok = jnp.sum(mask.astype(jnp.float32), axis=1)
    numerator = jnp.sum(per_seq_sum / jnp.maximum(n_tok, 1.0))      # empty sequences contribute 0
  else:
    numerator = jnp.sum(per_seq_sum)
  return numerator / denominator
