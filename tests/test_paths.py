"""The workdir path layer (ral_jax.paths) on a non-local filesystem: fsspec's in-memory filesystem registered
under gs:// (etils.epath reaches it through its fsspec backend, as it reaches real GCS through gcsfs), made to
refuse appends like GCS. Metrics (JSONL + TensorBoard, truncation on resume), synthetic data (written once, then
read back by the data pipeline), the HF export and the checkpoint peek all go through it; nothing lands in a local
folder named 'gs:'."""
import json
import os

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from ral_jax import metrics as metrics_lib
from ral_jax import paths


class FakeGCS(MemoryFileSystem):
  """In-memory object store under gs:// and gcs://; like GCS it has no append."""
  protocol = ('gs', 'gcs')
  root_marker = ''

  def _open(self, path, mode='rb', **kw):
    if 'a' in mode:
      raise NotImplementedError('object stores have no append')
    return super()._open(path, mode, **kw)


@pytest.fixture()
def gcs(monkeypatch):
  import importlib
  from etils.epath import backend
  registry = importlib.import_module('fsspec.registry')
  before = {name: registry._registry.get(name) for name in ('gs', 'gcs')}
  for name in ('gs', 'gcs'):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setattr(FakeGCS, 'store', {})
  monkeypatch.setattr(FakeGCS, 'pseudo_dirs', [''])
  cwd = os.getcwd()
  yield 'gs://bucket/run'
  for name, cls in before.items():   # leave fsspec's registry as found
    if cls is None:
      registry._registry.pop(name, None)
    else:
      registry._registry[name] = cls
  backend.fsspec_backend._get_filesystem.cache_clear()
  assert not os.path.exists(os.path.join(cwd, 'gs:')), "a local folder named 'gs:' was written"


def test_basic_operations(gcs, tmp_path):
  p = paths.join(gcs, 'a', 'b.txt')
  assert p == 'gs://bucket/run/a/b.txt' and paths.is_remote(p) and not paths.is_remote(str(tmp_path))
  paths.makedirs(paths.dirname(p))
  paths.write_text(p, 'héllo')
  assert paths.read_text(p) == 'héllo' and paths.isfile(p) and paths.isdir(paths.join(gcs, 'a'))
  with pytest.raises(NotImplementedError):
    paths.open(p, 'a')
  paths.rename(paths.join(gcs, 'a'), paths.join(gcs, 'c'))
  assert not paths.exists(p) and paths.read_text(paths.join(gcs, 'c', 'b.txt')) == 'héllo'
  (tmp_path / 'x').mkdir()
  (tmp_path / 'x' / 'y.bin').write_bytes(b'\x00\x01')
  paths.upload_tree(str(tmp_path / 'x'), paths.join(gcs, 'up'))
  assert paths.read_bytes(paths.join(gcs, 'up', 'y.bin')) == b'\x00\x01'
  assert list(paths.walk_files(paths.join(gcs, 'up'))) == ['gs://bucket/run/up/y.bin']


def test_metrics_writer_jsonl_tensorboard_and_resume_truncation(gcs):
  w = metrics_lib.MetricsWriter(gcs, total_steps=4, enabled=True, progress=False, drop_after=0)
  for step in (1, 2, 3):
    w.write(step, {'loss': jnp.float32(step / 10)}, stage='sft')
  w.close()
  jsonl = paths.join(gcs, 'metrics.jsonl')
  assert [json.loads(l)['step'] for l in paths.read_text(jsonl).splitlines()] == [1, 2, 3]
  events = [f for f in paths.walk_files(paths.join(gcs, 'tb')) if 'tfevents' in f]
  assert events and len(paths.read_bytes(events[0])) > 0
  w = metrics_lib.MetricsWriter(gcs, total_steps=4, initial_step=2, enabled=True, progress=False, drop_after=2)
  w.write(3, {'loss': 0.5}, stage='sft')
  w.close()
  rows = [json.loads(l) for l in paths.read_text(jsonl).splitlines()]
  assert [(r['step'], r['loss']) for r in rows] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, 0.5)]


def test_synthetic_data_in_a_bucket_reads_back_like_local(gcs, tmp_path):
  from configs import common
  from ral_jax.data import pipeline
  from ral_jax.models.config import get_preset
  from ral_jax.train import config as rc
  from ral_jax.train import data as train_data
  c = common.get_config_for('image', 'tiny_sft')
  c.data.num_train, c.data.num_eval = 4, 2
  data = rc.build(c, 8).data
  remote = train_data.ensure_synthetic(data, gcs)
  local = train_data.ensure_synthetic(data, str(tmp_path))
  assert remote[0] == 'gs://bucket/run/synthetic/train.jsonl'
  assert paths.read_text(paths.join(gcs, 'synthetic', 'DONE')) == 'ok\n'
  assert paths.read_bytes(remote[0]) == open(local[0], 'rb').read()
  cfg = get_preset('tiny')

  def first_batch(manifest):
    dcfg = pipeline.synthetic_config([manifest], batch_size=4, num_epochs=1, prompt_buckets=(256,),
                                     patch_buckets=(64,), target_buckets=(64,))
    return next(iter(pipeline.make_pipeline(dcfg, cfg).dataset))

  a, b = first_batch(remote[0]), first_batch(local[0])
  assert list(a['id']) == list(b['id'])
  np.testing.assert_array_equal(a['pixel_values'], b['pixel_values'])
  np.testing.assert_array_equal(a['prompt_ids'], b['prompt_ids'])


def test_hf_export_and_checkpoint_peek_in_a_bucket(gcs, tmp_path):
  from ral_jax.data import tokenizer
  from _model_ref import random_params
  from ral_jax.models import hf_io
  from ral_jax.models.config import get_preset
  from ral_jax.train import checkpoint, loop
  cfg = get_preset('tiny')
  params = random_params(cfg, vision=True)
  out = paths.join(gcs, 'hf_export')
  loop.export_policy(params, cfg, tokenizer.EMBEDDED_DIR, out)
  names = paths.listdir(out)
  assert 'config.json' in names and 'model.safetensors' in names and 'tokenizer.json' in names
  for n in names:
    (tmp_path / n).write_bytes(paths.read_bytes(paths.join(out, n)))
  _, loaded = hf_io.load_hf(str(tmp_path))
  for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(params)), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(k))
  assert loop.already_done(3, 3, gcs, export_hf=True) and not loop.already_done(2, 3, gcs, export_hf=True)
  ck = paths.join(gcs, 'checkpoints')
  for step, items in ((4, ('state', 'meta', '_CHECKPOINT_METADATA')), (5, ('state',))):
    for item in items:
      paths.write_text(paths.join(ck, str(step), item, 'x') if item != '_CHECKPOINT_METADATA'
                       else paths.join(ck, str(step), item), '{}')
  assert checkpoint.newest_step(gcs) == 4, 'step 5 lacks its meta: not complete'
