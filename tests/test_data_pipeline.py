"""End to end: synthetic -> manifest -> Grain pipeline -> batch; state restore; sharding; both manifest formats."""
import json

import numpy as np
import pytest

from ral_jax.data import media, pipeline, processor, prompts, synthetic, tokenizer
from ral_jax.models.config import get_preset
from ral_jax.models.positions import rope_index_batch

CFG = get_preset('tiny')


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
  out = tmp_path_factory.mktemp('synth')
  synthetic.main(['--out', str(out), '--num-train', '15', '--num-heldout', '5', '--seed', '1'])
  return out


@pytest.fixture(scope='module')
def tok():
  return tokenizer.load_tokenizer()


def _cfg(synth, name='train.jsonl', **kw):
  kw.setdefault('batch_size', 3)
  return pipeline.synthetic_config([str(synth / name)], **kw)


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _rows(synth, name='train.jsonl'):
  return {r['id']: r for r in map(json.loads, open(synth / name))}


def test_batch_shapes_and_tokens(synth, tok):
  pipe = pipeline.make_pipeline(_cfg(synth), CFG)
  batch = _take(pipe.dataset, 2)[1]
  b, tp = batch['prompt_ids'].shape
  assert b == 3 and tp in (192, 256)
  assert batch['positions'].shape == (3, b, tp) and batch['positions'].dtype == np.int32
  assert batch['pixel_values'].shape == (b, 64, 1176) and batch['pixel_values'].dtype == np.float32
  assert batch['grid_thw'].shape == (b, 1, 3) and batch['media_kind'].shape == (b, 1)
  assert batch['target_ids'].shape[1] in (48, 64)
  assert batch['vision_meta']['valid'].shape == (b, 64)
  rows = _rows(synth)
  for i in range(b):
    row = rows[str(batch['id'][i])]
    mask = batch['prompt_mask'][i].astype(bool)
    assert not mask[:np.argmax(mask)].any() and mask[np.argmax(mask):].all()   # left padded
    ids = batch['prompt_ids'][i][mask]
    assert (batch['prompt_ids'][i][~mask] == tok.pad_token_id).all()
    # Reference: HF's string expansion ('<|image_pad|>' * n) of the hand-written chat text, then tokenise.
    t, h, w = batch['grid_thw'][i, 0]
    pad = '<|image_pad|>' if 'images' in row else '<|video_pad|>'
    opts = ''.join(f'\n{l}. {o}' for l, o in zip('ABCD', row['options']))
    kind = 'multiple choice' if row['options'] else 'numerical'
    text = (f'<|im_start|>system\n{prompts.THINK_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>'
            + pad * int(t * h * w // 4) + '<|vision_end|>' + row['question']
            + (f'\nOptions:{opts}' if opts else '') + prompts.TYPE_INSTRUCTIONS[kind]
            + '<|im_end|>\n<|im_start|>assistant\n')
    np.testing.assert_array_equal(ids, tok(text)['input_ids'])
    tmask = batch['target_mask'][i].astype(bool)
    assert tmask[:tmask.sum()].all()  # right padded
    target = batch['target_ids'][i][tmask]
    assert target[-1] == tok.convert_tokens_to_ids('<|im_end|>')
    assert tok.decode(target[:-1]) == row['target']
    assert batch['answer'][i] == row['answer'] and json.loads(batch['options'][i]) == row['options']
    # Pixels: the processor on the file, zero beyond.
    path = synth / (row['images'][0] if 'images' in row else row['video'])
    if 'images' in row:
      want, grid = processor.process_image(media.load_image(str(path)), pipe_processor(synth))
      assert batch['second_per_grid_t'][i, 0] == 0 and batch['media_kind'][i, 0] == 1
    else:
      frames, fps = media.load_video(str(path), _cfg(synth).video)
      want, grid = processor.process_video(frames, pipe_processor(synth))
      assert batch['second_per_grid_t'][i, 0] == pytest.approx(2 / fps) and batch['media_kind'][i, 0] == 2
    assert tuple(batch['grid_thw'][i, 0]) == grid
    np.testing.assert_array_equal(batch['pixel_values'][i, :len(want)], want)
    assert not batch['pixel_values'][i, len(want):].any()
  # Positions: the rope index of the padded batch (pads -> 1) equals the per-example index left-padded.
  ref = rope_index_batch(batch['prompt_ids'], batch['prompt_mask'], batch['grid_thw'], batch['media_kind'],
                         batch['second_per_grid_t'], CFG)
  np.testing.assert_array_equal(batch['positions'], ref)


def pipe_processor(synth):
  return _cfg(synth).processor


def test_state_restore_gives_identical_batches(synth):
  pipe = pipeline.make_pipeline(_cfg(synth, batch_size=2), CFG)
  it = iter(pipe.dataset)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]   # crosses the epoch boundary (15 records, batch 2)
  it2 = iter(pipeline.make_pipeline(_cfg(synth, batch_size=2), CFG).dataset)
  it2.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
  got = [next(it2) for _ in range(4)]
  for a, b in zip(want, got):
    assert list(a['id']) == list(b['id'])
    np.testing.assert_array_equal(a['prompt_ids'], b['prompt_ids'])
    np.testing.assert_array_equal(a['pixel_values'], b['pixel_values'])


def _all_ids(synth, **kw):
  ds = pipeline.make_pipeline(_cfg(synth, batch_size=1, num_epochs=1, drop_remainder=False, **kw), CFG).dataset
  return [str(b['id'][0]) for b in ds]


def test_sharding_disjoint_and_complete(synth):
  shards = [_all_ids(synth, shard_index=i, shard_count=3) for i in range(3)]
  flat = [x for s in shards for x in s]
  assert len(flat) == len(set(flat)) == 15 and set(flat) == set(_rows(synth))
  assert all(len(s) == 5 for s in shards)


def test_shuffle_by_seed_and_per_epoch(synth):
  a, b, c = _all_ids(synth, seed=3), _all_ids(synth, seed=3), _all_ids(synth, seed=4)
  assert a == b and a != c and sorted(a) == sorted(c)
  ds = pipeline.make_pipeline(_cfg(synth, batch_size=1, num_epochs=2, seed=3), CFG).dataset
  ids = [str(x['id'][0]) for x in ds]
  assert ids[:15] == a and sorted(ids[15:]) == sorted(a) and ids[15:] != a


def test_video_r1_json_gives_same_examples(synth):
  """The same records through the Video-R1 JSON loader: same prompt tokens, pixels, targets and answers."""
  a = _take(pipeline.make_pipeline(_cfg(synth), CFG).dataset, 2)
  b = _take(pipeline.make_pipeline(_cfg(synth, 'train_video_r1.json'), CFG).dataset, 2)
  for x, y in zip(a, b):
    assert list(x['id']) == list(y['id']) and list(x['answer']) == list(y['answer'])
    for k in ('prompt_ids', 'positions', 'pixel_values', 'target_ids', 'grid_thw', 'second_per_grid_t'):
      np.testing.assert_array_equal(x[k], y[k])


def test_answer_only_style_strips_think(synth, tok):
  cfg = _cfg(synth, prompt=prompts.PromptConfig(style='answer_only'))
  batch = _take(pipeline.make_pipeline(cfg, CFG).dataset, 1)[0]
  rows = _rows(synth)
  for i in range(3):
    target = batch['target_ids'][i][batch['target_mask'][i].astype(bool)]
    assert tok.decode(target) == f"<answer>{rows[str(batch['id'][i])]['answer']}</answer><|im_end|>"
    assert prompts.ANSWER_ONLY_SYSTEM_PROMPT in tok.decode(batch['prompt_ids'][i])


def test_worker_processes_match_in_process_and_restore(synth):
  """num_workers=1: same batches as in-process, and get_state/set_state resumes exactly across processes."""
  a = _take(pipeline.make_pipeline(_cfg(synth), CFG).dataset, 4)
  cfg = _cfg(synth, num_workers=1)
  it = iter(pipeline.make_pipeline(cfg, CFG).dataset)
  try:
    b = [next(it) for _ in range(2)]
    state = it.get_state()
  finally:
    it.close()
  it = iter(pipeline.make_pipeline(cfg, CFG).dataset)
  try:
    it.set_state(state)
    b += [next(it) for _ in range(2)]
  finally:
    it.close()
  for x, y in zip(a, b):
    assert list(x['id']) == list(y['id'])
    np.testing.assert_array_equal(x['pixel_values'], y['pixel_values'])


def test_rl_mode_multi_media_and_text_only(synth, tok):
  """with_targets off (RL prompts): no target keys; two media in one record, and a text-only record."""
  rows = list(_rows(synth).values())
  img = next(r for r in rows if 'images' in r)
  vid = next(r for r in rows if 'video' in r)
  two = dict(img, id='two', video=vid['video'])
  text = {k: v for k, v in img.items() if k not in ('images', 'evidence')}  # evidence would name a missing image
  text['id'] = 'text'
  path = synth / 'multi.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in (two, text)) + '\n')
  cfg = _cfg(synth, 'multi.jsonl', batch_size=2, with_targets=False, max_media=2, num_epochs=1, seed=0,
             patch_buckets=(64, 128))
  batch = _take(pipeline.make_pipeline(cfg, CFG).dataset, 1)[0]
  assert 'target_ids' not in batch and 'target_mask' not in batch
  assert batch['grid_thw'].shape == (2, 2, 3) and batch['pixel_values'].shape == (2, 128, 1176)
  i, j = list(batch['id']).index('two'), list(batch['id']).index('text')
  np.testing.assert_array_equal(batch['media_kind'][i], [1, 2])
  np.testing.assert_array_equal(batch['media_kind'][j], [0, 0])
  ids = batch['prompt_ids'][i]
  assert (ids == 1021).sum() == 16 and (ids == 1022).sum() == 16
  assert (batch['prompt_ids'][j] == 1021).sum() == 0 and not batch['pixel_values'][j].any()
  assert batch['vision_meta']['valid'][i].sum() == 128 and batch['vision_meta']['valid'][j].sum() == 0
  ref = rope_index_batch(batch['prompt_ids'], batch['prompt_mask'], batch['grid_thw'], batch['media_kind'],
                         batch['second_per_grid_t'], CFG)
  np.testing.assert_array_equal(batch['positions'], ref)
