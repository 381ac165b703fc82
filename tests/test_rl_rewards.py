"""Host rewards: answer extraction, per-type matching, format templates, registry, never-raises properties."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ral_jax.rl import answers, rewards
from ral_jax.rl.answers import answer_score, extract_answer
from ral_jax.rl.rewards import RAL_ZERO_REWARDS, RewardConfig, compute_rewards, register_reward


@pytest.mark.parametrize('text,want', [
    ('<think>x</think><answer>B</answer>', 'B'),
    ('<answer>\n  B \n</answer>\n', 'B'),
    ('<answer>A</answer> then <answer>C</answer>', 'C'),              # last occurrence
    ('<answer>A</answer><answer>B', 'A'),                             # unclosed last one is ignored
    ('<answer><answer>B</answer></answer>', 'B'),                     # nested
    ('<answer>A</answer> x </answer>', 'A'),
    ('</answer><answer>', None),
    ('no tags', None),
    ('', None),
    ('<answer></answer>', ''),
])
def test_extract_answer(text, want):
  assert extract_answer(text) == want


MC = 'multiple choice'


@pytest.mark.parametrize('answer,truth,ptype,score', [
    ('B', '<answer>B</answer>', MC, 1.0), ('B.', 'B', MC, 1.0), ('(B)', 'B', MC, 1.0), ('B) a red car', 'B', MC, 1.0),
    ('b', 'B', MC, 1.0), ('Option B', 'B', MC, 1.0), ('B: red', 'B', MC, 1.0), ('C', 'B', MC, 0.0),
    ('a red car', 'B', MC, 0.0), ('', 'B', MC, 0.0),
    ('3', '3.0', 'numerical', 1.0), ('3.00', '<answer>3</answer>', 'numerical', 1.0),
    ('1,000', '1000', 'numerical', 1.0),
    ('50%', '50', 'numerical', 1.0), ('1/2', '0.5', 'numerical', 1.0), ('-3 / 4', '-0.75', 'numerical', 1.0),
    ('1/0', '1', 'numerical', 1.0),  # not a fraction: the first number, 1
    ('about 7 apples', '7', 'numerical', 1.0), ('3.1', '3', 'numerical', 0.0),
    ('seven', '7', 'numerical', 0.0), ('1e999', '7', 'numerical', 0.0),
    ('Hello   World.', 'hello world', 'OCR', 1.0), ('hello  world', 'Hello World', 'free-form', 1.0),
    ('hello', 'hello world', 'OCR', 0.0),
    # MRA: |12 - 10| / 10 = 0.2 < 1 - theta for theta in {.50, .55, .60, .65, .70, .75}: 6 of 10.
    ('12', '10', 'regression', 0.6), ('10', '10', 'regression', 1.0), ('0', '10', 'regression', 0.0),
    ('10.4', '10', 'regression', 1.0),  # 0.04 < 0.05
    ('0.3', '0', 'regression', 0.4),    # truth 0: |a| = 0.3 < 1 - theta for theta in {.50 .. .65}
    ('red', '10', 'regression', 0.0),
    ('Hello', 'hello', 'unknown type', 1.0),
])
def test_answer_score(answer, truth, ptype, score):
  assert answer_score(answer, truth, ptype) == pytest.approx(score)


@pytest.mark.parametrize('text,want', [
    ('B', 'B'), ('B.', 'B'), ('(B)', 'B'), ('( B )', 'B'), ('(B) a red car', 'B'), ('B) text', 'B'), ('B: red', 'B'),
    ('B, because', 'B'), ('b', 'B'), ('b.', 'B'), ('(b)', 'B'), ('Option B', 'B'), ('option b', 'B'),
    ('Option B is right', 'B'), ('Answer: C', 'C'), ('J', 'J'), ('J. tenth', 'J'),
    # no delimiter after the letter: not a letter (the cases)
    ('A red car', None), ('A cat', None), ('I think B', None), ('I am not sure', None), ('a cat', None),
    ('b, c', None), ('Answers vary', None), ('', None), ('The answer is', None),
])
def test_choice_letter_needs_a_delimiter(text, want):
  assert answers.choice_letter(text) == want


def test_multiple_choice_option_text_and_type_spellings():
  opts = ['A. a red car', 'B. a blue bus']
  assert answer_score('A blue bus', 'B', 'multiple_choice', opts) == 1.0      # 'A' + text is no letter: the text
  assert answer_score('A red car', 'B', MC, ['A. green', 'B. A red car']) == 1.0
  assert answer_score('a blue bus', 'B', 'Multiple-Choice', opts) == 1.0
  assert answer_score('a blue bus', 'B', MC, ['a red car', 'a blue bus']) == 1.0
  assert answers.canonical_type('NUMERICAL') == 'numerical'


@pytest.mark.parametrize('text,think,only', [
    ('<think>look</think><answer>B</answer>', 1.0, 0.0),
    ('  <think>a\nb</think>\n<answer>B</answer>\n', 1.0, 0.0),
    ('<answer>B</answer>', 0.0, 1.0),
    (' <answer> B </answer> ', 0.0, 1.0),
    ('<think>a</think><answer>B</answer> trailing', 0.0, 0.0),
    ('<think>a</think><answer>B</answer><answer>C</answer>', 0.0, 0.0),
    ('<think><think>a</think></think><answer>B</answer>', 0.0, 0.0),
    ('<answer>B', 0.0, 0.0),
    ('', 0.0, 0.0),
])
def test_format_rewards(text, think, only):
  assert rewards.think_answer_format_reward(text, {}) == think
  assert rewards.answer_only_format_reward(text, {}) == only


def test_weighted_sum_ral_zero_and_group_records():
  recs = [{'solution': '<answer>B</answer>', 'problem_type': MC}, {'solution': '<answer>3</answer>',
                                                                    'problem_type': 'numerical'}]
  resp = ['<think>t</think><answer>B</answer>', '<answer>B</answer>', '<answer>3.0</answer>', 'x <answer>4</answer>']
  total, per, m = compute_rewards(resp, recs, group_size=2)
  np.testing.assert_allclose(total, [1.0, 0.9, 0.9, 0.0], rtol=1e-6)
  np.testing.assert_allclose(per['accuracy'], [1, 1, 1, 0])
  np.testing.assert_allclose(m['reward/total'], 0.7, rtol=1e-6)
  total, _, _ = compute_rewards(resp, recs, RAL_ZERO_REWARDS, group_size=2)
  np.testing.assert_allclose(total, [0.9, 1.0, 1.0, 0.0], rtol=1e-6)
  with pytest.raises(ValueError, match='group_size'):
    compute_rewards(resp, recs[:1] * 3, group_size=2)


def test_registry_user_reward_and_failures():
  @register_reward('test_len_bonus')
  def len_bonus(response, record):
    return len(response) / 10

  @register_reward('test_broken')
  def broken(response, record):
    if 'boom' in response:
      raise RuntimeError('boom')
    return float('nan') if 'nan' in response else 1.0

  cfg = RewardConfig(terms=(('test_len_bonus', 2.0), ('test_broken', 1.0)))
  total, per, m = compute_rewards(['abcde', 'boom', 'nan'], [{}] * 3, cfg)
  np.testing.assert_allclose(total, [2.0, 0.8, 0.6], rtol=1e-6)
  assert m['reward/errors/test_broken'] == 2.0 and m['reward/errors/test_len_bonus'] == 0.0
  with pytest.raises(ValueError, match='register_reward'):
    RewardConfig(terms=(('no_such_reward', 1.0),))
  with pytest.raises(ValueError, match='already registered'):
    register_reward('accuracy')(len_bonus)

  @register_reward('test_len_bonus')   # the same function defined again (a config module run twice) replaces it
  def len_bonus(response, record):  # noqa: F811
    return 1.0
  assert rewards.get_reward('test_len_bonus')('abc', {}) == 1.0
  with pytest.raises(ValueError, match='once'):
    RewardConfig(terms=(('accuracy', 1.0), ('accuracy', 1.0)))


_TAGS = st.sampled_from(['<answer>', '</answer>', '<think>', '</think>', '(', ')', '.', ',', '%', '$', 'B', '3',
                         '1e999', '-', ' ', '\n', 'é', '答案', '\x00', '\ud7ff'])
_TEXT = st.one_of(st.text(max_size=200), st.lists(st.one_of(_TAGS, st.text(max_size=5)), max_size=40).map(''.join))
_TYPES = st.sampled_from(['multiple choice', 'numerical', 'OCR', 'free-form', 'regression', '', 'weird'])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(response=_TEXT, solution=_TEXT, ptype=_TYPES, options=st.lists(_TEXT, max_size=3))
def test_builtins_never_raise(response, solution, ptype, options):
  rec = {'solution': solution, 'problem_type': ptype, 'options': options}
  for name in ('accuracy', 'format_think_answer', 'format_answer_only'):
    v = rewards.get_reward(name)(response, rec)
    assert isinstance(v, float) and 0.0 <= v <= 1.0
  got = extract_answer(response)
  assert got is None or got in response


def test_huge_and_odd_inputs_never_raise():
  huge = '<answer>' * 20000 + 'B' + '</think>' * 20000 + '9' * 5000
  rec = {'solution': None, 'problem_type': None, 'options': 'not a list'}
  total, _, _ = compute_rewards([huge, '', '<answer>' + '9' * 400 + '</answer>'], [rec] * 3)
  assert np.all(np.isfinite(total))
  assert answer_score('9' * 400, '9' * 400, 'numerical') == 0.0    # inf is not a number here
