"""Full-model parity (issue 2 s.4) against transformers 4.57.6 (torch CPU, float32, eager attention).

A tiny random Qwen2.5-VL is written with `save_pretrained`, imported with `models.hf_io.load_hf`, and run through
our vision tower + decoder on: text only, one image, two images of different sizes, a video with 4 temporal patches
and second_per_grid_t = 2.0, and a left-padded and a right-padded batch mixing the four. Checked: 3-D position
ids equal transformers' get_rope_index; logits (real tokens) within 1e-4; the attention-policy rows of the last
layer (and of layer 0) within 1e-5 of transformers' `output_attentions` weights, head-averaged, self weight
dropped and renormalised over earlier keys here in the test (ral_jax/docs/method.md Eq. 2).
"""
import jax
import numpy as np
import pytest
import torch
import transformers

from ral_jax.models import hf_io, positions, vision_inputs
from ral_jax.models.config import get_preset
from ral_jax.models.vlm import Qwen25VL

CFG = get_preset('tiny')
V = CFG.vision
M = V.spatial_merge_size
R = 8  # recorded rows: the last R real positions of each sequence
EXAMPLES = {
    'text': [11],
    'image': [3, (1, (1, 4, 6), 0.0), 5],
    'two_images': [2, (1, (1, 6, 10), 0.0), 3, (1, (1, 8, 4), 0.0), 4],
    'video': [4, (2, (4, 4, 6), 2.0), 6],
}


def _init_(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, t in model.named_parameters():
      if t.ndim == 1 and ('norm' in name or 'ln_q' in name):
        t.copy_(1.0 + 0.1 * torch.randn_like(t))
      elif t.ndim == 1:
        t.copy_(0.1 * torch.randn_like(t))
      elif 'embed_tokens' in name:
        t.copy_(torch.randn_like(t))
      else:
        t.copy_(torch.randn_like(t) / np.sqrt(np.prod(t.shape[1:])))


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  hcfg = transformers.Qwen2_5_VLConfig(**CFG.to_hf())
  hcfg._attn_implementation = 'eager'
  hf = transformers.Qwen2_5_VLForConditionalGeneration(hcfg).eval()
  _init_(hf, 0)
  path = tmp_path_factory.mktemp('parity')
  hf.save_pretrained(path)
  cfg, params = hf_io.load_hf(str(path), dtype='float32', remat_policy='none', record_chunk=4)
  hf.config.vision_config._attn_implementation = 'eager'
  return hf, cfg, params


def _build(names, seed=0, T=48, P=192, Mx=2, side='left'):
  """Left- (or right-) padded batch of the named examples: HF kwargs and our inputs. Every case uses the same T,
  P and media slots, so the jitted model compiles once per batch size."""
  rng = np.random.default_rng(seed)
  seqs, media = [], []
  for n in names:
    ids, med = [], []
    for piece in EXAMPLES[n]:
      if isinstance(piece, int):
        ids += rng.integers(0, 1000, piece).tolist()
      else:
        kind, (t, h, w), sec = piece
        pad = CFG.image_token_id if kind == 1 else CFG.video_token_id
        ids += [CFG.vision_start_token_id] + [pad] * (t * h * w // M ** 2) + [CFG.vision_end_token_id]
        med.append((kind, (t, h, w), sec, rng.normal(size=(t * h * w, V.patch_dim)).astype(np.float32)))
    seqs.append(ids)
    media.append(med)
  B = len(names)
  assert max(len(s) for s in seqs) < T
  ids = np.zeros((B, T), np.int32)
  mask = np.zeros((B, T), np.int32)
  for b, s in enumerate(seqs):
    sl = slice(T - len(s), T) if side == 'left' else slice(0, len(s))
    ids[b, sl], mask[b, sl] = s, 1
  pix = np.zeros((B, P, V.patch_dim), np.float32)
  grid, kind, sec = np.zeros((B, Mx, 3), np.int32), np.zeros((B, Mx), np.int32), np.zeros((B, Mx), np.float32)
  for b, med in enumerate(media):
    off = 0
    for j, (k, g, s, px) in enumerate(med):
      pix[b, off:off + len(px)] = px
      off += len(px)
      grid[b, j], kind[b, j], sec[b, j] = g, k, s
  ours = dict(ids=ids, mask=mask, pix=pix, grid=grid, kind=kind, sec=sec, P=P)
  flat = [m for med in media for m in med]
  img, vid = [m for m in flat if m[0] == 1], [m for m in flat if m[0] == 2]
  hf = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
  if img:
    hf.update(pixel_values=torch.from_numpy(np.concatenate([m[3] for m in img])),
              image_grid_thw=torch.tensor([m[1] for m in img]))
  if vid:
    hf.update(pixel_values_videos=torch.from_numpy(np.concatenate([m[3] for m in vid])),
              video_grid_thw=torch.tensor([m[1] for m in vid]), second_per_grid_ts=torch.tensor([m[2] for m in vid]))
  return ours, hf


def _policy_rows(attn, rows):
  """transformers attention [B,N,T,T] -> Eq. 2 policy rows [B,R,T] (head mean, self dropped, renormalised)."""
  a = attn.mean(axis=1)
  out = np.zeros(rows.shape + (a.shape[-1],), np.float64)
  for b in range(rows.shape[0]):
    for r, t in enumerate(rows[b]):
      w = a[b, t, :t].astype(np.float64)
      out[b, r, :t] = w / w.sum()
  return out


_RUNS = {}


def _run(cfg):
  """One jitted vision + decoder forward with records of layers 0 and L-1 (cached across tests)."""
  if cfg not in _RUNS:
    model = Qwen25VL(cfg)

    @jax.jit
    def run(params, pix, meta, ids, pos, mask, rows):
      vis = model.apply({'params': params}, pix, meta, method=Qwen25VL.encode_vision)
      return model.apply({'params': params}, ids, pos, mask, visual_embeds=vis, record_rows=rows,
                         record_layers=(0, -1))
    _RUNS[cfg] = run
  return _RUNS[cfg]


@pytest.mark.parametrize('names,side', [(['text'], 'left'), (['image'], 'left'), (['two_images'], 'left'),
                                        (['video'], 'left'), (['text', 'image', 'two_images', 'video'], 'left'),
                                        (['video', 'two_images', 'text', 'image'], 'right')])
def test_matches_transformers(models, names, side):
  assert transformers.__version__ == '4.57.6', 'parity is pinned to transformers 4.57.6 (see module docstring)'
  hf, cfg, params = models
  ours, hf_in = _build(names, side=side)
  ids, mask = ours['ids'], ours['mask']
  B, T = ids.shape
  pos = positions.rope_index_batch(ids, mask, ours['grid'], ours['kind'], ours['sec'], cfg)
  want_pos, _ = hf.model.get_rope_index(hf_in['input_ids'], hf_in.get('image_grid_thw'), hf_in.get('video_grid_thw'),
                                        hf_in.get('second_per_grid_ts'), hf_in['attention_mask'])
  np.testing.assert_array_equal(pos, want_pos.numpy())

  with torch.no_grad():
    out = hf(**hf_in, output_attentions=True)
  want_logits = out.logits.numpy()
  last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)                     # last real position
  rows = (last[:, None] - np.arange(R - 1, -1, -1)[None, :]).astype(np.int32)

  meta = vision_inputs.build_vision_inputs_batch(ours['grid'], ours['P'], cfg.vision, media_kind=ours['kind'])
  res = _run(cfg)(params, ours['pix'], meta, ids, pos, mask, rows)
  real = mask.astype(bool)
  logits = np.asarray(res.logits)
  assert np.abs(want_logits[real]).max() > 1.0
  np.testing.assert_allclose(logits[real], want_logits[real], atol=1e-4, rtol=0)
  for layer, hf_layer in ((cfg.num_hidden_layers - 1, -1), (0, 0)):
    want = _policy_rows(out.attentions[hf_layer].numpy(), rows)
    got = np.asarray(res.record[layer]['policy'])
    assert got.shape == (B, R, T)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    assert (got[~np.broadcast_to(real[:, None, :], got.shape)] == 0).all()
