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

import json
import os
import re
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ral_jax.eval.adapters_base import (BadRecord, Context, annotation_files, as_list, embedded_image, iter_nonempty,
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


# ---- readers of released folders ----------------------------------------------------------------------------
_FORMAT_RANK = ('.parquet', '.jsonl', '.json', '.csv', '.tsv')


def one_format_per_table(files: Iterable[str]) -> List[str]:
  """Keeps one file per table when a release ships it in several formats (CV-Bench: test_2d.jsonl and
  test_2d.parquet hold the same questions): parquet (images embedded), then jsonl, json, csv, tsv."""
  best = {}
  for f in files:
    stem, ext = os.path.splitext(f)
    rank = _FORMAT_RANK.index(ext.lower()) if ext.lower() in _FORMAT_RANK else len(_FORMAT_RANK)
    if stem not in best or rank < best[stem][0]:
      best[stem] = (rank, f)
  return sorted(f for _, f in best.values())


def rel_parts(path: str, root: str) -> List[str]:
  """The folder names and file name of `path` below `root` (lower case)."""
  return [p.lower() for p in os.path.relpath(path, root).split(os.sep)]


def split_files(files: Sequence[str], root: str, wanted: Sequence[str], skipped: Sequence[str]) -> List[str]:
  """The files of the evaluated split: those whose name (or a folder below root) starts with one of `wanted`
  (tried in order: the first that matches any file wins), never one starting with a `skipped` prefix; all of
  them (less skipped) when none matches."""
  def starts(f, prefixes):
    return any(part.startswith(p) for part in rel_parts(f, root) for p in prefixes)
  kept = [f for f in files if not starts(f, skipped)]
  for w in wanted:
    hit = [f for f in kept if starts(f, (w,))]
    if hit:
      return hit
  return kept


def split_reader(wanted: Sequence[str], skipped: Sequence[str]):
  """A reader of `path`: a file as given; in a folder, the files of the evaluated split (split_files)."""
  def reader(path: str) -> Iterator[Tuple[dict, Context]]:
    files = annotation_files(path)
    if os.path.isdir(path):
      files = split_files(files, path, wanted, skipped)
    yield from rows_of(files)
  return reader


def rows_of(files: Iterable[str], start: int = 0, **extra) -> Iterator[Tuple[dict, Context]]:
  """(row, Context) for every row of `files`, ctx.extra = {'stem': file stem, **extra}."""
  i = start
  for f in files:
    stem = os.path.splitext(os.path.basename(f))[0]
    for row in read_rows(f):
      yield row, Context('', '', f, i, dict(extra, stem=stem))
      i += 1


def first_path(paths: Sequence[str]) -> str:
  """The first of `paths` that exists, else the first."""
  paths = [os.path.normpath(p) for p in paths]
  return next((p for p in paths if os.path.exists(p)), paths[0])


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
_MME_IMAGE_EXTS = ('.jpg', '.png', '.jpeg', '.JPG', '.PNG', '.JPEG')


def _mme_release_rows(root: str) -> Iterator[dict]:
  """Rows of the authors' release (MME_Benchmark_release_version/[MME_Benchmark/]<category>/): each image
  <stem>.jpg|png has a <stem>.txt of two lines 'question<TAB>Yes|No', both in the category folder, or in
  <category>/images/ and <category>/questions_answers_YN/ (artwork, celebrity, landmark, posters, scene)."""
  from ral_jax.eval.aggregate import MME_COGNITION, MME_PERCEPTION
  categories = set(MME_PERCEPTION) | set(MME_COGNITION)
  for dirpath, dirnames, files in sorted(os.walk(root)):
    dirnames.sort()
    name = os.path.basename(dirpath)
    if name == 'questions_answers_YN':
      category, image_dir = os.path.basename(os.path.dirname(dirpath)), os.path.join(os.path.dirname(dirpath), 'images')
    else:
      category, image_dir = name, dirpath
    if category not in categories:
      continue
    for txt in sorted(f for f in files if f.endswith('.txt')):
      stem = txt[:-4]
      image = next((os.path.join(image_dir, stem + e) for e in _MME_IMAGE_EXTS
                    if os.path.exists(os.path.join(image_dir, stem + e))), None)
      with open(os.path.join(dirpath, txt), encoding='utf-8') as f:
        lines = [ln.strip() for ln in f if ln.strip()]
      for ln in lines:
        question, _, answer = ln.rpartition('\t')
        yield {'question_id': f'{category}/{os.path.basename(image) if image else stem}', 'image': image,
               'question': question.strip(), 'answer': answer.strip(), 'category': category}


def _mme_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """lmms-lab/MME parquet (or any table with its columns), else the release's folders of .txt files."""
  if os.path.isdir(path) and not glob_any(path, ('*.parquet', '*.jsonl', '*.json', '*.csv')):
    for i, row in enumerate(_mme_release_rows(path)):
      yield row, Context('', '', path, i)
    return
  yield from row_reader(path)


def glob_any(path: str, patterns: Sequence[str]) -> bool:
  try:
    annotation_files(path, patterns)
    return True
  except FileNotFoundError:
    return False


@register('mme', _mme_reader)
def mme(row: dict, ctx: Context) -> dict:
  """MME, two yes/no questions per image, in either released form:

    lmms-lab/MME data/test-*.parquet (lmms-eval tasks/mme/utils.py reads these columns):
      {"question_id": "code_reasoning/0020.png", "image": <image>, "question": "Is a python code shown in the
       picture? Please answer yes or no.", "answer": "Yes", "category": "code_reasoning"}
    the authors' MME_Benchmark_release_version folder: <category>/<stem>.txt lines 'question<TAB>Yes' beside
      <stem>.jpg|png, or in <category>/questions_answers_YN/ with the image in <category>/images/ (the id becomes
      '<category>/<image file>', as lmms-lab's).
  Scored 'yes_no' (the release's eval_tool/calculation.py rule); headline perception + cognition (aggregate.mme).
  Categories: category; group: question_id (the image, for acc+).
  """
  gold = str(row['answer']).strip().lower().rstrip('.')
  if gold not in ('yes', 'no'):
    raise BadRecord('answer not yes/no')
  qid = str(row['question_id'])
  rec = open_record(f'{qid}#{ctx.index}', row['question'], gold, 'image', _image(ctx, row, 'image'), 'yes_no',
                    {'category': row.get('category') or qid.split('/')[0]})
  rec['group'] = qid
  return rec


# ---- ChartQA --------------------------------------------------------------------------------------------
CHARTQA_SUFFIX = '\nAnswer the question with a single word.'
_CHARTQA_TYPES = {'test_human': 'human_test', 'test_augmented': 'augmented_test'}


def _chartqa_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """A file as given; in a folder, the test split's tables only: lmms-lab's data/test-*.parquet or the
  release's test/test_human.json + test/test_augmented.json (never its per-chart annotations/ and tables/, nor
  train / val)."""
  files = annotation_files(path)
  if os.path.isdir(path):
    files = [f for f in files if not {'annotations', 'tables', 'png'} & set(rel_parts(f, path)[:-1])]
    files = split_files(files, path, ('test',), ('train', 'val'))
  yield from rows_of(files)


@register('chartqa', _chartqa_reader)
def chartqa(row: dict, ctx: Context) -> dict:
  """ChartQA test, in either released form:

    lmms-lab/ChartQA data/test-*.parquet (lmms-eval tasks/chartqa/utils.py):
      {"type": "human_test" | "augmented_test", "question": "...", "answer": "57", "image": <image>}
    the release (vis-nlp/ChartQA, "ChartQA Dataset/test/"): test_human.json, test_augmented.json with the charts
      in test/png/ (mmpretrain's ChartQA dataset reads the same keys):
      [{"imgname": "41699051005347.png", "query": "...", "label": "57"}]   (type from the file name)
  Scored 'relaxed' (5% relative tolerance on numbers, exact otherwise). Categories: type (human_test /
  augmented_test, the two splits the paper averages over as one set).
  """
  stem = ctx.extra.get('stem', '')
  if 'query' in row:
    question, gold = row['query'], row['label']
    name = str(row['imgname'])
    image = first_path([media_path(ctx, name, 'png'), os.path.join(os.path.dirname(ctx.source), 'png', name),
                        media_path(ctx, name)])
    kind = _CHARTQA_TYPES.get(stem, stem)
  else:
    question, gold, image, kind = row['question'], row['answer'], _image(ctx, row, 'image'), row.get('type')
  return open_record(f'{stem}_{ctx.index}', f'{question}{CHARTQA_SUFFIX}', gold, 'image', image, 'relaxed',
                     {'type': kind})


# ---- VizWiz-VQA -----------------------------------------------------------------------------------------
VIZWIZ_SUFFIX = ("\nWhen the provided information is insufficient, respond with 'Unanswerable'."
                 '\nAnswer the question using a single word or phrase.')


# A folder holds the val split only (lmms-lab's data/val-*.parquet, the release's Annotations/val.json): the test
# split has no answers and train is not evaluated.
@register('vizwiz', split_reader(('val',), ('train', 'test')))
def vizwiz(row: dict, ctx: Context) -> dict:
  """VizWiz-VQA val, in either released form:

    lmms-lab/VizWiz-VQA data/val-*.parquet (lmms-eval tasks/vizwiz_vqa/utils.py):
      {"question_id": "VizWiz_val_00000000", "image": <image>, "question": "...",
       "answers": ["basil", "basil", ...10], "category": "other"}
    the release (vizwiz.org: Annotations.zip -> train.json / val.json / test.json, val.zip -> val/*.jpg; HELM's
      VizWiz scenario reads the same keys):
      {"image": "VizWiz_val_00000000.jpg", "question": "...", "answers": [{"answer": "basil",
       "answer_confidence": "yes"}, ...10], "answer_type": "other", "answerable": 1}
      image: the first that exists of <media_root>/val/<image>, <media_root>/<image> and val/ beside the
      annotation folder (<dataset>/Annotations/val.json with <dataset>/val/).
  Scored 'vqa' (VQA accuracy over all 10 answers, whatever their confidence). The test split has no answers:
  its rows are counted bad. Categories: answer_type.
  """
  answers = [a.get('answer') if isinstance(a, dict) else a for a in list(row.get('answers') or [])]
  answers = [str(a) for a in iter_nonempty(answers)]
  if not answers:
    raise BadRecord('missing answer')
  if isinstance(row.get('image'), str):        # the release: a file name under val/
    name = row['image']
    ann_dir = os.path.dirname(os.path.abspath(ctx.source))
    image = first_path([media_path(ctx, name, 'val'), media_path(ctx, name),
                        os.path.join(ann_dir, '..', 'val', name), media_path(ctx, name, '..', 'val')])
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
  """Video-MMMU (lmms-lab/VideoMMMU; folders Perception/, Comprehension/, Adaptation/ of test-*.parquet; columns
  of its dataset card and lmms-eval tasks/videommmu/utils.py):

    {"id": "validation_Art_Theory_1", "question": "...", "options": ["...", ...up to 10] | [] (may already read
     'A. ...'), "answer": "C" | "42", "question_type": "multiple-choice" | "perception" | "open",
     "link_selected": "https://..." (later revisions), "image": <image> | null (later revisions)}
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
  # lmms-eval scores 'multiple-choice' and 'perception' questions by option letter, the rest as open answers
  if options and (qtype.startswith('multiple') or qtype in ('mc', 'perception')):
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
  i, index = 0, {}
  for f in annotation_files(path, ('*.jsonl', '*.json', '*.parquet')):
    for row in read_rows(f):
      qa = row.get('qa') if isinstance(row, dict) else None
      items = [dict(q, key=row.get('key'), type=row.get('type')) if isinstance(q, dict) else q for q in qa] \
          if isinstance(qa, list) else [row]
      for q in items:
        yield q, Context('', '', f, i, {'lvbench': index})
        i += 1


_YOUTUBE_ID = re.compile(r'(?:v=|youtu\.be/|shorts/)([\w-]{11})')


def _lvbench_videos(ctx: Context) -> Dict[str, str]:
  """{YouTube id: video file} under the media root, built once: files named <id>.mp4 at any depth, and the
  layout of the release's scripts/download.sh (video2dataset --output_format files: <shard>/<n>.mp4 with a
  <shard>/<n>.json whose 'url' names the video)."""
  index = ctx.extra.setdefault('lvbench', {})
  if 'videos' in index:
    return index['videos']
  videos = {}
  for dirpath, _, files in os.walk(ctx.media_root):
    names = set(files)
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in ('.mp4', '.mkv', '.webm'):
        continue
      path = os.path.join(dirpath, name)
      videos.setdefault(stem, path)
      if stem + '.json' in names:
        try:
          with open(os.path.join(dirpath, stem + '.json'), encoding='utf-8') as f:
            m = _YOUTUBE_ID.search(str(json.load(f).get('url') or ''))
        except (OSError, ValueError, AttributeError):
          m = None
        if m:
          videos.setdefault(m.group(1), path)
  index['videos'] = videos
  return videos


@register('lvbench', _lvbench_reader)
def lvbench(row: dict, ctx: Context) -> dict:
  """LVBench, in either released form:

    THUDM (zai-org) LVBench video_info.meta.jsonl, one video a line (its lvbench/metrics/compute_accuracy.py reads
      qa[*].uid / answer / question_type):
      {"key": "4NqE2mXMLEY", "type": "sport", "qa": [{"uid": "1", "question": "What ...?\\n(A) 1636\\n(B) 1716\\n
       (C) 1666\\n(D) 1566", "answer": "D", "question_type": ["key information retrieval"],
       "time_reference": "00:15-00:19"}], "video_info": {...}}
    lmms-eval/LVBench data/train-*.parquet, one question a row (lmms-eval tasks/lvbench/utils.py): uid, question
      (options inline), answer, question_type, time_reference, video_path ("<key>.mp4"), video_info; an
      'options' list, when present, is used instead of the inline options.
  Video: <media_root>/<video_path>, else the video of that YouTube id anywhere under the media root: <key>.mp4
  (e.g. videos/<key>.mp4), or the release's download.sh layout (video2dataset shards, matched through the 'url'
  of each video's .json); else <media_root>/<key>.mp4. Scored by option letter ('choice'; the release's
  answer_util.polish_answer reads the letter the same way). Categories: question_type (a question can have
  several: it counts in each), video_type.
  """
  if row.get('options'):
    question, options = str(row['question']).strip(), as_list(row['options'])
  else:
    question, options = split_options_any(row['question'])
  video_path = str(row.get('video_path') or '')
  key = str(row.get('key') or os.path.splitext(os.path.basename(video_path))[0])
  if not key:
    raise BadRecord('missing video key')
  direct = media_path(ctx, video_path) if video_path else ''
  if direct and os.path.exists(direct):
    path = direct
  else:
    path = _lvbench_videos(ctx).get(key) or direct or media_path(ctx, f'{key}.mp4')
  qtypes = row.get('question_type') or []
  qtypes = [qtypes] if isinstance(qtypes, str) else [str(t) for t in list(qtypes)]
  rec = make_record(f"{key}_{row.get('uid', ctx.index)}", question, options, letter(row['answer'], len(options)),
                    'video', path, {'video_type': row.get('type')})
  if qtypes:
    rec['categories']['question_type'] = qtypes
  return rec
