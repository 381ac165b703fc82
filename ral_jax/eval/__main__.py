"""`python -m ral_jax.eval --config=configs/video.py:paper --checkpoint=WORKDIR --bench=NAME:ANNOTATION[:MEDIA_ROOT]`

Evaluates a model on one or more benchmarks (greedy decoding, the rewards' answer extraction and scoring) and
writes <outdir>/results.json, results.md (the paper's table layout plus per-category tables),
predictions_<bench>.jsonl and heatmaps/<bench>_ex<b>_*.png (attention over the first examples' pixels).

  --bench     repeatable; NAME is one of ral_jax.eval.adapters.benchmarks() (vstar, mmmu_pro, mme, muirbench,
              chartqa, vizwiz, blink, cvbench, longvideobench, nextqa, videomme, videommmu, lvbench, mvbench,
              tempcompass, video_r1); ANNOTATION is the local annotation file or directory; MEDIA_ROOT defaults to
              the annotation's directory. The same NAME given twice (cvbench test_2d + test_3d) is one benchmark.
              Unknown names are refused before the model is built.
  --cache_dir where media embedded in parquet files and cut clips are written (default <outdir>/media_cache);
              the dataset folder may be read-only.
  --checkpoint  a ral_jax run directory (its latest checkpoint); empty = the config's model
              (--config.model.hf_checkpoint=DIR, or a random init for smoke tests).
Example: python -m ral_jax.eval --config=configs/video.py:paper --config.model.hf_checkpoint=/ckpt/Qwen2.5-VL-7B \
           --bench=videomme:/data/videomme/test.jsonl:/data/videomme --outdir=/tmp/eval_base --method=Qwen2.5-VL-7B
"""
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file with get_config(arg), e.g. configs/video.py')
flags.DEFINE_string('checkpoint', '', 'ral_jax workdir whose latest checkpoint is evaluated ("" = config model)')
flags.DEFINE_multi_string('bench', [], 'NAME:ANNOTATION[:MEDIA_ROOT], repeatable')
flags.DEFINE_string('outdir', './eval_out', 'where results, predictions and heat maps go')
flags.DEFINE_integer('batch_size', 0, 'global eval batch (0 = config train.eval_batch)')
flags.DEFINE_integer('limit', 0, 'evaluate at most this many records per benchmark (0 = all)')
flags.DEFINE_integer('heatmaps', 2, 'attention heat maps for this many examples of the first batch (0 = none)')
flags.DEFINE_string('method', 'this run', 'row label in the paper-layout table')
flags.DEFINE_float('max_bad_fraction', 0.5, 'stop when more than this fraction of a benchmark\'s records is bad')
flags.DEFINE_bool('greedy', True, 'greedy decoding; --nogreedy samples with --config.sampling.* instead')
flags.DEFINE_string('cache_dir', '', 'embedded media and cut clips go here ("" = <outdir>/media_cache)')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/video.py')
  if not FLAGS.bench:
    raise app.UsageError('give at least one --bench=NAME:ANNOTATION[:MEDIA_ROOT]')
  from ral_jax.eval import run
  try:
    specs = [run.parse_bench(b) for b in FLAGS.bench]
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  from ral_jax.eval import adapters
  unknown = sorted({name for name, _, _ in specs if name not in adapters.benchmarks()})
  if unknown:
    raise app.UsageError(f'unknown --bench name(s) {unknown}; choose from {adapters.benchmarks()}')
  run.evaluate(_CONFIG.value, specs, FLAGS.outdir, FLAGS.checkpoint,
               FLAGS.batch_size, FLAGS.limit or None, FLAGS.heatmaps, FLAGS.method, FLAGS.max_bad_fraction,
               FLAGS.greedy, FLAGS.cache_dir)


if __name__ == '__main__':
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  app.run(main)
