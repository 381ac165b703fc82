"""Decoder self-attention of Qwen2.5-VL (GQA, q/k/v bias, M-RoPE) and the attention record (ral_jax/docs/method.md
s.1).

Shapes: x [B,T,D]; q [B,T,N,H]; k, v [B,S,K,H] with N = K * G (GQA groups G). Slots: query t of a sequence sits
at key slot t (no cache) or at slot index[b] + t (KV cache); a key j is visible to query slot i iff
key_valid[b, j] and j <= i (causal, self included), exactly as transformers' eager attention with a padding mask.

Two cache layouts: the model's cached `__call__` (prefill, tests) keeps [B,Smax,K,H] per layer; `Attention.decode`
(the rollout's one-token step, R = B*G rows) keeps per layer a prompt cache [B,K,Tp,H] shared by the G samples of a
prompt and a response cache [R,K,Tr,H] per row, and attends over both with one softmax (`attend_shared_prefix`):
kv-head-leading layouts, so that the einsums of a T = 1 query are batched matmuls that read each cache once.

Two computations use the projected, rotated q and k:
- the layer output (`Attention.__call__`), through `jax.nn.dot_product_attention` (implementation=
  cfg.attention_impl: XLA on CPU, cuDNN on GPU when asked), softmax scale 1/sqrt(H); on TPU the full-sequence
  causal pass (training forward, scoring) goes through the Pallas flash-attention kernel instead
  (`tpu_flash_attention`), because XLA's TPU attention materialises [B,N,T,S] logits (163 GiB per device for the
  paper's scoring pass); cfg.attention_impl='xla' turns that off; with cuDNN and a padding mask the pass packs
  each row's valid tokens to the front and uses the kernel's causal + sequence-length mode
  (`packed_causal_attention`) instead of a dense bias;
- the record (`Attention.record`, see `attention_record`), which recomputes q and k from the layer input
  (text.py keeps the recorded layers' inputs), so the layer stack itself never changes shape.

Shared prompt (teacher-forced scoring and update with each prompt computed once for its G samples;
models/shared_prefix.py): `Attention.shared_prefix` runs the prompt [B,Tp] through the full-sequence causal pass
(`causal_attention`, the same kernel choice as above) and the response queries [B*G,Tr] over [prompt | own response]
keys with the whole sequence's visibility (`prefix_response_attention`, one dense mask); its record
(`record_shared_prefix`) is `attention_record` over the whole sequence's keys with the queries of slots Tp-1 onward.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ral_jax.models.layers import DenseGeneral

# Logical axes of q/k/v [B,T,N,H] and of the key padding mask [B,T] for the kernel's shard_map.
_QKV_AXES = ('activation_batch', 'activation_length', 'activation_heads', None)
from ral_jax.models.rope import apply_rope

_NEG = -1e30  # finite "minus infinity" for float32 logits (keeps fully masked rows NaN-free)


def visibility_mask(key_valid, q_slot):
  """key_valid [B,S] bool, q_slot [B,T] int -> [B,1,T,S] bool: key j visible to query t iff valid and j <= slot."""
  s = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
  return key_valid[:, None, None, :] & (s[None, None, None, :] <= q_slot[:, None, :, None])


def attention_record(q, k, key_valid, rows, *, chunk: int, with_heads: bool = False, q_offset: int = 0):
  """Head-averaged attention policy rows (ral_jax/docs/method.md Eq. 2) of one layer, in float32.

  q [B,T,N,H] (rotated queries of slots q_offset .. q_offset+T-1; q_offset = 0 and T == S for a whole sequence),
  k [B,S,K,H] (rotated keys of slots 0..S-1), key_valid [B,S] bool, rows [B,R] int32 (query slots, each in
  [q_offset, q_offset+T); < 0 marks an unused row). For row r of example b with t = rows[b,r]:
    alpha[n, j] = softmax_j( q[b,t,n] . k[b,j,n//G] / sqrt(H) ) over visible keys j (valid, j <= t)
    a[j]        = mean_n alpha[n, j]
    policy[b,r,j] = a[j] / sum_{i<t} a[i]  for j < t (and 0 at j >= t, at padding keys, and for unused rows;
                    a row whose earlier keys are all padding, e.g. t = 0, is all zeros).
  Computed in chunks of `chunk` rows under `lax.map`, each chunk under `jax.checkpoint`, so the forward keeps only
  the [B,R,S] result (plus one chunk's [B,N,chunk,S] while it runs); gradients reach q and k.
  Returns (policy [B,R,S] f32, heads [B,N,R,S] f32 or None). `heads` holds the raw per-head post-softmax alpha
  (self weight included, not renormalised): for visualisation.
  """
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  R = rows.shape[1]
  C = max(1, min(chunk, R))
  n_chunks = -(-R // C)
  rows_p = jnp.pad(rows.astype(jnp.int32), ((0, 0), (0, n_chunks * C - R)), constant_values=-1)
  rows_c = rows_p.reshape(B, n_chunks, C).transpose(1, 0, 2)          # [nC,B,C]
  scale = 1.0 / math.sqrt(H)
  j = jnp.arange(S, dtype=jnp.int32)

  def one_chunk(r):                                                   # r [B,C]
    qc = jnp.take_along_axis(q, jnp.clip(r - q_offset, 0, T - 1)[:, :, None, None], axis=1)   # [B,C,N,H]
    qc = qc.reshape(B, C, K, G, H)
    logits = jnp.einsum('bckgh,bskh->bkgcs', qc, k, preferred_element_type=jnp.float32) * scale
    visible = key_valid[:, None, :] & (j[None, None, :] <= r[:, :, None])          # [B,C,S]
    vis5 = visible[:, None, None]
    logits = jnp.where(vis5, logits.astype(jnp.float32), _NEG)
    logits = logits - jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.where(vis5, jnp.exp(logits), 0.0)
    alpha = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)            # [B,K,G,C,S]
    a = jnp.mean(alpha, axis=(1, 2))                                                # [B,C,S]
    earlier = visible & (j[None, None, :] < r[:, :, None]) & (r[:, :, None] >= 0)
    a = jnp.where(earlier, a, 0.0)
    denom = jnp.sum(a, axis=-1, keepdims=True)
    policy = jnp.where(denom > 0, a / jnp.where(denom > 0, denom, 1.0), 0.0)
    if not with_heads:
      return policy, None
    heads = jnp.where((r >= 0)[:, None, :, None], alpha.reshape(B, N, C, S), 0.0)
    return policy, heads

  policy, heads = jax.lax.map(jax.checkpoint(one_chunk), rows_c)    # [nC,B,C,S], [nC,B,N,C,S]
  policy = policy.transpose(1, 0, 2, 3).reshape(B, n_chunks * C, S)[:, :R]
  if heads is not None:
    heads = heads.transpose(1, 2, 0, 3, 4).reshape(B, N, n_chunks * C, S)[:, :, :R]
  return policy, heads


def attend_cache(q, k, v, valid):
  """One query per row over a per-row cache: q [R,1,N,H], k/v [R,K,S,H], valid [R,S] bool -> [R,1,N,H].

  softmax_s(q . k_s / sqrt(H)) over valid slots, as `jax.nn.dot_product_attention`'s XLA path computes it (float32
  logits and softmax, probabilities cast to v's dtype). The (rows, kv heads) batch dims lead, so both einsums are
  plain batched matmuls that read the cache once, with no transposed copy. The rollout decodes with
  `attend_shared_prefix` (prompt cache shared by a prompt's samples); this per-row form is its reference in tests."""
  R, _, N, H = q.shape
  K = k.shape[1]
  qg = q.reshape(R, K, N // K, H)
  logits = jnp.einsum('rkgh,rksh->rkgs', qg, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(1.0 / math.sqrt(H))
  logits = jnp.where(valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('rkgs,rksh->rkgh', probs, v)
  return out.reshape(R, 1, N, H)


def attend_shared_prefix(q, prompt_k, prompt_v, prompt_valid, k, v, valid):
  """One query per row over a prompt cache shared by the G samples of each prompt plus the row's own response cache.

  q [R,1,N,H] with R = B*G rows ordered b*G + g (G samples per prompt); prompt_k/prompt_v [B,K,Tp,H] (one copy per
  prompt), prompt_valid [B,Tp] bool; k/v [R,K,Tr,H], valid [R,Tr] bool -> [R,1,N,H]. Here Q = N // K is the number
  of query heads per kv head. The result is `attend_cache` over the row's [prompt | response] cache: ONE softmax
  over the Tp + Tr slots (float32 logits, max over both parts, exp, one sum), probabilities cast to v's dtype. The
  prompt part is a batched matmul over (b, k) whose rows are the G*Q queries of the prompt's samples, so the
  prompt's keys and values are read once per prompt, not once per sample (decoding is bound by those reads).
  The two value products accumulate in float32 and are summed before the cast to v's dtype."""
  R, _, N, H = q.shape
  B, K = prompt_k.shape[:2]
  if R % B:
    raise ValueError(f'{R} rows are not a multiple of the {B} prompts of the shared cache')
  G, Q, f32 = R // B, N // K, jnp.float32
  qb = q.reshape(B, G, K, Q, H)
  kr, vr = k.reshape(B, G, K, -1, H), v.reshape(B, G, K, -1, H)
  scale = f32(1.0 / math.sqrt(H))
  lp = jnp.einsum('bgkqh,bksh->bkgqs', qb, prompt_k, preferred_element_type=f32) * scale     # [B,K,G,Q,Tp]
  lr = jnp.einsum('bgkqh,bgksh->bkgqs', qb, kr, preferred_element_type=f32) * scale          # [B,K,G,Q,Tr]
  neg = jnp.finfo(f32).min
  lp = jnp.where(prompt_valid[:, None, None, None, :], lp, neg)
  lr = jnp.where(valid.reshape(B, G, -1)[:, None, :, None, :], lr, neg)
  m = jax.lax.stop_gradient(jnp.maximum(lp.max(-1, keepdims=True), lr.max(-1, keepdims=True)))
  ep, er = jnp.exp(lp - m), jnp.exp(lr - m)
  denom = ep.sum(-1, keepdims=True) + er.sum(-1, keepdims=True)
  pp, pr = (ep / denom).astype(v.dtype), (er / denom).astype(v.dtype)
  out = (jnp.einsum('bkgqs,bksh->bkgqh', pp, prompt_v, preferred_element_type=f32)
         + jnp.einsum('bkgqs,bgksh->bkgqh', pr, vr, preferred_element_type=f32))          # [B,K,G,Q,H]
  # (batch dims leading in the output: XLA's CPU runtime has no bf16 x bf16 -> f32 dot with a transposed output)
  return out.astype(v.dtype).transpose(0, 2, 1, 3, 4).reshape(R, 1, N, H)


def packed_causal_attention(q, k, v, key_valid, implementation):
  """Causal attention under a key padding mask through the fused kernel's sequence-length mode, not a bias.

  q [B,T,N,H], k/v [B,T,K,H], key_valid [B,T] bool (queries at slots 0..T-1). cuDNN turns a `mask` into a dense
  [B,1,T,S] bias and then computes every (query, key) block (no causal skipping; 14% slower forward + backward at
  Qwen2.5-VL-3B, 2816 tokens, H200); its fast path takes only a causal flag and per-row lengths of a valid *prefix*.
  So each row's valid tokens are packed to the front in their order (a stable partition: valid first, then padding),
  attended with is_causal + lengths, and unpacked: a valid query at slot t sees exactly the valid keys j <= t, as
  with the mask, for any mask (left / right padding, holes). q and k carry their rotary angles already, so the
  packed order changes no score. No data-dependent control flow: one gather per operand and one for the output.
  Outputs at padding slots are not defined (finite; never read)."""
  B, T = key_valid.shape
  valid = key_valid.astype(jnp.int32)
  n_valid = jnp.sum(valid, axis=1, dtype=jnp.int32)
  # packed slot of original slot j: valid tokens 0..n-1 in order, then the padding n..T-1 in order
  back = jnp.where(key_valid, jnp.cumsum(valid, axis=1) - 1, n_valid[:, None] + jnp.cumsum(1 - valid, axis=1) - 1)
  rows = jnp.arange(B, dtype=jnp.int32)[:, None]
  fwd = jnp.zeros((B, T), jnp.int32).at[rows, back].set(jnp.arange(T, dtype=jnp.int32)[None, :],
                                                          unique_indices=True)   # inverse permutation
  n = jnp.maximum(n_valid, 1)                      # an all-padding row attends its first packed slot (finite)
  pack = lambda x: permute_slots(x, fwd, back)
  out = jax.nn.dot_product_attention(pack(q), pack(k), pack(v), is_causal=True,
                                     query_seq_lengths=n, key_value_seq_lengths=n, implementation=implementation)
  return permute_slots(out, back, fwd)


@jax.custom_vjp
def permute_slots(x, perm, inverse):
  """x [B,T,...] -> x[b, perm[b, i]] for a per-row permutation `perm` [B,T] with inverse `inverse`. Its cotangent is
  the inverse gather, not the scatter-add that autodiff makes of a gather's transpose (atomics; 0.4 s of the 3B
  update on an H200)."""
  return _take_slots(x, perm)


def _take_slots(x, idx):
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _permute_fwd(x, perm, inverse):
  return _take_slots(x, perm), (perm, inverse)


def _permute_bwd(res, g):
  perm, inverse = res
  return _take_slots(g, inverse), None, None


permute_slots.defvjp(_permute_fwd, _permute_bwd)


def causal_attention(q, k, v, key_valid, q_slot, implementation):
  """The full-sequence causal pass (slots 0..T-1, no cache): q [B,T,N,H], k/v [B,T,K,H], key_valid [B,T] bool or
  None, q_slot [B,T]. The Pallas flash kernel on TPU (`use_tpu_flash`); else the causal flag (+ a key padding mask
  [B,1,1,S]; mask=None is cuDNN's fastest path), except cuDNN with a padding mask, which takes its sequence-length
  mode (`packed_causal_attention`)."""
  if use_tpu_flash(implementation, q.shape[1]):
    return tpu_flash_attention(q, k, v, key_valid)
  if key_valid is None or implementation != 'cudnn':
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
  return packed_causal_attention(q, k, v, key_valid, implementation)


def prefix_response_attention(q, prompt_k, prompt_v, prompt_valid, k, v, valid, implementation):
  """The responses' queries of a teacher-forced pass whose G samples per prompt share the prompt.

  q [R,Tr,N,H] (response slots Tp..Tp+Tr-1; R = B*G rows ordered b*G + g), prompt_k/prompt_v [B,Tp,K,H] (one copy
  per prompt), prompt_valid [B,Tp] bool, k/v [R,Tr,K,H], valid [R,Tr] bool -> [R,Tr,N,H]. Keys of row b*G + g are
  [prompt b | its own response] (the prompt's k/v repeated over G: small under GQA), visible as in the whole
  sequence: key j seen by the query at slot Tp + i iff it is valid and j <= Tp + i. One dense mask through
  `jax.nn.dot_product_attention` (cuDNN: a bias; only the Tr x Tr upper triangle of the response block is
  wasted). Equals the response rows of `causal_attention` on the G-fold repeated [prompt | response] sequences."""
  R, Tr = q.shape[:2]
  B, Tp = prompt_valid.shape
  if R % B:
    raise ValueError(f'{R} response rows are not a multiple of the {B} prompts they share')
  rep = lambda x: jnp.repeat(x, R // B, axis=0)
  k_all = jnp.concatenate([rep(prompt_k).astype(k.dtype), k], axis=1)
  v_all = jnp.concatenate([rep(prompt_v).astype(v.dtype), v], axis=1)
  key_valid = jnp.concatenate([rep(prompt_valid), valid.astype(bool)], axis=1)
  q_slot = jnp.broadcast_to(Tp + jnp.arange(Tr, dtype=jnp.int32), (R, Tr))
  return jax.nn.dot_product_attention(q, k_all, v_all, mask=visibility_mask(key_valid, q_slot),
                                      implementation=implementation)


def _target_platform() -> str:
  """Platform the current trace compiles for: that of the mesh set by `jax.set_mesh` (an AOT compile for TPU
  topology devices on a CPU host says 'tpu'), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  dev = None if mesh.empty else mesh.abstract_device
  return dev.platform if dev is not None else jax.default_backend()


def flash_block(t: int) -> int:
  """Largest kernel tile (512, 256 or 128) that divides the sequence length t; 0 if none does."""
  return next((b for b in (512, 256, 128) if t % b == 0), 0)


def use_tpu_flash(impl: Optional[str], t: int) -> bool:
  """The full-sequence causal pass runs the Pallas TPU kernel when impl is None (auto), the trace compiles for
  TPU and a kernel tile divides t (prompt and response buckets are multiples of 128 in the shipped presets)."""
  return impl is None and _target_platform() == 'tpu' and flash_block(t) > 0


def tpu_flash_attention(q, k, v, key_valid):
  """Causal GQA attention through jax.experimental.pallas.ops.tpu.flash_attention (never materialises [T,S]).

  q [B,T,N,H], k/v [B,T,K,H], key_valid [B,T] bool or None. Returns [B,T,N,H] in q's dtype. Key padding becomes
  segment ids (valid 1, padding 0) on both sides: a valid query sees exactly the valid keys at or before it (as the
  XLA path); a padding query sees the padding keys at or before it, itself included, so it stays finite (its output
  is never read). K/V heads are repeated to N (the kernel has no GQA). Under a mesh (jax.set_mesh) the kernel runs
  per shard (shard_map: batch over the rules' activation_batch axes, heads over activation_heads), since XLA cannot
  partition a custom kernel call. Mosaic refuses fp32 contract precision on bf16 operands, and dots take the
  global `jax_default_matmul_precision` when the step is lowered: with bf16 compute, leave it at its default (the
  test suite sets 'highest' and compiles the TPU check under `jax.default_matmul_precision('default')`)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  B, T, N, H = q.shape
  G = N // k.shape[2]
  if G > 1:
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  seg = (jnp.ones((B, T), jnp.int32) if key_valid is None else key_valid.astype(jnp.int32))
  blk = flash_block(T)
  sizes = fa.BlockSizes(block_q=blk, block_k_major=blk, block_k=blk, block_b=1, block_q_major_dkv=blk,
                        block_k_major_dkv=blk, block_k_dkv=blk, block_q_dkv=blk, block_k_major_dq=blk,
                        block_k_dq=blk, block_q_dq=blk)

  def kernel(q, k, v, seg):
    t = lambda x: jnp.swapaxes(x, 1, 2)                  # [B,T,N,H] <-> [B,N,T,H]
    out = fa.flash_attention(t(q), t(k), t(v), segment_ids=fa.SegmentIds(seg, seg), causal=True,
                             sm_scale=1.0 / math.sqrt(H), block_sizes=sizes)
    return t(out).astype(q.dtype)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q, k, v, seg)
  spec = nn.logical_to_mesh_axes(_QKV_AXES)
  spec = _fit(spec, q.shape, mesh)
  spec = P(spec[0], None, spec[2], None)
  seg_spec = P(spec[0], None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec,
                       check_vma=False)(q, k, v, seg)


def _fit(spec, shape, mesh):
  """Drops mesh axes from dims they do not divide (e.g. 4 heads on tensor=8)."""
  def size(e):
    if e is None:
      return 1
    return math.prod(mesh.shape[a] for a in (e if isinstance(e, tuple) else (e,)))
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return P(*[e if e is not None and shape[i] % size(e) == 0 else None for i, e in enumerate(entries)])


def write_cache(cache, new, index):
  """cache [B,Smax,...], new [B,T,...], index [B] int32 -> cache with new[b] written at slots index[b]..+T."""
  def one(c, n, i):
    return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (i,) + (0,) * (c.ndim - 1))
  return jax.vmap(one)(cache, new, index)


class Attention(nn.Module):
  """GQA self-attention. Params: q_proj kernel [D,N,H] bias [N,H]; k_proj/v_proj kernel [D,K,H] bias [K,H];
  o_proj kernel [N,H,D] (no bias)."""
  cfg: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.q_proj = DenseGeneral((N, H), ('embed',), ('heads', 'head_dim'), use_bias=True, **kw)
    self.k_proj = DenseGeneral((K, H), ('embed',), ('kv_heads', 'head_dim'), use_bias=True, **kw)
    self.v_proj = DenseGeneral((K, H), ('embed',), ('kv_heads', 'head_dim'), use_bias=True, **kw)
    self.o_proj = DenseGeneral((cfg.hidden_size,), ('heads', 'head_dim'), ('embed',), **kw)

  def queries_keys(self, x, cos, sin):
    """x [B,T,D] -> rotated q [B,T,N,H], k [B,T,K,H]."""
    q = nn.with_logical_constraint(apply_rope(self.q_proj(x), cos, sin),
                                   ('activation_batch', 'activation_length', 'activation_heads', None))
    k = nn.with_logical_constraint(apply_rope(self.k_proj(x), cos, sin),
                                   ('activation_batch', 'activation_length', 'activation_kv_heads', None))
    return q, k

  def record(self, x, cos, sin, key_valid, record_rows, record_heads: bool = False):
    """The attention record of this layer for the (normed) layer input x [B,T,D]; uses only q_proj and k_proj.
    key_valid [B,T] bool or None (all valid). Returns {'policy': [B,R,S]} (+ 'heads' [B,N,R,S])."""
    q, k = self.queries_keys(x, cos, sin)
    if key_valid is None:
      key_valid = jnp.ones(k.shape[:2], bool)
    policy, heads = attention_record(q, k, key_valid, record_rows, chunk=self.cfg.record_chunk,
                                     with_heads=record_heads)
    return {'policy': policy, 'heads': heads} if record_heads else {'policy': policy}

  def _qkv(self, x, cos, sin):
    q, k = self.queries_keys(x, cos, sin)
    v = nn.with_logical_constraint(self.v_proj(x), ('activation_batch', 'activation_length',
                                                    'activation_kv_heads', None))
    return q, k, v

  def shared_prefix(self, x_p, x_r, rope_p, rope_r, valid_p, valid_r):
    """Teacher-forced attention with the prompt computed once per group (models/shared_prefix.py).

    x_p [B,Tp,D] (normed prompt inputs, one per prompt), x_r [R,Tr,D] (normed response inputs, R = B*G rows b*G+g);
    rope_p = (cos, sin) [B,Tp,H], rope_r [R,Tr,H]; valid_p [B,Tp], valid_r [R,Tr] bool. The prompt runs the
    full-sequence causal pass on its own (`causal_attention`: it never sees a response), the responses attend to
    [prompt | own response] (`prefix_response_attention`). Returns (out_p [B,Tp,D], out_r [R,Tr,D])."""
    impl = self.cfg.attention_impl
    q_p, k_p, v_p = self._qkv(x_p, *rope_p)
    q_r, k_r, v_r = self._qkv(x_r, *rope_r)
    B, Tp = valid_p.shape
    out_p = causal_attention(q_p, k_p, v_p, valid_p, jnp.broadcast_to(jnp.arange(Tp, dtype=jnp.int32), (B, Tp)),
                             impl)
    out_r = prefix_response_attention(q_r, k_p, v_p, valid_p, k_r, v_r, valid_r, impl)
    axes = ('activation_batch', 'activation_length', 'activation_heads', None)
    return (self.o_proj(nn.with_logical_constraint(out_p, axes)),
            self.o_proj(nn.with_logical_constraint(out_r, axes)))

  def record_shared_prefix(self, x_p, x_r, rope_p, rope_r, valid_p, valid_r, record_rows, record_heads=False):
    """`record` of the [prompt | response] rows from the shared-prefix layout (arguments as `shared_prefix`;
    record_rows [R,Rr] in whole-sequence slots, each >= Tp - 1 or < 0 = unused). The keys are the whole sequence's
    (prompt keys repeated over G, then the row's response keys), the queries those of slots Tp-1 .. Tp+Tr-1 (the
    last prompt slot, which 'producing' rows need, and the responses): the same `attention_record` as `record`."""
    B, Tp = valid_p.shape
    R = x_r.shape[0]
    rep = lambda x: jnp.repeat(x, R // B, axis=0)
    cos_p, sin_p = rope_p
    q_last = apply_rope(self.q_proj(x_p[:, -1:]), cos_p[:, -1:], sin_p[:, -1:])     # [B,1,N,H]
    k_p = apply_rope(self.k_proj(x_p), cos_p, sin_p)
    q_r, k_r = self.queries_keys(x_r, *rope_r)
    q = jnp.concatenate([rep(q_last), q_r], axis=1)                                   # slots Tp-1 ..
    k = jnp.concatenate([rep(k_p), k_r], axis=1)                                      # slots 0 ..
    key_valid = jnp.concatenate([rep(valid_p), valid_r], axis=1)
    policy, heads = attention_record(q, k, key_valid, record_rows, chunk=self.cfg.record_chunk,
                                     with_heads=record_heads, q_offset=Tp - 1)
    return {'policy': policy, 'heads': heads} if record_heads else {'policy': policy}

  def decode(self, x, cos, sin, prompt, k_cache, v_cache, valid, slot):
    """One new token per row on this layer's caches (the rollout's decode step).

    x [R,1,D] (normed layer input, rows b*G + g); cos/sin [R,1,H]; prompt = (k [B,K,Tp,H], v, valid [B,Tp] bool),
    the layer's prompt cache shared by the G = R // B samples of each prompt (read only); k_cache/v_cache
    [R,K,Tr,H], the rows' response caches; valid [R,Tr] bool with the new slot already marked; slot [] int32, the
    response slot shared by all rows. Writes the token's k/v at `slot` and attends over the valid prompt and
    response slots (`attend_shared_prefix`). Returns (out [R,1,D], k_cache, v_cache)."""
    q = apply_rope(self.q_proj(x), cos, sin)
    k = apply_rope(self.k_proj(x), cos, sin)
    v = self.v_proj(x)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, slot, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, slot, 0))
    pk, pv, pvalid = prompt
    c = lambda a: a.astype(q.dtype)
    out = attend_shared_prefix(q, c(pk), c(pv), pvalid, c(k_cache), c(v_cache), valid)
    return self.o_proj(out), k_cache, v_cache

  def __call__(self, x, cos, sin, key_valid, q_slot, *, kv_cache=None, cache_index=None, causal_fast: bool = True):
    """x [B,T,D]; cos/sin [B,T,H]; key_valid [B,S] bool, or None = all valid (S = T, or the cache length with
    the new tokens already marked); q_slot [B,T] int32 slots of the queries; kv_cache (k [B,Smax,K,H], v) or
    None; cache_index [B]. Returns (out [B,T,D], new kv_cache or None)."""
    cfg = self.cfg
    q, k, v = self._qkv(x, cos, sin)
    new_cache = None
    if kv_cache is not None:
      k_all = write_cache(kv_cache[0], k, cache_index)
      v_all = write_cache(kv_cache[1], v, cache_index)
      new_cache = (k_all, v_all)
      out = jax.nn.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                         mask=visibility_mask(key_valid, q_slot), implementation=cfg.attention_impl)
    elif causal_fast:
      out = causal_attention(q, k, v, key_valid, q_slot, cfg.attention_impl)
    else:   # cuDNN turns a mask into a bias: give it the full [B,1,T,S] visibility
      out = jax.nn.dot_product_attention(q, k, v, mask=visibility_mask(key_valid, q_slot),
                                         implementation=cfg.attention_impl)
    out = nn.with_logical_constraint(out, ('activation_batch', 'activation_length', 'activation_heads', None))
    return self.o_proj(out), new_cache
