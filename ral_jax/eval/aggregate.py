"""Each benchmark's headline number from per-example scores, as its authors average them.

A per-example row is {'problem_id', 'score' in [0, 1], 'categories' {axis: value or [values]}, 'group'
(optional)}. `headline(benchmark, rows)` returns (value, metric name, parts {name: value}):

  default     mean score x 100 over the scored examples ('accuracy'; ChartQA 'relaxed accuracy', VizWiz 'VQA
              accuracy': the per-example scores already carry their rule).
  blink       the mean of the sub-task accuracies (categories 'sub_task'), each sub-task weighted equally.
  cvbench     1/2 * ((acc(ADE20K) + acc(COCO)) / 2 + acc(Omni3D)) over categories 'source': the 2D score is the mean
              of its two sources, the 3D score Omni3D's; with only one of 2D / 3D evaluated the headline is that
              one's score (the metric name says so).
  mme         per category c (categories 'category'): acc_c = 100 * correct / questions, acc+_c = 100 * images
              whose questions are all right / images (rows grouped by 'group', the image); score_c = acc_c + acc+_c
              (0..200). perception = sum over MME_PERCEPTION, cognition = sum over MME_COGNITION; the headline is
              perception + cognition (the parts hold both).
"""
from __future__ import annotations

import collections
from typing import Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

MME_PERCEPTION = ('existence', 'count', 'position', 'color', 'posters', 'celebrity', 'scene', 'landmark', 'artwork',
                  'OCR')
MME_COGNITION = ('commonsense_reasoning', 'numerical_calculation', 'text_translation', 'code_reasoning')

Headline = Tuple[float, str, Dict[str, float]]
_RULES: Dict[str, Callable[[Sequence[Mapping]], Headline]] = {}


def _rule(*names):
  def deco(fn):
    for n in names:
      _RULES[n] = fn
    return fn
  return deco


def category_values(row: Mapping, axis: str) -> List[str]:
  v = (row.get('categories') or {}).get(axis)
  if v is None or v == '':
    return []
  return [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]


def mean_score(rows: Iterable[Mapping]) -> float:
  rows = list(rows)
  return 100.0 * sum(float(r['score']) for r in rows) / len(rows) if rows else float('nan')


def by_category(rows: Sequence[Mapping], axis: str) -> Dict[str, List[Mapping]]:
  out = collections.defaultdict(list)
  for r in rows:
    for v in category_values(r, axis):
      out[v].append(r)
  return dict(out)


@_rule('blink')
def blink(rows: Sequence[Mapping]) -> Headline:
  parts = {k: mean_score(v) for k, v in sorted(by_category(rows, 'sub_task').items())}
  value = sum(parts.values()) / len(parts) if parts else float('nan')
  return value, f'mean of {len(parts)} sub-task accuracies', parts


@_rule('cvbench')
def cvbench(rows: Sequence[Mapping]) -> Headline:
  src = {k.lower(): mean_score(v) for k, v in by_category(rows, 'source').items()}
  two = [src[k] for k in ('ade20k', 'coco') if k in src]
  parts = {}
  if two:
    parts['2D'] = sum(two) / len(two)
  if 'omni3d' in src:
    parts['3D'] = src['omni3d']
  parts.update({k: v for k, v in src.items()})
  if '2D' in parts and '3D' in parts:
    return (parts['2D'] + parts['3D']) / 2, '1/2 ((ADE20K + COCO)/2 + Omni3D)', parts
  if '2D' in parts or '3D' in parts:
    which = '2D' if '2D' in parts else '3D'
    return parts[which], f'{which} only (the other split was not evaluated)', parts
  return mean_score(rows), 'accuracy (no CV-Bench source column)', parts


def mme_category_scores(rows: Sequence[Mapping]) -> Dict[str, Dict[str, float]]:
  """{category: {'acc', 'acc_plus', 'score'}} (module docstring)."""
  out = {}
  for cat, rs in sorted(by_category(rows, 'category').items()):
    acc = mean_score(rs)
    images = collections.defaultdict(list)
    for r in rs:
      images[r.get('group') or r['problem_id']].append(float(r['score']) >= 1.0)
    acc_plus = 100.0 * sum(all(v) for v in images.values()) / len(images)
    out[cat] = {'acc': acc, 'acc_plus': acc_plus, 'score': acc + acc_plus}
  return out


@_rule('mme')
def mme(rows: Sequence[Mapping]) -> Headline:
  cats = mme_category_scores(rows)
  perception = sum(v['score'] for k, v in cats.items() if k in MME_PERCEPTION)
  cognition = sum(v['score'] for k, v in cats.items() if k in MME_COGNITION)
  parts = {'perception': perception, 'cognition': cognition}
  parts.update({f'{k} (acc + acc+)': v['score'] for k, v in cats.items()})
  n_p = sum(k in MME_PERCEPTION for k in cats)
  n_c = sum(k in MME_COGNITION for k in cats)
  return perception + cognition, (f'MME score: perception ({n_p}/10 categories) + cognition ({n_c}/4), '
                                  'each category acc + acc+'), parts


METRIC_NAMES = {'chartqa': 'relaxed accuracy', 'vizwiz': 'VQA accuracy'}


def headline(benchmark: str, rows: Sequence[Mapping]) -> Headline:
  """(value, metric name, parts) of `benchmark` (an adapter name) over its rows."""
  rows = list(rows)
  if benchmark in _RULES and rows:
    return _RULES[benchmark](rows)
  return mean_score(rows), METRIC_NAMES.get(benchmark, 'accuracy'), {}
