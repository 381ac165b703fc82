"""End-to-end benchmark evaluation on the tiny model: fixtures in V* and TempCompass schemas with real media."""
import json
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  from configs import video
  c = video.get_config('tiny_ral')
  c.train.eval_batch = 2
  c.sampling.max_new_tokens = 6
  return c


def _vstar_fixture(root):
  rng = np.random.default_rng(0)
  os.makedirs(root / 'direct_attributes', exist_ok=True)
  rows = []
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(root / 'direct_attributes' / f'{i}.png')
    rows.append({'question_id': i, 'image': f'direct_attributes/{i}.png', 'category': 'direct_attributes',
                 'text': f'What colour is object {i}?\n(A) red\n(B) blue', 'label': 'AB'[i % 2]})
  rows.append({'question_id': 9, 'image': 'direct_attributes/missing.png', 'category': 'direct_attributes',
               'text': 'q?\n(A) x\n(B) y', 'label': 'A'})
  with open(root / 'test_questions.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return str(root / 'test_questions.jsonl')


def _tempcompass_fixture(root):
  from ral_jax.data.synthetic import write_video
  os.makedirs(root / 'videos', exist_ok=True)
  rng = np.random.default_rng(1)
  q = {}
  for vid in ('v1', 'v2'):
    write_video(str(root / 'videos' / f'{vid}.mp4'), rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8), 2.0)
    q[vid] = {'speed': [{'question': 'How fast?\nA. slow\nB. fast', 'answer': 'A. slow'}]}
  os.makedirs(root / 'questions', exist_ok=True)
  with open(root / 'questions' / 'multi-choice.json', 'w') as f:
    json.dump(q, f)
  return str(root / 'questions' / 'multi-choice.json')


def test_parse_bench_flag():
  from ral_jax.eval.run import parse_bench
  assert parse_bench('vstar:/d/test.jsonl') == ('vstar', '/d/test.jsonl', '')
  assert parse_bench('mvbench:/d/json:/d') == ('mvbench', '/d/json', '/d')
  with pytest.raises(ValueError, match='NAME:ANNOTATION'):
    parse_bench('vstar')


def test_to_manifest_line():
  from ral_jax.eval import run
  rec = {'problem_id': '1', 'problem': 'q', 'options': ['A. x', 'B. y'], 'solution': '<answer>B</answer>',
         'data_type': 'image', 'problem_type': 'multiple choice', 'path': ['/a.png', '/b.png'], 'data_source': 'blink',
         'categories': {}, 'segment': None}
  line = run.to_manifest_line(rec)
  assert line == {'id': '1', 'question': 'q', 'options': ['A. x', 'B. y'], 'answer': 'B',
                  'problem_type': 'multiple choice', 'data_source': 'blink', 'images': ['/a.png', '/b.png']}
  assert run.to_manifest_line(dict(rec, data_type='video', path='/v.mp4'))['video'] == '/v.mp4'


def test_evaluate_two_benchmarks_end_to_end(tmp_path):
  from ral_jax.eval import run
  vstar = _vstar_fixture(tmp_path / 'vstar')
  tc = _tempcompass_fixture(tmp_path / 'tc')
  out = tmp_path / 'out'
  sums = run.evaluate(_config(), [('vstar', vstar, ''), ('tempcompass', tc, str(tmp_path / 'tc'))], str(out),
                      heatmap_examples=1, method='tiny random')
  v, t = sums['vstar'], sums['tempcompass']
  assert v['num_examples'] == 3 and t['num_examples'] == 2          # the missing image is counted, not scored
  assert v['num_bad'] == 1 and any('pipeline' in k for k in v['bad'])
  assert 0.0 <= v['accuracy'] <= 100.0 and set(t['categories']['dim']) == {'speed'}
  preds = [json.loads(l) for l in open(out / 'predictions_vstar.jsonl')]
  assert sorted(p['problem_id'] for p in preds) == ['0', '1', '2'] and all('response' in p for p in preds)
  md = open(out / 'results.md').read()
  assert '| tiny random |' in md and '### vstar' in md
  heat = sorted(os.listdir(out / 'heatmaps'))
  assert 'vstar_ex0_m0.png' in heat and any(h.startswith('tempcompass_ex0_m0_t') for h in heat)
