"""The paper's benchmarks on fixtures in their released on-disk schemas (lmms-lab parquet with embedded images,
the original JSON / JSONL releases), the layouts a user downloads, and evaluation's preparation step."""
import os

import numpy as np
import pytest
from PIL import Image

from ral_jax.eval import clips, run
from ral_jax.eval.adapters import answer_letter_of, load_benchmark

import _eval_fixtures as fx


_png, _cell, _parquet, _write = fx.png, fx.cell, fx.parquet, fx.write


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ---- new adapters -------------------------------------------------------------------------------------------
def test_mme_lmms_parquet_read_only_root(tmp_path):
  root = tmp_path / 'MME'
  rows = [{'question_id': 'existence/1.png', 'image': _cell(), 'question': 'Is there a dog? Please answer yes or no.',
           'answer': 'Yes', 'category': 'existence'},
          {'question_id': 'existence/1.png', 'image': _cell(), 'question': 'Is there a cat? Please answer yes or no.',
           'answer': 'No', 'category': 'existence'},
          {'question_id': 'code_reasoning/0020.png', 'image': _cell((0, 0, 255)), 'question': 'Is it C++?',
           'answer': 'No', 'category': 'code_reasoning'},
          {'question_id': 'x/1.png', 'image': _cell(), 'question': 'q', 'answer': 'Maybe', 'category': 'x'}]
  ann = _parquet(root / 'data' / 'test-00000-of-00004.parquet', rows)
  before = _files(root)
  os.chmod(root / 'data', 0o555)
  try:
    res = load_benchmark('mme', ann, cache_dir=str(tmp_path / 'cache'))
  finally:
    os.chmod(root / 'data', 0o755)
  assert _files(root) == before                       # nothing written into the dataset folder
  assert len(res.records) == 3 and res.bad == {'answer not yes/no': 1}
  a, b, c = res.records
  assert a['group'] == b['group'] == 'existence/1.png' and a['problem_id'] != b['problem_id']
  assert a['solution'] == '<answer>yes</answer>' and a['scorer'] == 'yes_no' and a['options'] == []
  assert a['path'] == b['path'] and a['path'].startswith(str(tmp_path / 'cache' / 'mme'))
  assert open(c['path'], 'rb').read() == _png((0, 0, 255)) and c['categories'] == {'category': 'code_reasoning'}


def test_chartqa_lmms_parquet_and_release_json(tmp_path):
  rows = [{'type': 'human_test', 'question': 'What is the peak?', 'answer': '57', 'image': _cell()},
          {'type': 'augmented_test', 'question': 'Which year?', 'answer': '2019', 'image': _cell()}]
  res = load_benchmark('chartqa', _parquet(tmp_path / 'lmms' / 'test-00000-of-00001.parquet', rows),
                       cache_dir=str(tmp_path / 'c'))
  assert [r['categories']['type'] for r in res.records] == ['human_test', 'augmented_test']
  assert res.records[0]['scorer'] == 'relaxed' and answer_letter_of(res.records[0]) == '57'
  assert res.records[0]['problem'].startswith('What is the peak?\nAnswer the question with a single word')
  rel = load_benchmark('chartqa', _write(tmp_path / 'ChartQA' / 'test' / 'test_human.json',
                                         [{'imgname': '4169.png', 'query': 'How many?', 'label': '12'}]))
  assert rel.records[0]['path'] == str(tmp_path / 'ChartQA' / 'test' / 'png' / '4169.png')
  assert rel.records[0]['categories'] == {'type': 'human_test'}   # the release's file name, in lmms-lab's words


def test_vizwiz_lmms_parquet_and_release_json(tmp_path):
  # lmms-lab/VizWiz-VQA: question_id has no '.jpg' (lmms-eval tasks/vizwiz_vqa/utils.py appends it), answers are
  # the 10 strings.
  ans = ['basil'] * 6 + ['oregano'] * 4
  rows = [{'question_id': 'VizWiz_val_00000000', 'image': _cell(), 'question': 'What is this?',
           'answers': ans, 'category': 'other'},
          {'question_id': 'VizWiz_test_00000000', 'image': _cell(), 'question': 'What is this?',
           'answers': [], 'category': ''}]
  res = load_benchmark('vizwiz', _parquet(tmp_path / 'v' / 'val-00000-of-00001.parquet', rows),
                       cache_dir=str(tmp_path / 'c'))
  assert len(res.records) == 1 and res.bad == {'missing answer': 1}
  r = res.records[0]
  assert r['answers'] == ans and answer_letter_of(r) == 'basil' and r['scorer'] == 'vqa'
  assert "respond with 'Unanswerable'" in r['problem']
  # the release: Annotations.zip -> Annotations/val.json, val.zip -> val/ beside it (HELM's VizWiz scenario)
  os.makedirs(tmp_path / 'VizWiz' / 'val')
  (tmp_path / 'VizWiz' / 'val' / 'VizWiz_val_00000001.jpg').write_bytes(_png())
  rel = load_benchmark('vizwiz', _write(tmp_path / 'VizWiz' / 'Annotations' / 'val.json', [
      {'image': 'VizWiz_val_00000001.jpg', 'question': 'Color?', 'answer_type': 'other', 'answerable': 1,
       'answers': [{'answer': 'red', 'answer_confidence': 'yes'}] * 9 + [{'answer': 'Red', 'answer_confidence':
                                                                           'maybe'}]}]))
  assert rel.records[0]['answers'] == ['red'] * 9 + ['Red']   # every annotator, whatever the confidence
  assert rel.records[0]['path'] == str(tmp_path / 'VizWiz' / 'val' / 'VizWiz_val_00000001.jpg')


def test_videommmu_parquet_tracks_ten_options_and_open(tmp_path):
  root = tmp_path / 'VideoMMMU'
  os.makedirs(root / 'Art')
  (root / 'Art' / 'validation_Art_Theory_1.mp4').write_bytes(b'')
  # columns of lmms-lab/VideoMMMU's card (id, question, options, answer, question_type; later revisions add
  # link_selected and image); question_type 'perception' is scored by letter, as lmms-eval tasks/videommmu/utils.py
  perc = [{'id': 'validation_Art_Theory_1', 'question': 'Which painter?', 'options': [f'p{i}' for i in range(10)],
           'answer': 'J', 'question_type': 'multiple-choice', 'link_selected': 'https://x', 'image': None},
          {'id': 'validation_Physics_2', 'question': 'What speed (m/s)?', 'options': [], 'answer': '3.5',
           'question_type': 'open', 'link_selected': 'https://x', 'image': None},
          {'id': 'validation_Music_4', 'question': 'Which note?', 'options': ['A. do', 'B. re', 'C. mi'],
           'answer': 'B', 'question_type': 'perception', 'link_selected': 'https://x', 'image': None}]
  adap = [{'id': 'validation_Math_3', 'question': 'Solve <image 1>', 'options': ['1', '2', '3', '4'],
           'answer': 'B', 'question_type': 'multiple-choice', 'link_selected': 'https://x', 'image': _cell()}]
  _parquet(root / 'Perception' / 'test-00000-of-00001.parquet', perc)
  _parquet(root / 'Adaptation' / 'test-00000-of-00001.parquet', adap)
  res = load_benchmark('videommmu', str(root), cache_dir=str(tmp_path / 'c'))
  by = {r['problem_id']: r for r in res.records}
  mc, op, ad = by['validation_Art_Theory_1'], by['validation_Physics_2'], by['validation_Math_3']
  assert answer_letter_of(mc) == 'J' and len(mc['options']) == 10 and mc['options'][9] == 'J. p9'
  assert mc['path'] == str(root / 'Art' / 'validation_Art_Theory_1.mp4')
  assert mc['categories'] == {'track': 'Perception', 'discipline': 'Art'}
  assert op['scorer'] == 'open' and op['problem_type'] == 'numerical' and answer_letter_of(op) == '3.5'
  assert op['path'] == str(root / 'Science' / 'validation_Physics_2.mp4')   # expected place, not present
  per = by['validation_Music_4']
  assert per['problem_type'] == 'multiple choice' and per['options'] == ['A. do', 'B. re', 'C. mi']
  assert answer_letter_of(per) == 'B'
  assert ad['categories']['track'] == 'Adaptation' and len(ad['extra_images']) == 1
  line = run.to_manifest_line(ad)
  assert line['video'] == ad['path'] and line['images'] == ad['extra_images'] and run.num_media(ad) == 2


def test_lvbench_meta_jsonl_inline_options(tmp_path):
  meta = [{'key': '4NqE2mXMLEY', 'type': 'sport', 'video_info': {'duration_minutes': 60},
           'qa': [{'uid': '1', 'question': 'What year appears?\n(A) 1636\n(B) 1716\n(C) 1666\n(D) 1566',
                   'answer': 'D', 'question_type': ['key information retrieval', 'entity recognition'],
                   'time_reference': '00:15-00:19'},
                  {'uid': '2', 'question': 'Who wins? (A) red (B) blue (C) nobody (D) both', 'answer': '(B)',
                   'question_type': ['reasoning'], 'time_reference': ''},
                  {'uid': '3', 'question': 'No options here', 'answer': 'A', 'question_type': ['reasoning']}]}]
  os.makedirs(tmp_path / 'videos')
  (tmp_path / 'videos' / '4NqE2mXMLEY.mp4').write_bytes(b'')
  res = load_benchmark('lvbench', _write(tmp_path / 'video_info.meta.jsonl', meta, jsonl=True))
  assert len(res.records) == 2 and res.bad == {'no options in question text': 1}
  a, b = res.records
  assert a['problem'] == 'What year appears?' and a['options'][3] == 'D. 1566' and answer_letter_of(a) == 'D'
  assert a['categories'] == {'video_type': 'sport',
                             'question_type': ['key information retrieval', 'entity recognition']}
  assert b['options'] == ['A. red', 'B. blue', 'C. nobody', 'D. both'] and answer_letter_of(b) == 'B'
  assert a['path'] == str(tmp_path / 'videos' / '4NqE2mXMLEY.mp4')


# ---- real layouts of the existing adapters ------------------------------------------------------------------
def test_vstar_lmms_parquet_embedded_images(tmp_path):
  rows = [{'question_id': i, 'image': _cell((i * 40, 0, 0)), 'category': 'direct_attributes',
           'text': f'What is the color of object {i}?\n(A) white\n(B) black\n(C) red\n(D) blue\n'
                   "Answer with the option's letter from the given choices directly.", 'label': 'ABCD'[i]}
          for i in range(4)]
  res = load_benchmark('vstar', _parquet(tmp_path / 'vstar' / 'test-00000-of-00001.parquet', rows),
                       cache_dir=str(tmp_path / 'c'))
  assert len(res.records) == 4 and res.num_bad == 0
  assert [answer_letter_of(r) for r in res.records] == list('ABCD')
  assert all(os.path.isfile(r['path']) for r in res.records)


def test_longvideobench_parquet_option_columns(tmp_path):
  # validation-00000-of-00001.parquet: unused option columns hold the string "N/A" (lmms-eval
  # tasks/longvideobench/utils.py stops there)
  base = {'video_id': 'v1', 'question_wo_referring_query': 'q', 'position': [1], 'topic_category': 'NP',
          'question_category': 'TOS', 'level': 'L2-Relation', 'video_path': 'v1.mp4', 'subtitle_path': 's.json',
          'duration_group': 600, 'starting_timestamp_for_subtitles': 0.0, 'duration': 527.0, 'view_count': 1}
  rows = [dict(base, id='v1_0', question='Which?', option0='a', option1='b', option2='c', option3='d', option4='e',
               correct_choice=4),
          dict(base, id='v1_1', question='Which four?', option0='a', option1='b', option2='c', option3='d',
               option4='N/A', correct_choice=3),
          dict(base, id='v1_2', question='Out of range', option0='a', option1='b', option2='c', option3='d',
               option4='N/A', correct_choice=4)]
  res = load_benchmark('longvideobench', _parquet(tmp_path / 'lvb' / 'validation-00000.parquet', rows))
  assert [answer_letter_of(r) for r in res.records] == ['E', 'D'] and res.bad == {'answer outside options': 1}
  assert len(res.records[1]['options']) == 4
  assert res.records[0]['path'] == str(tmp_path / 'lvb' / 'videos' / 'v1.mp4')


def test_nextqa_lmms_parquet_dataset_folder(tmp_path):
  root = tmp_path / 'NExTQA'
  os.makedirs(root / 'NExTVideo' / '1106')
  (root / 'NExTVideo' / '1106' / '4010069381.mp4').write_bytes(b'')
  rows = [{'video': 4010069381, 'frame_count': 369, 'width': 640, 'height': 480, 'question': 'how do they play',
           'answer': 3, 'qid': 6, 'type': 'CH', 'a0': 'roll', 'a1': 'press', 'a2': 'hit', 'a3': 'pluck', 'a4': 'blow'}]
  ann = _parquet(root / 'MC' / 'test-00000-of-00001.parquet', rows)
  want = str(root / 'NExTVideo' / '1106' / '4010069381.mp4')
  assert load_benchmark('nextqa', ann, media_root=str(root)).records[0]['path'] == want
  assert load_benchmark('nextqa', ann).records[0]['path'] == want   # default root: the MC/ folder; found above it


def test_videomme_default_root(tmp_path):
  root = tmp_path / 'Video-MME'
  os.makedirs(root / 'data')
  (root / 'data' / 'fFjv93ACGo8.mp4').write_bytes(b'')
  rows = [{'video_id': '001', 'duration': 'short', 'domain': 'Knowledge', 'sub_category': 'History',
           'url': 'u', 'videoID': 'fFjv93ACGo8', 'question_id': '001-1', 'task_type': 'Counting Problem',
           'question': 'How many?', 'options': ['A. 1', 'B. 2', 'C. 3', 'D. 4'], 'answer': 'C'}]
  ann = _parquet(root / 'videomme' / 'test-00000-of-00001.parquet', rows)
  assert load_benchmark('videomme', ann).records[0]['path'] == str(root / 'data' / 'fFjv93ACGo8.mp4')


def test_tempcompass_both_forms_counted_once(tmp_path):
  root = tmp_path / 'TempCompass'
  nested = {'1025': {'speed': [{'question': 'How fast?\nA. slowly\nB. fast', 'answer': 'B. fast'}]},
            '1026': {'direction': [{'question': 'Which way?\nA. left\nB. right', 'answer': 'A. left'}]}}
  _write(root / 'questions' / 'multi-choice.json', nested)
  _write(root / 'questions' / 'yes_no.json', {'1025': {'speed': [{'question': 'Is it fast?', 'answer': 'yes'}]}})
  _write(root / 'multi-choice' / 'test.jsonl', [
      {'video_id': '1025', 'dim': 'speed', 'question': 'How fast?\nA. slowly\nB. fast', 'answer': 'B. fast'},
      {'video_id': '1026', 'dim': 'direction', 'question': 'Which way?\nA. left\nB. right', 'answer': 'A. left'}],
      jsonl=True)
  res = load_benchmark('tempcompass', str(root))
  assert len(res.records) == 2 and res.num_bad == 0
  flat = load_benchmark('tempcompass', str(root / 'multi-choice'))
  assert len(flat.records) == 2 and {answer_letter_of(r) for r in flat.records} == {'A', 'B'}


def test_mmmu_pro_vision_options_not_in_prompt(tmp_path):
  rows = [{'id': 'test_Art_2', 'image': 'screen.png', 'options': "['x', 'y', 'z']", 'answer': 'C', 'subject': 'Art'}]
  rec = load_benchmark('mmmu_pro', _write(tmp_path / 'vision.jsonl', rows, jsonl=True)).records[0]
  assert rec['show_options'] is False and len(rec['options']) == 3
  line = run.to_manifest_line(dict(rec, data_source='mmmu_pro'))
  assert line['options'] == [] and line['answer'] == 'C' and line['problem_type'] == 'multiple choice'


def test_video_r1_keeps_every_problem_type(tmp_path):
  base = {'data_type': 'video', 'path': 'v.mp4', 'data_source': 'VSI-Bench'}
  rows = [dict(base, problem_id=1, problem='Which?', problem_type='multiple choice', options=['A. a', 'B. b'],
               solution='<answer>B</answer>'),
          dict(base, problem_id=2, problem='How many?', problem_type='numerical', solution='<answer>3</answer>'),
          dict(base, problem_id=3, problem='Read it', problem_type='OCR', solution='<answer>STOP</answer>'),
          dict(base, problem_id=4, problem='Describe', problem_type='free-form', solution='<answer>a dog</answer>'),
          dict(base, problem_id=5, problem='How far?', problem_type='regression', solution='<answer>2.5</answer>'),
          dict(base, problem_id=6, problem='Which?', problem_type='multiple choice', options=['A. a', 'B. b'],
               solution='<answer>C</answer>')]
  res = load_benchmark('video_r1', _write(tmp_path / 'eval_vsi.json', rows))
  assert [r['problem_type'] for r in res.records] == ['multiple choice', 'numerical', 'OCR', 'free-form',
                                                      'regression']
  assert res.bad == {'answer outside options': 1}
  from ral_jax.eval import scoring
  reg = res.records[4]
  assert scoring.score(reg, '<answer>3</answer>') == pytest.approx(0.6)   # |3-2.5|/2.5 = 0.2
  assert run.to_manifest_line(res.records[1])['answer'] == '3'


# ---- MVBench frame folders and clip bounds ------------------------------------------------------------------
def test_mvbench_frame_folder_and_bounds_become_clips(tmp_path):
  from ral_jax.data.synthetic import write_video
  root = tmp_path / 'MVBench'
  frames_dir = root / 'video' / 'tvqa' / 'frames_fps3_hq' / 'castle_s01e01_seg02_clip_00'
  os.makedirs(frames_dir)
  for i in range(1, 13):   # 12 frames at 3 fps = 4 s
    Image.new('RGB', (34, 22), (i * 20, 0, 0)).save(frames_dir / f'{i:05d}.jpg')
  os.makedirs(root / 'video' / 'star' / 'Charades_v1_480')
  rng = np.random.default_rng(0)
  write_video(str(root / 'video' / 'star' / 'Charades_v1_480' / 'ABC.mp4'),
              rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), 4.0)   # 12 frames at 4 fps = 3 s
  _write(root / 'json' / 'episodic_reasoning.json', [
      {'video': 'castle_s01e01_seg02_clip_00', 'question': 'Why?', 'candidates': ['a', 'b'], 'answer': 'b',
       'start': 1.0, 'end': 2.0}])
  _write(root / 'json' / 'action_sequence.json', [
      {'video': 'ABC.mp4', 'question': 'What first?', 'candidates': ['sat', 'stood'], 'answer': 'sat',
       'start': 1.0, 'end': 2.0},
      {'video': 'ABC.mp4', 'question': 'What then?', 'candidates': ['sat', 'stood'], 'answer': 'sat',
       'start': 10.0, 'end': 12.0}])
  res = load_benchmark('mvbench', str(root / 'json'), media_root=str(root))
  ep = next(r for r in res.records if r['categories']['task'] == 'Episodic Reasoning')
  assert os.path.isdir(ep['path']) and ep['frames_fps'] == 3.0 and ep['segment'] == [1.0, 2.0]
  before = _files(root)
  recs, bad = clips.materialize_all(res.records, str(tmp_path / 'cache'))
  assert _files(root) == before and bad == {'clip: no frame inside the clip bounds': 1}
  by = {r['categories']['task'] + r['problem']: r for r in recs}
  ep_clip = by['Episodic ReasoningWhy?']['path']
  assert ep_clip.endswith('.mp4') and clips.frames_of(ep_clip) == 4        # frames 3..6 (1-based)
  seq_clip = by['Action SequenceWhat first?']['path']
  assert clips.frames_of(seq_clip) == 5                                     # t = 1.0, 1.25, ..., 2.0
  from ral_jax.data import media
  frames, _ = media.load_video(ep_clip, media.VideoConfig(fps=3.0, max_frames=8, min_frames=2))
  assert frames.shape == (4, 22, 34, 3)
  # the kept frames are numbers 3..6, whose red level is 20 * number (near-lossless H.264)
  np.testing.assert_allclose(frames[..., 0].mean(axis=(1, 2)), [60, 80, 100, 120], atol=6)
  again, _ = clips.materialize_all(res.records[:1], str(tmp_path / 'cache'))   # cached: same file
  assert again[0]['path'] in {r['path'] for r in recs}


# ---- preparation: names, merging, failures before the model ---------------------------------------------------
def _cv_rows(kind, n):
  src = 'ADE20K' if kind == '2D' else 'Omni3D'
  return [{'idx': i, 'type': kind, 'task': 'Count', 'image': f'img/{i}.png', 'question': 'How many?',
           'choices': ['1', '2'], 'answer': '(A)', 'source': src} for i in range(n)]


def test_prepare_merges_repeated_bench_and_rejects_before_the_model(tmp_path):
  d2 = _write(tmp_path / 'cv' / 'test_2d.jsonl', _cv_rows('2D', 3), jsonl=True)
  d3 = _write(tmp_path / 'cv' / 'test_3d.jsonl', _cv_rows('3D', 2), jsonl=True)
  empty = _write(tmp_path / 'v' / 'bad.jsonl', [{'text': 'x'}], jsonl=True)
  prep = run.prepare([('cvbench', d2, ''), ('cvbench', d3, ''), ('vstar', empty, '')], str(tmp_path / 'cache'))
  assert len(prep['cvbench'].records) == 5 and prep['cvbench'].num_total == 5 and not prep['cvbench'].error
  assert 'no usable record' in prep['vstar'].error
  with pytest.raises(ValueError, match=r"unknown benchmark\(s\) \['mme_nope'\]"):
    run.prepare([('cvbench', d2, ''), ('mme_nope', d2, '')], str(tmp_path / 'cache'))
  with pytest.raises(ValueError, match='no benchmark has a usable record'):   # raised before any model is built
    run.evaluate(None, [('vstar', empty, '')], str(tmp_path / 'out'))
