"""Vision tower and its host metadata vs transformers 4.57 Qwen2_5_VisionTransformerPretrainedModel (float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.core import meta as flax_meta
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

from ral_jax.models import hf_names, vision_inputs
from ral_jax.models.config import get_preset
from ral_jax.models.vision import VisionTower

CFG = get_preset('tiny')
V = CFG.vision
# Two examples: [image 6x10 (partial windows), video t=4 of 4x6], [image 8x4]; padded P.
GRIDS = [[(1, 6, 10), (4, 4, 6)], [(1, 8, 4)]]
P = 192


def _hf_tower(seed=0):
  vcfg = transformers.Qwen2_5_VLConfig(**CFG.to_hf()).vision_config
  vcfg._attn_implementation = 'eager'
  torch.manual_seed(seed)
  model = hf.Qwen2_5_VisionTransformerPretrainedModel(vcfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if 'norm' in name or 'ln_q' in name else 0.2 * torch.randn_like(p))
  return model


def _flax_params(model):
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  params = {}
  for spec in hf_names.vision_specs(CFG, ''):
    node = params
    for key in spec.path[1:-1]:
      node = node.setdefault(key, {})
    node[spec.path[-1]] = jnp.asarray(hf_names.to_flax(spec, sd.pop(spec.hf_name())))
  assert not sd, f'unmapped HF tensors {sorted(sd)}'
  return params


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  pix = np.zeros((len(GRIDS), P, V.patch_dim), np.float32)
  for b, grids in enumerate(GRIDS):
    n = sum(t * h * w for t, h, w in grids)
    pix[b, :n] = rng.normal(size=(n, V.patch_dim))
  grid_arr = np.zeros((len(GRIDS), 3, 3), np.int32)
  for b, grids in enumerate(GRIDS):
    grid_arr[b, :len(grids)] = grids
  return pix, grid_arr


_apply = jax.jit(lambda params, pix, meta: VisionTower(V).apply({'params': params}, pix, meta))


@pytest.fixture(scope='module')
def hf_tower():
  model = _hf_tower()
  return model, _flax_params(model)


@pytest.fixture(scope='module')
def tower_outputs(hf_tower):
  model, params = hf_tower
  pix, grid_arr = _inputs()
  meta = vision_inputs.build_vision_inputs_batch(grid_arr, P, V)
  ours = _apply(params, pix, meta)
  want = []
  with torch.no_grad():
    for b, grids in enumerate(GRIDS):
      n = sum(t * h * w for t, h, w in grids)
      want.append(model(torch.from_numpy(pix[b, :n]), torch.tensor(grids)).numpy())
  return np.asarray(ours), want


def test_tower_matches_transformers(tower_outputs):
  ours, want = tower_outputs
  assert ours.shape == (len(GRIDS), P // 4, V.out_hidden_size)
  for b, w in enumerate(want):
    assert np.abs(w).max() > 0.1
    np.testing.assert_allclose(ours[b, :len(w)], w, atol=1e-4, rtol=0)
    assert (ours[b, len(w):] == 0).all()


def test_window_and_frame_segments_match_transformers(hf_tower):
  """Our packed segments == transformers' cu_window_seqlens windows (after its window reordering) and frames."""
  model, _ = hf_tower
  for grids in GRIDS + [[(2, 8, 8)], [(1, 2, 2), (1, 10, 6)]]:
    n = sum(t * h * w for t, h, w in grids)
    meta = vision_inputs.build_vision_inputs(np.array(grids), 4 * ((n + 7) // 4), V)
    win_index, cu = model.get_window_index(torch.tensor(grids))
    patch_order = (4 * win_index.numpy()[:, None] + np.arange(4)).ravel()   # merge units -> patches
    cu = np.unique(np.asarray(cu))
    hf_windows = {frozenset(patch_order[a:b].tolist()) for a, b in zip(cu[:-1], cu[1:])}
    frames = np.cumsum([0] + [h * w for t, h, w in grids for _ in range(t)])
    hf_frames = {frozenset(range(a, b)) for a, b in zip(frames[:-1], frames[1:])}
    for key, want in (('win', hf_windows), ('full', hf_frames)):
      idx, seg = meta[f'{key}_index'], meta[f'{key}_segment']
      got = {}
      for c in range(idx.shape[0]):
        for s in set(seg[c].tolist()) - {-1}:
          got.setdefault((c, s), set()).update(idx[c][seg[c] == s].tolist())
      assert {frozenset(v) for v in got.values()} == want
      flat = np.flatnonzero(seg.ravel() >= 0)
      np.testing.assert_array_equal(idx.ravel()[meta[f'{key}_inverse'][:n]], np.arange(n))
      assert len(flat) == n


def test_rope_ids_match_transformers(hf_tower):
  model, _ = hf_tower
  grids = [(1, 6, 10), (4, 4, 6)]
  meta = vision_inputs.build_vision_inputs(np.array(grids), 160, V)
  want = model.rot_pos_emb(torch.tensor(grids)).numpy()                   # [n, head_dim/2]
  inv = 1.0 / (10000 ** (np.arange(0, V.head_dim // 2, 2) / (V.head_dim // 2)))
  ids = meta['rope_ids'][:len(want)]
  got = np.concatenate([ids[:, :1] * inv, ids[:, 1:] * inv], axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_metadata_shapes_static_and_errors():
  a = vision_inputs.build_vision_inputs(np.array([[1, 6, 10]]), P, V)
  b = vision_inputs.build_vision_inputs(np.array([[4, 4, 6], [1, 2, 2], [0, 0, 0]]), P, V)
  assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
  assert a['win_index'].shape[1] == 16 and a['full_index'].shape == (1, P)
  with pytest.raises(ValueError, match='needs 200 patches but num_patches'):
    vision_inputs.build_vision_inputs(np.array([[1, 10, 20]]), P, V)
  with pytest.raises(ValueError, match='multiples of spatial_merge_size'):
    vision_inputs.build_vision_inputs(np.array([[1, 3, 4]]), P, V)
  with pytest.raises(ValueError, match='raise full_chunk'):
    vision_inputs.build_vision_inputs(np.array([[1, 6, 10]]), P, V, full_chunk=32)


def test_full_chunk_and_query_blocks_give_same_output(hf_tower):
  """full_chunk < P (frames packed into chunks) and q_block < chunk (query blocks, with padding) change nothing."""
  _, params = hf_tower
  pix, grid_arr = _inputs()
  outs = []
  for fc, qb in ((None, 2048), (96, 2048), (None, 80)):
    meta = vision_inputs.build_vision_inputs_batch(grid_arr, P, V, full_chunk=fc)
    outs.append(np.asarray(jax.jit(lambda p, x, m: VisionTower(V, q_block=qb).apply({'params': p}, x, m))(
        params, pix, meta)))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)


def test_params_have_logical_names_and_bf16_runs(hf_tower):
  pix = jnp.ones((1, 16, V.patch_dim))
  meta = vision_inputs.build_vision_inputs_batch(np.array([[[1, 4, 4]]]), 16, V)
  tower = VisionTower(V, dtype=jnp.bfloat16)
  boxed = jax.eval_shape(tower.init, jax.random.key(0), pix, meta)['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, flax_meta.Partitioned))
  assert all(isinstance(x, flax_meta.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  assert jax.tree.map(lambda x: x.shape, flax_meta.unbox(boxed)) == jax.tree.map(lambda x: x.shape, hf_tower[1])
  out = jax.jit(tower.apply)({'params': hf_tower[1]}, pix, meta)
  assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_sharded_on_mesh_equals_single_device(hf_tower, tower_outputs):
  """Params on their logical shardings over a (data 1, fsdp 2, tensor 4) mesh, batch over (data, fsdp)."""
  from ral_jax import sharding
  _, params = hf_tower
  pix, grid_arr = _inputs()
  meta = vision_inputs.build_vision_inputs_batch(grid_arr, P, V)
  mesh = sharding.make_mesh((1, 2, 4))
  tower = VisionTower(V)
  boxed = jax.eval_shape(tower.init, jax.random.key(0), pix, meta)['params']
  shardings = sharding.logical_to_shardings(boxed, mesh, sharding.logical_rules())
  p_sh = jax.device_put(params, shardings)
  batch = jax.device_put((pix, meta), sharding.batch_sharding(mesh, 2))
  out = jax.jit(lambda p, x, m: tower.apply({'params': p}, x, m))(p_sh, *batch)
  assert len(p_sh['blocks_0']['mlp']['gate_proj']['kernel'].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), tower_outputs[0], atol=1e-5)
