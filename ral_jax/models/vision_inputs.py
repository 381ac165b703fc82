"""Host-side (numpy) metadata for the vision tower: rotary ids, attention chunks and validity per example.

Patch order (the HF processor's, `pixel_values [P, patch_dim]`): media items one after another; inside an item of
grid (t, h, w) patches, frame-major, then merge units row-major over the (h/m, w/m) merged grid, then the m x m
patches of the unit row-major (m = spatial_merge_size). Patch p of an item therefore sits at
  p = ((i_t * h/m + h_b) * w/m + w_b) * m^2 + h_i * m + w_i,   row = h_b * m + h_i,  col = w_b * m + w_i.
Rows beyond the items' total are padding (pixel values ignored, outputs zero).

Attention segments (transformers' Qwen2_5_VisionTransformerPretrainedModel, which reorders merge units by window,
attends within `cu_seqlens` segments and restores the order; attention is permutation-equivariant inside a
segment, so the tower keeps the processor order and only restricts who attends to whom):
  - windowed blocks: one segment per (item, frame, window), a window being ws x ws merge units with
    ws = window_size / (patch_size * m), windows tiled from the top-left of each frame (edge windows smaller);
  - full-attention blocks (`fullatt_block_indexes`): one segment per (item, frame).
To keep cost O(P * C) instead of O(P^2), segments are packed (first fit, full segments first) into NC chunks of C
slots; the tower gathers q/k/v into [NC, C], attends with a same-segment mask and scatters back. Static shapes:
  windowed:  C = ws^2 * m^2 (64 for Qwen2.5-VL),  NC = ceil(2P / C) (or 1 when C >= P)
  full:      C = full_chunk (default P: one chunk, a dense segment-masked attention), same NC rule.
First fit leaves at most one chunk half empty or less, so NC = ceil(2P / C) always suffices. `full_chunk` (a fixed
maximum frame size, e.g. the largest video frame's patch count) makes full blocks cheap for videos.

Keys of the returned dict (all int32, shapes depend only on P, the config and full_chunk):
  rope_ids [P,2]        (row, col) of each patch within its frame (0 for padding)
  valid [P]             1 for real patches
  win_index [NCw,Cw]    patch index gathered into each slot (0 in empty slots)
  win_segment [NCw,Cw]  segment id of each slot (-1 empty); equal ids attend to each other
  win_inverse [P]       flat slot (chunk * Cw + slot) holding each patch (0 for padding)
  full_index, full_segment, full_inverse: the same for full-attention blocks.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from ral_jax.models.config import VisionConfig


def window_merge_units(vcfg: VisionConfig) -> int:
  """Window side ws in merge units."""
  return vcfg.window_size // (vcfg.patch_size * vcfg.spatial_merge_size)


def num_chunks(num_patches: int, chunk: int) -> int:
  """Static chunk count that first-fit packing of segments of <= chunk patches never exceeds."""
  return 1 if chunk >= num_patches else math.ceil(2 * num_patches / chunk)


def _items(grid_thw, media_kind, m: int):
  grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  keep = np.prod(grid_thw, axis=1) > 0
  if media_kind is not None:
    keep &= np.asarray(media_kind).reshape(-1) != 0
  for j, (t, h, w) in enumerate(grid_thw):
    if keep[j] and (t < 1 or h % m or w % m):
      raise ValueError(f'grid_thw row {j} = ({t}, {h}, {w}): h and w must be multiples of spatial_merge_size {m}')
  return grid_thw[keep]


def _item_layout(t: int, h: int, w: int, m: int, ws: int):
  """Per patch of one item (processor order): row, col, frame, window id within the item."""
  gh, gw = h // m, w // m
  it, hb, wb, hi, wi = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), np.arange(m), np.arange(m),
                                   indexing='ij')
  row, col = (hb * m + hi).ravel(), (wb * m + wi).ravel()
  nwh, nww = -(-gh // ws), -(-gw // ws)
  window = ((it * nwh + hb // ws) * nww + wb // ws).ravel()
  return row, col, it.ravel(), window


def _pack(segments: List[np.ndarray], chunk: int, n_chunks: int, what: str):
  """First-fit packing of segments (arrays of patch indices) into [n_chunks, chunk] slots."""
  index = np.zeros((n_chunks, chunk), np.int64)
  seg_id = np.full((n_chunks, chunk), -1, np.int64)
  fill = np.zeros(n_chunks, np.int64)
  used = 0
  order = sorted(range(len(segments)), key=lambda s: len(segments[s]) != chunk)  # full segments first, stable
  for s in order:
    seg = segments[s]
    n = len(seg)
    if n > chunk:
      raise ValueError(f'{what}: a segment of {n} patches exceeds the chunk of {chunk}; raise full_chunk '
                       f'(it must be >= the largest frame, t*h*w/t patches)')
    if n == chunk:
      c = used
    else:
      free = np.flatnonzero(fill[:used] + n <= chunk)
      c = int(free[0]) if len(free) else used
    if c == used:
      used += 1
      if used > n_chunks:
        raise AssertionError(f'{what}: packing needed more than {n_chunks} chunks (bound violated)')
    index[c, fill[c]:fill[c] + n] = seg
    seg_id[c, fill[c]:fill[c] + n] = s
    fill[c] += n
  return index, seg_id


def _inverse(index, seg_id, num_patches: int):
  inv = np.zeros(num_patches, np.int64)
  flat_idx, flat_seg = index.ravel(), seg_id.ravel()
  slots = np.flatnonzero(flat_seg >= 0)
  inv[flat_idx[slots]] = slots
  return inv


def build_vision_inputs(grid_thw, num_patches: int, vcfg: VisionConfig, *, media_kind=None,
                        full_chunk: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Vision metadata of one example (see the module docstring for the keys and the chunk rules).

  Args:
    grid_thw: [M,3] (t, h, w) in patches per media item, in order; all-zero rows (or media_kind 0) are absent media.
    num_patches: P, the padded patch count of `pixel_values` (a multiple of spatial_merge_size^2).
    vcfg: the vision config.
    media_kind: optional [M]; rows with 0 are skipped.
    full_chunk: chunk length for full-attention blocks (default P); must be >= the largest frame's patch count.
  """
  m = vcfg.spatial_merge_size
  if num_patches % (m * m):
    raise ValueError(f'num_patches {num_patches} must be a multiple of spatial_merge_size^2 = {m * m}')
  items = _items(grid_thw, media_kind, m)
  total = int(np.prod(items, axis=1).sum()) if len(items) else 0
  if total > num_patches:
    raise ValueError(f'grid_thw needs {total} patches but num_patches (P) is {num_patches}: raise the patch '
                     f'bucket or shrink the media (grids {items.tolist()})')
  ws = window_merge_units(vcfg)
  win_c = ws * ws * m * m
  full_c = num_patches if full_chunk is None else int(full_chunk)
  rope = np.zeros((num_patches, 2), np.int64)
  valid = np.zeros(num_patches, np.int64)
  win_segs, full_segs = [], []
  off = 0
  for t, h, w in items:
    n = int(t * h * w)
    row, col, frame, window = _item_layout(int(t), int(h), int(w), m, ws)
    rope[off:off + n, 0], rope[off:off + n, 1] = row, col
    valid[off:off + n] = 1
    idx = np.arange(off, off + n)
    order = np.argsort(window, kind='stable')
    bounds = np.flatnonzero(np.diff(window[order])) + 1
    win_segs += np.split(idx[order], bounds)
    full_segs += np.split(idx, np.arange(1, t) * (h * w))
    off += n
  out = {'rope_ids': rope, 'valid': valid}
  for name, segs, c in (('win', win_segs, win_c), ('full', full_segs, full_c)):
    index, seg_id = _pack(segs, c, num_chunks(num_patches, c), f'{name} attention')
    out[f'{name}_index'], out[f'{name}_segment'] = index, seg_id
    out[f'{name}_inverse'] = _inverse(index, seg_id, num_patches)
  return {k: v.astype(np.int32) for k, v in out.items()}


def build_vision_inputs_batch(grid_thw, num_patches: int, vcfg: VisionConfig, *, media_kind=None,
                              full_chunk: Optional[int] = None) -> Dict[str, np.ndarray]:
  """`build_vision_inputs` for a batch: grid_thw [B,M,3] (media_kind [B,M]) -> dict of [B, ...] arrays."""
  grid_thw = np.asarray(grid_thw)
  rows = [build_vision_inputs(grid_thw[b], num_patches, vcfg, full_chunk=full_chunk,
                              media_kind=None if media_kind is None else np.asarray(media_kind)[b])
          for b in range(grid_thw.shape[0])]
  return stack_vision_inputs(rows)


def stack_vision_inputs(examples: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  """Stacks per-example metadata (same P and chunking) into a batch."""
  keys = examples[0].keys()
  for e in examples:
    if e.keys() != keys or any(e[k].shape != examples[0][k].shape for k in keys):
      raise ValueError('vision metadata of different shapes: build every example with the same num_patches and '
                       'full_chunk')
  return {k: np.stack([e[k] for e in examples]) for k in keys}
