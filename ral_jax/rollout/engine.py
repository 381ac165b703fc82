"""Rollout engine: G sampled responses per prompt from a KV-cache decoder, jit-compiled and sharded.

API (the trainer calls `generate`; `prefill` / `sampler_weights` / `decode` are exposed for the benchmark):
  out = generate(params, cfg, prompts, visual_embeds, rng, sampling, num_samples=G, mesh=None, rules=None)
    params         the training parameters {'model', 'lm_head'[, 'visual']} ('visual' is ignored), not modified.
                   The prefill casts them to `sampling.dtype` inside its program (transient); the decode loop
                   runs on one per-layer copy in `sampling.dtype` made once per call (models.vlm.decode_weights:
                   the cast itself when training params are float32, an extra copy of the decoder when they are
                   already bfloat16).
    cfg            models.config.ModelConfig (its `dtype` is replaced by `sampling.dtype`).
    prompts        dict(prompt_ids [B,Tp] int32 left-padded, prompt_mask [B,Tp] 1 = real token,
                        positions [3,B,Tp] int32 M-RoPE ids from models.positions.rope_index).
    visual_embeds  [B,Nv,D] from Qwen25VL.encode_vision (computed once by the caller), or None for text prompts.
    rng            a PRNG key; sample i (row b*G+g) at step j draws with fold_in(fold_in(rng, j), i).
    sampling       sampling.SamplingConfig (Tr = max_new_tokens, stop ids, temperature, top-k/p, greedy).
    mesh, rules    optional: the ('data','fsdp','tensor') mesh and logical rules of ral_jax/sharding.py; rows are
                   split over ('data','fsdp'), the KV cache's kv heads over 'tensor' (replicated where they do not
                   divide), parameters keep the sharding they come with.
  -> RolloutOutput: tokens [B*G,Tr] int32 (pad_id after the end), logprobs [B*G,Tr] float32 (the sampler's
     log_softmax(logits / temperature) at each drawn token, untruncated by top-k/top-p, 0 after the end),
     response_mask [B*G,Tr] int32, lengths [B*G] int32 (stop token included), stop_reason [B*G] int32
     (STOP_EOS = 0: a stop id was drawn; STOP_MAX_LEN = 1: Tr tokens without a stop id).
  Row b*G + g is sample g of prompt b (np.repeat order).

How: one prefill per prompt ([B,Tp] through the model's cached forward, cache of Tp + Tr slots; in chunks of
`sampling.prefill_batch` prompts), the cache (split per layer, models.vlm.per_layer_cache) and the last logits
repeated G times along the batch, token 0 drawn; then a `lax.while_loop` over `SamplingState`, one token per
iteration (models.vlm.decode_token, each layer through `DecoderLayer.decode`): feed token j-1 (M-RoPE position
next_pos + j - 1 in all three rows, next_pos = max prompt position + 1, cache slot Tp + j - 1), draw token j. The loop stops after Tr tokens or as soon as every row is done.
The cache, tokens and log-probs are donated to the decode program and updated in place (the small [R] fields are
not: donating them gave wrong lengths on an H200 with jax 0.11.2, most likely because constant-folded prefill
outputs such as the all-ones lengths / stop_reason share a buffer); all lengths are arrays, so one compilation
serves a (B, Tp, Tr, G) bucket. The tests check the loop against the full forward and against a reference loop
over the model's stacked cached `__call__` (tests/test_rollout_engine.py).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ral_jax.models import positions as positions_lib
from ral_jax.models import vlm
from ral_jax.models.vlm import Qwen25VL, init_cache
from ral_jax.rollout import sampling as sampling_lib

STOP_EOS, STOP_MAX_LEN = 0, 1


@flax.struct.dataclass
class RolloutOutput:
  tokens: jax.Array          # [B*G,Tr] int32
  logprobs: jax.Array        # [B*G,Tr] float32
  response_mask: jax.Array   # [B*G,Tr] int32
  lengths: jax.Array         # [B*G] int32
  stop_reason: jax.Array     # [B*G] int32


@flax.struct.dataclass
class SamplingState:
  """Carry of the decode loop; R = B*G rows.

  step:        [] int32, j: tokens 0..j-1 of every row are decided (written or pad); the next iteration feeds
               token j-1 to the model and draws token j.
  tokens:      [R,Tr] int32, drawn tokens; pad_id at and after a row's end and at columns >= step.
  logprobs:    [R,Tr] float32, sampler log-probs of `tokens` (0 where no token).
  lengths:     [R] int32, tokens written so far (stop token included).
  done:        [R] bool, the row drew a stop id or reached Tr tokens.
  stop_reason: [R] int32, STOP_EOS or STOP_MAX_LEN (STOP_MAX_LEN until a stop id is drawn).
  next_pos:    [R] int32, M-RoPE position of response token 0 (all three rows).
  cache:       models.vlm.per_layer_cache's {'k': L x [R,K,Tp+Tr,H], 'v': ..., 'valid': [R,Tp+Tr] bool}.
  """
  step: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  done: jax.Array
  stop_reason: jax.Array
  next_pos: jax.Array
  cache: Dict[str, jax.Array]


# ---- host-side checks and helpers ---------------------------------------------------------------------------

def pad_prompts(ids_list, positions_list, bucket_len: int, pad_id: int = 0) -> Dict[str, np.ndarray]:
  """Left-pads B prompts (ids [n_b], positions [3,n_b]) into one bucket of length Tp = bucket_len.

  A prompt longer than the bucket is an error (never truncated): drop the record or use a larger bucket.
  Pads get id pad_id, mask 0 and position 1 (transformers' convention)."""
  B = len(ids_list)
  ids = np.full((B, bucket_len), pad_id, np.int32)
  mask = np.zeros((B, bucket_len), np.int32)
  pos = np.ones((3, B, bucket_len), np.int32)
  for b, (x, p) in enumerate(zip(ids_list, positions_list)):
    n = len(x)
    if n > bucket_len:
      raise ValueError(f'prompt {b} has {n} tokens, more than the prompt bucket Tp={bucket_len}: use a larger '
                       f'bucket or skip the record (prompts are never truncated)')
    if n == 0:
      raise ValueError(f'prompt {b} is empty')
    ids[b, bucket_len - n:] = x
    mask[b, bucket_len - n:] = 1
    pos[:, b, bucket_len - n:] = np.asarray(p).reshape(3, n)
  return dict(prompt_ids=ids, prompt_mask=mask, positions=pos)


def check_prompts(cfg, prompts, visual_embeds, num_samples: int) -> None:
  """Validates shapes (always) and, when the arrays are concrete, the left padding and the visual token count."""
  ids, mask, pos = prompts['prompt_ids'], prompts['prompt_mask'], prompts['positions']
  if ids.ndim != 2 or mask.shape != ids.shape or pos.shape != (3,) + tuple(ids.shape):
    raise ValueError(f'prompts: prompt_ids {ids.shape}, prompt_mask {mask.shape}, positions {pos.shape}; want '
                     f'[B,Tp], [B,Tp], [3,B,Tp]')
  if num_samples < 1:
    raise ValueError(f'num_samples={num_samples} must be >= 1')
  B = ids.shape[0]
  if visual_embeds is not None and (visual_embeds.ndim != 3 or visual_embeds.shape[0] != B
                                    or visual_embeds.shape[2] != cfg.hidden_size):
    raise ValueError(f'visual_embeds {visual_embeds.shape}: want [B={B}, Nv, D={cfg.hidden_size}]')
  if any(isinstance(a, jax.core.Tracer) or (isinstance(a, jax.Array) and not a.is_fully_addressable)
         for a in (ids, mask)):
    return   # traced, or spread over several hosts: the data pipeline checked each host's rows
  m = np.asarray(mask).astype(bool)
  x = np.asarray(ids)
  if not m[:, -1].all() or (np.diff(m.astype(np.int8), axis=1) < 0).any():
    raise ValueError('prompts must be left-padded: prompt_mask of each row is 0...0 1...1 with a real last token '
                     '(use rollout.pad_prompts)')
  n_vis = (((x == cfg.image_token_id) | (x == cfg.video_token_id)) & m).sum(axis=1)
  nv = 0 if visual_embeds is None else visual_embeds.shape[1]
  if (n_vis > nv).any():
    b = int(np.argmax(n_vis - nv))
    raise ValueError(f'prompt {b} holds {int(n_vis[b])} image/video pad tokens but visual_embeds has only Nv={nv} '
                     f'rows: pass the vision tower output for these prompts or raise the visual bucket')


# ---- sharding of the sampling state ---------------------------------------------------------------------------

def _constrain(tree, mesh, spec_fn):
  if mesh is None:
    return tree
  from ral_jax.sharding import fit_spec
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, fit_spec(spec_fn(x), x.shape, mesh))), tree)


def _rows_spec(x):
  """Rows axis over ('data','fsdp'), scalars replicated; KV caches [R,K,S,H]: kv heads over 'tensor'."""
  if x.ndim == 0:
    return P()
  if x.ndim == 4:   # vlm.per_layer_cache [R,K,S,H]
    return P(('data', 'fsdp'), 'tensor', None, None)
  return P(('data', 'fsdp'))


def _constrain_state(state: SamplingState, mesh) -> SamplingState:
  return _constrain(state, mesh, _rows_spec)


# ---- the jitted programs ----------------------------------------------------------------------------------------

def _record_token(s: SamplingState, tok, lp, sampling) -> SamplingState:
  """Writes token j = s.step of every still-active row and updates lengths / done / stop_reason."""
  j = s.step
  Tr = s.tokens.shape[1]
  active = ~s.done
  tok = jnp.where(active, tok, sampling.pad_id).astype(jnp.int32)
  lp = jnp.where(active, lp, 0.0).astype(jnp.float32)
  tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], j, axis=1)
  logprobs = jax.lax.dynamic_update_slice_in_dim(s.logprobs, lp[:, None], j, axis=1)
  if sampling.stop_ids and not sampling.ignore_stop:
    hit = active & jnp.isin(tok, jnp.asarray(sampling.stop_ids, jnp.int32))
  else:
    hit = jnp.zeros_like(active)
  return s.replace(step=j + 1, tokens=tokens, logprobs=logprobs, lengths=s.lengths + active.astype(jnp.int32),
                   done=s.done | hit | (j + 1 >= Tr), stop_reason=jnp.where(hit, STOP_EOS, s.stop_reason))


def _sample(logits, rng, step, sampling):
  rows = jnp.arange(logits.shape[0], dtype=jnp.int32)
  return sampling_lib.sample_tokens(logits, sampling_lib.sample_keys(rng, step, rows), sampling)


def _cast(params, dtype):
  conv = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(conv, {k: v for k, v in params.items() if k != 'visual'})


@functools.lru_cache(maxsize=32)
def _programs(cfg, sampling, num_samples: int, mesh, rules):
  """(weights, prefill, decode) jitted for one (model config, sampling config, G, mesh) combination."""
  model = Qwen25VL(cfg)
  G, Tr = num_samples, sampling.max_new_tokens
  dt = jnp.dtype(cfg.dtype)

  def ctx():
    if mesh is None:
      return contextlib.nullcontext()
    from ral_jax.sharding import mesh_context, logical_rules
    return mesh_context(mesh, rules if rules is not None else logical_rules())

  def weights_fn(params):
    return vlm.decode_weights(params, cfg, dt)

  def prefill_one(params, prompt_ids, prompt_mask, positions, visual_embeds):
    """[b,Tp] prompts -> (last logits [b,V] f32, per-layer caches with rows repeated G times)."""
    b, Tp = prompt_ids.shape
    cache = init_cache(cfg, b, Tp + Tr, cfg.dtype)
    out = model.apply({'params': params}, prompt_ids, positions, prompt_mask, visual_embeds=visual_embeds,
                      return_hidden=True, cache=cache)
    logits = model.apply({'params': params}, out.hidden[:, -1:], method=Qwen25VL.logits_from_hidden)[:, 0]
    return logits, vlm.per_layer_cache(out.cache, G)

  def prefill_fn(params, prompt_ids, prompt_mask, positions, visual_embeds, rng):
    params = _cast(params, dt)   # transient: freed when the prefill ends
    B, Tp = prompt_ids.shape
    C = sampling.prefill_batch or B
    if B % C:
      raise ValueError(f'sampling.prefill_batch={C} must divide the {B} prompts')
    if visual_embeds is not None:
      visual_embeds = visual_embeds.astype(dt)
    rep = lambda x, axis: jnp.repeat(x, G, axis=axis)
    chunks, cache = [], None
    for c in range(B // C):
      sl = lambda x, axis=0: jax.lax.slice_in_dim(x, c * C, (c + 1) * C, axis=axis)
      vis = None if visual_embeds is None else sl(visual_embeds)
      logits_c, part = prefill_one(params, sl(prompt_ids), sl(prompt_mask), sl(positions, 1), vis)
      if B == C:
        cache = part
      else:   # written in place into the full per-layer caches, chunk after chunk
        if c == 0:
          cache = jax.tree.map(lambda x: jnp.zeros((B * G,) + x.shape[1:], x.dtype), part)
        cache = jax.tree.map(
            lambda full, p: jax.lax.dynamic_update_slice_in_dim(full, p, c * C * G, axis=0), cache, part)
      chunks.append(logits_c)
    logits = jnp.concatenate(chunks, axis=0)
    R = B * G
    next_pos = rep(positions_lib.text_positions_after(positions, prompt_mask), 0)
    state = SamplingState(step=jnp.zeros((), jnp.int32), tokens=jnp.full((R, Tr), sampling.pad_id, jnp.int32),
                          logprobs=jnp.zeros((R, Tr), jnp.float32), lengths=jnp.zeros((R,), jnp.int32),
                          done=jnp.zeros((R,), bool), stop_reason=jnp.full((R,), STOP_MAX_LEN, jnp.int32),
                          next_pos=next_pos, cache=cache)
    state = _constrain_state(state, mesh)
    tok, lp = _sample(rep(logits, 0), rng, 0, sampling)
    return _constrain_state(_record_token(state, tok, lp, sampling), mesh)

  def decode_fn(weights, big, small, rng):
    state = small.replace(cache=big[0], tokens=big[1], logprobs=big[2])
    R = state.tokens.shape[0]

    def cond(s):
      return (s.step < Tr) & ~jnp.all(s.done)

    def body(s):
      prev = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1, keepdims=False)       # [R]
      pos = jnp.broadcast_to((s.next_pos + s.step - 1)[None, :, None], (3, R, 1)).astype(jnp.int32)
      slot = s.cache['valid'].shape[1] - Tr + s.step - 1                # Tp + j - 1, the same for every row
      logits, cache = vlm.decode_token(weights, cfg, s.cache, prev, pos, slot)
      tok, lp = _sample(logits, rng, s.step, sampling)
      return _constrain_state(_record_token(s.replace(cache=cache), tok, lp, sampling), mesh)

    s = jax.lax.while_loop(cond, body, _constrain_state(state, mesh))
    mask = (jnp.arange(Tr, dtype=jnp.int32)[None, :] < s.lengths[:, None]).astype(jnp.int32)
    out = RolloutOutput(tokens=s.tokens, logprobs=s.logprobs, response_mask=mask, lengths=s.lengths,
                        stop_reason=s.stop_reason)
    return out, (s.cache, s.tokens, s.logprobs)   # returned so that the donated buffers are updated in place

  weights_jit = jax.jit(weights_fn)
  prefill_jit = jax.jit(prefill_fn)
  # Only the large arrays (cache, tokens, log-probs) are donated: the small [R] fields of a prefilled state can be
  # constants (e.g. lengths and stop_reason are both all-ones), which must not be written in place.
  decode_jit = jax.jit(decode_fn, donate_argnums=(1,))

  def weights(*args):
    with ctx():
      return weights_jit(*args)

  def prefill(*args):
    with ctx():
      return prefill_jit(*args)

  def decode(weights, state, rng):
    big = (state.cache, state.tokens, state.logprobs)
    small = state.replace(cache=None, tokens=None, logprobs=None)
    with ctx():
      out, _ = decode_jit(weights, big, small, rng)
    return out
  return weights, prefill, decode


def sampler_config(cfg, sampling):
  """The model config the sampler runs: compute dtype = sampling.dtype, no rematerialisation."""
  return cfg.replace(dtype=sampling.dtype, remat_policy='none')


def sampler_weights(params, cfg, sampling, num_samples: int = 1, *, mesh=None, rules=None):
  """The decode weights: params cast to sampling.dtype once, as per-layer trees (models.vlm.decode_weights)."""
  w, _, _ = _programs(sampler_config(cfg, sampling), sampling, num_samples, mesh, rules)
  return w(params)


def prefill(params, cfg, prompts, visual_embeds, rng, sampling, num_samples: int = 1, *, mesh=None,
            rules=None) -> SamplingState:
  """Prefill (params cast inside, transiently) + token 0: the SamplingState that `decode` continues."""
  check_prompts(cfg, prompts, visual_embeds, num_samples)
  _, pre, _ = _programs(sampler_config(cfg, sampling), sampling, num_samples, mesh, rules)
  return pre(params, jnp.asarray(prompts['prompt_ids'], jnp.int32), jnp.asarray(prompts['prompt_mask'], jnp.int32),
             jnp.asarray(prompts['positions'], jnp.int32), visual_embeds, rng)


def decode(weights, cfg, state: SamplingState, rng, sampling, num_samples: int = 1, *, mesh=None,
           rules=None) -> RolloutOutput:
  """Runs the decode loop on a prefilled state (donated: do not reuse `state`); weights from `sampler_weights`."""
  _, _, dec = _programs(sampler_config(cfg, sampling), sampling, num_samples, mesh, rules)
  return dec(weights, state, rng)


def generate(params, cfg, prompts, visual_embeds, rng, sampling: sampling_lib.SamplingConfig,
             num_samples: int = 1, *, mesh=None, rules=None) -> RolloutOutput:
  """G = num_samples responses per prompt; see the module docstring for arguments and outputs."""
  state = prefill(params, cfg, prompts, visual_embeds, rng, sampling, num_samples, mesh=mesh, rules=rules)
  weights = sampler_weights(params, cfg, sampling, num_samples, mesh=mesh, rules=rules)
  return decode(weights, cfg, state, rng, sampling, num_samples, mesh=mesh, rules=rules)
