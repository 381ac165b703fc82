"""Typed Qwen2.5-VL model configuration and the presets this project ships.

Field names follow transformers' `Qwen2_5_VLConfig` (text) and `Qwen2_5_VLVisionConfig` (vision), so that
`ModelConfig.from_hf(dict)` and `to_hf()` are straight renames. Axis letters used across the models package:
  B batch, T query sequence, S key sequence, N query heads, K kv heads, H head dim, D model dim, F mlp dim,
  V vocab, P vision patches (per example, padded), L layers, R recorded attention rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple


DTYPES = ('float32', 'bfloat16', 'float16')
REMAT_POLICIES = ('none', 'nothing_saveable', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'dots_and_attention_saveable')
ATTENTION_IMPLS = (None, 'xla', 'cudnn')


def _dtype_name(d) -> str:
  """'bfloat16', jnp.bfloat16 or np.dtype('float32') -> its name."""
  return d if isinstance(d, str) else getattr(d, 'name', None) or getattr(d, '__name__', str(d))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: Tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  tokens_per_second: float = 2.0
  rms_norm_eps: float = 1e-6

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}')
    if self.window_size % (self.patch_size * self.spatial_merge_size):
      raise ValueError('vision window_size must be a multiple of patch_size * spatial_merge_size')
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f'vision fullatt_block_indexes {bad} outside [0, depth={self.depth})')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: C * temporal_patch * patch * patch (1176 for Qwen2.5-VL)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Qwen2.5-VL: the decoder fields, the vision tower, special token ids and run-time numerics."""
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: Tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = False
  vision: VisionConfig = VisionConfig()
  # Special tokens (Qwen2.5-VL ids; the embedded tokenizer keeps the same names, its own ids).
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  # Run-time numerics (not part of the HF config).
  dtype: str = 'bfloat16'        # compute dtype
  param_dtype: str = 'float32'   # storage dtype of parameters
  remat_policy: str = 'nothing_saveable'  # 'none' | 'nothing_saveable' | 'dots_saveable' | 'full'
  scan_layers: bool = True
  attention_impl: Optional[str] = None  # passed to jax.nn.dot_product_attention: None (auto) | 'xla' | 'cudnn'
  record_chunk: int = 256        # query rows per chunk when materialising the attention record

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f'num_attention_heads {self.num_attention_heads} not divisible by '
                       f'num_key_value_heads {self.num_key_value_heads}')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size {self.hidden_size} not divisible by num_attention_heads')
    if 2 * sum(self.mrope_section) != self.head_dim:
      raise ValueError(f'mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}')
    if self.vision.out_hidden_size != self.hidden_size:
      raise ValueError(f'vision.out_hidden_size {self.vision.out_hidden_size} != hidden_size {self.hidden_size}')
    for name, value, allowed in (('dtype', _dtype_name(self.dtype), DTYPES),
                                 ('param_dtype', _dtype_name(self.param_dtype), DTYPES),
                                 ('remat_policy', self.remat_policy, REMAT_POLICIES),
                                 ('attention_impl', self.attention_impl, ATTENTION_IMPLS)):
      if value not in allowed:
        raise ValueError(f'model.{name}={value!r}: choose one of {allowed}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)

  # ---- HF config.json <-> ModelConfig -------------------------------------------------------------
  _TEXT_KEYS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                'num_key_value_heads', 'rms_norm_eps', 'rope_theta', 'max_position_embeddings')
  _VISION_KEYS = ('depth', 'hidden_size', 'intermediate_size', 'num_heads', 'in_channels', 'patch_size',
                  'temporal_patch_size', 'spatial_merge_size', 'window_size', 'fullatt_block_indexes',
                  'out_hidden_size', 'tokens_per_second')
  _TOKEN_KEYS = ('image_token_id', 'video_token_id', 'vision_start_token_id', 'vision_end_token_id')

  @classmethod
  def from_hf(cls, hf: dict, **overrides: Any) -> 'ModelConfig':
    """Builds a config from a parsed config.json (flat 4.x layout or nested `text_config`)."""
    if hf.get('model_type') not in (None, 'qwen2_5_vl'):
      raise ValueError(f"config.json model_type={hf.get('model_type')!r}: only 'qwen2_5_vl' is supported")
    text = dict(hf)
    text.update(hf.get('text_config') or {})
    for key, want in (('hidden_act', 'silu'),):
      if text.get(key, want) != want:
        raise ValueError(f'config.json field {key}={text[key]!r}: only {want!r} is supported')
    rope = text.get('rope_scaling') or text.get('rope_parameters') or {}
    if 'mrope_section' not in rope:
      raise ValueError('config.json field rope_scaling.mrope_section is missing: not a Qwen2.5-VL config')
    vis = hf.get('vision_config') or {}
    if vis.get('hidden_act', 'silu') != 'silu':
      raise ValueError(f"config.json field vision_config.hidden_act={vis['hidden_act']!r}: only 'silu' is supported")
    vkw = {k: vis[k] for k in cls._VISION_KEYS if k in vis}
    if 'fullatt_block_indexes' in vkw:
      vkw['fullatt_block_indexes'] = tuple(vkw['fullatt_block_indexes'])
    kw = {k: text[k] for k in cls._TEXT_KEYS if k in text}
    kw.update({k: hf[k] for k in cls._TOKEN_KEYS if k in hf})
    kw['mrope_section'] = tuple(rope['mrope_section'])
    kw['tie_word_embeddings'] = bool(hf.get('tie_word_embeddings', text.get('tie_word_embeddings', False)))
    kw['vision'] = VisionConfig(**vkw)
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict:
    """A transformers-loadable config.json dict (the flat layout transformers 4.57 writes)."""
    d = {k: getattr(self, k) for k in self._TEXT_KEYS + self._TOKEN_KEYS}
    d.update(model_type='qwen2_5_vl', architectures=['Qwen2_5_VLForConditionalGeneration'],
             hidden_act='silu', tie_word_embeddings=self.tie_word_embeddings, torch_dtype='float32',
             rope_scaling={'type': 'mrope', 'rope_type': 'default', 'mrope_section': list(self.mrope_section)},
             attention_dropout=0.0, use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
    v = self.vision
    d['vision_config'] = {k: getattr(v, k) for k in self._VISION_KEYS}
    tps = v.tokens_per_second
    d['vision_config'].update(hidden_act='silu', fullatt_block_indexes=list(v.fullatt_block_indexes),
                              model_type='qwen2_5_vl', tokens_per_second=int(tps) if float(tps).is_integer() else tps)
    return d


_VISION_7B = VisionConfig()

PRESETS = {
    # CPU default and tests: odd / prime sizes so that a swapped axis fails loudly.
    'tiny': ModelConfig(
        vocab_size=1031, hidden_size=96, intermediate_size=164, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, mrope_section=(2, 3, 3), max_position_embeddings=4096,
        vision=VisionConfig(depth=3, hidden_size=40, intermediate_size=74, num_heads=2, window_size=56,
                            fullatt_block_indexes=(1,), out_hidden_size=96),
        image_token_id=1021, video_token_id=1022, vision_start_token_id=1019, vision_end_token_id=1020,
        dtype='float32', remat_policy='none', record_chunk=16),
    # The testbed model (configs/common.py apply_testbed): ~16M parameters, trains in minutes on one GPU and still
    # runs (slowly) on a CPU; GQA 6 query / 2 KV heads, a 4-layer vision tower with windowed and full attention.
    'small': ModelConfig(
        vocab_size=1031, hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
        num_key_value_heads=2, mrope_section=(8, 12, 12), max_position_embeddings=8192,
        vision=VisionConfig(depth=4, hidden_size=192, intermediate_size=512, num_heads=4, window_size=112,
                            fullatt_block_indexes=(1, 3), out_hidden_size=384),
        image_token_id=1021, video_token_id=1022, vision_start_token_id=1019, vision_end_token_id=1020,
        dtype='float32', remat_policy='none', record_chunk=64),
    'qwen2_5_vl_3b': ModelConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
        vision=dataclasses.replace(_VISION_7B, out_hidden_size=2048)),
    'qwen2_5_vl_7b': ModelConfig(),
    'qwen2_5_vl_32b': ModelConfig(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, vision=dataclasses.replace(_VISION_7B, intermediate_size=3456, out_hidden_size=5120)),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; choose one of {sorted(PRESETS)}')
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
