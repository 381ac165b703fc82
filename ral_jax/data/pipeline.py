"""The Grain input pipeline: manifests -> shuffled, sharded, processed, bucketed batches.

  records (main process, parsed once) -> MapDataset.source -> shuffle(seed) -> repeat(num_epochs; reshuffled
    each epoch) -> host rows (HostRows) -> map(features.ExampleProcessor: media, patches, prompt, tokens,
    positions) -> to_iter_dataset (read_threads) -> mp_prefetch(num_workers; skipped when 0)
    -> filter(bad records: counted + logged in the main process) -> batch(batch_size, collate.Collator)
Sharding is by global batch: every host shuffles the whole record list with the same seed; global batch j is
elements [j*B, (j+1)*B) of that stream (B = batch_size * shard_count) and host i reads its rows
[i*batch_size, (i+1)*batch_size) of it, which is where jax.make_array_from_process_local_data puts host i's rows.
So the shards are disjoint and together complete, and the global batches are those of one host reading everything:
a run gives the same batches on any number of hosts (as long as no record is bad; a bad record is replaced by the
host's next one). The iterator's get_state()/set_state() (grain DatasetIterator) restores the exact position; the
bad-input counts are metrics only and are not part of that state. A record is skipped, never truncated; see
badinput.py for the reasons and the bad-fraction limit.

Use:
  data = make_pipeline(DataConfig(manifests=('train.jsonl',), ...), model_cfg)
  it = iter(data.dataset); batch = next(it); state = it.get_state(); ...; it.set_state(state)
  data.counter.metrics()  -> {'data/records', 'data/seen', 'data/bad', 'data/bad_fraction', 'data/bad/<reason>'}
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import grain

from ral_jax.data.badinput import BadInputCounter, BadRecord, DataError
from ral_jax.data.collate import Collator
from ral_jax.data.features import ExampleProcessor
from ral_jax.data.media import VideoConfig
from ral_jax.data.processor import ProcessorConfig
from ral_jax.data.prompts import PromptConfig
from ral_jax.data.records import load_manifests


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything the data pipeline needs. Lengths are buckets: each batch is padded to the smallest bucket that
  holds its longest example; an example beyond the largest bucket is skipped as over budget."""
  manifests: Tuple[str, ...] = ()
  data_root: Optional[str] = None            # media paths relative to this (default: each manifest's directory)
  tokenizer: str = 'embedded'                # 'embedded' or a local HF tokenizer / checkpoint directory
  prompt: PromptConfig = PromptConfig()
  processor: ProcessorConfig = ProcessorConfig()
  video: VideoConfig = VideoConfig()
  batch_size: int = 8                        # per host
  prompt_buckets: Tuple[int, ...] = (512, 1024, 2048, 4096)
  patch_buckets: Tuple[int, ...] = (1024, 4096, 8192, 20480)
  target_buckets: Tuple[int, ...] = (256, 512, 1024, 2048)
  max_media: int = 1                          # M: media items per example
  with_targets: bool = False                 # SFT: emit target_ids/target_mask; records without target are bad
  full_chunk: Optional[int] = None           # vision_inputs full-attention chunk (None: P)
  seed: int = 0
  num_epochs: Optional[int] = None           # None: repeat forever
  shard_index: int = 0                       # usually jax.process_index()
  shard_count: int = 1                       # usually jax.process_count()
  num_workers: int = 0                       # grain worker processes (0: in-process; tests)
  read_threads: int = 2                      # threads per process applying the map
  worker_buffer_size: int = 2
  max_bad_fraction: float = 0.1
  bad_min_records: int = 32                  # records of a file seen before the bad fraction is enforced
  drop_remainder: bool = True

  def __post_init__(self):
    if not 0 <= self.shard_index < self.shard_count:
      raise ValueError(f'shard_index {self.shard_index} must be in [0, shard_count={self.shard_count})')
    if self.batch_size < 1 or self.max_media < 1 or self.num_workers < 0 or self.read_threads < 1:
      raise ValueError('batch_size, max_media, read_threads must be >= 1 and num_workers >= 0')
    for name in ('prompt_buckets', 'patch_buckets', 'target_buckets'):
      if not getattr(self, name) or min(getattr(self, name)) < 1:
        raise ValueError(f'{name} must be a non-empty tuple of positive lengths')


def synthetic_config(manifests, **overrides) -> DataConfig:
  """The embedded default's data settings (synthetic tasks, tiny model): 112 px images (64 patches), 8-frame
  56 px videos at 2 fps (64 patches), short buckets, SFT targets on."""
  kw = dict(manifests=tuple(manifests), batch_size=8, prompt_buckets=(192, 256), patch_buckets=(64, 128),
            target_buckets=(48, 64), with_targets=True,
            processor=ProcessorConfig(image_min_pixels=56 * 56, image_max_pixels=112 * 112,
                                      video_min_pixels=28 * 28, video_max_pixels=56 * 56),
            video=VideoConfig(fps=2.0, max_frames=8, min_frames=4))
  kw.update(overrides)
  return DataConfig(**kw)


@dataclasses.dataclass
class Pipeline:
  dataset: object             # grain IterDataset of batches; iter() it for a checkpointable iterator
  counter: BadInputCounter    # bad-input counts for metrics
  num_records: int            # good records after manifest parsing (this host's shard)


def host_rows_count(total: int, rows: int, hosts: int, index: int) -> int:
  """Elements of a `total`-element stream that host `index` reads (HostRows)."""
  full, rem = divmod(total, rows * hosts)
  return full * rows + max(0, min(rows, rem - index * rows))


class HostRows(grain.MapDataset):
  """Host `index`'s rows of each global batch of `rows * hosts` elements: its element k is element
  (k // rows) * rows * hosts + index * rows + k % rows of the parent."""

  def __init__(self, parent, rows: int, hosts: int, index: int):
    super().__init__(parent)
    self._rows, self._hosts, self._index = rows, hosts, index
    self._len = host_rows_count(len(parent), rows, hosts, index)

  def __len__(self) -> int:
    return self._len

  def _parent_index(self, k: int) -> int:
    batch, row = divmod(k, self._rows)
    return batch * self._rows * self._hosts + self._index * self._rows + row

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    return self._parents[0][self._parent_index(k)]

  def __str__(self) -> str:
    return f'HostRows(rows={self._rows}, hosts={self._hosts}, index={self._index})'


class _SkipBad:
  """Main-process filter: counts good/bad elements (and enforces the bad fraction), drops bad ones."""

  def __init__(self, counter: BadInputCounter):
    self.counter = counter

  def __call__(self, x) -> bool:
    if 'bad_reason' in x:
      self.counter.bad(BadRecord(x['bad_reason'], x['bad_detail'], x['id'], x['source']))
      return False
    self.counter.good(x['source'])
    return True


class _CheckedCollator:
  """A batch that cannot be collated stops the run naming its records and files (a batch-level failure: the
  per-record checks upstream passed)."""

  def __init__(self, collate):
    self.collate = collate

  def __call__(self, items):
    try:
      return self.collate(items)
    except Exception as e:  # noqa: BLE001
      where = sorted({f"{x.get('source', '?')}" for x in items})
      ids = [str(x.get('id', '?')) for x in items][:8]
      raise DataError(f'cannot collate a batch of records {ids} from {where}: {type(e).__name__}: {e}') from e


def make_pipeline(dcfg: DataConfig, mcfg, counter: Optional[BadInputCounter] = None) -> Pipeline:
  """The pipeline for one host. mcfg: models.config.ModelConfig (token ids and vision geometry). `counter`: a
  BadInputCounter shared with other pipelines of the same run (files read by several are counted once per line)."""
  import grain
  from ral_jax.data import tokenizer as tokenizer_lib
  if not dcfg.manifests:
    raise ValueError('DataConfig.manifests is empty: give at least one .json / .jsonl manifest')
  if (dcfg.processor.patch_size, dcfg.processor.merge_size, dcfg.processor.temporal_patch_size) != (
      mcfg.vision.patch_size, mcfg.vision.spatial_merge_size, mcfg.vision.temporal_patch_size):
    raise ValueError('DataConfig.processor patch geometry differs from the model vision config: build it with '
                     'ProcessorConfig.from_vision(model_cfg.vision, ...)')
  tok = tokenizer_lib.load_tokenizer(dcfg.tokenizer)
  ids = tokenizer_lib.check_matches_model(tok, mcfg)
  counter = counter or BadInputCounter(dcfg.max_bad_fraction, dcfg.bad_min_records)
  records = load_manifests(dcfg.manifests, counter, dcfg.data_root)
  ds = grain.MapDataset.source(records).shuffle(seed=dcfg.seed)
  n = host_rows_count(len(records), dcfg.batch_size, dcfg.shard_count, dcfg.shard_index)
  if n == 0:
    raise ValueError(f'shard {dcfg.shard_index} of {dcfg.shard_count} is empty: {len(records)} records are too '
                     'few for this many hosts')
  ds = ds.repeat(dcfg.num_epochs)
  ds = HostRows(ds, dcfg.batch_size, dcfg.shard_count, dcfg.shard_index) if dcfg.shard_count > 1 else ds
  ds = ds.map(ExampleProcessor(dcfg, mcfg, tokenizer_lib.text_encoder(tok)))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=dcfg.read_threads, prefetch_buffer_size=2 * dcfg.batch_size))
  if dcfg.num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's worker code reads its absl flags; outside absl.app nobody parsed them
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=dcfg.num_workers,
                                                     per_worker_buffer_size=dcfg.worker_buffer_size))
  it = it.filter(_SkipBad(counter))
  collate = Collator(ids.pad, dcfg.prompt_buckets, dcfg.patch_buckets, dcfg.target_buckets, dcfg.max_media,
                     mcfg.vision, dcfg.full_chunk)
  it = it.batch(dcfg.batch_size, drop_remainder=dcfg.drop_remainder, batch_fn=_CheckedCollator(collate))
  return Pipeline(it, counter, n)
