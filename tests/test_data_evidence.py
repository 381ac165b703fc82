"""Evidence: manifest parsing (bad evidence is a counted bad record), the box/time -> merged-token mapping against a
hand-made grid, the whole chain on real synthetic media (processor resize, 2x2 merge, video time index), collation,
and attn/evidence_mass on hand-built policies."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax.data import evidence as ev
from ral_jax.data import pipeline, processor, synthetic, tokenizer
from ral_jax.data.badinput import BadInputCounter, BadRecord
from ral_jax.data.features import ExampleProcessor
from ral_jax.data.records import load_manifest
from ral_jax.models.config import get_preset
from ral_jax.rl.evidence import evidence_key_mask, evidence_mass, evidence_share

CFG = get_preset('tiny')


def test_parse_good_and_bad():
  got = ev.parse_evidence([{'media': 0, 'box': [1, 2, 3, 4]}, {'media': 1, 'box': [0, 0, 5, 5], 't': [0.5, 1]}],
                          ('image', 'video'))
  assert got == (ev.Evidence(0, (1., 2., 3., 4.)), ev.Evidence(1, (0., 0., 5., 5.), (0.5, 1.0)))
  assert ev.parse_evidence(None, ('image',)) == ()
  for bad in ({'media': 0}, [{'media': 2, 'box': [0, 0, 1, 1]}], [{'media': 0, 'box': [3, 0, 1, 1]}],
              [{'media': 0, 'box': [0, 0, 1]}], [{'media': 0, 'box': [0, 0, 1, 1], 't': [0, 1]}],
              [{'media': 0, 'box': [0, 0, 1, float('nan')]}], [{'media': 0, 'box': [0, 0, 1, 1], 'x': 1}]):
    with pytest.raises(BadRecord) as e:
      ev.parse_evidence(bad, ('image',))
    assert e.value.reason == 'malformed_evidence'


def test_manifest_records_with_and_without_evidence(tmp_path):
  rows = [{'id': 'a', 'question': 'q', 'answer': 'A', 'image': 'x.png'},
          {'id': 'b', 'question': 'q', 'answer': 'A', 'image': 'x.png',
           'evidence': [{'media': 0, 'box': [0, 0, 4, 4]}]},
          {'id': 'c', 'question': 'q', 'answer': 'A', 'image': 'x.png', 'evidence': [{'media': 0, 'box': 'all'}]}]
  path = tmp_path / 'm.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  counter = BadInputCounter(max_bad_fraction=0.5, min_records=1)
  recs = load_manifest(str(path), counter)
  assert [r.id for r in recs] == ['a', 'b'] and recs[0].evidence == () and recs[1].evidence[0].box == (0, 0, 4, 4)
  assert counter.metrics()['data/bad/malformed_evidence'] == 1


def test_item_token_mask_hand_grid():
  # grid (1, 4, 6) patches of 14 px, merge 2: resized 56 x 84 px, merged tokens 2 rows x 3 cols of 28 px.
  # Original 112 x 168 px: boxes scale by 1/2.
  E = lambda *box, t=None: ev.Evidence(0, tuple(float(b) for b in box), t)
  m = lambda *boxes: np.flatnonzero(ev.item_token_mask(boxes, (112, 168), (1, 4, 6), 14, 2)).tolist()
  assert m(E(60, 0, 70, 10)) == [1]                  # scaled x 30..35, y 0..5: row 0, col 1
  assert m(E(0, 100, 168, 112)) == [3, 4, 5]         # scaled y 50..56: the whole bottom row
  assert m(E(0, 0, 56, 56)) == [0]                   # ends exactly on the token border: the neighbours do not count
  assert m(E(50, 50, 60, 60)) == [0, 1, 3, 4]        # straddles the corner of four tokens
  assert m(E(0, 0, 1, 1), E(167, 111, 168, 112)) == [0, 5]
  # Video: grid (4, 2, 2) -> 4 temporal tokens of 1 merged token each; second_per_grid_t = 1 s (2 frames at 2 fps).
  v = lambda t: np.flatnonzero(ev.item_token_mask([E(0, 0, 10, 10, t=t)], (28, 28), (4, 2, 2), 14, 2, 1.0)).tolist()
  assert v((1.5, 2.5)) == [1, 2] and v((2.0, 2.0)) == [2] and v((1.0, 2.0)) == [1] and v(None) == [0, 1, 2, 3]


def _colourful(patches, grid, cfg):
  """bool per merged token: any pixel of its patches far from grey (channel spread), from the processor output."""
  t, h, w = grid
  p, c, tp = cfg.patch_size, 3, cfg.temporal_patch_size
  mean, std = np.array(cfg.image_mean)[None, :, None], np.array(cfg.image_std)[None, :, None]
  px = patches.reshape(len(patches), c, tp * p * p) * std + mean                    # [N, C, tp*p*p] in [0, 1]
  spread = (px.max(1) - px.min(1)).max(-1)                                            # [N]
  return (spread.reshape(-1, cfg.merge_size ** 2) > 0.25).any(-1)                     # merge-unit-major order


@pytest.mark.parametrize('task,size', [('color', 200), ('count', 224), ('blink', 112)])
def test_evidence_tokens_cover_the_object_through_the_real_chain(tmp_path, task, size):
  knobs = synthetic.Knobs(image_size=size, video_size=size, video_frames=16, object_size=12, num_distractors=3)
  s = synthetic.make_sample(task, 'train', 3, 0, knobs)
  pixels = synthetic.render(s, knobs)
  if s.kind == 'image':
    from PIL import Image
    Image.fromarray(pixels).save(tmp_path / 'x.png')
    rec = {'id': s.id, 'question': s.problem, 'options': s.options, 'answer': s.answer, 'images': ['x.png']}
  else:
    synthetic.write_video(str(tmp_path / 'x.mp4'), pixels, knobs.fps)
    rec = {'id': s.id, 'question': s.problem, 'options': s.options, 'answer': s.answer, 'video': 'x.mp4'}
  rec['evidence'] = s.evidence
  (tmp_path / 'm.jsonl').write_text(json.dumps(rec) + '\n')
  ex = load_manifest(str(tmp_path / 'm.jsonl'), BadInputCounter(0.5, 1))[0]
  dcfg = pipeline.synthetic_config([str(tmp_path / 'm.jsonl')], with_targets=False, prompt_buckets=(512,),
                                   patch_buckets=(1024,),
                                   processor=processor.ProcessorConfig(image_min_pixels=56 * 56,
                                                                       image_max_pixels=168 * 168,
                                                                       video_min_pixels=28 * 28,
                                                                       video_max_pixels=56 * 56))
  from ral_jax.data.media import VideoConfig
  dcfg = pipeline.DataConfig(**{**dcfg.__dict__, 'video': VideoConfig(fps=2.0, max_frames=16, min_frames=4)})
  tok = tokenizer.load_tokenizer()
  out = ExampleProcessor(dcfg, CFG, tokenizer.text_encoder(tok))(ex)
  assert 'bad_reason' not in out, out
  vis = np.isin(out['prompt_ids'], [CFG.image_token_id, CFG.video_token_id])
  mask = out['evidence_mask'].astype(bool)
  assert out['has_evidence'] == 1 and not (mask & ~vis).any()
  grid = tuple(out['grid_thw'][0])
  if s.kind == 'image':    # the evidence tokens are exactly the tokens showing a coloured target square
    colour = _colourful(out['pixel_values'], grid, dcfg.processor)
    target = {tuple(o[1]) for o in s.draw['objects'][:1 if task == 'color' else int(s.answer)]}
    assert mask[vis].sum() >= 1 and mask[vis].sum() < 0.2 * vis.sum()
    assert colour[mask[vis]].all()                    # every evidence token shows colour
  else:                    # blink: evidence tokens sit in the one temporal patch holding the white square
    t = grid[0]
    per_t = mask[vis].reshape(t, -1).any(1)
    start = s.draw['blink'][0]
    assert per_t.tolist() == [k == start // 2 for k in range(t)], (per_t, start)
    assert 1 <= mask[vis].sum() <= 4


def test_collate_left_pads_evidence_with_the_prompt(tmp_path):
  synthetic.main(['--out', str(tmp_path), '--num-train', '4', '--num-heldout', '1', '--tasks', 'color,marked'])
  pipe = pipeline.make_pipeline(pipeline.synthetic_config([str(tmp_path / 'train.jsonl')], batch_size=2), CFG)
  batch = next(iter(pipe.dataset))
  assert batch['evidence_mask'].shape == batch['prompt_ids'].shape and batch['has_evidence'].tolist() == [1, 1]
  vis = np.isin(batch['prompt_ids'], [CFG.image_token_id, CFG.video_token_id])
  assert (batch['evidence_mask'].sum(1) >= 1).all() and not (batch['evidence_mask'].astype(bool) & ~vis).any()


def test_evidence_mass_on_a_hand_built_policy():
  # B=2, R=2, S=5: keys 0-2 visual, key 1 evidence (seq 0); seq 1 has no evidence (excluded), row 1 of seq 0 masked.
  vis = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
  evm = jnp.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
  pol = jnp.array([[[0.1, 0.3, 0.1, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]],
                   [[0.2, 0.2, 0.2, 0.4, 0.0], [0.3, 0.3, 0.3, 0.1, 0.0]]])
  rm = jnp.array([[1, 1], [1, 1]])
  # seq 0 row 0: 0.3 / 0.5 = 0.6; row 1 has no visual mass (undefined: skipped); seq 1 has no evidence.
  np.testing.assert_allclose(evidence_mass(pol, rm, vis, evm, jnp.array([1, 0])), 0.6, rtol=1e-6)
  pol2 = pol.at[0, 1].set(jnp.array([0.4, 0.0, 0.1, 0.5, 0.0]))          # row 1 now 0 / 0.5 = 0
  np.testing.assert_allclose(evidence_mass(pol2, rm, vis, evm, jnp.array([1, 0])), 0.3, rtol=1e-6)
  np.testing.assert_allclose(evidence_mass(pol2, jnp.array([[1, 0], [1, 1]]), vis, evm, jnp.array([1, 0])), 0.6,
                             rtol=1e-6)
  np.testing.assert_allclose(evidence_share(vis, evm, jnp.array([1, 0])), 1 / 3, rtol=1e-6)
  # the key mask over `prompt | response`, repeated per sample in rollout order b*G+g
  k = evidence_key_mask(jnp.array([[0, 1], [1, 0]]), 2, repeats=2)
  assert k.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
