"""Evidence regions of a record and the visual tokens they fall on.

Manifest field (optional, both formats): `"evidence": [{"media": i, "box": [x0, y0, x1, y1]}, ...]`, the box in the
original media's pixels (x right, y down, x0 < x1, y0 < y1), plus `"t": [start_s, end_s]` in seconds for a video
item (no "t": every frame). A record without the field has no evidence; a malformed field makes the record bad
('malformed_evidence').

Mapping to merged visual tokens (the tokens the decoder sees; INTERFACES.md 'Vision inputs'), for media item i with
original size H0 x W0 and grid (t, h, w) in patches (data/processor.py):
  - the processor resized the item to (h * p) x (w * p) pixels, so the box scales by (w p / W0, h p / H0);
  - merged token (ti, hi, wi) (index (ti * h/m + hi) * w/m + wi inside the item, items in media order) covers
    pixels [wi F, (wi+1) F) x [hi F, (hi+1) F), F = p * m, and, for a video, the seconds
    [ti * s, (ti + 1) * s) with s = second_per_grid_t = temporal_patch / sample_fps (the model's own time index:
    sampled frame j stands for [j / sample_fps, (j+1) / sample_fps));
  - a token is on the evidence when both its pixel square and (video) its time span overlap the box and [t0, t1]
    with positive length (a box edge on a token border does not count; for time, an instant t0 == t1 counts the
    token whose span contains it).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import numpy as np

from ral_jax.data.badinput import BadRecord


@dataclasses.dataclass(frozen=True)
class Evidence:
  media: int                                   # index into the record's media list
  box: Tuple[float, float, float, float]       # x0, y0, x1, y1 in original pixels
  t: Optional[Tuple[float, float]] = None      # start, end seconds (video only)


def _numbers(v, n):
  if not isinstance(v, (list, tuple)) or len(v) != n:
    return None
  if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
    return None
  return tuple(float(x) for x in v)


def parse_evidence(raw, media_kinds: Sequence[str], rid: str = '', source: str = '') -> Tuple[Evidence, ...]:
  """The record's `evidence` value -> Evidence tuple (None or absent -> ()). media_kinds: 'image'|'video' per
  media item of the record. Raises BadRecord('malformed_evidence') naming what is wrong."""
  if raw is None:
    return ()

  def bad(why):
    return BadRecord('malformed_evidence', f'evidence {why}', rid, source)

  if not isinstance(raw, list):
    raise bad(f'must be a list of {{"media", "box"[, "t"]}} objects, got {type(raw).__name__}')
  out = []
  for k, e in enumerate(raw):
    if not isinstance(e, dict) or set(e) - {'media', 'box', 't'}:
      raise bad(f'[{k}] must be an object with keys media, box and optionally t')
    i = e.get('media')
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(media_kinds):
      raise bad(f'[{k}].media={i!r} is not an index into the record\'s {len(media_kinds)} media items')
    box = _numbers(e.get('box'), 4)
    if box is None or not (box[0] < box[2] and box[1] < box[3]) or min(box) < 0:
      raise bad(f'[{k}].box={e.get("box")!r} must be [x0, y0, x1, y1] with 0 <= x0 < x1 and 0 <= y0 < y1')
    t = None
    if 't' in e:
      if media_kinds[i] != 'video':
        raise bad(f'[{k}] has "t" but media {i} is an image')
      t = _numbers(e['t'], 2)
      if t is None or not 0 <= t[0] <= t[1]:
        raise bad(f'[{k}].t={e["t"]!r} must be [start_s, end_s] with 0 <= start <= end')
    out.append(Evidence(i, box, t))
  return tuple(out)


def item_token_mask(boxes: Sequence[Evidence], orig_hw: Tuple[int, int], grid: Tuple[int, int, int],
                    patch: int, merge: int, second_per_grid_t: float = 0.0) -> np.ndarray:
  """bool [t * h/m * w/m] merged tokens of one media item that overlap any of `boxes` (all for this item)."""
  t, h, w = (int(v) for v in grid)
  hm, wm, f = h // merge, w // merge, patch * merge
  mask = np.zeros((t, hm, wm), bool)
  sy, sx = h * patch / orig_hw[0], w * patch / orig_hw[1]
  lo_x, lo_y = np.arange(wm) * f, np.arange(hm) * f
  for e in boxes:
    x0, y0, x1, y1 = e.box[0] * sx, e.box[1] * sy, e.box[2] * sx, e.box[3] * sy
    cols = (lo_x < x1) & (lo_x + f > x0)
    rows = (lo_y < y1) & (lo_y + f > y0)
    if e.t is None or second_per_grid_t <= 0:
      times = np.ones(t, bool)
    else:
      start = np.arange(t) * second_per_grid_t
      end = start + second_per_grid_t
      t0, t1 = e.t
      times = (start < t1) & (end > t0) if t1 > t0 else (start <= t0) & (end > t0)
    mask |= times[:, None, None] & rows[None, :, None] & cols[None, None, :]
  return mask.reshape(-1)


def token_mask(evidence: Sequence[Evidence], orig_sizes, grids, spgt, patch: int, merge: int) -> np.ndarray:
  """bool [sum of merged tokens over the media items], in the order of the prompt's vision pad tokens."""
  parts = []
  for i, (hw, g) in enumerate(zip(orig_sizes, grids)):
    parts.append(item_token_mask([e for e in evidence if e.media == i], tuple(hw), tuple(g), patch, merge,
                                 float(spgt[i])))
  return np.concatenate(parts) if parts else np.zeros((0,), bool)


def prompt_evidence_mask(prompt_ids: np.ndarray, vision_pad_ids: Sequence[int], tokens: np.ndarray) -> np.ndarray:
  """int32 [L] over the prompt: 1 at the vision pad positions whose merged token is on the evidence."""
  ids = np.asarray(prompt_ids)
  pos = np.flatnonzero(np.isin(ids, np.asarray(vision_pad_ids)))
  if len(pos) != len(tokens):
    raise ValueError(f'{len(pos)} vision pad tokens in the prompt but {len(tokens)} merged visual tokens')
  out = np.zeros(len(ids), np.int32)
  out[pos[np.asarray(tokens, bool)]] = 1
  return out
