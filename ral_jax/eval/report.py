"""Accuracy summaries and the paper-layout tables (ral_jax/docs/method.md s.7), written as JSON and Markdown.

A per-example result is a dict {'problem_id', 'correct' (bool), 'categories' {axis: value}, ...}. `summarize`
turns one benchmark's results into {'accuracy' (percent), 'num_examples', 'num_bad', 'bad', 'categories':
{axis: {value: {'accuracy', 'num_examples'}}}}; `markdown` lays several summaries out as the paper's image and
video tables (a '-' where a benchmark was not run) followed by one per-category table per benchmark, so a user
can paste their row next to ral_jax/docs/method.md's.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Dict, Iterable, List, Mapping, Optional

# Column names of ral_jax/docs/method.md s.7 and the adapter that fills each (None: no adapter in this project yet).
IMAGE_COLUMNS = (('V*', 'vstar'), ('MMMU-Pro', 'mmmu_pro'), ('MME', None), ('MuirBench', 'muirbench'),
                 ('ChartQA', None), ('VizWiz', None), ('BLINK', 'blink'), ('CV-Bench', 'cvbench'))
VIDEO_COLUMNS = (('LongVideoBench', 'longvideobench'), ('NExT-QA', 'nextqa'), ('Video-MME', 'videomme'),
                 ('Video-MMMU', None), ('LVBench', None), ('MVBench', 'mvbench'), ('TempCompass', 'tempcompass'))


def summarize(results: Iterable[Mapping], bad: Optional[Mapping[str, int]] = None) -> dict:
  """Overall and per-category accuracy (percent) of one benchmark's per-example results."""
  results = list(results)
  n = len(results)
  correct = sum(bool(r['correct']) for r in results)
  cats: Dict[str, Dict[str, List[int]]] = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
  for r in results:
    for axis, value in (r.get('categories') or {}).items():
      cell = cats[axis][str(value)]
      cell[0] += bool(r['correct'])
      cell[1] += 1
  bad = dict(bad or {})
  return {
      'accuracy': 100.0 * correct / n if n else float('nan'),
      'num_examples': n,
      'num_correct': correct,
      'num_bad': sum(bad.values()),
      'bad': bad,
      'categories': {axis: {v: {'accuracy': 100.0 * c / t, 'num_examples': t} for v, (c, t) in sorted(vals.items())}
                     for axis, vals in sorted(cats.items())},
  }


def _cell(summaries: Mapping[str, dict], name: Optional[str], column: str) -> str:
  if name in summaries and summaries[name]['num_examples']:
    return f"{summaries[name]['accuracy']:.1f}"
  # Video-R1 eval files carry the benchmark in data_source: use that breakdown when it names this column.
  for s in summaries.values():
    cell = s.get('categories', {}).get('data_source', {}).get(column)
    if cell:
      return f"{cell['accuracy']:.1f}"
  return '-'


def paper_tables(summaries: Mapping[str, dict], method: str = 'this run') -> str:
  """The two tables of ral_jax/docs/method.md s.7 with one row, `method`, filled from `summaries` (keyed by
  adapter name)."""
  out = []
  for title, cols in (('Image benchmarks (accuracy %; MME in the paper is a sum score)', IMAGE_COLUMNS),
                      ('Video benchmarks (accuracy %)', VIDEO_COLUMNS)):
    out.append(title)
    out.append('| method | ' + ' | '.join(c for c, _ in cols) + ' |')
    out.append('|---' * (len(cols) + 1) + '|')
    out.append(f'| {method} | ' + ' | '.join(_cell(summaries, n, c) for c, n in cols) + ' |')
    out.append('')
  return '\n'.join(out)


def category_tables(summaries: Mapping[str, dict]) -> str:
  """One table per benchmark and category axis: value, accuracy, number of examples."""
  out = []
  for name, s in sorted(summaries.items()):
    out.append(f"### {name}: {s['accuracy']:.1f}% of {s['num_examples']} "
               f"({s['num_bad']} bad records skipped{': ' + json.dumps(s['bad']) if s['bad'] else ''})")
    for axis, vals in s['categories'].items():
      out.append('')
      out.append(f'| {axis} | accuracy % | n |')
      out.append('|---|---|---|')
      out.extend(f"| {v} | {c['accuracy']:.1f} | {c['num_examples']} |" for v, c in vals.items())
    out.append('')
  return '\n'.join(out)


def markdown(summaries: Mapping[str, dict], method: str = 'this run') -> str:
  return '\n'.join(['## Results in the paper\'s layout', '', paper_tables(summaries, method),
                    '## Per category', '', category_tables(summaries)])


def write(outdir: str, summaries: Mapping[str, dict], method: str = 'this run',
          per_example: Optional[Mapping[str, List[dict]]] = None) -> Dict[str, str]:
  """Writes results.json, results.md (and predictions_<bench>.jsonl when given); returns the paths."""
  os.makedirs(outdir, exist_ok=True)
  paths = {'json': os.path.join(outdir, 'results.json'), 'markdown': os.path.join(outdir, 'results.md')}
  with open(paths['json'], 'w') as f:
    json.dump({'method': method, 'benchmarks': summaries}, f, indent=2, sort_keys=True)
  with open(paths['markdown'], 'w') as f:
    f.write(markdown(summaries, method))
  for name, rows in (per_example or {}).items():
    paths[name] = os.path.join(outdir, f'predictions_{name}.jsonl')
    with open(paths[name], 'w') as f:
      for r in rows:
        f.write(json.dumps(r) + '\n')
  return paths
