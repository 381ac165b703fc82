"""RAL vs GRPO (and variants) at equal compute, from one shared SFT checkpoint, over seeds.

  python -m ral_jax.experiments.compare --config=configs/image.py:testbed_grpo \
      --arms=sft,grpo,ral:0.5,ral:1,ral:5 --seeds=3 \
      --train_manifest=DATA/train.jsonl --eval_manifest=DATA/heldout.jsonl --out=DIR [--config.KEY=VALUE ...]

1. SFT once (the config's train.sft_steps, algo sft) in DIR/sft.
2. Every training arm x seed (arms.py) in DIR/runs/<arm>/seed<k>: RL from DIR/sft's parameters with the config's
   rollout budget (train.rl_steps x rl.prompts_per_batch x G) and updates; the seed changes the RL sampling, the
   data order and the optimizer state's RNG, never the starting point.
3. DIR/results.json, DIR/results.md (mean ± 95% CI over seeds, per task) and curves (summary.py), rewritten
   after every run (runs go seed by seed, so a comparison stopped early has balanced partial results).
Resumable: a finished run (its result.json exists) is skipped; an interrupted one resumes from its checkpoint.
Any Video-R1 JSON / JSONL manifest pair works; records with `evidence` add the attention-on-evidence numbers.
Compiled programs are shared between runs through JAX's persistent compilation cache in DIR/.jax_cache.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Dict, List, Mapping, Optional

from absl import app, flags, logging
from ml_collections import config_flags

from ral_jax.experiments import arms as arms_lib
from ral_jax.experiments import summary

TRAIN_KEYS = ('reward', 'accuracy', 'format', 'ral/jsd', 'first/ral/jsd', 'last/ral/jsd', 'ral/loss', 'ral/grad_share',
              'attn/evidence_mass', 'attn/evidence_mass_old', 'attn/visual_mass', 'grad_norm', 'loss', 'resp_len',
              'adv/frac_zero_groups', 'time/step')
CURVE_KEYS = ('eval/accuracy', 'eval/evidence_mass', 'ral/jsd', 'reward', 'attn/evidence_mass', 'ral/grad_share')


def read_metrics(workdir: str) -> List[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def run_record(arm: str, seed: int, workdir: str, ret: Mapping, seconds: float) -> Dict:
  """The per-run record summary.py reads (see its docstring), from loop.run's return value and metrics.jsonl."""
  rows = read_metrics(workdir)
  rl = [r for r in rows if r.get('stage') == 'rl']
  train = {}
  for k in TRAIN_KEYS:
    v = [float(r[k]) for r in rl if isinstance(r.get(k), (int, float))]
    if v:
      train[k] = sum(v) / len(v)
  curves = {}
  for k in CURVE_KEYS:
    pts = {}
    for r in rows:
      if isinstance(r.get(k), (int, float)):
        pts[int(r['step'])] = float(r[k])
    if pts:
      curves[k] = sorted(pts.items())
  final = {k: float(v) for k, v in ret.items() if k.startswith('eval/') and isinstance(v, (int, float))}
  before = {'eval/accuracy': ret.get('eval_before'), 'eval/evidence_mass': ret.get('eval_before_evidence_mass')}
  return {'arm': arm, 'seed': seed, 'final': final, 'before': before, 'train': train, 'curves': curves,
          'seconds': seconds}


def _done(workdir: str) -> Optional[Dict]:
  path = os.path.join(workdir, 'result.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _train(config, workdir: str, arm: str, seed: int) -> Dict:
  from ral_jax.train import loop
  rec = _done(workdir)
  if rec is not None:
    logging.info('skipping %s seed %d: done (%s)', arm, seed, workdir)
    return rec
  t0 = time.time()
  ret = loop.run(config, workdir)
  rec = run_record(arm, seed, workdir, ret, time.time() - t0)
  with open(os.path.join(workdir, 'result.json'), 'w') as f:
    json.dump(rec, f, indent=1, allow_nan=True)
  return rec


def environment() -> str:
  import flax
  import jax
  d = jax.devices()[0]
  return (f'{jax.device_count()} x {getattr(d, "device_kind", d.platform)} ({d.platform}); jax {jax.__version__}, '
          f'flax {flax.__version__}, python {platform.python_version()}')


def use_compile_cache(path: str) -> None:
  import jax
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def run_comparison(config, arm_specs: str, seeds: int, out: str, train_manifest: str, eval_manifest: str,
                   data_root: str = '', command: str = '', title: str = 'RAL vs GRPO at equal compute',
                   compile_cache: bool = True) -> Dict:
  """Runs (or resumes) every arm x seed and writes the results; returns the results dict (summary.write_all)."""
  arms = arms_lib.parse_arms(arm_specs)
  if seeds < 1:
    raise ValueError(f'--seeds={seeds} must be >= 1')
  for path in (train_manifest, eval_manifest):
    if not path or not os.path.exists(path):
      raise FileNotFoundError(f'manifest {path!r} does not exist (--train_manifest / --eval_manifest)')
  os.makedirs(out, exist_ok=True)
  if compile_cache:
    use_compile_cache(os.path.join(out, '.jax_cache'))
  base = config.copy_and_resolve_references()
  base.data.source = 'manifest'
  base.data.train_manifest, base.data.eval_manifest = train_manifest, eval_manifest
  base.data.data_root = data_root
  records = []
  sft = _train(arms_lib.sft_config(base), os.path.join(out, 'sft'), 'sft', 0)
  sft_final = sft['final']
  if any(a.algo == 'sft' for a in arms):
    records.append(dict(sft, arm=next(a.label for a in arms if a.algo == 'sft')))
  meta = {'title': title, 'command': command, 'environment': environment(), 'arms': arms_lib.describe(arms),
          'seeds': seeds, 'train_manifest': train_manifest, 'eval_manifest': eval_manifest,
          'config': json.loads(base.to_json_best_effort())}
  order = [a.label for a in arms]
  results = summary.write_all(out, records, order, sft_final, meta)
  for seed in range(seeds):          # seed-major: an interrupted comparison has balanced partial results
    for arm in (a for a in arms if a.trains):
      wd = os.path.join(out, 'runs', arm.dirname, f'seed{seed}')
      cfg = arms_lib.apply_arm(base, arm, seed, os.path.join(out, 'sft'))
      records.append(_train(cfg, wd, arm.label, seed))
      results = summary.write_all(out, records, order, sft_final, meta)   # results so far after every run
  return results


def define_flags():
  """The command-line flags (defined on demand, so that importing this module defines none)."""
  return dict(
      config=config_flags.DEFINE_config_file('config', None, 'base config, e.g. configs/image.py:testbed_grpo',
                                             lock_config=False),
      arms=flags.DEFINE_string('arms', 'sft,grpo,ral:0.5,ral:1,ral:5', 'comma-separated arm specs (arms.py)'),
      seeds=flags.DEFINE_integer('seeds', 3, 'seeds per training arm'),
      train=flags.DEFINE_string('train_manifest', None, 'training manifest (Video-R1 JSON or JSONL)'),
      eval=flags.DEFINE_string('eval_manifest', None, 'held-out manifest'),
      root=flags.DEFINE_string('data_root', '', "media root for relative paths (default: each manifest's directory)"),
      out=flags.DEFINE_string('out', None, 'output folder (resumable)'),
      title=flags.DEFINE_string('title', 'RAL vs GRPO at equal compute', 'title of results.md'))


def main(argv, f):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  out = f['out'].value
  res = run_comparison(f['config'].value, f['arms'].value, f['seeds'].value, out, f['train'].value,
                       f['eval'].value, f['root'].value,
                       command=' '.join(['python -m ral_jax.experiments.compare'] + sys.argv[1:]),
                       title=f['title'].value)
  with open(os.path.join(out, 'results.md')) as fh:
    print(fh.read())
  del res


if __name__ == '__main__':
  _f = define_flags()
  flags.mark_flags_as_required(['config', 'train_manifest', 'eval_manifest', 'out'])
  app.run(lambda argv: main(argv, _f))
