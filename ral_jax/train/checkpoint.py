"""Orbax checkpoints of a run: train state, frozen reference, step, RNG and data-iterator state, saved together.

Layout: <workdir>/checkpoints/<outer_step>/{state, ref, meta}.
  state  TrainState (params, optimizer state, optimizer step, base RNG key), restored straight onto its sharding
  ref    the frozen reference params of the RL stage, only where they cannot be re-derived (`reference_source`)
  meta   JSON: outer step, stage, data-iterator states (Grain `get_state()`, JSON or base64 bytes), the reference's
         source and checksum (`ref`), extra fields
Saves are asynchronous (`checkpoint.async_save`), every K outer steps, the N most recent kept; a SIGTERM or SIGINT
makes the loop save at the next step boundary and exit. Non-finite parameters are never saved.

What a save costs the loop (`python -m ral_jax.bench.checkpoint`): Orbax's async save copies every array to host
memory before it returns, and the next step donates the state's buffers, so the copy cannot simply overlap the
step. With `host_snapshot` (the default for an async save in one process) `save` only starts a copy of the arrays
into pinned host memory (`jax.device_put`, asynchronous; the runtime orders it before the next step reuses the
donated buffers) and hands that copy to Orbax in a background thread: the loop goes on at once, and the device
waits only while its buffers are still being copied out. The reference is not saved at all where the run can
re-derive it exactly: with beta = 0 there is none, and an RL stage that starts from the run's initial parameters
(no SFT steps) re-derives it at restore from them (HF checkpoint, seed or init_checkpoint); its checksum
(`tree_checksum`, exact on any mesh) is saved and checked, so a changed source stops the restore with a message.

Resume (`restore_newest_intact`) tries the steps newest first. A step that cannot be restored (an empty or
foreign directory, garbage or truncated or zeroed data files, `meta` removed, a non-finite tensor) is skipped with
a warning that says which step and why, and is moved aside to `<step>.damaged` (so that the run can save that step
number again); the newest intact step is restored. When no step is intact, nothing is moved and the restore stops
with every step's reason.
"""
from __future__ import annotations

import base64
import concurrent.futures
import signal
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from ral_jax import paths
from ral_jax.train.state import all_finite


_all_finite = jax.jit(all_finite)   # one program per tree (eagerly, one small program per leaf shape: seconds at 3B)


def params_finite(params) -> bool:
  """Whether every floating leaf is finite: one jitted program, one host sync."""
  return bool(_all_finite(params))


def _leaf_checksum(x):
  """sum over elements of bits(x[i]) * (2 i + 1) mod 2**32, i the row-major flat index: integer arithmetic, so
  the same on any mesh and in any reduction order; position-weighted, so swapped elements change it."""
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  u = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
  idx, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for d in reversed(range(x.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2 ** 32)
    stride *= x.shape[d]
  return jnp.sum(u * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _tree_checksum(tree):
  total = jnp.uint32(len(jax.tree.leaves(tree)))
  for x in jax.tree.leaves(tree):
    total = total * jnp.uint32(1000003) + _leaf_checksum(x)
  return total


def tree_checksum(tree) -> str:
  """An exact fingerprint of a pytree's values (bits, positions, leaf order) as 8 hex digits, computed on device."""
  return f'{int(_tree_checksum(tree)):08x}'


def reference_source(beta: float, rl_from_start: bool) -> str:
  """Where the RL stage's frozen reference comes from at restore: 'none' (beta = 0: the loss never reads it, the
  run holds none), 'init' (the RL stage starts from the run's initial parameters: re-derived from them), 'saved'
  (after SFT steps: the policy at the SFT -> RL switch, saved in each RL checkpoint)."""
  if beta == 0:
    return 'none'
  return 'init' if rl_from_start else 'saved'


def _has_pinned_host(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  if not leaves:
    return False
  dev = next(iter(leaves[0].sharding.device_set))
  return any(m.kind == 'pinned_host' for m in dev.addressable_memories())


def host_copy(tree):
  """Starts copying every array leaf into pinned host memory (same sharding) and returns the copies at once. The
  originals may then be donated: the runtime finishes reading them before a donating program overwrites them."""
  leaves, treedef = jax.tree.flatten(tree)
  idx = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
  moved = jax.device_put([leaves[i] for i in idx], [leaves[i].sharding.with_memory_kind('pinned_host') for i in idx])
  for i, x in zip(idx, moved):
    leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


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
  """Path of the first floating leaf holding NaN or Inf (None if all finite): one jitted check, then (only when it
  fails) leaf by leaf."""
  if params_finite(tree):
    return None
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
  """Thin wrapper over `ocp.CheckpointManager` for this project's three items.

  host_snapshot (None: on for an async save in a one-process run where the devices have pinned host memory):
  `save` starts a host copy of the arrays (`host_copy`) and runs Orbax's save of that copy in a background
  thread, so the loop does not wait for the device-to-host transfer. Multi-process runs save from the main thread
  (Orbax's save takes part in cross-process barriers, which must run in the same order on every process)."""

  def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True,
               host_snapshot: Optional[bool] = None):
    self.directory = paths.abspath(paths.join(workdir, 'checkpoints'))
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'ref', 'meta'))
    if host_snapshot is None:
      host_snapshot = async_save and jax.process_count() == 1
    if host_snapshot and jax.process_count() > 1:
      raise ValueError('host_snapshot saves from a background thread: one-process runs only')
    self.host_snapshot = host_snapshot
    self._worker = concurrent.futures.ThreadPoolExecutor(1, 'ckpt') if host_snapshot else None
    self._pending: Optional[tuple[int, concurrent.futures.Future]] = None

  def latest_step(self) -> Optional[int]:
    self._join_pending()
    return self.manager.latest_step()

  def should_save(self, outer_step: int) -> bool:
    return outer_step % self.every == 0 or self.manager.reached_preemption(outer_step)

  def save(self, outer_step: int, state, meta: dict, ref=None, force: bool = False) -> bool:
    """Saves (asynchronously) unless parameters are non-finite; returns whether a save started. With host_snapshot
    it returns once the host copy is started; an error of that save is raised by the next `save` or `wait`."""
    if not params_finite(state.params):
      logging.error('step %d: non-finite parameters, checkpoint NOT saved', outer_step)
      return False
    if outer_step in self.manager.all_steps() or (self._pending is not None and self._pending[0] == outer_step):
      return False
    meta = dict(meta, data_state={k: _encode(v) for k, v in (meta.get('data_state') or {}).items()})
    trees = {'state': state} if ref is None else {'state': state, 'ref': ref}
    if self.host_snapshot and _has_pinned_host(trees):
      # asynchronous; the device buffers may be donated from here on. The state first: the next step waits for
      # its donated buffers only, while the reference (never donated) is copied out behind it.
      trees = {k: host_copy(v) for k, v in trees.items()}
      self._join_pending()              # the previous save's host copy is in Orbax's hands (and its error raised)
      self._pending = (outer_step, self._worker.submit(self._save_now, outer_step, trees, meta, force))
      return True
    return self._save_now(outer_step, trees, meta, force)

  def _save_now(self, outer_step: int, trees: dict, meta: dict, force: bool) -> bool:
    items = {k: ocp.args.StandardSave(v) for k, v in trees.items()}
    items['meta'] = ocp.args.JsonSave(meta)
    return self.manager.save(outer_step, args=ocp.args.Composite(**items), force=force)

  def _join_pending(self) -> None:
    """Waits until a background save has handed its data to Orbax; raises its error."""
    pending, self._pending = self._pending, None
    if pending is not None:
      pending[1].result()

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

    def finish():
      self._join_pending()
      self.manager.wait_until_finished()
    if not progress_every:
      finish()
      return
    done, error = threading.Event(), []
    t0 = time.perf_counter()

    def run():
      try:
        finish()
      except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
        error.append(e)
      finally:
        done.set()
    waiter = threading.Thread(target=run, daemon=True)
    waiter.start()
    while not done.wait(progress_every):
      msg = f'checkpoint: still finalizing the last save in {self.directory} ({time.perf_counter() - t0:.0f} s)'
      logging.info(msg)
      if jax.process_index() == 0:
        print(msg, flush=True)
    waiter.join()
    if error:
      raise error[0]

  def close(self):
    try:
      self._join_pending()
    finally:
      self.manager.wait_until_finished()
      self.manager.close()
      if self._worker is not None:
        self._worker.shutdown()
