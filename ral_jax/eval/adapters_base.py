"""The adapters' registry and the helpers every benchmark parser shares (file readers, options, answer letters,
media paths, the output record). The parsers (adapters_image.py, adapters_video.py) import this module; adapters.py
imports them and holds `load_benchmark`, so there is no import cycle. See adapters.py for the record schema.
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
  """A Video-R1 manifest record (ral_jax/docs/method.md s.8) plus `categories` and `segment`."""
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
