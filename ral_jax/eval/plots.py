"""Training curves from a run's JSONL log: `python -m ral_jax.eval.plots --workdir=DIR [--out=DIR/plots]`.

Reads <workdir>/metrics.jsonl (one object per logged step: {"step", "stage", "<name>": value, ...}, written by
ral_jax.metrics) and draws one panel per quantity the paper's story needs: reward, accuracy (training and
held-out), the attention JSD term, and the attention mass on visual tokens, plus the loss. A quantity is every
logged key whose last '/'-separated part matches its pattern (so 'rl/reward' and 'reward' both count); stages are
drawn in different colours. Writes <out>/training_curves.png and one PNG per panel; returns the paths.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app, flags

# panel title -> regex on the last part of a metric name
PANELS: Tuple[Tuple[str, str], ...] = (
    ('reward', r'^reward(_mean)?$'),
    ('accuracy', r'^(acc|accuracy)(_mean)?$'),
    ('attention JSD (RAL term)', r'^(jsd|attn_jsd|ral_jsd|attn_loss|ral_loss)(_mean)?$'),
    ('attention mass on visual tokens', r'^(visual_mass|vis_mass|attn_visual_mass|visual_attention(_mass)?)(_mean)?$'),
    ('loss', r'^loss$'),
)


def read_log(path: str) -> List[dict]:
  """Records of a metrics.jsonl; unreadable lines (e.g. a half-written last line) are skipped."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'no metrics log at {path}: pass --workdir of a run (it writes metrics.jsonl)')
  out = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and 'step' in rec:
        out.append(rec)
  return out


def series(records: Sequence[Mapping], pattern: str) -> Dict[str, Tuple[List[float], List[float]]]:
  """{'<stage>:<key>': (steps, values)} for every numeric key whose last part matches `pattern`."""
  rx = re.compile(pattern)
  out: Dict[str, Tuple[List[float], List[float]]] = collections.OrderedDict()
  for rec in records:
    for key, val in rec.items():
      if key in ('step', 'stage') or not isinstance(val, (int, float)) or isinstance(val, bool):
        continue
      if '/errors/' in key or key.startswith('errors/'):   # failure counts, e.g. reward/errors/accuracy
        continue
      if not rx.match(key.split('/')[-1]) or not math.isfinite(val):
        continue
      stage = rec.get('stage') or ''
      name = key if not stage or key.startswith(stage + '/') else f'{stage}/{key}'
      xs, ys = out.setdefault(name, ([], []))
      xs.append(rec['step'])
      ys.append(float(val))
  return out


def plot(records: Sequence[Mapping], out_dir: str, panels=PANELS) -> List[str]:
  """Draws the panels that have data into out_dir; returns [combined figure, panel figures...]."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  os.makedirs(out_dir, exist_ok=True)
  found = [(title, series(records, rx)) for title, rx in panels]
  found = [(t, s) for t, s in found if s]
  if not found:
    keys = sorted({k for r in records for k in r})
    raise ValueError(f'no plottable metric in the log (keys: {keys}); expected names like reward, accuracy, jsd')
  paths = []
  fig, axes = plt.subplots(1, len(found), figsize=(4.2 * len(found), 3.2), squeeze=False)
  for ax, (title, ser) in zip(axes[0], found):
    _draw(ax, title, ser)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, 'training_curves.png'))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  for title, ser in found:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _draw(ax, title, ser)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, re.sub(r'[^a-z0-9]+', '_', title.lower()).strip('_') + '.png'))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths


def _draw(ax, title, ser):
  for name, (xs, ys) in ser.items():
    ax.plot(xs, ys, marker='o' if len(xs) < 20 else None, markersize=3, label=name)
  ax.set_title(title, fontsize=10)
  ax.set_xlabel('step')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def main(workdir: str, out: Optional[str] = None) -> List[str]:
  return plot(read_log(os.path.join(workdir, 'metrics.jsonl')), out or os.path.join(workdir, 'plots'))


def _cli(argv):
  del argv
  flags_ = flags.FLAGS
  if not flags_.workdir:
    raise app.UsageError('--workdir is required')
  for p in main(flags_.workdir, flags_.out):
    print(p)


if __name__ == '__main__':
  # Flags are defined here, not at import, so importing this module next to other entry points never clashes.
  flags.DEFINE_string('workdir', None, 'run directory holding metrics.jsonl')
  flags.DEFINE_string('out', None, 'output directory (default <workdir>/plots)')
  app.run(_cli)
