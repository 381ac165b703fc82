"""Metric writers: TensorBoard event files, a JSONL log and a console progress bar with ETA, on process 0 only.

<workdir> may be local or a gs:// URL (ral_jax.paths).
<workdir>/metrics.jsonl   one JSON object per logged step: {"step": k, "stage": "rl", "<name>": value, ...};
                          a resumed run first drops the lines past the restored step (they are replayed)
<workdir>/tb/             TensorBoard scalars under the same names (grouped by their prefix, e.g. rl/reward)
console                   a tqdm bar over all outer steps with ETA and a few key numbers (reward, accuracy, ...)
Values are fetched from devices here, when `write` is called, and must be scalars; the training loop calls it for
step t-1 after dispatching step t (ral_jax/docs/design.md, asynchronous dispatch), so the fetch does not stall it.
Multi-host: host-computed scalars are combined over processes first (`gather_host_metrics`); only process 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from ral_jax import paths

KEY_NUMBERS = ('loss', 'reward', 'accuracy', 'format', 'jsd', 'eval/accuracy', 'resp_len')


def to_host(metrics: Mapping) -> dict:
  """Device scalars -> Python floats (ints stay ints)."""
  out = {}
  for k, v in jax.device_get(dict(metrics)).items():
    a = np.asarray(v)
    if a.size != 1:
      raise ValueError(f'metric {k!r} has shape {a.shape}; log scalars only (reduce it in the step)')
    out[k] = int(a) if np.issubdtype(a.dtype, np.integer) else float(a)
  return out


def truncate_jsonl(path: str, last_step: int) -> int:
  """Drops the lines of a metrics.jsonl past `last_step` (the restored checkpoint's step; 0 = a fresh start, which
  keeps nothing), written by a session that was killed before its next checkpoint: a resumed run replays those
  steps. Returns the number of lines dropped."""
  if not paths.exists(path):
    return 0
  lines = paths.read_text(path).splitlines()
  keep = []
  for line in lines:
    try:
      step = int(json.loads(line)['step'])
    except (ValueError, KeyError, TypeError):
      continue       # a line cut by a kill mid-write
    if last_step and step <= last_step:
      keep.append(line)
  if len(keep) != len(lines):
    paths.write_text(path, ''.join(l + '\n' for l in keep))
  return len(lines) - len(keep)


def combine_host_metrics(rows: Sequence[Mapping[str, float]]) -> dict:
  """Per-host scalars (host-computed: rewards, accuracy, lengths, times, held-out scores) -> run-wide values.
  Hosts hold equal numbers of rows, so a per-host mean averages to the global mean; `*_max` and `time/*` take the
  maximum (the slowest host), `tokens_per_s` and `eval/examples` add up, and eval/accuracy and eval/format are
  weighted by each host's eval/examples."""
  keys = list(rows[0])
  out = {}
  n = [float(r.get('eval/examples', 0.0)) for r in rows]
  for k in keys:
    vals = [float(r[k]) for r in rows]
    if k.endswith('_max') or k.startswith('time/'):
      out[k] = max(vals)
    elif k in ('tokens_per_s', 'eval/examples'):
      out[k] = sum(vals)
    elif k in ('eval/accuracy', 'eval/format') and sum(n) > 0:
      out[k] = sum(v * w for v, w in zip(vals, n)) / sum(n)
    else:
      out[k] = sum(vals) / len(vals)
  return out


def gather_host_metrics(metrics: Mapping, skip_prefix: str = 'data/') -> dict:
  """`metrics` with its host-computed scalars (Python / numpy numbers; jax Arrays are global already) combined
  over all processes (combine_host_metrics). A collective: every process calls it at the same point with the
  same keys. Keys under `skip_prefix` (the bad-input counts, gathered by train.data) are left alone."""
  out = dict(metrics)
  if jax.process_count() == 1:
    return out
  from jax.experimental import multihost_utils
  keys = sorted(k for k, v in out.items() if isinstance(v, (int, float, np.number)) and not k.startswith(skip_prefix))
  sig = np.frombuffer(hashlib.sha1('|'.join(keys).encode()).digest()[:4], np.int32)
  sigs = np.asarray(multihost_utils.process_allgather(sig)).ravel()
  if len(set(sigs.tolist())) != 1:
    raise RuntimeError(f'hosts logged different host metrics; this host has {keys}')
  if not keys:
    return out
  vals = np.asarray(multihost_utils.process_allgather(np.asarray([float(out[k]) for k in keys], np.float32)))
  out.update(combine_host_metrics([dict(zip(keys, row)) for row in vals.reshape(-1, len(keys))]))
  return out


class MetricsWriter:
  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: Optional[bool] = None,
               tensorboard: bool = True, progress: bool = True, key_numbers: Sequence[str] = KEY_NUMBERS,
               drop_after: Optional[int] = None):
    """drop_after: the step a run (re)starts from; earlier sessions' lines past it are dropped (truncate_jsonl)."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.key_numbers = key_numbers
    self._tb = self._bar = self._jsonl = None
    if not self.enabled:
      return
    paths.makedirs(workdir)
    path = paths.join(workdir, 'metrics.jsonl')
    if drop_after is not None:
      truncate_jsonl(path, drop_after)
    self._jsonl = paths.AppendFile(path)
    if tensorboard:
      from tensorboardX import SummaryWriter
      paths.register_tensorboard()
      # purge_step: TensorBoard drops events of the replayed steps (after initial_step) from earlier sessions
      self._tb = SummaryWriter(paths.join(workdir, 'tb'), purge_step=drop_after + 1 if drop_after else None)
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step, desc='train', dynamic_ncols=True,
                       file=sys.stderr, mininterval=0.5)

  def write(self, step: int, metrics: Mapping, stage: str = '') -> dict:
    """Logs scalar metrics for outer step `step`; returns them as host floats."""
    host = to_host(metrics)
    if not self.enabled:
      return host
    record = {'step': int(step), 'stage': stage, **host}
    self._jsonl.write(json.dumps(record, allow_nan=True) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in host.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k if '/' in k else f'{stage or "train"}/{k}', v, step)
    if self._bar is not None:
      shown = {k.split('/')[-1] if k.startswith(stage + '/') else k: v for k, v in host.items()}
      post = {k: f'{shown[k]:.3g}' for k in self.key_numbers if k in shown}
      self._bar.set_postfix(post, refresh=False)
    return host

  def advance(self, n: int = 1, stage: str = ''):
    if self._bar is not None:
      if stage:
        self._bar.set_description(stage, refresh=False)
      self._bar.update(n)

  @property
  def tb(self):
    """The tensorboardX SummaryWriter (None off process 0 or when disabled), for image summaries."""
    return self._tb

  def print(self, msg: str):
    """A console line that does not break the progress bar (process 0 only)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(msg, file=sys.stderr)
    else:
      print(msg, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
