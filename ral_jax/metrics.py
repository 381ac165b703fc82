"""Metric writers: TensorBoard event files, a JSONL log and a console progress bar with ETA, on process 0 only.

<workdir>/metrics.jsonl   one JSON object per logged step: {"step": k, "stage": "rl", "<name>": value, ...}
<workdir>/tb/             TensorBoard scalars under the same names (grouped by their prefix, e.g. rl/reward)
console                   a tqdm bar over all outer steps with ETA and a few key numbers (reward, accuracy, ...)
Values are fetched from devices here, when `write` is called, and must be scalars; the training loop calls it for
step t-1 after dispatching step t (ral_jax/docs/design.md, asynchronous dispatch), so the fetch does not stall it.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

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


class MetricsWriter:
  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: Optional[bool] = None,
               tensorboard: bool = True, progress: bool = True, key_numbers: Sequence[str] = KEY_NUMBERS):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.key_numbers = key_numbers
    self._tb = self._bar = self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
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
