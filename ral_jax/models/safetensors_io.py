"""Minimal safetensors reader / streaming writer on numpy memory maps (bfloat16 included, via ml_dtypes).

File layout (https://github.com/huggingface/safetensors, format spec): 8-byte little-endian header length N,
N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data
buffer (offsets relative to its start), little-endian, C order. Only this format is read: no pickle, ever.

The reader maps the file and returns zero-copy read-only views, so importing a tensor never holds more than the
slice that is being converted. The writer takes (name, shape, dtype, producer) and calls each producer once, in
order, after writing the header: one tensor in host memory at a time.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Dict, Iterable, List, Tuple

import ml_dtypes
import numpy as np

DTYPES: Dict[str, np.dtype] = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype) -> str:
  d = np.dtype(dtype)
  if d not in NAMES:
    raise ValueError(f'dtype {d} cannot be written to safetensors; use one of {sorted(NAMES.values())}')
  return NAMES[d]


class SafetensorsFile:
  """Read-only view of one .safetensors file: `.header[name] = (dtype_str, shape)`, `.get(name)` -> ndarray."""

  def __init__(self, path: str):
    self.path = path
    with open(path, 'rb') as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f'{path}: not a safetensors file (shorter than 8 bytes)')
      (n,) = struct.unpack('<Q', raw)
      size = os.fstat(f.fileno()).st_size
      if n > size - 8:
        raise ValueError(f'{path}: header length {n} exceeds the file size {size}: not a safetensors file')
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise ValueError(f'{path}: unreadable safetensors header ({e})') from e
    self.metadata = header.pop('__metadata__', None) or {}
    self._start = 8 + n
    self._entries = header
    self.header = {k: (v['dtype'], tuple(v['shape'])) for k, v in header.items()}
    self._check_extents(size - self._start)
    self._map = np.memmap(path, dtype=np.uint8, mode='r') if size > self._start else np.zeros(0, np.uint8)

  def _check_extents(self, data_bytes: int) -> None:
    """Every tensor's byte range lies inside the file (a truncated download fails here, naming the tensor)."""
    for name, e in self._entries.items():
      try:
        begin, end = (int(x) for x in e['data_offsets'])
      except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f'{self.path}: tensor {name!r} has no valid data_offsets in the header') from err
      if not 0 <= begin <= end or end > data_bytes:
        raise ValueError(f'{self.path}: tensor {name!r} needs bytes [{begin}, {end}) of the data buffer but the file '
                         f'holds only {data_bytes}: the file is truncated or damaged (download it again)')

  def keys(self) -> List[str]:
    return list(self._entries)

  def get(self, name: str) -> np.ndarray:
    e = self._entries[name]
    if e['dtype'] not in DTYPES:
      raise ValueError(f'tensor {name!r} in {self.path} has dtype {e["dtype"]}, which this reader does not know')
    dt = DTYPES[e['dtype']]
    begin, end = e['data_offsets']
    shape = tuple(e['shape'])
    if end - begin != dt.itemsize * int(np.prod(shape)):
      raise ValueError(f'tensor {name!r} in {self.path}: byte range {end - begin} does not match shape {shape} '
                       f'and dtype {e["dtype"]}')
    return self._map[self._start + begin:self._start + end].view(dt).reshape(shape)


def write_safetensors(path: str, tensors: Iterable[Tuple[str, Tuple[int, ...], str, Callable[[], np.ndarray]]],
                      metadata: Dict[str, str] | None = None) -> int:
  """Writes tensors (name, shape, dtype_str, producer) in the given order; returns the data byte count."""
  tensors = list(tensors)
  header, off = {}, 0
  for name, shape, dt, _ in tensors:
    nbytes = DTYPES[dt].itemsize * int(np.prod(shape))
    header[name] = {'dtype': dt, 'shape': list(shape), 'data_offsets': [off, off + nbytes]}
    off += nbytes
  if metadata is not None:
    header = {'__metadata__': dict(metadata), **header}
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for name, shape, dt, produce in tensors:
      x = np.ascontiguousarray(produce())
      if x.shape != tuple(shape) or x.dtype != DTYPES[dt]:
        raise ValueError(f'tensor {name!r}: producer gave {x.dtype}{list(x.shape)}, header says {dt}{list(shape)}')
      f.write(x.reshape(-1).view(np.uint8).data)   # no extra host copy
  os.replace(tmp, path)
  return off
