"""packed_causal_attention (the cuDNN path for padded training sequences) against the masked computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.models.attention import packed_causal_attention, visibility_mask

B, T, N, K, H = 4, 12, 4, 2, 8


def _qkv(seed=0):
  r = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  return mk(B, T, N, H), mk(B, T, K, H), mk(B, T, K, H)


def _masked(q, k, v, valid):
  slot = jnp.broadcast_to(jnp.arange(T), (B, T))
  return jax.nn.dot_product_attention(q, k, v, mask=visibility_mask(valid, slot), implementation='xla')


def _packed(q, k, v, valid):
  slot = jnp.broadcast_to(jnp.arange(T), (B, T))
  return packed_causal_attention(q, k, v, valid, slot, 'xla')


def _blocks():
  m = np.zeros((B, T), bool)
  m[0, 3:10] = True     # left-padded prompt, response, right padding
  m[1, :] = True        # no padding
  m[2, 5:] = True       # left padding only
  m[3, :1] = True       # one valid token
  return jnp.asarray(m)


def test_packed_equals_masked_on_valid_slots_with_gradients():
  q, k, v = _qkv()
  valid = _blocks()
  w = valid[:, :, None, None].astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(_packed(q, k, v, valid) * w), np.asarray(_masked(q, k, v, valid) * w),
                             atol=1e-5)
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v, valid) * w * jnp.arange(1, T + 1)[None, :, None, None]))
  for a, b in zip(jax.grad(loss(_packed), (0, 1, 2))(q, k, v), jax.grad(loss(_masked), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_all_padding_row_stays_finite():
  q, k, v = _qkv(1)
  valid = _blocks().at[3].set(False)
  assert np.isfinite(np.asarray(_packed(q, k, v, valid))).all()


def test_mask_with_holes_takes_the_masked_computation():
  q, k, v = _qkv(2)
  valid = _blocks().at[1, 4].set(False)          # row 1 is no longer one block
  np.testing.assert_allclose(np.asarray(_packed(q, k, v, valid)), np.asarray(_masked(q, k, v, valid)), atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs an NVIDIA GPU')
def test_cudnn_model_logits_match_xla_on_a_padded_batch():
  """The decoder with attention_impl='cudnn' (the packed path) against 'xla', bf16, left + right padding."""
  import dataclasses
  from _model_ref import padded_batch, random_params, tiny_cfg
  from ral_jax.models.vlm import Qwen25VL
  cfg = dataclasses.replace(tiny_cfg(), dtype='bfloat16')
  params = random_params(cfg)
  ids, mask, pos = padded_batch(cfg, [64, 40, 17, 64], 64)
  mask[1, -5:] = 0                                  # right padding after a response
  out = {}
  for impl in ('xla', 'cudnn'):
    c = dataclasses.replace(cfg, attention_impl=impl)
    out[impl] = np.asarray(jax.jit(lambda p: Qwen25VL(c).apply({'params': p}, jnp.asarray(ids), jnp.asarray(pos),
                                                                jnp.asarray(mask)).logits)(params), np.float32)
  m = mask == 1
  np.testing.assert_allclose(out['cudnn'][m], out['xla'][m], atol=0.05, rtol=0.05)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs an NVIDIA GPU')
def test_cudnn_remat_policy_keeps_the_attention_forward():
  """remat 'dots_and_attention_saveable' with cuDNN: the same gradients as no remat, and the compiled backward runs
  fewer cuDNN attention forwards than 'dots_with_no_batch_dims_saveable' (which recomputes them)."""
  import dataclasses
  from _model_ref import padded_batch, random_params, tiny_cfg
  from ral_jax.models.vlm import Qwen25VL
  cfg = dataclasses.replace(tiny_cfg(), dtype='bfloat16', attention_impl='cudnn')
  params = random_params(cfg)
  ids, mask, pos = (jnp.asarray(x) for x in padded_batch(cfg, [64, 40, 17, 64], 64))

  def grad_fn(policy):
    c = dataclasses.replace(cfg, remat_policy=policy)
    loss = lambda p: jnp.sum(Qwen25VL(c).apply({'params': p}, ids, pos, mask).logits.astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss))

  fwd_calls = lambda policy: grad_fn(policy).lower(params).compile().as_text().count('"__cudnn$fmhaSoftmax"')
  assert 0 < fwd_calls('dots_and_attention_saveable') < fwd_calls('dots_with_no_batch_dims_saveable')
  ref, got = grad_fn('none')(params), grad_fn('dots_and_attention_saveable')(params)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) <= 0.02 * np.linalg.norm(a) + 1e-6    # bf16: fusion order may differ
