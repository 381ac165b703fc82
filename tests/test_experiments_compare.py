"""The comparison runner end to end on tiny arms (CPU): SFT once, arms x seeds from it, results, resume; and the
arm grammar and the CI formula by hand."""
import json
import math
import os

import pytest

from ral_jax.experiments import arms as arms_lib
from ral_jax.experiments import summary


def test_arm_grammar():
  a = arms_lib.parse_arms('sft,grpo,ral:0.5,ral,ral:1@model.record_layers=(1,)@rl.attn_divergence=kl')
  assert [x.algo for x in a] == ['sft', 'grpo', 'ral', 'ral', 'ral']
  assert [x.lambda_attn for x in a] == [0.0, 0.0, 0.5, 1.0, 1.0]
  assert a[4].overrides == (('model.record_layers', (1,)), ('rl.attn_divergence', 'kl'))
  for bad in ('grpo:1', 'ral:0', 'ral:x', 'foo', 'sft@rl.lr=1', 'ral:1@rl.lr', 'grpo,grpo'):
    with pytest.raises(ValueError):
      arms_lib.parse_arms(bad)


def test_mean_ci_by_hand():
  s = summary.mean_ci([0.5, 0.6, 0.7])
  # sd = 0.1, t_{0.975,2} = 4.303: half-width 4.303 * 0.1 / sqrt(3)
  assert s['mean'] == pytest.approx(0.6) and s['ci95'] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
  assert math.isnan(summary.mean_ci([0.4])['ci95']) and summary.mean_ci([])['n'] == 0


def test_runner_end_to_end_and_resume(tmp_path):
  from configs import image as image_cfg
  from ral_jax.data import synthetic
  from ral_jax.experiments import compare
  data = tmp_path / 'data'
  synthetic.main(['--out', str(data), '--num-train', '8', '--num-heldout', '4', '--tasks', 'color,marked'])
  c = image_cfg.get_config('tiny_grpo')
  c.train.sft_steps, c.train.rl_steps, c.train.eval_every = 1, 1, 0
  c.rl.record_attention, c.rl.ral_grad_share, c.train.eval_by_source = True, True, True
  out = tmp_path / 'cmp'
  res = compare.run_comparison(c, 'sft,ral:1', 2, str(out), str(data / 'train.jsonl'),
                               str(data / 'heldout.jsonl'), command='test')
  assert set(res['summary']) == {'sft', 'ral:1'}
  for arm in ('ral:1',):
    s = res['summary'][arm]
    assert s['eval/accuracy']['n'] == 2 and math.isfinite(s['eval/accuracy']['ci95'])
    assert 0.0 <= s['eval/accuracy']['mean'] <= 1.0 and 'delta_vs_sft' in s
    assert 0.0 <= s['eval/evidence_mass']['mean'] <= 1.0 and 'eval/accuracy/color' in s
    run = next(r for r in res['runs'] if r['arm'] == arm)
    assert [p[0] for p in run['curves']['eval/accuracy']] == [0, 1]      # before and after
    assert run['before']['eval/accuracy'] == pytest.approx(res['sft_checkpoint']['eval/accuracy'])
    assert 'attn/evidence_mass' in run['train'] and 'attn/evidence_mass_old' in run['train']
  assert 'ral/grad_share' in next(r for r in res['runs'] if r['arm'] == 'ral:1')['train']
  assert sorted(r['seed'] for r in res['runs'] if r['arm'] == 'ral:1') == [0, 1]
  table = (out / 'results.md').read_text()
  assert '| ral:1 | 2 |' in table and '| arm | color | marked |' in table
  assert (out / 'eval_accuracy.png').exists() and (out / 'eval_evidence_mass.png').exists()
  # Resume: every run is done, so nothing trains again and the results are identical.
  mtime = os.path.getmtime(out / 'runs' / 'ral-1' / 'seed1' / 'result.json')
  res2 = compare.run_comparison(c, 'sft,ral:1', 2, str(out), str(data / 'train.jsonl'),
                                str(data / 'heldout.jsonl'), command='test')
  assert os.path.getmtime(out / 'runs' / 'ral-1' / 'seed1' / 'result.json') == mtime
  assert json.dumps(res2['summary'], sort_keys=True) == json.dumps(res['summary'], sort_keys=True)
