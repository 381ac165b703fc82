"""Manifests -> one `Example` record type.

Two formats, picked by file extension:
  *.json   Video-R1: a JSON list of {problem_id, problem, data_type ('image'|'video'), problem_type, options
           (['A. ...', ...]), solution ('<answer>B</answer>'), process ('<think>...</think>', COT data only),
           path, data_source}. answer = text inside <answer></answer> of solution;
           target = process + solution when process is present.
  *.jsonl  one JSON object a line: {id, question, options (bare or lettered), answer, problem_type (default
           'multiple choice' with options, else 'free-form'), images: [paths] | image: path | video: path,
           target (optional SFT response)}.
Both formats take an optional `evidence` list (data/evidence.py): [{media, box: [x0, y0, x1, y1], t: [s0, s1]}].
Media paths are relative to `data_root` (default: the manifest's directory); absolute paths and URLs are kept.
Manifests and media may live on gs:// (ral_jax.paths).
A malformed line / record, a missing answer, or a multiple-choice gold that is none of the options
(`check_gold`) is counted as bad (BadInputCounter) and skipped; an empty or unreadable manifest raises DataError
naming the file. Text must be valid UTF-8: a .jsonl line with raw non-UTF-8 bytes, or any record string holding a
lone surrogate (JSON `"\ud800"`, or a raw bad byte of a .json file), is a bad record naming the manifest and
line / record, never an exception later in tokenization.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import List, Optional, Sequence, Tuple

from ral_jax import paths
from ral_jax.data.badinput import BadInputCounter, BadRecord, DataError
from ral_jax.data.evidence import parse_evidence

_ANSWER_RE = re.compile(r'<answer>(.*?)</answer>', re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  question: str
  options: Tuple[str, ...]
  answer: str
  problem_type: str
  media: Tuple[Tuple[str, str], ...]   # ((kind 'image'|'video', absolute path), ...)
  target: Optional[str] = None          # SFT response text (without the end-of-turn token)
  source: str = ''                      # manifest file it came from
  data_source: str = ''
  evidence: Tuple = ()                  # data.evidence.Evidence regions (optional manifest field "evidence")


def _media_path(root: str, p: str) -> str:
  if paths.isabs(p):
    return p
  return paths.join(root, p) if paths.is_remote(root) else os.path.normpath(os.path.join(root, p))


def _video_r1(rec: dict, root: str, source: str) -> Example:
  rid = str(rec.get('problem_id', rec.get('id', '')))
  kind = rec.get('data_type')
  if kind not in ('image', 'video') or not isinstance(rec.get('path'), str) or not isinstance(rec.get('problem'), str):
    raise BadRecord('malformed_record', 'Video-R1 record needs problem, path and data_type image|video', rid, source)
  m = _ANSWER_RE.search(str(rec.get('solution') or ''))
  if not m or not m.group(1).strip():
    raise BadRecord('missing_answer', 'solution has no <answer>...</answer>', rid, source)
  process = rec.get('process')
  target = f"{process.strip()}{m.group(0)}" if isinstance(process, str) and process.strip() else None
  return Example(rid, rec['problem'], tuple(str(o) for o in rec.get('options') or ()), m.group(1).strip(),
                 str(rec.get('problem_type') or 'free-form'), ((kind, _media_path(root, rec['path'])),),
                 target, source, str(rec.get('data_source') or ''),
                 parse_evidence(rec.get('evidence'), (kind,), rid, source))


def _jsonl(rec: dict, root: str, source: str, line: int) -> Example:
  rid = str(rec.get('id', f'{os.path.basename(source)}:{line}'))
  if not isinstance(rec.get('question'), str):
    raise BadRecord('malformed_record', 'record needs a string "question"', rid, source)
  answer = rec.get('answer')
  if answer is None or not str(answer).strip():
    raise BadRecord('missing_answer', 'record has no "answer"', rid, source)
  images = rec.get('images', [rec['image']] if 'image' in rec else [])
  if isinstance(images, str):
    images = [images]
  media = [('image', _media_path(root, p)) for p in images]
  if rec.get('video'):
    media.append(('video', _media_path(root, rec['video'])))
  if not all(isinstance(p, str) for _, p in media):
    raise BadRecord('malformed_record', 'media paths must be strings', rid, source)
  options = tuple(str(o) for o in rec.get('options') or ())
  ptype = rec.get('problem_type') or ('multiple choice' if options else 'free-form')
  return Example(rid, rec['question'], options, str(answer).strip(), ptype, tuple(media),
                 rec.get('target'), source, str(rec.get('data_source', '')),
                 parse_evidence(rec.get('evidence'), [k for k, _ in media], rid, source))


def load_manifest(path: str, counter: BadInputCounter, data_root: Optional[str] = None) -> List[Example]:
  """All good records of one manifest; bad ones counted in `counter` (the file's bad fraction is checked)."""
  root = data_root or paths.dirname(paths.abspath(path))
  try:
    raw = paths.read_bytes(path)
  except OSError as e:
    raise DataError(f'cannot read manifest {path}: {e}') from e
  out = []
  if not counter.begin_parse(path):   # already parsed by another pipeline: its lines were counted then
    counter = BadInputCounter(counter.max_bad_fraction, counter.min_records)

  def add(fn, *args):
    try:
      out.append(check_gold(fn(*args)))
      counter.good(path, stage='parse')
    except BadRecord as e:
      counter.bad(e, path, stage='parse')

  if path.endswith('.json'):
    text = raw.decode('utf-8', errors='surrogateescape')   # bad bytes become lone surrogates: per-record check
    try:
      recs = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
      raise DataError(f'manifest {path} is not valid JSON: {e}') from e
    if not isinstance(recs, list):
      raise DataError(f'Video-R1 manifest {path} must hold a JSON list of records')
    for rec in recs:
      add(_checked(_video_r1), rec, root, path)
  elif path.endswith('.jsonl'):
    for i, raw_line in enumerate(raw.splitlines()):
      if not raw_line.strip():
        continue
      try:
        rec = json.loads(raw_line.decode('utf-8'))
      except UnicodeDecodeError as e:
        rec = BadRecord('malformed_record', f'line {i + 1} is not UTF-8 (byte {raw_line[e.start]:#04x} at column '
                        f'{e.start + 1})', f'line {i + 1}', path)
      except json.JSONDecodeError as e:
        rec = BadRecord('malformed_record', f'line {i + 1} is not JSON: {e}', f'line {i + 1}', path)
      add(_checked(_jsonl), rec, root, path, i + 1)
  else:
    raise DataError(f'manifest {path}: unknown format, use .json (Video-R1) or .jsonl')
  if counter.seen['parse'][path] == 0:
    raise DataError(f'manifest {path} is empty')
  counter.check(path, stage='parse')
  if not out:
    raise DataError(f'manifest {path} has no usable record')
  return out


def check_gold(ex: Example) -> Example:
  """A multiple-choice record's gold must name one of its options: a letter inside them ('F' with four options is
  bad) or the text of one option; otherwise BadRecord('malformed_record'). Records without options pass (the
  options may be in the image, as in MMMU-Pro vision). The letter is read with rl.answers.choice_letter, the
  parser that scores the answers, so a gold that passes here is one a right answer can match."""
  from ral_jax.rl import answers
  if not ex.options or answers.canonical_type(ex.problem_type) != 'multiple choice':
    return ex
  n = len(ex.options)
  got = answers.choice_letter(ex.answer, ex.options)
  if got is None or not 'A' <= got <= chr(ord('A') + n - 1):
    raise BadRecord('malformed_record', f'gold answer {ex.answer!r} is none of the {n} options '
                    f'(letters A-{chr(ord("A") + n - 1)} or an option text)', ex.id, ex.source)
  return ex


def _checked(fn):
  """Parsers get non-dict records / JSON errors turned into 'malformed_record'."""
  def wrapped(rec, root, source, *rest):
    if isinstance(rec, BadRecord):
      raise rec
    if not isinstance(rec, dict):
      raise BadRecord('malformed_record', f'record is a {type(rec).__name__}, not an object', '', source)
    ex = fn(rec, root, source, *rest)
    where = f'line {rest[0]}' if rest else f'record {ex.id!r}'
    _check_utf8(ex, where, source)
    return ex
  return wrapped


def _check_utf8(ex: Example, where: str, source: str) -> None:
  """BadRecord if a text field cannot be encoded as UTF-8 (a lone surrogate), which tokenizers refuse."""
  fields = [('id', ex.id), ('question', ex.question), ('answer', ex.answer), ('problem_type', ex.problem_type),
            ('target', ex.target or ''), ('data_source', ex.data_source)]
  fields += [(f'options[{i}]', o) for i, o in enumerate(ex.options)]
  fields += [(f'media[{i}]', p) for i, (_, p) in enumerate(ex.media)]
  for name, text in fields:
    try:
      str(text).encode('utf-8')
    except UnicodeEncodeError as e:
      rid = ex.id.encode('utf-8', errors='backslashreplace').decode('ascii', errors='replace')
      raise BadRecord('malformed_record', f'{where}: field {name} is not valid Unicode text (lone surrogate '
                      f'{text[e.start]!r} at character {e.start})', rid, source) from None


def load_manifests(paths: Sequence[str], counter: BadInputCounter, data_root: Optional[str] = None) -> List[Example]:
  return [ex for p in paths for ex in load_manifest(p, counter, data_root)]
