"""The shared-prompt teacher-forced pass (models/shared_prefix.py; rl.share_prompt in train/step.py) against the full
forward on the G-fold repeated [prompt | response] rows: hidden states, attention record, gradients, and the
trainer's scoring pass and RL update (tiny model, float32, CPU)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _model_ref import padded_batch, random_params, tiny_cfg
from ral_jax.models.vlm import Qwen25VL
from ral_jax.rl.attention_loss import record_rows
from ral_jax.rl.logprobs import response_slice

B, G, TP, TR, NV = 3, 2, 10, 6, 4
PROMPT_LENS = [10, 8, 9]           # a different left padding per group
RESP_LENS = [6, 3, 5, 1, 6, 4]     # right-padded responses, one per row b*G + g


def _problem(seed=0):
  cfg = tiny_cfg()
  ids, mask, pos = padded_batch(cfg, PROMPT_LENS, TP, seed=seed)
  for b, n in enumerate(PROMPT_LENS):          # slots 2..5 of each prompt are an image (M-RoPE block of padded_batch)
    ids[b, TP - n + 2:TP - n + 6] = cfg.image_token_id
  rng = np.random.default_rng(seed + 1)
  vis = rng.normal(size=(B, NV, cfg.hidden_size)).astype(np.float32)
  R = B * G
  r_ids = rng.integers(0, cfg.vocab_size - 20, (R, TR)).astype(np.int32)
  r_mask = (np.arange(TR)[None] < np.array(RESP_LENS)[:, None]).astype(np.int32)
  nxt = np.repeat(pos.max(axis=(0, 2)) + 1, G)                                      # [R]
  r_pos = np.broadcast_to((nxt[:, None] + np.arange(TR)[None])[None], (3, R, TR)).astype(np.int32)
  return cfg, dict(ids=ids, mask=mask, pos=pos, vis=vis, r_ids=r_ids, r_mask=r_mask, r_pos=r_pos)


def _full_inputs(d):
  rep = lambda x, axis=0: np.repeat(x, G, axis=axis)
  return (np.concatenate([rep(d['ids']), d['r_ids']], 1), np.concatenate([rep(d['pos'], 1), d['r_pos']], 2),
          np.concatenate([rep(d['mask']), d['r_mask']], 1), rep(d['vis']))


def _full(cfg, params, d, rows, layers):
  ids, pos, mask, vis = _full_inputs(d)
  out = Qwen25VL(cfg).apply({'params': params}, ids, pos, mask, visual_embeds=vis, record_rows=rows,
                            record_layers=layers, return_hidden=True)
  return response_slice(out.hidden, TP, TR), {l: r['policy'] for l, r in out.record.items()}


def _shared(cfg, params, d, rows, layers):
  out = Qwen25VL(cfg).apply({'params': params}, d['ids'], d['pos'], d['mask'], d['r_ids'], d['r_pos'], d['r_mask'],
                            visual_embeds=d['vis'], record_rows=rows, record_layers=layers,
                            method=Qwen25VL.shared_prefix)
  return out.hidden, {l: r['policy'] for l, r in out.record.items()}


@pytest.fixture(scope='module')
def problem():
  cfg, d = _problem()
  return cfg, random_params(cfg, seed=3), d


@pytest.mark.parametrize('rows_kind,scan', [('response', True), ('producing', False)])
def test_shared_forward_equals_full_forward(problem, rows_kind, scan):
  cfg, params, d = problem
  cfg = cfg.replace(scan_layers=scan, record_chunk=4)
  rows = record_rows(B * G, TP, TR, rows_kind)
  layers = (1, -1)
  h_full, rec_full = jax.jit(lambda p: _full(cfg, p, d, rows, layers))(params)
  h_sh, rec_sh = jax.jit(lambda p: _shared(cfg, p, d, rows, layers))(params)
  assert h_sh.shape == (B * G, TR, cfg.hidden_size)
  np.testing.assert_allclose(np.asarray(h_sh), np.asarray(h_full), atol=1e-5, rtol=0)
  assert sorted(rec_sh) == sorted(rec_full) == [1, cfg.num_hidden_layers - 1]
  for l in rec_full:
    assert rec_sh[l].shape == (B * G, TR, TP + TR)
    np.testing.assert_allclose(np.asarray(rec_sh[l]), np.asarray(rec_full[l]), atol=1e-5, rtol=0)
    assert np.asarray(rec_full[l]).sum() > 0


def test_prompts_are_not_mixed_up(problem):
  """Changing prompt 1 changes exactly rows 2 and 3 (b*G + g)."""
  cfg, params, d = problem
  rows = record_rows(B * G, TP, TR, 'response')
  base = np.asarray(_shared(cfg, params, d, rows, (-1,))[0])
  d2 = dict(d, vis=d['vis'].copy())
  d2['vis'][1] += 1.0
  got = np.asarray(_shared(cfg, params, d2, rows, (-1,))[0])
  changed = np.abs(got - base).max(axis=(1, 2)) > 1e-4
  np.testing.assert_array_equal(changed, [False, False, True, True, False, False])


def test_gradients_equal_full_forward(problem):
  """d/dparams of a masked scalar of the response hidden states and the record: shared == full (the shared prompt
  gets the sum of its G rows' gradients)."""
  cfg, params, d = problem
  cfg = cfg.replace(remat_policy='nothing_saveable')
  rows = record_rows(B * G, TP, TR, 'response')
  rng = np.random.default_rng(7)
  w_h = jnp.asarray(rng.normal(size=(B * G, TR, cfg.hidden_size)), jnp.float32)
  w_p = jnp.asarray(rng.normal(size=(B * G, TR, TP + TR)), jnp.float32)
  m = jnp.asarray(d['r_mask'], jnp.float32)[:, :, None]

  def loss(fn):
    def f(p):
      h, rec = fn(cfg, p, d, rows, (-1,))
      return jnp.sum(h * w_h * m) + jnp.sum(rec[cfg.num_hidden_layers - 1] * w_p * m)
    return jax.jit(jax.grad(f))(params)
  g_full, g_sh = loss(_full), loss(_shared)
  flat_f, flat_s = jax.tree_util.tree_leaves_with_path(g_full), jax.tree.leaves(g_sh)
  for (path, a), b in zip(flat_f, flat_s):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, atol=2e-5 * max(1.0, np.abs(a).max()), rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  emb = np.asarray(g_full['model']['embed_tokens']['embedding'])
  assert np.abs(emb).max() > 0
