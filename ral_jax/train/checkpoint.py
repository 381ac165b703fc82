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
waits only while its buffers are still being copied out. `Checkpointer.prepare`, called by the trainer once the
state exists, pays the first save's one-time costs (the pinned host allocations, the finite check's compilation)
in the background beforehand.

The reference is not saved at all where the run can re-derive it exactly: with beta = 0 there is none, and an RL
stage that starts from the run's initial parameters (no SFT steps) re-derives it at restore from them (HF
checkpoint, seed or init_checkpoint); its checksum (`tree_checksum`, exact on any mesh) is saved and checked, so a
changed source stops the restore with a message.

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
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ral_jax import paths
from ral_jax.train.state import all_finite


_all_finite = jax.jit(all_finite)   # one program per tree (eagerly, one small program per leaf shape: seconds at 3B)
_finite_compiled: dict = {}         # (treedef, leaf shapes/dtypes/shardings) -> `_all_finite` compiled ahead


def _layout_key(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, 'sharding', None)) for x in leaves)


def precompile_finite(params_like) -> None:
  """Compiles the finite check for a parameter tree of this layout (arrays or ShapeDtypeStructs with shardings)
  ahead of the first `params_finite` call (`Checkpointer.prepare` does it off the loop's thread): a jitted
  function's own cache is not filled by `.lower().compile()`, so the compiled program is kept here."""
  key = _layout_key(params_like)
  if key not in _finite_compiled:
    _finite_compiled[key] = _all_finite.lower(params_like).compile()


def params_finite(params) -> bool:
  """Whether every floating leaf is finite: one jitted program, one host sync."""
  compiled = _finite_compiled.get(_layout_key(params)) if _finite_compiled else None
  if compiled is not None:
    try:
      return bool(compiled(params))
    except (TypeError, ValueError):   # an argument the ahead-of-time program does not take: the jitted check
      pass
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


def _pinned(sharding) -> Optional[jax.sharding.Sharding]:
  """`sharding` in pinned host memory, or None where its devices have no such memory."""
  if sharding is None:
    return None
  dev = next(iter(sharding.device_set))
  if not any(m.kind == 'pinned_host' for m in dev.addressable_memories()):
    return None
  return sharding.with_memory_kind('pinned_host')


def _has_pinned_host(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  return bool(leaves) and _pinned(leaves[0].sharding) is not None


def warm_pinned_host(trees) -> dict:
  """Allocates pinned host buffers of every array leaf's size and sharding (the same sizes, in the same order, as a
  `host_copy` of each tree in turn), waits for them, and frees them. Takes arrays or ShapeDtypeStructs with
  shardings and never touches device memory: the buffers are filled from host zeros (`np.zeros`: untouched pages,
  no resident memory of their own). What it buys is the allocation itself, see `Checkpointer.prepare`."""
  t0 = time.perf_counter()
  held, nbytes, n = [], 0, 0
  for tree in trees:
    srcs, dsts = [], []
    for x in jax.tree.leaves(tree):
      dst = _pinned(getattr(x, 'sharding', None))
      if dst is None or jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
        continue
      srcs.append(np.zeros(x.shape, x.dtype))
      dsts.append(dst)
    if srcs:   # one batched transfer per tree, as host_copy; may_alias=False: always a new buffer (no zero-copy view)
      held.extend(jax.device_put(srcs, dsts, may_alias=False))
    n += len(srcs)
    nbytes += sum(z.nbytes for z in srcs)
    del srcs
  jax.block_until_ready(held)
  for x in held:
    x.delete()
  return {'leaves': n, 'bytes': nbytes, 'seconds': time.perf_counter() - t0}


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
  (Orbax's save takes part in cross-process barriers, which must run in the same order on every process).

  host_warmup (None: on with host_snapshot, except on CPU, where pinned host memory is ordinary memory): whether
  `prepare` warms the pinned host memory the first save needs (see `prepare`)."""

  def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True,
               host_snapshot: Optional[bool] = None, host_warmup: Optional[bool] = None):
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
    if host_warmup is None:
      host_warmup = jax.default_backend() != 'cpu'
    self.host_warmup = bool(host_snapshot and host_warmup)
    self._warm: Optional[concurrent.futures.Future] = None

  def prepare(self, state, ref=None) -> Optional[concurrent.futures.Future]:
    """Pays, in a background thread, the one-time costs of the first host-snapshot save of `state` (and `ref`, if
    it will be saved with it): arrays or ShapeDtypeStructs with shardings; only their layout is read, here.
    Call it as soon as the state exists, so it overlaps the first step's compilation. Returns the background
    work's future (its result: leaves, bytes, seconds), or None where there is nothing to warm (no host snapshot,
    no pinned host memory, CPU unless host_warmup=True). Failures are logged, never raised: the first save then
    pays the costs itself. A save that comes before the warm-up is done waits for it, then proceeds.

    The costs: (1) the finite check's compilation for this parameter layout (`precompile_finite`); (2) the pinned
    host memory of the snapshot. On GPU the runtime allocates pinned memory from a pool (XLA's host BFC allocator,
    on demand up to its limit, `XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`, 64 GiB by default): the first snapshot grows
    the pool with page-locked allocations (cudaHostAlloc), later ones reuse the freed memory (at 3B on one H200
    the first save held the loop 40.4 s, the second 0.97 s). So the warm-up allocates buffers of the snapshot's sizes and shardings, in
    the order `save` allocates them, and frees them at once (`warm_pinned_host`): the pool then holds what the
    first save needs. Freed rather than kept: JAX cannot copy into an existing array, so kept buffers could not
    serve as the snapshot's destination; they would only double the pinned memory. The pool keeps the memory
    page-locked for the process's life, as the first save makes it do anyway. No device memory is used (the
    buffers are filled from host zeros); the thread holds the GIL only to trace the finite check and to list the
    leaves, and waits for the runtime without it."""
    if not self.host_warmup:          # (only ever set together with host_snapshot)
      return None
    trees = [abstract_like(state)] + ([abstract_like(ref)] if ref is not None else [])
    if not any(_pinned(getattr(x, 'sharding', None)) for x in jax.tree.leaves(trees)):
      return None
    params_like = getattr(trees[0], 'params', None)
    # one worker thread: an earlier warm-up (or a save's hand-off to Orbax) finishes first, so joining this one
    # joins them all
    self._warm = self._worker.submit(self._warm_up, trees, params_like)
    return self._warm

  @staticmethod
  def _warm_up(trees, params_like) -> dict:
    t0 = time.perf_counter()
    if params_like is not None:
      try:
        precompile_finite(params_like)
      except Exception as e:  # noqa: BLE001 - the first save compiles it then
        logging.warning('checkpoint warm-up: compiling the finite check failed: %s', _short(e))
    compile_s = time.perf_counter() - t0
    try:
      out = warm_pinned_host(trees)
    except Exception as e:  # noqa: BLE001 - e.g. out of pinned host memory: the first save allocates it then
      logging.warning('checkpoint warm-up: allocating pinned host memory failed: %s', _short(e))
      out = {'leaves': 0, 'bytes': 0, 'seconds': 0.0, 'error': _short(e)}
    out['compile_s'] = compile_s
    logging.info('checkpoint warm-up: %s', out)
    return out

  def _join_warm(self) -> None:
    warm, self._warm = self._warm, None
    if warm is not None:
      warm.result()      # _warm_up logs its failures and does not raise

  def latest_step(self) -> Optional[int]:
    self._join_pending()
    return self.manager.latest_step()

  def should_save(self, outer_step: int) -> bool:
    return outer_step % self.every == 0 or self.manager.reached_preemption(outer_step)

  def save(self, outer_step: int, state, meta: dict, ref=None, force: bool = False) -> bool:
    """Saves (asynchronously) unless parameters are non-finite; returns whether a save started. With host_snapshot
    it returns once the host copy is started; an error of that save is raised by the next `save` or `wait`. A
    `prepare` still running is waited for first."""
    self._join_warm()
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
      self._join_warm()
      self._join_pending()
    finally:
      self.manager.wait_until_finished()
      self.manager.close()
      if self._worker is not None:
        self._worker.shutdown()
