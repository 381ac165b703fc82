"""Arms of a comparison: a short spec string -> the config changes of one RL run started from the shared SFT
checkpoint.

Grammar:  NAME[:LAMBDA][@KEY=VALUE]...
  sft                 no RL: the shared SFT checkpoint itself (evaluated once; greedy evaluation is deterministic)
  grpo                lambda_attn = 0
  ral:L               GRPO + L * RAL (ral_jax/docs/method.md s.3); `ral` alone is lambda_attn = 1
  @KEY=VALUE          any config override, VALUE parsed as a Python literal when it is one, e.g.
                      ral:1@model.record_layers=(3,)      record layer (the paper's open question: last / middle)
                      ral:1@rl.attn_divergence=kl         KL(p_theta || p_old) instead of the JSD
                      ral:1@rl.rows=producing             the rows that produce the response tokens
                      grpo@rl.num_minibatches=8           mini-batches (optimizer steps) per rollout batch
                      ral:1@rl.lr=5e-5                    the RL learning rate
The label of an arm is its spec string; every arm runs the same rollout budget (train.rl_steps rollout batches of
rl.prompts_per_batch x G samples) and, unless an override changes it, the same number of updates.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, Dict, List, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class Arm:
  label: str
  algo: str                              # 'sft' | 'grpo' | 'ral'
  lambda_attn: float = 0.0
  overrides: Tuple[Tuple[str, Any], ...] = ()

  @property
  def trains(self) -> bool:
    return self.algo != 'sft'

  @property
  def dirname(self) -> str:
    return ''.join(c if c.isalnum() or c in '.-_' else '_' for c in self.label.replace(':', '-').replace('@', '+'))


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arm(spec: str) -> Arm:
  """One arm spec (see the module docstring) -> Arm; raises ValueError naming the bad part."""
  spec = spec.strip()
  head, *sets = spec.split('@')
  name, _, lam = head.partition(':')
  if name not in ('sft', 'grpo', 'ral'):
    raise ValueError(f'arm {spec!r}: name must be sft, grpo or ral[:lambda]')
  if lam and name != 'ral':
    raise ValueError(f'arm {spec!r}: only ral takes a lambda (ral:0.5)')
  try:
    lambda_attn = float(lam) if lam else (1.0 if name == 'ral' else 0.0)
  except ValueError:
    raise ValueError(f'arm {spec!r}: lambda {lam!r} is not a number') from None
  if name == 'ral' and lambda_attn <= 0:
    raise ValueError(f'arm {spec!r}: ral needs lambda > 0 (use grpo for 0)')
  if name == 'sft' and sets:
    raise ValueError(f'arm {spec!r}: the sft arm is the shared checkpoint; it takes no overrides')
  overrides = []
  for s in sets:
    key, eq, val = s.partition('=')
    if not eq or not key:
      raise ValueError(f'arm {spec!r}: override {s!r} must be KEY=VALUE')
    overrides.append((key.strip(), _value(val.strip())))
  return Arm(spec, name, lambda_attn, tuple(overrides))


def parse_arms(text: str) -> List[Arm]:
  """Comma-separated specs; commas inside (...) or [...] belong to an override value."""
  out, depth, cur = [], 0, ''
  for ch in text:
    depth += ch in '([' 
    depth -= ch in ')]'
    if ch == ',' and depth == 0:
      out.append(cur)
      cur = ''
    else:
      cur += ch
  out.append(cur)
  arms = [parse_arm(s) for s in out if s.strip()]
  labels = [a.label for a in arms]
  if len(set(labels)) != len(labels) or not arms:
    raise ValueError(f'--arms {text!r}: give at least one arm, each once')
  return arms


def set_key(config, key: str, value) -> None:
  """config.a.b = value for key 'a.b' (the key must exist: configs/common.py declares every knob)."""
  *path, last = key.split('.')
  node = config
  for p in path:
    node = getattr(node, p)
  if last not in node:
    raise ValueError(f'override {key}: no such config knob')
  old = node[last]
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  node[last] = value


def apply_arm(config, arm: Arm, seed: int, sft_workdir: str, overrides: Sequence[Tuple[str, Any]] = ()):
  """The RL config of (arm, seed): starts from the SFT checkpoint, no SFT steps, the arm's loss and overrides."""
  c = config.copy_and_resolve_references()
  c.algo = 'grpo' if arm.algo == 'grpo' else 'ral'
  c.rl.lambda_attn = arm.lambda_attn
  c.seed = seed
  c.train.sft_steps = 0
  c.model.init_checkpoint = sft_workdir
  for k, v in tuple(overrides) + arm.overrides:
    set_key(c, k, v)
  return c


def sft_config(config, overrides: Sequence[Tuple[str, Any]] = ()):
  """The shared SFT stage: the config's SFT steps, no RL."""
  c = config.copy_and_resolve_references()
  c.algo = 'sft'
  c.train.rl_steps = 0
  for k, v in overrides:
    set_key(c, k, v)
  return c


def describe(arms: Sequence[Arm]) -> Dict[str, Dict]:
  return {a.label: {'algo': a.algo, 'lambda_attn': a.lambda_attn, 'overrides': dict(a.overrides)} for a in arms}
