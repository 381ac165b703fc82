"""The Qwen2.5-VL vision tower (transformers' Qwen2_5_VisionTransformerPretrainedModel) in Flax Linen.

pixel_values [B,P,patch_dim] (processor order, see models/vision_inputs.py) -> visual_embeds [B,P/4,Do]:
  x = patch_embed(pixel_values)                 Conv3d with stride == kernel == a Dense over the flat patch, no bias
  cos, sin = 2-D rotary of each patch: with Hr = head_dim/2 and inv_freq_i = 10000^(-2i/Hr), i < Hr/2,
             emb = concat(row * inv_freq, col * inv_freq) [Hr], angles = concat(emb, emb) [head_dim]
  depth x block:  x += proj(attn(norm1(x)));  x += down(silu(gate(norm2(x))) * up(norm2(x)))   (biases everywhere)
             attention segments: per window (blocks not in fullatt_block_indexes) or per frame (the others),
             computed on packed chunks [NC, C] with a same-segment mask (cost O(P * C), vision_inputs.py)
  merger:    y = mlp_2(gelu(mlp_0(ln_q(x) viewed as [P/4, 4 * hidden])))     (exact erf GELU)
Padding patches produce zero rows. Norms are RMSNorm (eps from the config, 1e-6 as transformers hard-codes).

Parameter tree (transformers name -> here):
  patch_embed.proj.weight [C,3,2,14,14]  -> patch_embed/kernel [patch_dim, C]          ('vision_patch', 'vision_embed')
  blocks.i.norm1/norm2.weight            -> blocks_i/norm1|norm2/scale [C]              ('norm',)
  blocks.i.attn.qkv.weight/bias          -> blocks_i/attn/qkv/kernel [C,3,N,Hd] / bias [3,N,Hd]
  blocks.i.attn.proj.weight/bias         -> blocks_i/attn/proj/kernel [N,Hd,C] / bias [C]
  blocks.i.mlp.{gate,up}_proj            -> blocks_i/mlp/{gate,up}_proj/kernel [C,F] / bias [F]
  blocks.i.mlp.down_proj                 -> blocks_i/mlp/down_proj/kernel [F,C] / bias [C]
  merger.ln_q.weight                     -> merger/ln_q/scale [C]
  merger.mlp.0 / merger.mlp.2            -> merger/mlp_0 [4C,4C], merger/mlp_2 [4C,Do] (kernel + bias)
Logical axis names: 'vision_patch', 'vision_embed' (C), 'vision_heads' (N), 'head_dim', 'vision_mlp' (F),
'vision_merge' (4C; the merger's mlp_0 kernel is ('vision_embed', 'vision_merge')), 'embed' (Do), 'norm'.
The tower is frozen: no remat.
"""
from __future__ import annotations

from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ral_jax.models.config import VisionConfig
from ral_jax.models.layers import DenseGeneral, GatedMLP, RMSNorm
from ral_jax.models.rope import apply_rope

Dtype = Any


def vision_rope(rope_ids, head_dim: int):
  """rope_ids [B,P,2] int (row, col) -> (cos, sin) [B,P,head_dim] float32 (transformers' rot_pos_emb)."""
  dim = head_dim // 2
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))      # [Hr/2]
  ang = rope_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)           # [B,P,2,Hr/2]
  emb = ang.reshape(ang.shape[:-2] + (dim,))                                                   # [B,P,Hr]
  emb = jnp.concatenate([emb, emb], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _gather_rows(x, index):
  """x [B,P,...], index [B,Q] -> [B,Q,...]."""
  idx = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _masked_attention(q, k, v, seg_q, seg_k, implementation):
  """q [X,Q,N,H], k/v [X,C,N,H], seg_q [X,Q], seg_k [X,C]: attention where seg_q == seg_k."""
  mask = seg_q[:, None, :, None] == seg_k[:, None, None, :]                                  # [X,1,Q,C]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def chunked_attention(q, k, v, index, segment, inverse, implementation=None, q_block: int = 2048):
  """Attention restricted to segments, on packed chunks.

  q, k, v [B,P,N,H]; index / segment [B,NC,C] (slot -> patch, slot -> segment id, -1 empty); inverse [B,P]
  (patch -> flat slot). Slot s of chunk c attends to slots of the same chunk with the same segment id:
    o[c,s] = sum_{s': seg[c,s'] == seg[c,s]} softmax_s'(q[c,s] . k[c,s'] / sqrt(H)) v[c,s']
  Chunks longer than q_block are processed q_block query rows at a time (lax.map), so the logits held at once are
  [B*NC,N,q_block,C], not [B*NC,N,C,C] (matters for the dense full-attention chunk of a long video).
  Returns [B,P,N,H]; rows of patches not in any slot are garbage (the caller masks them).
  """
  b, nc, c = index.shape
  flat = index.reshape(b, nc * c)
  qc, kc, vc = (_gather_rows(t, flat).reshape((b * nc, c) + t.shape[2:]) for t in (q, k, v))
  seg = segment.reshape(b * nc, c)
  if c <= q_block:
    o = _masked_attention(qc, kc, vc, seg, seg, implementation)                               # [B*NC,C,N,H]
  else:
    nq = -(-c // q_block)
    pad = nq * q_block - c
    qp = jnp.pad(qc, ((0, 0), (0, pad), (0, 0), (0, 0)))
    sp = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-2)     # padded query rows match no key; dropped
    qb = qp.reshape((b * nc, nq, q_block) + qc.shape[2:]).swapaxes(0, 1)
    sb = sp.reshape(b * nc, nq, q_block).swapaxes(0, 1)
    o = jax.lax.map(lambda a: _masked_attention(a[0], kc, vc, a[1], seg, implementation), (qb, sb))
    o = o.swapaxes(0, 1).reshape((b * nc, nq * q_block) + qc.shape[2:])[:, :c]
  return _gather_rows(o.reshape((b, nc * c) + o.shape[2:]), inverse)


class VisionAttention(nn.Module):
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Any = None
  q_block: int = 2048

  @nn.compact
  def __call__(self, x, cos, sin, index, segment, inverse):
    v = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
    qkv = DenseGeneral((3, v.num_heads, v.head_dim), ('vision_embed',), (None, 'vision_heads', 'head_dim'),
                       name='qkv', **kw)(x)                                                  # [B,P,3,N,Hd]
    q, k, val = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = chunked_attention(q, k, val, index, segment, inverse, self.attention_impl, self.q_block)
    return DenseGeneral((v.hidden_size,), ('vision_heads', 'head_dim'), ('vision_embed',), name='proj', **kw)(o)


class VisionBlock(nn.Module):
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Any = None
  q_block: int = 2048

  @nn.compact
  def __call__(self, x, cos, sin, index, segment, inverse):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.cfg.rms_norm_eps
    x = x + VisionAttention(self.cfg, self.dtype, self.param_dtype, self.attention_impl, self.q_block, name='attn')(
        RMSNorm(eps, name='norm1', **kw)(x), cos, sin, index, segment, inverse)
    mlp = GatedMLP(self.cfg.intermediate_size, use_bias=True, axes=('vision_embed', 'vision_mlp'),
                   activation_axes=None, name='mlp', **kw)
    return x + mlp(RMSNorm(eps, name='norm2', **kw)(x))


class PatchMerger(nn.Module):
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    v = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
    x = RMSNorm(v.rms_norm_eps, name='ln_q', dtype=self.dtype, param_dtype=self.param_dtype)(x)
    b, p, c = x.shape
    x = x.reshape(b, p // v.merge_unit, v.merge_unit * c)
    x = DenseGeneral((v.merge_unit * c,), ('vision_embed',), ('vision_merge',), name='mlp_0', **kw)(x)
    x = nn.gelu(x, approximate=False)
    return DenseGeneral((v.out_hidden_size,), ('vision_merge',), ('embed',), name='mlp_2', **kw)(x)


class VisionTower(nn.Module):
  """pixel_values [B,P,patch_dim] float32, meta (build_vision_inputs, batched) -> [B,P/4,out_hidden_size].

  attention_impl: jax.nn.dot_product_attention's implementation (None: XLA). q_block: query rows per step in
  attention chunks longer than it (bounds the logits' memory; see chunked_attention)."""
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Any = None
  q_block: int = 2048

  @nn.compact
  def __call__(self, pixel_values, meta: Dict[str, jax.Array]):
    v = self.cfg
    b, p, d = pixel_values.shape
    if d != v.patch_dim:
      raise ValueError(f'pixel_values last dim {d} != vision patch_dim {v.patch_dim} (C * temporal_patch * patch^2)')
    if meta['valid'].shape != (b, p):
      raise ValueError(f"vision meta 'valid' {meta['valid'].shape} != (B, P) = {(b, p)}: build it with "
                       'build_vision_inputs(grid_thw, P, vcfg) for the same padded P')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = DenseGeneral((v.hidden_size,), ('vision_patch',), ('vision_embed',), name='patch_embed', **kw)(pixel_values)
    cos, sin = vision_rope(meta['rope_ids'], v.head_dim)
    full = set(v.fullatt_block_indexes)
    for i in range(v.depth):
      g = 'full' if i in full else 'win'
      x = VisionBlock(v, self.dtype, self.param_dtype, self.attention_impl, self.q_block, name=f'blocks_{i}')(
          x, cos, sin, meta[f'{g}_index'], meta[f'{g}_segment'], meta[f'{g}_inverse'])
    y = PatchMerger(v, name='merger', **kw)(x)
    keep = meta['valid'].reshape(b, p // v.merge_unit, v.merge_unit)[..., 0]
    return jnp.where(keep[..., None] > 0, y, jnp.zeros((), y.dtype))
