"""Full-size presets at no cost (jax.eval_shape): parameter counts equal transformers' (meta device) counts."""
import jax
import numpy as np
import pytest
import torch
import transformers

from ral_jax.models.config import get_preset
from ral_jax.models.vision_inputs import build_vision_inputs_batch
from ral_jax.models.vlm import init_params


def _ours(cfg):
  grid = np.array([[[1, 2, 2]]])                         # one 28x28 image: 4 patches, enough to build the tower
  meta = build_vision_inputs_batch(grid, 4, cfg.vision)
  pixels = jax.ShapeDtypeStruct((1, 4, cfg.vision.patch_dim), np.float32)
  shapes = jax.eval_shape(lambda px: init_params(cfg, jax.random.PRNGKey(0), (px, meta)), pixels)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  return count(shapes), count(shapes['visual']), shapes


def _hf(cfg):
  with torch.device('meta'):
    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf()))
  total = sum(p.numel() for p in model.parameters())
  visual = sum(p.numel() for n, p in model.named_parameters() if '.visual.' in f'.{n}')
  return total, visual


@pytest.mark.parametrize('name,billions', [('qwen2_5_vl_3b', 3.75), ('qwen2_5_vl_7b', 8.29),
                                           ('qwen2_5_vl_32b', 33.45)])
def test_parameter_count_equals_transformers(name, billions):
  cfg = get_preset(name)
  ours, ours_vis, shapes = _ours(cfg)
  hf, hf_vis = _hf(cfg)
  assert ours_vis == hf_vis
  assert ours == hf
  assert abs(ours / 1e9 - billions) < 0.01
  L, D = cfg.num_hidden_layers, cfg.hidden_size
  layers = shapes['model']['layers']
  assert layers['self_attn']['q_proj']['kernel'].shape == (L, D, cfg.num_attention_heads, cfg.head_dim)
  assert layers['self_attn']['k_proj']['kernel'].shape == (L, D, cfg.num_key_value_heads, cfg.head_dim)
  assert layers['mlp']['down_proj']['kernel'].shape == (L, cfg.intermediate_size, D)
  assert ('lm_head' in shapes) == (not cfg.tie_word_embeddings)
