"""Training manifests: a multiple-choice gold outside the options is a counted bad record, not a silent reward."""
import json

from ral_jax.data import records
from ral_jax.data.badinput import BadInputCounter


def test_gold_outside_options_is_counted_bad(tmp_path):
  rows = [
      {'id': 'ok_letter', 'question': 'q', 'options': ['A. red', 'B. blue', 'C. green', 'D. black'], 'answer': 'B',
       'image': 'a.png'},
      {'id': 'ok_text', 'question': 'q', 'options': ['red', 'blue'], 'answer': 'blue', 'image': 'a.png'},
      {'id': 'ok_paren', 'question': 'q', 'options': ['red', 'blue'], 'answer': '(A)', 'image': 'a.png'},
      {'id': 'ok_j', 'question': 'q', 'options': [str(i) for i in range(10)], 'answer': 'J', 'image': 'a.png'},
      {'id': 'bad_letter', 'question': 'q', 'options': ['A. red', 'B. blue', 'C. green', 'D. black'], 'answer': 'F',
       'image': 'a.png'},
      {'id': 'bad_text', 'question': 'q', 'options': ['red', 'blue'], 'answer': 'purple', 'image': 'a.png'},
      {'id': 'open', 'question': 'how many?', 'answer': '3', 'problem_type': 'numerical', 'image': 'a.png'},
      {'id': 'no_options', 'question': 'see image', 'answer': 'C', 'problem_type': 'multiple choice', 'image': 'a.png'},
  ]
  path = tmp_path / 'train.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  counter = BadInputCounter(max_bad_fraction=0.5)
  got = records.load_manifest(str(path), counter)
  assert [e.id for e in got] == ['ok_letter', 'ok_text', 'ok_paren', 'ok_j', 'open', 'no_options']
  assert counter.by_reason == {'malformed_record': 2}


def test_video_r1_gold_letter_checked(tmp_path):
  recs = [{'problem_id': i, 'problem': 'q', 'data_type': 'image', 'problem_type': 'multiple choice', 'path': 'a.png',
           'options': ['A. x', 'B. y'], 'solution': f'<answer>{g}</answer>'} for i, g in enumerate('ABC')]
  (tmp_path / 'vr1.json').write_text(json.dumps(recs))
  counter = BadInputCounter(max_bad_fraction=0.5)
  assert [e.answer for e in records.load_manifest(str(tmp_path / 'vr1.json'), counter)] == ['A', 'B']
  assert counter.by_reason == {'malformed_record': 1}
