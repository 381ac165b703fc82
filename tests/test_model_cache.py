"""KV-cache decoding (prefill, then one token at a time) gives the full forward's logits."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _model_ref import random_params, padded_batch, tiny_cfg
from ral_jax.models.vlm import Qwen25VL, init_cache, init_params

TP, TR = 9, 5      # prompt bucket (left-padded) and response length


@pytest.fixture(scope='module')
def problem():
  cfg = tiny_cfg()
  params = random_params(cfg)
  rng = np.random.default_rng(0)
  # Prompts of lengths 9, 6, 3 left-padded to TP; the response continues each row's positions.
  ids, pmask, ppos = padded_batch(cfg, [9, 6, 3], TP, seed=1)
  nxt = ppos.max(axis=(0, 2)) + 1
  resp = rng.integers(0, cfg.vocab_size - 20, (3, TR)).astype(np.int32)
  rmask = np.ones((3, TR), np.int32)
  rmask[2, 3:] = 0                                        # row 2 ends early: its last tokens are padding
  rpos = np.broadcast_to(nxt[None, :, None] + np.arange(TR)[None, None, :], (3, 3, TR)).astype(np.int32)
  full = dict(ids=np.concatenate([ids, resp], 1), mask=np.concatenate([pmask, rmask], 1),
              pos=np.concatenate([ppos, rpos], 2))
  return cfg, params, full


def _full_logits(cfg, params, full):
  return Qwen25VL(cfg).apply({'params': params}, full['ids'], full['pos'], full['mask']).logits


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _step(cfg, params, cache, ids, pos, mask):
  out = Qwen25VL(cfg).apply({'params': params}, ids, pos, mask, cache=cache)
  return out.logits, out.cache


def _decode_logits(cfg, params, full):
  cache = init_cache(cfg, 3, TP + TR, jnp.float32)
  logits, cache = _step(cfg, params, cache, full['ids'][:, :TP], full['pos'][:, :, :TP], full['mask'][:, :TP])
  outs = [logits]
  for t in range(TP, TP + TR):
    logits, cache = _step(cfg, params, cache, full['ids'][:, t:t + 1], full['pos'][:, :, t:t + 1],
                          full['mask'][:, t:t + 1])
    outs.append(logits)
  return jnp.concatenate(outs, 1), cache


@pytest.mark.parametrize('scan', [True, False])
def test_prefill_then_decode_equals_full_forward(problem, scan):
  cfg, params, full = problem
  cfg = cfg.replace(scan_layers=scan)
  want = np.asarray(jax.jit(functools.partial(_full_logits, cfg))(params, full))
  got, cache = _decode_logits(cfg, params, full)
  valid = full['mask'] == 1
  np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=2e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache['index']), [TP + TR] * 3)
  np.testing.assert_array_equal(np.asarray(cache['mask']), valid)
  assert cache['k'].shape == (cfg.num_hidden_layers, 3, TP + TR, cfg.num_key_value_heads, cfg.head_dim)


def test_per_row_cache_index(problem):
  """Rows at different cache slots: row b's step writes slot index[b] and sees only slots <= index[b]."""
  cfg, params, full = problem
  want = np.asarray(jax.jit(functools.partial(_full_logits, cfg))(params, full))
  cache = init_cache(cfg, 3, TP + TR, jnp.float32)
  _, cache = _step(cfg, params, cache, full['ids'][:, :TP], full['pos'][:, :, :TP], full['mask'][:, :TP])
  # Two shared steps, then row 0 steps on at slot TP+2 while rows 1, 2 rewrite slot TP+1.
  _, cache = _step(cfg, params, cache, full['ids'][:, TP:TP + 1], full['pos'][:, :, TP:TP + 1],
                   full['mask'][:, TP:TP + 1])
  t = np.array([TP + 1, TP + 1, TP + 1])
  cache = dict(cache)
  logits, cache = _step(cfg, params, cache, full['ids'][np.arange(3), t][:, None],
                        full['pos'][:, np.arange(3), t][:, :, None], full['mask'][np.arange(3), t][:, None])
  np.testing.assert_allclose(np.asarray(logits)[:, 0], want[np.arange(3), t], atol=2e-5)
  # Now rewind rows 1 and 2 by one slot and recompute their step: the same logits come back.
  cache['index'] = jnp.asarray([TP + 2, TP + 1, TP + 1], jnp.int32)
  t2 = np.array([TP + 2, TP + 1, TP + 1])
  logits2, _ = _step(cfg, params, cache, full['ids'][np.arange(3), t2][:, None],
                     full['pos'][:, np.arange(3), t2][:, :, None], full['mask'][np.arange(3), t2][:, None])
  np.testing.assert_allclose(np.asarray(logits2)[:, 0], want[np.arange(3), t2], atol=2e-5)


def test_record_with_cache_is_refused(problem):
  cfg, params, full = problem
  with pytest.raises(ValueError, match='cache'):
    Qwen25VL(cfg).apply({'params': params}, full['ids'][:, :2], full['pos'][:, :, :2], full['mask'][:, :2],
                        record_rows=jnp.zeros((3, 1), jnp.int32), cache=init_cache(cfg, 3, 4))
