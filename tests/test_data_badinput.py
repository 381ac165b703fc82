"""Every bad-input kind is skipped and counted (logged once per kind); empty manifests and too many bad records
stop with an error naming the file."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from _media_fixtures import write_audio_only
from ral_jax.data import pipeline, processor, records, synthetic
from ral_jax.data.badinput import BadInputCounter, DataError
from ral_jax.models.config import get_preset

CFG = get_preset('tiny')


def _write_jsonl(path, lines):
  path.write_text('\n'.join(l if isinstance(l, str) else json.dumps(l) for l in lines) + '\n')
  return str(path)


@pytest.fixture()
def messy(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(tmp_path / 'ok.png')
  Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(tmp_path / 'big.png')
  Image.fromarray(rng.integers(0, 256, (1, 300, 3), dtype=np.uint8)).save(tmp_path / 'sliver.png')
  (tmp_path / 'corrupt.png').write_bytes(rng.bytes(500))
  write_audio_only(tmp_path / 'audio.mp4')
  base = {'question': 'What colour?', 'options': ['red', 'green'], 'answer': 'A',
          'target': '<think>red</think><answer>A</answer>', 'images': ['ok.png']}
  lines = [
      dict(base, id='good1'), dict(base, id='good2'),
      '{"id": "broken json', '[1, 2]', {k: v for k, v in dict(base, id='noq').items() if k != 'question'},
      {k: v for k, v in dict(base, id='noans').items() if k != 'answer'},
      {k: v for k, v in dict(base, id='notarget').items() if k != 'target'},
      dict(base, id='missing', images=['nope.png']),
      dict(base, id='corrupt', images=['corrupt.png']),
      dict({k: v for k, v in base.items() if k != 'images'}, id='audio', video='audio.mp4'),
      dict(base, id='longq', question='word ' * 400),
      dict(base, id='bigimg', images=['big.png']),
      dict(base, id='sliver', images=['sliver.png']),
      dict(base, id='longtarget', target='<think>' + 'red ' * 200 + '</think><answer>A</answer>'),
  ]
  return _write_jsonl(tmp_path / 'messy.jsonl', lines)


def _cfg(manifest, **kw):
  kw = dict(dict(batch_size=1, num_epochs=1, drop_remainder=False, max_bad_fraction=1.0,
                 processor=processor.ProcessorConfig(image_min_pixels=56 * 56, image_max_pixels=224 * 224,
                                                     video_min_pixels=28 * 28, video_max_pixels=56 * 56),
                 patch_buckets=(64,)), **kw)
  return pipeline.synthetic_config([manifest], **kw)


def test_every_bad_kind_is_skipped_counted_and_logged_once(messy, caplog):
  with caplog.at_level(logging.WARNING):
    pipe = pipeline.make_pipeline(_cfg(messy), CFG)
    ids = sorted(str(b['id'][0]) for b in pipe.dataset)
  assert ids == ['good1', 'good2']
  m = pipe.counter.metrics()
  assert m['data/bad/malformed_record'] == 3
  for reason in ('missing_answer', 'missing_target', 'missing_media', 'corrupt_media', 'unsupported_media',
                 'zero_frames',
                 'prompt_over_budget', 'media_over_budget', 'target_over_budget'):
    assert m[f'data/bad/{reason}'] == 1, reason
  assert m['data/records'] == 14 and m['data/seen'] == 10 and m['data/bad'] == 12
  assert m['data/bad_fraction'] == pytest.approx(8 / 10)
  logged = [r.getMessage() for r in caplog.records if 'skipping bad record' in r.getMessage()]
  assert len(logged) == 10  # one per reason, not one per record
  assert any('messy.jsonl' in msg for msg in logged)


def test_too_many_bad_records_at_parse_time_names_file(tmp_path):
  path = _write_jsonl(tmp_path / 'bad.jsonl', ['{oops', '{"question": "q"}', '[]',
                                               {'id': 'a', 'question': 'q', 'answer': 'A'}])
  with pytest.raises(DataError, match='bad.jsonl'):
    records.load_manifest(path, BadInputCounter(max_bad_fraction=0.5))


def test_too_many_bad_records_while_iterating_names_file(tmp_path):
  rows = [{'id': f'r{i}', 'question': 'q', 'answer': 'A', 'target': '<answer>A</answer>',
           'images': [f'missing{i}.png']} for i in range(8)]
  path = _write_jsonl(tmp_path / 'lost_media.jsonl', rows)
  pipe = pipeline.make_pipeline(_cfg(path, max_bad_fraction=0.25, bad_min_records=4), CFG)
  with pytest.raises(DataError, match='lost_media.jsonl'):
    list(pipe.dataset)


@pytest.mark.parametrize('name,text', [('empty.jsonl', ''), ('blank.jsonl', '\n\n'), ('empty.json', '[]')])
def test_empty_manifest_names_file(tmp_path, name, text):
  (tmp_path / name).write_text(text)
  with pytest.raises(DataError, match=name):
    pipeline.make_pipeline(_cfg(str(tmp_path / name)), CFG)


def test_unknown_format_and_missing_file(tmp_path):
  (tmp_path / 'x.csv').write_text('a,b')
  with pytest.raises(DataError, match='x.csv'):
    records.load_manifest(str(tmp_path / 'x.csv'), BadInputCounter())
  with pytest.raises(DataError, match='nothere.jsonl'):
    records.load_manifest(str(tmp_path / 'nothere.jsonl'), BadInputCounter())


def test_video_r1_record_parsing(tmp_path):
  recs = [{'problem_id': 7, 'problem': 'How many?', 'data_type': 'video', 'problem_type': 'numerical',
           'options': [], 'process': '<think>count</think>', 'solution': '<answer> 3 </answer>',
           'path': './v/a.mp4', 'data_source': 'x'},
          {'problem_id': 8, 'problem': 'Which?', 'data_type': 'image', 'problem_type': 'multiple choice',
           'options': ['A. cat', 'B. dog'], 'solution': 'no tags', 'path': 'b.png'}]
  (tmp_path / 'vr1.json').write_text(json.dumps(recs))
  counter = BadInputCounter(max_bad_fraction=1.0)
  out = records.load_manifest(str(tmp_path / 'vr1.json'), counter, data_root='/data')
  assert len(out) == 1 and counter.by_reason == {'missing_answer': 1}
  ex = out[0]
  assert (ex.id, ex.answer, ex.problem_type, ex.media) == ('7', '3', 'numerical', (('video', '/data/v/a.mp4'),))
  assert ex.target == '<think>count</think><answer> 3 </answer>'


def test_synthetic_manifests_are_clean(tmp_path):
  synthetic.main(['--out', str(tmp_path), '--num-train', '5', '--num-heldout', '5'])
  counter = BadInputCounter()
  assert len(records.load_manifests([str(tmp_path / 'train.jsonl'), str(tmp_path / 'heldout.jsonl')],
                                    counter)) == 10
  assert counter.metrics()['data/bad'] == 0 and counter.metrics()['data/records'] == 10
