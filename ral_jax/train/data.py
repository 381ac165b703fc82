"""The trainer's data: synthetic tasks written into the workdir on first use, and Grain pipelines per stage.

Stages read: 'sft' (targets on, batch = sft.batch_size), 'rl' (prompts only, batch = rl.prompts_per_batch), and
'eval' (held-out prompts, one pass, a fixed list of batches). Batch sizes are global; each host reads
batch / process_count rows of its own shard (data.pipeline shards records by host). Iterator states
(`get_state()`) go into checkpoints so a resumed run continues from the same position.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Tuple

import jax
from absl import logging

from ral_jax.data import pipeline as pipeline_lib
from ral_jax.data import synthetic
from ral_jax.data.badinput import BadInputCounter
from ral_jax.data.media import VideoConfig
from ral_jax.data.processor import ProcessorConfig
from ral_jax.data.prompts import PromptConfig
from ral_jax.train.config import synthetic_tasks


def ensure_synthetic(config, workdir: str) -> Tuple[str, str]:
  """Writes <workdir>/synthetic/{train,heldout}.jsonl (+ media) once (process 0); returns their paths."""
  d = config.data
  out = os.path.join(workdir, 'synthetic')
  train, heldout = os.path.join(out, 'train.jsonl'), os.path.join(out, 'heldout.jsonl')
  done = os.path.join(out, 'DONE')
  if jax.process_index() == 0 and not os.path.exists(done):
    knobs = synthetic.Knobs(image_size=d.image_size, video_size=d.video_size, video_frames=d.video_frames,
                            object_size=d.object_size, num_distractors=d.num_distractors, fps=d.fps)
    tasks = synthetic_tasks(d.task)
    logging.info('writing synthetic tasks %s to %s', tasks, out)
    os.makedirs(out, exist_ok=True)
    synthetic.write_split(out, 'train', tasks, d.num_train, d.synthetic_seed, knobs)
    synthetic.write_split(out, 'heldout', tasks, d.num_eval, d.synthetic_seed, knobs)
    with open(done, 'w') as f:
      f.write('ok\n')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('synthetic data written')
  return train, heldout


def manifests(config, workdir: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
  d = config.data
  if d.source == 'synthetic':
    train, heldout = ensure_synthetic(config, workdir)
    return (train,), (heldout,)
  split = lambda s: tuple(p.strip() for p in s.split(',') if p.strip())
  return split(d.train_manifest), split(d.eval_manifest)


def data_config(config, model_cfg, files, batch_size: int, stage: str) -> pipeline_lib.DataConfig:
  d = config.data
  n_proc = jax.process_count()
  if batch_size % n_proc:
    raise ValueError(f'{stage} batch {batch_size} is not divisible by the {n_proc} hosts')
  style = 'answer_only' if config.rl.format == 'answer_only' else 'think'
  tok = d.tokenizer or config.model.hf_checkpoint or 'embedded'
  return pipeline_lib.DataConfig(
      manifests=tuple(files), data_root=d.data_root or None, tokenizer=tok, prompt=PromptConfig(style=style),
      processor=ProcessorConfig.from_vision(model_cfg.vision, image_min_pixels=d.image_min_pixels,
                                            image_max_pixels=d.image_max_pixels,
                                            video_min_pixels=d.video_min_pixels,
                                            video_max_pixels=d.video_max_pixels),
      video=VideoConfig(fps=d.fps, max_frames=d.max_frames, min_frames=d.min_frames),
      batch_size=batch_size // n_proc, prompt_buckets=tuple(d.prompt_buckets), patch_buckets=tuple(d.patch_buckets),
      target_buckets=tuple(d.target_buckets), max_media=d.max_media, with_targets=stage == 'sft',
      seed=config.seed + {'sft': 11, 'rl': 23, 'eval': 0}[stage], num_epochs=1 if stage == 'eval' else None,
      shard_index=jax.process_index(), shard_count=n_proc,
      num_workers=0 if stage == 'eval' else d.num_workers, read_threads=d.read_threads,
      max_bad_fraction=d.max_bad_fraction)


@dataclasses.dataclass
class StageData:
  pipeline: object
  iterator: object

  def next(self) -> Dict:
    return next(self.iterator)

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


def make_counter(config) -> BadInputCounter:
  """One bad-input counter for all of a run's pipelines: a manifest read by the SFT and the RL stage is counted
  once per line, and its bad fraction (data/badinput.py) is the one the limit applies to."""
  return BadInputCounter(config.data.max_bad_fraction)


def make_stage_data(config, model_cfg, files, batch_size: int, stage: str, counter=None) -> StageData:
  p = pipeline_lib.make_pipeline(data_config(config, model_cfg, files, batch_size, stage), model_cfg, counter)
  return StageData(p, iter(p.dataset))


def eval_batches(config, model_cfg, files, num_examples: int, batch_size: int, counter=None) -> List[Dict]:
  """A fixed list of held-out batches (read once, reused at every evaluation)."""
  if not files or num_examples <= 0:
    return []
  data = make_stage_data(config, model_cfg, files, batch_size, 'eval', counter)
  out = []
  for b in data.iterator:
    out.append(b)
    if len(out) * batch_size >= num_examples:
      break
  return out


def bad_input_metrics(*datas: StageData) -> Dict[str, float]:
  """Bad-input metrics of the stages' counters, each distinct counter once (stages of a run share one)."""
  out, done = {}, set()
  for d in datas:
    if d is not None and id(d.pipeline.counter) not in done:
      done.add(id(d.pipeline.counter))
      for k, v in d.pipeline.counter.metrics().items():
        out[k] = max(out.get(k, 0.0), float(v)) if k.endswith('bad_fraction') else out.get(k, 0.0) + float(v)
  return out
