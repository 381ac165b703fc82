"""Synthetic perception tasks with verifiable answers, written as media files plus manifests.

    python -m ral_jax.data.synthetic --out /tmp/ral_synth --num-train 512 --num-heldout 128

Every answer depends on a small region of an image or on one moment of a video, so where the model looks decides
whether it is right. Tasks (problem type):
  image 'color'     colour of the single small coloured square among grey distractors (multiple choice, A-D)
  image 'quadrant'  which quadrant holds the red square among squares of other colours (multiple choice, A-D)
  image 'count'     how many squares of one colour (1..4) among other-coloured ones (numerical)
  video 'flash'     which quarter of the video has the white flash (multiple choice, A-D)
  video 'motion'    direction the small square moves in (multiple choice, A-D)
  image 'marked'    colour of the square inside the white frame, among squares of every colour (hard: the
                    distractors carry every answer; only the frame tells them apart)
  video 'blink'     in which quarter a small white square shows up for two frames, among static coloured
                    squares (hard: small in space and in time)
Every record carries `evidence` (data/evidence.py): the boxes (and, for video, time spans) that decide the answer.
The `hard` level of the testbed (configs/common.py apply_testbed) uses 224 px images and 16-frame 112 px videos
with many distractors, so the evidence is a few of 64 merged visual tokens per image / frame pair.
Option lists are in a fixed order (the answer letter is a function of the content); `--shuffle-options` permutes them.
Each example is generated from its own RNG seeded by (seed, split, task, index), so the splits are disjoint draws,
deterministic, and independent of how many examples are asked for. Output in OUT:
  train.jsonl, heldout.jsonl    the JSONL manifest format (records.py): id, question, options, answer,
                                problem_type, images | video, target ('<think>...</think><answer>X</answer>')
  train_video_r1.json           the train split again as Video-R1 JSON (problem, options, solution, process, path)
  media/<split>/<id>.png|.mp4   images (PNG) and videos (H.264 mp4 at --fps)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Dict, Iterator, List, Sequence

import numpy as np

IMAGE_TASKS = ('color', 'quadrant', 'count')
VIDEO_TASKS = ('flash', 'motion')
HARD_TASKS = ('marked', 'blink')     # added for the testbed (not in the 'image' / 'video' / 'mixed' families)
TASKS = IMAGE_TASKS + VIDEO_TASKS + HARD_TASKS
SPLITS = ('train', 'heldout')

COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220), 'yellow': (230, 210, 40)}
COLOUR_NAMES = tuple(COLOURS)
QUADRANTS = ('top-left', 'top-right', 'bottom-left', 'bottom-right')
QUARTERS = ('first quarter', 'second quarter', 'third quarter', 'fourth quarter')
DIRECTIONS = ('left', 'right', 'up', 'down')
BACKGROUND = 120
LETTERS = 'ABCD'


@dataclasses.dataclass(frozen=True)
class Knobs:
  """Difficulty knobs. Sizes in pixels; video frames must be a multiple of 8 (four segments of whole
  temporal patches of 2 frames)."""
  image_size: int = 112
  object_size: int = 10
  num_distractors: int = 3
  video_size: int = 56
  video_frames: int = 8
  fps: float = 2.0
  shuffle_options: bool = False

  def __post_init__(self):
    if self.video_frames % 8:
      raise ValueError(f'--video-frames {self.video_frames} must be a multiple of 8')
    if self.object_size * 4 > min(self.image_size, self.video_size * 2):
      raise ValueError('--object-size too large for the image / video size')


@dataclasses.dataclass
class Sample:
  id: str
  task: str
  kind: str           # 'image' | 'video'
  problem: str
  options: List[str]  # bare option texts (letters are added by prompts.lettered_options)
  answer: str         # letter or number
  problem_type: str
  think: str
  draw: Dict          # task-specific drawing parameters
  evidence: List[Dict] = dataclasses.field(default_factory=list)   # manifest `evidence` (original pixels, s)


def _box(pos, obj):
  y, x = pos
  return [int(x), int(y), int(x) + obj, int(y) + obj]


def _place(rng, n, size, obj, region=None):
  """n non-overlapping top-left corners of obj x obj squares inside region (y0, x0, y1, x1)."""
  y0, x0, y1, x1 = region or (0, 0, size, size)
  out = []
  for _ in range(1000):
    if len(out) == n:
      break
    y, x = int(rng.integers(y0, y1 - obj + 1)), int(rng.integers(x0, x1 - obj + 1))
    if all(abs(y - v) > obj + 1 or abs(x - u) > obj + 1 for v, u in out):
      out.append((y, x))
  if len(out) < n:
    raise ValueError(f'cannot place {n} objects of {obj}px in {size}px: lower --num-distractors')
  return out


def _options(rng, texts, correct, knobs):
  order = list(rng.permutation(len(texts))) if knobs.shuffle_options else list(range(len(texts)))
  opts = [texts[i] for i in order]
  return opts, LETTERS[opts.index(texts[correct])]


def make_sample(task: str, split: str, index: int, seed: int, knobs: Knobs) -> Sample:
  """One example: text fields and drawing parameters (no pixels)."""
  if task not in TASKS or split not in SPLITS:
    raise ValueError(f'unknown synthetic task {task!r} or split {split!r}; tasks: {TASKS}, splits: {SPLITS}')
  rng = np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task), index])
  sid = f'{split}-{task}-{index:05d}'
  s, o, nd = knobs.image_size, knobs.object_size, knobs.num_distractors
  if task == 'color':
    c = int(rng.integers(4))
    pos = _place(rng, 1 + nd, s, o)
    greys = [int(g) for g in rng.integers(60, 200, nd)]
    opts, letter = _options(rng, list(COLOUR_NAMES), c, knobs)
    where = QUADRANTS[2 * (pos[0][0] >= s // 2) + (pos[0][1] >= s // 2)]
    return Sample(sid, task, 'image', 'What colour is the small coloured square in the image?', opts, letter,
                  'multiple choice', f'The coloured square is in the {where} part. It is {COLOUR_NAMES[c]}, '
                  f'so the answer is {letter}.',
                  {'objects': [(pos[0], COLOURS[COLOUR_NAMES[c]])] + [(p, (g, g, g)) for p, g in zip(pos[1:], greys)]},
                  [{'media': 0, 'box': _box(pos[0], o)}])
  if task == 'quadrant':
    q = int(rng.integers(4))
    h = s // 2
    region = ((q // 2) * h, (q % 2) * h, (q // 2) * h + h, (q % 2) * h + h)
    target = _place(rng, 1, s, o, region)[0]
    others = [p for p in _place(rng, nd + 6, s, o) if abs(p[0] - target[0]) > o + 1 or abs(p[1] - target[1]) > o + 1]
    others = others[:nd]
    cols = [COLOURS[COLOUR_NAMES[int(i)]] for i in rng.integers(1, 4, len(others))]
    opts, letter = _options(rng, list(QUADRANTS), q, knobs)
    return Sample(sid, task, 'image', 'Which quadrant of the image contains the red square?', opts, letter,
                  'multiple choice', f'I look for the red square among {len(others) + 1} squares. It is in the '
                  f'{QUADRANTS[q]} quadrant, so the answer is {letter}.',
                  {'objects': [(target, COLOURS['red'])] + list(zip(others, cols))},
                  [{'media': 0, 'box': _box(target, o)}])
  if task == 'count':
    c, n = int(rng.integers(4)), int(rng.integers(1, 5))
    pos = _place(rng, n + nd, s, o)
    other = [COLOURS[COLOUR_NAMES[(c + int(k)) % 4]] for k in rng.integers(1, 4, nd)]
    name = COLOUR_NAMES[c]
    return Sample(sid, task, 'image', f'How many {name} squares are in the image?', [], str(n), 'numerical',
                  f'I count the {name} squares one by one. There are {n}.',
                  {'objects': [(p, COLOURS[name]) for p in pos[:n]] + list(zip(pos[n:], other))},
                  [{'media': 0, 'box': _box(p, o)} for p in pos[:n]])
  if task == 'marked':
    c = int(rng.integers(4))
    pos = _place(rng, 1 + nd, s, o + 4, (2, 2, s - 2, s - 2))
    pos = [(y + 2, x + 2) for y, x in pos]
    cols = [COLOURS[COLOUR_NAMES[c]]] + [COLOURS[COLOUR_NAMES[int(i)]] for i in rng.integers(4, size=nd)]
    opts, letter = _options(rng, list(COLOUR_NAMES), c, knobs)
    return Sample(sid, task, 'image', 'What colour is the square inside the white frame?', opts, letter,
                  'multiple choice', f'Many squares have colours; only one has a white frame. Inside it the square '
                  f'is {COLOUR_NAMES[c]}, so the answer is {letter}.',
                  {'objects': list(zip(pos, cols)), 'frame': pos[0]},
                  [{'media': 0, 'box': [pos[0][1] - 2, pos[0][0] - 2, pos[0][1] + o + 2, pos[0][0] + o + 2]}])
  vs, f = knobs.video_size, knobs.video_frames
  if task == 'flash':
    q = int(rng.integers(4))
    seg = f // 4
    start = q * seg + 2 * int(rng.integers(seg // 2))
    opts, letter = _options(rng, list(QUARTERS), q, knobs)
    clutter = [(p, COLOURS[COLOUR_NAMES[int(i)]]) for p, i in zip(_place(rng, 2, vs, o // 2 + 2), rng.integers(4, size=2))]
    return Sample(sid, task, 'video', 'In which part of the video does the screen flash white?', opts, letter,
                  'multiple choice', f'The frames stay dark except for a bright white flash in the {QUARTERS[q]} '
                  f'of the video, so the answer is {letter}.', {'flash': (start, start + 2), 'objects': clutter},
                  [{'media': 0, 'box': [0, 0, vs, vs], 't': [start / knobs.fps, (start + 2) / knobs.fps]}])
  if task == 'blink':
    q = int(rng.integers(4))
    seg = f // 4
    start = q * seg + 2 * int(rng.integers(seg // 2))
    so = max(4, o // 2 + 2)
    pos = _place(rng, 1 + nd, vs, so)
    clutter = [(p, COLOURS[COLOUR_NAMES[int(i)]]) for p, i in zip(pos[1:], rng.integers(4, size=nd))]
    opts, letter = _options(rng, list(QUARTERS), q, knobs)
    return Sample(sid, task, 'video', 'In which part of the video does a small white square appear?', opts,
                  letter, 'multiple choice', f'The coloured squares never change; a small white square shows up '
                  f'briefly in the {QUARTERS[q]} of the video, so the answer is {letter}.',
                  {'blink': (start, start + 2), 'white': pos[0], 'objects': clutter, 'size': so},
                  [{'media': 0, 'box': _box(pos[0], so), 't': [start / knobs.fps, (start + 2) / knobs.fps]}])
  if task == 'motion':
    d = int(rng.integers(4))
    obj = max(4, o // 2 + 2)
    span = vs - obj
    step = max(1, span // f)
    travel = step * (f - 1)
    a = int(rng.integers(0, span - travel + 1))
    b = int(rng.integers(0, span + 1))
    track = []
    for t in range(f):
      along = a + t * step if d in (1, 3) else a + travel - t * step
      track.append((b, along) if d < 2 else (along, b))
    opts, letter = _options(rng, list(DIRECTIONS), d, knobs)
    return Sample(sid, task, 'video', 'In which direction does the small square move?', opts, letter,
                  'multiple choice', f'I follow the small square from the first frame to the last. It moves '
                  f'{DIRECTIONS[d]}, so the answer is {letter}.',
                  {'track': track, 'size': obj, 'colour': COLOURS[COLOUR_NAMES[int(rng.integers(4))]]},
                  [{'media': 0, 'box': _box(track[t], obj), 't': [t / knobs.fps, (t + 1) / knobs.fps]}
                   for t in range(f)])
  raise ValueError(f'unknown synthetic task {task!r}; choose from {TASKS}')


def _canvas(size, level=BACKGROUND):
  return np.full((size, size, 3), level, np.uint8)


def _draw(img, objects, obj):
  for (y, x), col in objects:
    img[y:y + obj, x:x + obj] = col
  return img


def render(sample: Sample, knobs: Knobs) -> np.ndarray:
  """Pixels: uint8 [H,W,3] for an image, [F,H,W,3] for a video."""
  d = sample.draw
  if sample.kind == 'image':
    img = _canvas(knobs.image_size)
    if 'frame' in d:
      y, x = d['frame']
      img[y - 2:y + knobs.object_size + 2, x - 2:x + knobs.object_size + 2] = 255
    return _draw(img, d['objects'], knobs.object_size)
  frames = []
  for t in range(knobs.video_frames):
    if sample.task == 'blink':
      img = _draw(_canvas(knobs.video_size, 40), d['objects'], d['size'])
      if d['blink'][0] <= t < d['blink'][1]:
        img = _draw(img, [(d['white'], (255, 255, 255))], d['size'])
    elif sample.task == 'flash':
      img = _draw(_canvas(knobs.video_size, 40), d['objects'], knobs.object_size // 2 + 2)
      if d['flash'][0] <= t < d['flash'][1]:
        img[:] = 245
    else:
      img = _draw(_canvas(knobs.video_size), [(d['track'][t], d['colour'])], d['size'])
    frames.append(img)
  return np.stack(frames)


def write_video(path: str, frames: np.ndarray, fps: float, crf: int = 4) -> None:
  """H.264 (yuv420p; default crf 4, near-lossless) mp4 via PyAV; mpeg4 where libx264 is missing."""
  import av
  from fractions import Fraction
  codec = 'libx264' if 'libx264' in av.codecs_available else 'mpeg4'
  with av.open(path, 'w') as container:
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
    stream.options = {'crf': str(crf)} if codec == 'libx264' else {'qscale': '1'}
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def target_text(sample: Sample) -> str:
  return f'<think>{sample.think}</think><answer>{sample.answer}</answer>'


def iter_samples(tasks: Sequence[str], split: str, num: int, seed: int, knobs: Knobs) -> Iterator[Sample]:
  """num examples cycling over tasks (example i has task tasks[i % len(tasks)])."""
  counts = {t: 0 for t in tasks}
  for i in range(num):
    task = tasks[i % len(tasks)]
    yield make_sample(task, split, counts[task], seed, knobs)
    counts[task] += 1


def write_split(out: str, split: str, tasks, num: int, seed: int, knobs: Knobs) -> List[Dict]:
  from PIL import Image
  media_dir = os.path.join(out, 'media', split)
  os.makedirs(media_dir, exist_ok=True)
  rows = []
  for s in iter_samples(tasks, split, num, seed, knobs):
    pixels = render(s, knobs)
    rel = os.path.join('media', split, s.id + ('.png' if s.kind == 'image' else '.mp4'))
    if s.kind == 'image':
      Image.fromarray(pixels).save(os.path.join(out, rel))
    else:
      write_video(os.path.join(out, rel), pixels, knobs.fps)
    row = {'id': s.id, 'question': s.problem, 'options': s.options, 'answer': s.answer,
           'problem_type': s.problem_type, 'target': target_text(s), 'task': s.task, 'data_source': s.task,
           'evidence': s.evidence}
    row['images' if s.kind == 'image' else 'video'] = [rel] if s.kind == 'image' else rel
    rows.append(row)
  with open(os.path.join(out, f'{split}.jsonl'), 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return rows


def to_video_r1(row: Dict) -> Dict:
  """A manifest row in Video-R1's JSON record layout."""
  kind = 'image' if 'images' in row else 'video'
  opts = [f'{LETTERS[i]}. {o}' for i, o in enumerate(row['options'])]
  think_end = row['target'].index('</think>') + len('</think>')
  return {'problem_id': row['id'], 'problem': row['question'], 'data_type': kind,
          'problem_type': row['problem_type'], 'options': opts, 'process': row['target'][:think_end],
          'solution': f"<answer>{row['answer']}</answer>",
          'path': './' + (row['images'][0] if kind == 'image' else row['video']), 'data_source': 'synthetic',
          'evidence': row.get('evidence', [])}


def text_corpus(num_per_task: int = 200, seed: int = 0) -> Iterator[str]:
  """The synthetic tasks' texts (questions, options, targets), for training the embedded tokenizer."""
  knobs = Knobs()
  for task in IMAGE_TASKS + VIDEO_TASKS:   # the corpus the embedded tokenizer was built from (byte-level BPE)
    for split in SPLITS:
      for i in range(num_per_task):
        s = make_sample(task, split, i, seed, knobs)
        yield s.problem
        yield '\n'.join(f'{LETTERS[k]}. {o}' for k, o in enumerate(s.options))
        yield target_text(s)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True)
  p.add_argument('--tasks', default=','.join(TASKS), help=f'comma-separated subset of {TASKS}')
  p.add_argument('--num-train', type=int, default=512)
  p.add_argument('--num-heldout', type=int, default=128)
  p.add_argument('--seed', type=int, default=0)
  for f in dataclasses.fields(Knobs):
    flag = '--' + f.name.replace('_', '-')
    if f.type in ('bool', bool):
      p.add_argument(flag, action='store_true')
    else:
      p.add_argument(flag, type=type(f.default), default=f.default)
  a = p.parse_args(argv)
  tasks = tuple(t for t in a.tasks.split(',') if t)
  bad = [t for t in tasks if t not in TASKS]
  if bad:
    raise SystemExit(f'unknown --tasks {bad}; choose from {TASKS}')
  knobs = Knobs(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Knobs)})
  os.makedirs(a.out, exist_ok=True)
  train = write_split(a.out, 'train', tasks, a.num_train, a.seed, knobs)
  write_split(a.out, 'heldout', tasks, a.num_heldout, a.seed, knobs)
  with open(os.path.join(a.out, 'train_video_r1.json'), 'w') as f:
    json.dump([to_video_r1(r) for r in train], f, indent=1)
  print(f'wrote {a.num_train} train + {a.num_heldout} heldout examples ({",".join(tasks)}) to {a.out}')


if __name__ == '__main__':
  main()
