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


def _problem(seed=0, prompt_lens=PROMPT_LENS, resp_lens=RESP_LENS, TP=TP, TR=TR, **cfg_kw):
  cfg = tiny_cfg(**cfg_kw)
  B = len(prompt_lens)
  ids, mask, pos = padded_batch(cfg, prompt_lens, TP, seed=seed)
  for b, n in enumerate(prompt_lens):          # slots 2..5 of each prompt are an image (M-RoPE block of padded_batch)
    ids[b, TP - n + 2:TP - n + 6] = cfg.image_token_id
  rng = np.random.default_rng(seed + 1)
  vis = rng.normal(size=(B, NV, cfg.hidden_size)).astype(np.float32)
  R = B * G
  r_ids = rng.integers(0, cfg.vocab_size - 20, (R, TR)).astype(np.int32)
  r_mask = (np.arange(TR)[None] < np.array(resp_lens)[:, None]).astype(np.int32)
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
  tp, tr = d['ids'].shape[1], d['r_ids'].shape[1]
  return response_slice(out.hidden, tp, tr), {l: r['policy'] for l, r in out.record.items()}


def _shared(cfg, params, d, rows, layers):
  out = Qwen25VL(cfg).apply({'params': params}, d['ids'], d['pos'], d['mask'], d['r_ids'], d['r_pos'], d['r_mask'],
                            visual_embeds=d['vis'], record_rows=rows, record_layers=layers,
                            method=Qwen25VL.shared_prefix)
  return out.hidden, {l: r['policy'] for l, r in out.record.items()}


@pytest.fixture(scope='module')
def problem():
  cfg, d = _problem()
  return cfg, random_params(cfg, seed=3), d


def _value_and_grad(fn, cfg, params, d, rows, w_h, w_p):
  """A masked scalar of the response hidden states and every recorded policy, its gradient, and (hidden, policies)."""
  m = jnp.asarray(d['r_mask'], jnp.float32)[:, :, None]

  def f(p):
    h, rec = fn(cfg, p, d, rows, (1, -1))
    return jnp.sum(h * w_h * m) + sum(jnp.sum(r * w_p * m) for r in rec.values()), (h, rec)
  return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


@pytest.mark.parametrize('rows_kind,scan,remat,grads', [('response', True, 'nothing_saveable', True),
                                                         ('producing', False, 'none', False)])
def test_shared_forward_and_gradients_equal_full_forward(problem, rows_kind, scan, remat, grads):
  """Response hidden states and the record of a middle and the last layer (left-padded prompts with a different
  padding per group, right-padded responses, image tokens) equal the full forward's on the repeated rows, and so do
  the gradients of a scalar of both (the shared prompt gets the sum of its G rows' gradients)."""
  cfg, params, d = problem
  cfg = cfg.replace(scan_layers=scan, record_chunk=4, remat_policy=remat)
  rows = record_rows(B * G, TP, TR, rows_kind)
  rng = np.random.default_rng(7)
  w_h = jnp.asarray(rng.normal(size=(B * G, TR, cfg.hidden_size)), jnp.float32)
  w_p = jnp.asarray(rng.normal(size=(B * G, TR, TP + TR)), jnp.float32)
  if grads:
    (l_full, (h_full, rec_full)), g_full = _value_and_grad(_full, cfg, params, d, rows, w_h, w_p)
    (l_sh, (h_sh, rec_sh)), g_sh = _value_and_grad(_shared, cfg, params, d, rows, w_h, w_p)
  else:
    h_full, rec_full = jax.jit(lambda p: _full(cfg, p, d, rows, (1, -1)))(params)
    h_sh, rec_sh = jax.jit(lambda p: _shared(cfg, p, d, rows, (1, -1)))(params)
  assert h_sh.shape == (B * G, TR, cfg.hidden_size)
  np.testing.assert_allclose(np.asarray(h_sh), np.asarray(h_full), atol=1e-5, rtol=0)
  assert sorted(rec_sh) == sorted(rec_full) == [1, cfg.num_hidden_layers - 1]
  for l in rec_full:
    assert rec_sh[l].shape == (B * G, TR, TP + TR)
    np.testing.assert_allclose(np.asarray(rec_sh[l]), np.asarray(rec_full[l]), atol=1e-5, rtol=0)
    assert np.asarray(rec_full[l]).sum() > 0
  if not grads:
    return
  np.testing.assert_allclose(float(l_sh), float(l_full), rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_full), jax.tree.leaves(g_sh)):
    a, b, name = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
    assert np.abs(a).max() > 0 or 'lm_head' in name, name          # (the hidden states do not reach lm_head)
    np.testing.assert_allclose(b, a, atol=2e-5 * max(np.abs(a).max(), 1e-6), rtol=0, err_msg=name)


def test_prompts_are_not_mixed_up(problem):
  """Changing prompt 1's visual embeddings changes exactly rows 2 and 3 (b*G + g)."""
  cfg, params, d = problem
  fn = jax.jit(lambda p, d: _shared(cfg, p, d, None, (-1,))[0])
  base = np.asarray(fn(params, d))
  d2 = dict(d, vis=d['vis'].copy())
  d2['vis'][1] += 1.0
  got = np.asarray(fn(params, d2))
  changed = np.abs(got - base).max(axis=(1, 2)) > 1e-4
  np.testing.assert_array_equal(changed, [False, False, True, True, False, False])


@pytest.mark.skipif(jax.default_backend() != 'gpu',
                    reason='cuDNN attention needs an NVIDIA GPU: run with JAX_PLATFORMS=cuda (tests/conftest.py '
                           'defaults to cpu)')
def test_cudnn_shared_forward_matches_xla_full_forward():
  """The shared pass with attention_impl='cudnn' (packed prompt pass, dense-mask response rows), bf16, against the
  full forward with 'xla': response hidden states, record and gradients. On a GPU:
  JAX_PLATFORMS=cuda HF_HUB_OFFLINE=1 python -m pytest -q tests/test_step_shared_prompt.py -k cudnn"""
  tp, tr = 64, 32
  cfg, d = _problem(seed=4, prompt_lens=[64, 40], resp_lens=[32, 20, 7, 32], TP=tp, TR=tr, dtype='bfloat16')
  params = random_params(cfg, seed=6)
  rows = record_rows(2 * G, tp, tr, 'response')
  rng = np.random.default_rng(8)
  w_h = jnp.asarray(rng.normal(size=(2 * G, tr, cfg.hidden_size)), jnp.float32)
  w_p = jnp.asarray(rng.normal(size=(2 * G, tr, tp + tr)), jnp.float32)
  (_, (h_x, rec_x)), g_x = _value_and_grad(_full, cfg.replace(attention_impl='xla'), params, d, rows, w_h, w_p)
  (_, (h_c, rec_c)), g_c = _value_and_grad(_shared, cfg.replace(attention_impl='cudnn'), params, d, rows, w_h, w_p)
  m = d['r_mask'] == 1
  f32 = lambda a: np.asarray(a, np.float32)
  np.testing.assert_allclose(f32(h_c)[m], f32(h_x)[m], atol=0.05, rtol=0.05)
  for l in rec_x:
    np.testing.assert_allclose(f32(rec_c[l])[m], f32(rec_x[l])[m], atol=0.01)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_x), jax.tree.leaves(g_c)):
    a, b = f32(a), f32(b)
    # bf16: the shared prompt's gradient sums G cotangents in another order (xla vs xla: up to 3% of the max)
    np.testing.assert_allclose(b, a, atol=0.1 * max(np.abs(a).max(), 1e-6), err_msg=jax.tree_util.keystr(path))


# ---- the trainer's step functions (train/step.py) -------------------------------------------------------------------

STEP_PROMPTS = [10, 8, 9, 7]                       # 4 groups: 2 mini-batches x 2 micro-batches of one group each
STEP_RESP = [6, 3, 5, 1, 6, 4, 2, 6]


@pytest.fixture(scope='module')
def step_problem():
  from ral_jax.train.inputs import sequence_inputs
  cfg, d = _problem(seed=11, prompt_lens=STEP_PROMPTS, resp_lens=STEP_RESP)
  cfg = cfg.replace(remat_policy='nothing_saveable')
  x = sequence_inputs(jnp.asarray(d['ids']), jnp.asarray(d['mask']), jnp.asarray(d['pos']), jnp.asarray(d['r_ids']),
                      jnp.asarray(d['r_mask']), jnp.asarray(d['vis']), repeats=G)
  params = random_params(cfg, seed=5)
  ref = jax.tree.map(lambda a: a * 1.01, params)
  return cfg, x, jnp.asarray(d['r_ids']), jnp.asarray(d['r_mask']), params, ref


def _sc(cfg, share: bool):
  from ral_jax.rl.config import ObjectiveConfig
  from ral_jax.train.step import StepConfig
  return StepConfig(model_cfg=cfg, objective=ObjectiveConfig(), num_minibatches=2, micro_batches=2,
                    score_micro_batches=2, share_prompt=share, group_size=G)


def _score_and_update(sc, problem, adv):
  """The trainer's scoring pass, then one rl_update (SGD 0.5) from it: (old log-probs, old policy, reference
  log-probs, new parameters, metrics)."""
  import optax
  from ral_jax.rl.objective import RLBatch
  from ral_jax.train import step as ts
  from ral_jax.train.state import TrainState
  _, x, r_ids, r_mask, params, ref = problem
  tx = optax.sgd(0.5)
  old_lp, old_pol, ref_lp = jax.jit(lambda p, r: ts.score(sc, p, r, x, r_ids, need_ref=True))(params, ref)
  batch = RLBatch(response_ids=r_ids, response_mask=r_mask, advantages=adv, old_logprobs=old_lp,
                  ref_logprobs=ref_lp, old_policy=old_pol, key_mask=x.attention_mask)
  state = TrainState.create(params, tx, jax.random.PRNGKey(0))
  state, metrics = jax.jit(lambda s, b: ts.rl_update(sc, tx, s, x, b))(state, batch)
  return old_lp, old_pol, ref_lp, state.params, metrics


def test_score_and_update_equal_the_full_forward(step_problem):
  """Same whole-group splits; share_prompt only changes how the forward is computed: same scores, same update."""
  cfg, _, r_ids, _, params, _ = step_problem
  adv = jnp.asarray(np.random.default_rng(2).normal(size=r_ids.shape[0]), jnp.float32)
  (lp0, pol0, ref0, p0, m0), (lp1, pol1, ref1, p1, m1) = (
      _score_and_update(_sc(cfg, share), step_problem, adv) for share in (False, True))
  for a, b in ((lp0, lp1), (pol0, pol1), (ref0, ref1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
  assert float(m0['skipped']) == 0 and abs(float(m0['last/ral/jsd'])) > 0   # 2nd step: p_theta != p_old
  for k in m0:
    np.testing.assert_allclose(float(m1[k]), float(m0[k]), atol=1e-5, rtol=1e-4, err_msg=k)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), p0, params)
  assert max(jax.tree.leaves(moved)) > 1e-3
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p0), jax.tree.leaves(p1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_group_split_keeps_whole_groups_and_inverts():
  from ral_jax.train.step import merge_rows, split_rows
  x = jnp.arange(24).reshape(12, 2)                 # 6 groups of 2 rows
  s = split_rows(x, 3, group=2)
  assert s.shape == (3, 4, 2)
  np.testing.assert_array_equal(s[1][:, 0] // 2, [2, 3, 8, 9])   # groups 1 and 4 (b mod 3 == 1), rows b*G + g
  np.testing.assert_array_equal(merge_rows(s, group=2), x)
  np.testing.assert_array_equal(split_rows(x, 3), split_rows(x, 3, group=1))
  with pytest.raises(ValueError, match='rl.num_minibatches'):
    split_rows(x, 4, group=2, knob='rl.num_minibatches')     # 6 groups into 4 slices


def test_config_errors_name_the_knob():
  from configs import video
  from ral_jax.train import config as rc
  from ral_jax.train.config import RLConfig
  with pytest.raises(ValueError, match='rl.num_minibatches = 4'):
    RLConfig(prompts_per_batch=2, group_size=8, num_minibatches=4, share_prompt=True)
  with pytest.raises(ValueError, match='rl.num_minibatches \\* rl.micro_batches'):
    RLConfig(prompts_per_batch=4, group_size=8, num_minibatches=2, micro_batches=4, share_prompt=True)
  RLConfig(prompts_per_batch=4, group_size=8, num_minibatches=2, micro_batches=4)    # rows split: fine unshared
  c = video.get_config('tiny_ral')                  # 2 prompts, 2 mini-batches: one group per micro-batch
  c.rl.share_prompt = True
  c.mesh.shape = (2, 1, 1)
  with pytest.raises(ValueError, match='rl.share_prompt.*2 batch shards.*rl.micro_batches'):
    rc.build(c, num_devices=2)
  c.mesh.shape = (1, 1, 1)
  run = rc.build(c, num_devices=2)
  from ral_jax.train.build import step_config
  sc = step_config(run, run.model, 'rl')
  assert sc.share_prompt and sc.group_size == c.rl.group_size


def test_cast_once_matches_casting_at_every_use(step_problem):
  """bf16 compute over float32 parameters: the layers cast once per step (compute_params) give the scores of the
  per-use casts exactly and the same update; the embedding stays float32 and the new parameters keep their dtypes."""
  from ral_jax.models.vlm import compute_params
  cfg, _, r_ids, _, params, _ = step_problem
  cfg = cfg.replace(dtype='bfloat16')
  view = compute_params(params, cfg)
  assert {str(a.dtype) for a in jax.tree.leaves(view['model']['layers'])} == {'bfloat16'}
  assert view['model']['embed_tokens']['embedding'].dtype == jnp.float32
  assert compute_params(params, cfg.replace(dtype='float32')) is params
  adv = jnp.asarray(np.random.default_rng(3).normal(size=r_ids.shape[0]), jnp.float32)
  (lp0, pol0, ref0, p0, m0), (lp1, pol1, ref1, p1, m1) = (
      _score_and_update(dataclasses.replace(_sc(cfg, False), cast_once=once), step_problem, adv)
      for once in (False, True))
  for a, b in ((lp0, lp1), (pol0, pol1), (ref0, ref1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)
  assert float(m0['skipped']) == 0
  np.testing.assert_allclose(float(m1['grad_norm']), float(m0['grad_norm']), rtol=0.01)
  for (path, a), b, p in zip(jax.tree_util.tree_leaves_with_path(p0), jax.tree.leaves(p1), jax.tree.leaves(params)):
    assert b.dtype == p.dtype, jax.tree_util.keystr(path)
    step0, step1 = np.asarray(a - p, np.float32), np.asarray(b - p, np.float32)
    assert np.linalg.norm(step1 - step0) <= 0.02 * np.linalg.norm(step0) + 1e-7, jax.tree_util.keystr(path)


def test_accumulation_of_compute_dtype_gradients_runs_in_float32():
  """Gradients taken w.r.t. the bf16 view are summed over micro-batches in their parameters' float32 (a bf16 sum of
  100 micro-batches of 1.0 + 2^-7 rounds once it passes 32)."""
  from ral_jax.train.step import _accumulate
  params = {'w': jnp.ones((4,), jnp.float32)}
  view = {'w': params['w'].astype(jnp.bfloat16)}
  micro = jnp.full((100, 4), 1.0 + 2.0 ** -7, jnp.bfloat16)           # exactly representable in bf16
  loss_fn = lambda p, mb: (jnp.sum((p['w'] * mb).astype(jnp.float32)), {})
  _, g, _ = jax.jit(lambda v: _accumulate(loss_fn, v, micro, 100, grads_like=params))(view)
  assert g['w'].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(g['w']), 100 * (1.0 + 2.0 ** -7), rtol=1e-6)
