"""The attention record (ral_jax/docs/method.md s.1, Eq. 2) vs transformers' eager attention probabilities (4.57,
float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from _model_ref import decoder_params, eq2_policy, hf_model, padded_batch, tiny_cfg
from ral_jax.models.vlm import Qwen25VL

T = 12


@pytest.fixture(scope='module')
def problem():
  cfg = tiny_cfg(record_chunk=3)          # R = 5 rows -> two chunks, the last one padded
  hf = hf_model(cfg, seed=4)
  params = jax.tree.map(jnp.asarray, decoder_params(hf, cfg))
  ids, mask, pos = padded_batch(cfg, [12, 7, 9], T, seed=5)
  # Rows: response-like rows, the first real token (no earlier key -> zeros), a pad query row, unused rows (-1).
  rows = np.array([[8, 9, 10, 11, 0], [5, 6, 11, -1, -1], [3, 4, 7, 11, 2]], np.int32)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(pos, dtype=torch.long), output_attentions=True)
  attn = [a.numpy() for a in out.attentions]               # L x [B,N,T,T]
  return cfg, params, ids, mask, pos, rows, attn


def _apply(cfg, params, ids, mask, pos, rows, **kw):
  fn = jax.jit(lambda p, r: Qwen25VL(cfg).apply({'params': p}, jnp.asarray(ids), jnp.asarray(pos),
                                                 jnp.asarray(mask), record_rows=r, **kw))
  return fn(params, jnp.asarray(rows))


def test_record_matches_eager_for_last_and_middle_layer(problem):
  cfg, params, ids, mask, pos, rows, attn = problem
  out = _apply(cfg, params, ids, mask, pos, rows, record_layers=(1, -1), record_heads=True)
  assert sorted(out.record) == [1, cfg.num_hidden_layers - 1]
  for layer in out.record:
    policy = np.asarray(out.record[layer]['policy'])
    assert policy.dtype == np.float32 and policy.shape == rows.shape + (T,)
    want = eq2_policy(attn[layer], rows, mask)
    np.testing.assert_allclose(policy, want, atol=1e-5, rtol=0)
    heads = np.asarray(out.record[layer]['heads'])
    assert heads.shape == (3, cfg.num_attention_heads, rows.shape[1], T)
    for b in range(3):
      for r in range(rows.shape[1]):
        t = rows[b, r]
        if t >= 0 and mask[b, t]:
          np.testing.assert_allclose(heads[b, :, r], attn[layer][b, :, t], atol=1e-5, rtol=0)
        elif t < 0:
          assert not heads[b, :, r].any()


def test_record_rows_are_distributions_over_earlier_real_keys(problem):
  cfg, params, ids, mask, pos, rows, _ = problem
  policy = np.asarray(_apply(cfg, params, ids, mask, pos, rows).record[cfg.num_hidden_layers - 1]['policy'])
  for b in range(3):
    for r in range(rows.shape[1]):
      t = rows[b, r]
      p = policy[b, r]
      assert (p >= 0).all()
      assert not p[t if t >= 0 else 0:].any() if t >= 0 else not p.any()   # self and later keys zero
      assert not p[mask[b] == 0].any()                                      # padding keys zero
      has_earlier = t > 0 and mask[b, :t].any()
      np.testing.assert_allclose(p.sum(), 1.0 if has_earlier else 0.0, atol=1e-6)


def test_record_does_not_change_logits_and_chunking_is_invisible(problem):
  cfg, params, ids, mask, pos, rows, _ = problem
  plain = jax.jit(lambda p: Qwen25VL(cfg).apply({'params': p}, jnp.asarray(ids), jnp.asarray(pos),
                                                 jnp.asarray(mask)))(params)
  rec3 = _apply(cfg, params, ids, mask, pos, rows)
  rec64 = _apply(cfg.replace(record_chunk=64), params, ids, mask, pos, rows)
  np.testing.assert_allclose(np.asarray(plain.logits), np.asarray(rec3.logits), atol=1e-6, rtol=0)
  last = cfg.num_hidden_layers - 1
  np.testing.assert_allclose(rec3.record[last]['policy'], rec64.record[last]['policy'], atol=1e-7)


def test_record_gradients_flow_to_q_k_and_below_only(problem):
  cfg, params, ids, mask, pos, rows, _ = problem
  last = cfg.num_hidden_layers - 1
  w = jnp.asarray(np.random.default_rng(0).normal(size=rows.shape + (T,)), jnp.float32)

  def loss(p):
    out = Qwen25VL(cfg).apply({'params': p}, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask),
                              record_rows=jnp.asarray(rows), return_hidden=True)
    return jnp.sum(out.record[last]['policy'] * w)
  g = jax.jit(jax.grad(loss))(params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
  attn = g['model']['layers']['self_attn']
  for name in ('q_proj', 'k_proj'):                       # the recorded layer's Q/K
    assert np.abs(np.asarray(attn[name]['kernel'][last])).max() > 1e-6
  for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):   # and everything below it
    assert np.abs(np.asarray(attn[name]['kernel'][:last])).max() > 1e-6
  assert np.abs(np.asarray(g['model']['embed_tokens']['embedding'])).max() > 1e-6
  # The policy does not depend on the recorded layer's values, output projection or MLP, nor on the head.
  for x in (attn['v_proj']['kernel'][last], attn['o_proj']['kernel'][last],
            g['model']['layers']['mlp']['down_proj']['kernel'][last], g['lm_head']['kernel']):
    assert not np.asarray(x).any()


def test_record_memory_is_rows_by_keys_not_heads_by_t_squared():
  """Compiled forward+backward temporaries: the record adds far less than one [B,N,T,T] float32 matrix."""
  cfg = tiny_cfg(num_hidden_layers=2, record_chunk=8)
  from _model_ref import random_params
  params = random_params(cfg)
  B, T, R = 1, 384, 16
  ids = jnp.zeros((B, T), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (3, B, T))
  rows = jnp.arange(T - R, T, dtype=jnp.int32)[None]

  def temp_bytes(record):
    def loss(p):
      out = Qwen25VL(cfg).apply({'params': p}, ids, pos, None, record_rows=rows if record else None,
                                return_hidden=True)
      val = jnp.sum(out.hidden[:, -1])
      return val + (jnp.sum(out.record[cfg.num_hidden_layers - 1]['policy']) if record else 0.0)
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  full_matrix = B * cfg.num_attention_heads * T * T * 4
  extra = temp_bytes(True) - temp_bytes(False)
  assert extra < full_matrix / 4, (extra, full_matrix)
