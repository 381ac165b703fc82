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
from ral_jax.train.config import DataSettings, RunConfig


def ensure_synthetic(data: DataSettings, workdir: str) -> Tuple[str, str]:
  """Writes <workdir>/synthetic/{train,heldout}.jsonl (+ media) once (process 0); returns their paths."""
  out = os.path.join(workdir, 'synthetic')
  train, heldout = os.path.join(out, 'train.jsonl'), os.path.join(out, 'heldout.jsonl')
  done = os.path.join(out, 'DONE')
  if jax.process_index() == 0 and not os.path.exists(done):
    knobs = synthetic.Knobs(**dict(data.synthetic_knobs))
    logging.info('writing synthetic tasks %s to %s', data.tasks, out)
    os.makedirs(out, exist_ok=True)
    synthetic.write_split(out, 'train', data.tasks, data.num_train, data.synthetic_seed, knobs)
    synthetic.write_split(out, 'heldout', data.tasks, data.num_eval, data.synthetic_seed, knobs)
    with open(done, 'w') as f:
      f.write('ok\n')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('synthetic data written')
  return train, heldout


def manifests(run: RunConfig, workdir: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
  """(train manifests, held-out manifests) of the run; synthetic ones are written into the workdir first."""
  if run.data.source == 'synthetic':
    train, heldout = ensure_synthetic(run.data, workdir)
    return (train,), (heldout,)
  return run.data.train_manifests, run.data.eval_manifests


def data_config(run: RunConfig, files, batch_size: int, stage: str) -> pipeline_lib.DataConfig:
  """The run's pipeline config for one stage: its files, this host's share of the global batch, targets (SFT),
  a per-stage seed, one pass for 'eval'."""
  n_proc = jax.process_count()
  if batch_size % n_proc:
    raise ValueError(f'{stage} batch {batch_size} is not divisible by the {n_proc} hosts')
  return dataclasses.replace(
      run.data.pipeline, manifests=tuple(files), batch_size=batch_size // n_proc, with_targets=stage == 'sft',
      seed=run.seed + {'sft': 11, 'rl': 23, 'eval': 0}[stage], num_epochs=1 if stage == 'eval' else None,
      shard_index=jax.process_index(), shard_count=n_proc,
      num_workers=0 if stage == 'eval' else run.data.pipeline.num_workers)


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


def make_stage_data(run: RunConfig, files, batch_size: int, stage: str) -> StageData:
  p = pipeline_lib.make_pipeline(data_config(run, files, batch_size, stage), run.model)
  return StageData(p, iter(p.dataset))


def eval_batches(run: RunConfig, files, num_examples: int, batch_size: int) -> List[Dict]:
  """A fixed list of held-out batches (read once, reused at every evaluation)."""
  if not files or num_examples <= 0:
    return []
  data = make_stage_data(run, files, batch_size, 'eval')
  out = []
  for b in data.iterator:
    out.append(b)
    if len(out) * batch_size >= num_examples:
      break
  return out


def bad_input_metrics(*datas: StageData) -> Dict[str, float]:
  out = {}
  for d in datas:
    if d is not None:
      for k, v in d.pipeline.counter.metrics().items():
        out[k] = out.get(k, 0.0) + float(v)
  return out
