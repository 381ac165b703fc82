"""attend_shared_prefix (the rollout's decode attention over a prompt cache shared by G samples) equals attend_cache
over each row's own [prompt | response] cache, i.e. the prompt cache repeated G times (np.repeat row order)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.models.attention import attend_cache, attend_shared_prefix

B, G, K, Q, H, TP, TR = 3, 2, 2, 3, 8, 7, 5     # N = K*Q = 6 query heads on 2 kv heads (GQA), R = 6 rows


def _problem(dtype, seed=0):
  rng = np.random.default_rng(seed)
  R, N = B * G, K * Q
  f = lambda *s: jnp.asarray(rng.normal(size=s) * 2.0, dtype)
  q, pk, pv, rk, rv = f(R, 1, N, H), f(B, K, TP, H), f(B, K, TP, H), f(R, K, TR, H), f(R, K, TR, H)
  plen = np.array([TP, 4, 1])                                        # left padding, a one-token prompt included
  pvalid = jnp.asarray(np.arange(TP)[None] >= TP - plen[:, None])
  rlen = np.array([1, 3, 5, 2, 4, 1])                                # response slots written so far, per row
  rvalid = jnp.asarray(np.arange(TR)[None] < rlen[:, None])
  return q, pk, pv, pvalid, rk, rv, rvalid


def _reference(q, pk, pv, pvalid, rk, rv, rvalid):
  """attend_cache on the old layout: each prompt's cache repeated G times along rows, then the response slots."""
  rep = lambda x: jnp.repeat(x, G, axis=0)
  k = jnp.concatenate([rep(pk), rk], axis=2)
  v = jnp.concatenate([rep(pv), rv], axis=2)
  return attend_cache(q, k, v, jnp.concatenate([rep(pvalid), rvalid], axis=1))


@pytest.mark.parametrize('dtype,atol', [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_equals_attend_cache_on_repeated_cache(dtype, atol):
  args = _problem(dtype)
  got = jax.jit(attend_shared_prefix)(*args)
  want = jax.jit(_reference)(*args)
  assert got.shape == (B * G, 1, K * Q, H) and got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=0)


def test_rows_see_their_own_prompt_and_response():
  """Changing prompt 1's keys changes exactly rows 2, 3 (b*G + g); changing row 4's response changes only row 4."""
  q, pk, pv, pvalid, rk, rv, rvalid = _problem(jnp.float32, seed=1)
  base = np.asarray(attend_shared_prefix(q, pk, pv, pvalid, rk, rv, rvalid))
  got = np.asarray(attend_shared_prefix(q, pk.at[1].add(1.0), pv, pvalid, rk, rv, rvalid))
  changed = np.abs(got - base).max(axis=(1, 2, 3)) > 1e-4
  np.testing.assert_array_equal(changed, [False, False, True, True, False, False])
  got = np.asarray(attend_shared_prefix(q, pk, pv, pvalid, rk, rv.at[4].add(1.0), rvalid))
  changed = np.abs(got - base).max(axis=(1, 2, 3)) > 1e-4
  np.testing.assert_array_equal(changed, [False, False, False, False, True, False])


def test_padding_slots_are_ignored():
  q, pk, pv, pvalid, rk, rv, rvalid = _problem(jnp.float32, seed=2)
  base = attend_shared_prefix(q, pk, pv, pvalid, rk, rv, rvalid)
  noise = lambda x, m: jnp.where(m, x, 1e3)                          # garbage in every masked slot
  got = attend_shared_prefix(q, noise(pk, pvalid[:, None, :, None]), noise(pv, pvalid[:, None, :, None]), pvalid,
                             noise(rk, rvalid[:, None, :, None]), noise(rv, rvalid[:, None, :, None]), rvalid)
  np.testing.assert_allclose(np.asarray(got), np.asarray(base), atol=1e-6, rtol=0)


def test_rows_not_a_multiple_of_prompts_is_an_error():
  q, pk, pv, pvalid, rk, rv, rvalid = _problem(jnp.float32)
  with pytest.raises(ValueError, match='not a multiple'):
    attend_shared_prefix(q[:5], pk, pv, pvalid, rk[:5], rv[:5], rvalid[:5])
