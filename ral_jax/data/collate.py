"""Examples -> one padded batch (INTERFACES.md 'Sequence layout' and 'Vision inputs').

Each length is padded to the smallest configured bucket that holds the longest example of the batch, so jit sees
only len(prompt_buckets) x len(patch_buckets) (x len(target_buckets)) shapes:
  prompt_ids [B,Tp] int32   left-padded with the pad id;  prompt_mask [B,Tp] int32 (1 = real token)
  positions [3,B,Tp] int32  each example's rope_index, left-padded with 1 (transformers' value for pads)
  pixel_values [B,P,patch_dim] f32, zero rows after the real patches
  grid_thw [B,M,3] int32, media_kind [B,M] int32, second_per_grid_t [B,M] f32 (M = max_media; zero rows = none)
  vision_meta: models.vision_inputs.build_vision_inputs of each example for P, stacked ([B, ...] int32 arrays)
  target_ids [B,Tr] int32 right-padded with the pad id; target_mask [B,Tr] int32   (only with targets)
  evidence_mask [B,Tp] int32 left-padded with 0 (1 = visual token on the evidence); has_evidence [B] int32
  id, answer, problem_type, options, source, data_source, question: numpy unicode arrays [B]
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

STRING_KEYS = ('id', 'answer', 'problem_type', 'options', 'source', 'data_source', 'question')


def pick_bucket(n: int, buckets: Sequence[int], what: str) -> int:
  """Smallest bucket >= n."""
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f'{what} length {n} exceeds the largest bucket {max(buckets)}')


def _left_pad(rows, width: int, value: int) -> np.ndarray:
  out = np.full((len(rows), width), value, np.int32)
  for b, r in enumerate(rows):
    if len(r):
      out[b, width - len(r):] = r
  return out


def _right_pad(rows, width: int, value: int) -> np.ndarray:
  out = np.full((len(rows), width), value, np.int32)
  for b, r in enumerate(rows):
    out[b, :len(r)] = r
  return out


class Collator:
  """batch_fn for grain's .batch(): a list of features.ExampleProcessor outputs -> one batch dict."""

  def __init__(self, pad_id: int, prompt_buckets, patch_buckets, target_buckets, max_media: int, vcfg,
               full_chunk: Optional[int] = None):
    m2 = vcfg.spatial_merge_size ** 2
    bad = [p for p in patch_buckets if p % m2]
    if bad:
      raise ValueError(f'patch_buckets {bad} must be multiples of spatial_merge_size^2 = {m2}')
    self.pad_id, self.max_media, self.vcfg, self.full_chunk = pad_id, max_media, vcfg, full_chunk
    self.prompt_buckets, self.patch_buckets, self.target_buckets = prompt_buckets, patch_buckets, target_buckets

  def __call__(self, items: Sequence[Dict]) -> Dict[str, np.ndarray]:
    from ral_jax.models.vision_inputs import build_vision_inputs, stack_vision_inputs
    n = len(items)
    tp = pick_bucket(max(len(x['prompt_ids']) for x in items), self.prompt_buckets, 'prompt')
    p = pick_bucket(max(len(x['pixel_values']) for x in items), self.patch_buckets, 'patch')
    dim = items[0]['pixel_values'].shape[1]
    batch = {
        'prompt_ids': _left_pad([x['prompt_ids'] for x in items], tp, self.pad_id),
        'prompt_mask': _left_pad([np.ones(len(x['prompt_ids'])) for x in items], tp, 0),
        'positions': np.stack([_left_pad(list(x['positions']), tp, 1) for x in items], axis=1),
        'pixel_values': np.zeros((n, p, dim), np.float32),
        'grid_thw': np.zeros((n, self.max_media, 3), np.int32),
        'media_kind': np.zeros((n, self.max_media), np.int32),
        'second_per_grid_t': np.zeros((n, self.max_media), np.float32),
    }
    for b, x in enumerate(items):
      batch['pixel_values'][b, :len(x['pixel_values'])] = x['pixel_values']
      m = len(x['grid_thw'])
      batch['grid_thw'][b, :m] = x['grid_thw']
      batch['media_kind'][b, :m] = x['media_kind']
      batch['second_per_grid_t'][b, :m] = x['second_per_grid_t']
    batch['vision_meta'] = stack_vision_inputs([
        build_vision_inputs(batch['grid_thw'][b], p, self.vcfg, media_kind=batch['media_kind'][b],
                            full_chunk=self.full_chunk) for b in range(n)])
    if 'target_ids' in items[0]:
      tr = pick_bucket(max(len(x['target_ids']) for x in items), self.target_buckets, 'target')
      batch['target_ids'] = _right_pad([x['target_ids'] for x in items], tr, self.pad_id)
      batch['target_mask'] = _right_pad([np.ones(len(x['target_ids'])) for x in items], tr, 0)
    if 'evidence_mask' in items[0]:
      batch['evidence_mask'] = _left_pad([x['evidence_mask'] for x in items], tp, 0)
      batch['has_evidence'] = np.array([int(x['has_evidence']) for x in items], np.int32)
    for k in STRING_KEYS:
      batch[k] = np.array([str(x.get(k, '')) for x in items])
    return batch
