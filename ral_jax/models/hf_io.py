"""Import / export of Qwen2.5-VL checkpoints in the HF layout (config.json + safetensors, single or sharded).

  cfg, params = load_hf(ckpt_dir, shardings=None, param_dtype=None, **cfg_overrides)
  save_hf(params, cfg, out_dir, dtype=None, scheme='hub', max_shard_bytes=None)

Import reads config.json (`ModelConfig.from_hf`, plus the checks below), finds every tensor through
model.safetensors or model.safetensors.index.json, checks the whole name set, shapes and dtypes from the headers
before reading any data, then builds each Flax leaf directly on its target sharding (`shardings`: a pytree like
params of jax Shardings, e.g. `model_shardings(cfg, mesh)`; default: the first device): every distinct shard
of the leaf is converted from the memory-mapped files (layer by layer for stacked leaves), put on the devices that
hold it, and dropped, so host memory holds one shard plus one HF tensor at a time, never a second model copy.
Multi-host: each process reads only the shards of its addressable devices.
Checkpoint dtypes float32 and bfloat16 are read (bfloat16 through ml_dtypes, no torch); leaves are stored in
`param_dtype` (default cfg.param_dtype). Both name schemes of hf_names.py are accepted. With
tie_word_embeddings, an `lm_head.weight` in the files is ignored (the tied model has no such parameter).

Export writes the same layout back (tensors in the table's order, `{"format": "pt"}` metadata so transformers
loads it). A checkpoint imported with param_dtype float32 and exported in its own dtype and scheme has
bit-identical tensors (bfloat16 -> float32 -> bfloat16 is exact).

Errors name the tensor or field: missing tensor, unexpected tensor, shape mismatch, unsupported dtype, a config
field this model cannot represent, missing files.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np

from ral_jax.models import hf_names
from ral_jax.models.config import ModelConfig
from ral_jax.models.safetensors_io import DTYPES, SafetensorsFile, dtype_name, write_safetensors

SINGLE, INDEX = 'model.safetensors', 'model.safetensors.index.json'
READ_DTYPES = ('F32', 'BF16')


def read_config(ckpt_dir: str, **overrides: Any) -> ModelConfig:
  """config.json -> ModelConfig, refusing fields this implementation cannot represent."""
  path = os.path.join(ckpt_dir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: a checkpoint directory needs config.json')
  with open(path) as f:
    hf = json.load(f)
  text = {**hf, **(hf.get('text_config') or {})}
  if text.get('use_sliding_window'):
    raise ValueError('config.json field use_sliding_window=true: sliding-window attention is not supported')
  rope = text.get('rope_scaling') or text.get('rope_parameters') or {}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind not in ('default', 'mrope'):
    raise ValueError(f'config.json field rope_scaling.rope_type={kind!r}: only default M-RoPE is supported')
  vis = hf.get('vision_config') or {}
  if vis.get('window_size', 112) % (vis.get('patch_size', 14) * vis.get('spatial_merge_size', 2)):
    raise ValueError('config.json field vision_config.window_size must be a multiple of patch_size * '
                     'spatial_merge_size')
  return ModelConfig.from_hf(hf, **overrides)


def _open_files(ckpt_dir: str) -> Dict[str, SafetensorsFile]:
  """tensor name -> the SafetensorsFile holding it."""
  index, single = os.path.join(ckpt_dir, INDEX), os.path.join(ckpt_dir, SINGLE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    files = {fn: SafetensorsFile(os.path.join(ckpt_dir, fn)) for fn in sorted(set(weight_map.values()))}
    where = {}
    for fn, st in files.items():
      for name in st.keys():
        if weight_map.get(name) != fn:
          raise ValueError(f'tensor {name!r} is in {fn} but {INDEX} maps it to {weight_map.get(name)!r}')
        where[name] = st
    missing = sorted(set(weight_map) - set(where))
    if missing:
      raise ValueError(f'{INDEX} lists tensors that no shard holds, e.g. {missing[:3]}')
    return where
  if os.path.exists(single):
    st = SafetensorsFile(single)
    return {name: st for name in st.keys()}
  found = sorted(os.listdir(ckpt_dir))
  hint = ' (.bin / pickle checkpoints are not read: convert them to safetensors)' if any(
      f.endswith(('.bin', '.pt', '.pth')) for f in found) else ''
  raise FileNotFoundError(f'{ckpt_dir}: neither {SINGLE} nor {INDEX} found{hint}; files: {found[:10]}')


def check_tensors(specs: List[hf_names.Spec], where: Dict[str, SafetensorsFile], tied: bool) -> None:
  """Names, shapes and dtypes of the checkpoint against the table, before any data is read."""
  expected = {s.hf_name(i): s for s in specs for i in range(max(s.layers, 1))}
  extra = set(where) - set(expected)
  if tied:
    extra.discard('lm_head.weight')
  if extra:
    raise ValueError(f'unexpected tensor(s) in the checkpoint: {sorted(extra)[:5]} ({len(extra)} in all); '
                     'is it a Qwen2.5-VL checkpoint matching config.json?')
  missing = sorted(set(expected) - set(where))
  if missing:
    raise ValueError(f'missing tensor(s) in the checkpoint: {missing[:5]} ({len(missing)} in all)')
  for name, spec in expected.items():
    dt, shape = where[name].header[name]
    if shape != spec.hf_shape:
      raise ValueError(f'tensor {name!r}: shape {list(shape)} in the checkpoint, the config needs '
                       f'{list(spec.hf_shape)}')
    if dt not in READ_DTYPES:
      raise ValueError(f'tensor {name!r}: dtype {dt} not supported; checkpoints must be {" or ".join(READ_DTYPES)}')


def _assign(dst: np.ndarray, src: np.ndarray, block: int = 256) -> None:
  """dst[...] = src, exactly, where src is a strided (e.g. transposed) view and dst is C-contiguous.

  Copied in block x block tiles of the 2-D view [shape[0], rest] (a plain strided copy of a transposed matrix
  runs ~3x slower); bfloat16 is moved as uint16 bit patterns, and bf16 -> f32 is the 16-bit left shift."""
  bf16 = DTYPES['BF16']
  if src.dtype == bf16 and dst.dtype == bf16:
    dst, src = dst.view(np.uint16), src.view(np.uint16)
  if src.dtype == bf16 and dst.dtype == np.float32:
    op = lambda d, s: np.left_shift(s.view(np.uint16), 16, out=d.view(np.uint32), dtype=np.uint32)  # noqa: E731
  else:
    op = lambda d, s: np.copyto(d, s)  # noqa: E731
  if src.ndim < 2 or src.flags.c_contiguous or dst.size <= block * block:
    op(dst, src)
    return
  d2, s2 = dst.reshape(dst.shape[0], -1), src.reshape(src.shape[0], -1)
  for i in range(0, d2.shape[0], block):
    for j in range(0, d2.shape[1], block):
      op(d2[i:i + block, j:j + block], s2[i:i + block, j:j + block])


def _check_finite(x: np.ndarray, name: str, where) -> None:
  """Refuses a tensor holding NaN or Inf at load time, naming it and its file (else step 1 fails far away)."""
  if np.issubdtype(x.dtype, np.floating) or x.dtype == DTYPES['BF16']:
    finite = np.isfinite(x.astype(np.float32) if x.dtype == DTYPES['BF16'] else x)
    if not finite.all():
      bad = int(x.size - np.count_nonzero(finite))
      raise ValueError(f'tensor {name!r} in {where[name].path} holds {bad} NaN/Inf value(s): the checkpoint is '
                       'damaged (or was saved from a diverged run); refusing to load it')


def _leaf_callback(spec: hf_names.Spec, where, dtype):
  """index (tuple of slices into the full Flax leaf) -> that shard, read layer by layer."""
  def read(i):
    name = spec.hf_name(i)
    return hf_names.to_flax(spec, where[name].get(name))

  def cb(index):
    index = tuple(index) + (slice(None),) * (len(spec.full_flax_shape) - len(index))
    shape = tuple(len(range(n)[ix]) for n, ix in zip(spec.full_flax_shape, index))
    out = np.empty(shape, dtype)
    if not spec.layers:
      _assign(out, read(0)[index])
      _check_finite(out, spec.hf_name(0), where)
      return out
    for j, l in enumerate(range(spec.layers)[index[0]]):
      _assign(out[j], read(l)[index[1:]])
      _check_finite(out[j], spec.hf_name(l), where)
    return out
  return cb


def _make_array(shape, sharding, read_shard):
  """A global jax.Array on `sharding`, its shards read one distinct index at a time: each shard is read once, put
  on every addressable device that holds it, and dropped (host memory: one shard + one HF tensor)."""
  by_index: Dict[Tuple, List] = {}
  for dev, index in sharding.addressable_devices_indices_map(shape).items():
    key = tuple((s.start, s.stop, s.step) for s in index)
    by_index.setdefault(key, [index, []])[1].append(dev)
  arrays = []
  for index, devs in by_index.values():
    shard = read_shard(index)
    arrays += [jax.device_put(shard, d) for d in devs]
    del shard
  order = {d: i for i, d in enumerate(sharding.addressable_devices_indices_map(shape))}
  arrays.sort(key=lambda a: order[next(iter(a.devices()))])
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _set(tree: Dict, path: Tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: Tuple[str, ...]):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      raise KeyError(f'parameter {"/".join(path)} not found (at {key!r})')
    tree = tree[key]
  return tree


def model_shardings(cfg: ModelConfig, mesh, rules=None):
  """NamedShardings of every parameter of Qwen25VL(cfg), 'visual' included (sharding.DEFAULT_RULES by default)."""
  from ral_jax import sharding  # pylint: disable=import-outside-toplevel
  from ral_jax.models.vision_inputs import build_vision_inputs_batch  # pylint: disable=import-outside-toplevel
  m = cfg.vision.spatial_merge_size
  p = 4 * m * m
  pix = jax.numpy.zeros((1, p, cfg.vision.patch_dim), jax.numpy.float32)
  meta = build_vision_inputs_batch(np.array([[[1, 2 * m, 2 * m]]]), p, cfg.vision)
  rules = sharding.logical_rules() if rules is None else rules
  return sharding.model_param_shardings(cfg, mesh, rules, (pix, meta))[1]


def load_hf(ckpt_dir: str, shardings: Any = None, param_dtype: Optional[str] = None, *, mesh=None, rules=None,
            **cfg_overrides: Any) -> Tuple[ModelConfig, Dict[str, Any]]:
  """Reads an HF Qwen2.5-VL checkpoint directory into (cfg, params) (see the module docstring).

  Placement: `shardings` (a params-shaped pytree of jax Shardings), else `mesh` (+ logical `rules`) through
  `model_shardings`, else the first device."""
  cfg = read_config(ckpt_dir, **cfg_overrides)
  if param_dtype is not None:
    cfg = cfg.replace(param_dtype=str(np.dtype(param_dtype)))
  if shardings is None and mesh is not None:
    shardings = model_shardings(cfg, mesh, rules)
  where = _open_files(ckpt_dir)
  scheme = hf_names.detect_scheme(where)
  specs = hf_names.all_specs(cfg, scheme)
  check_tensors(specs, where, cfg.tie_word_embeddings)
  dtype = np.dtype(cfg.param_dtype)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params: Dict[str, Any] = {}
  for spec in specs:
    try:
      sharding = default if shardings is None else _get(shardings, spec.path)
    except KeyError as e:
      raise ValueError(f'shardings has no entry for parameter {"/".join(spec.path)}: build it for the whole model '
                       "('visual' included), e.g. with hf_io.model_shardings(cfg, mesh)") from e
    leaf = _make_array(spec.full_flax_shape, sharding, _leaf_callback(spec, where, dtype))
    _set(params, spec.path, leaf)
  return cfg, params


def _export_plan(params, cfg: ModelConfig, scheme: str, dtype) -> List[Tuple[str, Tuple[int, ...], str, Any]]:
  dt = dtype_name(dtype)
  plan = []
  for spec in hf_names.all_specs(cfg, scheme):
    leaf = _get(params, spec.path)
    if tuple(leaf.shape) != spec.full_flax_shape:
      raise ValueError(f'parameter {"/".join(spec.path)} has shape {tuple(leaf.shape)}, the config needs '
                       f'{spec.full_flax_shape}')
    for i in range(max(spec.layers, 1)):
      def produce(spec=spec, leaf=leaf, i=i):
        x = np.asarray(jax.device_get(leaf[i] if spec.layers else leaf))
        return hf_names.to_hf(spec, x).astype(DTYPES[dt], copy=False)
      plan.append((spec.hf_name(i), spec.hf_shape, dt, produce))
  return plan


def save_hf(params, cfg: ModelConfig, out_dir: str, dtype: Any = None, scheme: str = 'hub',
            max_shard_bytes: Optional[int] = None) -> List[str]:
  """Writes config.json and model.safetensors (or shards + index when the data exceeds max_shard_bytes).

  dtype: 'float32' | 'bfloat16' (default: the dtype of the embedding table). Returns the written file names."""
  if dtype is None:
    dtype = _get(params, ('model', 'embed_tokens', 'embedding')).dtype
  dtype = np.dtype(dtype)
  if dtype_name(dtype) not in READ_DTYPES:
    raise ValueError(f'export dtype {dtype}: choose float32 or bfloat16')
  plan = _export_plan(params, cfg, scheme, dtype)
  os.makedirs(out_dir, exist_ok=True)
  shards: List[List] = [[]]
  size = 0
  for item in plan:
    nbytes = dtype.itemsize * int(np.prod(item[1]))
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  meta = {'format': 'pt'}
  written = []
  if len(shards) == 1:
    write_safetensors(os.path.join(out_dir, SINGLE), shards[0], meta)
    written.append(SINGLE)
  else:
    weight_map, total = {}, 0
    for k, items in enumerate(shards):
      fn = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
      total += write_safetensors(os.path.join(out_dir, fn), items, meta)
      weight_map.update({name: fn for name, *_ in items})
      written.append(fn)
    with open(os.path.join(out_dir, INDEX), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2, sort_keys=True)
    written.append(INDEX)
  hf = cfg.to_hf()
  hf['torch_dtype'] = hf['dtype'] = 'bfloat16' if dtype_name(dtype) == 'BF16' else 'float32'
  tps = hf['vision_config']['tokens_per_second']
  if float(tps).is_integer():   # an int as in the hub configs (transformers 5.x rejects 2.0)
    hf['vision_config']['tokens_per_second'] = int(tps)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  written.append('config.json')
  return written
