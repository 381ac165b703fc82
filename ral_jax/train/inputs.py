"""Assembly of the step inputs from data batches and rollouts (host strings <-> device arrays).

Data batch (data/collate.py): prompt_ids [B,Tp] left-padded, prompt_mask, positions [3,B,Tp], pixel_values
[B,P,patch_dim], vision_meta, target_ids/target_mask [B,Tr] (SFT), answer/problem_type/options strings [B].
Sequences are `prompt | response` (INTERFACES.md): response token j gets M-RoPE position next_pos + j in all three
rows, next_pos = max prompt position + 1. RL rows are b*G + g (np.repeat order), matching the rollout.
"""
from __future__ import annotations

import json
from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ral_jax import sharding
from ral_jax.models.positions import text_positions_after
from ral_jax.train.step import ModelInputs

DEVICE_KEYS = ('prompt_ids', 'prompt_mask', 'positions', 'pixel_values', 'vision_meta', 'target_ids', 'target_mask',
               'evidence_mask', 'has_evidence')


def to_device(batch: Dict, mesh) -> Dict:
  """The array part of a data batch, split over the mesh's batch shards (positions on axis 1)."""
  arrays = {k: batch[k] for k in DEVICE_KEYS if k in batch}
  return sharding.shard_batch(arrays, mesh)


def sequence_inputs(prompt_ids, prompt_mask, positions, response_ids, response_mask, visual_embeds,
                    repeats: int = 1) -> ModelInputs:
  """ModelInputs of `prompt | response` for N = B * repeats rows (prompt row b serves rows b*repeats ..)."""
  rep = lambda x, axis=0: jnp.repeat(x, repeats, axis=axis) if repeats > 1 else x
  next_pos = text_positions_after(positions, prompt_mask)                          # [B]
  tr = response_ids.shape[1]
  resp_pos = next_pos[:, None] + jnp.arange(tr, dtype=jnp.int32)[None, :]           # [B,Tr]
  pos = jnp.concatenate([jnp.swapaxes(positions, 0, 1),
                         jnp.broadcast_to(resp_pos[:, None, :], (resp_pos.shape[0], 3, tr))], axis=2)
  return ModelInputs(
      input_ids=jnp.concatenate([rep(prompt_ids), response_ids], axis=1).astype(jnp.int32),
      positions=rep(pos).astype(jnp.int32),
      attention_mask=jnp.concatenate([rep(prompt_mask), response_mask], axis=1).astype(jnp.int32),
      visual_embeds=None if visual_embeds is None else rep(visual_embeds))


def visual_key_mask(input_ids, image_token_id: int, video_token_id: int):
  """[N,S] 1 where the key is an image/video token."""
  return ((input_ids == image_token_id) | (input_ids == video_token_id)).astype(jnp.int32)


def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray, stop_ids: Sequence[int]) -> List[str]:
  """Response strings for the reward functions: the tokens up to the length, the final stop token dropped,
  special tokens kept (the think/answer tags must survive)."""
  out = []
  stops = set(int(s) for s in stop_ids)
  for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
    ids = [int(t) for t in row[:int(n)]]
    if ids and ids[-1] in stops:
      ids = ids[:-1]
    out.append(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
  return out


def reward_records(batch: Dict) -> List[Dict]:
  """One record per prompt in the form rl.rewards expects (solution, problem_type, options)."""
  recs = []
  for ans, ptype, opts in zip(batch['answer'], batch['problem_type'], batch['options']):
    try:
      options = json.loads(str(opts)) if str(opts) else []
    except json.JSONDecodeError:
      options = []
    recs.append({'solution': str(ans), 'problem_type': str(ptype), 'options': options})
  return recs


def host_rows(x) -> np.ndarray:
  """A (possibly multi-host) batch-sharded array -> this process's rows as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)
