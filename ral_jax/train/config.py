"""The one typed boundary: the ml_collections experiment config -> the components' own frozen configs.

`build(config, num_devices)` turns the ConfigDict of configs/common.py into a `RunConfig` whose parts are the
configs the components define and validate themselves:
  model      models.config.ModelConfig   (preset or the HF checkpoint's config.json, plus dtype/remat/attention)
  teacher    TeacherConfig (its ModelConfig, checkpoint, seed) for distillation, else None
  objective  rl.config.ObjectiveConfig   (GRPO, RAL, distillation terms, temperature, log-prob chunk)
  advantage  rl.config.AdvantageConfig
  sampling   rollout.sampling.SamplingConfig (stop and pad ids are the tokenizer's, set by the run set-up)
  data       DataSettings (where the records come from) + data.pipeline.DataConfig (how they become batches)
  rl, loop, mesh, rl_optim, sft_optim   the RL batch structure, the schedule of the run, the device mesh, AdamW
Every value is checked once, here, before any model or data is built; an error names the `--config.` knob.
The objective's knobs are copied by one table (`OBJECTIVE_KNOBS`): a new loss knob is a field in rl/config.py, a
default in configs/common.py and a line in that table. Symbols follow ral_jax/docs/method.md: G (group size),
lambda_attn, beta, mu, gamma_attn, epsilon (clip).
lambda_attn > 0 with a single update per rollout (RAL then equals GRPO, ral_jax/docs/method.md s.3) warns, or fails
with rl.allow_single_update=False (rl.config.check_updates_per_rollout).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable, Dict, Optional, Tuple

from ral_jax.data import pipeline as pipeline_lib
from ral_jax.data.media import VideoConfig
from ral_jax.data.processor import ProcessorConfig
from ral_jax.data.prompts import PromptConfig
from ral_jax.models.config import PRESETS, ModelConfig, get_preset
from ral_jax.rl import config as rlc
from ral_jax.rl.config import RALSingleUpdateWarning  # noqa: F401  (re-exported: raised by build)
from ral_jax.rollout.sampling import SamplingConfig

ALGOS = ('sft', 'grpo', 'ral', 'ral_zero', 'distill')
SCHEDULES = ('cosine', 'constant')
SOURCES = ('synthetic', 'manifest')
TASK_FAMILIES = ('video', 'image', 'mixed')
MESH_AXES = ('data', 'fsdp', 'tensor')


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
  micro_batches: int = 1         # gradient accumulation: micro-batch gradients summed into one optimizer step

  def __post_init__(self):
    _check(self.lr > 0, f'learning rate {self.lr} must be > 0 (--config.rl.lr / --config.sft.lr)')
    _check(self.schedule in SCHEDULES, f'optim.schedule={self.schedule!r}; choose one of {SCHEDULES}')
    _check(self.warmup_steps >= 0, 'optim.warmup_steps must be >= 0')
    _check(0.0 <= self.end_lr_ratio <= 1.0, 'optim.end_lr_ratio must be in [0, 1]')
    _check(self.grad_clip >= 0, 'optim.grad_clip must be >= 0 (0 = off)')
    _check(self.micro_batches >= 1, 'micro_batches must be >= 1')


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The structure of an RL step (the loss knobs are in RunConfig.objective) and its reward."""
  prompts_per_batch: int = 8     # prompts per rollout batch (global)
  group_size: int = 8            # G
  num_minibatches: int = 4       # optimizer steps per epoch over one rollout batch
  epochs: int = 1
  micro_batches: int = 1         # gradient accumulation per mini-batch
  reward: str = 'default'        # 'default' = accuracy_weight * accuracy + format_weight * format, or a registered name
  accuracy_weight: float = 0.9
  format_weight: float = 0.1
  format: str = 'think'          # prompt and format reward: 'think' | 'answer_only' (RAL-zero)
  record_attention: bool = False  # record p_theta / p_old even when no loss needs them (attn/* metrics for GRPO)
  ral_grad_share: bool = False   # log ral/grad_share = |grad lambda L_RAL| / |grad L| (one extra backward)
  score_micro_batches: int = 0   # chunks of the scoring pass over the rollout batch (0 = num_minibatches)
  # Compute each prompt once for its G samples in the scoring pass and the update (exact; models/shared_prefix.py):
  # B*Tp + B*G*Tr tokens instead of B*G*(Tp+Tr). Mini-batches, micro-batches and scoring chunks then hold whole
  # groups (group b in slice b mod n), so each of them must divide prompts_per_batch, and the groups of each
  # slice must divide over the batch shards (checked in `build`).
  share_prompt: bool = False

  def __post_init__(self):
    _check(self.group_size >= 2, f'rl.group_size (G) = {self.group_size}: group advantages need G >= 2')
    _check(self.prompts_per_batch >= 1, 'rl.prompts_per_batch must be >= 1')
    _check(self.num_minibatches >= 1 and self.epochs >= 1, 'rl.num_minibatches and rl.epochs must be >= 1')
    n = self.rollout_batch
    _check(n % self.num_minibatches == 0,
           f'rollout batch prompts_per_batch * G = {n} is not divisible by rl.num_minibatches = '
           f'{self.num_minibatches}; change one of them')
    _check(self.micro_batches >= 1 and (n // self.num_minibatches) % self.micro_batches == 0,
           f'mini-batch {n // self.num_minibatches} not divisible by rl.micro_batches = {self.micro_batches}')
    _check(self.score_micro_batches >= 0 and n % max(self.score_micro_batches, 1) == 0,
           f'rollout batch {n} not divisible by rl.score_micro_batches = {self.score_micro_batches}')
    if self.share_prompt:
      p = self.prompts_per_batch
      for knob, n in (('rl.num_minibatches', self.num_minibatches),
                      ('rl.num_minibatches * rl.micro_batches', self.num_minibatches * self.micro_batches),
                      ('rl.score_micro_batches', self.score_micro_batches or self.num_minibatches)):
        _check(p % n == 0, f'rl.share_prompt splits the batch into whole groups: rl.prompts_per_batch = {p} '
                           f'groups are not divisible by {knob} = {n}; change one of them (or rl.share_prompt=False)')
    PromptConfig(style=self.format)   # the prompt styles are the format choices

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
class TeacherConfig:
  """The frozen distillation teacher: its model config, HF directory ('' = random init from seed)."""
  model: ModelConfig
  checkpoint: str = ''
  seed: int = 7


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where the records come from; `pipeline` is the stage-independent data.pipeline.DataConfig (manifests, batch
  size, targets, seed and sharding are set per stage by train/data.py)."""
  source: str                    # 'synthetic' | 'manifest'
  tasks: Tuple[str, ...]         # synthetic task names (source 'synthetic')
  num_train: int
  num_eval: int
  synthetic_seed: int
  synthetic_knobs: Tuple[Tuple[str, object], ...]   # data.synthetic.Knobs fields
  train_manifests: Tuple[str, ...]
  eval_manifests: Tuple[str, ...]
  pipeline: pipeline_lib.DataConfig

  def __post_init__(self):
    _check(self.source in SOURCES, f'data.source={self.source!r}; choose one of {SOURCES}')
    if self.source == 'manifest':
      _check(bool(self.train_manifests), "data.source='manifest' needs --config.data.train_manifest=FILE")


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
  eval_by_source: bool = False   # also eval/accuracy/<data_source> per task (single-process runs only)

  def __post_init__(self):
    _check(self.sft_steps >= 0 and self.rl_steps >= 0, 'train.sft_steps and train.rl_steps must be >= 0')
    _check(self.sft_steps + self.rl_steps > 0, 'nothing to do: set train.sft_steps or train.rl_steps > 0')
    _check(self.log_every >= 1, 'train.log_every must be >= 1')
    _check(self.ckpt_every >= 1 and self.ckpt_keep >= 1, 'checkpoint.every and checkpoint.keep must be >= 1')
    _check(self.heatmap_every >= 0 and self.heatmap_examples >= 0,
           'train.heatmap_every and train.heatmap_examples must be >= 0 (0 = off)')

  @property
  def total_steps(self) -> int:
    return self.sft_steps + self.rl_steps


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  shape: Tuple[int, ...]         # resolved ('data', 'fsdp', 'tensor') sizes: no -1 left
  rules: Tuple[Tuple[str, object], ...] = ()

  @property
  def batch_shards(self) -> int:
    """Devices the batch is split over: the product of the 'data' and 'fsdp' axes."""
    return self.shape[0] * self.shape[1]


@dataclasses.dataclass(frozen=True)
class RunConfig:
  algo: str
  seed: int
  model: ModelConfig
  hf_checkpoint: str             # '' = random init
  init_checkpoint: str           # an Orbax workdir to take the policy parameters from ('' = none)
  tokenizer: str                 # a tokenizer directory or 'embedded'
  record_layer: int              # the decoder layer whose attention the losses use
  objective: rlc.ObjectiveConfig
  advantage: rlc.AdvantageConfig
  rl: RLConfig
  sampling: SamplingConfig
  teacher: Optional[TeacherConfig]
  data: DataSettings
  loop: LoopConfig
  mesh: MeshConfig
  rl_optim: OptimConfig
  sft_optim: OptimConfig


# ---- ConfigDict -> components --------------------------------------------------------------------------------

def _off_is_none(v):
  return v or None


# (ObjectiveConfig part, field) -> (ConfigDict path, conversion). A new loss knob is one line here.
OBJECTIVE_KNOBS: Dict[Tuple[str, str], Tuple[str, Callable]] = {
    ('grpo', 'clip_eps_low'): ('rl.clip_eps_low', float),
    ('grpo', 'clip_eps_high'): ('rl.clip_eps_high', float),
    ('grpo', 'dual_clip'): ('rl.dual_clip', _off_is_none),         # 0 = off
    ('grpo', 'beta'): ('rl.beta', float),
    ('grpo', 'kl_estimator'): ('rl.kl_estimator', str),
    ('grpo', 'aggregation'): ('rl.aggregation', str),
    ('grpo', 'max_response_length'): ('rl.max_response_length', _off_is_none),   # 0 = the padded Tr
    ('ral', 'lambda_attn'): ('rl.lambda_attn', float),
    ('ral', 'rows'): ('rl.rows', str),
    ('ral', 'aggregation'): ('rl.attn_aggregation', _off_is_none),  # '' = the token loss's mode
    ('ral', 'allow_single_update'): ('rl.allow_single_update', bool),
    ('ral', 'divergence'): ('rl.attn_divergence', str),
    ('distill', 'mu'): ('distill.mu', float),
    ('distill', 'gamma_attn'): ('distill.gamma_attn', float),
    ('distill', 'kd_estimator'): ('distill.kd_estimator', str),
    ('distill', 'kd_aggregation'): ('distill.kd_aggregation', _off_is_none),
    ('distill', 'attn_aggregation'): ('distill.attn_aggregation', _off_is_none),
    ('advantage', 'estimator'): ('rl.advantage', str),
    ('advantage', 'eps'): ('rl.adv_eps', float),
    ('objective', 'logprob_chunk'): ('rl.logprob_chunk', int),
}


def _get(config, path: str):
  node = config
  for k in path.split('.'):
    node = node[k]
  return node


def _knob_error(e: ValueError) -> ValueError:
  """Rewrites 'grpo.kl_estimator=...' messages of rl/config.py to name the --config knob."""
  m = re.match(r"(\w+)\.(\w+)=", str(e))
  part = {'ral': 'ral', 'grpo': 'grpo', 'distill': 'distill', 'advantage': 'advantage'}.get(m.group(1)) if m else None
  if part and (part, m.group(2)) in OBJECTIVE_KNOBS:
    return ValueError(f'--config.{OBJECTIVE_KNOBS[(part, m.group(2))][0]}: {e}')
  return e


def _objective(config, algo: str, temperature: float) -> Tuple[rlc.ObjectiveConfig, rlc.AdvantageConfig]:
  parts: Dict[str, dict] = {'grpo': {}, 'ral': {}, 'distill': {}, 'advantage': {}, 'objective': {}}
  for (part, field), (path, conv) in OBJECTIVE_KNOBS.items():
    parts[part][field] = conv(_get(config, path))
  if not config.distill.attention:                  # the "GRPO + GKD" baseline row
    parts['distill']['gamma_attn'] = 0.0
  try:
    distill = rlc.DistillConfig(**parts['distill'])   # checked whatever the algo; used by 'distill' only
    obj = rlc.ObjectiveConfig(grpo=rlc.GRPOConfig(**parts['grpo']), ral=rlc.RALConfig(**parts['ral']),
                              distill=distill if algo == 'distill' else None, temperature=temperature,
                              **parts['objective'])
    adv = rlc.AdvantageConfig(**parts['advantage'])
  except ValueError as e:
    raise _knob_error(e) from None
  return obj, adv


def read_hf_config(hf_checkpoint: str) -> dict:
  path = os.path.join(hf_checkpoint, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: --config.model.hf_checkpoint must be a local HF Qwen2.5-VL '
                            'directory (config.json + *.safetensors)')
  with open(path) as f:
    return json.load(f)


def model_config(mc, hf_checkpoint: str, preset: str) -> ModelConfig:
  """ModelConfig from an HF directory's config.json, else the named preset; then the run-time overrides of the
  config's `model` node (dtype, param_dtype, remat_policy, attention_impl: '' = keep; scan_layers False = a Python
  loop over the layers instead of one `lax.scan`)."""
  over = {k: mc[k] for k in ('dtype', 'param_dtype', 'remat_policy', 'attention_impl') if mc[k]}
  if not mc.get('scan_layers', True):
    over['scan_layers'] = False
  if hf_checkpoint:
    return ModelConfig.from_hf(read_hf_config(hf_checkpoint), **over)
  _check(preset in PRESETS, f'model.preset={preset!r} is unknown; choose one of {sorted(PRESETS)} or set '
                            '--config.model.hf_checkpoint=DIR')
  return get_preset(preset, **over)


def tokenizer_dir(config) -> str:
  """The run's tokenizer: data.tokenizer, else the HF checkpoint's, else the embedded one ('embedded')."""
  return config.data.tokenizer or config.model.hf_checkpoint or 'embedded'


def synthetic_tasks(task: str) -> Tuple[str, ...]:
  """data.task -> the synthetic task names (data/synthetic.py)."""
  from ral_jax.data.synthetic import IMAGE_TASKS, TASKS, VIDEO_TASKS
  fam = {'video': VIDEO_TASKS, 'image': IMAGE_TASKS, 'mixed': IMAGE_TASKS + VIDEO_TASKS}
  if task in fam:
    return tuple(fam[task])
  names = tuple(t.strip() for t in task.split(',') if t.strip())
  bad = [t for t in names if t not in TASKS]
  _check(names and not bad, f'data.task={task!r}: use one of {TASK_FAMILIES} or a comma list of {TASKS}')
  return names


def _data(config, model: ModelConfig, tokenizer: str, fmt: str) -> DataSettings:
  d = config.data
  _check(d.source in SOURCES, f'data.source={d.source!r}; choose one of {SOURCES}')
  split = lambda s: tuple(p.strip() for p in s.split(',') if p.strip())
  pipeline = pipeline_lib.DataConfig(
      data_root=d.data_root or None, tokenizer=tokenizer, prompt=PromptConfig(style=fmt),
      processor=ProcessorConfig.from_vision(model.vision, image_min_pixels=d.image_min_pixels,
                                            image_max_pixels=d.image_max_pixels,
                                            video_min_pixels=d.video_min_pixels, video_max_pixels=d.video_max_pixels),
      video=VideoConfig(fps=d.fps, max_frames=d.max_frames, min_frames=d.min_frames),
      prompt_buckets=tuple(d.prompt_buckets), patch_buckets=tuple(d.patch_buckets),
      target_buckets=tuple(d.target_buckets), max_media=d.max_media, num_workers=d.num_workers,
      read_threads=d.read_threads, max_bad_fraction=d.max_bad_fraction)
  knobs = (('image_size', d.image_size), ('video_size', d.video_size), ('video_frames', d.video_frames),
           ('object_size', d.object_size), ('num_distractors', d.num_distractors), ('fps', d.fps))
  return DataSettings(source=d.source, tasks=synthetic_tasks(d.task) if d.source == 'synthetic' else (),
                      num_train=d.num_train, num_eval=d.num_eval, synthetic_seed=d.synthetic_seed,
                      synthetic_knobs=knobs, train_manifests=split(d.train_manifest),
                      eval_manifests=split(d.eval_manifest), pipeline=pipeline)


def _sampling(s, model: ModelConfig) -> SamplingConfig:
  """sampling.temperature 0 means greedy decoding; its log-probs (and the loss's) are then taken at T = 1."""
  _check(s.temperature >= 0, f'sampling.temperature={s.temperature} must be >= 0 (0 = greedy)')
  greedy = s.temperature == 0
  return SamplingConfig(temperature=1.0 if greedy else float(s.temperature), greedy=greedy, top_k=s.top_k,
                        top_p=s.top_p, max_new_tokens=s.max_new_tokens, dtype=s.dtype or str(model.dtype))


def resolve_mesh_shape(shape, num_devices: int) -> Tuple[int, ...]:
  """Replaces a -1 by the remaining devices. A fixed shape may use a divisor of the device count (the first
  devices), e.g. (2, 1, 1) on 8 fake CPU devices in tests."""
  shape = tuple(int(s) for s in shape)
  _check(len(shape) == len(MESH_AXES), f'mesh.shape {shape} needs one entry per axis {MESH_AXES}')
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
  """Validates `config` (a ConfigDict of configs/common.py) for `num_devices` devices; returns a RunConfig.
  warn=False skips the single-update check (evaluation and compile checks do not train)."""
  algo = config.algo
  _check(algo in ALGOS, f'config.algo={algo!r} is unknown; choose one of {ALGOS}')
  mc = config.model
  model = model_config(mc, mc.hf_checkpoint, mc.preset)
  layers = tuple(mc.record_layers)
  _check(len(layers) == 1, f'model.record_layers={layers}: the RL losses use one recorded layer; give one index')
  _check(-model.num_hidden_layers <= layers[0] < model.num_hidden_layers,
         f'model.record_layers={layers}: outside [-{model.num_hidden_layers}, {model.num_hidden_layers})')
  r = config.rl
  rl = RLConfig(prompts_per_batch=r.prompts_per_batch, group_size=r.group_size, num_minibatches=r.num_minibatches,
                epochs=r.epochs, micro_batches=r.micro_batches, reward=r.reward, accuracy_weight=r.accuracy_weight,
                format_weight=r.format_weight, format=r.format, record_attention=bool(r.record_attention),
                ral_grad_share=bool(r.ral_grad_share), score_micro_batches=r.score_micro_batches,
                share_prompt=bool(r.share_prompt))
  sampling = _sampling(config.sampling, model)
  objective, advantage = _objective(config, algo, sampling.temperature)
  teacher = None
  if algo == 'distill':
    dc = config.distill
    _check(dc.teacher_checkpoint or dc.teacher_preset in PRESETS,
           f'distill.teacher_preset={dc.teacher_preset!r} unknown; choose {sorted(PRESETS)} or set '
           'distill.teacher_checkpoint=DIR')
    teacher = TeacherConfig(model_config(mc, dc.teacher_checkpoint, dc.teacher_preset), dc.teacher_checkpoint,
                            dc.teacher_seed)
  tokenizer = tokenizer_dir(config)
  data = _data(config, model, tokenizer, rl.format)
  t, o, ck = config.train, config.optim, config.checkpoint
  loop = LoopConfig(
      sft_steps=t.sft_steps, rl_steps=t.rl_steps, sft_batch_size=config.sft.batch_size, log_every=t.log_every,
      eval_every=t.eval_every, eval_examples=t.eval_examples, eval_batch=t.eval_batch, export_hf=t.export_hf,
      heatmap_every=t.heatmap_every, heatmap_examples=t.heatmap_examples,
      stop_after=t.stop_after, ckpt_every=ck.every, ckpt_keep=ck.keep, ckpt_async=ck.async_save,
      eval_by_source=bool(t.eval_by_source))
  common = dict(schedule=o.schedule, warmup_steps=o.warmup_steps, end_lr_ratio=o.end_lr_ratio,
                weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip,
                freeze=tuple(o.freeze))
  rl_optim = OptimConfig(lr=r.lr, total_steps=max(1, t.rl_steps * rl.updates_per_rollout),
                         micro_batches=r.micro_batches, **common)
  sft_optim = OptimConfig(lr=config.sft.lr, total_steps=max(1, t.sft_steps), micro_batches=config.sft.micro_batches,
                          **common)
  mesh = MeshConfig(shape=resolve_mesh_shape(config.mesh.shape, num_devices),
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
    if rl.share_prompt:   # the prompt part [groups, Tp] is split over the batch shards too (else replicated)
      p = rl.prompts_per_batch
      for what, groups in (('RL micro-batch (rl.prompts_per_batch / (rl.num_minibatches * rl.micro_batches))',
                            p // (rl.num_minibatches * rl.micro_batches)),
                           ('scoring chunk (rl.prompts_per_batch / rl.score_micro_batches)',
                            p // (rl.score_micro_batches or rl.num_minibatches))):
        _check(groups % n == 0, f'rl.share_prompt: the {what} holds {groups} prompt groups, not divisible by the '
                                f'{n} batch shards of mesh {mesh.shape} (data x fsdp): each device needs whole '
                                f'prompts; lower rl.micro_batches / rl.score_micro_batches / rl.num_minibatches, '
                                f'raise rl.prompts_per_batch, or set rl.share_prompt=False')
  if loop.sft_steps:
    _check(loop.sft_batch_size % (n * sft_optim.micro_batches) == 0,
           f'sft.batch_size = {loop.sft_batch_size} is not divisible by sft.micro_batches x the {n} batch shards '
           f'of mesh {mesh.shape}; change sft.batch_size or --config.mesh.shape')
  if warn and loop.rl_steps:
    rlc.check_updates_per_rollout(objective, rl.updates_per_rollout)
  return RunConfig(algo=algo, seed=config.seed, model=model, hf_checkpoint=mc.hf_checkpoint,
                   init_checkpoint=mc.init_checkpoint, tokenizer=tokenizer, record_layer=layers[0],
                   objective=objective, advantage=advantage, rl=rl, sampling=sampling, teacher=teacher, data=data,
                   loop=loop, mesh=mesh, rl_optim=rl_optim, sft_optim=sft_optim)


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
  _check(not unknown_keys(config, reference),
         f'unknown config keys {unknown_keys(config, reference)}: check the spelling against configs/common.py')
