"""The rollout's inner loop: one-token decoder steps over per-layer weights and per-layer KV caches.

Why a separate step (the model's cached `__call__` stays the oracle and does the prefill): the model keeps its
cache as one stacked [L,B,S,K,H] array carried through a `lax.scan` over stacked layer weights. In a decode step
that costs, per layer, a copy of the layer's cache slice out of the stack, a scatter of the new token, a write of
the whole slice back, and a dynamic-slice copy of the layer weights (seen in the compiled HLO): several passes over
the KV cache and the weights for one token. Decoding is bound by memory bandwidth, so here:
  - weights: a tuple of L per-layer pytrees (`layer_params`, made once per rollout together with the cast to the
    sampling dtype: no extra copy when the training parameters are float32 and the sampler runs in bfloat16);
  - KV cache: tuples of L arrays k[i], v[i] [R,K,S,H] plus `valid` [R,S] bool, carried by the while_loop; the
    (rows, kv heads) batch dims lead, so both attention einsums are plain batched matmuls with no transposed copy
    of the cache;
  - the layer loop is unrolled; the new token's k/v are written with one dynamic_update_slice at the slot shared
    by all rows (prompts are left-padded to one bucket, so every row writes slot Tp + j - 1 at step j);
  - attention reads each layer's cache once (T = 1 query: einsums with float32 logits and softmax).
The math is the model's (models/attention.py, text.py, layers.py): RMSNorm -> q/k/v (bias) -> M-RoPE -> GQA
softmax(q k^T / sqrt(H)) v over visible slots -> o_proj -> residual -> RMSNorm -> gated MLP -> residual; final
norm; logits as `Qwen25VL.logits_from_hidden`. Tests check it token by token against the full forward.
Axis letters: R rows (prompts x samples), S cache slots, N/K/G heads, H head dim, D model, V vocab.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from ral_jax.models.layers import DenseGeneral, Embed, GatedMLP, RMSNorm, canon_dtype
from ral_jax.models.rope import apply_rope, mrope_angles


def layer_params(params, cfg, dtype) -> Dict[str, Any]:
  """Training params {'model', 'lm_head'} -> {'embed', 'layers': (L per-layer trees), 'norm', 'lm_head'} in dtype.

  Run under jit: slices of the stacked [L,...] leaves, cast to dtype (integer leaves kept)."""
  conv = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  m = params['model']
  stack = m['layers']
  layers = tuple(jax.tree.map(lambda x: conv(x[i]), stack) for i in range(cfg.num_hidden_layers))
  head = None if cfg.tie_word_embeddings else conv(params['lm_head']['kernel'])
  return {'embed': conv(m['embed_tokens']['embedding']), 'layers': layers, 'norm': conv(m['norm']['scale']),
          'lm_head': head}


def split_cache(stacked, num_samples: int) -> Dict[str, Any]:
  """The model's prefill cache (k, v [L,B,S,K,H], mask [B,S]) -> per-layer caches with each row repeated G times:
  {'k': (L x [B*G,K,S,H]), 'v': (...), 'valid': [B*G,S] bool} (np.repeat order: row b*G + g)."""
  rep = lambda x: jnp.repeat(x, num_samples, axis=0).transpose(0, 2, 1, 3)
  L = stacked['k'].shape[0]
  return {'k': tuple(rep(stacked['k'][i]) for i in range(L)), 'v': tuple(rep(stacked['v'][i]) for i in range(L)),
          'valid': jnp.repeat(stacked['mask'].astype(bool), num_samples, axis=0)}


def _attend(q, k, v, valid):
  """q [R,1,N,H], k/v [R,K,S,H], valid [R,S] -> [R,1,N,H]: softmax over valid slots, as jax.nn.dot_product_attention
  (XLA path) computes it: float32 logits and softmax, probabilities cast to v's dtype."""
  R, _, N, H = q.shape
  K = k.shape[1]
  qg = q.reshape(R, K, N // K, H)
  logits = jnp.einsum('rkgh,rksh->rkgs', qg, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(1.0 / H ** 0.5)
  logits = jnp.where(valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('rkgs,rksh->rkgh', probs, v)
  return out.reshape(R, 1, N, H)


def _layer(p, h, cos, sin, kc, vc, valid, slot, cfg, dt):
  N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  kw = dict(dtype=dt, param_dtype=dt)
  a = p['self_attn']
  x = RMSNorm(cfg.rms_norm_eps, **kw).apply({'params': p['input_layernorm']}, h)
  proj = lambda name, nh: DenseGeneral((nh, H), ('embed',), ('heads', 'head_dim'), use_bias=True, **kw).apply(
      {'params': a[name]}, x)
  q = apply_rope(proj('q_proj', N), cos, sin)
  k = apply_rope(proj('k_proj', K), cos, sin)
  v = proj('v_proj', K)
  kc = jax.lax.dynamic_update_slice(kc, k.transpose(0, 2, 1, 3).astype(kc.dtype), (0, 0, slot, 0))
  vc = jax.lax.dynamic_update_slice(vc, v.transpose(0, 2, 1, 3).astype(vc.dtype), (0, 0, slot, 0))
  o = _attend(q, kc.astype(q.dtype), vc.astype(q.dtype), valid)
  h = h + DenseGeneral((h.shape[-1],), ('heads', 'head_dim'), ('embed',), **kw).apply({'params': a['o_proj']}, o)
  x = RMSNorm(cfg.rms_norm_eps, **kw).apply({'params': p['post_attention_layernorm']}, h)
  h = h + GatedMLP(cfg.intermediate_size, **kw).apply({'params': p['mlp']}, x)
  return h, kc, vc


def decode_step(lp, cfg, cache, tokens, positions, slot) -> Tuple[jax.Array, Dict[str, Any]]:
  """One token per row. lp from `layer_params`; cache from `split_cache`; tokens [R] int32; positions [3,R,1]
  int32 (M-RoPE ids of the fed tokens); slot [] int32 (cache slot they are written to).
  Returns (logits [R,V] float32 for the next token, updated cache)."""
  dt = canon_dtype(cfg.dtype)
  R = tokens.shape[0]
  h = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt).apply(
      {'params': {'embedding': lp['embed']}}, tokens[:, None])                       # [R,1,D]
  cos, sin = mrope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
  valid = jax.lax.dynamic_update_slice(cache['valid'], jnp.ones((R, 1), bool), (0, slot))
  ks, vs = [], []
  for i, p in enumerate(lp['layers']):
    h, kc, vc = _layer(p, h, cos, sin, cache['k'][i], cache['v'][i], valid, slot, cfg, dt)
    ks.append(kc)
    vs.append(vc)
  h = RMSNorm(cfg.rms_norm_eps, dtype=dt, param_dtype=dt).apply({'params': {'scale': lp['norm']}}, h)
  if lp['lm_head'] is None:   # tied: as Qwen25VL.logits_from_hidden
    logits = jnp.einsum('btd,vd->btv', h.astype(dt), lp['embed'].astype(dt), preferred_element_type=jnp.float32)
  else:
    logits = DenseGeneral((cfg.vocab_size,), ('embed',), ('vocab',), dtype=dt, param_dtype=dt).apply(
        {'params': {'kernel': lp['lm_head']}}, h).astype(jnp.float32)
  return logits[:, 0], {'k': tuple(ks), 'v': tuple(vs), 'valid': valid}
