"""Image benchmark adapters: V*, MuirBench, BLINK, CV-Bench, MMMU-Pro (schemas of their public releases).

Each parser takes one raw row of the benchmark's own file and returns `adapters.make_record(...)`; see
adapters.py for the output schema. The schema each one expects is written in its docstring.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Iterator, Tuple

from ral_jax.eval.adapters_base import (BadRecord, Context, annotation_files, as_list, embedded_image, iter_nonempty,
                                        letter, make_record, register, row_reader)
from ral_jax.eval.adapters_open import (one_format_per_table, rel_parts, rows_of, split_options_any,
                                       split_reader)


def _vstar_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """A file as given; in a folder, its test_questions.jsonl (craigwu/vstar_bench) or its parquet files
  (lmms-lab's), never the per-image <image>.json files beside the pictures."""
  files = annotation_files(path)
  if os.path.isdir(path):
    q = os.path.join(path, 'test_questions.jsonl')
    files = [q] if os.path.exists(q) else ([f for f in files if f.endswith('.parquet')] or files)
  i = 0
  for f in files:
    if f.endswith('.json'):   # a per-image annotation is one object, not a table: counted bad as such
      with open(f, encoding='utf-8') as fh:
        data = json.load(fh)
      if isinstance(data, dict) and 'options' in data:
        yield data, Context('', '', f, i)
        i += 1
        continue
    for row, ctx in rows_of([f], start=i):
      yield row, ctx
      i = ctx.index + 1


@register('vstar', _vstar_reader)
def vstar(row: dict, ctx: Context) -> dict:
  """V* Bench, one row per question, in either released form:

    craigwu/vstar_bench test_questions.jsonl, image paths relative to the folder holding it (the layout the
      benchmark's users read; the folder also holds direct_attributes/ and relative_position/ with a
      <image>.json per picture, which the authors' vstar_bench_eval.py scores with the first option right:
      those are not read):
      {"question_id": 0, "image": "direct_attributes/sa_4690.jpg", "category": "direct_attributes",
       "text": "What is the color of the woman's shirt?\\n(A) white\\n(B) black\\n...\\nAnswer with the option's
                letter from the given choices directly.", "label": "A"}
    lmms-lab(-encoder)/vstar-bench test parquet (lmms-eval tasks/vstar_bench/utils.py): the same columns, 'image'
      embeds the picture and the options are inline ('... (A) white (B) black').
  Categories: category (direct_attributes, relative_position).
  """
  if 'text' not in row and 'options' in row:
    raise BadRecord('per-image annotation (read test_questions.jsonl)')
  question, options = split_options_any(row['text'])
  image = embedded_image(ctx, row.get('image'), 'image')
  if not image:
    raise BadRecord('missing media path')
  return make_record(row.get('question_id', ctx.index), question, options, letter(row['label'], len(options)),
                     'image', image, {'category': row.get('category')})


@register('muirbench', row_reader)
def muirbench(row: dict, ctx: Context) -> dict:
  """MuirBench (MUIRBENCH/MUIRBENCH, parquet or its JSON export), multi-image:

    {"idx": "...", "task": "Image-Text Matching", "image_relation": "...", "image_type": "...",
     "question": "... <image> ... <image>", "options": ["...", ...], "answer": "A",
     "image_list": [<image cell or path>, ...], "counterpart_idx": "..."}
  Categories: task (the paper's MuirBench number is the overall accuracy).
  """
  options = as_list(row['options'])
  images = [embedded_image(ctx, im, 'image_list') for im in iter_nonempty(row.get('image_list') or [])]
  if not images:
    raise BadRecord('missing media path')
  return make_record(row['idx'], row['question'], options, letter(row['answer'], len(options)), 'image',
                     images, {'task': row.get('task'), 'image_relation': row.get('image_relation')})


_SPLIT_FILE = re.compile(r'^(val|test|validation|train)(-\d+-of-\d+)?$')


# A folder (BLINK-Benchmark/BLINK: <Sub_Task>/val-*.parquet and test-*.parquet) holds the val split only: the
# test split's answers are hidden.
@register('blink', split_reader(('val',), ('test', 'train')))
def blink(row: dict, ctx: Context) -> dict:
  """BLINK (BLINK-Benchmark/BLINK, one config folder per sub-task holding val-*.parquet / test-*.parquet; the
  val split has answers; lmms-eval tasks/blink/utils.py reads these columns):

    {"idx": "val_Counting_1", "question": "How many ...?", "sub_task": "Counting",
     "image_1": <image>, "image_2": <image> | null, "image_3": null, "image_4": null,
     "choices": ["2", "3", "4", "5"], "answer": "(B)", "prompt": "...", "explanation": "..."}
  Categories: sub_task (falls back to the sub-task folder, or the file name).
  """
  options = as_list(row['choices'])
  images = [embedded_image(ctx, row.get(f'image_{k}'), f'image_{k}') for k in range(1, 5)]
  images = [im for im in images if im]
  if not images:
    raise BadRecord('missing media path')
  stem = ctx.extra.get('stem') or ''
  fallback = os.path.basename(os.path.dirname(ctx.source)) if _SPLIT_FILE.match(stem) else stem
  return make_record(row['idx'], row['question'], options, letter(row['answer'], len(options)), 'image',
                     images if len(images) > 1 else images[0],
                     {'sub_task': row.get('sub_task') or fallback})


def _cvbench_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """A file as given; in a folder (nyu-visionx/CV-Bench: test_2d.jsonl + test_2d.parquet, test_3d.jsonl +
  test_3d.parquet, the same questions twice), one format per table: the parquet, whose images are embedded (the
  repository's img/ folder is rebuilt by its build_img.py)."""
  files = annotation_files(path)
  if os.path.isdir(path):
    files = one_format_per_table(files)
  yield from rows_of(files)


@register('cvbench', _cvbench_reader)
def cvbench(row: dict, ctx: Context) -> dict:
  """CV-Bench (nyu-visionx/CV-Bench: test_2d / test_3d as .jsonl, image paths under img/, and as .parquet with
  the image embedded; lmms-eval tasks/cv_bench/utils.py reads these columns):

    {"idx": 0, "type": "2D", "task": "Count", "image": "img/2D/count/ade20k_10.png" | <image>,
     "question": "How many pictures are in the image?", "choices": ["3", "2", "1", "0"], "answer": "(C)",
     "prompt": "...", "filename": "img/2D/count/ade20k_10.png", "source": "ADE20K", ...}
  Categories: type (2D / 3D), task (Count, Relation, Depth, Distance), source.
  """
  options = as_list(row['choices'])
  image = embedded_image(ctx, row.get('image') or row.get('filename'), 'image')
  if not image:
    raise BadRecord('missing media path')
  uid = f"{row.get('type', '')}_{row['idx']}"
  return make_record(uid, row['question'], options, letter(row['answer'], len(options)), 'image', image,
                     {'type': row.get('type'), 'task': row.get('task'), 'source': row.get('source')})


_IMAGE_TAG = re.compile(r'<image (\d+)>')


_MMMU_PRO_CONFIGS = ('standard (10 options)', 'standard (4 options)', 'vision')


def _mmmu_pro_config(f: str, root: str) -> str:
  return next((c for c in _MMMU_PRO_CONFIGS if c in rel_parts(f, root)[:-1]), '')


def _mmmu_pro_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """A file (or one config folder) as given. The dataset folder (MMMU/MMMU_Pro: "standard (10 options)/",
  "standard (4 options)/", "vision/" of test-*.parquet) gives the paper's two settings, standard (10 options)
  and vision, each question once per setting (ids prefixed by the setting); standard (4 options) is read only
  when named directly."""
  files = annotation_files(path)
  configs = {f: _mmmu_pro_config(f, path) for f in files} if os.path.isdir(path) else {}
  if len(set(configs.values()) - {''}) > 1:
    skipped = [f for f, c in configs.items() if c == 'standard (4 options)']
    if skipped:
      logging.warning('mmmu_pro: reading "standard (10 options)" and "vision" of %s, not "standard (4 options)"',
                      path)
    files = [f for f in files if f not in skipped]
    for row, ctx in rows_of(files):
      ctx.extra['setting'] = configs[ctx.source]
      yield row, ctx
    return
  yield from rows_of(files)


@register('mmmu_pro', _mmmu_pro_reader)
def mmmu_pro(row: dict, ctx: Context) -> dict:
  """MMMU-Pro (MMMU/MMMU_Pro), 'standard (10 options)' / 'standard (4 options)' and 'vision' configs, test
  split (columns as the dataset card and lmms-eval tasks/mmmu_pro/utils.py):

    standard: {"id": "test_Art_1", "question": "... <image 1> ...", "options": "['a', 'b', ...]" (a string),
               "image_1": <image>, ..., "image_7": null, "answer": "C", "subject": "Art", "img_type": "...",
               "topic_difficulty": "Medium", "explanation": "..."}
    vision:   {"id": ..., "image": <screenshot holding the question and options>, "options": "[...]",
               "answer": "C", "subject": "Art"}   (no question column)
  Images keep the order of the <image k> tags of the question, then of the options (images that no tag
  names come last). The vision config gets a fixed instruction as its question and its options are not written in the
  prompt (they are in the screenshot; record['show_options'] = False); they still bound the gold letter and let
  a spelled-out option text score. Categories: subject, and setting (standard / vision) when the dataset folder
  was read.
  """
  options = as_list(row['options'])
  if row.get('question'):
    question = row['question']
    order = [int(k) for k in _IMAGE_TAG.findall(' '.join([question] + options))]
    order = list(dict.fromkeys(order)) or list(range(1, 8))
    images = [embedded_image(ctx, row.get(f'image_{k}'), f'image_{k}') for k in order]
    images += [embedded_image(ctx, row.get(f'image_{k}'), f'image_{k}') for k in range(1, 8) if k not in order]
    vision = False
  else:
    question = 'Answer the question shown in the image.'
    images = [embedded_image(ctx, row.get('image'), 'image')]
    vision = True
  images = [im for im in images if im]
  if not images:
    raise BadRecord('missing media path')
  setting = ctx.extra.get('setting')
  uid = f"{setting}/{row['id']}" if setting else row['id']
  rec = make_record(uid, question, options, letter(row['answer'], len(options)), 'image',
                    images if len(images) > 1 else images[0],
                    {'subject': row.get('subject'), 'setting': setting.split(' ')[0] if setting else None})
  if vision:
    rec['show_options'] = False
  return rec
