"""The training state: one pytree that the update steps take and return (donated), and Orbax saves.

  step       int32 []   optimizer steps taken in the current stage (drives the LR schedule's count too)
  params     {'params': {'visual', 'model', 'lm_head'}}  the policy (vision subtree frozen)
  opt_state  optax state (no moments for frozen subtrees)
  rng        uint32 [2] the run's base key; per-step keys are fold_in(rng, outer_step)

The frozen reference (initial weights of the RL stage) and a distillation teacher are kept outside the state: they
never change and are never donated.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng) -> 'TrainState':
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=jnp.asarray(rng, jnp.uint32))

  def apply_gradients(self, grads, tx: optax.GradientTransformation) -> 'TrainState':
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def all_finite(tree) -> jax.Array:
  """True when every floating leaf of `tree` is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def select_tree(pred, on_true, on_false):
  """`on_true` where the scalar `pred` holds, else `on_false`, leaf by leaf (used to skip non-finite updates)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
