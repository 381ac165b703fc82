"""Benchmark evaluation of one model: adapters -> manifest -> data pipeline -> greedy decoding -> scoring -> report.

The model is built exactly as for training (train.run_setup: config, mesh, tokenizer, parameters) and decoded with
the trainer's sampler (greedy by default; `--config.sampling.*` applies otherwise); the answer inside the
response's <answer> tags is scored by the benchmark's official rule (eval/scoring.py; multiple choice and the
Video-R1 types use rl.answers, the functions that reward RL) and averaged as the benchmark's authors do
(eval/aggregate.py). The prompt format follows the config (think/answer, or answer-only for RAL-zero).

Order of work: every --bench is read first (an unknown name raises; one with no usable record is reported as not
evaluated, and the run stops only when no benchmark is usable), all before the model is built. Specs naming the
same adapter twice (CV-Bench test_2d + test_3d, several Video-R1 files) are merged into one benchmark. Then each
benchmark is evaluated and results.json / results.md are rewritten as soon as it finishes; a benchmark that fails
is recorded with its error and the others continue. Every item is evaluated: the media slots per example
(max_media) are raised to the benchmark's largest item; items over the patch or prompt budget are counted
('pipeline: media_over_budget' / 'prompt_over_budget', with the config knob to raise) and the report says how many
items were scored out of how many exist. Media embedded in annotation files and clips cut from frame folders or
clip bounds (eval/clips.py) are written under the cache dir (default <outdir>/media_cache), never the dataset
folder.

Each benchmark's records (adapters.py) are written as a JSONL manifest in the data pipeline's schema
(<outdir>/manifests/<bench>.jsonl) and read by the same Grain pipeline as training (data_config(..., 'eval'), no
remainder dropped). Records the pipeline cannot use (missing or corrupt media, prompt over the largest bucket) are
counted as bad with their reasons. The last batch is padded with copies that are not scored; on several hosts every
host runs the same number of batches and the per-example results are gathered to process 0.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from ral_jax.data import pipeline as pipeline_lib
from ral_jax.train import data as train_data
from ral_jax.train import run_setup
from ral_jax.eval import adapters, attention, clips, report, scoring


def parse_bench(spec: str) -> Tuple[str, str, str]:
  """'NAME:ANNOTATION[:MEDIA_ROOT]' -> (name, annotation, media root or '')."""
  parts = spec.split(':')
  if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
    raise ValueError(f'--bench={spec!r}: expected NAME:ANNOTATION[:MEDIA_ROOT]')
  return parts[0], parts[1], parts[2] if len(parts) == 3 else ''


def to_manifest_line(rec: dict) -> dict:
  """An adapter record -> one line of the pipeline's JSONL manifest (data/records.py). The options are left out of
  the prompt when rec['show_options'] is False (MMMU-Pro vision: they are in the image)."""
  paths = rec['path'] if isinstance(rec['path'], list) else [rec['path']]
  show = rec.get('show_options', True) is not False
  line = {'id': rec['problem_id'], 'question': rec['problem'], 'options': rec['options'] if show else [],
          'answer': adapters.answer_letter_of(rec), 'problem_type': rec['problem_type'],
          'data_source': rec['data_source']}
  if rec['data_type'] == 'video':
    line['video'] = paths[0]
    if rec.get('extra_images'):
      line['images'] = list(rec['extra_images'])
  else:
    line['images'] = paths
  return line


def num_media(rec: dict) -> int:
  n = len(rec['path']) if isinstance(rec['path'], list) else 1
  return n + len(rec.get('extra_images') or ())


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


def _batches(config, ctx, manifest: str, batch_size: int, max_media: int = 1) -> Iterator[Dict]:
  """Full-size host batches of this process (last one padded), the same count on every process. The media slots
  per example are at least `max_media` (the benchmark's largest item)."""
  dcfg = train_data.data_config(ctx.run, [manifest], batch_size, 'eval')
  dcfg = dataclasses.replace(dcfg, drop_remainder=False, num_epochs=1, max_bad_fraction=1.0,
                             max_media=max(dcfg.max_media, max_media))
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
  rows, counter = [], None
  max_media = max((num_media(r) for r in records), default=1)
  for i, batch in enumerate(_batches(config, ctx, manifest, batch_size, max_media)):
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
    for b in np.flatnonzero(batch['valid']):
      rid = str(batch['id'][b])
      rec = by_id[rid]
      sc = scoring.score(rec, str(res['texts'][b]))
      row = {'problem_id': rid, 'score': sc, 'correct': bool(sc >= 1.0), 'answer': str(batch['answer'][b]),
             'response': str(res['texts'][b]), 'categories': rec.get('categories', {})}
      if rec.get('group'):
        row['group'] = rec['group']
      rows.append(row)
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


@dataclasses.dataclass
class Prepared:
  """One benchmark ready to evaluate: its records (all --bench files of one adapter merged) and skip counts."""
  name: str
  records: List[dict]
  bad: Dict[str, int]
  num_total: int
  sources: List[str]
  error: str = ''
  warnings: List[str] = dataclasses.field(default_factory=list)


def prepare(benchmarks: Sequence[tuple], cache_dir: str, limit: Optional[int] = None,
            max_bad_fraction: float = 0.5) -> Dict[str, Prepared]:
  """Reads every benchmark before any model work. An unknown adapter name raises ValueError; a benchmark with no
  usable record (or too many bad ones) gets `error` set. Specs of the same adapter are merged (ids that collide
  across files get the file's stem as prefix). Records needing a clip (eval/clips.py) point at it afterwards."""
  known = adapters.benchmarks()
  unknown = sorted({b[0] for b in benchmarks if b[0] not in known})
  if unknown:
    raise ValueError(f'unknown benchmark(s) {unknown}; choose from {known}')
  out: Dict[str, Prepared] = {}
  for name, annotation, media_root in benchmarks:
    p = out.setdefault(name, Prepared(name, [], {}, 0, []))
    p.sources.append(annotation)
    try:
      res = adapters.load_benchmark(name, annotation, media_root or None, limit, cache_dir).check(max_bad_fraction)
    except (ValueError, FileNotFoundError, ImportError) as e:
      p.error = (p.error + '; ' if p.error else '') + str(e)
      continue
    ids = {r['problem_id'] for r in p.records}
    stem = os.path.splitext(os.path.basename(annotation.rstrip('/')))[0]
    for r in res.records:
      if r['problem_id'] in ids:
        r = dict(r, problem_id=f"{stem}/{r['problem_id']}")
      ids.add(r['problem_id'])
      p.records.append(r)
    for k, v in res.bad.items():
      p.bad[k] = p.bad.get(k, 0) + v
    p.num_total += len(res.records) + res.num_bad
  for p in out.values():
    if p.records:
      p.records, clip_bad = clips.materialize_all(p.records, cache_dir)
      for k, v in clip_bad.items():
        p.bad[k] = p.bad.get(k, 0) + v
      if p.error:   # one of several files failed: evaluate the others, say so in the summary
        p.warnings.append(f'not read: {p.error}')
        logging.warning('%s: %s', p.name, p.warnings[-1])
        p.error = ''
    if not p.records and not p.error:
      p.error = f'no usable record in {p.sources} (bad: {p.bad})'
  return out


_HINTS = {'media_over_budget': 'raise --config.data.patch_buckets or lower --config.data.image_max_pixels / '
                               'video_max_pixels / max_frames',
          'prompt_over_budget': 'raise --config.data.prompt_buckets'}


def evaluate(config, benchmarks: Sequence[tuple], outdir: str, checkpoint: str = '', batch_size: int = 0,
             limit: Optional[int] = None, heatmap_examples: int = 2, method: str = 'this run',
             max_bad_fraction: float = 0.5, greedy: bool = True, cache_dir: str = '') -> Dict[str, dict]:
  """benchmarks: [(adapter name, annotation path, media root or '')]. Writes results.json / results.md (after each
  benchmark) and predictions_<bench>.jsonl under outdir (process 0); returns {bench: summary}. greedy=False decodes
  with config.sampling (temperature, top-k, top-p) instead of greedily. cache_dir: where embedded media and clips
  are written (default <outdir>/media_cache)."""
  prepared = prepare(benchmarks, cache_dir or os.path.join(outdir, 'media_cache'), limit, max_bad_fraction)
  summaries: Dict[str, dict] = {name: {'error': p.error} for name, p in prepared.items() if p.error}
  for name, s in summaries.items():
    logging.warning('%s: not evaluated: %s', name, s['error'])
  todo = [p for p in prepared.values() if not p.error]
  if not todo:
    raise ValueError('no benchmark has a usable record: ' + '; '.join(f'{n}: {s["error"]}'
                                                                       for n, s in summaries.items()))
  ctx = run_setup.build_run(config, warn=False)
  run = ctx.run
  params = run_setup.restore_params(ctx, checkpoint)
  bs = batch_size or run.loop.eval_batch
  per_example = {}
  for p in todo:
    name = p.name
    try:
      rows, pipe_bad = evaluate_records(config, ctx, params, name, p.records, outdir, bs, heatmap_examples,
                                        greedy=greedy)
    except Exception as e:  # noqa: BLE001 - one benchmark's failure must not lose the others' results
      logging.exception('%s failed', name)
      summaries[name] = {'error': f'{type(e).__name__}: {e}'}
      if jax.process_index() == 0:
        report.write(outdir, summaries, method)
      continue
    bad = dict(p.bad)
    bad.update({f'pipeline: {k}': int(v) for k, v in pipe_bad.items()})
    summaries[name] = report.summarize(rows, bad, name, p.num_total)
    hints = {k: _HINTS[k] for k in pipe_bad if k in _HINTS}
    if hints:
      summaries[name]['hints'] = hints
    if p.warnings:
      summaries[name]['warnings'] = p.warnings
    per_example[name] = rows
    if jax.process_index() == 0:
      s = summaries[name]
      print(f'{name}: {s["headline"]:.1f} ({s["metric"]}); {s["num_examples"]} of {s["num_total"]} items scored'
            + (f'; to score the rest: {hints}' if hints else ''), flush=True)
      report.write(outdir, summaries, method, {name: rows})
  if jax.process_index() == 0:
    paths = report.write(outdir, summaries, method)
    print(f'wrote {paths["json"]} and {paths["markdown"]}', flush=True)
  return summaries
