"""Adapters on whole dataset folders as each benchmark releases them (several splits, several formats of one
table, per-item side files), and the places the releases put their media. Each fixture names the file its
layout was checked against."""
import os

import pytest

from ral_jax.eval import aggregate, scoring
from ral_jax.eval.adapters import answer_letter_of, load_benchmark

import _eval_fixtures as fx


_png, _cell, _parquet, _write = fx.png, fx.cell, fx.parquet, fx.write


def _touch(path, data=b''):
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


# ---- image benchmarks -------------------------------------------------------------------------------------------
def test_vstar_folder_reads_test_questions_not_per_image_json(tmp_path):
  # craigwu/vstar_bench: test_questions.jsonl beside direct_attributes/<img>.jpg + <img>.json (the per-image
  # json, {"question", "options" (right one first), "target_object", "bbox"}, is what penghao-wu/vstar
  # vstar_bench_eval.py reads; it must not be read as questions).
  root = tmp_path / 'vstar_bench'
  _touch(root / 'direct_attributes' / 'sa_1.jpg', _png())
  _write(root / 'direct_attributes' / 'sa_1.json', {'target_object': ['shirt'], 'bbox': [[1, 2, 3, 4]],
                                                    'question': 'What color?', 'options': ['red', 'blue']})
  _write(root / 'test_questions.jsonl', [
      {'question_id': 0, 'image': 'direct_attributes/sa_1.jpg', 'category': 'direct_attributes', 'label': 'B',
       'text': "What color?\n(A) blue\n(B) red\nAnswer with the option's letter from the given choices directly."}],
      jsonl=True)
  res = load_benchmark('vstar', str(root))
  assert len(res.records) == 1 and res.num_bad == 0
  assert answer_letter_of(res.records[0]) == 'B' and res.records[0]['path'] == str(root / 'direct_attributes' /
                                                                                     'sa_1.jpg')
  side = load_benchmark('vstar', str(root / 'direct_attributes' / 'sa_1.json'))
  assert side.bad == {'per-image annotation (read test_questions.jsonl)': 1}


def test_mme_release_folders_both_layouts(tmp_path):
  # MME_Benchmark_release_version: <category>/<stem>.png + <stem>.txt ('question<TAB>Yes' lines), and for
  # artwork / celebrity / landmark / posters / scene <category>/images/ + <category>/questions_answers_YN/
  # (the layout the release's eval_tool and LLaVA's convert_answer_to_mme.py walk).
  root = tmp_path / 'MME_Benchmark_release_version'
  _touch(root / 'OCR' / '0001.jpg', _png())
  _touch(root / 'OCR' / '0001.txt', b'Is the word "angie\'s"? Please answer yes or no.\tYes\n'
                                    b'Is the word "angle\'s"? Please answer yes or no.\tNo\n\n')
  _touch(root / 'artwork' / 'images' / '10002.jpg', _png((0, 255, 0)))
  _touch(root / 'artwork' / 'questions_answers_YN' / '10002.txt',
         b'Is it a painting? Please answer yes or no.\tYes\r\nIs it glassware? Please answer yes or no.\tNo\r\n')
  _touch(root / 'eval_tool' / 'Your_Results' / 'OCR.txt', b'not a category\tYes\n')
  res = load_benchmark('mme', str(root))
  assert len(res.records) == 4 and res.num_bad == 0
  by = {r['problem']: r for r in res.records}
  ocr = by['Is the word "angie\'s"? Please answer yes or no.']
  art = by['Is it glassware? Please answer yes or no.']
  assert ocr['group'] == 'OCR/0001.jpg' and ocr['categories'] == {'category': 'OCR'}
  assert ocr['path'] == str(root / 'OCR' / '0001.jpg') and answer_letter_of(ocr) == 'yes'
  assert art['group'] == 'artwork/10002.jpg' and art['path'] == str(root / 'artwork' / 'images' / '10002.jpg')
  assert answer_letter_of(art) == 'no'
  rows = [{'problem_id': r['problem_id'], 'group': r['group'], 'categories': r['categories'],
           'score': scoring.score(r, '<answer>Yes</answer>')} for r in res.records]
  value, _, parts = aggregate.headline('mme', rows)
  assert parts['perception'] == pytest.approx(2 * (50 + 0)) and value == pytest.approx(100)


def test_chartqa_release_folder_reads_only_the_test_tables(tmp_path):
  # vis-nlp/ChartQA "ChartQA Dataset": {train,val,test}/ each with png/, tables/*.csv, annotations/*.json and
  # <split>_human.json + <split>_augmented.json (mmpretrain's ChartQA config: data_root test, data_prefix png).
  root = tmp_path / 'ChartQA Dataset'
  for split in ('train', 'val', 'test'):
    _write(root / split / f'{split}_human.json', [{'imgname': f'{split}1.png', 'query': 'How many?', 'label': '3'}])
    _write(root / split / f'{split}_augmented.json', [{'imgname': f'{split}2.png', 'query': 'Max?', 'label': '9'}])
    _write(root / split / 'annotations' / f'{split}1.json', {'models': [], 'type': 'v_bar'})
    _touch(root / split / 'tables' / f'{split}1.csv', b'Year,Value\n2019,3\n')
    _touch(root / split / 'png' / f'{split}1.png', _png())
  res = load_benchmark('chartqa', str(root))
  assert res.num_bad == 0 and len(res.records) == 2
  assert sorted(r['categories']['type'] for r in res.records) == ['augmented_test', 'human_test']
  human = next(r for r in res.records if r['categories']['type'] == 'human_test')
  assert human['path'] == str(root / 'test' / 'png' / 'test1.png')


def test_vizwiz_annotations_folder_reads_val_only(tmp_path):
  # vizwiz.org Annotations.zip: train.json, val.json, test.json (test without answers).
  ann = tmp_path / 'VizWiz' / 'Annotations'
  one = {'question': 'What is it?', 'answer_type': 'other', 'answerable': 1,
         'answers': [{'answer': 'soup', 'answer_confidence': 'yes'}] * 10}
  _write(ann / 'train.json', [dict(one, image='VizWiz_train_00000000.jpg')])
  _write(ann / 'val.json', [dict(one, image='VizWiz_val_00000000.jpg')])
  _write(ann / 'test.json', [{'image': 'VizWiz_test_00000000.jpg', 'question': 'What is it?'}])
  res = load_benchmark('vizwiz', str(ann))
  assert [r['problem_id'] for r in res.records] == ['VizWiz_val_00000000.jpg'] and res.num_bad == 0


def test_blink_dataset_folder_val_split_and_subtask_folder(tmp_path):
  # BLINK-Benchmark/BLINK: one folder per sub-task config, val-00000-of-00001.parquet (answers) and
  # test-00000-of-00001.parquet (answers hidden).
  root = tmp_path / 'BLINK'
  row = {'idx': 'val_Counting_1', 'question': 'How many?', 'sub_task': None, 'image_1': _cell(), 'image_2': None,
         'image_3': None, 'image_4': None, 'choices': ['1', '2'], 'answer': '(B)', 'prompt': 'p',
         'explanation': ''}
  _parquet(root / 'Counting' / 'val-00000-of-00001.parquet', [row])
  _parquet(root / 'Counting' / 'test-00000-of-00001.parquet', [dict(row, idx='test_Counting_1', answer='')])
  res = load_benchmark('blink', str(root), cache_dir=str(tmp_path / 'c'))
  assert len(res.records) == 1 and res.num_bad == 0
  assert res.records[0]['categories']['sub_task'] == 'Counting' and answer_letter_of(res.records[0]) == 'B'


def test_cvbench_folder_with_jsonl_and_parquet_counts_each_question_once(tmp_path):
  # nyu-visionx/CV-Bench main: test_2d.jsonl, test_2d.parquet, test_3d.jsonl, test_3d.parquet (same questions;
  # the parquet embeds the image, the jsonl names img/2D/...; lmms-eval tasks/cv_bench/utils.py columns).
  root = tmp_path / 'CV-Bench'
  for kind, src, n in (('2D', 'ADE20K', 3), ('3D', 'Omni3D', 2)):
    rows = [{'idx': i, 'type': kind, 'task': 'Count', 'question': 'How many?', 'choices': ['1', '2'],
             'answer': '(A)', 'prompt': 'p', 'filename': f'img/{kind}/count/{i}.png', 'source': src,
             'source_dataset': src, 'source_filename': f'{i}.png', 'target_class': None, 'target_size': None,
             'bbox': None} for i in range(n)]
    _write(root / f'test_{kind.lower()}.jsonl', rows, jsonl=True)
    _parquet(root / f'test_{kind.lower()}.parquet', [dict(r, image=_cell()) for r in rows])
  res = load_benchmark('cvbench', str(root), cache_dir=str(tmp_path / 'c'))
  assert len(res.records) == 5 and res.num_bad == 0
  assert all(r['path'].startswith(str(tmp_path / 'c')) for r in res.records)   # the parquet's embedded images


def test_mmmu_pro_dataset_folder_reads_standard10_and_vision(tmp_path):
  # MMMU/MMMU_Pro: "standard (10 options)/", "standard (4 options)/", "vision/" of test-*.parquet; the paper's
  # MMMU-Pro score is the mean of standard (10 options) and vision (equal sizes: the per-question mean).
  root = tmp_path / 'MMMU_Pro'
  std = {'id': 'test_Art_1', 'question': 'Compare <image 1>.', 'options': "['<image 2>', 'b', 'c']",
         'image_1': _cell(), 'image_2': _cell((0, 0, 255)), 'image_3': None, 'image_4': None, 'image_5': None,
         'image_6': None, 'image_7': None, 'img_type': "['Paintings']", 'answer': 'A', 'topic_difficulty': 'Easy',
         'subject': 'Art', 'explanation': ''}
  _parquet(root / 'standard (10 options)' / 'test-00000-of-00001.parquet', [std])
  _parquet(root / 'standard (4 options)' / 'test-00000-of-00001.parquet', [std])
  _parquet(root / 'vision' / 'test-00000-of-00001.parquet',
           [{'id': 'test_Art_1', 'image': _cell((0, 255, 0)), 'options': "['x', 'y', 'z']", 'answer': 'C',
             'subject': 'Art'}])
  res = load_benchmark('mmmu_pro', str(root), cache_dir=str(tmp_path / 'c'))
  assert res.num_bad == 0 and len(res.records) == 2
  by = {r['problem_id']: r for r in res.records}
  s, v = by['standard (10 options)/test_Art_1'], by['vision/test_Art_1']
  assert s['categories'] == {'subject': 'Art', 'setting': 'standard'} and len(s['path']) == 2   # tag in an option
  assert v['categories'] == {'subject': 'Art', 'setting': 'vision'} and v['show_options'] is False
  one = load_benchmark('mmmu_pro', str(root / 'standard (4 options)'), cache_dir=str(tmp_path / 'c'))
  assert [r['problem_id'] for r in one.records] == ['test_Art_1']


# ---- video benchmarks -------------------------------------------------------------------------------------------
def test_longvideobench_dataset_folder_reads_validation_once(tmp_path):
  # longvideobench/LongVideoBench: lvb_val.json, lvb_test_wo_gt.json, validation-00000-of-00001.parquet,
  # test-00000-of-00001.parquet, videos/ and subtitles/ (from the .tar files).
  root = tmp_path / 'LongVideoBench'
  q = {'video_id': 'v1', 'question': 'Which?', 'question_wo_referring_query': 'Which?', 'id': 'v1_0',
       'video_path': 'v1.mp4', 'subtitle_path': 'v1_en.json', 'duration_group': 15, 'duration': 12.0,
       'question_category': 'S2E', 'level': 'L1-Perception', 'topic_category': 'KS', 'position': [1],
       'starting_timestamp_for_subtitles': 0.0, 'view_count': 1}
  _write(root / 'lvb_val.json', [dict(q, candidates=['a', 'b', 'c'], correct_choice=1)])
  _write(root / 'lvb_test_wo_gt.json', [dict(q, id='t_0', candidates=['a', 'b'])])
  _parquet(root / 'validation-00000-of-00001.parquet',
           [dict(q, option0='a', option1='b', option2='c', option3='N/A', option4='N/A', correct_choice=1)])
  _parquet(root / 'test-00000-of-00001.parquet',
           [dict(q, id='t_0', option0='a', option1='b', option2='N/A', option3='N/A', option4='N/A')])
  _write(root / 'subtitles' / 'v1_en.json', [{'start': '00:00:01.0', 'end': '00:00:02.0', 'line': 'hi'}])
  _touch(root / 'videos' / 'v1.mp4')
  res = load_benchmark('longvideobench', str(root))
  assert len(res.records) == 1 and res.num_bad == 0
  r = res.records[0]
  assert answer_letter_of(r) == 'B' and len(r['options']) == 3 and r['path'] == str(root / 'videos' / 'v1.mp4')
  only = load_benchmark('longvideobench', str(root / 'validation-00000-of-00001.parquet'))
  assert only.records[0]['options'] == r['options']


def test_nextqa_folders_multiple_choice_test_only(tmp_path):
  # lmms-lab/NExTQA: MC/test-*.parquet and OE/test-*.parquet configs, NExTVideo/ (lmms-eval reads
  # NExTVideo/<video>.mp4); doc-doc/NExT-QA: train.csv, val.csv, test.csv, map_vid_vidorID.json.
  mc = {'video': 4010069381, 'frame_count': 369, 'width': 640, 'height': 480, 'question': 'how do they play',
        'answer': 3, 'qid': 6, 'type': 'CH', 'a0': 'roll', 'a1': 'press', 'a2': 'hit', 'a3': 'pluck', 'a4': 'blow'}
  lmms = tmp_path / 'NExTQA'
  _parquet(lmms / 'MC' / 'test-00000-of-00001.parquet', [mc])
  _parquet(lmms / 'OE' / 'test-00000-of-00001.parquet',
           [{'video': 4010069381, 'question': 'what do they play', 'answer': 'guitar', 'qid': 7, 'type': 'DO',
             'additional_ref_answer': ''}] * 3)
  _touch(lmms / 'NExTVideo' / '4010069381.mp4')
  res = load_benchmark('nextqa', str(lmms))
  assert len(res.records) == 1 and res.num_bad == 0
  assert res.records[0]['path'] == str(lmms / 'NExTVideo' / '4010069381.mp4')
  rel = tmp_path / 'NExT-QA'
  header = 'video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n'
  for split, n in (('train', 5), ('val', 2), ('test', 3)):
    _touch(rel / f'{split}.csv', (header + ''.join(f'{i},1,1,1,q{i},0,{i},TN,a,b,c,d,e\n' for i in range(n))).encode())
  _write(rel / 'map_vid_vidorID.json', {'0': '1000/0'})
  assert len(load_benchmark('nextqa', str(rel)).records) == 3


def test_lvbench_flat_rows_and_download_script_layout(tmp_path):
  # lmms-eval/LVBench data/train-*.parquet: one question a row with video_path (lmms-eval tasks/lvbench/utils.py);
  # THUDM/LVBench scripts/download.sh: video2dataset --output_format files -> videos/00000/000000000.mp4 with a
  # .json whose url names the YouTube video.
  root = tmp_path / 'LVBench'
  _touch(root / 'videos' / '00000' / '000000000.mp4')
  _write(root / 'videos' / '00000' / '000000000.json',
         {'url': 'https://www.youtube.com/watch?v=4NqE2mXMLEY', 'key': '000000000', 'status': 'success'})
  meta = [{'key': '4NqE2mXMLEY', 'type': 'sport', 'video_info': {'duration_minutes': 60},
           'qa': [{'uid': '1', 'question': 'Which year?\n(A) 1636\n(B) 1716\n(C) 1666\n(D) 1566', 'answer': 'D',
                   'question_type': ['key information retrieval'], 'time_reference': '00:15-00:19'}]}]
  res = load_benchmark('lvbench', _write(root / 'video_info.meta.jsonl', meta, jsonl=True))
  assert res.records[0]['path'] == str(root / 'videos' / '00000' / '000000000.mp4')
  _touch(root / 'flat' / 'abcdefghijk.mp4')
  flat = load_benchmark('lvbench', _parquet(root / 'flat' / 'train-00000-of-00001.parquet', [
      {'uid': '7', 'question': 'Who wins?\n(A) red\n(B) blue\n(C) nobody\n(D) both', 'answer': 'B',
       'question_type': ['reasoning'], 'time_reference': '01:00-01:10', 'video_path': 'abcdefghijk.mp4'}]))
  r = flat.records[0]
  assert r['problem_id'] == 'abcdefghijk_7' and answer_letter_of(r) == 'B' and r['options'][2] == 'C. nobody'
  assert r['path'] == str(root / 'flat' / 'abcdefghijk.mp4')
  assert r['categories'] == {'question_type': ['reasoning']}


def test_mvbench_media_places(tmp_path):
  # OpenGVLab/MVBench main: video/<task dir>/ (Ask-Anything data_list), clevrer / star files added later under
  # video/data0613/<task dir>/; the 'video' revision (lmms-eval tasks/mvbench/utils.py DATA_LIST) holds the
  # bounded tasks pre-cut as mp4 in star/Charades_segment, tvqa/video_fps3_hq_segment, ...
  root = tmp_path / 'MVBench'
  _write(root / 'json' / 'moving_count.json', [
      {'video': 'video_10000.mp4', 'question': 'How many?', 'candidates': ['1', '2'], 'answer': '2'}])
  _write(root / 'json' / 'action_sequence.json', [
      {'video': 'ABC.mp4', 'question': 'What first?', 'candidates': ['sat', 'stood'], 'answer': 'sat',
       'start': 1.0, 'end': 2.0}])
  _write(root / 'json' / 'episodic_reasoning.json', [
      {'video': 'castle_s01e01_seg02_clip_00', 'question': 'Why?', 'candidates': ['a', 'b'], 'answer': 'b',
       'start': 1.0, 'end': 2.0}])
  _touch(root / 'video' / 'data0613' / 'clevrer' / 'video_validation' / 'video_10000.mp4')
  _touch(root / 'video' / 'star' / 'Charades_segment' / 'ABC.mp4')
  _touch(root / 'video' / 'tvqa' / 'video_fps3_hq_segment' / 'castle_s01e01_seg02_clip_00.mp4')
  res = load_benchmark('mvbench', str(root / 'json'), media_root=str(root))
  by = {r['categories']['task']: r for r in res.records}
  assert by['Moving Count']['path'] == str(root / 'video' / 'data0613' / 'clevrer' / 'video_validation' /
                                           'video_10000.mp4')
  seq, ep = by['Action Sequence'], by['Episodic Reasoning']
  assert seq['path'].endswith('star/Charades_segment/ABC.mp4') and seq['segment'] is None   # already cut
  assert ep['path'].endswith('video_fps3_hq_segment/castle_s01e01_seg02_clip_00.mp4') and 'frames_fps' not in ep
  inner = load_benchmark('mvbench', str(root / 'json'), media_root=str(root / 'video'))   # root = video/
  assert {r['path'] for r in inner.records} == {r['path'] for r in res.records}


def test_videomme_mkv_video(tmp_path):
  # lmms-eval tasks/videomme/utils.py: data/<videoID>.mp4, else .MP4, else .mkv
  _touch(tmp_path / 'data' / 'abc.mkv')
  rows = [{'video_id': '001', 'duration': 'short', 'domain': 'Knowledge', 'sub_category': 'History', 'url': 'u',
           'videoID': 'abc', 'question_id': '001-1', 'task_type': 'Counting Problem', 'question': 'How many?',
           'options': ['A. 1', 'B. 2', 'C. 3', 'D. 4'], 'answer': 'C'}]
  res = load_benchmark('videomme', _write(tmp_path / 'videomme' / 'test.json', rows), media_root=str(tmp_path))
  assert res.records[0]['path'] == str(tmp_path / 'data' / 'abc.mkv')


def test_vqa_contractions_as_the_official_list():
  # the VQA list's capitalised 'Im' / 'Ive' never match a lower-cased word: 'im' stays, so "i'm" is another answer
  assert scoring.vqa_normalize('im') == 'im' and scoring.vqa_normalize("couldnt've") == "couldn't've"
  assert scoring.vqa_accuracy("I'm", ['im'] * 10) == 0.0
  assert scoring.vqa_accuracy('dont know', ["don't know"] * 3 + ['no'] * 7) == pytest.approx(0.9)


def test_tempcompass_repository_root_reads_questions_only(tmp_path):
  # llyx97/TempCompass: questions/multi-choice.json, and predictions/<model>/multi-choice.json,
  # auto_eval_results/<model>/multi-choice.json in the same nested form (its eval_multi-choice.py)
  q = {'1034419625': {'action': [{'question': 'What is the man doing?\nA. dunking\nB. dribbling\nC. passing',
                                  'answer': 'A. dunking'}]}}
  _write(tmp_path / 'questions' / 'multi-choice.json', q)
  _write(tmp_path / 'predictions' / 'video-llava' / 'multi-choice.json', q)
  _write(tmp_path / 'auto_eval_results' / 'video-llava' / 'multi-choice.json', q)
  res = load_benchmark('tempcompass', str(tmp_path))
  assert len(res.records) == 1 and answer_letter_of(res.records[0]) == 'A'
  assert res.records[0]['path'] == str(tmp_path / 'videos' / '1034419625.mp4')
