"""Benchmark summaries and the paper-layout tables (ral_jax/docs/method.md s.7), written as JSON and Markdown.

A per-example result is a dict {'problem_id', 'score' in [0, 1] (or 'correct' bool), 'categories' {axis: value or
[values]}, 'group' (optional), ...}. `summarize(rows, bad, benchmark, num_total)` turns one benchmark's results into
{'headline' (the benchmark's official number, aggregate.headline), 'metric' (its name), 'parts' (its components:
BLINK sub-tasks, CV-Bench 2D / 3D, MME perception / cognition), 'accuracy' (mean score, percent), 'num_examples'
(scored), 'num_total' (records in the benchmark's files), 'num_bad', 'bad', 'categories': {axis: {value:
{'accuracy', 'num_examples'}}}}; a benchmark that could not be evaluated is {'error': message}. `markdown` lays
several summaries out as the paper's image and video tables (a '-' where a benchmark was not run) followed by one
per-category table per benchmark, so a user can paste their row next to the paper's.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Dict, Iterable, List, Mapping, Optional

from ral_jax.eval import aggregate

# Column names of ral_jax/docs/method.md s.7 and the adapter that fills each (None: no adapter in this project yet).
IMAGE_COLUMNS = (('V*', 'vstar'), ('MMMU-Pro', 'mmmu_pro'), ('MME', 'mme'), ('MuirBench', 'muirbench'),
                 ('ChartQA', 'chartqa'), ('VizWiz', 'vizwiz'), ('BLINK', 'blink'), ('CV-Bench', 'cvbench'))
VIDEO_COLUMNS = (('LongVideoBench', 'longvideobench'), ('NExT-QA', 'nextqa'), ('Video-MME', 'videomme'),
                 ('Video-MMMU', 'videommmu'), ('LVBench', 'lvbench'), ('MVBench', 'mvbench'),
                 ('TempCompass', 'tempcompass'))


def _score(r: Mapping) -> float:
  return float(r['score']) if 'score' in r else float(bool(r['correct']))


def summarize(results: Iterable[Mapping], bad: Optional[Mapping[str, int]] = None, benchmark: str = '',
              num_total: Optional[int] = None) -> dict:
  """Headline, overall and per-category scores (percent) of one benchmark's per-example results."""
  results = [dict(r, score=_score(r)) for r in results]
  n = len(results)
  total = sum(r['score'] for r in results)
  cats: Dict[str, Dict[str, List[float]]] = collections.defaultdict(lambda: collections.defaultdict(lambda: [0., 0]))
  for r in results:
    for axis in (r.get('categories') or {}):
      for value in aggregate.category_values(r, axis):
        cell = cats[axis][value]
        cell[0] += r['score']
        cell[1] += 1
  bad = dict(bad or {})
  value, metric, parts = aggregate.headline(benchmark, results)
  return {
      'headline': value,
      'metric': metric,
      'parts': parts,
      'accuracy': 100.0 * total / n if n else float('nan'),
      'num_examples': n,
      'num_total': int(num_total) if num_total is not None else n + sum(bad.values()),
      'num_correct': total,
      'num_bad': sum(bad.values()),
      'bad': bad,
      'categories': {axis: {v: {'accuracy': 100.0 * c / t, 'num_examples': t} for v, (c, t) in sorted(vals.items())}
                     for axis, vals in sorted(cats.items())},
  }


def _cell(summaries: Mapping[str, dict], name: Optional[str], column: str) -> str:
  s = summaries.get(name) or {}
  if s.get('num_examples'):
    return f"{s.get('headline', s['accuracy']):.1f}"
  # Video-R1 eval files carry the benchmark in data_source: use that breakdown when it names this column.
  for s in summaries.values():
    cell = (s.get('categories') or {}).get('data_source', {}).get(column)
    if cell:
      return f"{cell['accuracy']:.1f}"
  return '-'


def paper_tables(summaries: Mapping[str, dict], method: str = 'this run') -> str:
  """The two tables of ral_jax/docs/method.md s.7 with one row, `method`, filled from `summaries` (keyed by
  adapter name)."""
  out = []
  for title, cols in (('Image benchmarks (accuracy %; MME: perception + cognition score; ChartQA relaxed accuracy; '
                       'VizWiz VQA accuracy; BLINK mean of sub-tasks; CV-Bench 1/2((ADE+COCO)/2+Omni3D))',
                       IMAGE_COLUMNS),
                      ('Video benchmarks (accuracy %)', VIDEO_COLUMNS)):
    out.append(title)
    out.append('| method | ' + ' | '.join(c for c, _ in cols) + ' |')
    out.append('|---' * (len(cols) + 1) + '|')
    out.append(f'| {method} | ' + ' | '.join(_cell(summaries, n, c) for c, n in cols) + ' |')
    out.append('')
  return '\n'.join(out)


def category_tables(summaries: Mapping[str, dict]) -> str:
  """Per benchmark: headline and how many items were scored of how many exist, its parts, then one table per
  category axis (value, score, number of examples)."""
  out = []
  for name, s in sorted(summaries.items()):
    if 'error' in s:
      out.append(f"### {name}: not evaluated: {s['error']}")
      out.append('')
      continue
    out.append(f"### {name}: {s.get('headline', s['accuracy']):.1f} ({s.get('metric', 'accuracy')}); "
               f"{s['num_examples']} of {s.get('num_total', s['num_examples'])} items scored "
               f"({s['num_bad']} skipped{': ' + json.dumps(s['bad']) if s['bad'] else ''})")
    if s.get('parts'):
      out.append('')
      out.append('| part | score |')
      out.append('|---|---|')
      out.extend(f'| {k} | {v:.1f} |' for k, v in s['parts'].items())
    for axis, vals in s['categories'].items():
      out.append('')
      out.append(f'| {axis} | score % | n |')
      out.append('|---|---|---|')
      out.extend(f"| {v} | {c['accuracy']:.1f} | {c['num_examples']} |" for v, c in vals.items())
    out.append('')
  return '\n'.join(out)


def markdown(summaries: Mapping[str, dict], method: str = 'this run') -> str:
  return '\n'.join(['## Results in the paper\'s layout', '', paper_tables(summaries, method),
                    '## Per category', '', category_tables(summaries)])


def _atomic_write(path: str, text: str) -> None:
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def write(outdir: str, summaries: Mapping[str, dict], method: str = 'this run',
          per_example: Optional[Mapping[str, List[dict]]] = None) -> Dict[str, str]:
  """Writes results.json, results.md (and predictions_<bench>.jsonl when given); returns the paths. Each file is
  replaced atomically, so calling this after every benchmark keeps the finished ones if a later one fails."""
  os.makedirs(outdir, exist_ok=True)
  paths = {'json': os.path.join(outdir, 'results.json'), 'markdown': os.path.join(outdir, 'results.md')}
  _atomic_write(paths['json'], json.dumps({'method': method, 'benchmarks': summaries}, indent=2, sort_keys=True))
  _atomic_write(paths['markdown'], markdown(summaries, method))
  for name, rows in (per_example or {}).items():
    paths[name] = os.path.join(outdir, f'predictions_{name}.jsonl')
    _atomic_write(paths[name], ''.join(json.dumps(r) + '\n' for r in rows))
  return paths
