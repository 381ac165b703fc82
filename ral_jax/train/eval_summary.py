"""Held-out results at a run's milestones: before training, after the SFT stage, after the RL stage.

The trainer (train/loop.py) records one point per milestone from a held-out evaluation (stages.evaluate: greedy
accuracy, format rate and, when the data carry evidence, attention-on-evidence mass), keeps the points in the
checkpoint meta so that a resumed run still reports them, prints them as one block at the end and writes them to
<workdir>/eval_summary.json:

  {"points": [{"point": "before", "label": "before training", "step": 0, "accuracy": 0.0, ...},
              {"point": "after_sft", ...}, {"point": "after_rl", ...}],
   "algo": "ral", "lambda_attn": 1.0, "sft_steps": 200, "rl_steps": 30}

A point holds `step` (the outer step it was measured after) and those of accuracy, format, evidence_mass,
evidence_chance (the share of visual tokens that are evidence: what uniform attention scores) and examples that the
evaluation gave. A run with one stage has two points (before, after that stage).
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Mapping

from ral_jax import paths

POINTS = ('before', 'after_sft', 'after_rl')
LABELS = {'before': 'before training', 'after_sft': 'after SFT', 'after_rl': 'after RL'}
FIELDS = ('accuracy', 'format', 'evidence_mass', 'evidence_chance', 'examples')
FILENAME = 'eval_summary.json'


def point(ev: Mapping[str, float], step: int) -> Dict[str, float]:
  """The milestone numbers of one held-out evaluation (the `eval/*` dict of stages.evaluate) after outer `step`."""
  p = {'step': int(step)}
  for k in FIELDS:
    if f'eval/{k}' in ev:
      p[k] = float(ev[f'eval/{k}'])
  return p


def ordered(points: Mapping[str, Mapping]) -> List[Dict]:
  """The recorded points in milestone order, each with its name ('point') and printed label ('label')."""
  return [dict(points[name], point=name, label=LABELS[name]) for name in POINTS if name in points]


def _num(p: Mapping, key: str) -> str:
  v = p.get(key, float('nan'))
  return f'{v:.3f}' if math.isfinite(v) else '  -  '


def table(points: Mapping[str, Mapping], algo: str = '') -> List[str]:
  """Console lines: a header, then one line per milestone (step, accuracy, format, evidence mass); `algo` names the
  RL recipe in the after-RL label."""
  rows = ordered(points)
  if algo:
    rows = [dict(p, label=f'{p["label"]} ({algo})') if p['point'] == 'after_rl' else p for p in rows]
  if not rows:
    return []
  n = int(max(p.get('examples', 0) for p in rows))
  chance = next((p['evidence_chance'] for p in rows if math.isfinite(p.get('evidence_chance', float('nan')))),
                None)
  head = f'held-out results ({n} examples, greedy decoding)'
  if chance is not None:
    head += f'; evidence mass = share of visual attention on the evidence, uniform = {chance:.3f}'
  lines = [head + ':', f'  {"":<18}{"step":>6}{"accuracy":>10}{"format":>8}{"evidence mass":>15}']
  for p in rows:
    lines.append(f'  {p["label"]:<18}{p["step"]:>6d}{_num(p, "accuracy"):>10}{_num(p, "format"):>8}'
                 f'{_num(p, "evidence_mass"):>15}')
  return lines


def write(workdir: str, points: Mapping[str, Mapping], **run_info) -> str:
  """Writes <workdir>/eval_summary.json (the ordered points and `run_info`); returns its path."""
  path = paths.join(workdir, FILENAME)
  paths.write_text(path, json.dumps({'points': ordered(points), **run_info}, indent=1, allow_nan=True) + '\n')
  return path


def flat(points: Mapping[str, Mapping]) -> Dict[str, float]:
  """The points as flat keys for the trainer's returned metrics: eval_<point>[_<field>] (eval_after_sft,
  eval_after_sft_evidence_mass, ...); accuracy is the bare key."""
  out = {}
  for name, p in points.items():
    for k in FIELDS:
      if k in p:
        out[f'eval_{name}' if k == 'accuracy' else f'eval_{name}_{k}'] = p[k]
  return out
