"""Decoder forward vs transformers' PyTorch Qwen2.5-VL (4.57, eager, float32) and invariances of our stack."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from _model_ref import random_params, decoder_params, hf_model, padded_batch, tiny_cfg
from ral_jax.models.vlm import Qwen25VL, init_params, lm_head_kernel, scatter_visual


def _hf_logits(model, ids, mask, pos):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos, dtype=torch.long))
  return out.logits.numpy()


@pytest.mark.parametrize('tied', [False, True])
def test_logits_match_transformers_left_padded_mrope(tied):
  cfg = tiny_cfg(tie_word_embeddings=tied)
  hf = hf_model(cfg, seed=1)
  params = decoder_params(hf, cfg)
  assert ('lm_head' in params) == (not tied)
  ids, mask, pos = padded_batch(cfg, [13, 9, 4], 13)
  ours = Qwen25VL(cfg).apply({'params': params}, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)).logits
  assert ours.dtype == jnp.float32 and ours.shape == (3, 13, cfg.vocab_size)
  ref = _hf_logits(hf, ids, mask, pos)
  np.testing.assert_allclose(np.asarray(ours)[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)
  hidden = Qwen25VL(cfg).apply({'params': params}, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask),
                               return_hidden=True)
  assert hidden.logits is None
  np.testing.assert_allclose(hidden.hidden @ lm_head_kernel(params, cfg), ours, atol=1e-5)


def test_scatter_visual_takes_kth_vision_token():
  cfg = tiny_cfg()
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 50, (2, 10))
  ids[0, [2, 3, 7]] = cfg.image_token_id
  ids[1, [1]] = cfg.video_token_id
  ids[1, [5, 6]] = cfg.image_token_id
  emb = rng.normal(size=(2, 10, 4)).astype(np.float32)
  vis = rng.normal(size=(2, 3, 4)).astype(np.float32)
  out = np.asarray(scatter_visual(jnp.asarray(emb), jnp.asarray(ids), jnp.asarray(vis), cfg.image_token_id,
                                  cfg.video_token_id))
  want = emb.copy()
  for b in range(2):
    k = 0
    for t in range(10):
      if ids[b, t] in (cfg.image_token_id, cfg.video_token_id):
        want[b, t] = vis[b, k]
        k += 1
  np.testing.assert_array_equal(out, want)


def test_visual_embeds_match_transformers_inputs_embeds():
  cfg = tiny_cfg()
  hf = hf_model(cfg, seed=2)
  params = decoder_params(hf, cfg)
  ids, mask, pos = padded_batch(cfg, [12, 10], 12)
  ids[:, 4:8] = cfg.image_token_id                      # the 2x2 'image' block of padded_batch rows
  vis = np.random.default_rng(3).normal(size=(2, 4, cfg.hidden_size)).astype(np.float32)
  ours = Qwen25VL(cfg).apply({'params': params}, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask),
                             visual_embeds=jnp.asarray(vis)).logits
  with torch.no_grad():
    emb = hf.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
    emb[:, 4:8] = torch.tensor(vis)
    ref = hf(inputs_embeds=emb, attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos, dtype=torch.long))
  np.testing.assert_allclose(np.asarray(ours)[mask == 1], ref.logits.numpy()[mask == 1], atol=1e-4, rtol=0)


def _loss_and_grad(cfg, params, ids, mask, pos, rows):
  model = Qwen25VL(cfg)

  def loss(p):
    out = model.apply({'params': p}, ids, pos, mask, record_rows=rows, record_layers=(0, -1))
    return (jnp.mean(out.logits ** 2) + sum(jnp.sum(r['policy'] ** 2) for r in out.record.values()),
            (out.logits, out.record))
  return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.fixture(scope='module')
def small_problem():
  cfg = tiny_cfg()
  params = random_params(cfg)
  ids, mask, pos = padded_batch(cfg, [9, 6], 9)
  rows = jnp.asarray([[5, 6, 8], [4, 7, -1]], jnp.int32)
  return cfg, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos), rows


def _assert_tree_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def test_jit_equals_no_jit(small_problem):
  cfg, params, ids, mask, pos, rows = small_problem
  fwd = lambda p: Qwen25VL(cfg).apply({'params': p}, ids, pos, mask, record_rows=rows)
  eager, jitted = fwd(params), jax.jit(fwd)(params)
  _assert_tree_close((eager.logits, eager.record), (jitted.logits, jitted.record), 1e-5)


@pytest.fixture(scope='module')
def reference_grads(small_problem):
  cfg, params, ids, mask, pos, rows = small_problem
  return jax.jit(lambda p: _loss_and_grad(cfg, p, ids, mask, pos, rows))(params)


@pytest.mark.parametrize('variant', [dict(remat_policy='nothing_saveable'),
                                     dict(scan_layers=False, remat_policy='dots_saveable'),
                                     dict(remat_policy='dots_and_attention_saveable')])
def test_remat_and_scan_variants_equal_reference(small_problem, reference_grads, variant):
  """Reference: tiny preset (remat 'none', scan_layers=True); values and gradients must not change."""
  cfg, params, ids, mask, pos, rows = small_problem
  ref = reference_grads
  cfg2 = cfg.replace(**variant)
  got = jax.jit(lambda p: _loss_and_grad(cfg2, p, ids, mask, pos, rows))(params)
  _assert_tree_close(ref, got, 1e-5)


def test_bad_remat_policy_names_choices(small_problem):
  cfg, params, ids, mask, pos, _ = small_problem
  with pytest.raises(ValueError, match='remat_policy'):
    Qwen25VL(cfg.replace(remat_policy='sometimes')).apply({'params': params}, ids, pos, mask)
