"""Where the device time of a profiled region goes: kernel time per program, per kind and per op, from a
`jax.profiler` trace (XSpace), without TensorBoard.

  with profile_summary.capture(log_dir) as got:
    ... run the steps ...
  summary = got['summary']       # or: summarize(ProfileData.from_file('.../*.xplane.pb'))

A device plane ('/device:GPU:0', '/device:TPU:0') holds one line per stream with one event per kernel; its stats name
the XLA program (`hlo_module`) that launched it. The summary adds kernel durations (overlap
between streams is not removed, so `busy_s` can exceed the wall time when streams run concurrently):
  busy_s                        all kernels of the first device plane
  by_module {name: s}           per jitted program (e.g. jit_rl_update, jit_score)
  by_kind {kind: s}             matmul / attention / collective / copy / fusion / other, from the kernel name
  by_module_kind {'module/kind': s}
  top [{module, kernel, s, count}]   the `top` kernels (by name, per program) with the most time
(Kernels are grouped by their own name, not by HLO op: under CUDA graphs one op, a command buffer, launches many.)
With no device plane (a CPU run) the summary says so and is otherwise empty.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import os
from typing import Dict, Iterator

KINDS = (
    ('attention', ('fmha', 'flash', 'cudnn', 'attention', 'sdpa')),
    ('matmul', ('gemm', 'cutlass', 'nvjet', 'cublas', 'sm90_xmma', 'sm80_xmma', 'xmma', 'triton_gemm', 'dot')),
    ('collective', ('nccl', 'all-reduce', 'all-gather', 'reduce-scatter', 'all_reduce', 'all_gather')),
    ('copy', ('memcpy', 'memset', 'copy')),
    ('fusion', ('fusion', 'reduce', 'transpose', 'concatenate', 'dynamic')),
)


def kind_of(kernel: str) -> str:
  k = kernel.lower()
  return next((name for name, keys in KINDS if any(s in k for s in keys)), 'other')


def _stats(event) -> Dict[str, str]:
  try:
    return {str(n): str(v) for n, v in event.stats}
  except Exception:   # pylint: disable=broad-except
    return {}


def summarize(data, top: int = 25) -> Dict:
  """ProfileData -> the summary of the module docstring."""
  planes = [p for p in data.planes if p.name.startswith('/device:') and 'CUSTOM' not in p.name]
  if not planes:
    return {'device_plane': None, 'note': 'no device plane in the trace (a CPU run has none)'}
  plane = sorted(planes, key=lambda p: p.name)[0]
  busy = 0.0
  by_module, by_kind, by_module_kind = collections.Counter(), collections.Counter(), collections.Counter()
  by_kernel, count = collections.Counter(), collections.Counter()
  for line in plane.lines:
    lname = line.name.lower()
    if 'xla modules' in lname or 'xla ops' in lname or 'steps' in lname or 'tensorflow' in lname:
      continue   # derived lines (programs / ops spanning kernels): counting them would double the time
    for ev in line.events:
      s = ev.duration_ns * 1e-9
      module = _stats(ev).get('hlo_module', '?')
      kind = kind_of(ev.name)
      busy += s
      by_module[module] += s
      by_kind[kind] += s
      by_module_kind[f'{module}/{kind}'] += s
      by_kernel[(module, ev.name)] += s
      count[(module, ev.name)] += 1
  rnd = lambda d: {k: round(v, 4) for k, v in d.most_common() if v >= 1e-3}
  return {'device_plane': plane.name, 'lines': [l.name for l in plane.lines], 'busy_s': round(busy, 4),
          'by_module': rnd(by_module), 'by_kind': rnd(by_kind), 'by_module_kind': rnd(by_module_kind),
          'top': [{'module': m, 'kernel': k[:120], 's': round(v, 4), 'count': count[(m, k)]}
                  for (m, k), v in by_kernel.most_common(top)]}


@contextlib.contextmanager
def capture(log_dir: str, top: int = 25) -> Iterator[Dict]:
  """Profiles the body into log_dir; afterwards got['summary'] holds `summarize` of the trace."""
  import jax
  from jax.profiler import ProfileData
  got: Dict = {}
  os.makedirs(log_dir, exist_ok=True)
  with jax.profiler.trace(log_dir):
    yield got
  files = sorted(glob.glob(os.path.join(log_dir, '**', '*.xplane.pb'), recursive=True), key=os.path.getmtime)
  got['summary'] = summarize(ProfileData.from_file(files[-1]), top) if files else {'note': 'no trace file written'}
