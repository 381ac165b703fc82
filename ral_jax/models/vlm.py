"""Qwen2.5-VL in Flax Linen: vision tower ('visual'), language decoder ('model'), lm_head. Pure `apply`.

Usage (INTERFACES.md "Model"):
  model = Qwen25VL(cfg)
  params = init_params(cfg, rng)                       # decoder + lm_head (+ 'visual' with vision_inputs=...)
  vis = model.apply({'params': params}, pixel_values, vision_meta, method=Qwen25VL.encode_vision)   # [B,Nv,D]
  out = model.apply({'params': params}, input_ids, positions, attention_mask, visual_embeds=vis,
                    record_rows=rows, record_layers=(-1,), record_heads=False, return_hidden=False, cache=None)
  out.logits [B,T,V] f32 | out.hidden [B,T,D] | out.record {layer: {'policy' [B,R,S], 'heads' [B,N,R,S]}} |
  out.cache (decode only)
  out = model.apply({'params': params}, prompt_ids, prompt_positions, prompt_mask, response_ids, response_positions,
                    response_mask, visual_embeds=vis, record_rows=rows, method=Qwen25VL.shared_prefix)
  the teacher-forced pass of B prompts x G samples with each prompt computed once (models/shared_prefix.py):
  out.hidden [B*G,Tr,D] predicting the response tokens, out.record as above over the whole [prompt | response] keys.
Record (ral_jax/docs/method.md s.1; models/attention.py attention_record): keys are int layer indices >= 0
(record_layers may be negative, -1 = last); 'policy' = head-mean softmax over keys j <= row, self dropped,
renormalised over j < row, padding keys 0, float32, all-zero for rows < 0 or rows without an earlier real key;
'heads' (record_heads=True) = the raw per-head alpha (self included, not renormalised), for visualisation. Gradients
reach the recorded layer's q/k (+ input norm) and everything below; the layer's v/o/MLP and lm_head get none from it.

Visual embeddings: the k-th token of example b whose id is image_token_id or video_token_id takes
visual_embeds[b, k] (cumulative-count gather, static shapes); all other tokens take the embedding table.

Parameter tree (param_dtype; logical axis names in brackets; L layers, N/K/H heads, F mlp, V vocab):
  visual/...                                       VisionTower (models/vision.py; see its docstring)
  model/embed_tokens/embedding      [V,D]          ('vocab','embed')
  model/layers/input_layernorm/scale          [L,D]      ('layers','norm')
  model/layers/self_attn/q_proj/kernel        [L,D,N,H]  ('layers','embed','heads','head_dim')
  model/layers/self_attn/q_proj/bias          [L,N,H]    ('layers','heads','head_dim')
  model/layers/self_attn/k_proj/kernel        [L,D,K,H]  ('layers','embed','kv_heads','head_dim')  (v_proj same)
  model/layers/self_attn/k_proj/bias          [L,K,H]    ('layers','kv_heads','head_dim')          (v_proj same)
  model/layers/self_attn/o_proj/kernel        [L,N,H,D]  ('layers','heads','head_dim','embed')  (no bias)
  model/layers/post_attention_layernorm/scale [L,D]      ('layers','norm')
  model/layers/mlp/gate_proj/kernel           [L,D,F]    ('layers','embed','mlp')    (up_proj same)
  model/layers/mlp/down_proj/kernel           [L,F,D]    ('layers','mlp','embed')
  model/norm/scale                  [D]            ('norm',)
  lm_head/kernel                    [D,V]          ('embed','vocab')   absent when cfg.tie_word_embeddings
HF mapping: HF `model.layers.{i}.self_attn.q_proj.weight` [N*H, D] = kernel[i].reshape(D, N*H).T;
`.bias` [N*H] = bias[i].reshape(-1); o_proj.weight [D, N*H] = kernel[i].reshape(N*H, D).T; mlp weights [out,in]
are kernel[i].T; norms' `.weight` = scale; `model.embed_tokens.weight` = embedding; `lm_head.weight` = kernel.T.
The layer stack is the same pytree with or without cfg.scan_layers.

KV cache pytree (decode; `init_cache(cfg, B, S_max, dtype)`), slot j holds sequence position j of the row:
  {'k': [L,B,S_max,K,H] dtype, 'v': [L,B,S_max,K,H] dtype,
   'mask': [B,S_max] bool   slot holds a real token (written from attention_mask),
   'index': [B] int32       next slot to write (the same for all rows when they step together)}
Prefill: call with the left-padded prompt [B,Tp] (its attention_mask, positions [3,B,Tp]) and a fresh cache: slots
0..Tp-1 are written, out.cache['index'] = Tp. Step: input_ids [B,1], positions [3,B,1] (= next_pos + step),
attention_mask [B,1] (1, or 0 for a token that later queries must ignore); writes slot index[b] and advances it.
Query at slot i attends to slots j <= i with mask[j]. Decoding logits equal the full forward's at the same positions.
Donate the cache to the jitted step (`lax.while_loop` carries it).

Per-layer decoding (the rollout engine's loop; `decode_token`): the stacked cache above, carried through a
`lax.scan` over stacked weights, costs per layer a copy of the cache slice out of the stack, a scatter, a write back
and a dynamic-slice copy of the layer weights: several passes over memory for one token. Decoding is bound by memory
bandwidth, so the sampler instead keeps
  weights `decode_weights(params, cfg, dtype)`: {'embed', 'layers': (L per-layer trees), 'norm', 'lm_head'} in the
          sampling dtype (made once per rollout, together with the cast);
  prompt  `prompt_cache(cache)`: {'k': (L x [B,K,Tp,H]), 'v': (...), 'valid': [B,Tp] bool}, the prefill's cache
          transposed per layer, ONE copy per prompt shared by its G samples (read only while decoding);
  cache   `response_cache(cfg, R, Tr)`: {'k': (L x [R,K,Tr,H]), 'v': (...), 'valid': [R,Tr] bool}, per row
          (R = B*G, row b*G + g is sample g of prompt b);
and runs the layers unrolled, each through `DecoderLayer.decode` (the model's own block: one token written at the
response slot shared by all rows; attention reads the prompt cache once per prompt and each row's response cache
once, one softmax over both: attention.attend_shared_prefix). Tests check it against the full forward and against
the cached `__call__` above run on the G-fold repeated prompts.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ral_jax.models.layers import DenseGeneral, Embed, RMSNorm, canon_dtype
from ral_jax.models.rope import mrope_angles
from ral_jax.models.shared_prefix import samples_per_prompt
from ral_jax.models.text import DecoderLayer, TextModel
from ral_jax.models.vision import VisionTower


@flax.struct.dataclass
class ModelOutput:
  logits: Optional[jax.Array] = None     # [B,T,V] float32 (None when return_hidden)
  hidden: Optional[jax.Array] = None     # [B,T,D] final-normed (when return_hidden)
  record: Dict[int, Dict[str, jax.Array]] = flax.struct.field(default_factory=dict)
  cache: Optional[Dict[str, jax.Array]] = None


def init_cache(cfg, batch: int, max_len: int, dtype=None) -> Dict[str, jax.Array]:
  """Empty KV cache (see module docstring). dtype defaults to cfg.dtype."""
  dt = canon_dtype(dtype or cfg.dtype)
  shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
  return {'k': jnp.zeros(shape, dt), 'v': jnp.zeros(shape, dt), 'mask': jnp.zeros((batch, max_len), bool),
          'index': jnp.zeros((batch,), jnp.int32)}


def scatter_visual(embeds, input_ids, visual_embeds, image_token_id: int, video_token_id: int):
  """embeds [B,T,D], input_ids [B,T], visual_embeds [B,Nv,D] -> embeds with the k-th vision pad token of each row
  replaced by visual_embeds[b,k] (k counted from 0 over image and video pad tokens together)."""
  is_vis = (input_ids == image_token_id) | (input_ids == video_token_id)
  k = jnp.cumsum(is_vis.astype(jnp.int32), axis=1) - 1
  k = jnp.clip(k, 0, visual_embeds.shape[1] - 1)
  gathered = jnp.take_along_axis(visual_embeds.astype(embeds.dtype), k[:, :, None], axis=1)
  return jnp.where(is_vis[:, :, None], gathered, embeds)


def tied_logits(hidden, embedding, dtype):
  """hidden [B,T,D], embedding [V,D] -> logits [B,T,V] float32 (the tied lm head: matmul in dtype, f32 accumulate)."""
  return jnp.einsum('btd,vd->btv', hidden.astype(dtype), embedding.astype(dtype), preferred_element_type=jnp.float32)


def lm_head_kernel(params, cfg) -> jax.Array:
  """The [D,V] output projection: the transposed embedding when tied, else params['lm_head']['kernel']."""
  if cfg.tie_word_embeddings:
    return params['model']['embed_tokens']['embedding'].T
  return params['lm_head']['kernel']


def compute_params(params, cfg):
  """`params` with the decoder stack and an untied lm head cast once to the compute dtype (cfg.dtype), for a caller
  that runs several passes over the same parameters (micro-batches, scoring chunks). Every use of these leaves casts
  them to cfg.dtype anyway (DenseGeneral, RMSNorm, the log-prob projection), so the passes compute the same values;
  what changes is that each pass reads the layers' weights in the compute dtype instead of reading float32 slices and
  converting them (at Qwen2.5-VL-3B on an H200, ~2 bytes per parameter less per layer visit). The embedding stays
  in param_dtype: its lookup's gradient sums many tokens' rows and keeps float32 accumulation. A gradient taken with
  respect to the result has the compute dtype on the cast leaves: cast it back (`grads_like`) before summing."""
  dt = canon_dtype(cfg.dtype)
  if canon_dtype(cfg.param_dtype) == dt:
    return params
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
  out = dict(params)
  out['model'] = dict(params['model'], layers=cast(params['model']['layers']))
  if 'lm_head' in params:
    out['lm_head'] = cast(params['lm_head'])
  return out


class Qwen25VL(nn.Module):
  cfg: Any

  def setup(self):
    cfg = self.cfg
    self.dt, self.pdt = canon_dtype(cfg.dtype), canon_dtype(cfg.param_dtype)
    self.visual = VisionTower(cfg.vision, self.dt, self.pdt, attention_impl=cfg.attention_impl)
    self.model = TextModel(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = DenseGeneral((cfg.vocab_size,), ('embed',), ('vocab',), dtype=self.dt, param_dtype=self.pdt)

  def encode_vision(self, pixel_values, vision_meta):
    """pixel_values [B,P,patch_dim], vision_meta (models.vision_inputs) -> visual_embeds [B,Nv,D]."""
    return self.visual(pixel_values, vision_meta)

  def logits_from_hidden(self, hidden):
    """hidden [B,T,D] -> logits [B,T,V] float32 (matmul in the compute dtype, float32 accumulation)."""
    if self.cfg.tie_word_embeddings:
      return tied_logits(hidden, self.model.embed_tokens.embedding, self.dt)
    return self.lm_head(hidden).astype(jnp.float32)

  def __call__(self, input_ids, positions, attention_mask=None, visual_embeds=None, record_rows=None,
               record_layers: Sequence[int] = (-1,), record_heads: bool = False, return_hidden: bool = False,
               cache=None) -> ModelOutput:
    """input_ids [B,T] int32; positions [3,B,T] int32; attention_mask [B,T] (1 real) or None; visual_embeds
    [B,Nv,D] or None; record_rows [B,R] int32 (query positions, < 0 = unused row) or None; cache: see module doc."""
    cfg = self.cfg
    if positions.shape != (3,) + input_ids.shape:
      raise ValueError(f'positions shape {positions.shape} != (3,) + input_ids.shape {(3,) + input_ids.shape}')
    h = self.model.embed(input_ids)
    if visual_embeds is not None:
      h = scatter_visual(h, input_ids, visual_embeds, cfg.image_token_id, cfg.video_token_id)
    hidden, record, new_cache = self.model(h, positions, attention_mask, record_rows=record_rows,
                                           record_layers=tuple(record_layers), record_heads=record_heads, cache=cache)
    if return_hidden:
      return ModelOutput(hidden=hidden, record=record, cache=new_cache)
    return ModelOutput(logits=self.logits_from_hidden(hidden), record=record, cache=new_cache)

  def shared_prefix(self, prompt_ids, prompt_positions, prompt_mask, response_ids, response_positions, response_mask,
                    visual_embeds=None, record_rows=None, record_layers: Sequence[int] = (-1,),
                    record_heads: bool = False, return_hidden: bool = True) -> ModelOutput:
    """Teacher-forced pass over R = B*G rows [prompt b | response r] (row r = b*G + g) computing each prompt once
    (models/shared_prefix.py). prompt_ids [B,Tp], prompt_positions [3,B,Tp], prompt_mask [B,Tp]; response_ids
    [R,Tr], response_positions [3,R,Tr], response_mask [R,Tr]; visual_embeds [B,Nv,D] (one per prompt) or None;
    record_rows [R,Rr] whole-sequence slots >= Tp-1 (rl.attention_loss.record_rows 'response' or 'producing').
    Returns ModelOutput with hidden [R,Tr,D] (or logits [R,Tr,V]) of the states predicting the response tokens
    (= `response_slice` of `__call__` on the concatenated rows) and record {layer: {'policy' [R,Rr,Tp+Tr], ...}}."""
    cfg = self.cfg
    R = response_ids.shape[0]
    G = samples_per_prompt(prompt_ids.shape[0], R)
    h_p = self.model.embed(prompt_ids)
    h_r = self.model.embed(response_ids)
    if visual_embeds is not None:
      h_p = scatter_visual(h_p, prompt_ids, visual_embeds, cfg.image_token_id, cfg.video_token_id)
      # A response token with a vision pad id continues the prompt's count, exactly as in the full forward.
      is_vis = lambda ids: (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
      seen = jnp.repeat(jnp.sum(is_vis(prompt_ids), axis=1, dtype=jnp.int32), G)            # [R]
      vr = is_vis(response_ids)
      k = jnp.clip(seen[:, None] + jnp.cumsum(vr.astype(jnp.int32), axis=1) - 1, 0, visual_embeds.shape[1] - 1)
      b = (jnp.arange(R, dtype=jnp.int32) // G)[:, None]
      h_r = jnp.where(vr[:, :, None], jnp.asarray(visual_embeds)[b, k].astype(h_r.dtype), h_r)
    hidden, record = self.model.shared_prefix(h_p, prompt_positions, prompt_mask, h_r, response_positions,
                                              response_mask, record_rows=record_rows,
                                              record_layers=tuple(record_layers), record_heads=record_heads)
    if return_hidden:
      return ModelOutput(hidden=hidden, record=record)
    return ModelOutput(logits=self.logits_from_hidden(hidden), record=record)


def init_params(cfg, rng, vision_inputs=None, boxed: bool = False):
  """Random parameters. Without vision_inputs: 'model' and 'lm_head' only (the decoder); with
  vision_inputs=(pixel_values, vision_meta): also 'visual'. boxed=True keeps flax LogicallyPartitioned leaves."""
  model = Qwen25VL(cfg.replace(attention_impl=None))   # parameters do not depend on the attention kernel
  ids = jnp.zeros((1, 1), jnp.int32)
  pos = jnp.zeros((3, 1, 1), jnp.int32)

  def fn(m):
    out = m(ids, pos)
    if vision_inputs is not None:
      m.encode_vision(*vision_inputs)
    return out

  params = jax.jit(lambda r: model.init(r, method=fn)['params'])(rng)
  return params if boxed else nn.meta.unbox(params)


# ---- per-layer one-token decoding (the rollout engine's loop; see the module docstring) ----------------------

def decode_weights(params, cfg, dtype) -> Dict[str, Any]:
  """Training params {'model', 'lm_head'} -> {'embed', 'layers': (L per-layer trees), 'norm', 'lm_head'} in dtype
  (integer leaves kept; 'lm_head' None when tied). Run under jit: slices of the stacked [L,...] leaves, cast."""
  conv = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  m = params['model']
  stack = m['layers']
  layers = tuple(jax.tree.map(lambda x: conv(x[i]), stack) for i in range(cfg.num_hidden_layers))
  head = None if cfg.tie_word_embeddings else conv(params['lm_head']['kernel'])
  return {'embed': conv(m['embed_tokens']['embedding']), 'layers': layers, 'norm': conv(m['norm']['scale']),
          'lm_head': head}


def prompt_cache(cache) -> Dict[str, Any]:
  """The stacked cache of a prefill (k, v [L,B,S,K,H], mask [B,S]) -> per-layer prompt caches, one copy per prompt
  (shared by its G samples, never repeated): {'k': (L x [B,K,S,H]), 'v': (...), 'valid': [B,S] bool}."""
  tr = lambda x: x.transpose(0, 2, 1, 3)
  L = cache['k'].shape[0]
  return {'k': tuple(tr(cache['k'][i]) for i in range(L)), 'v': tuple(tr(cache['v'][i]) for i in range(L)),
          'valid': cache['mask'].astype(bool)}


def response_cache(cfg, rows: int, length: int, dtype=None) -> Dict[str, Any]:
  """Empty per-row response caches: {'k': (L x [R,K,Tr,H]) zeros, 'v': (...), 'valid': [R,Tr] False}."""
  dt = canon_dtype(dtype or cfg.dtype)
  shape = (rows, cfg.num_key_value_heads, length, cfg.head_dim)
  L = cfg.num_hidden_layers
  return {'k': tuple(jnp.zeros(shape, dt) for _ in range(L)), 'v': tuple(jnp.zeros(shape, dt) for _ in range(L)),
          'valid': jnp.zeros((rows, length), bool)}


def decode_token(weights, cfg, prompt, cache, tokens, positions, slot):
  """One token per row through the whole decoder. weights from `decode_weights` (in cfg.dtype); prompt from
  `prompt_cache` (B prompts, read only); cache from `response_cache` (R = B*G rows, row b*G + g continues prompt b);
  tokens [R] int32; positions [3,R,1] int32 (M-RoPE ids of the fed tokens); slot [] int32 (the response slot they
  are written to, shared by all rows). Returns (logits [R,V] float32 of the next token, response cache)."""
  dt = canon_dtype(cfg.dtype)
  kw = dict(dtype=dt, param_dtype=dt)
  R = tokens.shape[0]
  h = Embed(cfg.vocab_size, cfg.hidden_size, **kw).apply({'params': {'embedding': weights['embed']}},
                                                         tokens[:, None])                       # [R,1,D]
  cos, sin = mrope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
  valid = jax.lax.dynamic_update_slice(cache['valid'], jnp.ones((R, 1), bool), (0, slot))
  layer = DecoderLayer(cfg, **kw)
  ks, vs = [], []
  for i, p in enumerate(weights['layers']):
    pkv = (prompt['k'][i], prompt['v'][i], prompt['valid'])
    h, kc, vc = layer.apply({'params': p}, h, cos, sin, pkv, cache['k'][i], cache['v'][i], valid, slot,
                            method=DecoderLayer.decode)
    ks.append(kc)
    vs.append(vc)
  h = RMSNorm(cfg.rms_norm_eps, **kw).apply({'params': {'scale': weights['norm']}}, h)
  if weights['lm_head'] is None:
    logits = tied_logits(h, weights['embed'], dt)
  else:
    logits = DenseGeneral((cfg.vocab_size,), ('embed',), ('vocab',), **kw).apply(
        {'params': {'kernel': weights['lm_head']}}, h).astype(jnp.float32)
  return logits[:, 0], {'k': tuple(ks), 'v': tuple(vs), 'valid': valid}
