"""Orbax checkpoints of a run: train state, frozen reference, step, RNG and data-iterator state, saved together.

Layout: <workdir>/checkpoints/<outer_step>/{state, ref, meta}.
  state  TrainState (params, optimizer state, optimizer step, base RNG key), restored straight onto its sharding
  ref    the frozen reference params of the RL stage (absent during SFT)
  meta   JSON: outer step, stage, data-iterator states (Grain `get_state()`, JSON or base64 bytes), extra fields
Saves are asynchronous (`checkpoint.async_save`), every K outer steps, the N most recent kept; a SIGTERM
(preemption) makes the loop save at the next step boundary and exit. Non-finite parameters are never saved.
"""
from __future__ import annotations

import base64
import os
import signal
import threading
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from ral_jax.train.state import all_finite


_all_finite = jax.jit(all_finite)   # one program per tree (eagerly, one small program per leaf shape: seconds at 3B)


def _encode(state):
  if isinstance(state, bytes):
    return {'__bytes__': base64.b64encode(state).decode('ascii')}
  return state


def _decode(state):
  if isinstance(state, dict) and set(state) == {'__bytes__'}:
    return base64.b64decode(state['__bytes__'])
  return state


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a concrete pytree: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


class PreemptionGuard:
  """Turns SIGTERM into a flag the loop polls at step boundaries (then: save, wait, exit)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning('SIGTERM received: saving a checkpoint at the next step boundary, then exiting.')
    self.requested = True

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for this project's three items."""

  def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'ref', 'meta'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def should_save(self, outer_step: int) -> bool:
    return outer_step % self.every == 0 or self.manager.reached_preemption(outer_step)

  def save(self, outer_step: int, state, meta: dict, ref=None, force: bool = False) -> bool:
    """Saves (asynchronously) unless parameters are non-finite; returns whether a save started."""
    if not bool(_all_finite(state.params)):
      logging.error('step %d: non-finite parameters, checkpoint NOT saved', outer_step)
      return False
    if outer_step in self.manager.all_steps():
      return False
    meta = dict(meta, data_state={k: _encode(v) for k, v in (meta.get('data_state') or {}).items()})
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if ref is not None:
      items['ref'] = ocp.args.StandardSave(ref)
    return self.manager.save(outer_step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, state_like, ref_like=None) -> tuple[Any, Any, dict]:
    """Restores (state, ref or None, meta) at `step` onto the shardings of the given templates."""
    items = {'state': ocp.args.StandardRestore(abstract_like(state_like)), 'meta': ocp.args.JsonRestore()}
    has_ref = os.path.isdir(os.path.join(self.directory, str(step), 'ref'))
    if ref_like is not None and has_ref:
      items['ref'] = ocp.args.StandardRestore(abstract_like(ref_like))
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    meta = dict(out['meta'])
    meta['data_state'] = {k: _decode(v) for k, v in (meta.get('data_state') or {}).items()}
    return out['state'], (out['ref'] if 'ref' in items else None), meta

  def read_meta(self, step: int) -> dict:
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])

  def wait(self, progress_every: float = 10.0):
    """Blocks until the pending save is finalized, saying so every `progress_every` seconds (0 = silently)."""
    if not progress_every:
      self.manager.wait_until_finished()
      return
    done = threading.Event()
    t0 = time.perf_counter()

    def finish():
      try:
        self.manager.wait_until_finished()
      finally:
        done.set()
    waiter = threading.Thread(target=finish, daemon=True)
    waiter.start()
    while not done.wait(progress_every):
      msg = f'checkpoint: still finalizing the last save in {self.directory} ({time.perf_counter() - t0:.0f} s)'
      logging.info(msg)
      if jax.process_index() == 0:
        print(msg, flush=True)
    waiter.join()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
