"""Benchmark adapters: each benchmark's own annotation schema -> Video-R1 manifest records.

Every adapter reads a local copy of a benchmark's annotation file(s) and returns records in the Video-R1 schema
that the training data pipeline already reads (method.md s.8), plus two evaluation fields:

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

The per-benchmark parsers live in `adapters_image.py` and `adapters_video.py`; this module holds the registry,
file readers and the helpers they share.
"""
from __future__ import annotations

import ast
import collections
import csv
import dataclasses
import glob
import hashlib
import json
import os
import re
import string
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

LETTERS = string.ascii_uppercase


class BadRecord(ValueError):
  """Raised by a parser for one record; its first argument is the short reason that gets counted."""


@dataclasses.dataclass
class AdapterResult:
  """Records of one benchmark and the count of skipped ones by reason."""
  benchmark: str
  source: str
  records: List[dict]
  bad: collections.Counter

  @property
  def num_bad(self) -> int:
    return sum(self.bad.values())

  def check(self, max_bad_fraction: float = 0.5) -> 'AdapterResult':
    """Raises a clear error when nothing was read or more than `max_bad_fraction` of the records were bad."""
    total = len(self.records) + self.num_bad
    if not self.records:
      raise ValueError(f'{self.benchmark}: no usable record in {self.source} '
                       f'(bad: {dict(self.bad) or "file empty"}); check --annotation and the file format')
    if self.num_bad > max_bad_fraction * total:
      raise ValueError(f'{self.benchmark}: {self.num_bad} of {total} records in {self.source} are bad '
                       f'({dict(self.bad)}); raise max_bad_fraction or fix the file')
    return self


# ---- registry -------------------------------------------------------------------------------------------
Parser = Callable[[dict, 'Context'], dict]
Reader = Callable[[str], Iterator[Tuple[dict, 'Context']]]
_REGISTRY: Dict[str, Tuple[Reader, Parser]] = {}


def register(name: str, reader: Reader):
  """Decorator: registers `parser(raw_record, ctx) -> record` under `name` with the reader of its files."""
  def deco(parser: Parser) -> Parser:
    _REGISTRY[name] = (reader, parser)
    return parser
  return deco


def benchmarks() -> List[str]:
  _import_parsers()
  return sorted(_REGISTRY)


def _import_parsers():
  from ral_jax.eval import adapters_image, adapters_open, adapters_video  # noqa: F401  (they register themselves)


@dataclasses.dataclass
class Context:
  """What a parser knows besides the raw record: the media root, the file it came from, the benchmark."""
  benchmark: str
  media_root: str
  source: str
  index: int
  extra: dict = dataclasses.field(default_factory=dict)
  cache_dir: str = ''   # where embedded media are written (never the dataset folder, which may be read-only)


def default_cache_dir() -> str:
  """$RAL_EVAL_CACHE, else ~/.cache/ral_jax/eval_media."""
  return os.environ.get('RAL_EVAL_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'ral_jax', 'eval_media')


def load_benchmark(name: str, annotation: str, media_root: Optional[str] = None,
                   limit: Optional[int] = None, cache_dir: Optional[str] = None) -> AdapterResult:
  """Reads `annotation` (a file, or a directory for per-task benchmarks) with the adapter named `name`.

  media_root: directory the records' relative media paths are resolved against (default: the annotation's
  directory). limit: stop after this many good records. cache_dir: where media embedded in the annotation files
  (parquet image cells) are written (default: default_cache_dir()).
  """
  _import_parsers()
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


# ---- readers ---------------------------------------------------------------------------------------------
def read_rows(path: str) -> Iterator[dict]:
  """Rows of a .json (list, or dict of lists), .jsonl, .csv, .tsv or .parquet file; a bad JSONL line yields None."""
  low = path.lower()
  if low.endswith('.jsonl'):
    with open(path, encoding='utf-8') as f:
      for line in f:
        if line.strip():
          try:
            yield json.loads(line)
          except json.JSONDecodeError:
            yield None
  elif low.endswith('.json'):
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
    if isinstance(data, dict):
      data = next((v for v in data.values() if isinstance(v, list)), [data])
    yield from data
  elif low.endswith(('.csv', '.tsv')):
    with open(path, encoding='utf-8', newline='') as f:
      yield from csv.DictReader(f, delimiter='\t' if low.endswith('.tsv') else ',')
  elif low.endswith('.parquet'):
    try:
      import pyarrow.parquet as pq
    except ImportError as e:
      raise ImportError(f'reading {path} needs pyarrow: `pip install pyarrow`, or convert it to JSONL') from e
    yield from pq.read_table(path).to_pylist()
  else:
    raise ValueError(f'unsupported annotation file {path}: expected .json, .jsonl, .csv, .tsv or .parquet')


def annotation_files(path: str, patterns: Sequence[str] = ('*.json', '*.jsonl', '*.parquet', '*.csv')) -> List[str]:
  if os.path.isfile(path):
    return [path]
  files = sorted(f for p in patterns for f in glob.glob(os.path.join(path, '**', p), recursive=True))
  if not files:
    raise FileNotFoundError(f'no annotation file ({", ".join(patterns)}) under {path}')
  return files


def row_reader(path: str) -> Iterator[Tuple[dict, Context]]:
  """The default reader: every row of every annotation file, with its file's stem in ctx.extra['stem']."""
  i = 0
  for f in annotation_files(path):
    stem = os.path.splitext(os.path.basename(f))[0]
    for row in read_rows(f):
      yield row, Context('', '', f, i, {'stem': stem})
      i += 1


# ---- shared helpers --------------------------------------------------------------------------------------
_OPT_LINE = re.compile(r'^\s*\(?([A-Z])[\).:]\s*(.*\S)\s*$')


def strip_letter(option: str) -> str:
  """'A. cat' / '(A) cat' / 'A) cat' / 'A: cat' -> 'cat'; anything else unchanged."""
  m = _OPT_LINE.match(str(option))
  return m.group(2) if m else str(option).strip()


def split_options(text: str) -> Tuple[str, List[str]]:
  """Splits a question that lists its options on lines '(A) x' or 'A. x' into (question, [option texts]).

  Lines after the last option (e.g. "Answer with the option's letter ...") are dropped.
  """
  lines = str(text).split('\n')
  idx = [i for i, line in enumerate(lines) if _OPT_LINE.match(line)]
  # keep only a run of consecutive letters A, B, C ... as options
  opts, expect = [], 0
  for i in idx:
    m = _OPT_LINE.match(lines[i])
    if m.group(1) == LETTERS[expect]:
      opts.append((i, m.group(2)))
      expect += 1
  if len(opts) < 2:
    raise BadRecord('no options in question text')
  question = '\n'.join(lines[:opts[0][0]]).strip()
  return question, [o for _, o in opts]


def as_list(value: Any) -> List[str]:
  """A list field stored as a list, a numpy array, or a Python/JSON string repr of a list."""
  if value is None:
    return []
  if isinstance(value, str):
    s = value.strip()
    if not s.startswith('['):
      raise BadRecord('options not a list')
    try:
      value = json.loads(s)
    except json.JSONDecodeError:
      value = ast.literal_eval(s)
  return [str(v) for v in list(value)]


def letter(value: Any, num_options: int) -> str:
  """Normalises an answer given as 'B', '(B)', 'B. text' or an int index to a letter inside the options."""
  numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
  if numeric or (isinstance(value, str) and value.strip().isdigit()):
    i = int(value)
  else:
    m = re.match(r'^\s*\(?([A-Z])(?:[\).:]|\s|$)', str(value or ''))
    if not m:
      raise BadRecord('answer not a letter')
    i = LETTERS.index(m.group(1))
  if not 0 <= i < num_options:
    raise BadRecord('answer outside options')
  return LETTERS[i]


def media_path(ctx: Context, rel: Any, *prefix: str) -> str:
  """Absolute path of a media file named relative to the media root (and optional sub-directories)."""
  if not rel or not isinstance(rel, str):
    raise BadRecord('missing media path')
  return rel if os.path.isabs(rel) else os.path.join(ctx.media_root, *prefix, rel)


def embedded_image(ctx: Context, value: Any, key: str) -> Optional[str]:
  """A parquet image cell ({'bytes', 'path'}) or a path string -> a file path (bytes written once under
  ctx.cache_dir/<benchmark>/, named by their hash)."""
  if value is None:
    return None
  if isinstance(value, str):
    return media_path(ctx, value)
  if isinstance(value, dict) and value.get('bytes'):
    data = value['bytes']
    ext = os.path.splitext(value.get('path') or '')[1] or '.png'
    name = hashlib.sha1(data).hexdigest()[:16] + ext
    out = os.path.join(ctx.cache_dir or default_cache_dir(), ctx.benchmark, name)
    if not os.path.exists(out):
      os.makedirs(os.path.dirname(out), exist_ok=True)
      tmp = f'{out}.{os.getpid()}.tmp'   # several processes may fill one cache
      with open(tmp, 'wb') as f:
        f.write(data)
      os.replace(tmp, out)
    return out
  if isinstance(value, dict) and value.get('path'):
    return media_path(ctx, value['path'])
  raise BadRecord(f'unreadable image cell {key}')


def make_record(problem_id: Any, question: str, options: Sequence[str], answer_letter: str, data_type: str,
                path: Any, categories: Optional[Dict[str, Any]] = None, segment=None) -> dict:
  """A Video-R1 manifest record (method.md s.8) plus `categories` and `segment`."""
  question = str(question or '').strip()
  if not question:
    raise BadRecord('missing question')
  opts = [strip_letter(o) for o in options]
  if len(opts) < 2:
    raise BadRecord('fewer than two options')
  if len(opts) > len(LETTERS):
    raise BadRecord('too many options')
  if answer_letter not in LETTERS[:len(opts)]:
    raise BadRecord('answer outside options')
  return {
      'problem_id': str(problem_id),
      'problem': question,
      'options': [f'{LETTERS[i]}. {o}' for i, o in enumerate(opts)],
      'solution': f'<answer>{answer_letter}</answer>',
      'data_type': data_type,
      'problem_type': 'multiple choice',
      'path': path,
      'categories': {k: str(v) for k, v in (categories or {}).items() if v is not None and str(v) != ''},
      'segment': list(segment) if segment is not None else None,
  }


def answer_letter_of(record: dict) -> str:
  """The ground-truth letter of a record produced by an adapter."""
  m = re.search(r'<answer>\s*(.*?)\s*</answer>', record['solution'], re.S)
  return m.group(1) if m else record['solution'].strip()


def iter_nonempty(values: Iterable[Any]) -> List[Any]:
  return [v for v in values if v is not None and not (isinstance(v, float) and v != v) and v != '']
