"""Image benchmark adapters: V*, MuirBench, BLINK, CV-Bench, MMMU-Pro (schemas of their public releases).

Each parser takes one raw row of the benchmark's own file and returns `adapters.make_record(...)`; see
adapters.py for the output schema. The schema each one expects is written in its docstring.
"""
from __future__ import annotations

import re

from ral_jax.eval.adapters_base import (BadRecord, Context, as_list, embedded_image, iter_nonempty, letter,
                                        make_record, media_path, register, row_reader, split_options)


@register('vstar', row_reader)
def vstar(row: dict, ctx: Context) -> dict:
  """V* Bench (craigwu/vstar_bench, test_questions.jsonl), one JSON object per line:

    {"question_id": 0, "image": "direct_attributes/sa_4690.jpg", "category": "direct_attributes",
     "text": "What is the color of the woman's shirt?\\n(A) white\\n(B) black\\n...\\nAnswer with the option's
              letter from the given choices directly.", "label": "A"}
  Categories: direct_attributes, relative_position.
  """
  question, options = split_options(row['text'])
  return make_record(row.get('question_id', ctx.index), question, options, letter(row['label'], len(options)),
                     'image', media_path(ctx, row['image']), {'category': row.get('category')})


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


@register('blink', row_reader)
def blink(row: dict, ctx: Context) -> dict:
  """BLINK (BLINK-Benchmark/BLINK, one parquet per sub-task, val split has answers):

    {"idx": "val_Counting_1", "question": "How many ...?", "sub_task": "Counting",
     "image_1": <image>, "image_2": <image> | null, "image_3": null, "image_4": null,
     "choices": ["2", "3", "4", "5"], "answer": "(B)", "prompt": "...", "explanation": "..."}
  Categories: sub_task (falls back to the file name).
  """
  options = as_list(row['choices'])
  images = [embedded_image(ctx, row.get(f'image_{k}'), f'image_{k}') for k in range(1, 5)]
  images = [im for im in images if im]
  if not images:
    raise BadRecord('missing media path')
  return make_record(row['idx'], row['question'], options, letter(row['answer'], len(options)), 'image',
                     images if len(images) > 1 else images[0],
                     {'sub_task': row.get('sub_task') or ctx.extra.get('stem')})


@register('cvbench', row_reader)
def cvbench(row: dict, ctx: Context) -> dict:
  """CV-Bench (nyu-visionx/CV-Bench, test_2d.jsonl / test_3d.jsonl or test parquet):

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


@register('mmmu_pro', row_reader)
def mmmu_pro(row: dict, ctx: Context) -> dict:
  """MMMU-Pro (MMMU/MMMU_Pro), 'standard (10 options)' / 'standard (4 options)' and 'vision' configs:

    standard: {"id": "test_Art_1", "question": "... <image 1> ...", "options": "['a', 'b', ...]",
               "image_1": <image>, ..., "image_7": null, "answer": "C", "subject": "Art", "img_type": "...",
               "topic_difficulty": "Medium", "explanation": "..."}
    vision:   {"id": ..., "image": <screenshot holding the question>, "options": "[...]", "answer": "C",
               "subject": "Art"}
  Images keep the order of the <image k> tags; the vision config gets a fixed instruction as its question.
  Categories: subject.
  """
  options = as_list(row['options'])
  if row.get('question'):
    question = row['question']
    order = [int(k) for k in _IMAGE_TAG.findall(question)]
    order = list(dict.fromkeys(order)) or list(range(1, 8))
    images = [embedded_image(ctx, row.get(f'image_{k}'), f'image_{k}') for k in order]
    images += [embedded_image(ctx, row.get(f'image_{k}'), f'image_{k}') for k in range(1, 8) if k not in order]
    question = _IMAGE_TAG.sub(lambda m: f'<image {m.group(1)}>', question)
  else:
    question = 'Answer the question shown in the image.'
    images = [embedded_image(ctx, row.get('image'), 'image')]
  images = [im for im in images if im]
  if not images:
    raise BadRecord('missing media path')
  return make_record(row['id'], question, options, letter(row['answer'], len(options)), 'image',
                     images if len(images) > 1 else images[0], {'subject': row.get('subject')})
