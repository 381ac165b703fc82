"""Finding a regime where RL learns: how long to SFT so that the checkpoint leaves headroom, and which RL learning
rate then moves held-out accuracy. One probe, then a short GRPO sweep from the chosen SFT step.

  python -m ral_jax.experiments.regime --config=configs/image.py:testbed_grpo \
      --train_manifest=DATA/train.jsonl --eval_manifest=DATA/heldout.jsonl --out=DIR \
      --probe_sft_steps=150 --probe_every=10 --target=0.55 --arms=grpo@rl.lr=5e-5,grpo@rl.lr=2e-4

1. SFT for probe_sft_steps, held-out accuracy and a checkpoint every probe_every steps (DIR/probe).
2. The SFT step k whose accuracy is closest to `target` inside [lo, hi] (else the last step below hi):
   DIR/cmp/sft holds that checkpoint (and its held-out metrics as result.json).
3. compare.run_comparison(arms, seeds) from it in DIR/cmp; DIR/regime.json names k, the SFT accuracy curve and
   each arm's held-out change.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags
from ml_collections import config_flags

from ral_jax.experiments import arms as arms_lib
from ral_jax.experiments import compare


def pick_step(curve, target: float, lo: float, hi: float) -> int:
  """curve [(step, accuracy)] -> the step to start RL from (see module docstring); step 0 is never picked."""
  pts = [(s, a) for s, a in curve if s > 0]
  inside = [(abs(a - target), s) for s, a in pts if lo <= a <= hi]
  if inside:
    return min(inside)[1]
  below = [s for s, a in pts if a < hi]
  return max(below) if below else pts[0][0]


def run_regime(config, train_manifest: str, eval_manifest: str, out: str, probe_steps: int, every: int,
               target: float, lo: float, hi: float, arm_specs: str, seeds: int, command: str = ''):
  os.makedirs(out, exist_ok=True)
  compare.use_compile_cache(os.path.join(out, '.jax_cache'))
  base = config.copy_and_resolve_references()
  base.data.source = 'manifest'
  base.data.train_manifest, base.data.eval_manifest = train_manifest, eval_manifest
  probe = arms_lib.sft_config(base, [('train.sft_steps', probe_steps), ('train.eval_every', every),
                                     ('checkpoint.every', every), ('checkpoint.keep', probe_steps // every + 1)])
  probe_dir = os.path.join(out, 'probe')
  compare._train(probe, probe_dir, 'sft-probe', 0)
  rows = compare.read_metrics(probe_dir)
  curve = sorted({int(r['step']): float(r['eval/accuracy']) for r in rows if 'eval/accuracy' in r}.items())
  k = pick_step(curve, target, lo, hi)
  sft_dir = os.path.join(out, 'cmp', 'sft')
  if not os.path.exists(os.path.join(sft_dir, 'result.json')):
    os.makedirs(os.path.join(sft_dir, 'checkpoints'), exist_ok=True)
    shutil.copytree(os.path.join(probe_dir, 'checkpoints', str(k)), os.path.join(sft_dir, 'checkpoints', str(k)),
                    dirs_exist_ok=True)
    at_k = {}
    for r in rows:
      if int(r['step']) == k:
        at_k.update({m: float(v) for m, v in r.items() if m.startswith('eval/') and isinstance(v, (int, float))})
    with open(os.path.join(sft_dir, 'result.json'), 'w') as f:
      json.dump({'arm': 'sft', 'seed': 0, 'final': at_k, 'before': {}, 'train': {}, 'curves': {}}, f)
  cfg = base.copy_and_resolve_references()
  cfg.train.sft_steps = k
  res = compare.run_comparison(cfg, arm_specs, seeds, os.path.join(out, 'cmp'), train_manifest, eval_manifest,
                               command=command, title=f'regime probe: RL from SFT step {k}')
  regime = {'sft_step': k, 'sft_curve': curve, 'target': target, 'command': command,
            'arms': {a: {m: res['summary'][a].get(m) for m in ('eval/accuracy', 'delta_vs_sft', 'eval/evidence_mass')}
                     for a in res['summary']}}
  with open(os.path.join(out, 'regime.json'), 'w') as f:
    json.dump(regime, f, indent=1)
  return regime


def define_flags():
  return dict(
      config=config_flags.DEFINE_config_file('config', None, 'base config', lock_config=False),
      train=flags.DEFINE_string('train_manifest', None, 'training manifest'),
      eval=flags.DEFINE_string('eval_manifest', None, 'held-out manifest'),
      out=flags.DEFINE_string('out', None, 'output folder'),
      probe=flags.DEFINE_integer('probe_sft_steps', 150, 'SFT steps of the probe'),
      every=flags.DEFINE_integer('probe_every', 10, 'held-out evaluation and checkpoint every this many SFT steps'),
      target=flags.DEFINE_float('target', 0.55, 'wanted SFT held-out accuracy'),
      lo=flags.DEFINE_float('lo', 0.4, 'lowest acceptable SFT accuracy'),
      hi=flags.DEFINE_float('hi', 0.7, 'highest acceptable SFT accuracy'),
      arms=flags.DEFINE_string('arms', 'grpo@rl.lr=5e-5,grpo@rl.lr=2e-4', 'arms of the sweep (arms.py)'),
      seeds=flags.DEFINE_integer('seeds', 1, 'seeds per arm'))


def main(argv, f):
  del argv
  r = run_regime(f['config'].value, f['train'].value, f['eval'].value, f['out'].value, f['probe'].value,
                 f['every'].value, f['target'].value, f['lo'].value, f['hi'].value, f['arms'].value,
                 f['seeds'].value, command=' '.join(['python -m ral_jax.experiments.regime'] + sys.argv[1:]))
  print(json.dumps(r, indent=1))


if __name__ == '__main__':
  _f = define_flags()
  flags.mark_flags_as_required(['config', 'train_manifest', 'eval_manifest', 'out'])
  app.run(lambda argv: main(argv, _f))
