"""Building what a run needs before its first step: model config, mesh, sharded parameters, optimizers and the
jitted step functions (with state shardings and donation).

Parameters are created directly on their shardings: random init under jit with out_shardings from the logical
axis names (sharding.init_sharded; models of FAST_INIT_PARAMS parameters or more are drawn leaf by leaf,
sharding.init_per_leaf, which starts a 7B model in seconds instead of compiling one whole-model init program), or an
HF checkpoint read tensor by tensor onto the same shardings (models.hf_io). The train state's layout
(`train_state_shardings`) is the one function both the trainer (`create_state`) and the AOT check (ral_jax/aot.py)
use; the jitted steps (`make_steps`) declare it as in- and out-shardings, donate it, pin gradients and scan carries
to it (train/step.py) and trace under the mesh and logical rules (sharding.MeshJit). The reference model of the
RL stage is a copy of the policy at the start of RL, without the vision tower (visual embeddings are computed once
by the frozen tower and shared). A distillation teacher is its own model config with its own parameters (and vision
tower).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

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


FAST_INIT_PARAMS = 2 ** 28     # random init leaf by leaf from this many parameters (about 270M) on


def init_model_params(cfg: ModelConfig, mesh, rules, seed: int, hf_checkpoint: str = '',
                      per_leaf: Optional[bool] = None):
  """Sharded parameters {'visual', 'model', 'lm_head'}: from an HF directory, else random from `seed` (per_leaf:
  sharding.init_per_leaf; None = for models of FAST_INIT_PARAMS parameters or more)."""
  vis = dummy_vision_inputs(cfg)
  init_fn = lambda: init_params(cfg, jax.random.PRNGKey(seed), vis, boxed=True)
  abstract, shardings = sharding.state_shardings(init_fn, mesh, rules)
  if hf_checkpoint:
    from ral_jax.models import hf_io
    _, params = hf_io.load_hf(hf_checkpoint, shardings=shardings, param_dtype=cfg.param_dtype)
    return params
  if per_leaf is None:
    per_leaf = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) >= FAST_INIT_PARAMS
  if per_leaf:
    return sharding.init_per_leaf(abstract, shardings, seed)
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
                       micro_batches=run.rl.micro_batches,
                       score_micro_batches=run.rl.score_micro_batches or run.rl.num_minibatches,
                       sft_micro_batches=run.sft_optim.micro_batches,
                       record=stage == 'rl' and (run.objective.needs_attention or run.rl.record_attention),
                       ral_grad_share=run.rl.ral_grad_share and run.objective.ral.lambda_attn > 0,
                       share_prompt=run.rl.share_prompt,
                       group_size=run.rl.group_size if run.rl.share_prompt else 1)


def make_steps(run: RunConfig, cfg: ModelConfig, stage: str, state_shardings, teacher_cfg=None,
               rules=None) -> Steps:
  """The stage's jitted steps (sharding.MeshJit): the update takes the state on `state_shardings` (donated) and
  the batch split over ('data', 'fsdp'), and returns the state on the same shardings; the scoring pass takes the
  policy parameters on the state's parameter shardings and returns batch-split outputs. `rules`: the logical axis
  rules (default: the run's)."""
  sc = step_config(run, cfg, stage)
  tx = optim.make_optimizer(run.rl_optim if stage == 'rl' else run.sft_optim)
  rules = rules if rules is not None else sharding.logical_rules(run.mesh.rules)
  mesh = jax.tree.leaves(state_shardings)[0].mesh
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH))
  out = (state_shardings, None)
  if stage == 'sft':
    upd = sharding.MeshJit(functools.partial(ts.sft_update, sc, tx, shardings=state_shardings), mesh, rules,
                           (state_shardings, rows, rows, rows), out, donate_argnums=0, name='the SFT update',
                           knob=('sft.micro_batches', sc.sft_micro_batches))
    return Steps(sc, tx, upd)
  upd = sharding.MeshJit(functools.partial(ts.rl_update, sc, tx, shardings=state_shardings), mesh, rules,
                         (state_shardings, rows, rows, rows, None), out, donate_argnums=0, name='the RL update',
                         knob=('rl.micro_batches', sc.micro_batches))
  score = sharding.MeshJit(functools.partial(ts.score, sc, need_ref=run.objective.grpo.beta > 0), mesh, rules,
                           (state_shardings.params, None, rows, rows), rows, name='the scoring pass',
                           knob=('rl.score_micro_batches', sc.score_micro_batches))
  teacher = None
  if teacher_cfg is not None:
    teacher = sharding.MeshJit(functools.partial(ts.teacher_score, sc, teacher_cfg,
                                                 with_policy=sc.objective.distill.gamma_attn > 0),
                               mesh, rules, (None, rows, rows), rows, name='the teacher pass')
  return Steps(sc, tx, upd, score, teacher)


def train_state_shardings(params, tx, seed: int = 0):
  """(abstract TrainState, its NamedShardings) for `params` (arrays, or jax.ShapeDtypeStructs carrying shardings):
  every optimizer leaf that mirrors a parameter (Adam's mu and nu) takes that parameter's sharding, everything
  else (step, counts, rng) is replicated. Sharding propagation alone does not guarantee this (zeros_like of an
  fsdp-sharded leaf may come out replicated, which at 7B scale is ~57 GiB of Adam state per device instead of
  ~1 GiB). Used by `create_state` and by the AOT check, so both see one layout."""
  del seed                                  # the layout does not depend on it
  p_sh = jax.tree.map(lambda x: x.sharding, params)
  first = jax.tree.leaves(p_sh)[0]
  repl = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
          if isinstance(first, jax.sharding.NamedSharding) else first)
  abstract = jax.eval_shape(lambda p, r: TrainState.create(p, tx, r), params,
                            jax.ShapeDtypeStruct((2,), jnp.uint32))
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
  return abstract, TrainState(step=repl, params=p_sh, opt_state=opt_sh, rng=repl)


def create_state(params, tx, seed: int) -> TrainState:
  """TrainState created directly on its shardings (`train_state_shardings`)."""
  rng = jax.random.PRNGKey(seed)
  _, out_sh = train_state_shardings(params, tx, seed)
  return jax.jit(lambda p: TrainState.create(p, tx, rng), out_shardings=out_sh)(params)


def state_shardings_of(state):
  return jax.tree.map(lambda x: x.sharding, state)


def load_teacher(run: RunConfig, mesh, rules):
  """(teacher model config, its sharded parameters): the HF directory, else random init from its seed."""
  t = run.teacher
  return t.model, init_model_params(t.model, mesh, rules, t.seed, t.checkpoint)
