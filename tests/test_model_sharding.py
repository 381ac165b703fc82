"""The model sharded over the 8 fake CPU devices gives the one-device logits and record."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from _model_ref import random_params, padded_batch, tiny_cfg
from ral_jax import sharding as sh
from ral_jax.models.vlm import Qwen25VL, init_params


def _cfg():
  # Tiny, but with head / vocab counts that tensor=4 divides, so the tensor axis really shards them.
  return tiny_cfg(num_attention_heads=8, num_key_value_heads=4, mrope_section=(2, 2, 2), vocab_size=1032)


@pytest.fixture(scope='module')
def problem():
  cfg = _cfg()
  params = random_params(cfg)
  ids, mask, pos = padded_batch(cfg, [10, 7, 10, 4, 9, 10, 5, 8], 10)   # 8 rows: data x fsdp up to 8
  rows = np.array([[6, 7, 8, 9]] * 8, np.int32)
  batch = dict(input_ids=ids, attention_mask=mask, positions=pos, record_rows=rows)
  fwd = lambda p, b: Qwen25VL(cfg).apply({'params': p}, b['input_ids'], b['positions'], b['attention_mask'],
                                         record_rows=b['record_rows'])
  out = jax.jit(fwd)(params, batch)
  return cfg, params, batch, fwd, (np.asarray(out.logits), np.asarray(out.record[cfg.num_hidden_layers - 1]['policy']))


@pytest.mark.parametrize('shape', [(2, 1, 4), (2, 4, 1), (1, 2, 4)])
def test_sharded_forward_equals_one_device(problem, shape):
  cfg, params, batch, fwd, (want_logits, want_policy) = problem
  mesh, rules = sh.make_mesh(shape), sh.logical_rules()
  _, shardings = sh.model_param_shardings(cfg, mesh, rules)
  p = jax.device_put(params, shardings)
  q_spec = shardings['model']['layers']['self_attn']['q_proj']['kernel'].spec
  assert q_spec == P(None, 'fsdp', 'tensor', None)
  b = sh.shard_batch(batch, mesh)
  assert b['positions'].sharding.spec == P(None, ('data', 'fsdp'), None)
  with sh.mesh_context(mesh, rules):
    out = jax.jit(fwd)(p, b)
  assert len(out.logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out.logits), want_logits, atol=2e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out.record[cfg.num_hidden_layers - 1]['policy']), want_policy, atol=2e-6)


def test_init_sharded_places_params_and_replicates_indivisible_dims():
  cfg = tiny_cfg()             # 6 heads, 2 kv heads, vocab 1031: tensor=4 divides none of them
  mesh, rules = sh.make_mesh((1, 2, 4)), sh.logical_rules()
  params = sh.init_sharded(lambda: init_params(cfg, jax.random.PRNGKey(0), boxed=True), mesh, rules)
  assert params['model']['layers']['self_attn']['q_proj']['kernel'].sharding.spec == P(None, 'fsdp', None, None)
  assert params['model']['layers']['mlp']['gate_proj']['kernel'].sharding.spec == P(None, 'fsdp', 'tensor')
  assert params['model']['embed_tokens']['embedding'].sharding.spec == P(None, 'fsdp')
  ref = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  assert jax.tree.structure(params) == jax.tree.structure(ref)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    assert a.shape == b.shape and a.dtype == b.dtype and np.isfinite(np.asarray(a)).all()


def test_rule_overrides_and_errors():
  rules = dict(sh.logical_rules([('embed', None), ('mlp', ('fsdp', 'tensor'))]))
  assert rules['embed'] is None and rules['mlp'] == ('fsdp', 'tensor') and rules['heads'] == 'tensor'
  with pytest.raises(ValueError, match='mesh axes'):
    sh.logical_rules([('embed', 'model')])
  with pytest.raises(ValueError, match='devices'):
    sh.make_mesh((3, 1, 4))
  assert dict(sh.make_mesh((2, -1, 1)).shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  with pytest.raises(ValueError, match='not divisible'):
    sh.shard_batch({'input_ids': np.zeros((3, 4), np.int32)}, sh.make_mesh((2, 1, 4)))
