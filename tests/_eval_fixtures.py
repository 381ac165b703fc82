"""Files in benchmark release formats for the evaluation tests: PNG bytes, parquet image cells, parquet / JSON / JSONL
annotation files."""
import io
import json
import os

import pytest
from PIL import Image


def png(color=(255, 0, 0)) -> bytes:
  buf = io.BytesIO()
  Image.new('RGB', (8, 8), color).save(buf, format='PNG')
  return buf.getvalue()


def cell(color=(255, 0, 0), name='x.png'):
  """A parquet image cell as HF datasets write it: {'bytes', 'path'}."""
  return {'bytes': png(color), 'path': name}


def parquet(path, rows):
  pa = pytest.importorskip('pyarrow')
  import pyarrow.parquet as pq
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def write(path, obj, jsonl=False):
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  with open(path, 'w') as f:
    if jsonl:
      f.writelines(json.dumps(r) + '\n' for r in obj)
    else:
      json.dump(obj, f)
  return str(path)
