"""Orbax checkpoints of a run: train state, frozen reference, step, RNG and data-iterator state, saved together.

Layout: <workdir>/checkpoints/<outer_step>/{state, ref, meta}.
  state  TrainState (params, optimizer state, optimizer step, base RNG key), restored straight onto its sharding
  ref    the frozen reference params of the RL stage (absent during SFT)
  meta   JSON: outer step, stage, data-iterator states (Grain `get_state()`, JSON or base64 bytes), extra fields
Saves are asynchronous (`checkpoint.async_save`), every K outer steps, the N most recent kept; a SIGTERM or SIGINT
makes the loop save at the next step boundary and exit. Non-finite parameters are never saved.

Resume (`restore_newest_intact`) tries the steps newest first. A step that cannot be restored (an empty or
foreign directory, garbage or truncated or zeroed data files, `meta` removed, a non-finite tensor) is skipped with
a warning that says which step and why, and is moved aside to `<step>.damaged` (so that the run can save that step
number again); the newest intact step is restored. When no step is intact, nothing is moved and the restore stops
with every step's reason.
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

from ral_jax import paths
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
  """Turns SIGTERM (preemption) and the first SIGINT (Ctrl-C) into a flag the loop polls at step boundaries
  (then: save, wait, exit with 128 + signum). A second Ctrl-C interrupts at once (KeyboardInterrupt)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signum: Optional[int] = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning('%s received: saving a checkpoint at the next step boundary, then exiting.', name)
    if jax.process_index() == 0:
      print(f'{name} received: saving a checkpoint after this step, then exiting (Ctrl-C again to stop now, '
            'without saving).', flush=True)
    self.requested, self.signum = True, signum

  def close(self):
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)
    self._previous = {}


class DamagedCheckpoint(RuntimeError):
  """No step of a checkpoint directory can be restored; the message lists each step's reason."""


def first_nonfinite(tree, prefix: str = '') -> Optional[str]:
  """Path of the first floating leaf holding NaN or Inf (None if all finite)."""
  import jax.numpy as jnp
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if hasattr(leaf, 'dtype') and jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all()):
      return prefix + jax.tree_util.keystr(path)
  return None


def _short(e: BaseException) -> str:
  """One line: the exception and its causes, each cut to 160 characters (TensorStore messages run to pages)."""
  parts, seen = [], set()
  while e is not None and id(e) not in seen and len(parts) < 4:
    seen.add(id(e))
    text = ' '.join(str(e).split())
    parts.append(f'{type(e).__name__}: {text[:160]}{"..." if len(text) > 160 else ""}')
    e = e.__cause__ or e.__context__
  return ' <- '.join(parts)


def newest_step(workdir: str) -> Optional[int]:
  """The newest step of <workdir>/checkpoints that looks complete (its state, meta and Orbax commit files are
  there), without opening Orbax; None if there is none. A cheap peek: the restore checks the data itself."""
  d = paths.join(workdir, 'checkpoints')
  if not paths.isdir(d):
    return None
  for step in sorted((int(s) for s in paths.listdir(d) if s.isdigit()), reverse=True):
    parts = [paths.join(d, str(step), x) for x in ('state', 'meta', '_CHECKPOINT_METADATA')]
    if all(paths.exists(p) for p in parts):
      return step
  return None


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for this project's three items."""

  def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True):
    self.directory = paths.abspath(paths.join(workdir, 'checkpoints'))
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
    has_ref = paths.isdir(paths.join(self.directory, str(step), 'ref'))
    if ref_like is not None and has_ref:
      items['ref'] = ocp.args.StandardRestore(abstract_like(ref_like))
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    meta = dict(out['meta'])
    meta['data_state'] = {k: _decode(v) for k, v in (meta.get('data_state') or {}).items()}
    return out['state'], (out['ref'] if 'ref' in items else None), meta

  def problem(self, step: int) -> Optional[str]:
    """A cheap structural check of one step directory: the reason it cannot be restored, or None."""
    d = paths.join(self.directory, str(step))
    for item in ('state', 'meta'):
      if not paths.isdir(paths.join(d, item)):
        return f"its '{item}' item is missing" + (' (the directory is empty)' if not paths.listdir(d) else '')
    return None

  def restore_newest_intact(self, templates, max_step: Optional[int] = None):
    """(step, state, ref, meta) of the newest step that restores cleanly, or None when there is no step.

    templates(step) -> (state_like, ref_like or None) for that step. Damaged steps newer than the one restored
    are reported (warning + console line) and moved aside to `<step>.damaged`."""
    self.manager.reload()
    steps = sorted(self.manager.all_steps(), reverse=True)
    skipped = []
    for step in steps:
      try:
        why = self.problem(step)
        if why is None:
          state_like, ref_like = templates(step)
          state, ref, meta = self.restore(step, state_like, ref_like)
          bad = first_nonfinite(state.params, 'params') or (first_nonfinite(ref, 'ref') if ref is not None else None)
          if bad is None:
            self._set_aside([s for s, _ in skipped])
            return step, state, ref, meta
          why = f'tensor {bad} holds NaN or Inf'
      except Exception as e:  # noqa: BLE001 - any failure to read this step: try the previous one
        why = f'it does not restore ({_short(e)})'
      skipped.append((step, why))
      msg = f'checkpoint step {step} in {self.directory} is damaged and skipped: {why}'
      logging.info(msg)
      if jax.process_index() == 0:
        print(msg, flush=True)
    if skipped:
      raise DamagedCheckpoint(f'no intact checkpoint in {self.directory}: ' + '; '.join(
          f'step {s}: {w}' for s, w in skipped) + '. Move the directory away (or use a new --workdir) to start over.')
    return None

  def _set_aside(self, steps) -> None:
    """Renames damaged step directories to <step>.damaged (process 0), so new saves can reuse the numbers."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        src = paths.join(self.directory, str(step))
        dst = src + '.damaged'
        n = 1
        while paths.exists(dst):
          dst, n = f'{src}.damaged{n}', n + 1
        paths.rename(src, dst)
        logging.warning('moved damaged checkpoint %s to %s', src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('damaged checkpoints set aside')
    self.manager.reload()

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
