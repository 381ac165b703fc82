"""Answer extraction and per-problem-type matching (host Python on strings; never raises on any str).

Video-R1 problem types and how an extracted answer is compared with the ground truth (both normalised alike):
  'multiple choice'  the option letter: "B", "b", "B.", "(B)", "(B) text", "B) text", "B: text", "B, text",
                     "Option B", "Answer: B" all mean B. A letter needs a delimiter after it (end, '.', ')', ':', ',')
                     unless it is in parentheses or follows "Option" / "Answer": "A red car", "A cat", "I think B",
                     "I am not sure" carry no letter. A lowercase letter counts only alone or before '.', ')' or ':'.
                     When the answer carries no letter but equals one option's text (options like "A. red car"),
                     that option's letter. Score 1 or 0.
  'numerical'        compared as numbers ("3" == "3.0", "1,000" == "1000", "50%" == "50", "1/2" == "0.5"); equal when
                     |a - b| <= 1e-6 * max(1, |b|). The first number in the text is used when it is not a bare number.
                     Score 1 or 0.
  'OCR', 'free-form' case-folded, whitespace-collapsed exact match, one trailing period ignored. Score 1 or 0.
  'regression'       mean relative accuracy (VSI-Bench MRA, as Video-R1 uses): the fraction of the thresholds
                     theta in {0.50, 0.55, ..., 0.95} with |a - b| / |b| < 1 - theta (for b == 0: |a| < 1 - theta).
                     Partial credit in [0, 1]; 0 when either side is not a number.
Unknown problem types fall back to the free-form rule. Type names are matched case-insensitively with '-', '_' and
spaces treated alike ('multiple_choice' == 'Multiple Choice').
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

OPEN, CLOSE = '<answer>', '</answer>'
# 1 - theta for theta in {0.50, 0.55, ..., 0.95}, written out so that no threshold carries rounding error.
MRA_TOLERANCES = (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)

_PREFIX = re.compile(r'^(?:option|answer)\b\s*[:：]?\s*', re.IGNORECASE)
_PAREN_LETTER = re.compile(r'^\(\s*([A-Za-z])\s*(?:\)|$)')
_DELIMITED_LETTER = re.compile(r'^([A-Za-z])\s*(?=$|[).:：,])')
_PREFIXED_LETTER = re.compile(r'^([A-Z])(?=$|\s)')
_OPTION_PREFIX = re.compile(r'^\(?([A-Z])\s*[).:：]\s*')
_NUMBER = re.compile(r'[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?')
_FRACTION = re.compile(r'([-+]?\d{1,18})\s*/\s*(\d{1,18})')
_THOUSANDS = re.compile(r'(?<=\d),(?=\d{3}(?!\d))')


def extract_answer(text: str) -> Optional[str]:
  """Stripped content of the last closed <answer>...</answer> pair (the last '<answer>' before the last '</answer>'
  that closes it); None when there is no closed pair. Nested or unclosed tags never raise."""
  if not isinstance(text, str):
    return None
  close = text.rfind(CLOSE)
  start = text.rfind(OPEN, 0, max(close, 0))
  if close < 0 or start < 0:
    return None
  end = text.find(CLOSE, start + len(OPEN))
  return text[start + len(OPEN):end].strip()


def ground_truth(solution: str) -> str:
  """Video-R1 solutions look like '<answer>B</answer>'; plain strings pass through stripped."""
  if not isinstance(solution, str):
    solution = '' if solution is None else str(solution)
  got = extract_answer(solution)
  return solution.strip() if got is None else got


_TYPES = {'multiple choice': 'multiple choice', 'mc': 'multiple choice', 'numerical': 'numerical',
          'numeric': 'numerical', 'ocr': 'ocr', 'free form': 'free-form', 'regression': 'regression'}


def canonical_type(problem_type: str) -> str:
  """'Multiple_Choice' -> 'multiple choice', 'OCR' -> 'ocr', ...; unknown types -> 'free-form'."""
  t = re.sub(r'[\s_\-]+', ' ', str(problem_type or '')).strip().lower()
  return _TYPES.get(t, 'free-form')


def normalize_text(s: str) -> str:
  s = ' '.join(s.casefold().split())
  return s[:-1].rstrip() if s.endswith('.') else s


def choice_letter(answer: str, options: Sequence[str] = ()) -> Optional[str]:
  """'B', 'B.', '(B)', 'B) text', 'Option B' -> 'B'; an option's text -> its letter; else None (rules in the module
  docstring: 'A red car', 'I think B' are not letters)."""
  s = answer.strip()
  pre = _PREFIX.match(s)
  rest = s[pre.end():] if pre else s
  for pattern in (_PAREN_LETTER, _DELIMITED_LETTER) + ((_PREFIXED_LETTER,) if pre else ()):
    m = pattern.match(rest)
    if not m:
      continue
    after = rest[m.end(1):].lstrip()[:1]
    if m.group(1).isupper() or pattern is _PAREN_LETTER or after in ('', ')', '.', ':', '：'):
      return m.group(1).upper()
  target = normalize_text(s)
  for i, opt in enumerate(options or ()):
    if not isinstance(opt, str):
      continue
    om = _OPTION_PREFIX.match(opt.strip())
    letter, text = (om.group(1), opt.strip()[om.end():]) if om else (chr(ord('A') + i), opt)
    if target and normalize_text(text) == target:
      return letter
  return None


def parse_number(s: str) -> Optional[float]:
  """The answer as a float ('1,000' -> 1000, '50%' -> 50, '$3.5' -> 3.5, '3/4' -> 0.75), else the first number in
  it, else None (also for non-finite values)."""
  t = _THOUSANDS.sub('', s.strip()).strip().rstrip('%').lstrip('$').strip()
  frac = _FRACTION.fullmatch(t)
  if frac and int(frac.group(2)) != 0:
    return int(frac.group(1)) / int(frac.group(2))
  try:
    v = float(t)
  except (ValueError, OverflowError):
    m = _NUMBER.search(t)
    if not m:
      return None
    try:
      v = float(m.group(0))
    except (ValueError, OverflowError):
      return None
  return v if math.isfinite(v) else None


def mean_relative_accuracy(pred: float, truth: float) -> float:
  err = abs(pred - truth) / abs(truth) if truth != 0 else abs(pred)
  if not math.isfinite(err):
    return 0.0
  return sum(err < tol for tol in MRA_TOLERANCES) / len(MRA_TOLERANCES)


def answer_score(answer: Optional[str], solution: str, problem_type: str, options: Sequence[str] = ()) -> float:
  """Accuracy in [0, 1] of an extracted answer against the ground truth (rules in the module docstring)."""
  if answer is None:
    return 0.0
  truth = ground_truth(solution)
  kind = canonical_type(problem_type)
  if kind == 'multiple choice':
    want = choice_letter(truth, options)
    return float(want is not None and choice_letter(answer, options) == want)
  if kind in ('numerical', 'regression'):
    a, b = parse_number(answer), parse_number(truth)
    if a is None or b is None:
      return 0.0
    if kind == 'regression':
      return mean_relative_accuracy(a, b)
    return float(abs(a - b) <= 1e-6 * max(1.0, abs(b)))
  return float(normalize_text(answer) == normalize_text(truth))
