"""One path layer for every read and write of a run's workdir and data: local paths, and URLs such as
gs://bucket/dir (any scheme etils.epath knows), so that a multi-host run can keep its workdir in a bucket.

Local paths use plain `os` calls (atomic replace where it matters). Object stores have no append and no directory
rename, so:
  AppendFile        appends locally; on an object store keeps the content in memory and rewrites the object at
                    each flush (metrics.jsonl, TensorBoard event files)
  staged_dir(dst)   a local folder for tools that need real files (Pillow, PyAV, safetensors' memmap); uploaded
                    to `dst` on exit (heat maps, the HF export, synthetic data)
  open(path, 'rb')  file objects for readers that accept them (Pillow and PyAV do)
Real gs:// access needs epath's backend: `gcsfs` (fsspec) or TensorFlow's gfile; tests use an in-memory fsspec
filesystem registered under gs:// (tests/test_paths.py).
"""
from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import tempfile
from typing import Iterator, List


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def _ep(path):
  from etils import epath
  return epath.Path(os.fspath(path))


def join(base, *parts) -> str:
  if is_remote(base):
    return os.fspath(_ep(base).joinpath(*parts))
  return os.path.join(os.fspath(base), *parts)


def abspath(path) -> str:
  return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def dirname(path) -> str:
  return os.fspath(_ep(path).parent) if is_remote(path) else os.path.dirname(path)


def basename(path) -> str:
  return os.path.basename(os.fspath(path).rstrip('/'))


def isabs(path) -> bool:
  return is_remote(path) or os.path.isabs(path)


def exists(path) -> bool:
  return _ep(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  return _ep(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
  return _ep(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path) -> List[str]:
  return sorted(p.name for p in _ep(path).iterdir()) if is_remote(path) else sorted(os.listdir(path))


def makedirs(path) -> None:
  if is_remote(path):
    _ep(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def open(path, mode: str = 'r', **kw):  # noqa: A001 - the builtin's counterpart
  if is_remote(path):
    return _ep(path).open(mode, **kw)
  return builtins.open(path, mode, **kw)


def read_bytes(path) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def read_text(path) -> str:
  return read_bytes(path).decode('utf-8')


def write_bytes(path, data: bytes) -> None:
  """Whole-file write; atomic on local disks (tmp + replace), a single object put on object stores."""
  if is_remote(path):
    _ep(path).write_bytes(data)
    return
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def walk_files(path) -> Iterator[str]:
  """Every file below `path` (full paths)."""
  if is_remote(path):
    for root, _, files in _ep(path).walk():
      for f in files:
        yield os.fspath(root / f)
    return
  for root, _, files in os.walk(path):
    for f in files:
      yield os.path.join(root, f)


def rmtree(path) -> None:
  if is_remote(path):
    _ep(path).rmtree(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def rename(src, dst) -> None:
  """Moves a file or folder; on object stores, copies every object then deletes the source."""
  if not is_remote(src) and not is_remote(dst):
    os.rename(src, dst)
    return
  if not isdir(src):
    write_bytes(dst, read_bytes(src))
    _ep(src).unlink()
    return
  n = len(os.fspath(src).rstrip('/')) + 1
  for f in list(walk_files(src)):
    target = join(dst, f[n:])
    makedirs(dirname(target))
    write_bytes(target, read_bytes(f))
  rmtree(src)


def upload_tree(local_dir: str, dst) -> None:
  """Copies the files of a local folder to `dst` (any path), keeping the layout."""
  for f in walk_files(local_dir):
    rel = os.path.relpath(f, local_dir)
    target = join(dst, *rel.split(os.sep))
    makedirs(dirname(target))
    with builtins.open(f, 'rb') as src:
      write_bytes(target, src.read())


@contextlib.contextmanager
def staged_dir(dst):
  """A local folder whose files end up in `dst`: `dst` itself when local, else a temporary folder uploaded on a
  clean exit (nothing is uploaded when the block raises)."""
  if not is_remote(dst):
    makedirs(dst)
    yield os.fspath(dst)
    return
  tmp = tempfile.mkdtemp(prefix='ral_jax_stage_')
  try:
    yield tmp
    upload_tree(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


class AppendFile:
  """A text file opened for appending (see the module docstring for object stores)."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self.remote = is_remote(path)
    if self.remote:
      self._text = read_text(path) if exists(path) else ''
      self._dirty = False
    else:
      self._f = builtins.open(path, 'a', encoding='utf-8')

  def write(self, text: str) -> None:
    if self.remote:
      self._text += text
      self._dirty = True
    else:
      self._f.write(text)

  def flush(self) -> None:
    if self.remote:
      if self._dirty:
        write_text(self.path, self._text)
        self._dirty = False
    else:
      self._f.flush()

  def close(self) -> None:
    self.flush()
    if not self.remote:
      self._f.close()


class _RemoteEventWriter:
  """tensorboardX record writer for object stores through this layer (whole object rewritten at each flush)."""

  def __init__(self, path):
    self.path, self.buffer = path, bytearray()

  def write(self, data: bytes) -> None:
    self.buffer += data

  def flush(self) -> None:
    write_bytes(self.path, bytes(self.buffer))

  def close(self) -> None:
    self.flush()


class _RemoteEventWriterFactory:
  def open(self, path):
    return _RemoteEventWriter(path)

  def directory_check(self, path):
    makedirs(path)


def register_tensorboard(schemes=('gs',)) -> None:
  """Routes tensorboardX event files under these URL schemes through this layer (tensorboardX's own gs:// writer
  needs google-cloud-storage)."""
  from tensorboardX import record_writer
  for s in schemes:
    record_writer.register_writer_factory(s, _RemoteEventWriterFactory())
