"""The teacher-forced decoder pass with each prompt computed once for its G samples (scoring and RL update).

The RL batch holds R = B*G rows ordered b*G + g: sample g of prompt b is [prompt b (left-padded, Tp slots) |
response (right-padded, Tr slots)], and the G samples of a prompt share the identical prompt tokens, positions and
visual embeddings. Attention is causal, so a prompt token never sees a response: the prompt's hidden states, keys
and values are the same in the G rows. This pass carries, through every layer,

  h_p [B,Tp,D]   the prompt states, one copy per prompt,
  h_r [R,Tr,D]   the response states, one per row;

token-wise parts (norms, projections, MLP) run on each; attention runs the prompt alone through the full-sequence
causal path (`attention.causal_attention`: cuDNN's packed mode, the TPU flash kernel, ...) and the responses'
queries over [prompt b | own response] with the visibility of the whole sequence
(`attention.prefix_response_attention`). The result is exactly the full forward on the G-fold repeated sequences
(same operations on the same numbers up to floating-point reassociation); its gradient with respect to a shared
prompt state is the sum over the G rows that read it, which the repeat's transpose gives. Tokens computed per
pass: B*Tp + R*Tr instead of R*(Tp + Tr) (Qwen2.5-VL-3B RL shape, 16 x 8 rows, Tp = 2304, Tr = 512: 3.5x fewer).

Layer stack as `TextModel.__call__` (models/text.py): all L layers in one `lax.scan` (or a Python loop), each under
`jax.checkpoint` with cfg.remat_policy; the carry keeps the inputs (h_p, h_r) of the recorded layers (a select,
nothing stacked over L), and after the stack `DecoderLayer.record_shared_prefix` recomputes the recorded layer's
q/k and the record with the unchanged `attention_record`: keys of the whole sequence (prompt keys repeated over G,
then the row's response keys), queries of slots Tp-1 .. Tp+Tr-1 (the last prompt slot for rows='producing'), so
the policy [R,Rr,S = Tp+Tr] is the full forward's.

Output: the final-normed states that predict the response tokens, [R,Tr,D] = (the last prompt state h_p[b, Tp-1],
repeated over G, then h_r[:, :Tr-1]), i.e. `rl.logprobs.response_slice` of the full forward's hidden states.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from ral_jax.models.rope import mrope_angles
from ral_jax.models.text import DecoderLayer, normalize_layers, record_params, remat_policy, run_layers


def samples_per_prompt(prompts: int, rows: int) -> int:
  """G = rows / prompts for R = B*G response rows ordered b*G + g; a clear error when R is not a multiple of B."""
  if rows % prompts:
    raise ValueError(f'{rows} response rows are not a multiple of the {prompts} prompts (rows must be b*G + g)')
  return rows // prompts


def _check_shapes(h_p, pos_p, mask_p, h_r, pos_r, mask_r):
  (B, Tp, _), (R, Tr, _) = h_p.shape, h_r.shape
  samples_per_prompt(B, R)
  for name, got, want in (('prompt positions', pos_p.shape, (3, B, Tp)), ('response positions', pos_r.shape,
                                                                          (3, R, Tr)),
                          ('prompt mask', mask_p.shape, (B, Tp)), ('response mask', mask_r.shape, (R, Tr))):
    if tuple(got) != want:
      raise ValueError(f'{name} shape {tuple(got)} != {want}')
  if Tp < 1 or Tr < 1:
    raise ValueError(f'shared-prefix pass needs Tp >= 1 and Tr >= 1 (got Tp={Tp}, Tr={Tr})')


def shared_prefix_stack(tm, h_p, pos_p, mask_p, h_r, pos_r, mask_r, *, record_rows=None,
                        record_layers: Sequence[int] = (-1,), record_heads: bool = False):
  """The decoder stack of a bound `TextModel` tm on the shared-prefix layout (module docstring).

  h_p [B,Tp,D] prompt input embeddings, pos_p [3,B,Tp], mask_p [B,Tp] (1 real); h_r [R,Tr,D], pos_r [3,R,Tr],
  mask_r [R,Tr] (R = B*G, rows b*G + g); record_rows [R,Rr] int32 whole-sequence slots (>= Tp-1, or < 0 unused) or
  None. Returns (hidden [R,Tr,D] predicting the response tokens, record {layer: {'policy' [R,Rr,Tp+Tr], ...}})."""
  _check_shapes(h_p, pos_p, mask_p, h_r, pos_r, mask_r)
  cfg = tm.cfg
  L = cfg.num_hidden_layers
  G = h_r.shape[0] // h_p.shape[0]
  angles = lambda pos: mrope_angles(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
  rope_p, rope_r = angles(pos_p), angles(pos_r)
  valid_p, valid_r = mask_p.astype(bool), mask_r.astype(bool)
  stack = tm.layers
  use_remat, policy = remat_policy(cfg.remat_policy)

  def layer_fn(p, hp, hr):
    return tm._layer().apply({'params': p}, hp, hr, rope_p, rope_r, valid_p, valid_r,
                             method=DecoderLayer.shared_prefix)
  layer_fn = jax.checkpoint(layer_fn, policy=policy) if use_remat else layer_fn

  rec_layers = normalize_layers(record_layers, L) if record_rows is not None else ()
  (h_p, h_r), inputs = run_layers(layer_fn, stack, (h_p, h_r), rec_layers, L, cfg.scan_layers)

  def rec_fn(p, hp, hr):
    return tm._layer().apply({'params': p}, hp, hr, rope_p, rope_r, valid_p, valid_r, record_rows, record_heads,
                             method=DecoderLayer.record_shared_prefix)
  rec_fn = jax.checkpoint(rec_fn, policy=policy) if use_remat else rec_fn
  records = {l: rec_fn(record_params(stack, l), *inputs[l]) for l in rec_layers}
  # The states predicting response token t: the last prompt slot for t = 0, response slot t-1 after (norm is
  # token-wise, so only those slots are normed).
  last = jnp.repeat(tm.norm(h_p[:, -1:]), G, axis=0)
  return jnp.concatenate([last, tm.norm(h_r[:, :-1])], axis=1), records
