"""Memory at scale: the TPU attention kernel path, per-leaf random init, the fit check, and (with libtpu) the
paper preset's compiled memory on v5p:2x2x2 against the goals of README 'Memory at scale'."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ral_jax import aot, sharding
from ral_jax.models import attention

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


def test_tpu_flash_attention_matches_xla_attention_in_interpret_mode():
  """The Pallas TPU kernel as the model calls it (GQA heads repeated, key padding as segment ids, sharded over
  batch and heads by shard_map under a mesh), run by Pallas' TPU interpreter on CPU: outputs and gradients at the
  valid positions equal XLA's masked causal attention."""
  pltpu = pytest.importorskip('jax.experimental.pallas.tpu')
  B, T, N, K, H = 2, 128, 4, 2, 128
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32)
  k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32)
  v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32)
  valid = jnp.ones((B, T), bool).at[1, :37].set(False)            # row 1 left-padded
  w = valid[:, :, None, None]

  def ref(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=valid[:, None, None, :], is_causal=True)

  mesh = sharding.make_mesh((2, 1, 2), devices=jax.devices()[:4])
  with pltpu.force_tpu_interpret_mode(), sharding.mesh_context(mesh, sharding.logical_rules()):
    out = jax.jit(lambda q, k, v: attention.tpu_flash_attention(q, k, v, valid))(q, k, v)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention.tpu_flash_attention(q, k, v, valid) * w),
                             (0, 1, 2)))(q, k, v)
  assert bool(jnp.all(jnp.isfinite(out)))                          # padding queries stay finite
  np.testing.assert_allclose(np.asarray(out * w), np.asarray(ref(q, k, v) * w), atol=2e-5)
  want = jax.grad(lambda q, k, v: jnp.sum(ref(q, k, v) * w), (0, 1, 2))(q, k, v)
  for g, r in zip(grads, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4)


def test_kernel_choice():
  assert attention.flash_block(9216) == 512 and attention.flash_block(2816) == 256 and attention.flash_block(100) == 0
  assert not attention.use_tpu_flash(None, 512)                    # CPU: XLA attention
  assert not attention.use_tpu_flash('xla', 512)


def test_per_leaf_init_layout_and_distribution():
  from ral_jax.models.config import get_preset
  from ral_jax.train import build
  cfg = get_preset('tiny')
  mesh = sharding.make_mesh((1, 4, 2))
  rules = sharding.logical_rules()
  a = build.init_model_params(cfg, mesh, rules, seed=3, per_leaf=True)
  b = build.init_model_params(cfg, mesh, rules, seed=3, per_leaf=True)
  # flax's init, abstractly: the same tree, shapes, dtypes and shardings
  shapes, shs = sharding.model_param_shardings(cfg, mesh, rules, build.dummy_vision_inputs(cfg))
  assert jax.tree.structure(a) == jax.tree.structure(shapes)
  for x, y, z, sh in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(shapes), jax.tree.leaves(shs)):
    assert x.shape == z.shape and x.dtype == z.dtype and x.sharding.is_equivalent_to(sh, x.ndim)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))               # deterministic in the seed
  lay = a['model']['layers']
  assert np.all(np.asarray(lay['input_layernorm']['scale']) == 1.0)
  assert np.all(np.asarray(lay['self_attn']['q_proj']['bias']) == 0.0)
  emb = np.asarray(a['model']['embed_tokens']['embedding'])
  assert abs(emb.std() - 0.02) < 0.002 and abs(emb.mean()) < 0.002
  assert not np.allclose(np.asarray(lay['mlp']['up_proj']['kernel'][0]), np.asarray(lay['mlp']['up_proj']['kernel'][1]))


class _Device:
  device_kind = 'test device'

  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return {'bytes_limit': self.limit}


def test_check_fits_names_the_knob():
  exe = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T).lower(jnp.ones((256, 256))).compile()
  peak = sharding.compiled_peak(exe)
  assert peak['peak'] >= peak['argument'] > 0
  sharding.check_fits(exe, 'the RL update', ('rl.micro_batches', 2), _Device(10 * peak['peak']))   # fits
  with pytest.raises(MemoryError, match=r'the RL update needs .* Raise --config.rl.micro_batches \(now 2; try \d+\)'):
    sharding.check_fits(exe, 'the RL update', ('rl.micro_batches', 2), _Device(peak['peak'] // 2))


# ---- with libtpu: the paper preset on v5p:2x2x2 (minutes of CPU compile; CI has no libtpu) -----------------
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install 'jax[tpu]==0.10.2' in its own venv)")
def test_paper_preset_fits_v5p_8_with_headroom():
  from configs import video
  from ral_jax.train import build, optim
  from ral_jax.train import config as run_config
  config = video.get_config('paper')
  target = aot.choose_target('v5p:2x2x2')
  assert not target.fake and len(target.devices) == 8
  with jax.default_matmul_precision('default'):   # conftest's 'highest' would reach the bf16 kernel's dots
    stats = aot.compile_steps(config, target, stages=('sft', 'score', 'rl'))
  hbm = target.hbm_gib * 2 ** 30
  # total state bytes (params + Adam moments), from the trainer's own layout
  run = run_config.build(aot._checkable(config), 8, warn=False)
  cfg = run.model
  mesh = sharding.make_mesh(run.mesh.shape, target.devices)
  abs_params, shs = sharding.model_param_shardings(cfg, mesh, sharding.logical_rules(), build.dummy_vision_inputs(cfg))
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params, shs)
  with sharding.mesh_context(mesh, sharding.logical_rules()):
    abs_state, _ = build.train_state_shardings(params, optim.make_optimizer(run.rl_optim))
  total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abs_state))
  for stage, s in stats.items():
    assert 'error' not in s, (stage, s)
    assert s['peak_estimate'] <= 0.85 * hbm, (stage, s['peak_estimate'] / 2 ** 30)
    assert s['peak_estimate'] <= 68e9, (stage, s['peak_estimate'] / 1e9)        # 8 x 80 GB GPUs
  # the state is sharded: the donated state argument of each update is at most 1.2 x its even share
  for stage in ('sft', 'rl'):
    assert stats[stage]['alias'] <= 1.2 * total / 8, (stage, stats[stage]['alias'] / 2 ** 30, total / 8 / 2 ** 30)
  assert stats['sft']['argument'] <= 1.2 * total / 8
