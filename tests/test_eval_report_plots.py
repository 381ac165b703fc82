"""Accuracy summaries, paper-layout tables, and training-curve plots from a JSONL log."""
import json
import os
import subprocess
import sys

import pytest

from ral_jax.eval import plots, report


def _results():
  return [{'problem_id': '1', 'correct': True, 'categories': {'duration': 'short', 'task': 'count'}},
          {'problem_id': '2', 'correct': False, 'categories': {'duration': 'short', 'task': 'ocr'}},
          {'problem_id': '3', 'correct': True, 'categories': {'duration': 'long', 'task': 'count'}},
          {'problem_id': '4', 'correct': True, 'categories': {'duration': 'long'}}]


def test_summarize_overall_and_per_category():
  s = report.summarize(_results(), {'missing media path': 2})
  assert s['accuracy'] == 75.0 and s['num_examples'] == 4 and s['num_bad'] == 2
  assert s['categories']['duration'] == {'long': {'accuracy': 100.0, 'num_examples': 2},
                                         'short': {'accuracy': 50.0, 'num_examples': 2}}
  assert s['categories']['task']['count']['accuracy'] == 100.0 and s['categories']['task']['ocr']['num_examples'] == 1


def test_paper_tables_layout_matches_method_md():
  sums = {'videomme': report.summarize(_results()), 'vstar': report.summarize(_results()[:2])}
  md = report.paper_tables(sums, method='RAL (mine)')
  lines = md.splitlines()
  assert lines[1] == '| method | V* | MMMU-Pro | MME | MuirBench | ChartQA | VizWiz | BLINK | CV-Bench |'
  assert lines[3] == '| RAL (mine) | 50.0 | - | - | - | - | - | - | - |'
  assert '| method | LongVideoBench | NExT-QA | Video-MME | Video-MMMU | LVBench | MVBench | TempCompass |' in lines
  assert '| RAL (mine) | - | - | 75.0 | - | - | - | - |' in lines
  # the header rows are the ones in ral_jax/docs/method.md s.7
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  method_md = os.path.join(root, 'ral_jax', 'docs', 'method.md')
  with open(method_md) as f:
    text = f.read()
  assert lines[1] in text


def test_video_r1_data_source_fills_columns():
  rows = [{'correct': True, 'categories': {'data_source': 'MVBench'}},
          {'correct': False, 'categories': {'data_source': 'TempCompass'}}]
  md = report.paper_tables({'video_r1': report.summarize(rows)})
  assert '| this run | - | - | - | - | - | 100.0 | 0.0 |' in md


def test_write_json_markdown_predictions(tmp_path):
  sums = {'nextqa': report.summarize(_results(), {'missing option': 1})}
  paths = report.write(str(tmp_path), sums, 'GRPO', per_example={'nextqa': _results()})
  data = json.load(open(paths['json']))
  assert data['method'] == 'GRPO' and data['benchmarks']['nextqa']['accuracy'] == 75.0
  md = open(paths['markdown']).read()
  assert '| GRPO | - | 75.0 |' in md and '### nextqa: 75.0 (accuracy); 4 of 5 items scored (1 skipped' in md
  assert '| short | 50.0 | 2 |' in md
  assert len(open(paths['nextqa']).read().splitlines()) == 4


def _write_log(path):
  with open(path, 'w') as f:
    for step in range(1, 6):
      f.write(json.dumps({'step': step, 'stage': 'sft', 'loss': 2.0 / step}) + '\n')
    for step in range(6, 12):
      f.write(json.dumps({'step': step, 'stage': 'rl', 'rl/reward': 0.1 * step, 'rl/accuracy': 0.05 * step,
                          'rl/jsd': 1e-3 * step, 'rl/visual_mass': 0.3, 'loss': float('nan')}) + '\n')
    f.write(json.dumps({'step': 11, 'stage': 'eval', 'eval/accuracy': 0.5}) + '\n')
    f.write('{"step": 12, "stage": "rl", "rl/rew')   # a half-written last line


def test_series_and_plot(tmp_path):
  _write_log(tmp_path / 'metrics.jsonl')
  recs = plots.read_log(str(tmp_path / 'metrics.jsonl'))
  assert len(recs) == 12
  acc = plots.series(recs, plots.PANELS[1][1])
  assert sorted(acc) == ['eval/accuracy', 'rl/accuracy'] and acc['rl/accuracy'][0] == list(range(6, 12))
  loss = plots.series(recs, r'^loss$')
  assert list(loss) == ['sft/loss'] and len(loss['sft/loss'][0]) == 5   # NaN losses dropped
  paths = plots.main(str(tmp_path))
  names = [os.path.basename(p) for p in paths]
  assert names == ['training_curves.png', 'reward.png', 'accuracy.png', 'attention_jsd_ral_term.png',
                   'attention_mass_on_visual_tokens.png', 'loss.png']
  assert all(os.path.getsize(p) > 1000 for p in paths)


def test_plot_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
    plots.main(str(tmp_path))
  (tmp_path / 'metrics.jsonl').write_text(json.dumps({'step': 1, 'other': 1.0}) + '\n')
  with pytest.raises(ValueError, match='no plottable metric'):
    plots.main(str(tmp_path))


def test_plots_cli(tmp_path):
  _write_log(tmp_path / 'metrics.jsonl')
  out = subprocess.run([sys.executable, '-m', 'ral_jax.eval.plots', f'--workdir={tmp_path}',
                        f'--out={tmp_path / "figs"}'], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert (tmp_path / 'figs' / 'training_curves.png').exists()
