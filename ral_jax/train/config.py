"""Typed, frozen component configs built from the ml_collections experiment config, validated at the boundary.

`build(config, num_devices)` turns the ConfigDict of configs/common.py into a `RunConfig` of small frozen
dataclasses; each `__post_init__` raises a ValueError that says which knob to change. Symbols follow
shared/method.md: G (group size), lambda_attn, beta, mu, gamma_attn, epsilon (clip).
Warnings (not errors): lambda_attn > 0 with a single update per rollout (method.md s.3: RAL then equals GRPO).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Tuple

ALGOS = ('sft', 'grpo', 'ral', 'ral_zero', 'distill')
AGGREGATIONS = ('token_mean', 'seq_mean_token_mean', 'seq_mean_token_sum', 'drgrpo')
KL_ESTIMATORS = ('k1', 'k2', 'k3')
ADVANTAGES = ('grpo', 'drgrpo', 'rloo')
ROWS = ('response', 'producing')
FORMATS = ('think', 'answer_only')
SCHEDULES = ('cosine', 'constant')
SOURCES = ('synthetic', 'manifest')
TASK_FAMILIES = ('video', 'image', 'mixed')


class RALSingleUpdateWarning(UserWarning):
  """lambda_attn > 0 but each rollout batch gets one optimizer step: the RAL term is exactly zero."""


def _check(cond: bool, msg: str):
  if not cond:
    raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float                      # peak learning rate of this stage
  schedule: str = 'cosine'       # warm-up then cosine decay to end_lr_ratio * lr | warm-up then constant
  warmup_steps: int = 0          # optimizer steps
  total_steps: int = 1           # optimizer steps of the stage (cosine horizon)
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.0      # AdamW decoupled weight decay
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0         # global-norm clip; 0 = off
  freeze: Tuple[str, ...] = ('visual',)
  micro_batches: int = 1         # gradient accumulation: micro-batches averaged into one optimizer step

  def __post_init__(self):
    _check(self.lr > 0, f'learning rate {self.lr} must be > 0 (--config.rl.lr / --config.sft.lr)')
    _check(self.schedule in SCHEDULES, f'optim.schedule={self.schedule!r}; choose one of {SCHEDULES}')
    _check(self.warmup_steps >= 0, 'optim.warmup_steps must be >= 0')
    _check(0.0 <= self.end_lr_ratio <= 1.0, 'optim.end_lr_ratio must be in [0, 1]')
    _check(self.grad_clip >= 0, 'optim.grad_clip must be >= 0 (0 = off)')
    _check(self.micro_batches >= 1, 'micro_batches must be >= 1')


@dataclasses.dataclass(frozen=True)
class RLConfig:
  prompts_per_batch: int = 8     # prompts per rollout batch (global)
  group_size: int = 8            # G
  num_minibatches: int = 4       # optimizer steps per epoch over one rollout batch
  epochs: int = 1
  micro_batches: int = 1
  lambda_attn: float = 1.0       # lambda_attn: weight of L_attn = E_t[A * JSD(p_theta || p_old)]
  beta: float = 0.04             # beta: weight of KL(pi_theta || pi_ref)
  kl_estimator: str = 'k3'
  clip_eps_low: float = 0.2      # epsilon (PPO clip), lower side
  clip_eps_high: float = 0.2
  dual_clip: float = 0.0
  aggregation: str = 'token_mean'
  attn_aggregation: str = 'token_mean'
  rows: str = 'response'
  advantage: str = 'grpo'
  adv_eps: float = 1e-6
  reward: str = 'default'
  accuracy_weight: float = 0.9
  format_weight: float = 0.1
  format: str = 'think'
  logprob_chunk: int = 0
  record_layers: Tuple[int, ...] = (-1,)
  score_micro_batches: int = 0   # chunks of the scoring pass (0 = num_minibatches)

  def __post_init__(self):
    _check(self.group_size >= 2, f'rl.group_size (G) = {self.group_size}: group advantages need G >= 2')
    _check(self.prompts_per_batch >= 1, 'rl.prompts_per_batch must be >= 1')
    _check(self.num_minibatches >= 1 and self.epochs >= 1, 'rl.num_minibatches and rl.epochs must be >= 1')
    n = self.rollout_batch
    _check(n % self.num_minibatches == 0,
           f'rollout batch prompts_per_batch * G = {n} is not divisible by rl.num_minibatches = '
           f'{self.num_minibatches}; change one of them')
    _check((n // self.num_minibatches) % self.micro_batches == 0,
           f'mini-batch {n // self.num_minibatches} not divisible by rl.micro_batches = {self.micro_batches}')
    _check(self.score_micro_batches >= 0 and n % max(self.score_micro_batches, 1) == 0,
           f'rollout batch {n} not divisible by rl.score_micro_batches = {self.score_micro_batches}')
    _check(self.lambda_attn >= 0, 'rl.lambda_attn must be >= 0')
    _check(self.beta >= 0, 'rl.beta must be >= 0')
    _check(self.kl_estimator in KL_ESTIMATORS, f'rl.kl_estimator={self.kl_estimator!r}; choose {KL_ESTIMATORS}')
    _check(self.aggregation in AGGREGATIONS, f'rl.aggregation={self.aggregation!r}; choose {AGGREGATIONS}')
    _check(self.attn_aggregation in AGGREGATIONS,
           f'rl.attn_aggregation={self.attn_aggregation!r}; choose "" or one of {AGGREGATIONS}')
    _check(self.rows in ROWS, f'rl.rows={self.rows!r}; choose one of {ROWS}')
    _check(self.advantage in ADVANTAGES, f'rl.advantage={self.advantage!r}; choose one of {ADVANTAGES}')
    _check(self.format in FORMATS, f'rl.format={self.format!r}; choose one of {FORMATS}')
    _check(self.clip_eps_low > 0 and self.clip_eps_high > 0, 'rl.clip_eps_low/high must be > 0')
    _check(self.dual_clip == 0 or self.dual_clip > 1, 'rl.dual_clip must be 0 (off) or > 1')

  @property
  def rollout_batch(self) -> int:
    return self.prompts_per_batch * self.group_size

  @property
  def minibatch(self) -> int:
    return self.rollout_batch // self.num_minibatches

  @property
  def updates_per_rollout(self) -> int:
    return self.num_minibatches * self.epochs


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  teacher_preset: str = 'tiny'
  teacher_checkpoint: str = ''
  teacher_seed: int = 7
  mu: float = 1.0                # mu: weight of the token reverse KL (GKD)
  gamma_attn: float = 0.5        # gamma_attn: weight of JSD(student rows || teacher rows)
  kd_estimator: str = 'full'
  attention: bool = True

  def __post_init__(self):
    _check(self.mu >= 0 and self.gamma_attn >= 0, 'distill.mu and distill.gamma_attn must be >= 0')
    _check(self.kd_estimator in ('full', 'sampled'), "distill.kd_estimator must be 'full' or 'sampled'")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 48
  dtype: str = ''

  def __post_init__(self):
    _check(self.temperature >= 0, 'sampling.temperature must be >= 0 (0 = greedy)')
    _check(0 < self.top_p <= 1, 'sampling.top_p must be in (0, 1]')
    _check(self.max_new_tokens >= 1, 'sampling.max_new_tokens must be >= 1')


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  sft_steps: int = 0
  rl_steps: int = 0
  sft_batch_size: int = 8
  log_every: int = 1
  eval_every: int = 0
  eval_examples: int = 64
  eval_batch: int = 32
  heatmap_every: int = 0
  heatmap_examples: int = 2
  export_hf: bool = True
  stop_after: int = 0
  ckpt_every: int = 10
  ckpt_keep: int = 2
  ckpt_async: bool = True

  def __post_init__(self):
    _check(self.sft_steps >= 0 and self.rl_steps >= 0, 'train.sft_steps and train.rl_steps must be >= 0')
    _check(self.sft_steps + self.rl_steps > 0, 'nothing to do: set train.sft_steps or train.rl_steps > 0')
    _check(self.ckpt_every >= 1 and self.ckpt_keep >= 1, 'checkpoint.every and checkpoint.keep must be >= 1')
    _check(self.heatmap_every >= 0 and self.heatmap_examples >= 0,
           'train.heatmap_every and train.heatmap_examples must be >= 0 (0 = off)')

  @property
  def total_steps(self) -> int:
    return self.sft_steps + self.rl_steps


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  shape: Tuple[int, ...]         # resolved: no -1 left
  axis_names: Tuple[str, ...] = ('data', 'fsdp', 'tensor')
  rules: Tuple[Tuple[str, object], ...] = ()

  @property
  def batch_shards(self) -> int:
    """Devices the batch is split over: the product of the 'data' and 'fsdp' axes."""
    return math.prod(s for s, n in zip(self.shape, self.axis_names) if n in ('data', 'fsdp'))


@dataclasses.dataclass(frozen=True)
class RunConfig:
  algo: str
  seed: int
  rl: RLConfig
  rl_optim: OptimConfig
  sft_optim: OptimConfig
  distill: DistillConfig
  sampling: SamplingConfig
  loop: LoopConfig
  mesh: MeshConfig

  @property
  def uses_attention_record(self) -> bool:
    return self.rl.lambda_attn > 0 or (self.algo == 'distill' and self.distill.attention
                                        and self.distill.gamma_attn > 0)


def resolve_mesh_shape(shape, axis_names, num_devices: int) -> Tuple[int, ...]:
  """Replaces a -1 by the remaining devices. A fixed shape may use a divisor of the device count (the first
  devices), e.g. (2, 1, 1) on 8 fake CPU devices in tests."""
  shape = tuple(int(s) for s in shape)
  _check(len(shape) == len(axis_names), f'mesh.shape {shape} needs one entry per axis {tuple(axis_names)}')
  _check(sum(s == -1 for s in shape) <= 1, f'mesh.shape {shape}: at most one -1')
  _check(all(s == -1 or s >= 1 for s in shape), f'mesh.shape {shape}: entries must be >= 1 or -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    _check(num_devices % known == 0, f'mesh.shape {shape} does not divide the {num_devices} devices; '
                                     f'make the product of the fixed entries divide {num_devices}')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  used = math.prod(shape)
  _check(used <= num_devices and num_devices % used == 0,
         f'mesh.shape {shape} needs {used} devices, which does not divide the {num_devices} present; '
         f'set --config.mesh.shape so the product divides {num_devices} (or use one -1 to take them all)')
  return shape


def build(config, num_devices: int, warn: bool = True) -> RunConfig:
  """Validates `config` (a ConfigDict of configs/common.py) for `num_devices` devices; returns a RunConfig."""
  algo = config.algo
  _check(algo in ALGOS, f'config.algo={algo!r} is unknown; choose one of {ALGOS}')
  d = config.data
  _check(d.source in SOURCES, f'data.source={d.source!r}; choose one of {SOURCES}')
  if d.source == 'synthetic':
    synthetic_tasks(d.task)
  if d.source == 'manifest':
    _check(bool(d.train_manifest), "data.source='manifest' needs --config.data.train_manifest=FILE")
  if config.model.preset not in _model_presets() and not config.model.hf_checkpoint:
    raise ValueError(f'model.preset={config.model.preset!r} is unknown; choose one of {_model_presets()} '
                     'or set --config.model.hf_checkpoint=DIR')
  r = config.rl
  rl = RLConfig(
      prompts_per_batch=r.prompts_per_batch, group_size=r.group_size, num_minibatches=r.num_minibatches,
      epochs=r.epochs, micro_batches=r.micro_batches, lambda_attn=float(r.lambda_attn), beta=float(r.beta),
      kl_estimator=r.kl_estimator, clip_eps_low=r.clip_eps_low, clip_eps_high=r.clip_eps_high,
      dual_clip=r.dual_clip, aggregation=r.aggregation, attn_aggregation=r.attn_aggregation or r.aggregation,
      rows=r.rows, advantage=r.advantage, adv_eps=r.adv_eps, reward=r.reward, accuracy_weight=r.accuracy_weight,
      format_weight=r.format_weight, format=r.format, logprob_chunk=r.logprob_chunk,
      record_layers=tuple(config.model.record_layers), score_micro_batches=r.get('score_micro_batches', 0))
  t, o, ck = config.train, config.optim, config.checkpoint
  loop = LoopConfig(
      sft_steps=t.sft_steps, rl_steps=t.rl_steps, sft_batch_size=config.sft.batch_size, log_every=t.log_every,
      eval_every=t.eval_every, eval_examples=t.eval_examples, eval_batch=t.eval_batch, export_hf=t.export_hf,
      heatmap_every=t.heatmap_every, heatmap_examples=t.heatmap_examples,
      stop_after=t.stop_after, ckpt_every=ck.every, ckpt_keep=ck.keep, ckpt_async=ck.async_save)
  common = dict(schedule=o.schedule, warmup_steps=o.warmup_steps, end_lr_ratio=o.end_lr_ratio,
                weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip,
                freeze=tuple(o.freeze))
  rl_optim = OptimConfig(lr=r.lr, total_steps=max(1, t.rl_steps * rl.updates_per_rollout),
                         micro_batches=r.micro_batches, **common)
  sft_optim = OptimConfig(lr=config.sft.lr, total_steps=max(1, t.sft_steps), micro_batches=config.sft.micro_batches,
                          **common)
  dc = config.distill
  distill = DistillConfig(teacher_preset=dc.teacher_preset, teacher_checkpoint=dc.teacher_checkpoint,
                          teacher_seed=dc.teacher_seed, mu=dc.mu, gamma_attn=dc.gamma_attn,
                          kd_estimator=dc.kd_estimator, attention=dc.attention)
  if algo == 'distill':
    _check(dc.teacher_checkpoint or dc.teacher_preset in _model_presets(),
           f'distill.teacher_preset={dc.teacher_preset!r} unknown; choose {_model_presets()} or set '
           'distill.teacher_checkpoint=DIR')
  s = config.sampling
  sampling = SamplingConfig(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                            max_new_tokens=s.max_new_tokens, dtype=s.dtype)
  names = tuple(config.mesh.axis_names)
  _check(names == ('data', 'fsdp', 'tensor'), f"mesh.axis_names={names}: must be ('data', 'fsdp', 'tensor')")
  mesh = MeshConfig(shape=resolve_mesh_shape(config.mesh.shape, names, num_devices), axis_names=names,
                    rules=tuple(tuple(x) for x in config.mesh.rules))
  n = mesh.batch_shards
  if loop.rl_steps:
    for what, size in (('rollout batch (rl.prompts_per_batch * G)', rl.rollout_batch),
                       ('RL mini-batch (rollout batch / rl.num_minibatches)', rl.minibatch),
                       ('RL micro-batch (mini-batch / rl.micro_batches)', rl.minibatch // rl.micro_batches),
                       ('scoring chunk (rollout batch / rl.score_micro_batches)',
                        rl.rollout_batch // (rl.score_micro_batches or rl.num_minibatches))):
      _check(size % n == 0, f'{what} = {size} is not divisible by the {n} batch shards of mesh {mesh.shape} '
                            f'(data x fsdp); change the batch sizes or --config.mesh.shape')
  if loop.sft_steps:
    _check(loop.sft_batch_size % (n * sft_optim.micro_batches) == 0,
           f'sft.batch_size = {loop.sft_batch_size} is not divisible by sft.micro_batches x the {n} batch shards '
           f'of mesh {mesh.shape}; change sft.batch_size or --config.mesh.shape')
  run = RunConfig(algo=algo, seed=config.seed, rl=rl, rl_optim=rl_optim, sft_optim=sft_optim, distill=distill,
                  sampling=sampling, loop=loop, mesh=mesh)
  if warn and loop.rl_steps and rl.lambda_attn > 0 and rl.updates_per_rollout == 1:
    warnings.warn(
        f'rl.lambda_attn = {rl.lambda_attn} > 0 but each rollout batch gets a single optimizer step '
        '(rl.num_minibatches * rl.epochs == 1): p_theta == p_old at that step, so the RAL term and its gradient '
        'are exactly zero and the run is plain GRPO (method.md s.3). Set --config.rl.num_minibatches=4 '
        '(or rl.epochs > 1) to make RAL act.', RALSingleUpdateWarning, stacklevel=2)
  return run


def synthetic_tasks(task: str) -> Tuple[str, ...]:
  """data.task -> the synthetic task names (data/synthetic.py)."""
  from ral_jax.data.synthetic import IMAGE_TASKS, TASKS, VIDEO_TASKS
  fam = {'video': VIDEO_TASKS, 'image': IMAGE_TASKS, 'mixed': TASKS}
  if task in fam:
    return tuple(fam[task])
  names = tuple(t.strip() for t in task.split(',') if t.strip())
  bad = [t for t in names if t not in TASKS]
  _check(names and not bad, f'data.task={task!r}: use one of {TASK_FAMILIES} or a comma list of {TASKS}')
  return names


def _model_presets():
  from ral_jax.models.config import PRESETS
  return sorted(PRESETS)


def unknown_keys(config, reference) -> list:
  """Dotted names present in `config` but not in `reference` (both ConfigDicts), for typo checks."""
  out = []
  for k in config.keys():
    if k not in reference:
      out.append(k)
    elif hasattr(config[k], 'keys') and hasattr(reference[k], 'keys'):
      out += [f'{k}.{x}' for x in unknown_keys(config[k], reference[k])]
  return out


def check_known_keys(config, reference) -> None:
  bad = unknown_keys(config, reference)
  _check(not bad, f'unknown config keys {bad}: check the spelling against configs/common.py')

