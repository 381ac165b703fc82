"""Video benchmark adapters: Video-MME, LongVideoBench, MVBench, NExT-QA, TempCompass, and Video-R1 eval files.

Each parser takes one raw row of the benchmark's own file and returns `adapters.make_record(...)`; see
adapters.py for the output schema. The schema each one expects is written in its docstring.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Iterator, Tuple

from ral_jax.eval.adapters_base import (LETTERS, BadRecord, Context, annotation_files, as_list, iter_nonempty, letter,
                                        make_record, media_path, read_rows, register, row_reader, split_options,
                                        strip_letter)
from ral_jax.eval.adapters_open import open_record, rows_of, split_files, split_reader
from ral_jax.rl.answers import canonical_type


def first_existing(ctx: Context, candidates) -> str:
  """The first of the media-root-relative candidate paths that exists, else the first one."""
  paths = [os.path.normpath(media_path(ctx, os.path.join(*c))) for c in candidates]
  return next((p for p in paths if os.path.exists(p)), paths[0])


@register('videomme', row_reader)
def videomme(row: dict, ctx: Context) -> dict:
  """Video-MME (lmms-lab/Video-MME, videomme/test-00000-of-00001.parquet or its JSON export):

    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
     "task_type": "Counting Problem", "question": "...", "options": ["A. ...", "B. ...", "C. ...", "D. ..."],
     "answer": "C"}
  (columns as lmms-eval tasks/videomme/utils.py reads them). Video: the first that exists of
  <media_root>/data/<videoID>.mp4 (the release's videos_chunked_*.zip extract to data/; lmms-eval also tries
  .MP4 and .mkv), <media_root>/<videoID>.mp4 and <media_root>/../data/<videoID>.mp4 (the default root of
  lmms-lab's videomme/test-*.parquet is its videomme/ folder, the videos are in the dataset folder's data/);
  else the first. Categories: duration (short / medium / long), task_type, domain.
  """
  options = as_list(row['options'])
  vid = row['videoID']
  path = first_existing(ctx, [(*d, f'{vid}.{ext}') for d in (('data',), (), ('..', 'data'))
                              for ext in ('mp4', 'MP4', 'mkv')])
  return make_record(row['question_id'], row['question'], options, letter(row['answer'], len(options)), 'video',
                     path, {'duration': row.get('duration'), 'task_type': row.get('task_type'),
                            'domain': row.get('domain')})


# A folder (longvideobench/LongVideoBench: lvb_val.json, lvb_test_wo_gt.json, validation-00000-of-00001.parquet,
# test-00000-of-00001.parquet: the validation questions twice and a test split without answers) is read for the
# validation split once: lvb_val.json, else the validation parquet.
@register('longvideobench', split_reader(('lvb_val', 'validation', 'val'),
                                                 ('lvb_test', 'test', 'subtitles')))
def longvideobench(row: dict, ctx: Context) -> dict:
  """LongVideoBench validation (longvideobench/LongVideoBench), in either released form:

    lvb_val.json (the authors' longvideobench_dataset.py reads these keys):
      {"video_id": "86CxyhFV9MI", "question": "...", "question_wo_referring_query": "...",
       "candidates": ["...", "...", ...], "correct_choice": 2, "position": [...], "topic_category": "NP-News-Programs",
       "question_category": "TOS", "level": "L2-Relation", "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4",
       "subtitle_path": "86CxyhFV9MI_en.json", "duration_group": 600, "starting_timestamp_for_subtitles": 0,
       "duration": 527.0, "view_count": 1}
    validation-00000-of-00001.parquet (lmms-eval tasks/longvideobench/utils.py): the same columns with the
      candidates in option0 .. option4, the unused ones "N/A".
  correct_choice is the 0-based index of the right candidate (the test files have none: counted bad).
  Video: <media_root>/videos/<video_path> (videos.tar extracts to videos/). Categories: duration_group,
  question_category, level. Subtitles are not interleaved (the paper's setting feeds frames only).
  """
  if 'candidates' in row:
    options = as_list(row['candidates'])
  else:
    options = [str(o) for o in iter_nonempty(row.get(f'option{k}') for k in range(10)) if str(o) != 'N/A']
  if row.get('correct_choice') is None:
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


MVBENCH_FRAMES_FPS = 3.0   # tvqa/frames_fps3_hq: frames extracted at 3 fps

# The 'video' revision of OpenGVLab/MVBench (the one lmms-eval downloads, tasks/mvbench/utils.py DATA_LIST) ships
# these tasks already cut to their bounds, as mp4, in these folders.
MVBENCH_SEGMENT_DIRS = {
    'action_sequence': 'star/Charades_segment',
    'action_prediction': 'star/Charades_segment',
    'object_interaction': 'star/Charades_segment',
    'action_localization': 'sta/sta_video_segment',
    'episodic_reasoning': 'tvqa/video_fps3_hq_segment',
    'action_antonym': 'ssv2_video_mp4',
    'fine_grained_pose': 'nturgbd_convert',
}


def _mvbench_media(ctx: Context, stem: str, subdir: str, video: str) -> Tuple[str, bool]:
  """(path, pre-cut): the task's file in the main revision's layout (<root>/video/<dir>/, files added later
  under video/data0613/<dir>/, or the root being the video/ folder itself), else in the 'video' revision's
  pre-cut folder (then bounds and frame folders no longer apply), else the main layout's path."""
  main = [(*base, *extra, subdir, video) for base in (('video',), ()) for extra in ((), ('data0613',))]
  paths = [os.path.normpath(media_path(ctx, os.path.join(*c))) for c in main]
  hit = next((p for p in paths if os.path.exists(p)), None)
  if hit:
    return hit, False
  seg = MVBENCH_SEGMENT_DIRS.get(stem)
  if seg:
    names = list(dict.fromkeys([video, os.path.splitext(video)[0] + '.mp4']))
    cut = [os.path.normpath(media_path(ctx, os.path.join(*base, seg, n))) for base in (('video',), ()) for n in names]
    hit = next((p for p in cut if os.path.exists(p)), None)
    if hit:
      return hit, True
  return paths[0], False


@register('mvbench', row_reader)
def mvbench(row: dict, ctx: Context) -> dict:
  """MVBench (OpenGVLab/MVBench): a directory json/ with one file per task (or one such file), rows

    {"video": "166583.webm", "question": "What is the action performed by the person in the video?",
     "candidates": ["Not sure", "Scattering something down", "Pretending to throw something"],
     "answer": "Pretending to throw something", "start": 12.1, "end": 20.5}   # start/end: some tasks only
  The answer is the text of the correct candidate. Media (the task comes from the file name; folders as the
  official OpenGVLab/Ask-Anything MVBench data_list): <media_root>/video/<task dir>/<video>, or
  video/data0613/<task dir>/ (clevrer and star files added later), or <task dir>/<video> when the media root is the
  video/ folder; Episodic Reasoning points at a directory of frames taken at 3 fps (record['frames_fps'] = 3);
  tasks with bounds keep start/end (seconds) as record['segment']. The evaluator (eval/clips.py) turns both into a
  clip file in its cache before decoding. In the 'video' revision these tasks come pre-cut
  (MVBENCH_SEGMENT_DIRS): such a file is used as is. Categories: task.
  """
  stem = ctx.extra['stem']
  task, subdir, fmt, has_segment = MVBENCH_TASKS.get(stem, (stem, '', 'video', False))
  options = as_list(row['candidates'])
  if row.get('answer') not in options:
    raise BadRecord('answer not among candidates')
  answer = LETTERS[options.index(row['answer'])]
  path, precut = _mvbench_media(ctx, stem, subdir, str(row['video']))
  has_segment = has_segment and not precut
  segment = (float(row['start']), float(row['end'])) if has_segment and 'start' in row and 'end' in row else None
  uid = f'{stem}_{ctx.index}'
  rec = make_record(uid, row['question'], options, answer, 'video', path, {'task': task}, segment)
  if fmt == 'frames' and not precut:
    rec['frames_fps'] = MVBENCH_FRAMES_FPS
  return rec


_NEXTQA_GROUPS = {'C': 'Causal', 'T': 'Temporal', 'D': 'Descriptive'}


def _nextqa_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """A file as given; in a folder, the multiple-choice test questions once: lmms-lab's MC/test-*.parquet (not its
  OE/ open-ended config), else the release's test.csv (else val.csv; never train.csv).
  map_vid_vidorID.json is not a question file."""
  files = [f for f in annotation_files(path) if os.path.splitext(os.path.basename(f))[0] != 'map_vid_vidorID']
  if os.path.isdir(path):
    mc = split_files(files, path, ('mc',), ('oe',))
    files = split_files(mc, path, ('test', 'val'), ('train',))
  state = {}
  for row, ctx in rows_of(files):
    ctx.extra['nextqa'] = state   # video index, built once by the first parsed row
    yield row, ctx


def _nextqa_index(ctx: Context) -> dict:
  """{'map': map_vid_vidorID, 'videos': {stem: path under NExTVideo/}} from the media root or the folder above
  it (the dataset folder when the annotation is lmms-lab's MC/ parquet), built once."""
  state = ctx.extra['nextqa']
  if 'videos' in state:
    return state
  src = os.path.dirname(os.path.abspath(ctx.source))
  roots = [ctx.media_root, src, os.path.dirname(os.path.normpath(ctx.media_root)), os.path.dirname(src)]
  state['map'], state['videos'], state['root'] = {}, {}, ctx.media_root
  for root in roots:
    m = os.path.join(root, 'map_vid_vidorID.json')
    if not state['map'] and os.path.exists(m):
      with open(m, encoding='utf-8') as f:
        state['map'] = json.load(f)
    vdir = os.path.join(root, 'NExTVideo')
    if not state['videos'] and os.path.isdir(vdir):
      state['root'] = root
      for dirpath, _, files in os.walk(vdir):
        for name in files:
          stem, ext = os.path.splitext(name)
          if ext.lower() in ('.mp4', '.webm', '.mkv', '.avi'):
            state['videos'].setdefault(stem, os.path.join(dirpath, name))
  return state


@register('nextqa', _nextqa_reader)
def nextqa(row: dict, ctx: Context) -> dict:
  """NExT-QA multiple choice (doc-doc/NExT-QA val.csv / test.csv, or lmms-lab/NExTQA MC/test-*.parquet with
  the same columns, as lmms-eval tasks/nextqa/utils.py reads them; its videos: NExTVideo/<video>.mp4):

    video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4
    4010069381,369,640,480,how do the two man play the instrument,3,6,CH,roll the handle,...,...,...,...
  answer is the index of the correct a<k>. Video: found under NExTVideo/ (any depth: the release's
  <folder>/<video>.mp4 through map_vid_vidorID.json, or flat) in the media root or the folder above it, else
  <media_root>/<video>.mp4. Categories: group (Causal / Temporal / Descriptive, from the first letter of type) and
  type (CW, CH, TN, TC, TP, DC, DL, DO).
  """
  options = [row.get(f'a{k}') for k in range(5)]
  if any(o is None or str(o).strip() == '' for o in options):
    raise BadRecord('missing option')
  video = str(row['video'])
  idx = _nextqa_index(ctx)
  rel = idx['map'].get(video)
  path = (os.path.join(idx['root'], 'NExTVideo', f'{rel}.mp4') if rel and
          os.path.exists(os.path.join(idx['root'], 'NExTVideo', f'{rel}.mp4')) else
          idx['videos'].get(video) or idx['videos'].get(os.path.basename(rel or '')) or
          (os.path.join(idx['root'], 'NExTVideo', f'{rel}.mp4') if rel else media_path(ctx, f'{video}.mp4')))
  qtype = str(row.get('type') or '')
  return make_record(f"{video}_{row.get('qid', ctx.index)}", row['question'], options,
                     letter(int(row['answer']), 5), 'video', path,
                     {'group': _NEXTQA_GROUPS.get(qtype[:1]), 'type': qtype})


_TC_MC = re.compile(r'multi[-_ ]?choice', re.IGNORECASE)


def _is_nested(f: str):
  if not f.endswith('.json'):
    return None
  with open(f, encoding='utf-8') as fh:
    data = json.load(fh)
  return data if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()) else None


def _tempcompass_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """The multiple-choice questions of one form: the release's nested questions/multi-choice.json ({video_id:
  {dim: [{question, answer}]}}) or lmms-lab's flat rows. A folder holding several files keeps those named
  multi-choice (the other tasks, yes_no / caption_matching / captioning, are not this benchmark's MC score), and
  when it holds both forms only the nested one is read (the same questions, which would be counted twice)."""
  files = annotation_files(path)
  if len(files) > 1:
    mc = [f for f in files if _TC_MC.search(os.path.relpath(f, path))]
    files = mc or files
    # the repository root also holds predictions/<model>/ and auto_eval_results/<model>/ in the same form
    questions = [f for f in files if 'questions' in os.path.relpath(f, path).split(os.sep)[:-1]]
    files = questions or files
    nested = [f for f in files if _is_nested(f) is not None]
    if nested and len(nested) < len(files):
      logging.warning('tempcompass: %s holds both the nested and the flat form; reading only %s', path, nested)
      files = nested
  i = 0
  for f in files:
    data = _is_nested(f)
    if data is not None:
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
  uid = f"{row['video_id']}_{row.get('dim', '')}_{hashlib.sha1(question.encode()).hexdigest()[:8]}" \
      if '_k' not in row else uid
  return make_record(uid, question, options, ans, 'video', media_path(ctx, f"{row['video_id']}.mp4", 'videos'),
                     {'dim': row.get('dim')})


@register('video_r1', row_reader)
def video_r1(row: dict, ctx: Context) -> dict:
  """Video-R1's own evaluation files (eval_mvbench.json, eval_videomme.json, ...; schema of
  ral_jax/docs/method.md s.8):

    {"problem_id": 1, "problem": "...", "data_type": "video", "problem_type": "multiple choice",
     "options": ["A. ...", "B. ..."], "solution": "<answer>B</answer>", "path": "./Evaluation/MVBench/...",
     "data_source": "MVBench"}
  Every problem type is kept: multiple choice is scored by letter; numerical, OCR, free-form and regression by
  rl.answers.answer_score (the RL accuracy reward's rules; regression gets MRA partial credit).
  Categories: data_source, problem_type.
  """
  sol = str(row['solution'])
  sol = sol.split('<answer>')[-1].split('</answer>')[0].strip()
  ptype = str(row.get('problem_type') or 'free-form')
  kind = row.get('data_type', 'video')
  if kind not in ('image', 'video'):
    raise BadRecord('unknown data_type')
  cats = {'data_source': row.get('data_source'), 'problem_type': ptype}
  if canonical_type(ptype) == 'multiple choice':
    options = as_list(row['options'])
    return make_record(row['problem_id'], row['problem'], options, letter(sol, len(options)), kind,
                       media_path(ctx, row['path']), cats)
  return open_record(row['problem_id'], row['problem'], sol, kind, media_path(ctx, row['path']), 'video_r1', cats,
                     problem_type=ptype)
