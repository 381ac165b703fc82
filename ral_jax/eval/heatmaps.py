"""Pictures of the attention policy: visual-token attention mapped back to patches and overlaid on the pixels.

The recorded policy row of a response token (models.vlm, ral_jax/docs/method.md Eq. 2) is a distribution over all
earlier positions. Its entries at the image/video pad tokens are the attention on visual tokens: the k-th such
position is merged visual token k of the example (INTERFACES.md, Vision inputs). Merged tokens come media
after media, each in (t, h/m, w/m) row-major order, where t counts temporal patches (`temporal_patch_size` frames
each) and one merged token covers m x m patches, i.e. (m * patch_size)^2 pixels (28 x 28 for Qwen2.5-VL).

The pixels are rebuilt from `pixel_values` (HF patch order, normalised with the processor's mean/std), so the
picture shows exactly what the model saw. One PNG per image, one per temporal patch of a video (labelled with its
frames). Colours are scaled by the largest visual weight of the whole example, so all frames and media items of
one example share one scale (uniform attention looks uniform), shown by a colour bar; the title gives the item's
share of the row's total attention mass. Optional: the evidence (the merged tokens the record's `evidence` falls
on, data/evidence.py) outlined in white, and a caption (question, reference answer, the model's answer, correct
or not).

Entry points: `answer_visual_attention` (policy rows -> [Nv]), `render` (one example -> PNG files and RGB
arrays) and `render_batch` (the first few examples of a model batch and record; what the trainer calls every E
steps, optionally also writing TensorBoard images).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def media_items(grid_thw, media_kind=None) -> List[Tuple[int, int, int, int]]:
  """[(kind, t, h, w)] of the real media items of one example (rows with t*h*w == 0 or kind 0 dropped)."""
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  kinds = np.ones(len(grid), np.int64) if media_kind is None else np.asarray(media_kind).reshape(-1)
  return [(int(k), int(t), int(h), int(w)) for k, (t, h, w) in zip(kinds, grid) if k != 0 and t * h * w > 0]


def answer_visual_attention(policy, input_ids, row_weights, visual_token_ids: Sequence[int]) -> np.ndarray:
  """Weighted mean of policy rows, restricted to the visual key positions.

  policy [R, S]: recorded rows of one example; input_ids [S]: its token ids; row_weights [R]: e.g. the response
  mask (average over the answer) or a one-hot (one chosen response token). Returns [Nv] in merged-token order:
  the attention mass each visual token receives (not renormalised; its sum is the visual share of attention).
  """
  policy = np.asarray(policy, np.float64)
  w = np.asarray(row_weights, np.float64).reshape(-1)
  if policy.ndim != 2 or w.shape[0] != policy.shape[0]:
    raise ValueError(f'policy must be [R,S] and row_weights [R]; got {policy.shape} and {w.shape}')
  if w.sum() <= 0:
    raise ValueError('row_weights select no row: pass the response mask or a one-hot of a response token')
  row = (w[:, None] * policy).sum(0) / w.sum()
  ids = np.asarray(input_ids).reshape(-1)
  if ids.shape[0] != row.shape[0]:
    raise ValueError(f'input_ids has {ids.shape[0]} positions but the policy has {row.shape[0]} keys')
  return row[np.isin(ids, np.asarray(visual_token_ids))]


def split_visual(attn_v, grid_thw, media_kind=None, merge: int = 2) -> List[np.ndarray]:
  """[Nv] merged-token attention -> one [t, h/m, w/m] array per real media item (padding tokens ignored)."""
  attn_v = np.asarray(attn_v, np.float64).reshape(-1)
  out, off = [], 0
  for _, t, h, w in media_items(grid_thw, media_kind):
    n = t * (h // merge) * (w // merge)
    if off + n > attn_v.shape[0]:
      raise ValueError(f'{attn_v.shape[0]} visual weights for media grids {np.asarray(grid_thw).tolist()} '
                       f'that need at least {off + n}: was the attention taken over the right input_ids?')
    out.append(attn_v[off:off + n].reshape(t, h // merge, w // merge))
    off += n
  return out


def frames_from_patches(pixel_values, grid_thw, media_kind=None, *, patch_size: int = 14, merge: int = 2,
                        temporal_patch: int = 2, channels: int = 3, mean=CLIP_MEAN, std=CLIP_STD) -> List[np.ndarray]:
  """Rebuilds uint8 frames [t * temporal_patch, h * patch, w * patch, 3] per media item from HF-order patches."""
  pv = np.asarray(pixel_values, np.float32)
  pdim = channels * temporal_patch * patch_size ** 2
  if pv.ndim != 2 or pv.shape[1] != pdim:
    raise ValueError(f'pixel_values must be [P, {pdim}]; got {pv.shape}')
  out, off = [], 0
  for _, t, h, w in media_items(grid_thw, media_kind):
    n = t * h * w
    x = pv[off:off + n].reshape(t, h // merge, w // merge, merge, merge, channels, temporal_patch, patch_size,
                                patch_size)
    # (t, hb, wb, mh, mw, C, tp, ph, pw) -> (t, tp, hb, mh, ph, wb, mw, pw, C)
    x = x.transpose(0, 6, 1, 3, 7, 2, 4, 8, 5).reshape(t * temporal_patch, h * patch_size, w * patch_size, channels)
    x = x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    out.append(np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8))
    off += n
  return out


def overlay(frame, heat, vmax: Optional[float] = None, alpha: float = 0.5, cmap: str = 'jet') -> np.ndarray:
  """Blends a [h', w'] heat map, upsampled to the frame, over a uint8 [H, W, 3] frame."""
  from matplotlib import colormaps
  from PIL import Image
  frame = np.asarray(frame, np.uint8)
  heat = np.asarray(heat, np.float32)
  vmax = float(heat.max()) if vmax is None else float(vmax)
  norm = heat / vmax if vmax > 0 else np.zeros_like(heat)
  up = Image.fromarray(norm.astype(np.float32), mode='F').resize((frame.shape[1], frame.shape[0]),
                                                                  Image.Resampling.NEAREST)
  colour = colormaps[cmap](np.clip(np.asarray(up), 0, 1))[..., :3] * 255.0
  return np.clip((1 - alpha) * frame + alpha * colour, 0, 255).astype(np.uint8)


def outline_cells(rgb, cells, cell: int, colour=(255, 255, 255)) -> np.ndarray:
  """Draws a 1-px outline around every True cell of `cells` [h', w'] (cells of cell x cell px) on a copy of rgb."""
  out = np.array(rgb, np.uint8, copy=True)
  for r, c in zip(*np.nonzero(np.asarray(cells, bool))):
    y0, x0 = r * cell, c * cell
    y1, x1 = min(y0 + cell, out.shape[0]) - 1, min(x0 + cell, out.shape[1]) - 1
    out[y0, x0:x1 + 1] = out[y1, x0:x1 + 1] = colour
    out[y0:y1 + 1, x0] = out[y0:y1 + 1, x1] = colour
  return out


def _save_png(path: str, rgb: np.ndarray, title: str, vmax: Optional[float] = None, cmap: str = 'jet',
              caption: str = ''):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import textwrap
  h, w = rgb.shape[:2]
  scale = max(1.0, 256.0 / max(h, w))
  width = int(w * scale / 7)
  lines = textwrap.wrap(title, max(16, width)) or ['']
  cap = ([l for part in caption.split('\n') for l in (textwrap.wrap(part, max(16, width + 10)) or [''])]
         if caption else [])
  top, bottom, bar = 14 * len(lines) + 6, 12 * len(cap) + (6 if cap else 0), (44 if vmax is not None else 0)
  H, W = h * scale + top + bottom, w * scale + bar
  fig = plt.figure(figsize=(W / 100, H / 100), dpi=100)
  ax = fig.add_axes([0, bottom / H, w * scale / W, h * scale / H])
  ax.imshow(rgb, interpolation='nearest')
  ax.axis('off')
  fig.text(0.5, 1 - 3 / H, '\n'.join(lines), ha='center', va='top', fontsize=8)
  if cap:
    fig.text(0.01, (bottom - 3) / H, '\n'.join(cap), ha='left', va='top', fontsize=7)
  if vmax is not None:
    from matplotlib import cm, colors
    cax = fig.add_axes([(w * scale + 6) / W, bottom / H + 0.05, 8 / W, h * scale / H * 0.9])
    sm = cm.ScalarMappable(norm=colors.Normalize(0.0, max(vmax, 1e-12)), cmap=cmap)
    cb = fig.colorbar(sm, cax=cax)
    cb.ax.tick_params(labelsize=6)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def render(out_dir: str, name: str, pixel_values, grid_thw, media_kind, attn_v, *, patch_size: int = 14,
           merge: int = 2, temporal_patch: int = 2, mean=CLIP_MEAN, std=CLIP_STD, title: str = '',
           total_mass: Optional[float] = None, alpha: float = 0.5, evidence_v=None,
           caption: str = '') -> Tuple[List[str], List[np.ndarray]]:
  """Writes `<out_dir>/<name>_m<j>[_t<k>].png` for one example; returns (paths, overlaid RGB uint8 images).

  pixel_values [P, patch_dim], grid_thw [M, 3], media_kind [M] (0 none, 1 image, 2 video), attn_v [Nv] (from
  `answer_visual_attention`). total_mass: the rows' total mass (1 for a normalised policy) for the share shown in
  the title; default the sum of attn_v's items. evidence_v [Nv] bool: merged tokens on the evidence (outlined in
  white, and their share of the visual mass added to the title). caption: text under the picture.
  """
  os.makedirs(out_dir, exist_ok=True)
  frames = frames_from_patches(pixel_values, grid_thw, media_kind, patch_size=patch_size, merge=merge,
                               temporal_patch=temporal_patch, channels=3, mean=mean, std=std)
  heats = split_visual(attn_v, grid_thw, media_kind, merge)
  kinds = [k for k, *_ in media_items(grid_thw, media_kind)]
  total = float(np.sum(attn_v)) if total_mass is None else float(total_mass)
  vmax = max((float(h.max()) for h in heats), default=0.0)      # one scale for the whole example
  ev = split_visual(np.asarray(evidence_v, np.float64), grid_thw, media_kind, merge) if evidence_v is not None else None
  if ev is not None:
    vis = float(np.sum(attn_v))
    ev_share = float(np.sum(np.asarray(attn_v)[np.asarray(evidence_v, bool)])) / vis if vis > 0 else 0.0
    title = f'{title} evidence {ev_share:.1%} of visual'.strip()
  paths, images = [], []
  for j, (kind, fr, heat) in enumerate(zip(kinds, frames, heats)):
    share = float(heat.sum()) / total if total > 0 else 0.0
    for k in range(heat.shape[0]):
      img = overlay(fr[k * temporal_patch], heat[k], vmax, alpha)
      if ev is not None:
        img = outline_cells(img, ev[j][k] > 0, patch_size * merge)
      suffix = f'_t{k}' if kind == 2 else ''
      label = f'frames {k * temporal_patch}-{(k + 1) * temporal_patch - 1}, ' if kind == 2 else ''
      path = os.path.join(out_dir, f'{name}_m{j}{suffix}.png')
      _save_png(path, img, f'{title} {label}visual share {share:.1%}'.strip(), vmax=vmax, caption=caption)
      paths.append(path)
      images.append(img)
  return paths, images


def render_batch(out_dir: str, tag: str, batch: Dict, policy, row_weights, cfg, examples: Sequence[int] = (0,),
                 tb_writer=None, step: Optional[int] = None, mean=CLIP_MEAN, std=CLIP_STD,
                 captions: Optional[Dict[int, str]] = None) -> Dict[int, List[str]]:
  """Heat maps of the first `examples` of a model batch, averaged over each one's weighted rows.

  batch: host arrays with 'input_ids' [B,S] (the sequence the record was taken on), 'pixel_values' [B,P,pd],
  'grid_thw' [B,M,3], 'media_kind' [B,M]. policy [B,R,S]: `out.record[layer]['policy']`; row_weights [B,R]: the
  response mask (whole answer) or a one-hot per example (one token). cfg: models.config.ModelConfig.
  Files: <out_dir>/<tag>_ex<b>_m<j>[_t<k>].png; with tb_writer (tensorboardX SummaryWriter) also images under
  'attention/<tag>_ex<b>_m<j>[_t<k>]' at `step`. With 'evidence_mask' [B,Tp] in batch (prompt positions, as
  data/collate.py gives it; the first Tp of S keys) the evidence tokens are outlined; captions {b: text}.
  """
  v = cfg.vision
  get = lambda a: np.asarray(a)  # noqa: E731  (jax arrays are fetched here)
  policy, row_weights = get(policy), get(row_weights)
  written = {}
  for b in examples:
    attn_v = answer_visual_attention(policy[b], get(batch['input_ids'])[b], row_weights[b],
                                     (cfg.image_token_id, cfg.video_token_id))
    name = f'{tag}_ex{b}'
    ev_v = None
    if 'evidence_mask' in batch and ('has_evidence' not in batch or get(batch['has_evidence'])[b]):
      ids = get(batch['input_ids'])[b]
      em = np.zeros(ids.shape[0], bool)
      e = get(batch['evidence_mask'])[b].astype(bool)
      em[:e.shape[0]] = e
      ev_v = em[np.isin(ids, (cfg.image_token_id, cfg.video_token_id))]
    paths, images = render(out_dir, name, get(batch['pixel_values'])[b], get(batch['grid_thw'])[b],
                           get(batch['media_kind'])[b], attn_v, patch_size=v.patch_size,
                           merge=v.spatial_merge_size, temporal_patch=v.temporal_patch_size, mean=mean, std=std,
                           title=f'{tag} ex{b}' + (f' step {step}' if step is not None else ''), total_mass=1.0,
                           evidence_v=ev_v, caption=(captions or {}).get(b, ''))
    written[b] = paths
    if tb_writer is not None:
      for p, img in zip(paths, images):
        tb_writer.add_image(f'attention/{os.path.splitext(os.path.basename(p))[0]}', img, step, dataformats='HWC')
  return written
