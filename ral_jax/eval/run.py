"""Benchmark evaluation of one model: adapters -> manifest -> data pipeline -> greedy decoding -> scoring -> report.

The model is built exactly as for training (train.run_setup: config, mesh, tokenizer, parameters) and decoded with
the trainer's sampler (greedy by default; `--config.sampling.*` applies otherwise); answers are extracted and
scored by rl.rewards' 'accuracy' reward, the same function that rewards RL. The prompt format follows the config
(think/answer, or answer-only for RAL-zero).

Each benchmark's records (adapters.py) are written as a JSONL manifest in the data pipeline's schema
(<outdir>/manifests/<bench>.jsonl) and read by the same Grain pipeline as training (data_config(..., 'eval'), no
remainder dropped). Records the pipeline cannot use (missing or corrupt media, prompt over the largest bucket) are
counted as bad with their reasons. The last batch is padded with copies that are not scored; on several hosts every
host runs the same number of batches and the per-example results are gathered to process 0.
Not supported yet: MVBench's per-question clip bounds (segment) are ignored: the whole video is read.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np

from ral_jax.data import pipeline as pipeline_lib
from ral_jax.train import data as train_data
from ral_jax.train import inputs as batches
from ral_jax.train import run_setup
from ral_jax.eval import adapters, attention, report
from ral_jax.rl import rewards as rewards_lib


def parse_bench(spec: str) -> Tuple[str, str, str]:
  """'NAME:ANNOTATION[:MEDIA_ROOT]' -> (name, annotation, media root or '')."""
  parts = spec.split(':')
  if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
    raise ValueError(f'--bench={spec!r}: expected NAME:ANNOTATION[:MEDIA_ROOT]')
  return parts[0], parts[1], parts[2] if len(parts) == 3 else ''


def to_manifest_line(rec: dict) -> dict:
  """An adapter record -> one line of the pipeline's JSONL manifest (data/records.py)."""
  paths = rec['path'] if isinstance(rec['path'], list) else [rec['path']]
  line = {'id': rec['problem_id'], 'question': rec['problem'], 'options': rec['options'],
          'answer': adapters.answer_letter_of(rec), 'problem_type': rec['problem_type'],
          'data_source': rec['data_source']}
  if rec['data_type'] == 'video':
    line['video'] = paths[0]
  else:
    line['images'] = paths
  return line


def write_manifest(path: str, records: Sequence[dict]) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(to_manifest_line(r)) + '\n')
  return path


def _pad_batch(batch: Dict, size: int) -> Dict:
  """Repeats the last example up to `size` rows; 'valid' marks the real ones."""
  n = len(batch['prompt_ids'])
  valid = np.arange(size) < n
  if n == size:
    return dict(batch, valid=valid)
  idx = np.minimum(np.arange(size), n - 1)
  out = {k: jax.tree.map(lambda a: np.take(np.asarray(a), idx, axis=1 if k == 'positions' else 0), v)
         for k, v in batch.items()}
  out['valid'] = valid
  return out


def _batches(config, ctx, manifest: str, batch_size: int) -> Iterator[Dict]:
  """Full-size host batches of this process (last one padded), the same count on every process."""
  dcfg = train_data.data_config(ctx.run, [manifest], batch_size, 'eval')
  dcfg = dataclasses.replace(dcfg, drop_remainder=False, num_epochs=1, max_bad_fraction=1.0)
  pipe = pipeline_lib.make_pipeline(dcfg, ctx.model_cfg)
  local = dcfg.batch_size
  with open(manifest) as f:
    total = sum(1 for line in f if line.strip())
  steps = math.ceil(math.ceil(total / dcfg.shard_count) / local)
  last = None
  it = iter(pipe.dataset)
  for _ in range(steps):
    b = next(it, None)
    if b is None:
      if last is None:
        raise ValueError(f'no usable example in {manifest} on process {jax.process_index()}: '
                         f'{pipe.counter.metrics()}')
      b = dict(last, valid=np.zeros(local, bool))
      yield b
      continue
    last = _pad_batch(b, local)
    yield last
  yield {'_counter': pipe.counter}


def evaluate_records(config, ctx, params, name: str, records: Sequence[dict], outdir: str, batch_size: int,
                     heatmap_examples: int = 0, rng=None,
                     greedy: bool = True) -> Tuple[List[dict], Dict[str, int]]:
  """Greedy-decodes and scores every record; returns per-example results (process 0 gets all of them)."""
  manifest = write_manifest(os.path.join(outdir, 'manifests', f'{name}.jsonl'), records)
  by_id = {r['problem_id']: r for r in records}
  rng = jax.random.PRNGKey(0) if rng is None else rng
  acc_cfg = rewards_lib.RewardConfig(terms=(('accuracy', 1.0),))
  rows, counter = [], None
  for i, batch in enumerate(_batches(config, ctx, manifest, batch_size)):
    if '_counter' in batch:
      counter = batch['_counter']
      break
    keep = heatmap_examples if i == 0 else 0
    res = attention.greedy_with_policy(ctx, params, batch, max(keep, 1), jax.random.fold_in(rng, i),
                                       ctx.run.record_layer, ctx.run.objective.ral.rows, greedy)
    if keep:
      ex = [b for b in range(keep) if batch['valid'][b]]
      if jax.process_index() == 0 and ex:
        from ral_jax.eval import heatmaps
        host = {'input_ids': res['input_ids'], 'pixel_values': batch['pixel_values'],
                'grid_thw': batch['grid_thw'], 'media_kind': batch['media_kind']}
        heatmaps.render_batch(os.path.join(outdir, 'heatmaps'), name, host, res['policy'],
                              res['response_mask'][:len(res['policy'])], ctx.model_cfg, ex)
    _, per, _ = rewards_lib.compute_rewards(list(res['texts']), batches.reward_records(batch), acc_cfg, 1)[:3]
    for b in np.flatnonzero(batch['valid']):
      rid = str(batch['id'][b])
      rows.append({'problem_id': rid, 'correct': bool(per['accuracy'][b] >= 1.0), 'answer': str(batch['answer'][b]),
                   'response': str(res['texts'][b]), 'categories': by_id.get(rid, {}).get('categories', {})})
  rows = _gather(rows)
  bad = dict(counter.metrics()) if counter is not None else {}
  return rows, {k[len('data/bad/'):]: v for k, v in bad.items() if k.startswith('data/bad/') and v}


def _gather(rows: List[dict]) -> List[dict]:
  """All processes' rows on every process (JSON strings through process_allgather of byte arrays)."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(rows).encode(), np.uint8)
  n = multihost_utils.process_allgather(np.array([data.size]))
  buf = np.zeros(int(n.max()), np.uint8)
  buf[:data.size] = data
  allb = multihost_utils.process_allgather(buf)
  out = []
  for k, size in enumerate(np.asarray(n).reshape(-1)):
    out.extend(json.loads(bytes(allb[k][:int(size)]).decode()))
  return out


def evaluate(config, benchmarks: Sequence[tuple], outdir: str, checkpoint: str = '', batch_size: int = 0,
             limit: Optional[int] = None, heatmap_examples: int = 2, method: str = 'this run',
             max_bad_fraction: float = 0.5, greedy: bool = True) -> Dict[str, dict]:
  """benchmarks: [(adapter name, annotation path, media root or '')]. Writes results.json / results.md and
  predictions_<bench>.jsonl under outdir (process 0); returns {bench: summary}. greedy=False decodes with
  config.sampling (temperature, top-k, top-p) instead of greedily."""
  ctx = run_setup.build_run(config, warn=False)
  run = ctx.run
  params = run_setup.restore_params(ctx, checkpoint)
  bs = batch_size or run.loop.eval_batch
  summaries, per_example = {}, {}
  for name, annotation, media_root in benchmarks:
    res = adapters.load_benchmark(name, annotation, media_root or None, limit).check(max_bad_fraction)
    rows, pipe_bad = evaluate_records(config, ctx, params, name, res.records, outdir, bs, heatmap_examples,
                                      greedy=greedy)
    bad = dict(res.bad)
    bad.update({f'pipeline: {k}': int(v) for k, v in pipe_bad.items()})
    summaries[name] = report.summarize(rows, bad)
    per_example[name] = rows
    if jax.process_index() == 0:
      s = summaries[name]
      print(f'{name}: {s["accuracy"]:.1f}% of {s["num_examples"]} ({s["num_bad"]} bad)', flush=True)
  if jax.process_index() == 0:
    paths = report.write(outdir, summaries, method, per_example)
    print(f'wrote {paths["json"]} and {paths["markdown"]}', flush=True)
  return summaries
