"""Test helper (model tests): a tiny transformers Qwen2.5-VL with random weights and its decoder weights converted
into the ral_jax parameter tree by hand (independent of ral_jax.models.hf_io / hf_names)."""
import numpy as np
import torch
import transformers

from ral_jax.models.config import get_preset


def tiny_cfg(**kw):
  return get_preset('tiny', **kw)


def hf_model(cfg, seed=0, attn='eager'):
  """Qwen2_5_VLForConditionalGeneration in float32 with every tensor drawn N(0, 0.05^2) (biases included)."""
  torch.manual_seed(seed)
  hcfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf())
  hcfg._attn_implementation = attn
  model = transformers.Qwen2_5_VLForConditionalGeneration(hcfg).eval().float()
  with torch.no_grad():
    for name, t in model.named_parameters():
      if name.endswith('norm.weight') or 'layernorm' in name:
        t.copy_(1.0 + 0.1 * torch.randn_like(t))
      else:
        t.copy_(0.05 * torch.randn_like(t))
  return model


def decoder_params(model, cfg):
  """'model' + 'lm_head' subtrees (numpy float32) from the HF model's state dict."""
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  pre = 'model.language_model.' if any(k.startswith('model.language_model.') for k in sd) else 'model.'
  D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

  def layer(i):
    g = lambda n: sd[f'{pre}layers.{i}.{n}']
    return {
        'input_layernorm': {'scale': g('input_layernorm.weight')},
        'post_attention_layernorm': {'scale': g('post_attention_layernorm.weight')},
        'self_attn': {
            'q_proj': {'kernel': g('self_attn.q_proj.weight').T.reshape(D, N, H),
                       'bias': g('self_attn.q_proj.bias').reshape(N, H)},
            'k_proj': {'kernel': g('self_attn.k_proj.weight').T.reshape(D, K, H),
                       'bias': g('self_attn.k_proj.bias').reshape(K, H)},
            'v_proj': {'kernel': g('self_attn.v_proj.weight').T.reshape(D, K, H),
                       'bias': g('self_attn.v_proj.bias').reshape(K, H)},
            'o_proj': {'kernel': g('self_attn.o_proj.weight').T.reshape(N, H, D)}},
        'mlp': {n: {'kernel': g(f'mlp.{n}.weight').T} for n in ('gate_proj', 'up_proj', 'down_proj')},
    }
  layers = [layer(i) for i in range(cfg.num_hidden_layers)]
  stacked = _stack(layers)
  params = {'model': {'embed_tokens': {'embedding': sd[f'{pre}embed_tokens.weight']}, 'layers': stacked,
                      'norm': {'scale': sd[f'{pre}norm.weight']}}}
  if not cfg.tie_word_embeddings:
    params['lm_head'] = {'kernel': sd['lm_head.weight'].T}
  return params


def _stack(trees):
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def padded_batch(cfg, lengths, T, seed=0, mrope=True):
  """Left-padded ids [B,T], mask [B,T] and 3-D positions [3,B,T] (pads at position 1, as HF). With mrope=True a
  block of 'visual' tokens in each row gets distinct (t, h, w) positions, so the three M-RoPE rows differ."""
  rng = np.random.default_rng(seed)
  B = len(lengths)
  ids = rng.integers(0, cfg.vocab_size - 20, (B, T)).astype(np.int32)
  mask = np.zeros((B, T), np.int32)
  pos = np.ones((3, B, T), np.int32)
  for b, n in enumerate(lengths):
    mask[b, T - n:] = 1
    p = np.stack([np.arange(n)] * 3)
    if mrope and n >= 8:   # tokens 2..5 as a 2x2 'image' with position (s, s+h, s+w), text after at max+1
      s = 2
      p[:, 2:6] = np.array([[s, s, s, s], [s, s, s + 1, s + 1], [s, s + 1, s, s + 1]])
      p[:, 6:] = np.arange(n - 6)[None] + s + 2
    pos[:, b, T - n:] = p
  return ids, mask, pos


def eq2_policy(attn, rows, mask):
  """Naive ral_jax/docs/method.md Eq. 2 from full attention probabilities attn [B,N,T,T] (numpy, float64)."""
  attn = np.asarray(attn, np.float64)
  B, N, T, _ = attn.shape
  R = rows.shape[1]
  out = np.zeros((B, R, T))
  for b in range(B):
    for r in range(R):
      t = rows[b, r]
      if t < 0:
        continue
      a = attn[b, :, t, :].mean(0) * mask[b]
      a[t:] = 0.0
      if a.sum() > 0:
        out[b, r] = a / a.sum()
  return out


def random_params(cfg, seed=0, scale=0.05, vision=False):
  """Decoder params of `cfg` (with vision=True: and the vision tower's) with numpy N(0, scale^2) entries (norm scales
  1 + N(0, 0.1^2)); shapes from jax.eval_shape of the real init, so no init program is compiled."""
  import jax
  from ral_jax.models.vlm import init_params
  sample = None
  if vision:
    from ral_jax.models import vision_inputs
    sample = (np.zeros((1, 16, cfg.vision.patch_dim), np.float32),
              vision_inputs.build_vision_inputs_batch(np.array([[[1, 4, 4]]]), 16, cfg.vision))
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), sample))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if 'norm' in name:
      return (1.0 + 0.1 * rng.normal(size=s.shape)).astype(np.float32)
    return (scale * rng.normal(size=s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)
