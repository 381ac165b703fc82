"""Real-world bad input that used to crash a run mid-way or pass silently: a lone surrogate in a question, a
decompression-bomb PNG, raw non-UTF-8 bytes in a manifest line, a truncated MP4 with its index at the front, an
exception inside one record's processing; and the per-file counts / bad-fraction limit shared by two readers."""
import json
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ral_jax.data import features, media, pipeline, processor, records, tokenizer
from ral_jax.data.badinput import BadInputCounter, BadRecord, DataError
from ral_jax.models.config import get_preset

CFG = get_preset('tiny')
BASE = {'question': 'What colour?', 'options': ['red', 'green'], 'answer': 'A',
        'target': '<think>red</think><answer>A</answer>', 'images': ['ok.png']}


def _cfg(manifest, **kw):
  kw = dict(dict(batch_size=1, num_epochs=1, drop_remainder=False, max_bad_fraction=1.0,
                 processor=processor.ProcessorConfig(image_min_pixels=56 * 56, image_max_pixels=112 * 112,
                                                     video_min_pixels=28 * 28, video_max_pixels=56 * 56),
                 patch_buckets=(64,)), **kw)
  return pipeline.synthetic_config([manifest], **kw)


@pytest.fixture()
def folder(tmp_path):
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(tmp_path / 'ok.png')
  return tmp_path


def _write_bomb_png(path, width=20000, height=10000):
  """A valid 1-bit grayscale PNG of width x height, all zero: ~25 KB on disk, 200 M pixels decoded."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
  z = zlib.compressobj(9)
  row = b'\x00' * (1 + (width + 7) // 8)
  idat = b''.join(z.compress(row) for _ in range(height)) + z.flush()
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0))
                   + chunk(b'IDAT', idat) + chunk(b'IEND', b''))


def _ids(pipe):
  return sorted(str(b['id'][0]) for b in pipe.dataset)


def test_lone_surrogate_in_question_is_a_counted_bad_record(folder, caplog):
  lines = [json.dumps(dict(BASE, id='good')), json.dumps(dict(BASE, id='surrogate', question='What \ud800 colour?'))]
  assert '\\ud800' in lines[1]   # a JSON escape: json.loads gives a str that no tokenizer accepts
  (folder / 'm.jsonl').write_text('\n'.join(lines) + '\n')
  with caplog.at_level(logging.WARNING):
    pipe = pipeline.make_pipeline(_cfg(str(folder / 'm.jsonl')), CFG)
    assert _ids(pipe) == ['good']
  assert pipe.counter.by_reason == {'malformed_record': 1}
  msg = ' '.join(r.getMessage() for r in caplog.records)
  assert 'm.jsonl' in msg and 'line 2' in msg and 'question' in msg


def test_tokenizer_failure_inside_processing_is_counted_not_raised(folder):
  """An Example that bypassed the manifest checks still cannot crash a worker: the tokenizer's TypeError becomes
  a 'processing_error' bad element naming the record and file."""
  dcfg = _cfg(str(folder / 'x.jsonl'))
  tok = tokenizer.load_tokenizer('embedded')
  proc = features.ExampleProcessor(dcfg, CFG, tokenizer.text_encoder(tok))
  ex = records.Example('r7', 'What \ud800?', (), 'A', 'free-form', (('image', str(folder / 'ok.png')),),
                       source='x.jsonl')
  out = proc(ex)
  assert out['bad_reason'] == 'processing_error' and out['id'] == 'r7' and out['source'] == 'x.jsonl'
  assert 'TypeError' in out['bad_detail']


def test_decompression_bomb_png_is_refused_from_its_header(folder):
  _write_bomb_png(folder / 'bomb.png')
  assert (folder / 'bomb.png').stat().st_size < 100_000
  with pytest.raises(BadRecord, match='bomb.png.*(20000x10000|200000000 pixels)') as e:
    media.load_image(str(folder / 'bomb.png'))
  assert e.value.reason == 'media_over_budget'
  (folder / 'm.jsonl').write_text(json.dumps(dict(BASE, id='good')) + '\n' +
                                  json.dumps(dict(BASE, id='bomb', images=['bomb.png'])) + '\n')
  pipe = pipeline.make_pipeline(_cfg(str(folder / 'm.jsonl')), CFG)
  assert _ids(pipe) == ['good'] and pipe.counter.by_reason == {'media_over_budget': 1}


def test_non_utf8_bytes_in_a_manifest_line_name_manifest_and_line(folder, caplog):
  good = json.dumps(dict(BASE, id='good')).encode()
  bad = json.dumps(dict(BASE, id='latin1', question='caf_')).encode().replace(b'caf_', b'caf\xe9')
  (folder / 'm.jsonl').write_bytes(good + b'\n' + bad + b'\n' + good.replace(b'"good"', b'"good2"') + b'\n')
  with caplog.at_level(logging.WARNING):
    pipe = pipeline.make_pipeline(_cfg(str(folder / 'm.jsonl')), CFG)
  assert _ids(pipe) == ['good', 'good2']
  assert pipe.counter.by_reason == {'malformed_record': 1}
  msg = ' '.join(r.getMessage() for r in caplog.records)
  assert 'm.jsonl' in msg and 'line 2' in msg and 'UTF-8' in msg and '0xe9' in msg


def test_non_utf8_bytes_in_a_video_r1_json_are_a_bad_record(folder):
  rec = {'problem_id': 1, 'problem': 'caf_?', 'data_type': 'image', 'solution': '<answer>A</answer>',
         'path': 'ok.png'}
  raw = json.dumps([dict(rec, problem_id=0, problem='fine?'), rec]).encode().replace(b'caf_', b'caf\xff')
  (folder / 'v.json').write_bytes(raw)
  counter = BadInputCounter(max_bad_fraction=1.0)
  out = records.load_manifest(str(folder / 'v.json'), counter)
  assert [e.id for e in out] == ['0'] and counter.by_reason == {'malformed_record': 1}


def _faststart_mp4(path, n=16, size=64):
  import av
  rng = np.random.default_rng(0)
  with av.open(str(path), 'w', options={'movflags': 'faststart'}) as c:
    s = c.add_stream('libx264' if 'libx264' in av.codecs_available else 'mpeg4', rate=8)
    s.width = s.height = size
    s.pix_fmt = 'yuv420p'
    for _ in range(n):
      for pk in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                                                    format='rgb24')):
        c.mux(pk)
    for pk in s.encode():
      c.mux(pk)


@pytest.mark.parametrize('keep', [0.9, 0.6, 0.3])
def test_truncated_mp4_with_index_at_front_is_a_bad_record(tmp_path, keep):
  _faststart_mp4(tmp_path / 'full.mp4')
  data = (tmp_path / 'full.mp4').read_bytes()
  assert data.find(b'moov') < data.find(b'mdat'), 'the index (moov) must come first'
  cfg = media.VideoConfig(fps=8, max_frames=16, min_frames=4)
  assert len(media.load_video(str(tmp_path / 'full.mp4'), cfg)[0]) == 16
  (tmp_path / 'cut.mp4').write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(BadRecord, match='cut.mp4.*decode') as e:
    media.load_video(str(tmp_path / 'cut.mp4'), cfg)
  assert e.value.reason == 'corrupt_media'


def _rows(n_good, n_bad):
  rows = [json.dumps(dict(BASE, id=f'g{i}')) for i in range(n_good)]
  rows += [json.dumps(dict(BASE, id=f'b{i}', images=[f'gone{i}.png'])) for i in range(n_bad)]
  return rows


def test_two_readers_of_one_file_count_its_lines_once(folder):
  (folder / 'm.jsonl').write_text('\n'.join(_rows(6, 2) + ['{broken']) + '\n')
  counter = BadInputCounter(max_bad_fraction=1.0)
  sft = pipeline.make_pipeline(_cfg(str(folder / 'm.jsonl')), CFG, counter)
  rl = pipeline.make_pipeline(_cfg(str(folder / 'm.jsonl'), with_targets=False), CFG, counter)
  assert len(_ids(sft)) == 6 and len(_ids(rl)) == 6
  m = counter.metrics()
  assert m['data/records'] == 9, 'the 9 lines of the one file, once (not once per reader)'
  assert m['data/seen'] == 16 and m['data/bad'] == 1 + 4
  f = counter.per_file()[str(folder / 'm.jsonl')]
  assert f['records'] == 9 and f['seen'] == 16
  assert m['data/bad_fraction'] == pytest.approx(max(1 / 9, 4 / 16))


@pytest.mark.parametrize('n_bad,stops', [(4, False), (5, True)])
def test_bad_fraction_metric_and_limit_agree(folder, n_bad, stops):
  """The run stops exactly when the reported bad fraction exceeds the limit (40 records, limit 0.1)."""
  (folder / 'm.jsonl').write_text('\n'.join(_rows(40 - n_bad, n_bad)) + '\n')
  counter = BadInputCounter(max_bad_fraction=0.1, min_records=40)
  pipe = pipeline.make_pipeline(_cfg(str(folder / 'm.jsonl'), max_bad_fraction=0.1), CFG, counter)
  if stops:
    with pytest.raises(DataError, match='m.jsonl'):
      _ids(pipe)
  else:
    _ids(pipe)
  assert (counter.metrics()['data/bad_fraction'] > 0.1) == stops
