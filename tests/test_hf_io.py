"""HF checkpoint import/export: round trips (float32, bfloat16, sharded, both name schemes), shardings, errors."""
import json
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from ral_jax import sharding
from ral_jax.models import hf_io, vision_inputs
from ral_jax.models.config import get_preset
from ral_jax.models.safetensors_io import SafetensorsFile
from ral_jax.models.vlm import init_params

CFG = get_preset('tiny')


def _hf_model(seed=0, tie=False):
  cfg = CFG.replace(tie_word_embeddings=tie)
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf()))
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp('ckpt')
  model = _hf_model()
  model.save_pretrained(root / 'f32')
  model.save_pretrained(root / 'sharded', max_shard_size='200KB')
  model.to(torch.bfloat16).save_pretrained(root / 'bf16')
  return root


def _tensors(d):
  """name -> (dtype, shape, raw bytes) of every tensor of a checkpoint dir."""
  where = hf_io._open_files(str(d))
  return {n: (st.header[n][0], st.header[n][1], st.get(n).tobytes()) for n, st in where.items()}


def _copy_with(src, dst, edit):
  """Copies a single-file checkpoint, passing its torch state dict through edit(sd) -> sd."""
  shutil.copytree(src, dst)
  sd = edit(load_file(os.path.join(src, 'model.safetensors')))
  save_file(sd, os.path.join(dst, 'model.safetensors'), metadata={'format': 'pt'})
  return dst


def test_round_trip_float32_bit_identical(ckpts, tmp_path):
  cfg, params = hf_io.load_hf(str(ckpts / 'f32'))
  assert cfg.replace() == CFG.replace(dtype='bfloat16', remat_policy='nothing_saveable', record_chunk=256)
  hf_io.save_hf(params, cfg, str(tmp_path / 'out'))
  assert _tensors(tmp_path / 'out') == _tensors(ckpts / 'f32')
  assert hf_io.read_config(str(tmp_path / 'out')) == cfg
  # the tree is exactly the model's
  pix = jnp.zeros((1, 16, CFG.vision.patch_dim))
  meta = vision_inputs.build_vision_inputs_batch(np.array([[[1, 4, 4]]]), 16, CFG.vision)
  ref = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0), (pix, meta)))
  assert jax.tree.structure(ref) == jax.tree.structure(params)
  assert jax.tree.map(lambda a: a.shape, ref) == jax.tree.map(lambda a: a.shape, params)


def test_round_trip_bfloat16(ckpts, tmp_path):
  _, params = hf_io.load_hf(str(ckpts / 'bf16'))
  assert params['model']['layers']['mlp']['up_proj']['kernel'].dtype == jnp.float32
  hf_io.save_hf(params, CFG, str(tmp_path / 'a'), dtype='bfloat16')
  assert _tensors(tmp_path / 'a') == _tensors(ckpts / 'bf16')
  cfg, p16 = hf_io.load_hf(str(ckpts / 'bf16'), param_dtype='bfloat16')
  assert p16['visual']['merger']['mlp_0']['kernel'].dtype == jnp.bfloat16 and cfg.param_dtype == 'bfloat16'
  hf_io.save_hf(flax.core.freeze(p16), cfg, str(tmp_path / 'frozen'))   # FrozenDict params work too
  assert _tensors(tmp_path / 'frozen') == _tensors(ckpts / 'bf16')
  hf_io.save_hf(p16, cfg, str(tmp_path / 'b'))
  assert _tensors(tmp_path / 'b') == _tensors(ckpts / 'bf16')
  assert json.load(open(tmp_path / 'b' / 'config.json'))['torch_dtype'] == 'bfloat16'
  # the file reader agrees with safetensors' own torch reader
  name = 'visual.blocks.1.attn.qkv.weight'
  ours = SafetensorsFile(str(ckpts / 'bf16' / 'model.safetensors')).get(name)
  want = load_file(str(ckpts / 'bf16' / 'model.safetensors'))[name].float().numpy()
  np.testing.assert_array_equal(ours.astype(np.float32), want)
  assert ours.dtype == ml_dtypes.bfloat16


def test_sharded_checkpoint_and_sharded_export(ckpts, tmp_path):
  assert os.path.exists(ckpts / 'sharded' / 'model.safetensors.index.json')
  _, params = hf_io.load_hf(str(ckpts / 'sharded'))
  _, ref = hf_io.load_hf(str(ckpts / 'f32'))
  jax.tree.map(np.testing.assert_array_equal, params, ref)
  files = hf_io.save_hf(params, CFG, str(tmp_path / 'out'), max_shard_bytes=150_000)
  assert 'model.safetensors.index.json' in files and len(files) > 3
  assert _tensors(tmp_path / 'out') == _tensors(ckpts / 'f32')
  # transformers reads our export back to the same weights
  back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / 'out'))
  orig = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpts / 'f32'))
  for (n, a), (_, b) in zip(back.state_dict().items(), orig.state_dict().items()):
    assert torch.equal(a, b), n


def test_transformers_name_scheme(ckpts, tmp_path):
  def rename(sd):
    out = {}
    for k, v in sd.items():
      if k.startswith('visual.'):
        k = 'model.' + k
      elif k.startswith('model.'):
        k = 'model.language_model.' + k[len('model.'):]
      out[k] = v
    return out
  src = _copy_with(ckpts / 'f32', tmp_path / 'new', rename)
  _, params = hf_io.load_hf(str(src))
  _, ref = hf_io.load_hf(str(ckpts / 'f32'))
  jax.tree.map(np.testing.assert_array_equal, params, ref)
  hf_io.save_hf(params, CFG, str(tmp_path / 'out'), scheme='transformers')
  assert _tensors(tmp_path / 'out') == _tensors(src)


def test_tied_embeddings(tmp_path):
  model = _hf_model(tie=True)
  model.save_pretrained(tmp_path / 'tied')
  cfg, params = hf_io.load_hf(str(tmp_path / 'tied'))
  assert cfg.tie_word_embeddings and 'lm_head' not in params
  hf_io.save_hf(params, cfg, str(tmp_path / 'out'))
  got, want = _tensors(tmp_path / 'out'), _tensors(tmp_path / 'tied')
  want.pop('lm_head.weight', None)
  assert got == want


def test_loads_onto_mesh_shardings(ckpts):
  mesh = sharding.make_mesh((1, 2, 4))
  pix = jnp.zeros((1, 16, CFG.vision.patch_dim))
  meta = vision_inputs.build_vision_inputs_batch(np.array([[[1, 4, 4]]]), 16, CFG.vision)
  _, shardings = sharding.model_param_shardings(CFG, mesh, sharding.logical_rules(), (pix, meta))
  _, params = hf_io.load_hf(str(ckpts / 'f32'), shardings=shardings)
  _, ref = hf_io.load_hf(str(ckpts / 'f32'))
  for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref),
                             jax.tree.leaves(shardings)):
    assert a.sharding == s, path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q = params['model']['layers']['self_attn']['q_proj']['kernel']
  assert len({d.id for d in q.sharding.device_set}) == 8 and q.addressable_shards[0].data.shape != q.shape
  _, p2 = hf_io.load_hf(str(ckpts / 'f32'), mesh=mesh)
  assert jax.tree.map(lambda a: a.sharding, p2) == jax.tree.map(lambda a: a.sharding, params)
  with pytest.raises(ValueError, match='no entry for parameter visual/patch_embed'):
    hf_io.load_hf(str(ckpts / 'f32'), shardings={k: v for k, v in shardings.items() if k != 'visual'})


def test_errors_name_the_tensor_or_field(ckpts, tmp_path):
  name = 'model.layers.1.mlp.up_proj.weight'
  bad = _copy_with(ckpts / 'f32', tmp_path / 'missing', lambda sd: {k: v for k, v in sd.items() if k != name})
  with pytest.raises(ValueError, match=r'missing tensor.*up_proj'):
    hf_io.load_hf(str(bad))
  bad = _copy_with(ckpts / 'f32', tmp_path / 'extra',
                   lambda sd: {**sd, 'model.layers.0.extra.weight': sd[name].clone()})
  with pytest.raises(ValueError, match=r'unexpected tensor.*extra'):
    hf_io.load_hf(str(bad))
  bad = _copy_with(ckpts / 'f32', tmp_path / 'shape', lambda sd: {**sd, name: sd[name][:, :-1].contiguous()})
  with pytest.raises(ValueError, match=r"up_proj.weight'.*shape \[164, 95\]"):
    hf_io.load_hf(str(bad))
  bad = _copy_with(ckpts / 'f32', tmp_path / 'dtype', lambda sd: {**sd, name: sd[name].half()})
  with pytest.raises(ValueError, match=r'up_proj.weight.*dtype F16'):
    hf_io.load_hf(str(bad))
  for field, value, match in (('use_sliding_window', True, 'use_sliding_window'),
                              ('hidden_act', 'gelu', 'hidden_act'),
                              ('model_type', 'qwen2_vl', 'model_type')):
    d = tmp_path / f'cfg_{field}'
    shutil.copytree(ckpts / 'f32', d)
    hf = json.load(open(d / 'config.json'))
    hf[field] = value
    hf.get('text_config', {}).pop(field, None)
    json.dump(hf, open(d / 'config.json', 'w'))
    with pytest.raises(ValueError, match=match):
      hf_io.load_hf(str(d))
  d = tmp_path / 'bin'
  d.mkdir()
  shutil.copy(ckpts / 'f32' / 'config.json', d)
  (d / 'pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(FileNotFoundError, match='pickle'):
    hf_io.load_hf(str(d))


@pytest.mark.parametrize('preset', ['qwen2_5_vl_3b', 'qwen2_5_vl_7b'])  # tied and untied; 32B has 7B's structure
def test_full_size_tree_and_names_match_transformers(preset):
  """eval_shape of our full-size model: parameter count == transformers' (meta device), and the HF name table
  gives exactly transformers' save_pretrained names and shapes."""
  from ral_jax.models import hf_names
  from ral_jax.models.config import get_preset as gp
  cfg = gp(preset)
  pix = jax.ShapeDtypeStruct((1, 16, cfg.vision.patch_dim), jnp.float32)
  meta = vision_inputs.build_vision_inputs_batch(np.array([[[1, 4, 4]]]), 16, cfg.vision)
  ours = jax.eval_shape(lambda p: init_params(cfg, jax.random.key(0), (p, meta)), pix)
  n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours))
  with torch.device('meta'):
    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf()))
  assert n_ours == sum(p.numel() for p in model.parameters())
  # transformers 4.57 saves with hub names (visual.*, model.layers.*): invert its in-memory renaming
  want = {}
  for k, v in model.state_dict().items():
    if cfg.tie_word_embeddings and k == 'lm_head.weight':
      continue
    k = k.replace('model.visual.', 'visual.').replace('model.language_model.', 'model.')
    want[k] = tuple(v.shape)
  got = {s.hf_name(i): s.hf_shape for s in hf_names.all_specs(cfg, 'hub') for i in range(max(s.layers, 1))}
  assert got == want
  for s in hf_names.all_specs(cfg):
    leaf = ours
    for key in s.path:
      leaf = leaf[key]
    assert leaf.shape == s.full_flax_shape, s.path
