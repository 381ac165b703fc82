"""Device mesh, logical-axis rules and sharding helpers.

One mesh with axes ('data', 'fsdp', 'tensor'), all of AxisType.Auto (GSPMD propagation; `jax.make_mesh` would
otherwise default to explicit axes). Parameters carry logical axis names (models/layers.py, models/vision.py); the
rule table below maps each logical name to mesh axes. Default mapping (FSDP over 'fsdp', Megatron-style tensor
parallelism over 'tensor', batch over ('data', 'fsdp')):
  batch / activation_batch -> ('data', 'fsdp');  embed, vision_embed -> 'fsdp';
  vocab, heads, kv_heads, mlp, vision_heads, vision_mlp, vision_merge, activation_{heads,kv_heads,mlp,vocab}
  -> 'tensor';  layers, norm, head_dim, vision_patch, activation_length, activation_embed -> replicated.
`logical_rules(overrides)` replaces entries by logical name (config: mesh.rules = ((name, axes), ...)).

A parameter dim whose size the assigned mesh axes do not divide (e.g. the tiny model's 6 heads on tensor=4, or a
prime vocabulary) is replicated along that dim instead of failing (`fit_spec`); nothing else changes.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')

DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (
    ('batch', BATCH), ('activation_batch', BATCH),
    ('embed', 'fsdp'), ('vocab', 'tensor'), ('heads', 'tensor'), ('kv_heads', 'tensor'), ('head_dim', None),
    ('mlp', 'tensor'), ('layers', None), ('norm', None),
    ('vision_patch', None), ('vision_embed', 'fsdp'), ('vision_heads', 'tensor'), ('vision_mlp', 'tensor'),
    ('vision_merge', 'tensor'),
    ('activation_length', None), ('activation_embed', None), ('activation_heads', 'tensor'),
    ('activation_kv_heads', 'tensor'), ('activation_mlp', 'tensor'), ('activation_vocab', 'tensor'),
)


def logical_rules(overrides: Iterable[Tuple[str, Any]] = ()) -> Tuple[Tuple[str, Any], ...]:
  """DEFAULT_RULES with entries replaced (or appended) by name. Axes: None, a mesh axis or a tuple of them."""
  table = dict(DEFAULT_RULES)
  for name, axes in overrides:
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    flat = axes if isinstance(axes, tuple) else (axes,)
    bad = [a for a in flat if a is not None and a not in AXES]
    if bad:
      raise ValueError(f'mesh rule for {name!r} names mesh axes {bad}; mesh axes are {AXES}')
    table[name] = axes
  return tuple(table.items())


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> jax.sharding.Mesh:
  """Mesh of shape (data, fsdp, tensor) over `devices` (default all); one entry may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != 3 or sum(s == -1 for s in shape) > 1:
    raise ValueError(f'mesh shape {tuple(shape)}: give 3 sizes (data, fsdp, tensor), at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'mesh shape {tuple(shape)}: {len(devices)} devices not divisible by {known}')
    shape[shape.index(-1)] = len(devices) // known
  n = math.prod(shape)
  if n > len(devices):
    raise ValueError(f'mesh shape {tuple(shape)} needs {n} devices, only {len(devices)} present')
  return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:n])


def _axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
  """Drops (replicates) the mesh axes of any dim whose size they do not divide."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return P(*[e if e is None or shape[i] % _axis_size(mesh, e) == 0 else None for i, e in enumerate(entries)])


def logical_to_shardings(boxed_tree, mesh, rules) -> Any:
  """Tree of flax LogicallyPartitioned (concrete or abstract) leaves -> NamedShardings (unboxed tree structure)."""
  logical = nn.get_partition_spec(boxed_tree)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  shapes = nn.meta.unbox(boxed_tree)
  is_spec = lambda x: isinstance(x, P)
  return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s, a.shape, mesh)), mesh_specs, shapes,
                      is_leaf=is_spec)


def state_shardings(init_fn: Callable[[], Any], mesh, rules) -> Tuple[Any, Any]:
  """(abstract unboxed state, NamedShardings) of `init_fn()` (which returns boxed leaves), via jax.eval_shape."""
  abstract = jax.eval_shape(init_fn)
  return nn.meta.unbox(abstract), logical_to_shardings(abstract, mesh, rules)


def init_sharded(init_fn: Callable[[], Any], mesh, rules):
  """Runs `init_fn` (boxed output) under jit with the state shardings as out_shardings: no host copy."""
  _, shardings = state_shardings(init_fn, mesh, rules)
  with nn.logical_axis_rules(rules):
    return jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()


_INIT_PROGRAMS: Dict[Any, Any] = {}   # init_per_leaf's compiled one-leaf programs, reused across calls


def init_per_leaf(abstract, shardings, seed: int, stddev: float = 0.02):
  """Random parameters of the same layout as a model init, each leaf drawn directly on its sharding.

  abstract: unboxed jax.ShapeDtypeStruct tree (from `state_shardings`). Each leaf is one call of a small jitted
  program with its sharding as out_shardings; programs are cached by (shape, dtype, sharding, kind), so the stacked
  decoder leaves and the 32 identical vision blocks of a 7B model compile a few dozen one-op programs (seconds) and
  no model code is traced. 'scale' leaves (RMSNorm) are ones, 'bias' leaves zeros, every other leaf (kernels,
  embeddings) normal(0, stddev), as models/layers.py's initializers; leaf i's key is fold_in(PRNGKey(seed), i) in
  the tree's leaf order. Not bit-identical to `init_sharded` (flax derives its keys from module paths): used for
  large models (train/build.FAST_INIT_PARAMS)."""
  import jax.numpy as jnp
  programs = _INIT_PROGRAMS

  def program(shape, dtype, sh, kind):
    key = (shape, dtype, sh, kind, stddev)
    if key not in programs:
      if kind == 'normal':
        fn = lambda k: (stddev * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
      else:
        fn = lambda k: (jnp.ones if kind == 'ones' else jnp.zeros)(shape, dtype)
      programs[key] = jax.jit(fn, out_shardings=sh)
    return programs[key]

  base = jax.random.PRNGKey(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for i, ((path, leaf), sh) in enumerate(zip(flat, jax.tree.leaves(shardings))):
    name = str(getattr(path[-1], 'key', path[-1]))
    kind = 'ones' if name == 'scale' else 'zeros' if name == 'bias' else 'normal'
    out.append(program(tuple(leaf.shape), jnp.dtype(leaf.dtype), sh, kind)(jax.random.fold_in(base, i)))
  return jax.tree_util.tree_unflatten(treedef, out)


class MeshJit:
  """A jitted step that is traced, lowered and called under `mesh_context(mesh, rules)` (so the model's logical
  activation constraints and the TPU attention kernel's shard_map see the mesh, in the trainer exactly as in the
  AOT check), with explicit in_shardings: args whose sharding differs from the declared one are moved to it
  before the call (a no-op for arrays already there), since jit refuses committed args that do not match.
  in_shardings entries may be None (left to the argument); trailing entries beyond the call's args are dropped.

  Before its first run for a set of shapes the step is compiled and its compiled memory (arguments + outputs -
  donated + temporaries) is compared with the device's memory: a step that cannot fit stops with a MemoryError that
  names `knob` (the config knob that trades memory for steps, e.g. 'rl.micro_batches') and a value to try, instead
  of failing later inside the allocator."""

  def __init__(self, fn, mesh, rules, in_shardings, out_shardings=None, donate_argnums=(), name: str = 'step',
               knob: Optional[Tuple[str, int]] = None):
    self.fn, self.mesh, self.rules = fn, mesh, rules
    self.in_shardings, self.out_shardings, self.donate = tuple(in_shardings), out_shardings, donate_argnums
    self.name, self.knob = name, knob
    self._jits, self._compiled = {}, {}

  def jitted(self, nargs: int):
    if nargs not in self._jits:
      self._jits[nargs] = jax.jit(self.fn, in_shardings=self.in_shardings[:nargs], out_shardings=self.out_shardings,
                                  donate_argnums=self.donate)
    return self._jits[nargs]

  def __call__(self, *args):
    with mesh_context(self.mesh, self.rules):
      args = self._place_all(args)
      leaves, tree = jax.tree.flatten(args)
      key = (tree, tuple((x.shape, x.dtype) for x in leaves))
      exe = self._compiled.get(key)
      if exe is None:
        exe = self.jitted(len(args)).lower(*args).compile()
        check_fits(exe, self.name, self.knob, self.mesh.local_devices[0])   # this process's: addressable
        self._compiled[key] = exe
      return exe(*args)

  def _place_all(self, args):
    """Each arg (a pytree) moved leaf by leaf to its declared sharding (a Sharding, a matching tree, or None)."""
    out = []
    for a, s in zip(args, self.in_shardings[:len(args)]):
      if s is None or a is None:
        out.append(a)
      elif isinstance(s, jax.sharding.Sharding):
        out.append(jax.tree.map(lambda x: x if x.sharding == s else jax.device_put(x, s), a))
      else:
        out.append(jax.tree.map(lambda x, t: x if x is None or x.sharding == t else jax.device_put(x, t), a, s,
                                is_leaf=lambda x: x is None))
    return tuple(out)

  def lower(self, *args):
    with mesh_context(self.mesh, self.rules):
      return self.jitted(len(args)).lower(*args)


def compiled_peak(exe) -> Optional[Dict[str, int]]:
  """Bytes per device of a compiled program: argument, output, alias (donated), temp, and peak = argument +
  output - alias + temp; None when the backend gives no memory analysis."""
  mem = exe.memory_analysis()
  if mem is None:
    return None
  out = {k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0) for k in ('argument', 'output', 'alias', 'temp')}
  out['peak'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def check_fits(exe, name: str, knob: Optional[Tuple[str, int]], device, fraction: float = 1.0):
  """Raises MemoryError when the compiled program's peak exceeds `fraction` of the device's memory limit (GPU and
  TPU report one; CPU does not: no check). The message names `knob` = (config knob, current value) and the value
  the temporaries suggest (temporaries scale about linearly with the rows per micro-batch)."""
  try:
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  except jax.errors.JaxRuntimeError:     # a device of another process, or a backend without memory stats
    stats = None
  limit = (stats or {}).get('bytes_limit')
  mem = compiled_peak(exe)
  if not limit or mem is None or mem['peak'] <= fraction * limit:
    return
  gib = lambda b: b / 2 ** 30  # noqa: E731
  msg = (f'{name} needs {gib(mem["peak"]):.1f} GiB per device (arguments {gib(mem["argument"]):.1f}, temporaries '
         f'{gib(mem["temp"]):.1f}, outputs {gib(mem["output"] - mem["alias"]):.1f} not donated) but '
         f'{device.device_kind} holds {gib(limit):.1f} GiB.')
  if knob is not None:
    k, value = knob
    room = fraction * limit - (mem['peak'] - mem['temp'])
    factor = 2 ** max(1, math.ceil(math.log2(max(mem['temp'] / max(room, 1.0), 1.0))))
    msg += (f' Raise --config.{k} (now {value}; try {value * factor}), or find the value that fits with '
            '`python -m ral_jax.aot --fit` (README: Memory at scale).')
  raise MemoryError(msg)


def model_param_shardings(cfg, mesh, rules, vision_inputs=None):
  """(abstract params, shardings) of `models.vlm.init_params(cfg, ...)` at full size, at no cost."""
  from ral_jax.models.vlm import init_params
  return state_shardings(lambda: init_params(cfg, jax.random.PRNGKey(0), vision_inputs, boxed=True), mesh, rules)


def batch_sharding(mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Sharding that splits `batch_axis` over ('data', 'fsdp') and replicates the other dims."""
  spec = [None] * ndim
  spec[batch_axis] = BATCH
  return NamedSharding(mesh, P(*spec))


def shard_batch(batch, mesh, batch_axes: Optional[Mapping[str, int]] = None):
  """Host arrays (process-local slice of the global batch) -> global jax Arrays split over ('data', 'fsdp').

  `batch` is a dict (or any pytree of arrays); the batch dim is axis 0, except for dict keys in `batch_axes`
  (default {'positions': 1}: M-RoPE positions are [3,B,T]). Multi-host: each process passes its own rows."""
  axes = {'positions': 1, **(batch_axes or {})}

  def put(path, x):
    key = path[-1].key if path and hasattr(path[-1], 'key') else None
    ax = axes.get(key, 0)
    x = np.asarray(x)
    if x.shape[ax] % _axis_size(mesh, BATCH) and jax.process_count() == 1:
      raise ValueError(f'batch entry {key!r} has {x.shape[ax]} rows on axis {ax}, not divisible by the '
                       f'{_axis_size(mesh, BATCH)} batch shards (data x fsdp) of mesh {dict(mesh.shape)}')
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, ax), x)
  return jax.tree_util.tree_map_with_path(put, batch)


def mesh_context(mesh, rules):
  """`with mesh_context(mesh, rules):` sets the mesh and the logical rules, so activation constraints apply."""
  import contextlib
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack
