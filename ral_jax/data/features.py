"""One `Example` -> the unpadded arrays of one training example (runs inside Grain workers).

Output dict (ok record):
  prompt_ids [L] int32          chat prompt with every vision pad expanded to its merged-token count
  positions [3,L] int32         models.positions.rope_index over the (unpadded) prompt
  pixel_values [N,patch_dim] f32  all media patches, in media order (processor order inside each item)
  grid_thw [m,3] int32, media_kind [m] int32 (1 image, 2 video), second_per_grid_t [m] f32 (0 for images)
  target_ids [Lt] int32         (when DataConfig.with_targets) SFT response tokens + the end-of-turn token
  evidence_mask [L] int32        1 at vision pad tokens whose merged token overlaps the record's evidence
                                (data/evidence.py); all 0 without evidence.  has_evidence: int32 0/1
  id, answer, problem_type, options (JSON list), source, data_source, question: str
A bad record gives {'bad_reason', 'bad_detail', 'id', 'source'} instead (pipeline counts and drops it): a BadRecord
with its reason, or any other exception raised while processing that one record as 'processing_error' (type and
message kept), so one odd record never stops a run; the bad-fraction limit stops a run whose every record fails.
"""
from __future__ import annotations

import json
from typing import Dict, Optional

import numpy as np

from ral_jax.data import evidence as evidence_lib
from ral_jax.data import media, processor, prompts
from ral_jax.data.badinput import BadRecord
from ral_jax.data.records import Example

KIND_IDS = {'image': 1, 'video': 2}


class ExampleProcessor:
  """Picklable callable. encoder: tokenizer.TextEncoder (chat template + tokenisation without transformers)."""

  def __init__(self, dcfg, mcfg, encoder):
    self.dcfg, self.mcfg, self.enc = dcfg, mcfg, encoder

  def __call__(self, ex: Example) -> Dict:
    try:
      return self.process(ex)
    except BadRecord as e:
      return {'bad_reason': e.reason, 'bad_detail': e.detail, 'id': ex.id, 'source': ex.source}
    except Exception as e:  # noqa: BLE001 - per-record: counted as bad, never a crash inside a Grain worker
      return {'bad_reason': 'processing_error', 'bad_detail': f'{type(e).__name__}: {e}', 'id': ex.id,
              'source': ex.source}

  def load_media(self, ex: Example, orig_sizes: Optional[list] = None):
    """(patches, grid_thw, media_kind, second_per_grid_t); appends each item's original (H, W) to orig_sizes."""
    d = self.dcfg
    if len(ex.media) > d.max_media:
      raise BadRecord('media_over_budget', f'{len(ex.media)} media items, max_media is {d.max_media}', ex.id)
    patches, grids, kinds, spgt, sizes = [], [], [], [], []
    for kind, path in ex.media:
      pixels, sample_fps = ((media.load_image(path)[None], 0.0) if kind == 'image' else
                            media.load_video(path, d.video))
      try:  # smart_resize refuses empty media and aspect ratios above 200
        p, g = (processor.process_image(pixels[0], d.processor) if kind == 'image' else
                processor.process_video(pixels, d.processor))
      except ValueError as e:
        raise BadRecord('unsupported_media', f'{path}: {e}', ex.id) from e
      sec = d.processor.temporal_patch_size / sample_fps if kind == 'video' else 0.0
      patches.append(p)
      grids.append(g)
      kinds.append(KIND_IDS[kind])
      spgt.append(sec)
      sizes.append(pixels.shape[1:3])
    n = sum(len(p) for p in patches)
    if n > max(d.patch_buckets):
      raise BadRecord('media_over_budget', f'{n} patches > largest patch bucket {max(d.patch_buckets)}', ex.id)
    dim = d.processor.temporal_patch_size * d.processor.patch_size ** 2 * 3
    pixels = np.concatenate(patches) if patches else np.zeros((0, dim), np.float32)
    if orig_sizes is not None:
      orig_sizes.extend(sizes)
    return (pixels, np.asarray(grids, np.int32).reshape(-1, 3), np.asarray(kinds, np.int32),
            np.asarray(spgt, np.float32))

  def prompt_ids(self, ex: Example, grids, kinds) -> np.ndarray:
    d, enc = self.dcfg, self.enc
    question = prompts.format_question(ex.question, ex.options, ex.problem_type, d.prompt)
    names = ['image' if k == 1 else 'video' for k in kinds]
    ids = enc.encode(enc.render(prompts.build_messages(question, names, d.prompt)))
    counts = [processor.num_merged_tokens(tuple(g), d.processor) for g in grids]
    try:
      ids = prompts.expand_vision_pads(ids, (enc.ids.image_pad, enc.ids.video_pad), counts)
    except ValueError as e:  # e.g. a literal '<|image_pad|>' inside the question text
      raise BadRecord('malformed_record', str(e), ex.id) from e
    if len(ids) > max(d.prompt_buckets):
      raise BadRecord('prompt_over_budget', f'{len(ids)} prompt tokens > largest prompt bucket '
                      f'{max(d.prompt_buckets)}', ex.id)
    return ids.astype(np.int32)

  def target_ids(self, ex: Example) -> np.ndarray:
    d = self.dcfg
    if not ex.target:
      raise BadRecord('missing_target', 'record has no SFT target but with_targets is on', ex.id)
    text = prompts.strip_think(ex.target) if d.prompt.style == 'answer_only' else ex.target
    ids = self.enc.encode(text) + [self.enc.ids.end_of_turn]
    if len(ids) > max(d.target_buckets):
      raise BadRecord('target_over_budget', f'{len(ids)} target tokens > largest target bucket '
                      f'{max(d.target_buckets)}', ex.id)
    return np.asarray(ids, np.int32)

  def process(self, ex: Example) -> Dict:
    from ral_jax.models.positions import rope_index
    sizes = []
    pixels, grids, kinds, spgt = self.load_media(ex, sizes)
    ids = self.prompt_ids(ex, grids, kinds)
    out = {'prompt_ids': ids,
           'positions': rope_index(ids, np.ones_like(ids), grids, kinds, spgt, self.mcfg),
           'pixel_values': pixels, 'grid_thw': grids, 'media_kind': kinds, 'second_per_grid_t': spgt,
           'id': ex.id, 'answer': ex.answer, 'problem_type': ex.problem_type,
           'options': json.dumps(list(ex.options)), 'source': ex.source, 'data_source': ex.data_source,
           'question': ex.question}
    out.update(self.evidence(ex, ids, sizes, grids, spgt))
    if self.dcfg.with_targets:
      out['target_ids'] = self.target_ids(ex)
    return out

  def evidence(self, ex: Example, ids, sizes, grids, spgt) -> Dict:
    """{'evidence_mask' [L] int32 (1 = vision pad token on the evidence), 'has_evidence' int32 0/1}."""
    if not ex.evidence:
      return {'evidence_mask': np.zeros(len(ids), np.int32), 'has_evidence': np.int32(0)}
    pc = self.dcfg.processor
    tokens = evidence_lib.token_mask(ex.evidence, sizes, grids, spgt, pc.patch_size, pc.merge_size)
    mask = evidence_lib.prompt_evidence_mask(ids, (self.enc.ids.image_pad, self.enc.ids.video_pad), tokens)
    return {'evidence_mask': mask, 'has_evidence': np.int32(1)}
