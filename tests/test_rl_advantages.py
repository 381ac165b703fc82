"""Group advantages against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.rl.advantages import group_advantages
from ral_jax.rl.config import AdvantageConfig


def test_grpo_hand_values():
  # Group [1,0,0,0]: mean 0.25, centred [.75,-.25,-.25,-.25], unbiased var 0.75/3 = 0.25, std 0.5.
  # Group [1,1,1,1]: constant -> exactly 0.
  adv = group_advantages(jnp.array([1., 0, 0, 0, 1, 1, 1, 1]), 4)
  np.testing.assert_allclose(adv[:4], [1.5, -0.5, -0.5, -0.5], rtol=1e-5)
  np.testing.assert_array_equal(adv[4:], [0., 0, 0, 0])
  assert adv.dtype == jnp.float32


def test_grpo_rows_are_grouped_b_times_g_plus_g():
  # G=2: [1,0] -> centred +-0.5, std sqrt(0.5) -> +-0.70711; [5,5] -> 0.
  adv = group_advantages(np.array([1., 0, 5, 5]), 2)
  np.testing.assert_allclose(adv, [0.707106, -0.707106, 0, 0], rtol=1e-5)


def test_drgrpo_and_rloo_hand_values():
  r = jnp.array([1., 0, 0, 0])
  np.testing.assert_allclose(group_advantages(r, 4, AdvantageConfig('drgrpo')), [0.75, -0.25, -0.25, -0.25],
                             rtol=1e-6)
  # Leave-one-out: 1 - mean(0,0,0) = 1;  0 - mean(1,0,0) = -1/3.
  np.testing.assert_allclose(group_advantages(r, 4, AdvantageConfig('rloo')), [1., -1 / 3, -1 / 3, -1 / 3],
                             rtol=1e-6)


def test_eps_keeps_tiny_spread_finite():
  adv = group_advantages(jnp.array([0., 1e-7]), 2)
  assert np.all(np.isfinite(adv)) and np.all(np.abs(adv) < 0.1)


def test_advantage_errors_say_what_to_change():
  with pytest.raises(ValueError, match='divide'):
    group_advantages(jnp.zeros(6), 4)
  with pytest.raises(ValueError, match='G >= 2'):
    group_advantages(jnp.zeros(4), 1)
  with pytest.raises(ValueError, match=r'\[B\*G\]'):
    group_advantages(jnp.zeros((2, 2)), 2)
  with pytest.raises(ValueError, match='estimator'):
    AdvantageConfig('ppo')
  assert group_advantages(jnp.array([3., 1.]), 1, AdvantageConfig('drgrpo')).tolist() == [0., 0.]


def test_advantages_jit():
  f = jax.jit(lambda r: group_advantages(r, 2))
  np.testing.assert_allclose(f(jnp.array([2., 0.])), [0.707106, -0.707106], rtol=1e-5)
