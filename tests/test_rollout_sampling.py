"""Token sampling: filters, log-prob convention, per-sample PRNG streams (ral_jax/rollout/sampling.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.rollout import sampling as S


def _logits(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))


def test_top_p_keeps_smallest_prefix_with_mass():
  probs = np.array([[0.15, 0.5, 0.05, 0.3]], np.float32)
  for p, kept in ((0.4, {1}), (0.7, {1, 3}), (0.8, {1, 3}), (0.81, {0, 1, 3}), (1.0, {0, 1, 2, 3})):
    out = S.filtered_logits(_logits(probs), S.SamplingConfig(top_p=p))
    assert set(np.flatnonzero(np.isfinite(np.asarray(out[0])))) == kept, p


def test_top_k_keeps_k_largest():
  logits = jnp.asarray([[0.3, 2.0, -1.0, 1.5, 0.9]])
  out = np.asarray(S.filtered_logits(logits, S.SamplingConfig(top_k=2)))
  assert set(np.flatnonzero(np.isfinite(out[0]))) == {1, 3}
  np.testing.assert_allclose(out[0, [1, 3]], [2.0, 1.5])


def test_temperature_scales_logits():
  logits = jnp.asarray([[0.3, 2.0, -1.0]])
  out = S.filtered_logits(logits, S.SamplingConfig(temperature=0.5))
  np.testing.assert_allclose(np.asarray(out), np.asarray(logits) / 0.5, rtol=1e-6)


def test_sampled_frequencies_match_filtered_distribution():
  probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05], np.float32)
  cfg = S.SamplingConfig(top_k=3, temperature=1.0)
  n = 20000
  keys = S.sample_keys(jax.random.PRNGKey(0), 0, jnp.arange(n))
  tok, _ = S.sample_tokens(jnp.tile(_logits(probs)[None], (n, 1)), keys, cfg)
  freq = np.bincount(np.asarray(tok), minlength=5) / n
  want = np.array([0.4, 0.25, 0.2, 0, 0]) / 0.85
  np.testing.assert_allclose(freq, want, atol=0.015)


def test_logprobs_are_untruncated_temperature_scaled():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(7, 11)) * 3, jnp.float32)
  cfg = S.SamplingConfig(temperature=0.7, top_k=4, top_p=0.9)
  tok, lp = S.sample_tokens(logits, S.sample_keys(jax.random.PRNGKey(1), 3, jnp.arange(7)), cfg)
  want = jax.nn.log_softmax(logits / 0.7, axis=-1)[jnp.arange(7), tok]
  np.testing.assert_allclose(np.asarray(lp), np.asarray(want), rtol=1e-6, atol=1e-6)
  top4 = np.argsort(-np.asarray(logits), axis=-1)[:, :4]
  assert all(t in row for t, row in zip(np.asarray(tok), top4))


def test_greedy_is_argmax():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, 13)), jnp.float32)
  tok, lp = S.sample_tokens(logits, S.sample_keys(jax.random.PRNGKey(0), 0, jnp.arange(5)),
                            S.SamplingConfig(greedy=True, temperature=2.0))
  np.testing.assert_array_equal(np.asarray(tok), np.argmax(np.asarray(logits), -1))
  np.testing.assert_allclose(np.asarray(lp), np.asarray(jax.nn.log_softmax(logits / 2.0)[jnp.arange(5), tok]),
                             rtol=1e-6)


def test_samples_depend_on_sample_index_not_row():
  """Permuting rows (with their sample indices) permutes the samples: no dependence on batch layout."""
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(8, 50)), jnp.float32)
  idx = jnp.arange(100, 108)
  perm = np.array([3, 0, 7, 5, 1, 2, 6, 4])
  cfg = S.SamplingConfig()
  rng = jax.random.PRNGKey(5)
  tok, _ = S.sample_tokens(logits, S.sample_keys(rng, 9, idx), cfg)
  tok_p, _ = S.sample_tokens(logits[perm], S.sample_keys(rng, 9, idx[perm]), cfg)
  np.testing.assert_array_equal(np.asarray(tok)[perm], np.asarray(tok_p))
  key = jax.random.fold_in(jax.random.fold_in(rng, 9), 103)
  assert int(tok[3]) == int(jax.random.categorical(key, logits[3]))


@pytest.mark.parametrize('kw', [dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0)])
def test_bad_config_raises(kw):
  with pytest.raises(ValueError):
    S.SamplingConfig(**kw)
