"""Masked aggregation modes against hand-computed values; padding invariance; global denominators."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.rl.aggregation import aggregate

X = [[1., 2, 3], [4, 0, 0], [9, 9, 9]]
M = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize('mode,max_len,want', [
    ('token_mean', None, 7 / 3),            # (1+2+4)/3
    ('seq_mean_token_mean', None, 2.75),    # mean(1.5, 4); the empty sequence does not count
    ('seq_mean_token_sum', None, 3.5),      # mean(3, 4)
    ('drgrpo', None, 7 / 6),                # 7 / (2 sequences * T=3)
    ('drgrpo', 4, 7 / 8),                   # 7 / (2 * 4)
])
def test_aggregation_hand_values(mode, max_len, want):
  np.testing.assert_allclose(aggregate(jnp.array(X), jnp.array(M), mode, max_len), want, rtol=1e-6)


@pytest.mark.parametrize('mode', ['token_mean', 'seq_mean_token_mean', 'seq_mean_token_sum', 'drgrpo'])
def test_aggregation_padding_invariance_and_nan_safety(mode):
  x, m = jnp.array(X), jnp.array(M)
  base = aggregate(x, m, mode, 5)
  # Extra padded position (NaN value) and extra padded sequence.
  x2 = jnp.concatenate([jnp.pad(x, ((0, 0), (0, 1)), constant_values=jnp.nan), jnp.full((1, 4), jnp.nan)])
  m2 = jnp.pad(m, ((0, 1), (0, 1)))
  np.testing.assert_allclose(aggregate(x2, m2, mode, 5), base, rtol=1e-6)
  g = jax.grad(lambda x: aggregate(x, m2, mode, 5))(x2)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[np.asarray(m2) == 0] == 0)


def test_aggregation_empty_is_zero():
  assert float(aggregate(jnp.ones((2, 3)), jnp.zeros((2, 3)), 'token_mean')) == 0.0
  with pytest.raises(ValueError, match='aggregation mode'):
    aggregate(jnp.ones((2, 3)), jnp.ones((2, 3)), 'mean')


@pytest.mark.parametrize('mode,den', [('token_mean', 3.0), ('seq_mean_token_mean', 2.0),
                                      ('seq_mean_token_sum', 2.0), ('drgrpo', 8.0)])
def test_denominator_split_sums_to_whole(mode, den):
  from ral_jax.rl.aggregation import aggregation_denominator
  x, m = jnp.array(X), jnp.array(M)
  d = aggregation_denominator(m, mode, 4)
  np.testing.assert_allclose(d, den)                       # 3 tokens; 2 valid sequences; 2 * max_len 4
  parts = aggregate(x[:1], m[:1], mode, 4, d) + aggregate(x[1:], m[1:], mode, 4, d)
  np.testing.assert_allclose(parts, aggregate(x, m, mode, 4), rtol=1e-6)
