"""JSD, the RAL term and attention distillation: hand values, properties, direction, padding invariance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ral_jax.rl.attention_loss import attention_distill_loss, jsd, ral_loss, record_rows, visual_mass

LN2 = 0.6931472
# P = [1/2, 1/2], Q = [1, 0]: M = [3/4, 1/4]; KL(P||M) = 1/2 ln(2/3) + 1/2 ln 2 = 0.1438410, KL(Q||M) = ln(4/3)
# = 0.2876821; JSD = 0.2157616.
JSD_HALF_ONE = 0.2157616


def test_jsd_hand_values():
  p = jnp.array([[1., 0.], [0.5, 0.5], [0.2, 0.8]])
  q = jnp.array([[0., 1.], [1., 0.], [0.2, 0.8]])
  np.testing.assert_allclose(jsd(p, q), [LN2, JSD_HALF_ONE, 0.0], rtol=1e-5, atol=1e-7)
  assert jsd(p.astype(jnp.bfloat16), q).dtype == jnp.float32


def test_jsd_zero_with_exactly_zero_gradient_at_equality():
  p = jnp.array([[0.3, 0.0, 0.7], [0.0, 0.0, 1.0]])
  assert np.all(np.asarray(jsd(p, p)) == 0.0)
  g = jax.grad(lambda p: jnp.sum(jsd(p, jax.lax.stop_gradient(p))))(p)
  assert np.all(np.isfinite(g)) and not np.any(g)
  # Through a softmax over free logits (how p_theta is produced), with -inf-free large negative logits.
  z = jnp.array([[0.1, -3.0, 2.0, -40.0]])
  gz = jax.jit(jax.grad(lambda z: jnp.sum(jsd(jax.nn.softmax(z), jax.lax.stop_gradient(jax.nn.softmax(z))))))(z)
  assert not np.any(gz)


def _dist(n):
  return st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), min_size=n, max_size=n).filter(lambda v: sum(v) > 0)


_JSD_GRAD = jax.jit(jax.grad(jsd, argnums=(0, 1)))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(a=_dist(5), b=_dist(5))
def test_jsd_symmetric_bounded_finite_with_zeros(a, b):
  p = jnp.array(a) / sum(a)
  q = jnp.array(b) / sum(b)
  d_pq, d_qp = float(jsd(p, q)), float(jsd(q, p))
  assert abs(d_pq - d_qp) < 1e-6
  assert -1e-7 <= d_pq <= LN2 + 1e-6
  g = _JSD_GRAD(p, q)
  assert np.all(np.isfinite(g[0])) and np.all(np.isfinite(g[1]))


def test_jsd_key_mask_ignores_masked_keys():
  p = jnp.array([[[0.5, 0.5, 0.3]]])     # mass on the masked key 2 is dropped
  q = jnp.array([[[1.0, 0.0, 0.9]]])
  np.testing.assert_allclose(jsd(p, q, jnp.array([[1, 1, 0]])), [[JSD_HALF_ONE]], rtol=1e-5)


def _ral_case():
  # B=2, R=2, S=2. seq 0 (A=+1): rows ([1,0] vs [0,1]) -> ln 2, ([.5,.5] vs same) -> 0.
  # seq 1 (A=-2): row 0 ([.5,.5] vs [1,0]) -> 0.2157616; row 1 masked.
  pol = jnp.array([[[1., 0.], [0.5, 0.5]], [[0.5, 0.5], [0.9, 0.1]]])
  old = jnp.array([[[0., 1.], [0.5, 0.5]], [[1., 0.], [0.1, 0.9]]])
  return pol, old, jnp.array([1.0, -2.0]), jnp.array([[1, 1], [1, 0]]), jnp.ones((2, 2))


def test_ral_loss_hand_values_and_metrics():
  pol, old, adv, rm, km = _ral_case()
  loss, m = ral_loss(pol, old, adv, rm, km, visual_key_mask=jnp.array([[1, 0], [0, 1]]))
  np.testing.assert_allclose(loss, (LN2 - 2 * JSD_HALF_ONE) / 3, rtol=1e-5)
  np.testing.assert_allclose(m['ral/jsd'], (LN2 + JSD_HALF_ONE) / 3, rtol=1e-5)
  np.testing.assert_allclose(m['ral/jsd_max'], LN2, rtol=1e-5)
  np.testing.assert_allclose(m['ral/jsd_pos_adv'], LN2 / 2, rtol=1e-5)
  np.testing.assert_allclose(m['ral/jsd_neg_adv'], JSD_HALF_ONE, rtol=1e-5)
  np.testing.assert_allclose(m['ral/frac_rows_pos_adv'], 2 / 3, rtol=1e-6)
  # visual mass: seq 0 key 0: rows 1.0, 0.5; seq 1 key 1: row 0 0.5 -> mean 2/3; old: 0, .5, 0 -> 1/6.
  np.testing.assert_allclose(m['ral/visual_mass'], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(m['ral/visual_mass_old'], 1 / 6, rtol=1e-6)
  # seq_mean_token_sum: mean(ln 2, -2 * 0.2157616)
  loss2, _ = ral_loss(pol, old, adv, rm, km, 'seq_mean_token_sum')
  np.testing.assert_allclose(loss2, (LN2 - 2 * JSD_HALF_ONE) / 2, rtol=1e-5)


def _softmax_rows(z, key_mask):
  return jax.nn.softmax(jnp.where(key_mask[:, None, :] > 0, z, -1e30), axis=-1)


@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_direction_pull_toward_or_push_away(sign):
  km = jnp.array([[1, 1, 1, 1, 0]])
  z_old = jnp.array([[[0.5, -0.2, 1.0, 0.0, 0.0], [2.0, 0.1, -1.0, 0.3, 0.0]]])
  old = _softmax_rows(z_old, km)
  z = z_old + jnp.array([[[0.8, -0.5, 0.1, 0.4, 0.0], [-0.6, 0.9, 0.2, -0.3, 0.0]]])
  rm = jnp.ones((1, 2))

  def loss(z):
    return ral_loss(_softmax_rows(z, km), old, jnp.array([sign]), rm, km)[0]

  step = jax.jit(lambda z: z - 4.0 * jax.grad(loss)(z))
  d0 = float(jnp.mean(jsd(_softmax_rows(z, km), old, km)))
  for _ in range(5):
    z = step(z)
  d1 = float(jnp.mean(jsd(_softmax_rows(z, km), old, km)))
  assert (d1 < 0.5 * d0) if sign > 0 else (d1 > 1.5 * d0), (d0, d1)


def test_single_update_gradient_is_exactly_zero_then_not():
  km = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
  rm, adv = jnp.array([[1, 1, 1], [1, 1, 0]]), jnp.array([1.3, -0.7])
  old = _softmax_rows(z, km)
  grad = jax.jit(jax.grad(lambda z: ral_loss(_softmax_rows(z, km), old, adv, rm, km)[0]))
  assert not np.any(grad(z))
  assert np.any(np.abs(grad(z + 0.1 * jax.random.normal(jax.random.PRNGKey(1), z.shape))) > 1e-6)


# All four modes' padding invariance is covered in test_rl_advantages; here the two extremes.
@pytest.mark.parametrize('mode', ['token_mean', 'drgrpo'])
def test_padding_invariance_rows_keys_sequences(mode):
  pol, old, adv, rm, km = _ral_case()
  vis = jnp.array([[1, 0], [0, 1]])
  f = jax.jit(lambda p, o, a, r, k, v: ral_loss(p, o, a, r, k, mode, 6, v))
  base, mb = f(pol, old, adv, rm, km, vis)
  # + one padded key (zero weight), + one padded row (NaN), + one padded sequence (NaN, any advantage).
  pol2 = jnp.pad(pol, ((0, 1), (0, 1), (0, 1)))
  old2 = jnp.pad(old, ((0, 1), (0, 1), (0, 1)))
  pol2 = pol2.at[:, 2, :].set(jnp.nan).at[2].set(jnp.nan)
  rm2, km2 = jnp.pad(rm, ((0, 1), (0, 1))), jnp.pad(km, ((0, 1), (0, 1)))
  adv2, vis2 = jnp.array([1.0, -2.0, 5.0]), jnp.pad(vis, ((0, 1), (0, 1)))
  loss, m = f(pol2, old2, adv2, rm2, km2, vis2)
  np.testing.assert_allclose(loss, base, rtol=1e-6)
  for k in mb:
    np.testing.assert_allclose(m[k], mb[k], rtol=1e-6, err_msg=k)
  g = jax.jit(jax.grad(lambda p: f(p, old2, adv2, rm2, km2, vis2)[0]))(pol2)
  assert np.all(np.isfinite(g))
  fd = jax.jit(lambda *a: attention_distill_loss(*a, aggregation=mode, max_len=6)[0])
  np.testing.assert_allclose(fd(pol2, old2, rm2, km2), fd(pol, old, rm, km), rtol=1e-6)


def test_attention_distill_hand_value_teacher_fixed_and_jit():
  s = jnp.array([[[0.5, 0.5], [1.0, 0.0]]])
  t = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  f = jax.jit(lambda s, t: attention_distill_loss(s, t, jnp.ones((1, 2)), visual_key_mask=jnp.array([[0, 1]])))
  loss, m = f(s, t)
  np.testing.assert_allclose(loss, (JSD_HALF_ONE + LN2) / 2, rtol=1e-5)
  np.testing.assert_allclose(m['attn_distill/visual_mass_teacher'], 0.5)
  gt = jax.grad(lambda t: f(s, t)[0])(t)
  assert not np.any(gt)


def test_record_rows_visual_mass_and_checks():
  np.testing.assert_array_equal(record_rows(2, 5, 3), [[5, 6, 7], [5, 6, 7]])
  np.testing.assert_array_equal(record_rows(1, 5, 3, 'producing'), [[4, 5, 6]])
  with pytest.raises(ValueError, match='rows'):
    record_rows(1, 5, 3, 'all')
  np.testing.assert_allclose(visual_mass(jnp.array([[[0.25, 0.75]]]), jnp.ones((1, 1)), jnp.array([[0, 1]])), 0.75)
  pol, old, adv, rm, km = _ral_case()
  with pytest.raises(AssertionError):
    ral_loss(pol, old[:, :1], adv, rm, km)
  with pytest.raises(AssertionError):
    ral_loss(pol, old, adv[:1], rm, km)


def test_jsd_gradient_hand_values_and_numerical_check():
  from jax.test_util import check_grads
  # d/dP = 1/2 log(P/M) = 1/2 [ln(2/3), ln 2]; d/dQ = 1/2 [ln(4/3), (Q=0 -> 0)].
  gp, gq = jax.grad(jsd, argnums=(0, 1))(jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(gp, [-0.2027326, 0.3465736], rtol=1e-5)
  np.testing.assert_allclose(gq, [0.1438410, 0.0], rtol=1e-5, atol=1e-7)
  p = jnp.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
  q = jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
  check_grads(jsd, (p, q), order=1, modes=['rev'], eps=1e-3, atol=1e-3, rtol=1e-3)


def _jsd_float64(p, q):
  """Reference: the textbook sum in float64 on the same float32 inputs (0 log 0 = 0)."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  m = 0.5 * (p + q)
  t = lambda x: np.where(x > 0, x * np.log(np.where(x > 0, x / m, 1.0)), 0.0)
  return 0.5 * np.sum(t(p), -1) + 0.5 * np.sum(t(q), -1)


@pytest.mark.parametrize('eps', [3e-1, 3e-2, 3e-3, 3e-4, 1e-4, 3e-5])
def test_jsd_float32_value_is_accurate_and_nonnegative_for_close_rows(eps):
  """Close rows (JSD from ~1e-2 down to ~1e-10): relative error <= 1e-3 vs float64, never negative; the textbook
  float32 form is off by orders of magnitude at the small end (checked to show the reference can tell)."""
  rng = np.random.default_rng(7)
  z = rng.normal(size=(4, 3, 97)) * 2.0
  p = np.asarray(jax.nn.softmax(jnp.asarray(z, jnp.float32)))
  q = np.array(jax.nn.softmax(jnp.asarray(z + eps * rng.normal(size=z.shape), jnp.float32)))
  q[0, 0, :5] = 0.0                                   # exact zeros in one row stay finite and correct
  q[0, 0] /= q[0, 0].sum()
  ref, got = _jsd_float64(p, q), np.asarray(jsd(jnp.asarray(p), jnp.asarray(q)), np.float64)
  assert np.all(got >= 0.0)
  np.testing.assert_allclose(got, ref, rtol=1e-3, atol=0)
  if eps <= 1e-4:
    assert ref.min() < 1e-8
    m = 0.5 * (p + q)
    xlx = lambda x: np.where(x > 0, x * np.log(np.where(x > 0, x, 1)), 0).astype(np.float32)
    naive = np.sum(0.5 * xlx(p) + 0.5 * xlx(q) - xlx(m), -1, dtype=np.float32)
    assert np.max(np.abs(naive - ref) / ref) > 1e-2


def test_jsd_gradient_finite_when_one_side_is_tiny():
  """P_i << Q_i rounds (P - Q)/(P + Q) to -1 in float32; the gradient must stay 1/2 log(P/M), finite (a log1p(d)
  form gave -inf here and NaN through a softmax: caught on the GPU testbed as skipped RAL updates)."""
  p, q = jnp.array([1e-10, 0.5, 0.5 - 1e-10]), jnp.array([0.5, 0.25, 0.25])
  g = jax.grad(lambda a: jsd(a, q))(p)
  m = 0.5 * (np.asarray(p, np.float64) + np.asarray(q, np.float64))
  np.testing.assert_allclose(g, 0.5 * np.log(np.asarray(p, np.float64) / m), rtol=1e-5)
  gz = jax.grad(lambda z: jsd(jax.nn.softmax(z), jax.nn.softmax(jnp.zeros(3))))(jnp.array([-30., 0., 0.]))
  assert np.all(np.isfinite(gz))


def test_jsd_gradient_matches_float64_formula():
  rng = np.random.default_rng(3)
  p = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 11)), jnp.float32)))
  q = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 11)) * 1e-3, jnp.float32) + jnp.log(p)))
  gp, gq = jax.grad(lambda a, b: jnp.sum(jsd(a, b)), argnums=(0, 1))(jnp.asarray(p), jnp.asarray(q))
  m = 0.5 * (p.astype(np.float64) + q)
  np.testing.assert_allclose(gp, 0.5 * np.log(p / m), rtol=1e-3, atol=1e-9)
  np.testing.assert_allclose(gq, 0.5 * np.log(q / m), rtol=1e-3, atol=1e-9)


def test_kl_variant_matches_float64_and_feeds_ral_loss():
  from ral_jax.rl.attention_loss import kl
  rng = np.random.default_rng(5)
  p = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 13)), jnp.float32)))
  q = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 13)), jnp.float32)))
  ref = np.sum(p.astype(np.float64) * np.log(p.astype(np.float64) / q), -1)
  np.testing.assert_allclose(kl(jnp.asarray(p), jnp.asarray(q)), ref, rtol=1e-4)
  assert not np.any(np.asarray(kl(jnp.asarray(p), jnp.asarray(p))))
  g = jax.grad(lambda a: jnp.sum(kl(a, jnp.asarray(q))))(jnp.asarray(p))
  np.testing.assert_allclose(g, np.log(p.astype(np.float64) / q), rtol=1e-3, atol=1e-6)
  adv, rm = jnp.array([1.0, -1.0]), jnp.ones((2, 3))
  loss, m = ral_loss(jnp.asarray(p), jnp.asarray(q), adv, rm, divergence='kl')
  np.testing.assert_allclose(loss, (ref[0].sum() - ref[1].sum()) / 6, rtol=1e-4)
  with pytest.raises(ValueError, match='divergence'):
    ral_loss(jnp.asarray(p), jnp.asarray(q), adv, rm, divergence='tv')
