"""packed_causal_attention (the cuDNN path for padded training sequences) against the masked computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.models.attention import packed_causal_attention, permute_slots, visibility_mask

B, T, N, K, H = 4, 12, 4, 2, 8


def _qkv(seed=0):
  r = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  return mk(B, T, N, H), mk(B, T, K, H), mk(B, T, K, H)


def _masked(q, k, v, valid):
  slot = jnp.broadcast_to(jnp.arange(T), (B, T))
  return jax.nn.dot_product_attention(q, k, v, mask=visibility_mask(valid, slot), implementation='xla')


def _packed(q, k, v, valid):
  return packed_causal_attention(q, k, v, valid, 'xla')


def _blocks():
  m = np.zeros((B, T), bool)
  m[0, 3:10] = True     # left-padded prompt, response, right padding
  m[1, :] = True        # no padding
  m[2, 5:] = True       # left padding only
  m[3, :1] = True       # one valid token
  return jnp.asarray(m)


def _holes():
  m = np.asarray(_blocks()).copy()
  m[1, 4] = m[1, 7] = False      # holes inside a row
  m[0, 11] = True                # a second valid block after right padding
  m[2, 0] = True                 # a valid token before left padding
  return jnp.asarray(m)


@pytest.mark.parametrize('mask', [_blocks, _holes], ids=['one_block', 'holes'])
def test_packed_equals_masked_on_valid_slots_with_gradients(mask):
  q, k, v = _qkv()
  valid = mask()
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


def test_packing_has_no_control_flow_and_its_gradient_gathers():
  """One computation for every mask (no cond), and the permutations' cotangents are gathers, not scatter-adds."""
  q, k, v = _qkv(2)
  valid = _holes()
  loss = lambda q, k, v: jnp.sum(_packed(q, k, v, valid) ** 2)
  text = str(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v))
  assert 'cond[' not in text and 'scatter-add' not in text
  assert 'gather' in text


def test_permute_slots_cotangent_is_the_inverse_permutation():
  r = np.random.default_rng(3)
  perm = jnp.asarray(np.stack([r.permutation(T) for _ in range(B)]), jnp.int32)
  inverse = jnp.argsort(perm, axis=1).astype(jnp.int32)
  x, g = (jnp.asarray(r.normal(size=(B, T, 3)), jnp.float32) for _ in range(2))
  ref = jax.vjp(lambda x: jnp.take_along_axis(x, perm[:, :, None], axis=1), x)[1](g)[0]
  got = jax.vjp(lambda x: permute_slots(x, perm, inverse), x)[1](g)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=0)


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
  """remat 'dots_and_attention_saveable' with cuDNN: the compiled backward runs fewer cuDNN attention forwards than
  'dots_with_no_batch_dims_saveable' (which recomputes them), and its bf16 gradients are as close to the float32
  gradients (XLA, no remat) as those of no remat with cuDNN are (bf16 rounding, not a wrong residual)."""
  import dataclasses
  from _model_ref import padded_batch, random_params, tiny_cfg
  from ral_jax.models.vlm import Qwen25VL
  cfg = dataclasses.replace(tiny_cfg(), dtype='bfloat16', attention_impl='cudnn')
  params = random_params(cfg)
  ids, mask, pos = (jnp.asarray(x) for x in padded_batch(cfg, [64, 40, 17, 64], 64))

  def grad_fn(c):       # valid positions only: outputs at padding slots are not defined on the packed path
    loss = lambda p: jnp.sum((Qwen25VL(c).apply({'params': p}, ids, pos, mask).logits.astype(jnp.float32) ** 2)
                             * mask[:, :, None])
    return jax.jit(jax.grad(loss))

  with_policy = lambda policy: grad_fn(dataclasses.replace(cfg, remat_policy=policy))
  fwd_calls = lambda policy: with_policy(policy).lower(params).compile().as_text().count('"__cudnn$fmhaSoftmax"')
  assert 0 < fwd_calls('dots_and_attention_saveable') < fwd_calls('dots_with_no_batch_dims_saveable')
  flat = lambda g: np.concatenate([np.asarray(a, np.float32).ravel() for a in jax.tree.leaves(g)])
  ref = flat(grad_fn(dataclasses.replace(cfg, dtype='float32', attention_impl='xla', remat_policy='none'))(params))
  err = lambda policy: np.linalg.norm(flat(with_policy(policy)(params)) - ref) / np.linalg.norm(ref)
  e_none, e_saved = err('none'), err('dots_and_attention_saveable')
  assert e_none < 0.05, e_none
  assert e_saved <= 1.5 * e_none + 1e-3, (e_saved, e_none)
