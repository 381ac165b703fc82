"""Building what a run needs before its first step: model config, mesh, sharded parameters, optimizers and the
jitted step functions (with state shardings and donation).

Parameters are created directly on their shardings: random init under jit with out_shardings from the logical
axis names (sharding.init_sharded), or an HF checkpoint read tensor by tensor onto the same shardings
(models.hf_io). The reference model of the RL stage is a copy of the policy at the start of RL, without the
vision tower (visual embeddings are computed once by the frozen tower and shared). A distillation teacher is its own
model config with its own parameters (and vision tower).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ral_jax import sharding
from ral_jax.train import optim
from ral_jax.train import step as ts
from ral_jax.models.config import ModelConfig
from ral_jax.models.vision_inputs import build_vision_inputs_batch
from ral_jax.models.vlm import init_params
from ral_jax.train.config import RunConfig
from ral_jax.train.state import TrainState


def dummy_vision_inputs(cfg: ModelConfig, batch: int = 1):
  """Smallest valid (pixel_values, vision_meta) to create the vision tower's parameters."""
  m = cfg.vision.spatial_merge_size
  grid = np.array([[[1, m, m]]] * batch)
  p = m * m
  meta = build_vision_inputs_batch(grid, p, cfg.vision, media_kind=np.ones((batch, 1), np.int32))
  return jnp.zeros((batch, p, cfg.vision.patch_dim), jnp.float32), jax.tree.map(jnp.asarray, meta)


def init_model_params(cfg: ModelConfig, mesh, rules, seed: int, hf_checkpoint: str = ''):
  """Sharded parameters {'visual', 'model', 'lm_head'}: from an HF directory, else random from `seed`."""
  vis = dummy_vision_inputs(cfg)
  init_fn = lambda: init_params(cfg, jax.random.PRNGKey(seed), vis, boxed=True)
  if hf_checkpoint:
    from ral_jax.models import hf_io
    _, shardings = sharding.state_shardings(init_fn, mesh, rules)
    _, params = hf_io.load_hf(hf_checkpoint, shardings=shardings, param_dtype=cfg.param_dtype)
    return params
  return sharding.init_sharded(init_fn, mesh, rules)


def reference_of(params):
  """A frozen copy of the policy without the vision tower (the RL stage's pi_ref)."""
  return jax.tree.map(jnp.copy, {k: v for k, v in params.items() if k != 'visual'})


@dataclasses.dataclass
class Steps:
  """Jitted step functions of one stage, closed over the static StepConfig and optimizer."""
  sc: ts.StepConfig
  tx: Any
  update: Any           # rl_update or sft_update: (state, ...) -> (state, metrics); state donated
  score: Any = None     # (params, ref_params, x, response_ids) -> (old_logprobs, old_policy, ref_logprobs)
  teacher: Any = None   # (teacher_params, x, response_ids) -> (teacher_hidden, teacher_policy)


def step_config(run: RunConfig, cfg: ModelConfig, stage: str) -> ts.StepConfig:
  """The step functions' static settings, from the run's components (record only when the RL losses read it)."""
  return ts.StepConfig(model_cfg=cfg, objective=run.objective, record_layer=run.record_layer,
                       num_minibatches=run.rl.num_minibatches, epochs=run.rl.epochs,
                       micro_batches=run.rl.micro_batches, score_micro_batches=run.rl.num_minibatches,
                       sft_micro_batches=run.sft_optim.micro_batches,
                       record=stage == 'rl' and (run.objective.needs_attention or run.rl.record_attention),
                       ral_grad_share=run.rl.ral_grad_share and run.objective.ral.lambda_attn > 0)


def make_steps(run: RunConfig, cfg: ModelConfig, stage: str, state_shardings, teacher_cfg=None) -> Steps:
  sc = step_config(run, cfg, stage)
  tx = optim.make_optimizer(run.rl_optim if stage == 'rl' else run.sft_optim)
  out = (state_shardings, None)
  if stage == 'sft':
    upd = jax.jit(functools.partial(ts.sft_update, sc, tx), out_shardings=out, donate_argnums=0)
    return Steps(sc, tx, upd)
  upd = jax.jit(functools.partial(ts.rl_update, sc, tx), out_shardings=out, donate_argnums=0)
  score = jax.jit(functools.partial(ts.score, sc, need_ref=run.objective.grpo.beta > 0))
  teacher = None
  if teacher_cfg is not None:
    teacher = jax.jit(functools.partial(ts.teacher_score, sc, teacher_cfg,
                                        with_policy=sc.objective.distill.gamma_attn > 0))
  return Steps(sc, tx, upd, score, teacher)


def create_state(params, tx, seed: int) -> TrainState:
  """TrainState created directly on its shardings: every optimizer leaf that mirrors a parameter (Adam's mu and
  nu) takes that parameter's sharding, everything else (step, counts, rng) is replicated. Sharding propagation
  alone does not guarantee this (zeros_like of an fsdp-sharded leaf may come out replicated, which at 7B scale
  is ~57 GiB of Adam state per device instead of ~1 GiB)."""
  rng = jax.random.PRNGKey(seed)
  init = lambda p: TrainState.create(p, tx, rng)
  p_sh = jax.tree.map(lambda x: x.sharding, params)
  first = jax.tree.leaves(p_sh)[0]
  repl = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
          if isinstance(first, jax.sharding.NamedSharding) else first)
  abstract = jax.eval_shape(init, params)
  by_path = {jax.tree_util.keystr(k): (x.shape, x.sharding)
             for k, x in jax.tree_util.tree_flatten_with_path(params)[0]}

  def leaf_sharding(path, leaf):
    """A moment leaf's path ends with its parameter's path (e.g. ...mu['params']['model']['w'])."""
    key = jax.tree_util.keystr(path)
    for p_key, (shape, sh) in by_path.items():
      if key.endswith(p_key) and leaf.shape == shape:
        return sh
    return repl

  opt_sh = jax.tree_util.tree_map_with_path(leaf_sharding, abstract.opt_state)
  out_sh = TrainState(step=repl, params=p_sh, opt_state=opt_sh, rng=repl)
  return jax.jit(init, out_shardings=out_sh)(params)


def state_shardings_of(state):
  return jax.tree.map(lambda x: x.sharding, state)


def load_teacher(run: RunConfig, mesh, rules):
  """(teacher model config, its sharded parameters): the HF directory, else random init from its seed."""
  t = run.teacher
  return t.model, init_model_params(t.model, mesh, rules, t.seed, t.checkpoint)
