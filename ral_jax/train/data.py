"""The trainer's data: synthetic tasks written into the workdir on first use, and Grain pipelines per stage.

Stages read: 'sft' (targets on, batch = sft.batch_size), 'rl' (prompts only, batch = rl.prompts_per_batch), and
'eval' (held-out prompts, one pass, a fixed list of batches). Batch sizes are global; each host reads
batch / process_count rows of each global batch (data.pipeline.HostRows). Every host's iterator state goes into
checkpoints (`export_state`), so a resumed run continues from the same position, also on another number of hosts
(`import_state`). One bad-input counter serves all stages (`make_counter`); its counts are gathered over hosts.
"""
from __future__ import annotations

import base64
import dataclasses
import json
from typing import Dict, List, Tuple

import jax
import numpy as np
from absl import logging

from ral_jax import paths
from ral_jax.data import pipeline as pipeline_lib
from ral_jax.data import synthetic
from ral_jax.data.badinput import BadInputCounter
from ral_jax.train.config import DataSettings, RunConfig


def ensure_synthetic(data: DataSettings, workdir: str) -> Tuple[str, str]:
  """Writes <workdir>/synthetic/{train,heldout}.jsonl (+ media) once (process 0; the others wait at a barrier);
  returns their paths. The workdir may be a gs:// URL (ral_jax.paths)."""
  out = paths.join(workdir, 'synthetic')
  train, heldout = paths.join(out, 'train.jsonl'), paths.join(out, 'heldout.jsonl')
  done = paths.join(out, 'DONE')
  if jax.process_index() == 0 and not paths.exists(done):
    knobs = synthetic.Knobs(**dict(data.synthetic_knobs))
    logging.info('writing synthetic tasks %s to %s', data.tasks, out)
    print(f'writing synthetic tasks {",".join(data.tasks)} ({data.num_train} train, {data.num_eval} held-out) to '
          f'{out}', flush=True)
    with paths.staged_dir(out) as local:   # media are written by PyAV / Pillow: local files, uploaded if remote
      synthetic.write_split(local, 'train', data.tasks, data.num_train, data.synthetic_seed, knobs)
      synthetic.write_split(local, 'heldout', data.tasks, data.num_eval, data.synthetic_seed, knobs)
    paths.write_text(done, 'ok\n')   # last: a reader that sees DONE sees every file
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
  rows: int = 0                # this host's rows per batch (global batch / process count)

  def next(self) -> Dict:
    return next(self.iterator)

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)

  def export_state(self) -> Dict:
    """Every host's iterator state (a collective), JSON-ready, for the checkpoint's meta (written by process 0):
    {'hosts': H, 'rows': rows per host, 'states': [state of process 0, ...]}."""
    return {'hosts': jax.process_count(), 'rows': self.rows, 'states': _allgather_json(self.get_state())}

  def import_state(self, saved) -> None:
    """Restores this host's position from `export_state` output, also when it was saved by another number of
    hosts: the global batches are the same on any host count (data.pipeline.HostRows), so the position becomes
    'after global batch g' with g = ceil(max over old hosts of elements read / old rows), then g * new rows."""
    if not (isinstance(saved, dict) and 'states' in saved):   # a checkpoint from before per-host states
      self.set_state(saved)
      return
    hosts, states = int(saved['hosts']), [_from_json(x) for x in saved['states']]
    if hosts == jax.process_count():
      self.set_state(states[jax.process_index()])
      return
    if not all(isinstance(x, dict) and set(x) == {'next_index'} for x in states):
      raise ValueError(f'the data position was saved by {hosts} hosts with Grain worker processes; it can only be '
                       f'moved to {jax.process_count()} hosts with data.num_workers=0 (or resume on {hosts} hosts)')
    batches = -(-max(int(x['next_index']) for x in states) // int(saved['rows']))
    self.set_state({'next_index': batches * self.rows})
    logging.warning('data position saved by %d hosts moved to %d hosts: after global batch %d', hosts,
                    jax.process_count(), batches)


def _to_json(obj) -> str:
  return json.dumps(obj, default=lambda b: {'__bytes__': base64.b64encode(b).decode('ascii')})


def _from_json(obj):
  if isinstance(obj, dict):
    if set(obj) == {'__bytes__'}:
      return base64.b64decode(obj['__bytes__'])
    return {k: _from_json(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_from_json(v) for v in obj]
  return obj


def _allgather_json(obj) -> List:
  """[obj of process 0, obj of process 1, ...] (JSON-encoded; bytes as {'__bytes__': base64})."""
  text = _to_json(obj)
  if jax.process_count() == 1:
    return [json.loads(text)]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(text.encode('utf-8'), np.uint8)
  n = int(np.asarray(multihost_utils.process_allgather(np.asarray([len(raw)], np.int32))).max())
  padded = np.zeros(n, np.uint8)
  padded[:len(raw)] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), n)
  return [json.loads(bytes(r).rstrip(b'\0').decode('utf-8')) for r in rows]


def make_counter(run: RunConfig) -> BadInputCounter:
  """One bad-input counter for all of a run's pipelines: a manifest read by the SFT and the RL stage is counted
  once per line, and its bad fraction (data/badinput.py) is the one the limit applies to."""
  return BadInputCounter(run.data.pipeline.max_bad_fraction, run.data.pipeline.bad_min_records)


def make_stage_data(run: RunConfig, files, batch_size: int, stage: str, counter=None) -> StageData:
  dcfg = data_config(run, files, batch_size, stage)
  p = pipeline_lib.make_pipeline(dcfg, run.model, counter)
  return StageData(p, iter(p.dataset), dcfg.batch_size)


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
  """Bad-input metrics of the stages' counters, each distinct counter once (stages of a run share one), over all
  hosts (`gather_counter`)."""
  out, done = {}, set()
  for d in datas:
    if d is not None and id(d.pipeline.counter) not in done:
      done.add(id(d.pipeline.counter))
      for k, v in gather_counter(d.pipeline.counter).metrics().items():
        out[k] = max(out.get(k, 0.0), float(v)) if k.endswith('bad_fraction') else out.get(k, 0.0) + float(v)
  return out


def gather_counter(counter: BadInputCounter) -> BadInputCounter:
  """The run-wide counts of one counter held by every host (a collective: every process calls it at the same
  step). Single process: the counter itself."""
  if jax.process_count() == 1:
    return counter
  from jax.experimental import multihost_utils
  files = counter.files()   # the same manifests on every host: each parses all of them
  vec = counter.to_vector(files)
  sizes = multihost_utils.process_allgather(np.asarray([len(vec)], np.int32))
  if len(set(np.asarray(sizes).ravel().tolist())) != 1:
    raise RuntimeError(f'hosts read different manifest sets (count vectors of sizes {np.asarray(sizes).ravel()})')
  vectors = np.asarray(multihost_utils.process_allgather(vec.astype(np.float32)))
  return BadInputCounter.from_vectors(vectors, files, counter.max_bad_fraction, counter.min_records)
