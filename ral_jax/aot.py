"""Ahead-of-time compile check: compile the train steps for a named TPU topology on this (CPU) machine.

  python -m ral_jax.aot --config=configs/video.py:paper --topology=v5p:2x2x2
  python -m ral_jax.aot --config=configs/video.py:tiny_ral --fake_devices=8      # no libtpu: a fake CPU mesh

Catches out-of-memory, sharding and shape errors before renting the slice: the SFT update, the scoring pass and
the RL update (and the frozen vision tower) are lowered with abstract inputs (jax.ShapeDtypeStruct carrying the
run's shardings, nothing allocated) and compiled by the target's compiler; the compiled memory analysis gives the
bytes per device. The step functions are the trainer's own (train_init.make_steps), so what compiles here is what
runs there.

TPU topologies need the TPU compiler, i.e. libtpu: `pip install 'jax[tpu]==0.10.2'` (libtpu 0.0.42.*) works on a
CPU-only machine, which then compiles for any slice named like 'v4:2x2x2', 'v5e:4x4', 'v5p:2x2x4', 'v6e:4x4'
(jax.experimental.topologies.get_topology_desc makes compile-only devices; no TPU is touched). Without libtpu the
check falls back to a fake CPU mesh with the same device count, clearly labelled: it still catches sharding and
shape errors, but its byte counts are XLA:CPU's (no TPU layouts or TPU memory-saving passes), so treat them as a
rough guide only.

Shapes: batch = rl.prompts_per_batch * G (RL) and sft.batch_size (SFT), prompt length = the largest
data.prompt_buckets, response length = sampling.max_new_tokens, vision patches = the largest data.patch_buckets;
each can be overridden by a flag.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

# HBM per device (GiB) by TPU generation, for the fits / does-not-fit verdict.
HBM_GIB = {'v2': 8, 'v3': 16, 'v4': 32, 'v5e': 16, 'v5litepod': 16, 'v5p': 95, 'v6e': 32}


@dataclasses.dataclass
class Target:
  """Devices to compile for, and how to label the numbers."""
  devices: List[Any]
  label: str
  hbm_gib: Optional[float]
  fake: bool


def parse_topology(name: str):
  """'v5e:4x4' -> ('v5e', (4, 4), device count). v2/v3 chips hold two TensorCores (two devices)."""
  m = re.fullmatch(r'(v\d+[a-z]*(?:pod)?)[:-](\d+(?:x\d+)*)', name.strip().lower())
  if not m:
    raise ValueError(f'topology {name!r}: expected GENERATION:AxBxC, e.g. v4:2x2x2, v5e:4x4, v5p:2x2x4')
  gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split('x'))
  per_chip = 2 if gen in ('v2', 'v3') else 1
  return gen, dims, math.prod(dims) * per_chip


def tpu_target(topology: str) -> Target:
  """Compile-only TPU devices for `topology` (needs libtpu); raises RuntimeError when TPU support is missing."""
  from jax.experimental import topologies
  gen, _, _ = parse_topology(topology)
  desc = topologies.get_topology_desc(topology, 'tpu')
  return Target(list(desc.devices), f'TPU {topology} ({len(desc.devices)} devices, compile-only)',
                HBM_GIB.get(gen), False)


def fake_cpu_target(num_devices: int, why: str = '') -> Target:
  """The first `num_devices` CPU devices; sets --xla_force_host_platform_device_count if JAX has not started."""
  flag = f'--xla_force_host_platform_device_count={num_devices}'
  if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
  import jax
  devs = jax.devices('cpu')
  if len(devs) < num_devices:
    raise RuntimeError(f'{len(devs)} CPU devices but the fake mesh needs {num_devices}: start python with '
                       f'XLA_FLAGS={flag} (JAX was initialised before this check could set it)')
  label = f'FAKE CPU MESH of {num_devices} devices (byte counts are XLA:CPU\'s, not a TPU\'s){why}'
  return Target(devs[:num_devices], label, None, True)


def choose_target(topology: str = '', fake_devices: int = 0) -> Target:
  if fake_devices:
    return fake_cpu_target(fake_devices)
  if not topology:
    raise ValueError('give --topology=GEN:AxB[xC] (e.g. v5p:2x2x2) or --fake_devices=N')
  try:
    return tpu_target(topology)
  except RuntimeError as e:
    if 'TPU' not in str(e):
      raise
    n = parse_topology(topology)[2]
    why = (f'; standing in for {topology}: the TPU compiler is not installed ({e}). For TPU numbers run '
           "`pip install 'jax[tpu]==0.10.2'` on this machine (no TPU needed)")
    return fake_cpu_target(n, why)


def _abstract(shape, dtype, sharding):
  import jax
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def compile_steps(config, target: Target, stages: Sequence[str] = ('sft', 'score', 'rl', 'vision'),
                  prompt_len: int = 0, response_len: int = 0, patches: int = 0,
                  compiled: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, int]]:
  """Lowers and compiles each stage for `target`; returns {stage: memory stats in bytes per device}. `compiled`
  (a dict), if given, receives {stage: the compiled executable}."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ral_jax import sharding
  from ral_jax.train import build as train_init
  from ral_jax.train import optim
  from ral_jax.train import run_setup
  from ral_jax.train import step as ts
  from ral_jax.models.vision_inputs import build_vision_inputs_batch
  from ral_jax.rl.objective import RLBatch

  # The run's own set-up (config validation, mesh, model config); only the checkpoint's config.json is read.
  config = _checkable(config)
  ctx = run_setup.build_run(config, warn=False, devices=target.devices, tokenizer=False)
  run, cfg, mesh, rules = ctx.run, ctx.run.model, ctx.mesh, ctx.rules
  tp = prompt_len or max(config.data.prompt_buckets)
  tr = response_len or run.sampling.max_new_tokens
  p = patches or max(config.data.patch_buckets)
  nv, t = p // cfg.vision.merge_unit, tp + tr
  dt = jnp.dtype(cfg.dtype)

  abs_params, param_sh = sharding.model_param_shardings(cfg, mesh, rules, train_init.dummy_vision_inputs(cfg))
  params = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), abs_params, param_sh)

  def batch_arr(shape, dtype, axis=0):
    return _abstract(shape, dtype, sharding.batch_sharding(mesh, len(shape), axis))

  def inputs(n):
    return ts.ModelInputs(batch_arr((n, t), jnp.int32), batch_arr((n, 3, t), jnp.int32),
                          batch_arr((n, t), jnp.int32), batch_arr((n, nv, cfg.hidden_size), dt))

  def state_for(stage):
    """The trainer's own layout: train/build.train_state_shardings (what create_state uses) and make_steps."""
    tx = optim.make_optimizer(run.rl_optim if stage == 'rl' else run.sft_optim)
    abs_state, state_sh = train_init.train_state_shardings(params, tx, run.seed)
    state = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), abs_state, state_sh)
    return train_init.make_steps(run, cfg, stage, state_sh, rules=rules), state

  out: Dict[str, Dict[str, int]] = {}
  with sharding.mesh_context(mesh, rules):
    for stage in stages:
      if stage == 'sft':
        steps, state = state_for('sft')
        n = run.loop.sft_batch_size
        lowered = steps.update.lower(state, inputs(n), batch_arr((n, tr), jnp.int32), batch_arr((n, tr), jnp.int32))
      elif stage in ('score', 'rl'):
        steps, state = state_for('rl')
        n = run.rl.rollout_batch
        x = inputs(n)
        if stage == 'score':
          ref = {k: v for k, v in params.items() if k != 'visual'}
          lowered = steps.score.lower(params, ref, x, batch_arr((n, tr), jnp.int32))
        else:
          f32 = jnp.float32
          rec = steps.sc.record
          batch = RLBatch(
              response_ids=batch_arr((n, tr), jnp.int32), response_mask=batch_arr((n, tr), jnp.int32),
              advantages=batch_arr((n,), f32), old_logprobs=batch_arr((n, tr), f32),
              ref_logprobs=batch_arr((n, tr), f32) if run.objective.grpo.beta > 0 else None,
              old_policy=batch_arr((n, tr, t), f32) if rec else None,
              key_mask=batch_arr((n, t), jnp.int32), visual_key_mask=batch_arr((n, t), jnp.int32))
          lowered = steps.update.lower(state, x, batch)
      elif stage == 'vision':
        n = run.rl.prompts_per_batch
        m = cfg.vision.spatial_merge_size
        side = int(math.isqrt(p // (m * m))) * m
        if side * side != p:
          continue   # no single square grid fills the patch bucket; the tower is small next to the LLM
        meta = build_vision_inputs_batch(np.array([[[1, side, side]]] * n), p, cfg.vision,
                                         media_kind=np.ones((n, 1), np.int32))
        meta = {k: batch_arr(v.shape, v.dtype) for k, v in meta.items()}
        fn = jax.jit(lambda q, pv, mt: ts.encode_vision(cfg, q, pv, mt))
        lowered = fn.lower(params, batch_arr((n, p, cfg.vision.patch_dim), jnp.float32), meta)
      else:
        raise ValueError(f'unknown stage {stage!r}; choose from sft, score, rl, vision')
      try:
        exe = lowered.compile()
        if compiled is not None:
          compiled[stage] = exe
        mem = exe.memory_analysis()
      except jax.errors.JaxRuntimeError as e:   # the TPU compiler refuses programs that exceed HBM
        if 'RESOURCE_EXHAUSTED' not in str(e):
          raise
        out[stage] = {'error': str(e).strip().splitlines()[0]}
        continue
      out[stage] = {k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0)
                    for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
      s = out[stage]
      s['peak_estimate'] = s['argument'] + s['output'] - s['alias'] + s['temp']
  return out


def _checkable(config):
  """A copy of `config` that passes the run-config checks without data: a manifest run gets a placeholder
  manifest name (the check reads no data)."""
  import copy
  config = copy.deepcopy(config)
  if config.data.source == 'manifest' and not config.data.train_manifest:
    with config.unlocked():
      config.data.train_manifest = '<aot: no data read>'
  return config


# Micro-batch knobs by stage, for the fit search: (config path, what the knob divides).
KNOBS = {'sft': ('sft', 'micro_batches'), 'score': ('rl', 'score_micro_batches'), 'rl': ('rl', 'micro_batches')}


def _stage_ok(target: Target, s: Dict[str, int], headroom: float) -> bool:
  return 'error' not in s and (not target.hbm_gib or s['peak_estimate'] <= headroom * target.hbm_gib * 2 ** 30)


def fit_micro_batches(config, target: Target, stages: Sequence[str] = ('sft', 'score', 'rl'),
                      headroom: float = 0.85, **shapes) -> Dict[str, Any]:
  """For each stage, the fewest micro-batches (doubling from the config's value) whose compiled peak is within
  `headroom` x HBM. Returns {stage: (knob name, value or None if even one sequence per device does not fit,
  stats)}. Each try is one compile."""
  from ral_jax.train import config as run_config
  out: Dict[str, Any] = {}
  config = _checkable(config)
  for stage in stages:
    group, name = KNOBS[stage]
    run = run_config.build(config, len(target.devices), warn=False)
    rows = {'sft': run.loop.sft_batch_size, 'score': run.rl.rollout_batch, 'rl': run.rl.minibatch}[stage]
    shards = run.mesh.batch_shards
    k = max(1, config[group][name] or (run.rl.num_minibatches if stage == 'score' else 1))
    found, stats = None, None
    while rows % k == 0 and (rows // k) % shards == 0:
      trial = copy_with(config, group, name, k)
      stats = compile_steps(trial, target, (stage,), **shapes)[stage]
      if _stage_ok(target, stats, headroom):
        found = k
        break
      k *= 2
    out[stage] = (f'{group}.{name}', found, stats)
  return out


def copy_with(config, group: str, name: str, value):
  import copy
  c = copy.deepcopy(config)
  with c.unlocked():
    c[group][name] = value
  return c


def format_report(target: Target, stats: Dict[str, Dict[str, int]], shapes: str) -> str:
  gib = lambda b: b / 2 ** 30  # noqa: E731
  lines = [f'AOT compile check for {target.label}', f'shapes: {shapes}',
           f'{"stage":<8}{"args GiB":>10}{"out GiB":>10}{"alias GiB":>11}{"temp GiB":>10}{"peak GiB":>10}  verdict']
  for stage, s in stats.items():
    if 'error' in s:
      lines.append(f'{stage:<8}DOES NOT FIT: {s["error"]}')
      continue
    verdict = ''
    if target.hbm_gib:
      verdict = 'fits' if gib(s['peak_estimate']) <= target.hbm_gib else f'DOES NOT FIT in {target.hbm_gib} GiB'
    lines.append(f'{stage:<8}{gib(s["argument"]):>10.3f}{gib(s["output"]):>10.3f}{gib(s["alias"]):>11.3f}'
                 f'{gib(s["temp"]):>10.3f}{gib(s["peak_estimate"]):>10.3f}  {verdict}')
  lines.append('(per device; peak = arguments + outputs - donated aliases + temporaries)')
  return '\n'.join(lines)


def _define_flags():
  """Command-line flags, defined only when run as a program (importing aot never clashes with other entries)."""
  config_flags.DEFINE_config_file('config', None, 'ral_jax config file (configs/*.py[:preset])')
  flags.DEFINE_string('topology', '', 'TPU topology, e.g. v4:2x2x2, v5e:4x4, v5p:2x2x4, v6e:2x4')
  flags.DEFINE_integer('fake_devices', 0, 'compile for a fake CPU mesh of this many devices instead')
  flags.DEFINE_list('stages', ['sft', 'score', 'rl', 'vision'], 'what to compile')
  flags.DEFINE_integer('prompt_len', 0, 'prompt length Tp (default: largest data.prompt_buckets)')
  flags.DEFINE_integer('response_len', 0, 'response length Tr (default: sampling.max_new_tokens)')
  flags.DEFINE_integer('patches', 0, 'vision patches P per example (default: largest data.patch_buckets)')
  flags.DEFINE_bool('fit', False, 'search the micro-batch knobs (sft.micro_batches, rl.score_micro_batches, '
                    'rl.micro_batches) for the fewest that fit within --headroom of HBM, and print them')
  flags.DEFINE_float('headroom', 0.85, 'fraction of HBM a stage may use in the --fit search')


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/video.py:paper')
  target = choose_target(FLAGS.topology, FLAGS.fake_devices)
  print(f'compiling for {target.label}', flush=True)
  stats = compile_steps(config, target, FLAGS.stages, FLAGS.prompt_len, FLAGS.response_len, FLAGS.patches)
  shapes = (f'Tp={FLAGS.prompt_len or max(config.data.prompt_buckets)} '
            f'Tr={FLAGS.response_len or config.sampling.max_new_tokens} '
            f'P={FLAGS.patches or max(config.data.patch_buckets)} '
            f'rollout batch={config.rl.prompts_per_batch * config.rl.group_size} sft batch={config.sft.batch_size}')
  print(format_report(target, stats, shapes))
  if FLAGS.fit:
    knobs = [st for st in FLAGS.stages if st in KNOBS]
    found = fit_micro_batches(config, target, knobs, FLAGS.headroom, prompt_len=FLAGS.prompt_len,
                              response_len=FLAGS.response_len, patches=FLAGS.patches)
    for stage, (knob, value, st) in found.items():
      if value is None:
        print(f'{stage}: no value of --config.{knob} fits within {FLAGS.headroom:.0%} of HBM')
      else:
        print(f'{stage}: --config.{knob}={value} fits (peak {st["peak_estimate"] / 2 ** 30:.1f} GiB)')
  if not fits(target, stats):
    raise SystemExit(1)


def fits(target: Target, stats: Dict[str, Dict[str, int]]) -> bool:
  """False when a stage failed to compile for lack of memory or its peak exceeds the device's HBM."""
  for s in stats.values():
    if 'error' in s or (target.hbm_gib and s['peak_estimate'] > target.hbm_gib * 2 ** 30):
      return False
  return True


if __name__ == '__main__':
  _define_flags()
  app.run(main)
