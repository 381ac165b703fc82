"""The Qwen2.5-VL language decoder: token embedding, a stack of L decoder layers, final RMSNorm.

Layer stack. All L layers' parameters live in ONE stacked pytree `params['model']['layers']`, each leaf with a
leading L axis (logical name 'layers'), whatever `cfg.scan_layers` says; the stack is created with a vmapped
init of `DecoderLayer` and applied with plain JAX: `lax.scan` over slices of the stack (cfg.scan_layers=True) or a
Python loop over layers (False). Both give the same parameter tree, so checkpoints and hf_io do not depend on it.
Each layer runs under `jax.checkpoint` with the policy named by `cfg.remat_policy` (see `remat_policy`).

Recorded layers (ral_jax/docs/method.md s.1) pay for the record alone: all L layers run in one scan (or loop) on the
fast attention path; the scan carries the input hidden state of each recorded layer ([n_rec,B,T,D], updated by a select,
so nothing is stacked over L), and after the stack `DecoderLayer.record` recomputes that layer's normed input, q and
k (a few percent of one layer's FLOPs) and the record. Gradients reach the layer's q/k/norm parameters and, through
the kept input, every layer below. (Cutting the stack into scans around the recorded layer instead would copy the
sliced parameter stacks and their gradients: +13 GB at 7B.)

KV cache (decode): see `ral_jax/models/vlm.py` for the cache pytree; here layer i reads and writes slice i of
cache['k'] / cache['v'] [L,B,Smax,K,H] carried through the scan (in place under donation).
Shared prompt (scoring and RL update, `TextModel.shared_prefix`): the same stack on prompt states [B,Tp,D] once per
prompt and response states [B*G,Tr,D]; see models/shared_prefix.py.
One-token decoding (the rollout): `DecoderLayer.decode` is the same block on one layer's own caches (a prompt cache
[B,K,Tp,H] shared by the G samples of each prompt, a response cache [R,K,Tr,H] per row), run by
models.vlm.decode_token over per-layer weights (see vlm.py for why the sampler does not use the scanned stack).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ral_jax.models.attention import Attention, write_cache
from ral_jax.models.layers import Embed, GatedMLP, RMSNorm, canon_dtype
from ral_jax.models.rope import mrope_angles

_H_AXES = ('activation_batch', 'activation_length', 'activation_embed')


# Primitives of the fused attention kernels' forward (cuDNN through `jax.nn.dot_product_attention`): their outputs
# (attention output and softmax statistics) are the residuals the kernel's backward reads.
FUSED_ATTENTION_FWD = frozenset({'dot_product_attention_fwd_wrapper', 'dot_product_attention_fwd'})


def _save_fused_attention(prim, *_, **__) -> bool:
  return prim.name in FUSED_ATTENTION_FWD


def remat_policy(name: str):
  """cfg.remat_policy -> (use_remat, jax.checkpoint policy).
  'none': no rematerialisation; 'nothing_saveable' / 'full': recompute everything in the backward pass, keep only
  each layer's input; 'dots_saveable': keep matmul outputs; 'dots_with_no_batch_dims_saveable': keep weight matmuls;
  'dots_and_attention_saveable': keep weight matmuls and the fused attention kernel's forward outputs (cuDNN), so
  the backward recomputes neither (XLA attention: as 'dots_with_no_batch_dims_saveable').
  """
  cp = jax.checkpoint_policies
  table = {'none': None, 'nothing_saveable': cp.nothing_saveable, 'full': cp.nothing_saveable,
           'dots_saveable': cp.dots_saveable,
           'dots_with_no_batch_dims_saveable': cp.dots_with_no_batch_dims_saveable,
           'dots_and_attention_saveable': cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                                                     _save_fused_attention)}
  if name not in table:
    raise ValueError(f'cfg.remat_policy={name!r}: choose one of {sorted(table)}')
  return name != 'none', table[name]


class DecoderLayer(nn.Module):
  """h + attn(input_layernorm(h)), then h + mlp(post_attention_layernorm(h)) (pre-norm Qwen2 block)."""
  cfg: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.input_layernorm = RMSNorm(cfg.rms_norm_eps, **kw)
    self.self_attn = Attention(cfg, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps, **kw)
    self.mlp = GatedMLP(cfg.intermediate_size, **kw)

  def __call__(self, h, cos, sin, key_valid, q_slot, kv_cache=None, cache_index=None, causal_fast: bool = True):
    a, new_cache = self.self_attn(self.input_layernorm(h), cos, sin, key_valid, q_slot, kv_cache=kv_cache,
                                  cache_index=cache_index, causal_fast=causal_fast)
    h = h + a
    h = h + self.mlp(self.post_attention_layernorm(h))
    return nn.with_logical_constraint(h, _H_AXES), new_cache

  def decode(self, h, cos, sin, prompt, k_cache, v_cache, valid, slot):
    """The same block for one new token per row on this layer's caches: prompt (k, v [B,K,Tp,H], valid [B,Tp]) shared
    by each prompt's samples, response k/v [R,K,Tr,H] per row (see Attention.decode).
    h [R,1,D] -> (h [R,1,D], k_cache, v_cache)."""
    a, k_cache, v_cache = self.self_attn.decode(self.input_layernorm(h), cos, sin, prompt, k_cache, v_cache, valid,
                                                slot)
    h = h + a
    h = h + self.mlp(self.post_attention_layernorm(h))
    return h, k_cache, v_cache

  def shared_prefix(self, h_p, h_r, rope_p, rope_r, valid_p, valid_r):
    """The same block on the shared-prefix layout (models/shared_prefix.py): prompt states h_p [B,Tp,D] once per
    prompt, response states h_r [R,Tr,D] (R = B*G); token-wise parts run on each, attention as
    Attention.shared_prefix. Returns (h_p, h_r)."""
    a_p, a_r = self.self_attn.shared_prefix(self.input_layernorm(h_p), self.input_layernorm(h_r), rope_p, rope_r,
                                            valid_p, valid_r)
    out = []
    for h, a in ((h_p, a_p), (h_r, a_r)):
      h = h + a
      h = h + self.mlp(self.post_attention_layernorm(h))
      out.append(nn.with_logical_constraint(h, _H_AXES))
    return tuple(out)

  def record_shared_prefix(self, h_p, h_r, rope_p, rope_r, valid_p, valid_r, record_rows, record_heads=False):
    """`record` from this layer's shared-prefix inputs (Attention.record_shared_prefix)."""
    return self.self_attn.record_shared_prefix(self.input_layernorm(h_p), self.input_layernorm(h_r), rope_p, rope_r,
                                               valid_p, valid_r, record_rows, record_heads)

  def record(self, h, cos, sin, key_valid, record_rows, record_heads: bool = False):
    """Attention record of this layer from its input h [B,T,D] (needs input_layernorm, q_proj, k_proj only)."""
    return self.self_attn.record(self.input_layernorm(h), cos, sin, key_valid, record_rows, record_heads)


def _add_layer_axis(tree):
  def fix(x):
    if isinstance(x, nn.LogicallyPartitioned):
      return x.replace(names=('layers',) + tuple(x.names))
    return x
  return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def normalize_layers(layers: Sequence[int], num_layers: int) -> Tuple[int, ...]:
  """(-1,) -> (L-1,); sorted, unique, checked."""
  out = []
  for l in layers:
    m = l + num_layers if l < 0 else l
    if not 0 <= m < num_layers:
      raise ValueError(f'record_layers entry {l} outside [-{num_layers}, {num_layers})')
    out.append(m)
  return tuple(sorted(set(out)))


def run_layers(layer_fn, stack, hs: Tuple, rec_layers: Sequence[int], num_layers: int, scan: bool):
  """Applies the L stacked layers to the states `hs` (a tuple: one hidden state, or the shared-prefix pass's
  prompt and response states), `layer_fn(layer params, *hs) -> hs`. scan=True: one `lax.scan` over the stack whose
  carry keeps the inputs of the recorded layers (a select per layer: nothing stacked over L); else a Python loop.
  Returns (hs after the last layer, {recorded layer: hs at its input})."""
  if not scan:
    inputs = {}
    for i in range(num_layers):
      if i in rec_layers:
        inputs[i] = hs
      hs = layer_fn(jax.tree.map(lambda x: x[i], stack), *hs)
    return hs, inputs
  rec_idx = jnp.asarray(rec_layers, jnp.int32)

  def body(carry, xs):
    hh, saved = carry
    p, i = xs
    if rec_layers:                    # keep the input of layer i if it is recorded
      hit = rec_idx == i
      saved = tuple(jnp.where(hit.reshape((-1,) + (1,) * x.ndim), x[None], s) for x, s in zip(hh, saved))
    return (layer_fn(p, *hh), saved), None

  saved = tuple(jnp.zeros((len(rec_layers),) + x.shape, x.dtype) for x in hs)
  (hs, saved), _ = jax.lax.scan(body, (tuple(hs), saved), (stack, jnp.arange(num_layers, dtype=jnp.int32)))
  return hs, {l: tuple(s[k] for s in saved) for k, l in enumerate(rec_layers)}


def record_params(stack, layer: int):
  """The leaves a layer's record reads (input_layernorm, q_proj, k_proj), sliced at `layer` from the stack."""
  return {'input_layernorm': jax.tree.map(lambda x: x[layer], stack['input_layernorm']),
          'self_attn': {n: jax.tree.map(lambda x: x[layer], stack['self_attn'][n]) for n in ('q_proj', 'k_proj')}}


class TextModel(nn.Module):
  """Params: embed_tokens.embedding [V,D]; layers.* (stacked, leading L); norm.scale [D]."""
  cfg: Any

  def setup(self):
    cfg = self.cfg
    self.dt, self.pdt = canon_dtype(cfg.dtype), canon_dtype(cfg.param_dtype)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dt, param_dtype=self.pdt)
    self.layers = self.param('layers', self._init_stack)
    self.norm = RMSNorm(cfg.rms_norm_eps, dtype=self.dt, param_dtype=self.pdt)

  def _layer(self) -> DecoderLayer:
    # parent=None: an unbound module applied functionally to one slice of the stacked parameters.
    return DecoderLayer(self.cfg, dtype=self.dt, param_dtype=self.pdt, parent=None)

  def _init_stack(self, rng):
    cfg = self.cfg
    B, T, H = 1, 1, cfg.head_dim
    h = jnp.zeros((B, T, cfg.hidden_size), self.dt)
    cs = jnp.zeros((B, T, H), jnp.float32)
    valid, slot = jnp.ones((B, T), bool), jnp.zeros((B, T), jnp.int32)
    # Parameters do not depend on the attention kernel: init with the default one (works on any backend).
    layer = DecoderLayer(cfg.replace(attention_impl=None), dtype=self.dt, param_dtype=self.pdt, parent=None)
    init_one = lambda r: layer.init(r, h, cs, cs, valid, slot)['params']
    return _add_layer_axis(jax.vmap(init_one)(jax.random.split(rng, cfg.num_hidden_layers)))

  def embed(self, input_ids):
    return self.embed_tokens(input_ids)

  def shared_prefix(self, h_p, pos_p, mask_p, h_r, pos_r, mask_r, *, record_rows=None, record_layers=(-1,),
                    record_heads: bool = False):
    """The teacher-forced pass with each prompt computed once for its G samples: see models/shared_prefix.py.
    Returns (final-normed hidden [R,Tr,D] predicting the response tokens, record)."""
    from ral_jax.models.shared_prefix import shared_prefix_stack    # (that module imports this one)
    return shared_prefix_stack(self, h_p, pos_p, mask_p, h_r, pos_r, mask_r, record_rows=record_rows,
                               record_layers=record_layers, record_heads=record_heads)

  def __call__(self, h, positions, attention_mask=None, *, record_rows=None, record_layers=(-1,),
               record_heads: bool = False, cache: Optional[Dict[str, Any]] = None):
    """h [B,T,D] input embeddings; positions [3,B,T]; attention_mask [B,T] (1 real, 0 pad) or None (all real).
    Returns (final-normed hidden [B,T,D], record {layer: {...}}, new cache or None)."""
    cfg = self.cfg
    B, T, _ = h.shape
    L = cfg.num_hidden_layers
    cos, sin = mrope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    stack = self.layers
    use_remat, policy = remat_policy(cfg.remat_policy)

    def make_fn(causal_fast: bool):
      def fn(p, h, key_valid, q_slot, kv, idx):
        return self._layer().apply({'params': p}, h, cos, sin, key_valid, q_slot, kv_cache=kv, cache_index=idx,
                                   causal_fast=causal_fast)
      return jax.checkpoint(fn, policy=policy) if use_remat else fn

    records = {}
    if cache is None:
      key_valid = None if attention_mask is None else attention_mask.astype(bool)
      q_slot = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      plain = make_fn(True)
      rec_layers = normalize_layers(record_layers, L) if record_rows is not None else ()
      (h,), inputs = run_layers(lambda p, hh: (plain(p, hh, key_valid, q_slot, None, None)[0],), stack, (h,),
                                rec_layers, L, cfg.scan_layers)

      def rec_fn(p, hh):
        return self._layer().apply({'params': p}, hh, cos, sin, key_valid, record_rows, record_heads,
                                   method=DecoderLayer.record)
      rec_fn = jax.checkpoint(rec_fn, policy=policy) if use_remat else rec_fn
      for l in rec_layers:
        records[l] = rec_fn(record_params(stack, l), *inputs[l])
      return self.norm(h), records, None

    if record_rows is not None:
      raise ValueError('record_rows needs cache=None: the record comes from a full forward, not from decoding')
    index = cache['index'].astype(jnp.int32)
    am = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    key_valid = write_cache(cache['mask'], am, index)
    q_slot = index[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    step = make_fn(False)

    def body(carry, xs):
      hh, kc, vc = carry
      p, i = xs
      kv = (jax.lax.dynamic_index_in_dim(kc, i, keepdims=False), jax.lax.dynamic_index_in_dim(vc, i, keepdims=False))
      hh, (k_new, v_new) = step(p, hh, key_valid, q_slot, kv, index)
      kc = jax.lax.dynamic_update_index_in_dim(kc, k_new, i, 0)
      vc = jax.lax.dynamic_update_index_in_dim(vc, v_new, i, 0)
      return (hh, kc, vc), None

    carry = (h, cache['k'], cache['v'])
    if cfg.scan_layers:
      carry, _ = jax.lax.scan(body, carry, (stack, jnp.arange(L, dtype=jnp.int32)))
    else:
      for i in range(L):
        carry, _ = body(carry, (jax.tree.map(lambda x: x[i], stack), i))
    h, kc, vc = carry
    new_cache = {'k': kc, 'v': vc, 'mask': key_valid, 'index': index + T}
    return self.norm(h), records, new_cache
