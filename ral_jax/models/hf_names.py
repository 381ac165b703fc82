"""The table between transformers' Qwen2.5-VL tensor names and the Flax parameter tree of `Qwen25VL`.

Two HF naming schemes exist; both are read, either is written:
  'hub':          visual.*, model.embed_tokens.*, model.layers.N.*, model.norm.*, lm_head.*  (checkpoints on the hub,
                  and what transformers 4.57 `save_pretrained` writes)
  'transformers': model.visual.*, model.language_model.{embed_tokens,layers.N,norm}.*, lm_head.*  (4.57's in-memory
                  state_dict / 5.x files)
Flax tree (`params`): 'visual' (models/vision.py docstring), 'model' (models/text.py: embed_tokens/embedding [V,D];
layers/... stacked with a leading L axis; norm/scale [D]) and 'lm_head'/kernel [D,V] unless tie_word_embeddings.

Conversions (`kind`), with Flax kernels laid out as in_shape + out_shape:
  'linear':  HF weight [out, in]  <->  kernel = weight.T reshaped to in_shape + out_shape   (n_in leading axes in)
  'conv':    HF Conv3d weight [C, c, t, p, p] (stride == kernel) <-> kernel [c*t*p*p, C] = weight.reshape(C, -1).T
  'copy':    same values, reshaped (biases [N*H] <-> [N,H], norms, the embedding table)
"""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

import numpy as np

from ral_jax.models.config import ModelConfig

SCHEMES = ('hub', 'transformers')


@dataclasses.dataclass(frozen=True)
class Spec:
  path: Tuple[str, ...]        # Flax path under params
  hf: str                      # HF name; '{i}' is the layer index when layers > 0
  kind: str                    # 'linear' | 'conv' | 'copy'
  flax_shape: Tuple[int, ...]  # per layer (without the stacked L axis)
  hf_shape: Tuple[int, ...]
  n_in: int = 1                # 'linear': number of leading input axes of the Flax kernel
  layers: int = 0              # > 0: Flax leaf stacked over this many layers, one HF tensor per layer

  def hf_name(self, i: int = 0) -> str:
    return self.hf.format(i=i)

  @property
  def full_flax_shape(self) -> Tuple[int, ...]:
    return ((self.layers,) if self.layers else ()) + self.flax_shape


def to_flax(spec: Spec, w: np.ndarray) -> np.ndarray:
  """One HF tensor (one layer) -> the Flax layout."""
  if spec.kind == 'linear':
    return w.T.reshape(spec.flax_shape)
  if spec.kind == 'conv':
    return w.reshape(w.shape[0], -1).T
  return w.reshape(spec.flax_shape)


def to_hf(spec: Spec, x: np.ndarray) -> np.ndarray:
  """One Flax slice (one layer) -> the HF layout (inverse of to_flax)."""
  if spec.kind == 'linear':
    n_in = int(np.prod(spec.flax_shape[:spec.n_in]))
    return x.reshape(n_in, -1).T
  if spec.kind == 'conv':
    return x.T.reshape(spec.hf_shape)
  return x.reshape(spec.hf_shape)


def _lin(path, hf, in_shape, out_shape, layers=0, bias=True):
  """A Linear: weight [prod(out), prod(in)] (+ bias [prod(out)])."""
  n_o, n_i = int(np.prod(out_shape)), int(np.prod(in_shape))
  out = [Spec(path + ('kernel',), hf + '.weight', 'linear', tuple(in_shape) + tuple(out_shape), (n_o, n_i),
              len(in_shape), layers)]
  if bias:
    out.append(Spec(path + ('bias',), hf + '.bias', 'copy', tuple(out_shape), (n_o,), 1, layers))
  return out


def _norm(path, hf, d, layers=0):
  return [Spec(path + ('scale',), hf + '.weight', 'copy', (d,), (d,), 1, layers)]


def vision_specs(cfg: ModelConfig, prefix: str) -> List[Spec]:
  v = cfg.vision
  c, f, n, hd, cm = v.hidden_size, v.intermediate_size, v.num_heads, v.head_dim, v.hidden_size * v.merge_unit
  out = [Spec(('visual', 'patch_embed', 'kernel'), prefix + 'patch_embed.proj.weight', 'conv', (v.patch_dim, c),
              (c, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))]
  for i in range(v.depth):
    p, h = ('visual', f'blocks_{i}'), f'{prefix}blocks.{i}.'
    out += _norm(p + ('norm1',), h + 'norm1', c) + _norm(p + ('norm2',), h + 'norm2', c)
    out += _lin(p + ('attn', 'qkv'), h + 'attn.qkv', (c,), (3, n, hd))
    out += _lin(p + ('attn', 'proj'), h + 'attn.proj', (n, hd), (c,))
    out += _lin(p + ('mlp', 'gate_proj'), h + 'mlp.gate_proj', (c,), (f,))
    out += _lin(p + ('mlp', 'up_proj'), h + 'mlp.up_proj', (c,), (f,))
    out += _lin(p + ('mlp', 'down_proj'), h + 'mlp.down_proj', (f,), (c,))
  out += _norm(('visual', 'merger', 'ln_q'), prefix + 'merger.ln_q', c)
  out += _lin(('visual', 'merger', 'mlp_0'), prefix + 'merger.mlp.0', (cm,), (cm,))
  out += _lin(('visual', 'merger', 'mlp_2'), prefix + 'merger.mlp.2', (cm,), (v.out_hidden_size,))
  return out


def text_specs(cfg: ModelConfig, prefix: str) -> List[Spec]:
  d, f, n, k, hd, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                       cfg.head_dim, cfg.num_hidden_layers)
  p, h = ('model', 'layers'), prefix + 'layers.{i}.'
  out = [Spec(('model', 'embed_tokens', 'embedding'), prefix + 'embed_tokens.weight', 'copy',
              (cfg.vocab_size, d), (cfg.vocab_size, d))]
  out += _norm(p + ('input_layernorm',), h + 'input_layernorm', d, L)
  out += _norm(p + ('post_attention_layernorm',), h + 'post_attention_layernorm', d, L)
  out += _lin(p + ('self_attn', 'q_proj'), h + 'self_attn.q_proj', (d,), (n, hd), L)
  out += _lin(p + ('self_attn', 'k_proj'), h + 'self_attn.k_proj', (d,), (k, hd), L)
  out += _lin(p + ('self_attn', 'v_proj'), h + 'self_attn.v_proj', (d,), (k, hd), L)
  out += _lin(p + ('self_attn', 'o_proj'), h + 'self_attn.o_proj', (n, hd), (d,), L, bias=False)
  out += _lin(p + ('mlp', 'gate_proj'), h + 'mlp.gate_proj', (d,), (f,), L, bias=False)
  out += _lin(p + ('mlp', 'up_proj'), h + 'mlp.up_proj', (d,), (f,), L, bias=False)
  out += _lin(p + ('mlp', 'down_proj'), h + 'mlp.down_proj', (f,), (d,), L, bias=False)
  out += _norm(('model', 'norm'), prefix + 'norm', d)
  return out


def all_specs(cfg: ModelConfig, scheme: str = 'hub') -> List[Spec]:
  """Every parameter of Qwen25VL(cfg) with its HF name under `scheme`."""
  if scheme not in SCHEMES:
    raise ValueError(f'unknown HF naming scheme {scheme!r}; choose one of {SCHEMES}')
  vp, tp = ('visual.', 'model.') if scheme == 'hub' else ('model.visual.', 'model.language_model.')
  out = vision_specs(cfg, vp) + text_specs(cfg, tp)
  if not cfg.tie_word_embeddings:
    out += _lin(('lm_head',), 'lm_head', (cfg.hidden_size,), (cfg.vocab_size,), bias=False)
  return out


def detect_scheme(names) -> str:
  """'transformers' if any name starts with model.visual. / model.language_model., else 'hub'."""
  new = any(n.startswith(('model.visual.', 'model.language_model.')) for n in names)
  old = any(n.startswith(('visual.', 'model.layers.', 'model.embed_tokens.')) for n in names)
  if new and old:
    raise ValueError('checkpoint mixes hub names (visual.*, model.layers.*) and transformers names '
                     '(model.visual.*, model.language_model.*): re-save it with one scheme')
  return 'transformers' if new else 'hub'
