"""The combined objective: weighted sum, exact-zero RAL gradient at p == p_old, micro-batch and sharding checks."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.rl.attention_loss import attention_distill_loss, ral_loss
from ral_jax.rl.config import (DistillConfig, GRPOConfig, ObjectiveConfig, RALConfig, check_updates_per_rollout)
from ral_jax.rl.distill import token_distill_loss
from ral_jax.rl.logprobs import TokenStats
from ral_jax.rl.objective import RLBatch, loss_from_hidden, total_loss
from ral_jax.rl.policy_loss import grpo_loss


def _batch_and_outputs(seed=0, b=4, t=5, s=9):
  k = jax.random.split(jax.random.PRNGKey(seed), 8)
  mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
  key_mask = jnp.ones((b, s)).at[1, -2:].set(0)
  pol = lambda kk: jax.nn.softmax(jnp.where(key_mask[:, None] > 0, jax.random.normal(kk, (b, t, s)), -1e30), -1)
  batch = RLBatch(response_ids=jax.random.randint(k[0], (b, t), 0, 11), response_mask=mask,
                  advantages=jnp.array([1.0, -0.5, 0.3, -1.2]), old_logprobs=-jax.random.uniform(k[1], (b, t)),
                  ref_logprobs=-jax.random.uniform(k[2], (b, t)), old_policy=pol(k[3]), key_mask=key_mask,
                  visual_key_mask=jnp.zeros((b, s)).at[:, 1:4].set(1), teacher_policy=pol(k[4]))
  stats = TokenStats(logprobs=-jax.random.uniform(k[5], (b, t)), entropy=jnp.ones((b, t)),
                     teacher_logprobs=-jax.random.uniform(k[6], (b, t)), reverse_kl=jax.random.uniform(k[7], (b, t)))
  return batch, stats, pol(k[0])


def test_total_loss_is_the_weighted_sum_of_its_terms():
  batch, stats, policy = _batch_and_outputs()
  cfg = ObjectiveConfig(grpo=GRPOConfig(), ral=RALConfig(lambda_attn=5.0),
                        distill=DistillConfig(mu=0.7, gamma_attn=0.05, attn_aggregation='seq_mean_token_sum'))
  loss, m = jax.jit(lambda b, s, p: total_loss(cfg, b, s, p))(batch, stats, policy)
  g, _ = grpo_loss(stats.logprobs, batch.old_logprobs, batch.advantages, batch.response_mask, cfg.grpo,
                   batch.ref_logprobs)
  r, _ = ral_loss(policy, batch.old_policy, batch.advantages, batch.response_mask, batch.key_mask)
  kd, _ = token_distill_loss(batch.response_mask, 'full', reverse_kl=stats.reverse_kl)
  ad, _ = attention_distill_loss(policy, batch.teacher_policy, batch.response_mask, batch.key_mask,
                                 'seq_mean_token_sum')
  np.testing.assert_allclose(loss, g + 5.0 * r + 0.7 * kd + 0.05 * ad, rtol=1e-5)
  for key in ('loss', 'grpo/clip_frac', 'grpo/approx_kl', 'grpo/entropy', 'grpo/ratio_mean', 'grpo/kl_ref',
              'ral/jsd_pos_adv', 'ral/jsd_neg_adv', 'ral/visual_mass', 'kd/reverse_kl', 'attn_distill/jsd',
              'attn/visual_mass'):
    assert key in m and m[key].shape == (), key


def test_total_loss_at_p_equal_old_has_grpo_gradient_only():
  batch, stats, _ = _batch_and_outputs()
  cfg = ObjectiveConfig(ral=RALConfig(lambda_attn=1.0))
  grpo_only = ObjectiveConfig(ral=RALConfig(lambda_attn=0.0))

  def grads(c, policy):
    f = lambda lp, p: total_loss(c, batch, stats.replace(logprobs=lp), p)[0]
    return jax.jit(jax.grad(f, argnums=(0, 1)))(stats.logprobs, policy)

  g_lp, g_p = grads(cfg, batch.old_policy)
  g0_lp, _ = grads(grpo_only, batch.old_policy)
  np.testing.assert_array_equal(g_lp, g0_lp)
  assert not np.any(g_p)


def test_loss_from_hidden_jit_grad_with_teacher():
  batch, _, policy = _batch_and_outputs(b=4, t=5)
  k = jax.random.split(jax.random.PRNGKey(3), 4)
  h, w = jax.random.normal(k[0], (4, 5, 6)), jax.random.normal(k[1], (6, 11))
  th, tw = jax.random.normal(k[2], (4, 5, 3)), jax.random.normal(k[3], (3, 11))
  cfg = ObjectiveConfig(distill=DistillConfig(kd_estimator='sampled'), temperature=0.9, logprob_chunk=2)
  f = jax.jit(jax.value_and_grad(lambda h, w, p: loss_from_hidden(cfg, batch, h, w, p, th, tw), argnums=(0, 1, 2),
                                 has_aux=True))
  (loss, m), grads = f(h, w, policy)
  assert np.isfinite(loss) and all(np.all(np.isfinite(x)) for x in grads)
  assert {'kd/sampled_kl', 'kd/reverse_kl', 'attn_distill/loss', 'ral/loss'} <= set(m)


def test_missing_inputs_and_update_count_checks():
  batch, stats, policy = _batch_and_outputs()
  with pytest.raises(ValueError, match='old_policy'):
    total_loss(ObjectiveConfig(), batch.replace(old_policy=None), stats, policy)
  with pytest.raises(ValueError, match='teacher_policy'):
    total_loss(ObjectiveConfig(distill=DistillConfig()), batch.replace(teacher_policy=None), stats, policy)
  with pytest.raises(ValueError, match='ref_logprobs'):
    total_loss(ObjectiveConfig(ral=RALConfig(lambda_attn=0.0)), batch.replace(ref_logprobs=None), stats)
  with pytest.raises(ValueError, match='single update'):
    check_updates_per_rollout(ObjectiveConfig(), 1)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    check_updates_per_rollout(ObjectiveConfig(ral=RALConfig(allow_single_update=True)), 1)
  assert len(w) == 1 and 'exactly zero' in str(w[0].message)
  check_updates_per_rollout(ObjectiveConfig(), 4)
  check_updates_per_rollout(ObjectiveConfig(ral=RALConfig(lambda_attn=0.0)), 1)


@pytest.mark.parametrize('mode', ['token_mean', 'seq_mean_token_mean'])
def test_micro_batch_accumulation_by_summation_is_exact(mode):
  from ral_jax.rl.objective import loss_denominators
  batch, stats, policy = _batch_and_outputs()
  cfg = ObjectiveConfig(grpo=GRPOConfig(aggregation=mode), ral=RALConfig(lambda_attn=2.0, aggregation='drgrpo'),
                        distill=DistillConfig(mu=0.5, gamma_attn=0.5))
  den = loss_denominators(cfg, batch.response_mask)
  assert set(den) == {mode, 'drgrpo'}

  def lossg(lp, pol, lo_hi, den):
    rows = slice(*lo_hi)
    take = lambda t: jax.tree.map(lambda v: v[rows], t)
    return total_loss(cfg, take(batch), take(stats).replace(logprobs=lp[rows]), pol[rows], den)[0]

  f = jax.jit(jax.value_and_grad(lossg, argnums=(0, 1)), static_argnums=(2,))
  whole, gw = f(stats.logprobs, policy, (0, 4), None)
  a, ga = f(stats.logprobs, policy, (0, 1), den)           # uneven split: 4 tokens | 12 tokens
  b, gb = f(stats.logprobs, policy, (1, 4), den)
  np.testing.assert_allclose(a + b, whole, rtol=1e-5)
  for x, y, z in zip(ga, gb, gw):
    np.testing.assert_allclose(x + y, z, rtol=1e-5, atol=1e-7)


def test_loss_from_hidden_sharded_over_8_devices_matches_single_device():
  from jax.sharding import NamedSharding, PartitionSpec as P
  devs = jax.devices()
  if len(devs) < 8:
    pytest.skip('needs the 8 fake CPU devices of tests/conftest.py')
  mesh = jax.make_mesh((8,), ('data',), devices=devs[:8], axis_types=(jax.sharding.AxisType.Auto,))
  b, t, s, d, v = 8, 6, 10, 4, 7
  k = jax.random.split(jax.random.PRNGKey(5), 6)
  mask = (jnp.arange(t)[None] < jax.random.randint(k[0], (b, 1), 1, t + 1)).astype(jnp.int32)
  pol = lambda kk: jax.nn.softmax(jax.random.normal(kk, (b, t, s)), -1)
  batch = RLBatch(response_ids=jax.random.randint(k[1], (b, t), 0, v), response_mask=mask,
                  advantages=jax.random.normal(k[2], (b,)), old_logprobs=-jax.random.uniform(k[3], (b, t)) - 1.5,
                  ref_logprobs=-jax.random.uniform(k[4], (b, t)) - 1.5, old_policy=pol(k[5]), key_mask=jnp.ones((b, s)))
  h, w, policy = jax.random.normal(k[0], (b, t, d)), jax.random.normal(k[1], (d, v)), pol(k[2])
  cfg = ObjectiveConfig(logprob_chunk=4)
  f = jax.jit(jax.value_and_grad(lambda h, p, bt: loss_from_hidden(cfg, bt, h, w, p)[0], argnums=(0, 1)))
  want, gwant = f(h, policy, batch)
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P('data')))
  got, ggot = f(shard(h), shard(policy), jax.tree.map(shard, batch))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b_ in zip(ggot, gwant):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6)
  assert ggot[0].sharding.spec[0] == 'data'
