"""Adapters of the paper's benchmarks that are not plain multiple choice: MME, ChartQA, VizWiz-VQA, Video-MMMU,
LVBench (schemas of their public releases; each parser's docstring shows the row it reads).

Records follow adapters.py's schema, plus:
  scorer        the scoring rule of eval/scoring.py ('yes_no', 'relaxed', 'vqa', 'open', 'choice')
  answers       [str]   every reference answer (VizWiz: the 10 annotators' answers)
  group         str     items scored together (MME: the two questions of one image, for acc+)
  extra_images  [str]   images shown with a video (Video-MMMU Adaptation: the question's image)
Other adapters may set: show_options False (MMMU-Pro vision: the options are in the image, not in the prompt) and
frames_fps (MVBench frame folders; eval/clips.py turns them and `segment` bounds into clip files).
`open_record` builds the non-multiple-choice ones.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ral_jax.eval.adapters import (BadRecord, Context, annotation_files, as_list, embedded_image, iter_nonempty,
                                   letter, make_record, media_path, read_rows, register, row_reader, split_options)

_INLINE_OPT = re.compile(r'\(([A-Z])\)\s*')


def split_options_any(text: str) -> Tuple[str, List[str]]:
  """split_options for options on their own lines, else options inline on one line: 'q? (A) x (B) y'."""
  try:
    return split_options(text)
  except BadRecord:
    pass
  marks = list(_INLINE_OPT.finditer(str(text)))
  opts, expect = [], 0
  for m in marks:
    if m.group(1) == chr(ord('A') + expect):
      opts.append(m)
      expect += 1
  if len(opts) < 2:
    raise BadRecord('no options in question text')
  texts = [str(text)[m.end():(opts[i + 1].start() if i + 1 < len(opts) else len(str(text)))].strip()
           for i, m in enumerate(opts)]
  texts[-1] = texts[-1].split('\n')[0].strip()   # drop an instruction line after the last option
  return str(text)[:opts[0].start()].strip(), texts


def open_record(problem_id: Any, question: str, gold: str, data_type: str, path: Any, scorer: str,
                categories: Optional[Dict[str, Any]] = None, answers: Optional[Sequence[str]] = None,
                problem_type: str = 'free-form') -> dict:
  """A record with a free answer scored by `scorer` (eval/scoring.py)."""
  question = str(question or '').strip()
  if not question:
    raise BadRecord('missing question')
  gold = str(gold if gold is not None else '').strip()
  if not gold:
    raise BadRecord('missing answer')
  cats = {}
  for k, v in (categories or {}).items():
    if isinstance(v, (list, tuple)):
      v = [str(x) for x in v if str(x)]
      if v:
        cats[k] = v
    elif v is not None and str(v) != '':
      cats[k] = str(v)
  return {'problem_id': str(problem_id), 'problem': question, 'options': [], 'solution': f'<answer>{gold}</answer>',
          'data_type': data_type, 'problem_type': problem_type, 'path': path, 'categories': cats, 'segment': None,
          'scorer': scorer, 'answers': [str(a) for a in (answers or [gold])]}


def _image(ctx: Context, row: dict, *keys: str) -> str:
  for k in keys:
    if row.get(k) is not None:
      p = embedded_image(ctx, row[k], k)
      if p:
        return p
  raise BadRecord('missing media path')


# ---- MME ------------------------------------------------------------------------------------------------
@register('mme', row_reader)
def mme(row: dict, ctx: Context) -> dict:
  """MME (lmms-lab/MME, data/test-*.parquet; two yes/no questions per image):

    {"question_id": "code_reasoning/0020.png", "image": <image>, "question": "Is a python code shown in the
     picture? Please answer yes or no.", "answer": "Yes", "category": "code_reasoning"}
  Scored 'yes_no'; headline perception + cognition (aggregate.mme). Categories: category; group: question_id.
  """
  gold = str(row['answer']).strip().lower()
  if gold not in ('yes', 'no'):
    raise BadRecord('answer not yes/no')
  qid = str(row['question_id'])
  rec = open_record(f'{qid}#{ctx.index}', row['question'], gold, 'image', _image(ctx, row, 'image'), 'yes_no',
                    {'category': row.get('category') or qid.split('/')[0]})
  rec['group'] = qid
  return rec


# ---- ChartQA --------------------------------------------------------------------------------------------
CHARTQA_SUFFIX = '\nAnswer the question with a single word.'


@register('chartqa', row_reader)
def chartqa(row: dict, ctx: Context) -> dict:
  """ChartQA test (lmms-lab/ChartQA data/test-*.parquet, or the release's test/test_human.json +
  test_augmented.json with test/png/):

    lmms-lab:  {"type": "human_test", "question": "...", "answer": "57", "image": <image>}
    release:   {"imgname": "41699051005347.png", "query": "...", "label": "57"}   (type from the file name)
  Scored 'relaxed' (5% relative tolerance). Categories: type (human_test / augmented_test).
  """
  if 'query' in row:
    question, gold = row['query'], row['label']
    image = media_path(ctx, row['imgname'], 'png')
    kind = ctx.extra.get('stem', '')
  else:
    question, gold, image, kind = row['question'], row['answer'], _image(ctx, row, 'image'), row.get('type')
  stem = ctx.extra.get('stem', '')
  return open_record(f'{stem}_{ctx.index}', f'{question}{CHARTQA_SUFFIX}', gold, 'image', image, 'relaxed',
                     {'type': kind})


# ---- VizWiz-VQA -----------------------------------------------------------------------------------------
VIZWIZ_SUFFIX = ("\nWhen the provided information is insufficient, respond with 'Unanswerable'."
                 '\nAnswer the question using a single word or phrase.')


@register('vizwiz', row_reader)
def vizwiz(row: dict, ctx: Context) -> dict:
  """VizWiz-VQA val (lmms-lab/VizWiz-VQA data/val-*.parquet, or the release's Annotations/val.json + val/):

    lmms-lab:  {"question_id": "VizWiz_val_00000000.jpg", "image": <image>, "question": "...",
                "answers": ["basil", "basil", ...10], "category": "other"}
    release:   {"image": "VizWiz_val_00000000.jpg", "question": "...", "answers": [{"answer": "basil",
                "answer_confidence": "yes"}, ...10], "answer_type": "other", "answerable": 1}
  Scored 'vqa' (VQA accuracy over the 10 answers). The test split has no answers: its rows are counted bad.
  Categories: answer_type.
  """
  answers = [a.get('answer') if isinstance(a, dict) else a for a in list(row.get('answers') or [])]
  answers = [str(a) for a in iter_nonempty(answers)]
  if not answers:
    raise BadRecord('missing answer')
  if isinstance(row.get('image'), str):        # the release: a file name under val/ (or beside the json)
    name = row['image']
    image = media_path(ctx, name, 'val')
    if not os.path.exists(image) and os.path.exists(media_path(ctx, name)):
      image = media_path(ctx, name)
    uid = name
  else:
    image, uid = _image(ctx, row, 'image'), row.get('question_id', ctx.index)
  # the gold shown in the manifest: the most common answer
  gold = max(answers, key=answers.count)
  return open_record(uid, f"{row['question']}{VIZWIZ_SUFFIX}", gold, 'image', image, 'vqa',
                     {'answer_type': row.get('answer_type') or row.get('category')}, answers)


# ---- Video-MMMU -----------------------------------------------------------------------------------------
VIDEOMMMU_DISCIPLINES = {
    'Art': ('Art', 'Art_Theory', 'Design', 'Music'),
    'Science': ('Biology', 'Chemistry', 'Geography', 'Math', 'Physics'),
    'Humanities': ('History', 'Literature', 'Sociology', 'Psychology'),
    'Engineering': ('Agriculture', 'Architecture_and_Engineering', 'Computer_Science', 'Electronics',
                    'Energy_and_Power', 'Materials', 'Mechanical_Engineering'),
    'Medicine': ('Basic_Medical_Science', 'Clinical_Medicine', 'Diagnostics_and_Laboratory_Medicine', 'Pharmacy',
                 'Public_Health'),
    'Business': ('Accounting', 'Economics', 'Finance', 'Manage', 'Marketing'),
}
VIDEOMMMU_TRACKS = ('Perception', 'Comprehension', 'Adaptation')


def _videommmu_track(ctx: Context) -> str:
  parts = os.path.normpath(ctx.source).split(os.sep)
  for p in reversed(parts):
    for t in VIDEOMMMU_TRACKS:
      if p.lower().startswith(t.lower()):
        return t
  return ''


@register('videommmu', row_reader)
def videommmu(row: dict, ctx: Context) -> dict:
  """Video-MMMU (lmms-lab/VideoMMMU; folders Perception/, Comprehension/, Adaptation/ of test-*.parquet):

    {"id": "validation_Art_Theory_1", "question": "...", "options": ["...", ...up to 10] | [],
     "answer": "C" | "42", "question_type": "multiple-choice" | "open", "link_selected": "https://...",
     "image": <image> | null}
  Video: <media_root>/<discipline>/<id>.mp4 (lmms-eval's layout; discipline from the subject inside id: Art,
  Science, Humanities, Engineering, Medicine, Business), else <media_root>/videos/<id>.mp4 or <media_root>/<id>.mp4.
  Multiple choice is scored by letter ('choice', A-J); open questions by MMMU's open-answer rule ('open').
  Adaptation's question image is shown with the video. Categories: track (from the folder), discipline.
  """
  uid = str(row['id'])
  subject = '_'.join(uid.split('_')[1:-1])
  discipline = next((d for d, subs in VIDEOMMMU_DISCIPLINES.items() if subject in subs), '')
  cands = [os.path.join(discipline, f'{uid}.mp4')] if discipline else []
  cands += [os.path.join('videos', f'{uid}.mp4'), f'{uid}.mp4']
  path = next((media_path(ctx, c) for c in cands if os.path.exists(media_path(ctx, c))), media_path(ctx, cands[0]))
  cats = {'track': _videommmu_track(ctx), 'discipline': discipline}
  options = [o for o in as_list(row.get('options')) if o.strip()]
  qtype = str(row.get('question_type') or ('multiple-choice' if options else 'open')).lower()
  if qtype.startswith('multiple') or qtype == 'mc':
    rec = make_record(uid, row['question'], options, letter(row['answer'], len(options)), 'video', path, cats)
  else:
    gold = str(row['answer'])
    rec = open_record(uid, row['question'], gold, 'video', path, 'open', cats,
                      problem_type='numerical' if re.fullmatch(r'\s*[-+]?[\d,.]+\s*', gold) else 'free-form')
  if row.get('image') is not None:
    rec['extra_images'] = [embedded_image(ctx, row['image'], 'image')]
  return rec


# ---- LVBench --------------------------------------------------------------------------------------------
def _lvbench_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """Flattens video_info.meta.jsonl (one video a line, its questions in 'qa'); flat rows pass through."""
  i = 0
  for f in annotation_files(path, ('*.jsonl', '*.json', '*.parquet')):
    for row in read_rows(f):
      qa = row.get('qa') if isinstance(row, dict) else None
      items = [dict(q, key=row.get('key'), type=row.get('type')) if isinstance(q, dict) else q for q in qa] \
          if isinstance(qa, list) else [row]
      for q in items:
        yield q, Context('', '', f, i)
        i += 1


@register('lvbench', _lvbench_reader)
def lvbench(row: dict, ctx: Context) -> dict:
  """LVBench (THUDM/LVBench video_info.meta.jsonl; or the same questions flat, one a row):

    {"key": "4NqE2mXMLEY", "type": "sport", "qa": [{"uid": "1", "question": "What ...?\\n(A) 1636\\n(B) 1716\\n
     (C) 1666\\n(D) 1566", "answer": "D", "question_type": ["key information retrieval"],
     "time_reference": "00:15-00:19"}], "video_info": {...}}
  Options are inline in the question. Video: <media_root>/<key>.mp4 or <media_root>/videos/<key>.mp4.
  Categories: question_type (a question can have several: it counts in each), video_type.
  """
  question, options = split_options_any(row['question'])
  key = str(row['key'])
  path = media_path(ctx, f'{key}.mp4')
  if not os.path.exists(path) and os.path.exists(media_path(ctx, f'{key}.mp4', 'videos')):
    path = media_path(ctx, f'{key}.mp4', 'videos')
  qtypes = row.get('question_type') or []
  qtypes = [qtypes] if isinstance(qtypes, str) else [str(t) for t in list(qtypes)]
  rec = make_record(f"{key}_{row.get('uid', ctx.index)}", question, options, letter(row['answer'], len(options)),
                    'video', path, {'video_type': row.get('type')})
  if qtypes:
    rec['categories']['question_type'] = qtypes
  return rec
