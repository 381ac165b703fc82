"""3-D M-RoPE position ids for Qwen2.5-VL sequences (host side, numpy).

The rule (original Qwen2.5-VL, ral_jax/docs/design.md), over the real tokens of one sequence (attention_mask == 1),
in order:
  - a text run starts at `start = (max position used so far) + 1` (0 at the beginning) and counts up by one in all
    three rows (t, h, w);
  - a vision block of one media item with grid (t, h, w) patches has t * (h/m) * (w/m) tokens (m = spatial merge
    size), laid out frame-major, row-major, and gets
        row t:  start + floor(i_t * second_per_grid_t * tokens_per_second)
        row h:  start + i_h          row w:  start + i_w
    where start is the position the block would have had as text. Images use second_per_grid_t = 0.
  - padding tokens (attention_mask == 0) get position 1 in all rows, as transformers does.
transformers 4.57 implements this except that it casts second_per_grid_t to an integer first (0.5 -> 0); this
module does not: floor is applied to the product, so fractional values are honoured. The product is computed in
float32 in the order (i_t * second_per_grid_t) * tokens_per_second, as the original (pre-truncation) PyTorch code
did, so that e.g. 10 * 0.7 * 2 gives 14 (float64 of the float32 0.7 would give 13.99... -> 13).

Media are given per example as `grid_thw [M,3]`, `media_kind [M]` (0 none / padding, 1 image, 2 video) and
`second_per_grid_t [M]`, in the order their pad-token blocks appear in the sequence (the data pipeline's order).
"""
from __future__ import annotations

import numpy as np

from ral_jax.models.config import ModelConfig

IMAGE, VIDEO = 1, 2


def _media_rows(grid_thw, media_kind, second_per_grid_t):
  grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  media_kind = np.asarray(media_kind, np.int64).reshape(-1)
  second_per_grid_t = np.asarray(second_per_grid_t, np.float32).reshape(-1)
  if not len(grid_thw) == len(media_kind) == len(second_per_grid_t):
    raise ValueError(f'grid_thw ({len(grid_thw)} rows), media_kind ({len(media_kind)}) and second_per_grid_t '
                     f'({len(second_per_grid_t)}) must have the same number of media rows M')
  bad = set(media_kind.tolist()) - {0, IMAGE, VIDEO}
  if bad:
    raise ValueError(f'media_kind values {sorted(bad)} unknown: use 0 (none), 1 (image), 2 (video)')
  keep = media_kind != 0
  return grid_thw[keep], media_kind[keep], second_per_grid_t[keep]


def rope_index(input_ids, attention_mask, grid_thw, media_kind, second_per_grid_t, cfg: ModelConfig) -> np.ndarray:
  """Position ids `[3,T]` int32 of one sequence (see the module docstring for the rule).

  Args:
    input_ids: [T] token ids (left or right padded; pads anywhere are skipped).
    attention_mask: [T] 1 for real tokens, 0 for padding.
    grid_thw: [M,3] patch grid (t, h, w) of each media item, in order of appearance; rows with media_kind 0 ignored.
    media_kind: [M] 0 none, 1 image, 2 video.
    second_per_grid_t: [M] seconds per temporal patch of each video (ignored for images).
    cfg: the model config (special token ids, vision.spatial_merge_size, vision.tokens_per_second).
  """
  input_ids = np.asarray(input_ids).reshape(-1)
  mask = np.asarray(attention_mask).reshape(-1).astype(bool)
  if input_ids.shape != mask.shape:
    raise ValueError(f'input_ids {input_ids.shape} and attention_mask {mask.shape} must have the same length T')
  grids, kinds, spgt = _media_rows(grid_thw, media_kind, second_per_grid_t)
  m = cfg.vision.spatial_merge_size
  tps = cfg.vision.tokens_per_second
  pad_ids = {IMAGE: cfg.image_token_id, VIDEO: cfg.video_token_id}
  is_pad = (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

  toks = input_ids[mask]
  tok_is_pad = is_pad[mask]
  n = len(toks)
  out = np.empty((3, n), np.int64)
  st, start = 0, 0  # st: index of the next unplaced real token; start: next free position
  for j, ((t, h, w), kind, sec) in enumerate(zip(grids, kinds, spgt)):
    if h % m or w % m or t < 1:
      raise ValueError(f'media {j}: grid_thw ({t}, {h}, {w}) needs t >= 1 and h, w divisible by '
                       f'spatial_merge_size {m}')
    hits = np.flatnonzero(tok_is_pad[st:])
    if not len(hits):
      raise ValueError(f'media {j} ({"image" if kind == IMAGE else "video"}): no image/video pad token left in '
                       f'input_ids after real-token index {st}; grid_thw lists more media than the sequence holds')
    ed = st + int(hits[0])
    if toks[ed] != pad_ids[kind]:
      raise ValueError(f'media {j}: media_kind says {"image" if kind == IMAGE else "video"} but the next pad block '
                       f'(real-token index {ed}) holds token {int(toks[ed])}; keep media rows in sequence order')
    gh, gw = h // m, w // m
    nv = t * gh * gw
    if ed + nv > n or not np.all(toks[ed:ed + nv] == pad_ids[kind]):
      raise ValueError(f'media {j}: grid_thw ({t}, {h}, {w}) needs {nv} consecutive pad tokens at real-token '
                       f'index {ed}; the sequence has fewer')
    text_len = ed - st
    out[:, st:ed] = start + np.arange(text_len)
    base = start + text_len
    sec = np.float32(sec if kind == VIDEO else 0.0)
    ti = np.floor((np.arange(t, dtype=np.float32) * sec) * np.float32(tps)).astype(np.int64)
    out[0, ed:ed + nv] = base + np.repeat(ti, gh * gw)
    out[1, ed:ed + nv] = base + np.tile(np.repeat(np.arange(gh), gw), t)
    out[2, ed:ed + nv] = base + np.tile(np.arange(gw), t * gh)
    start = int(out[:, st:ed + nv].max()) + 1
    st = ed + nv
  if np.any(tok_is_pad[st:]):
    raise ValueError(f'input_ids holds {int(tok_is_pad[st:].sum())} image/video pad tokens after the last media '
                     f'block: grid_thw / media_kind list fewer media than the sequence holds')
  out[:, st:] = start + np.arange(n - st)
  pos = np.ones((3, len(input_ids)), np.int64)
  pos[:, mask] = out
  if pos.max(initial=0) > np.iinfo(np.int32).max:
    raise ValueError('position ids overflow int32')
  return pos.astype(np.int32)


def rope_index_batch(input_ids, attention_mask, grid_thw, media_kind, second_per_grid_t,
                     cfg: ModelConfig) -> np.ndarray:
  """Batched `rope_index`: [B,T], [B,T], [B,M,3], [B,M], [B,M] -> [3,B,T] int32."""
  input_ids = np.asarray(input_ids)
  rows = [rope_index(input_ids[b], attention_mask[b], grid_thw[b], media_kind[b], second_per_grid_t[b], cfg)
          for b in range(input_ids.shape[0])]
  return np.stack(rows, axis=1)


def text_positions_after(positions, mask):
  """First position for text appended after a sequence: max(positions over real tokens) + 1 (0 if none).

  positions [3,T] with mask [T] -> scalar, or batched positions [3,B,T] with mask [B,T] -> [B]. Works on numpy
  arrays and on jax arrays (also under jit). Response token j then gets `next_pos + j` in all three rows.
  """
  if isinstance(positions, np.ndarray) and isinstance(mask, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # pylint: disable=import-outside-toplevel
  masked = xp.where(xp.asarray(mask).astype(bool)[None], xp.asarray(positions), -1)
  return (xp.max(masked, axis=(0, -1)) + 1).astype(xp.int32)
