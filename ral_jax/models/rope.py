"""Multimodal rotary position embedding (M-RoPE) of the Qwen2.5-VL decoder.

positions [3,B,T] hold the (temporal, height, width) position ids (equal for text tokens). With head dim H and
inv_freq_i = theta^(-2i/H), i in [0, H/2):
  freqs[a,b,t,i] = positions[a,b,t] * inv_freq_i,   emb = concat(freqs, freqs) -> [3,B,T,H]
The H channels are split into chunks of sizes mrope_section + mrope_section (e.g. 16,24,24,16,24,24); chunk c takes
its angles from position row c % 3. Then, per head, x' = x * cos + rotate_half(x) * sin with
rotate_half(x) = concat(-x[..., H/2:], x[..., :H/2]) (transformers' apply_multimodal_rotary_pos_emb).
Angles and the rotation are computed in float32; the result is cast back to the input dtype.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import jax.numpy as jnp
import numpy as np


def mrope_angles(positions, head_dim: int, theta: float, mrope_section: Sequence[int]) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """positions [3,B,T] int -> (cos, sin), each [B,T,H] float32, sections already selected per channel."""
  if 2 * sum(mrope_section) != head_dim:
    raise ValueError(f'mrope_section {tuple(mrope_section)} must sum to head_dim/2 = {head_dim // 2}')
  if positions.ndim != 3 or positions.shape[0] != 3:
    raise ValueError(f'positions must have shape [3,B,T], got {positions.shape}')
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))   # [H/2]
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [3,B,T,H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)                                          # [3,B,T,H]
  # Channel c of emb takes position row `row_of_channel[c]`.
  sections = list(mrope_section) * 2
  row_of_channel = np.concatenate([np.full(s, i % 3) for i, s in enumerate(sections)])   # [H]
  sel = jnp.moveaxis(emb, 0, -1)[..., np.arange(head_dim), row_of_channel]               # [B,T,H] (a gather)
  return jnp.cos(sel), jnp.sin(sel)


def rotate_half(x):
  h = x.shape[-1] // 2
  return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, cos, sin):
  """x [B,T,N,H] (any dtype), cos/sin [B,T,H] float32 -> rotated x in x.dtype."""
  x32 = x.astype(jnp.float32)
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return (x32 * c + rotate_half(x32) * s).astype(x.dtype)
