"""Benchmark adapters: each benchmark's own annotation schema -> Video-R1 manifest records.

Every adapter reads a local copy of a benchmark's annotation file(s) and returns records in the Video-R1 schema
that the training data pipeline already reads (ral_jax/docs/method.md s.8), plus two evaluation fields:

  problem_id    str   unique id inside the benchmark
  problem       str   the question text, without the options
  options       [str] 'A. first option', 'B. second option', ...
  solution      str   '<answer>B</answer>' (the letter of the correct option)
  data_type     'image' | 'video'
  problem_type  'multiple choice'
  path          str | [str]   absolute media path (video file, frame directory, image) or a list of images
  data_source   str   the benchmark name
  categories    {axis: value}  e.g. {'task': 'Counting'} or {'duration': 'short', 'task_type': ...}
  segment       [start_s, end_s] | None   (MVBench tasks that evaluate a clip of a longer video)

`load_benchmark(name, annotation, media_root)` returns an `AdapterResult`: the records and a Counter of the
reasons bad records were skipped (missing field, no options, answer not among the options, ...). A bad record is
never fatal; `AdapterResult.check(max_bad_fraction)` raises, naming the file, when too many were bad or none
was read.

The per-benchmark parsers live in `adapters_image.py` and `adapters_video.py`; the registry, file readers and the
helpers they share live in `adapters_base.py` and are re-exported here.
"""
from __future__ import annotations

import collections
import os
from typing import List, Optional

from ral_jax.eval import adapters_image, adapters_open, adapters_video  # noqa: F401  (they register their parsers)
from ral_jax.eval.adapters_base import (LETTERS, AdapterResult, BadRecord, Context, Parser, Reader,  # noqa: F401
                                        _REGISTRY, annotation_files, answer_letter_of, as_list, default_cache_dir,
                                        embedded_image, iter_nonempty, letter, make_record, media_path, read_rows,
                                        register, row_reader, split_options, strip_letter)


def benchmarks() -> List[str]:
  return sorted(_REGISTRY)


def load_benchmark(name: str, annotation: str, media_root: Optional[str] = None,
                   limit: Optional[int] = None, cache_dir: Optional[str] = None) -> AdapterResult:
  """Reads `annotation` (a file, or a directory for per-task benchmarks) with the adapter named `name`.

  media_root: directory the records' relative media paths are resolved against (default: the annotation's
  directory). limit: stop after this many good records. cache_dir: where media embedded in the annotation files
  (parquet image cells) are written (default: default_cache_dir()).
  """
  if name not in _REGISTRY:
    raise ValueError(f'unknown benchmark {name!r}; choose one of {sorted(_REGISTRY)}')
  if not os.path.exists(annotation):
    raise FileNotFoundError(f'{name}: annotation path {annotation} does not exist')
  reader, parser = _REGISTRY[name]
  root = media_root or (annotation if os.path.isdir(annotation) else os.path.dirname(os.path.abspath(annotation)))
  records, bad, seen = [], collections.Counter(), set()
  for raw, ctx in reader(annotation):
    ctx.benchmark, ctx.media_root, ctx.cache_dir = name, root, cache_dir or default_cache_dir()
    try:
      if not isinstance(raw, dict):
        raise BadRecord('not an object')
      rec = parser(raw, ctx)
      rec['data_source'] = name
      if rec['problem_id'] in seen:
        raise BadRecord('duplicate id')
      seen.add(rec['problem_id'])
    except BadRecord as e:
      bad[e.args[0]] += 1
      continue
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, SyntaxError) as e:
      bad[f'malformed ({type(e).__name__})'] += 1
      continue
    records.append(rec)
    if limit and len(records) >= limit:
      break
  return AdapterResult(name, annotation, records, bad)
