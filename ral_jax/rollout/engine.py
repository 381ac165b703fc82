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
                   split over ('data','fsdp'), the KV caches' kv heads over 'tensor', the prompt cache's B rows over
                   ('data','fsdp') too (each axis entry replicated where it does not divide: B may not divide the
                   mesh while R does), parameters keep the sharding they come with.
  -> RolloutOutput: tokens [B*G,Tr] int32 (pad_id after the end), logprobs [B*G,Tr] float32 (the sampler's
     log_softmax(logits / temperature) at each drawn token, untruncated by top-k/top-p, 0 after the end),
     response_mask [B*G,Tr] int32, lengths [B*G] int32 (stop token included), stop_reason [B*G] int32
     (STOP_EOS = 0: a stop id was drawn; STOP_MAX_LEN = 1: Tr tokens without a stop id).
  Row b*G + g is sample g of prompt b (np.repeat order).

How: one prefill per prompt ([B,Tp] through the model's cached forward, cache of Tp slots; in chunks of
`sampling.prefill_batch` prompts written into one [B,...] cache), the last logits repeated G times along the batch,
token 0 drawn; then a `lax.while_loop` over `SamplingState`, one token per iteration (models.vlm.decode_token, each
layer through `DecoderLayer.decode`): feed token j-1 (M-RoPE position next_pos + j - 1 in all three rows,
next_pos = max prompt position + 1, response slot j - 1), draw token j. The loop stops after Tr tokens or as soon as
every row is done.
KV cache layout (per layer; models.vlm.prompt_cache / response_cache):
  prompt cache   k, v [B,K,Tp,H], valid [B,Tp] (left padding): ONE copy per prompt, shared by its G samples, never
                 repeated; written by the prefill, read only by the decode loop (a non-donated argument);
  response cache k, v [R,K,Tr,H], valid [R,Tr]: per row, token j written at slot j; allocated inside the decode
                 program (zeros, the loop's carry), so it never crosses a program boundary.
Each decoded token attends over its prompt's slots and its own response slots with one softmax
(models.attention.attend_shared_prefix): the prompt keys and values are read once per prompt and step, not G times,
and the cache holds B*Tp + R*Tr slots instead of R*(Tp + Tr).
Tokens and log-probs are donated to the decode program and updated in place (the small [R] fields are not:
donating them gave wrong lengths on an H200 with jax 0.11.2, most likely because constant-folded prefill outputs
such as the all-ones lengths / stop_reason share a buffer; for the same reason the response cache, all zeros, is
not a prefill output); all lengths are arrays, so one compilation serves a (B, Tp, Tr, G) bucket. The tests check
the loop against the full forward and against a reference loop over the model's stacked cached `__call__` on the
G-fold repeated prompts (tests/test_rollout_engine.py).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict

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
  prompt_cache: models.vlm.prompt_cache's {'k': L x [B,K,Tp,H], 'v': ..., 'valid': [B,Tp] bool}, one copy per
               prompt shared by its G rows; read only (not carried by the loop).
  cache:       models.vlm.response_cache's {'k': L x [R,K,Tr,H], 'v': ..., 'valid': [R,Tr] bool}; None in the
               state `prefill` returns (the decode program allocates it).
  """
  step: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  done: jax.Array
  stop_reason: jax.Array
  next_pos: jax.Array
  prompt_cache: Dict[str, Any]
  cache: Dict[str, Any]


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
  """Rows axis over ('data','fsdp'), scalars replicated; KV caches (prompt [B,K,Tp,H], response [R,K,Tr,H]): kv
  heads over 'tensor'. `_constrain` drops an axis entry that does not divide its dim (e.g. B prompts on 8 devices)."""
  if x.ndim == 0:
    return P()
  if x.ndim == 4:   # vlm.prompt_cache / response_cache
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
    """[b,Tp] prompts -> (last logits [b,V] f32, per-layer prompt caches [b,K,Tp,H], one per prompt)."""
    b, Tp = prompt_ids.shape
    cache = init_cache(cfg, b, Tp, cfg.dtype)
    out = model.apply({'params': params}, prompt_ids, positions, prompt_mask, visual_embeds=visual_embeds,
                      return_hidden=True, cache=cache)
    logits = model.apply({'params': params}, out.hidden[:, -1:], method=Qwen25VL.logits_from_hidden)[:, 0]
    return logits, vlm.prompt_cache(out.cache)

  def prefill_fn(params, prompt_ids, prompt_mask, positions, visual_embeds, rng):
    params = _cast(params, dt)   # transient: freed when the prefill ends
    B, Tp = prompt_ids.shape
    C = sampling.prefill_batch or B
    if B % C:
      raise ValueError(f'sampling.prefill_batch={C} must divide the {B} prompts')
    if visual_embeds is not None:
      visual_embeds = visual_embeds.astype(dt)
    rep = lambda x, axis: jnp.repeat(x, G, axis=axis)
    chunks, prompt = [], None
    for c in range(B // C):
      sl = lambda x, axis=0: jax.lax.slice_in_dim(x, c * C, (c + 1) * C, axis=axis)
      vis = None if visual_embeds is None else sl(visual_embeds)
      logits_c, part = prefill_one(params, sl(prompt_ids), sl(prompt_mask), sl(positions, 1), vis)
      if B == C:
        prompt = part
      else:   # written in place into the [B,...] prompt caches, chunk after chunk
        if c == 0:
          prompt = jax.tree.map(lambda x: jnp.zeros((B,) + x.shape[1:], x.dtype), part)
        prompt = jax.tree.map(
            lambda full, p: jax.lax.dynamic_update_slice_in_dim(full, p, c * C, axis=0), prompt, part)
      chunks.append(logits_c)
    logits = jnp.concatenate(chunks, axis=0)
    R = B * G
    next_pos = rep(positions_lib.text_positions_after(positions, prompt_mask), 0)
    state = SamplingState(step=jnp.zeros((), jnp.int32), tokens=jnp.full((R, Tr), sampling.pad_id, jnp.int32),
                          logprobs=jnp.zeros((R, Tr), jnp.float32), lengths=jnp.zeros((R,), jnp.int32),
                          done=jnp.zeros((R,), bool), stop_reason=jnp.full((R,), STOP_MAX_LEN, jnp.int32),
                          next_pos=next_pos, prompt_cache=prompt, cache=None)
    state = _constrain_state(state, mesh)
    tok, lp = _sample(rep(logits, 0), rng, 0, sampling)
    return _constrain_state(_record_token(state, tok, lp, sampling), mesh)

  def decode_fn(weights, prompt, big, small, rng):
    R = big[0].shape[0]
    state = small.replace(cache=vlm.response_cache(cfg, R, Tr, dt), tokens=big[0], logprobs=big[1])
    prompt = _constrain(prompt, mesh, _rows_spec)   # read only: closed over by the loop body, never carried

    def cond(s):
      return (s.step < Tr) & ~jnp.all(s.done)

    def body(s):
      prev = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1, keepdims=False)       # [R]
      pos = jnp.broadcast_to((s.next_pos + s.step - 1)[None, :, None], (3, R, 1)).astype(jnp.int32)
      slot = s.step - 1                                                 # response slot j - 1, the same for every row
      logits, cache = vlm.decode_token(weights, cfg, prompt, s.cache, prev, pos, slot)
      tok, lp = _sample(logits, rng, s.step, sampling)
      return _constrain_state(_record_token(s.replace(cache=cache), tok, lp, sampling), mesh)

    s = jax.lax.while_loop(cond, body, _constrain_state(state, mesh))
    mask = (jnp.arange(Tr, dtype=jnp.int32)[None, :] < s.lengths[:, None]).astype(jnp.int32)
    out = RolloutOutput(tokens=s.tokens, logprobs=s.logprobs, response_mask=mask, lengths=s.lengths,
                        stop_reason=s.stop_reason)
    return out, (s.tokens, s.logprobs)   # returned so that the donated buffers are updated in place

  weights_jit = jax.jit(weights_fn)
  prefill_jit = jax.jit(prefill_fn)
  # Only the large per-row arrays (tokens, log-probs) are donated: the small [R] fields of a prefilled state can be
  # constants (e.g. lengths and stop_reason are both all-ones), which must not be written in place; the prompt
  # cache is only read; the response cache lives inside the decode program.
  decode_jit = jax.jit(decode_fn, donate_argnums=(2,))

  def weights(*args):
    with ctx():
      return weights_jit(*args)

  def prefill(*args):
    with ctx():
      return prefill_jit(*args)

  def decode(weights, state, rng):
    big = (state.tokens, state.logprobs)
    small = state.replace(cache=None, tokens=None, logprobs=None, prompt_cache=None)
    with ctx():
      out, _ = decode_jit(weights, state.prompt_cache, big, small, rng)
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
  """Runs the decode loop on a prefilled state (its tokens and log-probs are donated: do not reuse `state`); weights
  from `sampler_weights`."""
  _, _, dec = _programs(sampler_config(cfg, sampling), sampling, num_samples, mesh, rules)
  return dec(weights, state, rng)


def generate(params, cfg, prompts, visual_embeds, rng, sampling: sampling_lib.SamplingConfig,
             num_samples: int = 1, *, mesh=None, rules=None) -> RolloutOutput:
  """G = num_samples responses per prompt; see the module docstring for arguments and outputs."""
  state = prefill(params, cfg, prompts, visual_embeds, rng, sampling, num_samples, mesh=mesh, rules=rules)
  weights = sampler_weights(params, cfg, sampling, num_samples, mesh=mesh, rules=rules)
  return decode(weights, cfg, state, rng, sampling, num_samples, mesh=mesh, rules=rules)
