"""Rewards on the host: a registry of named functions on strings and their weighted sum (ral_jax/docs/method.md
s.2, s.4).

A reward function takes (response text, record) and returns a float; the record is the dataset example (Video-R1
fields: 'solution' like '<answer>B</answer>', 'problem_type', 'options', ...). Built-ins:
  'accuracy'             answers.answer_score of the last <answer>...</answer> (1/0; MRA partial credit for regression)
  'format_think_answer'  1 if the whole response is <think>...</think><answer>...</answer> (whitespace allowed around
                         and between the blocks, block contents free of think/answer tags), else 0
  'format_answer_only'   1 if the whole response is <answer>...</answer> (RAL-zero), else 0
r = sum_k w_k * reward_k(response, record); default 0.9 * accuracy + 0.1 * format_think_answer (RewardConfig()),
RAL-zero: RAL_ZERO_REWARDS. Add your own from a config module:
    @register_reward('length_penalty')
    def length_penalty(response, record): return -len(response) / 4096
Built-ins never raise. A user reward that raises or returns a non-finite value scores 0 for that sample; the
failure is counted in the metrics ('reward/errors/<name>') and logged once per name.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import numpy as np

from ral_jax.rl.answers import answer_score, extract_answer

RewardFn = Callable[[str, Mapping[str, Any]], float]
_REGISTRY: Dict[str, RewardFn] = {}
_LOGGED = set()

_BLOCK = r'(?:(?!</?think>|</?answer>).)*'
_THINK_ANSWER = re.compile(rf'\s*<think>{_BLOCK}</think>\s*<answer>{_BLOCK}</answer>\s*', re.DOTALL)
_ANSWER_ONLY = re.compile(rf'\s*<answer>{_BLOCK}</answer>\s*', re.DOTALL)


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator: makes fn(response, record) -> float available to RewardConfig under `name`."""
  def deco(fn: RewardFn) -> RewardFn:
    old = _REGISTRY.get(name)
    same = old is not None and (old.__module__, old.__qualname__) == (fn.__module__, fn.__qualname__)
    if old is not None and not same:   # re-running the defining module (config reloaded) replaces it quietly
      raise ValueError(f'a reward named {name!r} is already registered ({old.__module__}.{old.__qualname__}); '
                       'pick another name')
    _REGISTRY[name] = fn
    return fn
  return deco


def get_reward(name: str) -> RewardFn:
  if name not in _REGISTRY:
    raise ValueError(f'unknown reward {name!r}; registered: {sorted(_REGISTRY)}. Define it with '
                     '@ral_jax.rl.rewards.register_reward(name) in a module imported before the config is built')
  return _REGISTRY[name]


def registered_rewards() -> Tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


@register_reward('accuracy')
def accuracy_reward(response: str, record: Mapping[str, Any]) -> float:
  options = record.get('options') or ()
  options = options if isinstance(options, (list, tuple)) else ()
  return answer_score(extract_answer(response), record.get('solution', ''), record.get('problem_type', ''), options)


@register_reward('format_think_answer')
def think_answer_format_reward(response: str, record: Mapping[str, Any]) -> float:
  return float(isinstance(response, str) and _THINK_ANSWER.fullmatch(response) is not None)


@register_reward('format_answer_only')
def answer_only_format_reward(response: str, record: Mapping[str, Any]) -> float:
  return float(isinstance(response, str) and _ANSWER_ONLY.fullmatch(response) is not None)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """terms: ((registered reward name, weight), ...); r = sum of weight * reward. Default 0.9 acc + 0.1 format."""
  terms: Tuple[Tuple[str, float], ...] = (('accuracy', 0.9), ('format_think_answer', 0.1))

  def __post_init__(self):
    if not self.terms:
      raise ValueError("reward terms are empty; give at least one (name, weight), e.g. (('accuracy', 1.0),)")
    names = [t[0] for t in self.terms]
    if len(set(names)) != len(names):
      raise ValueError(f'reward terms {names} repeat a name; list each reward once')
    for name, weight in self.terms:
      get_reward(name)
      if not math.isfinite(weight):
        raise ValueError(f'reward weight of {name!r} is {weight}; use a finite float')


RAL_ZERO_REWARDS = RewardConfig(terms=(('accuracy', 0.9), ('format_answer_only', 0.1)))


def _safe_call(name: str, fn: RewardFn, response: str, record: Mapping[str, Any]) -> Tuple[float, bool]:
  try:
    v = float(fn(response, record))
  except Exception as e:  # noqa: BLE001 - a user reward must not end a run; counted and logged once
    if name not in _LOGGED:
      _LOGGED.add(name)
      logging.warning('reward %r raised %s: %s (scored 0; further failures are only counted)', name,
                      type(e).__name__, e)
    return 0.0, True
  return (v, False) if math.isfinite(v) else (0.0, True)


def compute_rewards(responses: Sequence[str], records: Sequence[Mapping[str, Any]], cfg: RewardConfig = RewardConfig(),
                    group_size: int = 1) -> Tuple[np.ndarray, Dict[str, np.ndarray], Dict[str, float]]:
  """Scores N responses. records has N entries, or N / group_size (then response i uses records[i // group_size],
  the rollout's b*G+g order). Returns (total [N] float32, {name: [N] float32}, metrics {'reward/total',
  'reward/<name>' means, 'reward/errors/<name>' counts})."""
  n = len(responses)
  if len(records) == n:
    group_size = 1
  elif group_size < 1 or len(records) * group_size != n:
    raise ValueError(f'{n} responses but {len(records)} records with group_size={group_size}: pass one record per '
                     'response, or one per prompt with group_size = G')
  per = {name: np.zeros(n, np.float32) for name, _ in cfg.terms}
  errors = {name: 0 for name, _ in cfg.terms}
  for name, _ in cfg.terms:
    fn = get_reward(name)
    for i, resp in enumerate(responses):
      per[name][i], failed = _safe_call(name, fn, resp, records[i // group_size])
      errors[name] += failed
  total = np.zeros(n, np.float32)
  for name, weight in cfg.terms:
    total += np.float32(weight) * per[name]
  metrics = {'reward/total': float(total.mean()) if n else 0.0}
  metrics.update({f'reward/{k}': float(v.mean()) if n else 0.0 for k, v in per.items()})
  metrics.update({f'reward/errors/{k}': float(v) for k, v in errors.items()})
  return total, per, metrics
