"""Per-benchmark answer scoring: each benchmark's official rule, on the text inside the response's <answer> tags.

An adapter record names its rule in `scorer` (default 'choice' for multiple choice, 'video_r1' otherwise) and
keeps its gold in `solution` ('<answer>B</answer>') and, for rules with several references, in `answers`.
`score(record, response)` returns a float in [0, 1] for any response text. A response without a closed
<answer>...</answer> pair scores 0, exactly as the RL accuracy reward does (rl.rewards 'accuracy').

Rules:
  'choice'    the option letter (rl.answers.choice_letter: 'B', '(B)', 'B.', 'Option B', or an option's text).
  'video_r1'  rl.answers.answer_score by problem_type (numerical, OCR, free-form, regression; MC as 'choice').
  'yes_no'    MME: the answer lower-cased; 'yes' / 'no' as is, else 'yes' or 'no' when found in its first four
              characters ("Yes, it is." is yes), else neither (wrong). 1 when it equals the gold.
  'relaxed'   ChartQA relaxed accuracy, as pix2struct's official script: both sides read as floats ("57%" ->
              0.57, so "57%" matches 0.57 but not 57); when both are numbers and the gold is non-zero, right when
              |pred - gold| / |gold| <= 0.05; otherwise a case-insensitive exact string match.
  'vqa'       VQA accuracy (VizWiz, VQAv2): both sides normalised (`vqa_normalize`: lower case, punctuation,
              number words -> digits, articles dropped, contractions restored); the official leave-one-out form of
              min(1, #matching annotators / 3): the mean over the 10 ways of leaving one of the 10 answers out.
  'open'      Video-MMMU open questions, MMMU's open-answer rule: a numeric gold is right when a number of the
              answer equals it after rounding to 2 decimals; a text gold when its normalised form occurs in the
              normalised answer (a one-character gold must be a whole token).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

from ral_jax.rl import answers as answers_lib


def gold_of(record: Mapping[str, Any]) -> str:
  return answers_lib.ground_truth(str(record.get('solution', '')))


# ---- MME ------------------------------------------------------------------------------------------------
def yes_no(text: str) -> str:
  """'yes' | 'no' | 'other' (MME's answer parsing: exact, else 'yes'/'no' within the first four characters)."""
  t = text.strip().lower()
  if t in ('yes', 'no'):
    return t
  head = t[:4]
  if 'yes' in head:
    return 'yes'
  if 'no' in head:
    return 'no'
  return 'other'


# ---- ChartQA --------------------------------------------------------------------------------------------
def _relaxed_float(text: str) -> Optional[float]:
  try:
    return float(text.rstrip('%')) / 100.0 if text.endswith('%') else float(text)
  except ValueError:
    return None


def relaxed_correctness(gold: str, pred: str, max_relative_change: float = 0.05) -> bool:
  """ChartQA's relaxed accuracy of one prediction (rule in the module docstring)."""
  gold, pred = str(gold).strip(), str(pred).strip()
  p, g = _relaxed_float(pred), _relaxed_float(gold)
  if p is not None and g:
    return abs(p - g) / abs(g) <= max_relative_change
  return pred.lower() == gold.lower()


# ---- VQA accuracy (VizWiz) ------------------------------------------------------------------------------
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = ('a', 'an', 'the')
# Contractions written without their apostrophe, as annotators type them, mapped back: the entries of the VQA
# evaluation's list (GT-Vision-Lab vqaEval.py; EvalAI's answer processor, which lmms-eval's VizWiz task uses) that
# a lower-cased word can reach (its 'Im', 'Ive', "Id've" keys are capitalised and never match).
_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    'itll': "it'll", 'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've",
    'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    'shouldve': "should've", 'shouldnt': "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll", 'somebodys': "somebody's",
    'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas",
    'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't",
    'whatll': "what'll", 'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's",
    'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll",
    'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    'youd': "you'd", "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're",
    'youve': "you've",
}
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r'(\d)(,)(\d)')
_PERIOD_NOT_DECIMAL = re.compile(r'\.(?!\d)')   # every period not followed by a digit ('5.' -> '5')


def vqa_normalize(text: str) -> str:
  """The standard VQA answer normalisation: "Two dogs." -> '2 dogs', "the cat's toy" -> "cat 's toy",
  'dont know' -> "don't know", 'left-side' -> 'left side'."""
  t = str(text).replace('\n', ' ').replace('\t', ' ').lower()
  t = t.replace(',', '').replace('?', '').replace("'s", " 's").strip()
  out = t
  for p in _PUNCT:
    if p + ' ' in t or ' ' + p in t or _DIGIT_COMMA_DIGIT.search(t):
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  out = _PERIOD_NOT_DECIMAL.sub('', out)
  words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return ' '.join(words)


def vqa_accuracy(pred: str, gold_answers: Sequence[str]) -> float:
  """Mean over leaving each of the annotators' answers out of min(1, #remaining equal to pred / 3)."""
  golds = [vqa_normalize(a) for a in gold_answers]
  if not golds:
    return 0.0
  p = vqa_normalize(pred)
  matches = sum(g == p for g in golds)
  if len(golds) == 1:
    return float(matches == 1)
  accs = [min(1.0, (matches - (g == p)) / 3.0) for g in golds]
  return sum(accs) / len(accs)


# ---- open answers (Video-MMMU) --------------------------------------------------------------------------
def _numbers(text: str):
  out = []
  whole = answers_lib.parse_number(text)
  if whole is not None:
    out.append(whole)
  for m in re.finditer(r'[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?', text):
    v = answers_lib.parse_number(m.group(0))
    if v is not None:
      out.append(v)
  return out


def open_answer_correct(pred: str, gold: str) -> bool:
  """MMMU's open-answer rule (module docstring)."""
  g = answers_lib.parse_number(gold) if re.fullmatch(r'\s*[-+$]?[\d,.]+\s*%?\s*', gold) else None
  if g is not None:
    return any(round(v, 2) == round(g, 2) for v in _numbers(pred))
  gn, pn = answers_lib.normalize_text(gold), answers_lib.normalize_text(pred)
  if not gn:
    return False
  if len(gn) == 1:
    return gn in re.findall(r'\w+', pn) or pn == gn
  return gn in pn


# ---- dispatch -------------------------------------------------------------------------------------------
def score_answer(record: Mapping[str, Any], answer: Optional[str]) -> float:
  """Score in [0, 1] of an extracted answer (None: no answer) against a record's gold, by its `scorer`."""
  if answer is None:
    return 0.0
  options = record.get('options') or ()
  rule = record.get('scorer') or ('choice' if record.get('problem_type') == 'multiple choice' else 'video_r1')
  gold = gold_of(record)
  if rule == 'choice':
    return answers_lib.answer_score(answer, gold, 'multiple choice', options)
  if rule == 'yes_no':
    return float(yes_no(answer) == gold.strip().lower())
  if rule == 'relaxed':
    return float(any(relaxed_correctness(g, answer) for g in (record.get('answers') or [gold])))
  if rule == 'vqa':
    return vqa_accuracy(answer, record.get('answers') or [gold])
  if rule == 'open':
    return float(any(open_answer_correct(answer, g) for g in (record.get('answers') or [gold])))
  if rule == 'video_r1':
    return answers_lib.answer_score(answer, gold, record.get('problem_type', ''), options)
  raise ValueError(f'record {record.get("problem_id")!r}: unknown scorer {rule!r}')


SCORERS = ('choice', 'video_r1', 'yes_no', 'relaxed', 'vqa', 'open')


def score(record: Mapping[str, Any], response: str) -> float:
  """Score in [0, 1] of a model response (the text of its last <answer>...</answer>)."""
  v = score_answer(record, answers_lib.extract_answer(response))
  return v if math.isfinite(v) else 0.0
