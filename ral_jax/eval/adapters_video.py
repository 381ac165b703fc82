"""Video benchmark adapters: Video-MME, LongVideoBench, MVBench, NExT-QA, TempCompass, and Video-R1 eval files.

Each parser takes one raw row of the benchmark's own file and returns `adapters.make_record(...)`; see
adapters.py for the output schema. The schema each one expects is written in its docstring.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Tuple

from ral_jax.eval.adapters_base import (LETTERS, BadRecord, Context, annotation_files, as_list, letter, make_record,
                                        media_path, read_rows, register, row_reader, split_options, strip_letter)


@register('videomme', row_reader)
def videomme(row: dict, ctx: Context) -> dict:
  """Video-MME (lmms-lab/Video-MME, videomme/test-00000-of-00001.parquet or its JSON export):

    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
     "task_type": "Counting Problem", "question": "...", "options": ["A. ...", "B. ...", "C. ...", "D. ..."],
     "answer": "C"}
  Video: <media_root>/data/<videoID>.mp4 (the release's layout) or <media_root>/<videoID>.mp4.
  Categories: duration (short / medium / long), task_type, domain.
  """
  options = as_list(row['options'])
  vid = row['videoID']
  path = media_path(ctx, f'{vid}.mp4', 'data')
  if not os.path.exists(path) and os.path.exists(media_path(ctx, f'{vid}.mp4')):
    path = media_path(ctx, f'{vid}.mp4')
  return make_record(row['question_id'], row['question'], options, letter(row['answer'], len(options)), 'video',
                     path, {'duration': row.get('duration'), 'task_type': row.get('task_type'),
                            'domain': row.get('domain')})


@register('longvideobench', row_reader)
def longvideobench(row: dict, ctx: Context) -> dict:
  """LongVideoBench (longvideobench/LongVideoBench, lvb_val.json; the test file has no answers):

    {"video_id": "86CxyhFV9MI", "question": "...", "question_wo_referring_query": "...",
     "candidates": ["...", "...", ...], "correct_choice": 2, "position": [...], "topic_category": "NP-News-Programs",
     "question_category": "TOS", "level": "L2-Relation", "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4",
     "subtitle_path": "86CxyhFV9MI_en.json", "duration_group": 600, "starting_timestamp_for_subtitles": 0,
     "duration": 527.0, "view_count": 1}
  Video: <media_root>/videos/<video_path>. Categories: duration_group, question_category, level.
  Subtitles are not interleaved (the paper's setting feeds frames only).
  """
  options = as_list(row['candidates'])
  if 'correct_choice' not in row:
    raise BadRecord('missing answer')
  return make_record(row['id'], row['question'], options, letter(int(row['correct_choice']), len(options)),
                     'video', media_path(ctx, row['video_path'], 'videos'),
                     {'duration_group': row.get('duration_group'),
                      'question_category': row.get('question_category'), 'level': row.get('level')})


# MVBench (OpenGVLab/MVBench): json/<task>.json -> (task name, video sub-directory, media format, has segment).
MVBENCH_TASKS = {
    'action_sequence': ('Action Sequence', 'star/Charades_v1_480', 'video', True),
    'action_prediction': ('Action Prediction', 'star/Charades_v1_480', 'video', True),
    'action_antonym': ('Action Antonym', 'ssv2_video', 'video', False),
    'fine_grained_action': ('Fine-grained Action', 'Moments_in_Time_Raw/videos', 'video', False),
    'unexpected_action': ('Unexpected Action', 'FunQA_test/test', 'video', False),
    'object_existence': ('Object Existence', 'clevrer/video_validation', 'video', False),
    'object_interaction': ('Object Interaction', 'star/Charades_v1_480', 'video', True),
    'object_shuffle': ('Object Shuffle', 'perception/videos', 'video', False),
    'moving_direction': ('Moving Direction', 'clevrer/video_validation', 'video', False),
    'action_localization': ('Action Localization', 'sta/sta_video', 'video', True),
    'scene_transition': ('Scene Transition', 'scene_qa/video', 'video', False),
    'action_count': ('Action Count', 'perception/videos', 'video', False),
    'moving_count': ('Moving Count', 'clevrer/video_validation', 'video', False),
    'moving_attribute': ('Moving Attribute', 'clevrer/video_validation', 'video', False),
    'state_change': ('State Change', 'perception/videos', 'video', False),
    'fine_grained_pose': ('Fine-grained Pose', 'nturgbd', 'video', False),
    'character_order': ('Character Order', 'perception/videos', 'video', False),
    'egocentric_navigation': ('Egocentric Navigation', 'vlnqa', 'video', False),
    'episodic_reasoning': ('Episodic Reasoning', 'tvqa/frames_fps3_hq', 'frames', True),
    'counterfactual_inference': ('Counterfactual Inference', 'clevrer/video_validation', 'video', False),
}


@register('mvbench', row_reader)
def mvbench(row: dict, ctx: Context) -> dict:
  """MVBench (OpenGVLab/MVBench): a directory json/ with one file per task (or one such file), rows

    {"video": "166583.webm", "question": "What is the action performed by the person in the video?",
     "candidates": ["Not sure", "Scattering something down", "Pretending to throw something"],
     "answer": "Pretending to throw something", "start": 12.1, "end": 20.5}   # start/end: some tasks only
  The answer is the text of the correct candidate. Media: <media_root>/video/<task dir>/<video> (the
  release's layout; the task comes from the file name). Episodic Reasoning points at a frame directory.
  Categories: task.
  """
  stem = ctx.extra['stem']
  task, subdir, _, has_segment = MVBENCH_TASKS.get(stem, (stem, '', 'video', False))
  options = as_list(row['candidates'])
  if row.get('answer') not in options:
    raise BadRecord('answer not among candidates')
  answer = LETTERS[options.index(row['answer'])]
  segment = (float(row['start']), float(row['end'])) if has_segment and 'start' in row and 'end' in row else None
  uid = f'{stem}_{ctx.index}'
  return make_record(uid, row['question'], options, answer, 'video',
                     media_path(ctx, row['video'], 'video', subdir), {'task': task}, segment)


_NEXTQA_GROUPS = {'C': 'Causal', 'T': 'Temporal', 'D': 'Descriptive'}


def _nextqa_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """Rows of val.csv / test.csv (or the lmms-lab parquet), with map_vid_vidorID.json when found beside it."""
  vid_map = {}
  map_file = os.path.join(os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path,
                          'map_vid_vidorID.json')
  if os.path.exists(map_file):
    with open(map_file, encoding='utf-8') as f:
      vid_map = json.load(f)
  for row, ctx in row_reader(path):
    if ctx.extra['stem'] == 'map_vid_vidorID':
      continue
    ctx.extra['vid_map'] = vid_map
    yield row, ctx


@register('nextqa', _nextqa_reader)
def nextqa(row: dict, ctx: Context) -> dict:
  """NExT-QA multiple choice (doc-doc/NExT-QA val.csv / test.csv, or lmms-lab/NExTQA 'MC'):

    video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4
    4010069381,369,640,480,how do the two man play the instrument,3,6,CH,roll the handle,...,...,...,...
  answer is the index of the correct a<k>. Video: <media_root>/NExTVideo/<map_vid_vidorID[video]>.mp4 when the
  map file sits beside the csv, else <media_root>/<video>.mp4. Categories: group (Causal / Temporal /
  Descriptive, from the first letter of type) and type (CW, CH, TN, TC, TP, DC, DL, DO).
  """
  options = [row.get(f'a{k}') for k in range(5)]
  if any(o is None or str(o).strip() == '' for o in options):
    raise BadRecord('missing option')
  video = str(row['video'])
  rel = ctx.extra['vid_map'].get(video)
  path = media_path(ctx, f'{rel}.mp4', 'NExTVideo') if rel else media_path(ctx, f'{video}.mp4')
  qtype = str(row.get('type') or '')
  return make_record(f"{video}_{row['qid']}", row['question'], options, letter(int(row['answer']), 5), 'video',
                     path, {'group': _NEXTQA_GROUPS.get(qtype[:1]), 'type': qtype})


def _tempcompass_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """Flattens questions/multi-choice.json ({video_id: {dim: [{question, answer}]}}); other files row by row."""
  i = 0
  for f in annotation_files(path):
    if f.endswith('.json'):
      with open(f, encoding='utf-8') as fh:
        data = json.load(fh)
      if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        for vid, dims in data.items():
          for dim, items in dims.items():
            for k, item in enumerate(items if isinstance(items, list) else [items]):
              row = dict(item, video_id=vid, dim=dim, _k=k) if isinstance(item, dict) else item
              yield row, Context('', '', f, i)
              i += 1
        continue
    for row in read_rows(f):
      yield row, Context('', '', f, i)
      i += 1


@register('tempcompass', _tempcompass_reader)
def tempcompass(row: dict, ctx: Context) -> dict:
  """TempCompass multi-choice (llyx97/TempCompass questions/multi-choice.json, or lmms-lab/TempCompass):

    {"<video_id>": {"speed": [{"question": "How fast is the car moving?\\nA. slowly\\nB. fast", "answer": "B. fast"}],
                    "direction": [...]}}
    lmms-lab rows: {"video_id": "...", "dim": "speed", "question": "...\\nA. ...\\nB. ...", "answer": "B. fast"}
  Video: <media_root>/videos/<video_id>.mp4. Categories: dim (action, speed, direction, order,
  attribute_change).
  """
  question, options = split_options(row['question'])
  answer = str(row['answer'])
  try:
    ans = letter(answer, len(options))
  except BadRecord:
    if strip_letter(answer) not in options:
      raise
    ans = LETTERS[options.index(strip_letter(answer))]
  uid = f"{row['video_id']}_{row.get('dim', '')}_{row.get('_k', ctx.index)}"
  return make_record(uid, question, options, ans, 'video', media_path(ctx, f"{row['video_id']}.mp4", 'videos'),
                     {'dim': row.get('dim')})


@register('video_r1', row_reader)
def video_r1(row: dict, ctx: Context) -> dict:
  """Video-R1's own evaluation files (eval_mvbench.json, eval_videomme.json, ...; ral_jax/docs/method.md s.8 schema):

    {"problem_id": 1, "problem": "...", "data_type": "video", "problem_type": "multiple choice",
     "options": ["A. ...", "B. ..."], "solution": "<answer>B</answer>", "path": "./Evaluation/MVBench/...",
     "data_source": "MVBench"}
  Only multiple-choice records are kept. Categories: data_source.
  """
  if row.get('problem_type') != 'multiple choice':
    raise BadRecord('not multiple choice')
  options = as_list(row['options'])
  sol = str(row['solution'])
  sol = sol.split('<answer>')[-1].split('</answer>')[0]
  return make_record(row['problem_id'], row['problem'], options, letter(sol, len(options)),
                     row.get('data_type', 'video'), media_path(ctx, row['path']),
                     {'data_source': row.get('data_source')})
