"""Small Linen building blocks of the Qwen2.5-VL decoder: dense projections, RMSNorm, gated MLP, embedding.

Every parameter is created through `nn.with_logical_partitioning` with logical axis names; `ral_jax/sharding.py`
maps them to the mesh axes ('data', 'fsdp', 'tensor'). Logical names used here:
  'embed' (D), 'vocab' (V), 'heads' (N), 'kv_heads' (K), 'head_dim' (H), 'mlp' (F), 'norm' (D of a norm scale),
  'layers' (L, added by the layer stack in text.py).
Parameters are stored in `param_dtype`; matmuls run in `dtype` (the compute dtype).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def canon_dtype(d) -> jnp.dtype:
  """'bfloat16' / jnp.bfloat16 / np.dtype -> jnp.dtype."""
  return jnp.dtype(d)


class DenseGeneral(nn.Module):
  """y = einsum(x, kernel) (+ bias), contracting the trailing `len(in_names)` axes of x.

  kernel shape = in_shape + features, logical names = in_names + out_names; bias shape = features.
  Example: q projection kernel [D, N, H] with names ('embed', 'heads', 'head_dim'), bias [N, H].
  """
  features: Tuple[int, ...]
  in_names: Tuple[str, ...]
  out_names: Tuple[str, ...]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x):
    n_in = len(self.in_names)
    in_shape = x.shape[-n_in:]
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.in_names + self.out_names),
                        tuple(in_shape) + tuple(self.features), self.param_dtype)
    letters = 'abcdefghijklmnopqrstuvwxyz'
    batch = letters[:x.ndim - n_in]
    ins = letters[x.ndim - n_in:x.ndim]
    outs = letters[x.ndim:x.ndim + len(self.features)]
    y = jnp.einsum(f'{batch}{ins},{ins}{outs}->{batch}{outs}', x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), self.out_names),
                        tuple(self.features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """y = scale * (x / sqrt(mean(x^2) + eps)), normalisation in float32, result cast to `dtype` before the scale
  (the order transformers' Qwen2RMSNorm uses: weight * hidden.to(input_dtype))."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class GatedMLP(nn.Module):
  """down(silu(gate(x)) * up(x)). Kernels gate/up [D, F], down [F, D].

  The Qwen2 decoder MLP has no biases and logical axes ('embed', 'mlp'); the vision tower's has biases and
  ('vision_embed', 'vision_mlp') and no activation constraint (`activation_axes=None`)."""
  intermediate_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = False
  axes: Tuple[str, str] = ('embed', 'mlp')
  activation_axes: Optional[Tuple[str, ...]] = ('activation_batch', 'activation_length', 'activation_mlp')

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    d_ax, f_ax = self.axes
    gate = DenseGeneral((self.intermediate_size,), (d_ax,), (f_ax,), name='gate_proj', **kw)(x)
    up = DenseGeneral((self.intermediate_size,), (d_ax,), (f_ax,), name='up_proj', **kw)(x)
    h = nn.silu(gate) * up
    if self.activation_axes is not None:
      h = nn.with_logical_constraint(h, self.activation_axes)
    return DenseGeneral((x.shape[-1],), (f_ax,), (d_ax,), name='down_proj', **kw)(h)


class Embed(nn.Module):
  """Token embedding table [V, D] (logical ('vocab', 'embed')); lookup returns `dtype`."""
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ('vocab', 'embed')),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids):
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)
