"""Results of a comparison: per-run records -> mean and 95% CI over seeds, a markdown table, curves.

A run record (compare.py writes one per arm and seed, `result.json`):
  {'arm', 'seed', 'final': {metric: value} (held-out metrics after RL, eval/...), 'before': {...} (the SFT
   checkpoint's held-out metrics), 'train': {metric: mean over the RL steps}, 'curves': {metric: [[step, value]]}}
95% CI: mean +- t_{0.975, n-1} * sd / sqrt(n) with the sample sd (ddof 1); n = 1 gives no interval.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

# t_{0.975, df} for df = 1..30 (then 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

TABLE_METRICS = ('eval/accuracy', 'delta_vs_sft', 'eval/evidence_mass', 'train/ral/jsd', 'train/ral/grad_share',
                 'train/reward')
CURVES = (('eval/accuracy', 'held-out accuracy (greedy)'), ('eval/evidence_mass', 'held-out attention on evidence'),
          ('ral/jsd', 'RAL JSD(p_theta || p_old), mean over updates'), ('reward', 'training reward'),
          ('attn/evidence_mass', 'training attention on evidence (p_theta)'),
          ('ral/grad_share', '|grad lambda L_RAL| / |grad L|'))


def mean_ci(values: Sequence[float]) -> Dict[str, float]:
  """{'mean', 'ci95' (half-width; nan for n < 2), 'sd', 'n'} of the finite values."""
  v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
  n = len(v)
  if n == 0:
    return {'mean': float('nan'), 'ci95': float('nan'), 'sd': float('nan'), 'n': 0}
  m = sum(v) / n
  if n == 1:
    return {'mean': m, 'ci95': float('nan'), 'sd': float('nan'), 'n': 1}
  sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
  t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
  return {'mean': m, 'ci95': t * sd / math.sqrt(n), 'sd': sd, 'n': n}


def run_values(rec: Mapping, sft_acc: Optional[float]) -> Dict[str, float]:
  """The per-run numbers the table aggregates (held-out finals, their change vs the SFT checkpoint, train means)."""
  out = {k: v for k, v in rec.get('final', {}).items() if k.startswith('eval/') and isinstance(v, (int, float))}
  if sft_acc is not None and 'eval/accuracy' in out:
    out['delta_vs_sft'] = out['eval/accuracy'] - sft_acc
  out.update({f'train/{k}': v for k, v in rec.get('train', {}).items()})
  return out


def aggregate(records: Sequence[Mapping], arm_order: Sequence[str], sft_final: Mapping) -> Dict[str, Dict]:
  """{arm: {metric: mean_ci}} over the seeds of each arm."""
  sft_acc = sft_final.get('eval/accuracy')
  out = {}
  for arm in arm_order:
    runs = [run_values(r, sft_acc) for r in records if r['arm'] == arm]
    keys = sorted({k for r in runs for k in r})
    out[arm] = {k: mean_ci([r.get(k, float('nan')) for r in runs]) for k in keys}
  return out


def _fmt(s: Mapping, pct: bool = False, digits: int = 3) -> str:
  if not s or s.get('n', 0) == 0 or not math.isfinite(s['mean']):
    return '-'
  m, c = s['mean'], s['ci95']
  if abs(m) < 1e-3 and m != 0:
    txt = f'{m:.2e}' + ('' if not math.isfinite(c) else f' ± {c:.1e}')
  else:
    txt = f'{m:.{digits}f}' + ('' if not math.isfinite(c) else f' ± {c:.{digits}f}')
  return txt


def markdown_table(summary: Mapping[str, Mapping], arm_order: Sequence[str]) -> str:
  """Overall table (mean ± 95% CI half-width over seeds) and a per-task held-out accuracy table."""
  cols = [m for m in TABLE_METRICS if any(m in summary[a] for a in arm_order)]
  lines = ['| arm | seeds | ' + ' | '.join(cols) + ' |', '|---|---|' + '---|' * len(cols)]
  for a in arm_order:
    n = max((s['n'] for s in summary[a].values()), default=0)
    lines.append(f'| {a} | {n} | ' + ' | '.join(_fmt(summary[a].get(m, {})) for m in cols) + ' |')
  tasks = sorted({k for a in arm_order for k in summary[a] if k.startswith('eval/accuracy/')})
  if tasks:
    lines += ['', '| arm | ' + ' | '.join(t.split('/', 2)[2] for t in tasks) + ' |', '|---|' + '---|' * len(tasks)]
    for a in arm_order:
      lines.append(f'| {a} | ' + ' | '.join(_fmt(summary[a].get(t, {})) for t in tasks) + ' |')
  return '\n'.join(lines) + '\n'


def _panel(ax, records, arm_order, key, title) -> bool:
  drawn = False
  for arm in arm_order:
    colour = f'C{list(arm_order).index(arm) % 10}'     # one colour per arm in every panel
    if arm == 'sft':    # the shared starting point: its final value as a level line (its curve is over SFT steps)
      finals = [r.get('final', {}).get(key) for r in records if r['arm'] == arm]
      finals = [v for v in finals if v is not None]
      if finals:
        ax.axhline(sum(finals) / len(finals), color=colour, ls='--', lw=1, label=f'{arm} checkpoint')
        drawn = True
      continue
    series = [dict((int(s), v) for s, v in r.get('curves', {}).get(key, [])) for r in records if r['arm'] == arm]
    series = [s for s in series if s]
    if not series:
      continue
    steps = sorted(set.intersection(*[set(s) for s in series]))
    if not steps:
      continue
    vals = [[s[k] for s in series] for k in steps]
    mean = [sum(v) / len(v) for v in vals]
    ax.plot(steps, mean, marker='o' if len(steps) < 12 else None, ms=3, color=colour,
            label=f'{arm} (n={len(series)})')
    if len(series) > 1:
      ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.15, color=colour)
    drawn = True
  if drawn:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('RL step (rollout batch)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return drawn


def plot_curves(records: Sequence[Mapping], arm_order: Sequence[str], out_dir: str) -> List[str]:
  """One PNG per curve and all of them in curves.png: mean over seeds per arm against the RL step (shaded:
  min..max over seeds); the `sft` arm (no RL steps) is a dashed level line at its final value."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  paths = []
  for key, title in CURVES:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if _panel(ax, records, arm_order, key, title):
      fig.tight_layout()
      paths.append(os.path.join(out_dir, key.replace('/', '_') + '.png'))
      fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  fig, axes = plt.subplots(2, 3, figsize=(16, 8))
  for ax, (key, title) in zip(axes.reshape(-1), CURVES):
    if not _panel(ax, records, arm_order, key, title):
      ax.axis('off')
  fig.tight_layout()
  paths.append(os.path.join(out_dir, 'curves.png'))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  return paths


def write_all(out_dir: str, records: Sequence[Mapping], arm_order: Sequence[str], sft_final: Mapping,
              meta: Mapping) -> Dict:
  """results.json, results.md and the curves in out_dir; returns the results dict."""
  summary = aggregate(records, arm_order, sft_final)
  results = dict(meta, sft_checkpoint=dict(sft_final), summary=summary, runs=list(records))
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, allow_nan=True)
  table = markdown_table(summary, arm_order)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(f"# {meta.get('title', 'comparison')}\n\n```\n{meta.get('command', '')}\n```\n\n")
    f.write(f"{meta.get('environment', '')}\n\nmean ± 95% CI half-width over seeds (t distribution); "
            "delta_vs_sft = held-out accuracy minus the shared SFT checkpoint's; train/* = mean over RL steps.\n\n")
    f.write(table)
  plot_curves(records, arm_order, out_dir)
  return results
