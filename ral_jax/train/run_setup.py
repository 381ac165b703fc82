"""One set-up path from an experiment config to a running model, shared by the trainer (train/loop.py), the
benchmark evaluation (eval/run.py) and the compile check (aot.py).

  ctx = build_run(config)                   # validated RunConfig, mesh + rules, tokenizer and its special ids
  params = restore_params(ctx, checkpoint)  # the model's parameters, sharded on ctx.mesh

`build_run` validates the whole config (train.config.build) before anything is built, then makes the mesh over
`devices` (default: all) and loads the tokenizer the config names (data.tokenizer, else the HF checkpoint's, else
the embedded one; `tokenizer=False` skips it, e.g. for a compile check that has only config.json). `restore_params`
gives the policy parameters: the HF checkpoint (or random init from the run's seed), then, when given, the latest
checkpoint of a ral_jax workdir (`checkpoint`, else `model.init_checkpoint`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
from absl import logging

from ral_jax import sharding
from ral_jax.data import tokenizer as tokenizer_lib
from ral_jax.train import build
from ral_jax.train import checkpoint as ckpt_lib
from ral_jax.train import config as rc
from ral_jax.train import optim
from ral_jax.train import stages


def load_tokenizer(run: rc.RunConfig):
  """(tokenizer, special ids) of the run, checked against the model's special token ids."""
  tokenizer = tokenizer_lib.load_tokenizer(run.tokenizer)
  return tokenizer, tokenizer_lib.check_matches_model(tokenizer, run.model)


def build_run(config, *, warn: bool = True, devices: Optional[Sequence] = None,
              tokenizer: bool = True) -> stages.Context:
  """The run's Context: RunConfig (ctx.run), model config, mesh, logical rules, tokenizer and special ids."""
  devices = list(jax.devices() if devices is None else devices)
  run = rc.build(config, len(devices), warn=warn)
  mesh = sharding.make_mesh(run.mesh.shape, devices=devices)
  rules = sharding.logical_rules(run.mesh.rules)
  logging.info('mesh %s over %d devices (%s)', dict(mesh.shape), mesh.size, devices[0].platform)
  tok, ids = load_tokenizer(run) if tokenizer else (None, None)
  return stages.Context(run=run, model_cfg=run.model, mesh=mesh, rules=rules, tokenizer=tok, ids=ids)


def params_from_workdir(run: rc.RunConfig, directory: str, like):
  """Policy parameters of the latest checkpoint of a ral_jax workdir (or its checkpoints/ folder); `like` gives the
  structure and shardings."""
  workdir = directory.rstrip('/')
  workdir = workdir[:-len('/checkpoints')] if workdir.endswith('/checkpoints') else workdir
  ck = ckpt_lib.Checkpointer(workdir, 1, 1, False)
  try:
    step = ck.latest_step()
    if step is None:
      raise FileNotFoundError(f'{directory!r} holds no ral_jax checkpoint (expected <workdir>/checkpoints/<step>/)')
    stage = ck.read_meta(step).get('stage', 'rl')
    tx = optim.make_optimizer(run.rl_optim if stage == 'rl' else run.sft_optim)
    state, _, _ = ck.restore(step, build.create_state(like, tx, run.seed), None)
  finally:
    ck.close()
  logging.info('restored parameters of step %d (%s) from %s', step, stage, workdir)
  return state.params


def restore_params(ctx: stages.Context, checkpoint: str = ''):
  """Sharded policy parameters: the HF checkpoint or random init, then the latest state of `checkpoint` (a ral_jax
  workdir; default: the config's model.init_checkpoint) when there is one."""
  run = ctx.run
  params = build.init_model_params(run.model, ctx.mesh, ctx.rules, run.seed, run.hf_checkpoint)
  source = checkpoint or run.init_checkpoint
  return params_from_workdir(run, source, params) if source else params
