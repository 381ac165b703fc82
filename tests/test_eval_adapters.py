"""Benchmark adapters on small fixtures written in each benchmark's released schema."""
import csv
import json
import os

import pytest

from ral_jax.eval import adapters
from ral_jax.eval.adapters import answer_letter_of, load_benchmark


def _jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return str(path)


def _json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)
  return str(path)


def test_all_paper_benchmarks_registered():
  names = set(adapters.benchmarks())
  assert {'vstar', 'muirbench', 'blink', 'cvbench', 'mmmu_pro', 'videomme', 'longvideobench', 'mvbench',
          'nextqa', 'tempcompass', 'video_r1'} <= names


def test_vstar(tmp_path):
  rows = [
      {'question_id': 0, 'image': 'direct_attributes/sa_1.jpg', 'category': 'direct_attributes',
       'text': "What is the color of the shirt?\n(A) white\n(B) black\n(C) red\n(D) blue\n"
               "Answer with the option's letter from the given choices directly.", 'label': 'B'},
      {'question_id': 1, 'image': 'relative_position/sa_2.jpg', 'category': 'relative_position',
       'text': 'Is the cup on the left or right of the dog?\n(A) left\n(B) right', 'label': 'A'},
      {'question_id': 2, 'image': 'x.jpg', 'category': 'direct_attributes', 'text': 'no options here', 'label': 'A'},
      'this line is not json',
  ]
  res = load_benchmark('vstar', _jsonl(tmp_path / 'test_questions.jsonl', rows))
  assert len(res.records) == 2 and res.num_bad == 2
  r = res.records[0]
  assert r['problem'] == 'What is the color of the shirt?'
  assert r['options'] == ['A. white', 'B. black', 'C. red', 'D. blue']
  assert r['solution'] == '<answer>B</answer>' and answer_letter_of(r) == 'B'
  assert r['path'] == os.path.join(str(tmp_path), 'direct_attributes/sa_1.jpg')
  assert r['data_type'] == 'image' and r['problem_type'] == 'multiple choice' and r['data_source'] == 'vstar'
  assert r['categories'] == {'category': 'direct_attributes'}
  assert res.bad['no options in question text'] == 1


def test_muirbench_embedded_images_cached(tmp_path):
  # Parquet image cells are {'bytes', 'path'} dicts: fed straight to the parser (JSON cannot hold bytes).
  from ral_jax.eval import adapters_image
  ctx = adapters.Context('muirbench', str(tmp_path), 'muir.parquet', 0, cache_dir=str(tmp_path / 'cache'))
  row = {'idx': 'm1', 'task': 'Image-Text Matching', 'image_relation': 'Narrative', 'image_type': 'photo',
         'question': 'Which image shows a cat? <image> <image>', 'options': ['first', 'second', 'None'],
         'answer': 'B', 'image_list': [{'bytes': b'PNGfake1', 'path': 'a.png'}, {'bytes': b'PNGfake2', 'path': 'b.png'}],
         'counterpart_idx': 'm2'}
  rec = adapters_image.muirbench(row, ctx)
  paths = rec['path']
  assert len(paths) == 2 and paths[0] != paths[1] and paths[0].startswith(str(tmp_path / 'cache' / 'muirbench'))
  assert [open(p, 'rb').read() for p in paths] == [b'PNGfake1', b'PNGfake2']
  assert rec['categories']['task'] == 'Image-Text Matching' and answer_letter_of(rec) == 'B'
  rows = [{**row, 'image_list': ['imgs/x.png']}, {**row, 'idx': 'm2', 'answer': 'D', 'image_list': ['y.png']},
          {**row, 'idx': 'm3', 'image_list': []}]
  res = load_benchmark('muirbench', _jsonl(tmp_path / 'muir.jsonl', rows))
  assert len(res.records) == 1 and res.records[0]['path'] == [os.path.join(str(tmp_path), 'imgs/x.png')]
  assert res.bad == {'answer outside options': 1, 'missing media path': 1}


def test_blink_multi_image_and_paren_answer(tmp_path):
  rows = [{'idx': 'val_Counting_1', 'question': 'How many blue balls?', 'sub_task': 'Counting',
           'image_1': 'c1.jpg', 'image_2': None, 'image_3': None, 'image_4': None,
           'choices': ['2', '3', '4', '5'], 'answer': '(C)', 'prompt': '...', 'explanation': ''},
          {'idx': 'val_Visual_Correspondence_1', 'question': 'Which point matches?', 'sub_task': None,
           'image_1': 'v1.jpg', 'image_2': 'v2.jpg', 'image_3': None, 'image_4': None,
           'choices': ['A', 'B', 'C', 'D'], 'answer': '(A)'},
          {'idx': 'val_x', 'question': 'q', 'sub_task': 'x', 'image_1': None, 'choices': ['a', 'b'], 'answer': '(A)'}]
  res = load_benchmark('blink', _jsonl(tmp_path / 'Visual_Correspondence.jsonl', rows))
  assert [answer_letter_of(r) for r in res.records] == ['C', 'A']
  assert isinstance(res.records[0]['path'], str) and len(res.records[1]['path']) == 2
  assert res.records[1]['categories']['sub_task'] == 'Visual_Correspondence'  # from the file name
  assert res.bad['missing media path'] == 1


def test_cvbench(tmp_path):
  rows = [{'idx': 0, 'type': '2D', 'task': 'Count', 'image': 'img/2D/count/ade20k_10.png',
           'question': 'How many pictures are in the image?', 'choices': ['3', '2', '1', '0'], 'answer': '(C)',
           'prompt': '...', 'filename': 'img/2D/count/ade20k_10.png', 'source': 'ADE20K'},
          {'idx': 0, 'type': '3D', 'task': 'Depth', 'image': 'img/3D/depth/omni3d_1.png',
           'question': 'Which is closer?', 'choices': ['lamp', 'chair'], 'answer': '(B)', 'source': 'Omni3D'}]
  res = load_benchmark('cvbench', _jsonl(tmp_path / 'test.jsonl', rows))
  assert [r['problem_id'] for r in res.records] == ['2D_0', '3D_0']
  assert res.records[1]['categories'] == {'type': '3D', 'task': 'Depth', 'source': 'Omni3D'}
  assert res.records[0]['options'][2] == 'C. 1'


def test_mmmu_pro_standard_and_vision(tmp_path):
  rows = [{'id': 'test_Art_1', 'question': 'Compare <image 2> with <image 1>.', 'options': "['oil', 'water', \"it's ink\"]",
           'image_1': 'a1.png', 'image_2': 'a2.png', 'image_3': None, 'answer': 'C', 'subject': 'Art'},
          {'id': 'test_Art_2', 'question': '', 'image': 'screen.png', 'options': "['x', 'y']", 'answer': 'A',
           'subject': 'Art'},
          {'id': 'test_Art_3', 'question': 'q <image 1>', 'options': 'not a list', 'image_1': 'a.png', 'answer': 'A'}]
  res = load_benchmark('mmmu_pro', _jsonl(tmp_path / 'mmmu_pro.jsonl', rows))
  assert len(res.records) == 2 and res.bad['options not a list'] == 1
  std, vis = res.records
  assert [os.path.basename(p) for p in std['path']] == ['a2.png', 'a1.png']   # order of the <image k> tags
  assert std['options'][2] == "C. it's ink"
  assert vis['path'].endswith('screen.png') and vis['problem'].startswith('Answer the question')


def test_videomme(tmp_path):
  rows = [{'video_id': '001', 'duration': 'short', 'domain': 'Knowledge', 'sub_category': 'History',
           'url': 'u', 'videoID': 'fFjv93ACGo8', 'question_id': '001-1', 'task_type': 'Counting Problem',
           'question': 'How many people appear?', 'options': ['A. 1', 'B. 2', 'C. 3', 'D. 4'], 'answer': 'C'},
          {'video_id': '002', 'duration': 'long', 'videoID': 'zzz', 'question_id': '002-1', 'question': 'q',
           'options': ['A. 1', 'B. 2'], 'answer': 'E'}]
  res = load_benchmark('videomme', _json(tmp_path / 'videomme.json', rows))
  assert len(res.records) == 1 and res.num_bad == 1
  r = res.records[0]
  assert r['options'] == ['A. 1', 'B. 2', 'C. 3', 'D. 4'] and r['data_type'] == 'video'
  assert r['path'] == os.path.join(str(tmp_path), 'data', 'fFjv93ACGo8.mp4')
  assert r['categories']['duration'] == 'short'


def test_longvideobench(tmp_path):
  rows = [{'video_id': '86CxyhFV9MI', 'question': 'Which subtitle appears with the red car?',
           'candidates': ['one', 'two', 'three', 'four', 'five'], 'correct_choice': 4, 'position': [1, 2],
           'topic_category': 'NP', 'question_category': 'TOS', 'level': 'L2-Relation', 'id': '86CxyhFV9MI_0',
           'video_path': '86CxyhFV9MI.mp4', 'subtitle_path': 's.json', 'duration_group': 600, 'duration': 527.0},
          {'video_id': 'v', 'question': 'q', 'candidates': ['a', 'b'], 'id': 'v_0', 'video_path': 'v.mp4'}]
  res = load_benchmark('longvideobench', _json(tmp_path / 'lvb_val.json', rows), media_root='/data/lvb')
  assert len(res.records) == 1 and res.bad['missing answer'] == 1
  r = res.records[0]
  assert answer_letter_of(r) == 'E' and r['path'] == '/data/lvb/videos/86CxyhFV9MI.mp4'
  assert r['categories'] == {'duration_group': '600', 'question_category': 'TOS', 'level': 'L2-Relation'}


def test_mvbench_per_task_dir(tmp_path):
  _json(tmp_path / 'json' / 'action_antonym.json', [
      {'video': '166583.webm', 'question': 'What is the action?', 'candidates': ['Not sure', 'Throwing', 'Catching'],
       'answer': 'Catching'},
      {'video': '2.webm', 'question': 'q', 'candidates': ['x', 'y'], 'answer': 'z'}])
  _json(tmp_path / 'json' / 'action_sequence.json', [
      {'video': 'ABC.mp4', 'question': 'What did the person do first?', 'candidates': ['sat', 'stood'],
       'answer': 'sat', 'start': 3.5, 'end': 9.0}])
  res = load_benchmark('mvbench', str(tmp_path / 'json'), media_root=str(tmp_path))
  assert len(res.records) == 2 and res.bad['answer not among candidates'] == 1
  anto, seq = sorted(res.records, key=lambda r: r['categories']['task'])
  assert anto['categories']['task'] == 'Action Antonym' and answer_letter_of(anto) == 'C'
  assert anto['path'] == os.path.join(str(tmp_path), 'video', 'ssv2_video', '166583.webm')
  assert seq['segment'] == [3.5, 9.0] and anto['segment'] is None
  assert seq['path'].endswith('star/Charades_v1_480/ABC.mp4')


def test_nextqa_csv_with_video_map(tmp_path):
  header = ['video', 'frame_count', 'width', 'height', 'question', 'answer', 'qid', 'type', 'a0', 'a1', 'a2', 'a3', 'a4']
  with open(tmp_path / 'val.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerow([4010069381, 369, 640, 480, 'how do the two man play the instrument', 3, 6, 'CH',
                'roll', 'press', 'hit', 'pluck', 'blow'])
    w.writerow([5, 10, 640, 480, 'why did the boy fall', 7, 1, 'CW', 'a', 'b', 'c', 'd', 'e'])
    w.writerow([6, 10, 640, 480, 'where is it', 0, 2, 'DL', 'a', '', 'c', 'd', 'e'])
  _json(tmp_path / 'map_vid_vidorID.json', {'4010069381': '1106/4010069381'})
  res = load_benchmark('nextqa', str(tmp_path / 'val.csv'))
  assert len(res.records) == 1 and res.bad == {'answer outside options': 1, 'missing option': 1}
  r = res.records[0]
  assert answer_letter_of(r) == 'D' and r['options'][3] == 'D. pluck'
  assert r['path'] == os.path.join(str(tmp_path), 'NExTVideo', '1106/4010069381.mp4')
  assert r['categories'] == {'group': 'Causal', 'type': 'CH'}


def test_tempcompass_nested_and_flat(tmp_path):
  nested = {'1025': {'speed': [{'question': 'How fast is the car?\nA. slowly\nB. fast\nC. not moving',
                                'answer': 'B. fast'}],
                     'direction': [{'question': 'Which way?\nA. left\nB. right', 'answer': 'right'},
                                   {'question': 'Which way?', 'answer': 'A'}]}}
  res = load_benchmark('tempcompass', _json(tmp_path / 'questions' / 'multi-choice.json', nested),
                       media_root=str(tmp_path))
  assert [answer_letter_of(r) for r in res.records] == ['B', 'B'] and res.num_bad == 1
  assert res.records[0]['path'] == os.path.join(str(tmp_path), 'videos', '1025.mp4')
  assert res.records[1]['categories'] == {'dim': 'direction'}
  flat = load_benchmark('tempcompass', _jsonl(tmp_path / 'tc.jsonl', [
      {'video_id': '7', 'dim': 'order', 'question': 'What first?\nA. x\nB. y', 'answer': 'A. x'}]))
  assert answer_letter_of(flat.records[0]) == 'A'


def test_video_r1_passthrough(tmp_path):
  rows = [{'problem_id': 1, 'problem': 'What happens?', 'data_type': 'video', 'problem_type': 'multiple choice',
           'options': ['A. a', 'B. b'], 'solution': '<answer>B</answer>', 'path': './Evaluation/MVBench/v.mp4',
           'data_source': 'MVBench'},
          {'problem_id': 2, 'problem': 'How many?', 'problem_type': 'numerical', 'solution': '<answer>3</answer>'}]
  res = load_benchmark('video_r1', _json(tmp_path / 'eval_mvbench.json', rows))
  assert len(res.records) == 1 and res.bad == {'malformed (KeyError)': 1}   # the numerical one has no path
  assert res.records[0]['categories'] == {'data_source': 'MVBench', 'problem_type': 'multiple choice'}


def test_check_and_errors(tmp_path):
  res = load_benchmark('vstar', _jsonl(tmp_path / 'bad.jsonl', ['{', '{"text": "x"}']))
  with pytest.raises(ValueError, match='no usable record'):
    res.check()
  with pytest.raises(ValueError, match='unknown benchmark'):
    load_benchmark('mme_nope', str(tmp_path / 'bad.jsonl'))
  with pytest.raises(FileNotFoundError):
    load_benchmark('vstar', str(tmp_path / 'missing.jsonl'))
  good = {'question_id': 1, 'image': 'a.jpg', 'text': 'q\n(A) x\n(B) y', 'label': 'A'}
  res = load_benchmark('vstar', _jsonl(tmp_path / 'mix.jsonl', [good, '{', '{', '{']))
  with pytest.raises(ValueError, match='3 of 4'):
    res.check(max_bad_fraction=0.5)
  assert res.check(max_bad_fraction=0.8) is res
