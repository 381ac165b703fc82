"""Synthetic tasks: deterministic, answers verifiable from the pixels, manifests in both formats."""
import hashlib
import json
import os

import numpy as np
import pytest

from ral_jax.data import media, synthetic

K = synthetic.Knobs()


def _colour_of(rgb):
  for name, c in synthetic.COLOURS.items():
    if np.abs(np.asarray(rgb, int) - c).max() < 25:
      return name
  return None


@pytest.mark.parametrize('i', range(6))
def test_image_answers_follow_from_pixels(i):
  s = synthetic.make_sample('color', 'heldout', i, 3, K)
  img = synthetic.render(s, K)
  colours = {_colour_of(p) for p in img.reshape(-1, 3)} - {None}
  assert len(colours) == 1
  assert s.options[synthetic.LETTERS.index(s.answer)] == colours.pop()

  s = synthetic.make_sample('quadrant', 'heldout', i, 3, K)
  img = synthetic.render(s, K)
  ys, xs = np.nonzero(np.all(img == synthetic.COLOURS['red'], axis=-1))
  half = K.image_size // 2
  quads = {2 * (y >= half) + (x >= half) for y, x in zip(ys, xs)}
  assert len(quads) == 1 and s.options[synthetic.LETTERS.index(s.answer)] == synthetic.QUADRANTS[quads.pop()]

  s = synthetic.make_sample('count', 'heldout', i, 3, K)
  img = synthetic.render(s, K)
  name = s.problem.split()[2]
  mask = np.all(img == synthetic.COLOURS[name], axis=-1)
  assert mask.sum() == int(s.answer) * K.object_size ** 2


@pytest.mark.parametrize('i', range(6))
def test_video_answers_follow_from_pixels(i):
  s = synthetic.make_sample('flash', 'train', i, 5, K)
  v = synthetic.render(s, K)
  bright = np.flatnonzero(v.reshape(len(v), -1).mean(1) > 200)
  assert len(bright) == 2 and bright[0] // (K.video_frames // 4) == synthetic.LETTERS.index(s.answer)
  s = synthetic.make_sample('motion', 'train', i, 5, K)
  v = synthetic.render(s, K)
  centres = [np.argwhere(np.any(f != synthetic.BACKGROUND, axis=-1)).mean(0) for f in v]
  dy, dx = centres[-1] - centres[0]
  want = ('left' if dx < 0 else 'right') if abs(dx) > abs(dy) else ('up' if dy < 0 else 'down')
  assert s.options[synthetic.LETTERS.index(s.answer)] == want


def test_splits_disjoint_and_deterministic():
  a = [synthetic.make_sample('quadrant', 'train', i, 0, K).draw for i in range(20)]
  b = [synthetic.make_sample('quadrant', 'train', i, 0, K).draw for i in range(20)]
  c = [synthetic.make_sample('quadrant', 'heldout', i, 0, K).draw for i in range(20)]
  assert a == b and a != c


def _digest(root):
  h = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      h.update(f.encode())
      h.update(open(os.path.join(dirpath, f), 'rb').read())
  return h.hexdigest()


def test_cli_writes_manifests_and_is_deterministic(tmp_path):
  args = ['--num-train', '10', '--num-heldout', '5', '--seed', '7']
  synthetic.main(['--out', str(tmp_path / 'a')] + args)
  synthetic.main(['--out', str(tmp_path / 'b')] + args)
  assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')
  rows = [json.loads(l) for l in open(tmp_path / 'a' / 'train.jsonl')]
  assert len(rows) == 10 and {r['task'] for r in rows} == set(synthetic.TASKS)
  for r in rows:
    assert r['target'].endswith(f"<answer>{r['answer']}</answer>") and r['target'].startswith('<think>')
  vr1 = json.load(open(tmp_path / 'a' / 'train_video_r1.json'))
  assert [v['solution'] for v in vr1] == [f"<answer>{r['answer']}</answer>" for r in rows]
  video = next(r for r in rows if 'video' in r)
  frames, fps = media.load_video(str(tmp_path / 'a' / video['video']), media.VideoConfig(fps=2.0, max_frames=8))
  assert frames.shape == (8, K.video_size, K.video_size, 3) and fps == pytest.approx(2.0)


def test_knob_validation():
  with pytest.raises(ValueError, match='multiple of 8'):
    synthetic.Knobs(video_frames=6)
  with pytest.raises(ValueError, match='unknown synthetic task'):
    synthetic.make_sample('nope', 'train', 0, 0, K)
