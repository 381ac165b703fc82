"""Rollout engine (ral_jax/rollout/engine.py) on the tiny preset in float32, against the full (no-cache) forward."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax import sharding
from ral_jax.rollout import engine as rollout
from ral_jax.models import positions as positions_lib
from ral_jax.models import vision_inputs
from ral_jax.models.config import get_preset
from ral_jax.models.vlm import Qwen25VL, init_cache, init_params
from ral_jax.rl.logprobs import token_logprobs
from ral_jax.rollout.sampling import SamplingConfig, sample_keys, sample_tokens

CFG = get_preset('tiny')
V = CFG.vision
P = 64                      # padded patches per example
NV = P // V.merge_unit      # merged visual tokens per example (padded)
TP = 30                     # prompt bucket


def _media(kind):
  """Per-example media of two prompts: grids [2,1,3], kinds [2,1], seconds [2,1]."""
  if kind == 'text':
    return None
  if kind == 'image':
    grids, kinds, sec = [[(1, 4, 6)], [(1, 6, 4)]], [[1], [1]], [[0.0], [0.0]]
  else:
    grids, kinds, sec = [[(2, 4, 4)], [(3, 2, 4)]], [[2], [2]], [[1.0], [0.5]]
  return np.array(grids, np.int32), np.array(kinds, np.int32), np.array(sec, np.float32)


def _prompt_ids(rng, n_text, n_vis, kind_id):
  pre = list(rng.integers(0, 1000, 3))
  mid = [CFG.vision_start_token_id] + [kind_id] * n_vis + [CFG.vision_end_token_id] if n_vis else []
  return np.array(pre + mid + list(rng.integers(0, 1000, n_text)), np.int32)


@functools.lru_cache(maxsize=None)
def _params(with_vision: bool):
  if not with_vision:
    return init_params(CFG, jax.random.PRNGKey(0))
  grids = np.zeros((1, 1, 3), np.int32)
  grids[0, 0] = (1, 4, 4)
  meta = vision_inputs.build_vision_inputs_batch(grids, P, V)
  pix = jnp.zeros((1, P, V.patch_dim), jnp.float32)
  return init_params(CFG, jax.random.PRNGKey(0), vision_inputs=(pix, jax.tree.map(jnp.asarray, meta)))


@functools.lru_cache(maxsize=None)
def _batch(kind: str):
  """(params, prompts, visual_embeds) for two prompts of different lengths, text / image / video."""
  rng = np.random.default_rng({'text': 0, 'image': 1, 'video': 2}[kind])
  media = _media(kind)
  params = _params(media is not None)
  ids_list, pos_list = [], []
  for b, n_text in enumerate((4, 9)):
    if media is None:
      ids = np.array(rng.integers(0, 1000, 7 + 6 * b), np.int32)
      pos = np.broadcast_to(np.arange(len(ids)), (3, len(ids)))
    else:
      grids, kinds, sec = (m[b] for m in media)
      n_vis = int(sum(t * h * w for t, h, w in grids)) // V.merge_unit
      tok = CFG.image_token_id if kinds[0] == 1 else CFG.video_token_id
      ids = _prompt_ids(rng, n_text, n_vis, tok)
      pos = positions_lib.rope_index(ids, np.ones_like(ids), grids, kinds, sec, CFG)
    ids_list.append(ids)
    pos_list.append(pos)
  prompts = rollout.pad_prompts(ids_list, pos_list, TP)
  if media is None:
    return params, prompts, None
  grids, kinds, sec = media
  meta = vision_inputs.build_vision_inputs_batch(grids, P, V, media_kind=kinds)
  pix = np.zeros((2, P, V.patch_dim), np.float32)
  for b in range(2):
    n = int(sum(t * h * w for t, h, w in grids[b]))
    pix[b, :n] = rng.normal(size=(n, V.patch_dim))
  vis = Qwen25VL(CFG).apply({'params': params}, jnp.asarray(pix), jax.tree.map(jnp.asarray, meta),
                            method=Qwen25VL.encode_vision)
  return params, prompts, vis


@jax.jit
def _full_logits(params, ids, mask, pos, vis):
  return Qwen25VL(CFG).apply({'params': params}, ids, pos, mask, visual_embeds=vis).logits


def _full_sequence(prompts, tokens, mask):
  """prompt | response arrays of the training forward for rows repeated G times (tokens [R,Tr])."""
  G = tokens.shape[0] // prompts['prompt_ids'].shape[0]
  rep = lambda x, ax=0: np.repeat(np.asarray(x), G, axis=ax)
  Tr = tokens.shape[1]
  next_pos = positions_lib.text_positions_after(rep(prompts['positions'], 1), rep(prompts['prompt_mask']))
  resp_pos = next_pos[:, None] + np.arange(Tr)[None]
  ids = np.concatenate([rep(prompts['prompt_ids']), tokens], 1).astype(np.int32)
  am = np.concatenate([rep(prompts['prompt_mask']), mask], 1).astype(np.int32)
  pos = np.concatenate([rep(prompts['positions'], 1), np.broadcast_to(resp_pos, (3,) + resp_pos.shape)], 2)
  return ids, am, pos.astype(np.int32), G


def _greedy_reference(params, prompts, vis, Tr):
  """Repeated argmax of the full forward (no cache) over prompt | tokens so far."""
  B, Tp = prompts['prompt_ids'].shape
  tokens = np.zeros((B, Tr), np.int32)
  mask = np.zeros((B, Tr), np.int32)
  for j in range(Tr):
    ids, am, pos, _ = _full_sequence(prompts, tokens, mask)
    logits = np.asarray(_full_logits(params, ids, am, pos, vis))
    tokens[:, j] = logits[:, Tp - 1 + j].argmax(-1)
    mask[:, j] = 1
  return tokens


def _generate(kind, G=2, mesh=None, params=None, **kw):
  p0, prompts, vis = _batch(kind)
  sc = SamplingConfig(dtype='float32', **{'max_new_tokens': 6, **kw})
  return rollout.generate(params if params is not None else p0, CFG, prompts, vis, jax.random.PRNGKey(7), sc,
                          num_samples=G, mesh=mesh)


@pytest.mark.parametrize('kind', ['text', 'image', 'video'])
def test_greedy_equals_full_forward_argmax(kind):
  params, prompts, vis = _batch(kind)
  out = _generate(kind, G=2, greedy=True)
  want = _greedy_reference(params, prompts, vis, 6)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(want, 2, axis=0))
  assert (np.asarray(out.lengths) == 6).all() and (np.asarray(out.stop_reason) == rollout.STOP_MAX_LEN).all()
  assert (np.asarray(out.response_mask) == 1).all()


@pytest.mark.parametrize('kind', ['image', 'video'])
def test_logprobs_equal_teacher_forced(kind):
  params, prompts, vis = _batch(kind)
  temp = 0.7
  out = _generate(kind, G=3, temperature=temp, top_k=40, max_new_tokens=7)
  ids, am, pos, G = _full_sequence(prompts, np.asarray(out.tokens), np.asarray(out.response_mask))
  logits = _full_logits(params, ids, am, pos, jnp.repeat(vis, G, axis=0))
  Tp = prompts['prompt_ids'].shape[1]
  want = token_logprobs(logits[:, Tp - 1:-1], jnp.asarray(out.tokens), temperature=temp)
  m = np.asarray(out.response_mask).astype(bool)
  assert m.all()
  np.testing.assert_allclose(np.asarray(out.logprobs)[m], np.asarray(want)[m], atol=1e-4, rtol=0)
  assert len(set(map(tuple, np.asarray(out.tokens)[:3]))) > 1   # the G samples of a prompt differ


def test_stop_ids_end_rows_and_keep_other_rows():
  base = _generate('image', G=2)
  toks = np.asarray(base.tokens)
  stop = int(toks[0, 2])
  first = [int(np.flatnonzero(r == stop)[0]) if (r == stop).any() else None for r in toks]
  out = _generate('image', G=2, stop_ids=(stop, 1030), pad_id=3)
  t, lp, m = np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.response_mask)
  for r, f in enumerate(first):
    n = 6 if f is None else f + 1
    assert int(out.lengths[r]) == n
    assert int(out.stop_reason[r]) == (rollout.STOP_MAX_LEN if f is None else rollout.STOP_EOS)
    np.testing.assert_array_equal(t[r, :n], toks[r, :n])
    np.testing.assert_allclose(lp[r, :n], np.asarray(base.logprobs)[r, :n], atol=1e-6)
    assert (t[r, n:] == 3).all() and (lp[r, n:] == 0).all()
    np.testing.assert_array_equal(m[r], np.arange(6) < n)


def test_all_rows_stop_at_first_token():
  out = _generate('text', G=2, stop_ids=tuple(range(CFG.vocab_size)))
  assert (np.asarray(out.lengths) == 1).all() and (np.asarray(out.stop_reason) == rollout.STOP_EOS).all()
  assert (np.asarray(out.response_mask)[:, 1:] == 0).all()


def test_ignore_stop_runs_to_max_len():
  out = _generate('text', G=2, stop_ids=tuple(range(CFG.vocab_size)), ignore_stop=True)
  assert (np.asarray(out.lengths) == 6).all() and (np.asarray(out.stop_reason) == rollout.STOP_MAX_LEN).all()


def test_deterministic_per_seed():
  a, b = _generate('text', G=3), _generate('text', G=3)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  _, prompts, _ = _batch('text')
  c = rollout.generate(_params(False), CFG, prompts, None, jax.random.PRNGKey(8),
                       SamplingConfig(dtype='float32', max_new_tokens=6), num_samples=3)
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


@pytest.mark.parametrize('shape', [(1, 2, 4), (4, 1, 2)])   # (data, fsdp, tensor)
def test_samples_invariant_to_mesh(shape):
  mesh = sharding.make_mesh(shape)
  boxed = init_params(CFG, jax.random.PRNGKey(0), boxed=True)
  shards = sharding.logical_to_shardings(boxed, mesh, sharding.logical_rules())
  params = jax.device_put(nn.meta.unbox(boxed), shards)
  ref = _generate('text', G=4)
  out = _generate('text', G=4, mesh=mesh, params=params)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
  assert len(out.tokens.sharding.device_set) == 8


def test_prompt_errors_are_clear():
  ids = [np.arange(5), np.arange(31)]
  pos = [np.broadcast_to(np.arange(len(x)), (3, len(x))) for x in ids]
  with pytest.raises(ValueError, match='more than the prompt bucket'):
    rollout.pad_prompts(ids, pos, TP)
  params, prompts, vis = _batch('image')
  right = {k: np.flip(v, -1).copy() for k, v in prompts.items()}
  sc = SamplingConfig(dtype='float32', max_new_tokens=4)
  with pytest.raises(ValueError, match='left-padded'):
    rollout.generate(params, CFG, right, vis, jax.random.PRNGKey(0), sc)
  with pytest.raises(ValueError, match='pad tokens but visual_embeds'):
    rollout.generate(params, CFG, prompts, vis[:, :3], jax.random.PRNGKey(0), sc)
  with pytest.raises(ValueError, match='pad tokens but visual_embeds'):
    rollout.generate(params, CFG, prompts, None, jax.random.PRNGKey(0), sc)


def _reference_generate(params, prompts, vis, rng, sc, G):
  """The oracle loop: prefill the G-fold repeated prompts and step through the model's own stacked cached
  `__call__` (models/vlm.py), drawing with the engine's keys, one token per Python iteration."""
  model = Qwen25VL(rollout.sampler_config(CFG, sc))
  rep = lambda x, ax=0: jnp.repeat(jnp.asarray(x), G, axis=ax)
  ids, mask, pos = rep(prompts['prompt_ids']), rep(prompts['prompt_mask']), rep(prompts['positions'], 1)
  R, Tp = ids.shape
  step = jax.jit(lambda p, i, q, m, v, c: model.apply({'params': p}, i, q, m, visual_embeds=v, cache=c))
  out = step(params, ids, pos, mask, None if vis is None else rep(vis), init_cache(CFG, R, Tp + sc.max_new_tokens))
  next_pos = positions_lib.text_positions_after(pos, mask)
  rows = jnp.arange(R, dtype=jnp.int32)
  tokens, logprobs = [], []
  for j in range(sc.max_new_tokens):
    tok, lp = sample_tokens(out.logits[:, -1], sample_keys(rng, j, rows), sc)
    tokens.append(tok)
    logprobs.append(lp)
    p = jnp.broadcast_to((next_pos + j)[None, :, None], (3, R, 1)).astype(jnp.int32)
    out = step(params, tok[:, None], p, None, None, out.cache)
  return np.stack(tokens, 1), np.stack(logprobs, 1)


def test_decode_equals_model_cached_call():
  """The engine's per-layer loop (DecoderLayer.decode), also with a chunked prefill, draws the same samples as the
  model's stacked cached __call__."""
  params, prompts, vis = _batch('video')
  sc = SamplingConfig(dtype='float32', max_new_tokens=6, temperature=0.9)
  a = rollout.generate(params, CFG, prompts, vis, jax.random.PRNGKey(3), sc, num_samples=2)
  want_tok, want_lp = _reference_generate(params, prompts, vis, jax.random.PRNGKey(3), sc, 2)
  np.testing.assert_array_equal(np.asarray(a.tokens), want_tok)
  np.testing.assert_allclose(np.asarray(a.logprobs), want_lp, atol=1e-5)
  sc1 = SamplingConfig(dtype='float32', max_new_tokens=6, temperature=0.9, prefill_batch=1)   # chunked prefill
  c = rollout.generate(params, CFG, prompts, vis, jax.random.PRNGKey(3), sc1, num_samples=2)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(c.logprobs), atol=1e-5)


def test_prefill_keeps_one_prompt_cache_per_prompt():
  """The prefill writes B prompt caches [B,K,Tp,H] (not G copies, no response slots), the same whether it runs in
  one pass or in chunks of one prompt; the per-row response cache is not part of the prefilled state."""
  params, prompts, vis = _batch('image')
  B, Tp = prompts['prompt_ids'].shape
  G, K, H = 3, CFG.num_key_value_heads, CFG.head_dim
  states = [rollout.prefill(params, CFG, prompts, vis, jax.random.PRNGKey(0),
                            SamplingConfig(dtype='float32', max_new_tokens=5, prefill_batch=pb), num_samples=G)
            for pb in (0, 1)]
  for s in states:
    assert s.cache is None and s.tokens.shape == (B * G, 5)
    assert len(s.prompt_cache['k']) == len(s.prompt_cache['v']) == CFG.num_hidden_layers
    assert all(x.shape == (B, K, Tp, H) for x in s.prompt_cache['k'] + s.prompt_cache['v'])
    np.testing.assert_array_equal(np.asarray(s.prompt_cache['valid']), prompts['prompt_mask'].astype(bool))
  for a, b in zip(jax.tree.leaves(states[0].prompt_cache), jax.tree.leaves(states[1].prompt_cache)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
