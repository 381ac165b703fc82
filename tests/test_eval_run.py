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


def test_evaluate_end_to_end(tmp_path):
  """V* and TempCompass (image and video); MuirBench items of two images run under a preset of one media slot;
  MME is scored yes/no and reported as perception + cognition; a benchmark whose every image is missing fails
  alone and the others' results are written."""
  from ral_jax.eval import run
  vstar = _vstar_fixture(tmp_path / 'vstar')
  tc = _tempcompass_fixture(tmp_path / 'tc')
  rng = np.random.default_rng(2)
  root = tmp_path / 'data'
  os.makedirs(root)
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(root / f'{i}.png')
  muir = [{'idx': f'm{i}', 'task': 'Image-Text Matching', 'question': 'Which one? <image> <image>',
           'options': ['first', 'second'], 'answer': 'AB'[i], 'image_list': [f'{i}.png', f'{i + 1}.png']}
          for i in range(2)]
  mme = [{'question_id': 'existence/0.png', 'image': '0.png', 'question': f'Is there a {w}? Please answer yes or no.',
          'answer': a, 'category': 'existence'} for w, a in (('dog', 'Yes'), ('cat', 'No'))]
  broken = [{'idx': 0, 'type': '2D', 'task': 'Count', 'image': 'nothere.png', 'question': 'How many?',
             'choices': ['1', '2'], 'answer': '(A)', 'source': 'COCO'}]
  paths = {}
  for name, rows in (('muir', muir), ('mme', mme), ('broken', broken)):
    paths[name] = str(root / f'{name}.jsonl')
    with open(paths[name], 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  out = tmp_path / 'out'
  cfg = _config()
  assert cfg.data.max_media == 1
  sums = run.evaluate(cfg, [('vstar', vstar, ''), ('tempcompass', tc, str(tmp_path / 'tc')),
                            ('muirbench', paths['muir'], ''), ('cvbench', paths['broken'], ''),
                            ('mme', paths['mme'], '')], str(out), heatmap_examples=1, method='tiny random')
  v, t = sums['vstar'], sums['tempcompass']
  assert v['num_examples'] == 3 and t['num_examples'] == 2          # the missing image is counted, not scored
  assert v['num_bad'] == 1 and v['num_total'] == 4 and any('pipeline' in k for k in v['bad'])
  assert 0.0 <= v['accuracy'] <= 100.0 and set(t['categories']['dim']) == {'speed'}
  m = sums['muirbench']
  assert m['num_examples'] == 2 and m['num_total'] == 2 and m['num_bad'] == 0   # every item, both images
  assert 'no usable example' in sums['cvbench']['error']
  e = sums['mme']
  assert e['num_examples'] == 2 and set(e['parts']) >= {'perception', 'cognition'}
  assert 0.0 <= e['headline'] <= 200.0 and e['parts']['cognition'] == 0.0
  preds = [json.loads(l) for l in open(out / 'predictions_vstar.jsonl')]
  assert sorted(p['problem_id'] for p in preds) == ['0', '1', '2'] and all('response' in p for p in preds)
  preds = [json.loads(l) for l in open(out / 'predictions_mme.jsonl')]
  assert all(p['group'] == 'existence/0.png' and 0.0 <= p['score'] <= 1.0 for p in preds)
  data = json.load(open(out / 'results.json'))
  assert set(data['benchmarks']) == {'vstar', 'tempcompass', 'muirbench', 'cvbench', 'mme'}
  md = open(out / 'results.md').read()
  assert '| tiny random |' in md and '### vstar' in md and '### cvbench: not evaluated' in md
  assert '2 of 2 items scored' in md
  heat = sorted(os.listdir(out / 'heatmaps'))
  assert 'vstar_ex0_m0.png' in heat and any(h.startswith('tempcompass_ex0_m0_t') for h in heat)
