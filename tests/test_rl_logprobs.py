"""Per-token log-probs, entropy and reverse KL: hand values, chunked == direct, no [B,T,V] intermediate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.rl import logprobs as lpm

LN2, LN3 = 0.6931472, 1.0986123
# softmax([0, ln2, ln3]) = [1/6, 1/3, 1/2]; entropy = ln6/6 + ln3/3 + ln2/2.
H_123 = 1.7917595 / 6 + 1.0986123 / 3 + 0.6931472 / 2


def test_token_logprobs_and_entropy_hand_values():
  logits = jnp.array([[[0., LN2, LN3], [0., LN2, LN3]]])
  np.testing.assert_allclose(lpm.token_logprobs(logits, jnp.array([[2, 0]])), [[-LN2, -1.7917595]], rtol=1e-6)
  np.testing.assert_allclose(lpm.token_entropy(logits), [[H_123, H_123]], rtol=1e-6)
  # Temperature 2 on doubled logits gives the same distribution.
  np.testing.assert_allclose(lpm.token_logprobs(2 * logits, jnp.array([[2, 0]]), temperature=2.0),
                             [[-LN2, -1.7917595]], rtol=1e-6)


def test_bfloat16_logits_give_float32():
  out = lpm.token_logprobs(jnp.zeros((1, 2, 4), jnp.bfloat16), jnp.array([[0, 3]]))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, -np.log(4.0) * np.ones((1, 2)), rtol=1e-6)


def test_chunked_hand_values_identity_kernel():
  # Kernel = identity (D = V = 3), so hidden states are the logits. T = 3 with chunk 2 (tail padded).
  h = jnp.array([[[0., LN2, LN3], [0., 0., 0.], [0., LN2, LN3]]])
  st = lpm.token_stats_from_hidden(h, jnp.eye(3), jnp.array([[2, 1, 0]]), chunk=2)
  np.testing.assert_allclose(st.logprobs, [[-LN2, -LN3, -1.7917595]], rtol=1e-6)
  np.testing.assert_allclose(st.entropy, [[H_123, LN3, H_123]], rtol=1e-6)
  assert st.teacher_logprobs is None and st.reverse_kl is None


def test_reverse_kl_hand_value():
  # student [1/2, 1/2], teacher [1/4, 3/4]: KL = 1/2 ln 2 + 1/2 ln(2/3) = 0.1438410
  kl = lpm.reverse_kl_from_hidden(jnp.zeros((1, 1, 2)), jnp.eye(2), jnp.array([[[0., LN3]]]), jnp.eye(2), chunk=1)
  np.testing.assert_allclose(kl, [[0.1438410]], rtol=1e-5)


def _random(b=2, t=7, d=5, v=13, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  return (jax.random.normal(k[0], (b, t, d)), jax.random.normal(k[1], (d, v)),
          jax.random.randint(k[2], (b, t), 0, v), jax.random.normal(k[3], (b, t, 3)), jax.random.normal(k[4], (3, v)))


@pytest.mark.parametrize('chunk', [3, 64])
def test_chunked_matches_direct_values_and_grads(chunk):
  h, w, y, th, tw = _random()
  temp = 0.7

  def direct(h, w):
    ls = jax.nn.log_softmax(jnp.einsum('btd,dv->btv', h, w) / temp, -1)
    lt = jax.nn.log_softmax(jnp.einsum('btd,dv->btv', th, tw) / temp, -1)
    lp = jnp.take_along_axis(ls, y[..., None], -1)[..., 0]
    kl = jnp.sum(jnp.exp(ls) * (ls - lt), -1)
    return lp, -jnp.sum(jnp.exp(ls) * ls, -1), kl

  def chunked(h, w):
    st = lpm.token_stats_from_hidden(h, w, y, chunk, temp, teacher_hidden=th, teacher_kernel=tw)
    return st.logprobs, st.entropy, st.reverse_kl

  for a, b in zip(jax.jit(direct)(h, w), jax.jit(chunked)(h, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  obj = lambda f: (lambda h, w: sum(jnp.sum(o * c) for o, c in zip(f(h, w), (1.0, 0.3, 0.5))))
  gd = jax.jit(jax.grad(obj(direct), argnums=(0, 1)))(h, w)
  gc = jax.jit(jax.grad(obj(chunked), argnums=(0, 1)))(h, w)
  for a, b in zip(gd, gc):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_teacher_gets_no_gradient():
  h, w, y, th, tw = _random()
  g = jax.grad(lambda th, tw: jnp.sum(lpm.reverse_kl_from_hidden(h, w, th, tw, 3)), argnums=(0, 1))(th, tw)
  assert not np.any(g[0]) and not np.any(g[1])


def _shapes(jaxpr, acc):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      acc.add(tuple(getattr(v.aval, 'shape', ())))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if hasattr(sub, 'jaxpr'):
          _shapes(sub.jaxpr if hasattr(sub.jaxpr, 'eqns') else sub.jaxpr.jaxpr, acc)
        elif hasattr(sub, 'eqns'):
          _shapes(sub, acc)
  return acc


def test_full_logits_never_materialised_forward_or_backward():
  b, t, d, v, c = 2, 12, 5, 13, 4
  h, w, y, th, tw = _random(b, t, d, v)

  def f(h, w):
    st = lpm.token_stats_from_hidden(h, w, y, c, teacher_hidden=th, teacher_kernel=tw)
    return jnp.sum(st.logprobs) + jnp.sum(st.reverse_kl)

  shapes = _shapes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(h, w).jaxpr, set())
  assert (b, c, v) in shapes                       # the per-chunk logits
  assert not any(len(s) >= 2 and np.prod(s) >= b * t * v for s in shapes), sorted(shapes)


def _dot_operand_dtypes(jaxpr, acc):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      acc.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, 'jaxpr', sub)
        inner = getattr(inner, 'jaxpr', inner)
        if hasattr(inner, 'eqns'):
          _dot_operand_dtypes(inner, acc)
  return acc


def test_bf16_backward_matmuls_stay_bf16_and_match_float32():
  """bf16 hidden states: every matmul of the chunked log-prob's forward and backward takes bf16 operands (no float32
  cotangent x bf16 operand matmul), and the gradients match the float32 computation to bf16 accuracy."""
  h, w, y, _, _ = _random(t=12, d=16, v=40)
  f = lambda h, w: jnp.sum(lpm.token_stats_from_hidden(h, w, y, 4).logprobs * jnp.arange(12.0))
  h16 = h.astype(jnp.bfloat16)
  dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(h16, w).jaxpr, [])
  assert len(dots) >= 3 and all(d == ('bfloat16', 'bfloat16') for d in dots), dots
  g16 = jax.grad(f, argnums=(0, 1))(h16, w)
  g32 = jax.grad(f, argnums=(0, 1))(h16.astype(jnp.float32), w)
  assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.float32
  for a, b in zip(g16, g32):
    a, b = np.asarray(a, np.float32), np.asarray(b)
    assert np.linalg.norm(a - b) <= 0.02 * np.linalg.norm(b)


def test_response_slice_and_errors():
  hidden = jnp.arange(6.)[None, :, None]                  # positions 0..5 = Tp(3) + Tr(3)
  np.testing.assert_array_equal(lpm.response_slice(hidden, 3, 3)[0, :, 0], [2., 3., 4.])
  h, w, y, th, tw = _random()
  with pytest.raises(ValueError, match='shared tokenizer vocabulary'):
    lpm.token_stats_from_hidden(h, w, y, 3, teacher_hidden=th, teacher_kernel=tw[:, :-1])
  with pytest.raises(ValueError, match='both'):
    lpm.token_stats_from_hidden(h, w, y, 3, teacher_hidden=th)
  with pytest.raises(ValueError, match='kernel'):
    lpm.token_logprobs_from_hidden(h, w.T, y)
