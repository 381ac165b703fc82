"""Benchmark scoring rules against the official examples, and each benchmark's averaging on hand-built patterns."""
import pytest

from ral_jax.eval import aggregate, report, scoring


def _rec(gold, scorer, **kw):
  return dict({'problem_id': '1', 'solution': f'<answer>{gold}</answer>', 'scorer': scorer, 'options': []}, **kw)


@pytest.mark.parametrize('text,want', [
    ('Yes', 'yes'), ('yes.', 'yes'), ('Yes, it is.', 'yes'), ('No', 'no'), ('No, there is none.', 'no'),
    ('NO', 'no'), ('I think yes', 'other'), ('Maybe', 'other'), ('', 'other'),
])
def test_mme_yes_no_parsing(text, want):
  assert scoring.yes_no(text) == want


def test_mme_score_through_answer_tags():
  rec = _rec('yes', 'yes_no')
  assert scoring.score(rec, '<think>a dog</think><answer>Yes, it is.</answer>') == 1.0
  assert scoring.score(rec, '<answer>No</answer>') == 0.0
  assert scoring.score(rec, 'Yes') == 0.0   # no answer tags: 0, as the RL accuracy reward


@pytest.mark.parametrize('gold,pred,right', [
    ('0.57', '57%', True),     # "57%" is read as 0.57
    ('57', '57%', False),      # ... so it does not match 57 (the official script's behaviour)
    ('57', '57', True), ('57', '57.0', True), ('100', '104.9', True), ('100', '95', True), ('100', '105.1', False),
    ('-10', '-10.4', True), ('Yes', 'yes', True), ('Yes', 'Yes.', False), ('red', 'Red', True),
    ('0', '0', True), ('0', '0.0', False),   # gold 0 is compared as a string
    ('2019', '2019 ', True),
])
def test_chartqa_relaxed_accuracy(gold, pred, right):
  assert scoring.relaxed_correctness(gold, pred) is right
  assert scoring.score(_rec(gold, 'relaxed'), f'<answer>{pred}</answer>') == float(right)


@pytest.mark.parametrize('text,norm', [
    ('Two dogs.', '2 dogs'), ('The Cat', 'cat'), ('dont know', "don't know"), ('left-side', 'left side'),
    ('3.5', '3.5'), ('yes!', 'yes'), ('an apple', 'apple'), ('None', '0'), ('1,000', '1000'),
    ("it's blue", "it 's blue"), ('  Unanswerable\n', 'unanswerable'), ('5.', '5'), ('2.5 cm', '2.5 cm'),
])
def test_vqa_normalisation(text, norm):
  assert scoring.vqa_normalize(text) == norm


@pytest.mark.parametrize('matches,acc', [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, acc):
  # the official value: the mean over the 10 leave-one-out subsets of min(1, #matches / 3)
  answers = ['two'] * matches + ['other'] * (10 - matches)
  assert scoring.vqa_accuracy('2', answers) == pytest.approx(acc)
  assert scoring.score(_rec('two', 'vqa', answers=answers), '<answer>Two.</answer>') == pytest.approx(acc)


@pytest.mark.parametrize('gold,pred,right', [
    ('42', '42', True), ('42', 'The answer is 42.', True), ('3.14159', '3.14', True), ('3.1', '3.2', False),
    ('1,000', '1000', True), ('Paris', 'It is paris', True), ('Paris', 'London', False),
    ('B', 'B', True), ('B', 'about b', True), ('B', 'abba', False),
])
def test_open_answers(gold, pred, right):
  assert scoring.open_answer_correct(pred, gold) is right


def test_choice_and_video_r1_rules():
  mc = {'solution': '<answer>J</answer>', 'problem_type': 'multiple choice',
        'options': [f'{chr(65 + i)}. o{i}' for i in range(10)]}
  assert scoring.score(mc, '<answer>J</answer>') == 1.0
  assert scoring.score(mc, '<answer>(J)</answer>') == 1.0
  assert scoring.score(mc, '<answer>o9</answer>') == 1.0
  assert scoring.score(mc, '<answer>I think J</answer>') == 0.0
  reg = {'solution': '<answer>10</answer>', 'problem_type': 'regression', 'scorer': 'video_r1'}
  assert scoring.score(reg, '<answer>12</answer>') == pytest.approx(0.6)
  num = {'solution': '<answer>3</answer>', 'problem_type': 'numerical'}
  assert scoring.score(num, '<answer>3.0</answer>') == 1.0
  with pytest.raises(ValueError, match='unknown scorer'):
    scoring.score_answer({'scorer': 'nope', 'solution': 'x'}, 'x')


def _rows(spec, axis):
  """spec: [(category value, [scores])] -> rows."""
  out = []
  for value, scores in spec:
    out += [{'problem_id': f'{value}{i}', 'score': s, 'categories': {axis: value}} for i, s in enumerate(scores)]
  return out


def test_blink_is_mean_of_subtasks():
  rows = _rows([('Counting', [1, 1]), ('Jigsaw', [1, 0, 0, 0])], 'sub_task')
  value, _, parts = aggregate.headline('blink', rows)
  assert value == pytest.approx(62.5) and parts == {'Counting': 100.0, 'Jigsaw': 25.0}
  s = report.summarize(rows, benchmark='blink')
  assert s['headline'] == pytest.approx(62.5) and s['accuracy'] == pytest.approx(50.0)


def test_cvbench_formula():
  rows = _rows([('ADE20K', [1, 0]), ('COCO', [1, 1, 1, 1]), ('Omni3D', [0, 0])], 'source')
  value, metric, parts = aggregate.headline('cvbench', rows)
  assert value == pytest.approx(37.5) and parts['2D'] == 75.0 and parts['3D'] == 0.0   # per question: 62.5
  assert metric.startswith('1/2')
  only2d, metric2d, _ = aggregate.headline('cvbench', rows[:6])
  assert only2d == pytest.approx(75.0) and '2D only' in metric2d


def test_mme_perception_cognition():
  rows = []
  def add(cat, image, scores):
    rows.extend({'problem_id': f'{image}#{k}', 'score': s, 'group': image, 'categories': {'category': cat}}
                for k, s in enumerate(scores))
  add('existence', 'existence/1.png', [1, 1])
  add('existence', 'existence/2.png', [1, 0])     # existence: acc 75, acc+ 50 -> 125
  add('count', 'count/1.png', [0, 0])             # count: 0
  add('code_reasoning', 'code/1.png', [1, 1])     # code_reasoning: 100 + 100 = 200
  cats = aggregate.mme_category_scores(rows)
  assert cats['existence'] == {'acc': 75.0, 'acc_plus': 50.0, 'score': 125.0}
  value, _, parts = aggregate.headline('mme', rows)
  assert parts['perception'] == 125.0 and parts['cognition'] == 200.0 and value == 325.0


def test_multi_label_categories_and_partial_scores():
  rows = [{'problem_id': '1', 'score': 1.0, 'categories': {'question_type': ['entity recognition', 'reasoning']}},
          {'problem_id': '2', 'score': 0.3, 'categories': {'question_type': ['reasoning']}}]
  s = report.summarize(rows, {'missing media path': 2}, 'lvbench')
  assert s['categories']['question_type']['reasoning'] == {'accuracy': pytest.approx(65.0), 'num_examples': 2}
  assert s['categories']['question_type']['entity recognition']['num_examples'] == 1
  assert s['headline'] == pytest.approx(65.0) and s['num_total'] == 4 and s['num_examples'] == 2
