"""Token distillation estimators against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.rl.distill import token_distill_loss


def test_full_estimator_is_masked_mean_of_reverse_kl():
  kl = jnp.array([[0.2, 0.4, 9.0], [0.6, jnp.nan, 1.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 1]])
  loss, m = token_distill_loss(mask, 'full', reverse_kl=kl)
  np.testing.assert_allclose(loss, (0.2 + 0.4 + 0.6 + 1.0) / 4, rtol=1e-6)
  np.testing.assert_allclose(m['kd/reverse_kl'], 0.55, rtol=1e-6)
  # seq_mean_token_sum (the paper's sum over t): mean(0.6, 1.6)
  np.testing.assert_allclose(token_distill_loss(mask, 'full', reverse_kl=kl, aggregation='seq_mean_token_sum')[0],
                             1.1, rtol=1e-6)


def test_sampled_estimator_value_and_score_function_gradient():
  lp, tlp = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -1.0]])     # d = [0.5, -1.0]
  f = lambda lp, tlp: token_distill_loss(jnp.ones((1, 2)), 'sampled', logprobs=lp, teacher_logprobs=tlp)
  loss, m = f(lp, tlp)
  np.testing.assert_allclose(loss, -0.25, rtol=1e-6)
  np.testing.assert_allclose(m['kd/sampled_kl'], -0.25, rtol=1e-6)
  g_s, g_t = jax.jit(jax.grad(lambda a, b: f(a, b)[0], argnums=(0, 1)))(lp, tlp)
  np.testing.assert_allclose(g_s, [[0.25, -0.5]], rtol=1e-6)               # d / n
  assert not np.any(g_t)


def test_distill_missing_inputs_say_what_to_pass():
  with pytest.raises(ValueError, match='reverse_kl'):
    token_distill_loss(jnp.ones((1, 2)), 'full')
  with pytest.raises(ValueError, match='teacher_logprobs'):
    token_distill_loss(jnp.ones((1, 2)), 'sampled', logprobs=jnp.zeros((1, 2)))
