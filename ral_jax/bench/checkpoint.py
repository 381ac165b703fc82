"""Checkpoint save benchmark: how long a save holds the training loop, at a real model's state size.

  python -m ral_jax.bench.checkpoint --saves=3 --dir=/tmp             # the 3B RL state, one GPU
  python -m ral_jax.bench.checkpoint --layers=2 --vision_depth=2 --vocab=32768 --saves=3   # 3B shrunk: ~3 GB, CPU
  ... --snapshot=0 --ref=always                                       # the behaviour before host snapshots
  python -m ral_jax.bench.checkpoint --saves=2 --dir=/tmp --warm=both  # first save without and with the warm-up

The state is built by the trainer's own constructors (train/build: `init_model_params` with random per-leaf init,
`create_state` with the RL optimizer, `reference_of`) on a one-device mesh, and saved by the trainer's
`Checkpointer` the way the loop saves it (`Trainer._save`: the finite check, the state, JSON meta, and the reference
only where the loop saves it: `--ref`, `--beta`). `--layers`, `--vision_depth` and `--vocab` shrink the preset (same
code, a smaller state) for machines without the memory of the real one. Each save goes to its own directory,
deleted after it.

Per save:
  blocking_s       `Checkpointer.save` returning (the loop then dispatches its next step)
  next_step_s      one donating update right after the save (every float leaf + 1, the state donated as the RL
                   update donates it), until it is done
  stall_s          next_step_s minus the same update without a save (`step_alone_s`): how long the device waits
                   because the save still reads the donated buffers
  hold_s           blocking_s + stall_s: how long the save holds training back
  finalize_s       `Checkpointer.wait` afterwards (the rest of the write)
  host_peak_rss_gb the process's peak resident host memory so far (the host copies of a save live there)
and restored_exact: the last save, restored onto the state's shardings, has the checksum (`tree_checksum`) the
state had when `save` was called (the update after the save changes every value, so a save that read the buffers
after the update would fail it). The first save of a process may pay one-time costs (the first pinned host
allocations, Orbax's set-up).

`--warm=1` (the default, as the trainer does) calls `Checkpointer.prepare` before the first save, the way the loop
calls it when the state exists (here also on CPU, where the loop skips it), and runs donating updates while it
works:
  warm             prepare's result: leaves, bytes, seconds of the pinned allocation, compile_s of the finite check,
                   wall_s until done
  warm_steps       the updates run meanwhile: count, mean_s and max_s (against step_alone_s: what the warm-up
                   costs a loop that keeps stepping)
`--warm=0` measures without it. `--warm=both` runs the benchmark twice, each in its own process (the pinned pool
is per process), cold then warm, and reports both under 'cold' and 'warm' with their first saves' hold side by
side ('first_save_hold_s'). finite_first_s: the first `params_finite` on the parameters (its compilation unless
the warm-up compiled it ahead).
Prints one JSON object (bytes per item, versions, device, the saves); the same goes to $OUT/bench_checkpoint.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from ral_jax import bench


def _state(args):
  import jax
  from configs import common
  from ral_jax import sharding
  from ral_jax.train import build
  from ral_jax.train import config as rc
  c = common.get_config_for('video', 'ral')
  c.model.preset = args.preset
  c.model.param_dtype = args.param_dtype
  c.rl.beta = args.beta
  c.mesh.shape = (1, 1, 1)
  run = rc.build(c, jax.device_count(), warn=False)
  cfg = run.model
  over = {}
  if args.layers:
    over['num_hidden_layers'] = args.layers
  if args.vocab:
    over['vocab_size'] = args.vocab
  if over:
    cfg = cfg.replace(**over)
  if args.vision_depth:
    import dataclasses
    vis = cfg.vision
    cfg = cfg.replace(vision=dataclasses.replace(vis, depth=args.vision_depth, fullatt_block_indexes=tuple(
        i for i in vis.fullatt_block_indexes if i < args.vision_depth)))
  mesh, rules = sharding.make_mesh(run.mesh.shape), sharding.logical_rules(run.mesh.rules)
  params = build.init_model_params(cfg, mesh, rules, run.seed, per_leaf=True)
  state = build.create_state(params, build.optim.make_optimizer(run.rl_optim), run.seed)
  ref = build.reference_of(state.params)
  del params
  jax.block_until_ready((state, ref))
  return run, cfg, state, ref


def _nbytes(tree) -> int:
  import jax
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--preset', default='qwen2_5_vl_3b')
  ap.add_argument('--param_dtype', default='', help="'' = the preset's (float32 for 3B), or bfloat16")
  ap.add_argument('--layers', type=int, default=0, help='decoder layers (0 = the preset)')
  ap.add_argument('--vision_depth', type=int, default=0, help='vision blocks (0 = the preset)')
  ap.add_argument('--vocab', type=int, default=0, help='vocabulary (0 = the preset)')
  ap.add_argument('--beta', type=float, default=0.04, help='rl.beta (0: the run has no reference model)')
  ap.add_argument('--ref', default='loop', help="'loop': save the reference as the loop does; 'always': always "
                  "save it (the behaviour before re-deriving it at restore); 'never'")
  ap.add_argument('--snapshot', default='auto', help="Checkpointer(host_snapshot=...): auto | 1 | 0")
  ap.add_argument('--saves', type=int, default=2)
  ap.add_argument('--verify', type=int, default=1, help='1: restore the last save and compare its checksum')
  ap.add_argument('--dir', default='', help='where the checkpoints go (default: a temp dir; one save at a time: 40 GB at 3B, 52 GB with the reference)')
  ap.add_argument('--warm', default='1', choices=('0', '1', 'both'),
                  help="1: Checkpointer.prepare before the first save (as the trainer); 0: without; both: each in "
                  "its own process")
  ap.add_argument('--out', default=os.path.join(os.environ.get('OUT', '.'), 'bench_checkpoint.json'))
  args = ap.parse_args(argv)
  if args.warm == 'both':
    return _both(args, argv if argv is not None else sys.argv[1:])

  import jax
  from importlib import metadata
  from ral_jax.train import checkpoint as ckpt_lib
  t0 = time.perf_counter()
  run, cfg, state, ref = _state(args)
  res = {'preset': args.preset, 'layers': cfg.num_hidden_layers, 'vision_depth': cfg.vision.depth,
         'vocab': cfg.vocab_size, 'param_dtype': str(jax.tree.leaves(state.params)[0].dtype),
         'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(), 'jax': jax.__version__,
         'orbax': metadata.version('orbax-checkpoint'), 'build_s': time.perf_counter() - t0}
  with_ref = {'loop': None, 'always': True, 'never': False}[args.ref]
  res['bytes'] = {'state': _nbytes(state), 'ref': _nbytes(ref)}

  # the "next step": every float leaf + 1, the state donated (a save that still read the donated buffers after the
  # step wrote them would save the wrong values: the last save is restored and checked at the end)
  touch = jax.jit(lambda s: jax.tree.map(lambda x: x + 1 if x.dtype.kind == 'f' else x, s), donate_argnums=0)
  state = touch(state)                        # compile; the state stays donated-and-returned as in the loop
  jax.block_until_ready(state)
  t = time.perf_counter()
  state = jax.block_until_ready(touch(state))
  res['step_alone_s'] = time.perf_counter() - t

  kw = {} if args.snapshot == 'auto' else {'host_snapshot': bool(int(args.snapshot))}
  with_ref_of = lambda: with_ref if with_ref is not None else ckpt_lib.reference_source(args.beta, True) == 'saved'
  res['warm_requested'] = args.warm == '1'
  if args.warm == '1':   # as the loop: prepare() once the state exists, while the loop goes on stepping
    with tempfile.TemporaryDirectory(dir=args.dir or None) as d:
      ck = ckpt_lib.Checkpointer(d, 1, 1, True, host_warmup=True, **kw)   # also on CPU, where the loop skips it
      t = time.perf_counter()
      warm = ck.prepare(state, ref if with_ref_of() else None)
      steps = []
      while warm is not None and not warm.done():
        t1 = time.perf_counter()
        state = jax.block_until_ready(touch(state))
        steps.append(time.perf_counter() - t1)
      res['warm'] = None if warm is None else dict(warm.result(), wall_s=time.perf_counter() - t)
      res['warm_steps'] = {'count': len(steps), 'mean_s': sum(steps) / len(steps) if steps else None,
                           'max_s': max(steps, default=None)}
      ck.close()
  t = time.perf_counter()
  ckpt_lib.params_finite(state.params)        # compiled once, as in the loop (which checks before it saves)
  res['finite_first_s'] = time.perf_counter() - t
  saves = []
  for i in range(1, args.saves + 1):   # each save in its own directory, deleted after it (one on disk at a time)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as d:
      ck = ckpt_lib.Checkpointer(d, 1, 1, True, **kw)
      res['host_snapshot'] = ck.host_snapshot
      res['ref_source'] = ckpt_lib.reference_source(args.beta, rl_from_start=True)   # as the RL-only headline run
      meta = {'outer_step': i, 'stage': 'rl', 'data_state': {'rl': {'next_index': i}}}
      r = ref if with_ref_of() else None
      expect = ckpt_lib.tree_checksum(state)
      t = time.perf_counter()
      ck.save(i, state, meta, ref=r)
      blocking = time.perf_counter() - t
      t = time.perf_counter()
      state = jax.block_until_ready(touch(state))
      nxt = time.perf_counter() - t
      t = time.perf_counter()
      ck.wait(progress_every=0)
      fin = time.perf_counter() - t
      stall = max(0.0, nxt - res['step_alone_s'])
      saves.append({'blocking_s': blocking, 'next_step_s': nxt, 'stall_s': stall, 'hold_s': blocking + stall,
                    'finalize_s': fin, 'host_peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                    'bytes_saved': res['bytes']['state'] + (res['bytes']['ref'] if r else 0)})
      print(f'save {i}: {json.dumps(saves[-1])}', flush=True)
      if args.verify and i == args.saves:   # restored: the values the state had when save() was called
        got, _, _ = ck.restore(i, state)
        res['restored_exact'] = ckpt_lib.tree_checksum(got) == expect
        del got
      ck.close()
  res['saves'] = saves
  bench.report(res, args.out)
  return res


def _both(args, argv) -> dict:
  """--warm=both: the benchmark without, then with the warm-up, each in a fresh process."""
  rest, skip = [], False
  for a in argv:                       # all arguments but --warm and --out (as --k=v or --k v)
    if skip or a.split('=')[0] in ('--warm', '--out'):
      skip = not skip and '=' not in a
      continue
    rest.append(a)
  res = {}
  with tempfile.TemporaryDirectory() as d:
    for name, warm in (('cold', '0'), ('warm', '1')):
      out = os.path.join(d, f'{name}.json')
      print(f'--- {name}: --warm={warm}', flush=True)
      subprocess.run([sys.executable, '-m', 'ral_jax.bench.checkpoint', *rest, f'--warm={warm}', f'--out={out}'],
                     check=True)
      with open(out) as f:
        res[name] = json.load(f)
  res['first_save_hold_s'] = {k: res[k]['saves'][0]['hold_s'] for k in ('cold', 'warm')}
  bench.report(res, args.out)
  return res


if __name__ == '__main__':
  main()
