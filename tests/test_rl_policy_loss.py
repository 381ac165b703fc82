"""GRPO token loss against hand-computed values; REINFORCE limit; padding invariance; jit/grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.rl.config import GRPOConfig
from ral_jax.rl.policy_loss import grpo_loss, kl_penalty

LN2 = 0.6931472


def _case():
  # Ratios: seq 0 (A=+1): 1.5 (clipped high), 0.9; seq 1 (A=-1): 0.5 (clipped low), 1.1.
  old = jnp.array([[-1.0, -2.0], [-0.5, -1.5]])
  ratio = jnp.array([[1.5, 0.9], [0.5, 1.1]])
  return jnp.log(ratio) + old, old, jnp.array([1.0, -1.0]), jnp.ones((2, 2))


def test_clipped_loss_and_metrics_hand_values():
  lp, old, adv, mask = _case()
  loss, m = grpo_loss(lp, old, adv, mask, GRPOConfig(beta=0.0))
  # Per token: max(-1.5, -1.2) = -1.2; -0.9; max(0.5, 0.8) = 0.8; 1.1.  Mean = -0.2 / 4.
  np.testing.assert_allclose(loss, -0.05, rtol=1e-5)
  np.testing.assert_allclose(m['grpo/clip_frac_high'], 0.25)
  np.testing.assert_allclose(m['grpo/clip_frac_low'], 0.25)
  np.testing.assert_allclose(m['grpo/clip_frac'], 0.5)
  np.testing.assert_allclose(m['grpo/ratio_mean'], 1.0, rtol=1e-6)
  np.testing.assert_allclose(m['grpo/ratio_max'], 1.5, rtol=1e-6)
  # approx_kl = mean k3 with log q = log r: exp(-log r) + log r - 1, per token.
  r = np.array([1.5, 0.9, 0.5, 1.1])
  np.testing.assert_allclose(m['grpo/approx_kl'], np.mean(1 / r + np.log(r) - 1), rtol=1e-5)
  assert 'grpo/kl_ref' not in m and 'grpo/entropy' not in m


def test_clipped_tokens_have_no_gradient():
  lp, old, adv, mask = _case()
  g = jax.grad(lambda lp: grpo_loss(lp, old, adv, mask, GRPOConfig(beta=0.0))[0])(lp)
  # d/dlp of -A r / 4 = -A r / 4 where unclipped; 0 where clipped.
  np.testing.assert_allclose(g, [[0.0, -0.9 / 4], [0.0, 1.1 / 4]], rtol=1e-5, atol=1e-7)


def test_asymmetric_and_dual_clip():
  old = jnp.zeros((1, 3))
  lp = jnp.log(jnp.array([[1.25, 5.0, 2.0]]))
  cfg = GRPOConfig(clip_eps_low=0.2, clip_eps_high=0.28, beta=0.0, dual_clip=3.0)
  # A = +1 on the first sequence only would mix signs; use A = -1: 1.25 -> max(1.25, 1.25) = 1.25;
  # 5 -> max(5, 1.28) = 5 -> min(5, 3) = 3 (dual clip); 2 -> max(2, 1.28) = 2 -> min(2, 3) = 2.
  loss, m = grpo_loss(lp, old, jnp.array([-1.0]), jnp.ones((1, 3)), cfg)
  np.testing.assert_allclose(loss, (1.25 + 3 + 2) / 3, rtol=1e-5)
  np.testing.assert_allclose(m['grpo/dual_clip_frac'], 1 / 3, rtol=1e-6)
  # A = +1 with eps_high 0.28: 1.25 unclipped -> -1.25; 5 -> -1.28; 2 -> -1.28.
  loss, m = grpo_loss(lp, old, jnp.array([1.0]), jnp.ones((1, 3)), cfg)
  np.testing.assert_allclose(loss, -(1.25 + 1.28 + 1.28) / 3, rtol=1e-5)
  np.testing.assert_allclose(m['grpo/clip_frac_high'], 2 / 3, rtol=1e-6)


def test_kl_estimators_hand_values():
  lp, ref = jnp.array([LN2]), jnp.array([0.0])          # log q = ln 2
  np.testing.assert_allclose(kl_penalty(lp, ref, 'k1'), [0.6931472], rtol=1e-6)
  np.testing.assert_allclose(kl_penalty(lp, ref, 'k2'), [0.2402265], rtol=1e-6)   # (ln 2)^2 / 2
  np.testing.assert_allclose(kl_penalty(lp, ref, 'k3'), [0.1931472], rtol=1e-5)   # 1/2 + ln 2 - 1
  np.testing.assert_allclose(kl_penalty(jnp.zeros(1), jnp.zeros(1), 'k3'), [0.0], atol=1e-7)
  with pytest.raises(ValueError, match='k1'):
    kl_penalty(lp, ref, 'k4')


def test_beta_kl_term_hand_value():
  lp = jnp.full((2, 2), LN2 - 1.0)
  loss, m = grpo_loss(lp, lp, jnp.zeros(2), jnp.ones((2, 2)), GRPOConfig(beta=0.04), ref_logprobs=lp - LN2)
  np.testing.assert_allclose(loss, 0.04 * 0.1931472, rtol=1e-5)
  np.testing.assert_allclose(m['grpo/kl_ref'], 0.1931472, rtol=1e-5)
  with pytest.raises(ValueError, match='ref_logprobs'):
    grpo_loss(lp, lp, jnp.zeros(2), jnp.ones((2, 2)), GRPOConfig(beta=0.04))


@pytest.mark.parametrize('mode,denom', [('token_mean', lambda n, B, T: np.full((B, 1), n.sum())),
                                        ('seq_mean_token_mean', lambda n, B, T: 2 * n[:, None]),
                                        ('seq_mean_token_sum', lambda n, B, T: np.full((B, 1), 2.)),
                                        ('drgrpo', lambda n, B, T: np.full((B, 1), 2. * T))])
def test_reduces_to_reinforce_at_ratio_one(mode, denom):
  # ratio == 1, beta == 0: grad = -A * mask / normaliser, the REINFORCE gradient with baseline-subtracted A.
  lp = jnp.array([[-1.0, -0.3, -2.0], [-0.7, -1.1, -0.2]])
  mask = jnp.array([[1., 1, 1], [1, 0, 0]])
  adv = jnp.array([0.5, -2.0])
  g = jax.jit(jax.grad(lambda lp: grpo_loss(lp, lp, adv, mask, GRPOConfig(beta=0.0, aggregation=mode))[0]))(lp)
  n = np.asarray(mask).sum(1)
  want = -np.asarray(adv)[:, None] * np.asarray(mask) / denom(n, 2, 3)
  np.testing.assert_allclose(g, want, rtol=1e-6)
  # and equals the gradient of the plain REINFORCE surrogate for token_mean
  if mode == 'token_mean':
    g2 = jax.grad(lambda lp: -jnp.sum(adv[:, None] * lp * mask) / jnp.sum(mask))(lp)
    np.testing.assert_allclose(g, g2, rtol=1e-6)


# All four modes' padding invariance is covered in test_rl_advantages; here the two extremes.
@pytest.mark.parametrize('mode', ['token_mean', 'drgrpo'])
def test_padding_invariance(mode):
  lp, old, adv, mask = _case()
  ref = old - 0.1
  cfg = GRPOConfig(aggregation=mode, max_response_length=8, dual_clip=3.0)
  f = jax.jit(lambda lp, old, adv, mask, ref: grpo_loss(lp, old, adv, mask, cfg, ref_logprobs=ref))
  base, mb = f(lp, old, adv, mask, ref)
  pad = lambda x, v: jnp.concatenate([jnp.pad(x, ((0, 0), (0, 2)), constant_values=v), jnp.full((1, 4), v)])
  lp2, old2, ref2 = pad(lp, jnp.nan), pad(old, -jnp.inf), pad(ref, jnp.nan)
  mask2 = pad(mask, 0.0)
  adv2 = jnp.concatenate([adv, jnp.array([7.0])])
  loss, m = f(lp2, old2, adv2, mask2, ref2)
  np.testing.assert_allclose(loss, base, rtol=1e-6)
  for k in mb:
    np.testing.assert_allclose(m[k], mb[k], rtol=1e-6, err_msg=k)
  g = jax.jit(jax.grad(lambda lp: f(lp, old2, adv2, mask2, ref2)[0]))(lp2)
  assert np.all(np.isfinite(g))


def test_jit_grad_entropy_metric_and_shape_checks():
  lp, old, adv, mask = _case()
  f = jax.jit(jax.value_and_grad(lambda lp: grpo_loss(lp, old, adv, mask, GRPOConfig(), ref_logprobs=old,
                                                        entropy=jnp.array([[1., 2], [3, 4]]))[1]['grpo/entropy'],
                                 has_aux=False))
  v, g = f(lp)
  np.testing.assert_allclose(v, 2.5)
  with pytest.raises(AssertionError):
    grpo_loss(lp, old, jnp.ones(3), mask, GRPOConfig(beta=0.0))
  with pytest.raises(AssertionError):
    grpo_loss(lp, old[:, :1], adv, mask, GRPOConfig(beta=0.0))
  with pytest.raises(AssertionError):
    grpo_loss(lp.astype(jnp.int32), old, adv, mask, GRPOConfig(beta=0.0))
