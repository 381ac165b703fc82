"""Pure, jittable step functions: scoring pass, RL mini-batch updates, SFT update, teacher scoring.

Batch-major arrays (N sequences, rows b*G+g; T = Tp + Tr; R = Tr recorded rows; S = T keys):
  ModelInputs  input_ids [N,T] i32, positions [N,3,T] i32 (batch-major; the model takes [3,N,T]),
               attention_mask [N,T] i32, visual_embeds [N,Nv,D] (vision tower output, computed once) or None.
  RLBatch      (rl/objective.py) response_ids, response_mask, advantages, old/ref log-probs, old/teacher policy.
Tp and Tr are static (read from the shapes), so each prompt bucket compiles once.

Conventions:
- Mini-batches and micro-batches are strided slices of the batch: row i of N belongs to mini-batch i mod n. With
  the batch sharded over ('data', 'fsdp'), `split_rows` keeps each slice evenly sharded. With sc.group_size = G > 1
  (set by rl.share_prompt) the RL splits (scoring chunks, mini- and micro-batches) take whole groups instead: group b
  (rows b*G .. b*G+G-1) belongs to slice b mod n, so every slice holds whole groups in b*G + g order.
- Shared prompt (sc.share_prompt, rl.share_prompt): `forward` computes each group's prompt once and its G responses
  against it (Qwen25VL.shared_prefix, models/shared_prefix.py) in the scoring, teacher and RL passes; inputs stay
  the full [N,T] rows (the prompt of group b is read from row b*G: the G rows hold the same prompt, as
  train/inputs.sequence_inputs builds them). Results equal the full forward's; the SFT step never shares.
- One RL call (`rl_update`) runs epochs x num_minibatches optimizer steps (lax.scan); each optimizer step sums the
  losses and gradients of its micro-batches, each normalised by the whole mini-batch's aggregation denominator
  (rl.objective.loss_denominators), so accumulation is exact for every aggregation mode; metrics are micro means.
- A non-finite loss or gradient skips that optimizer step (state unchanged, `skipped` counts it).
- The vision tower never appears inside a differentiated function, so its gradient is zero and its optimizer
  transform (set_to_zero) keeps it frozen.
- SFT loss: token-mean cross-entropy -sum log pi(y_t) / (valid target tokens of the whole batch), temperature 1.
- Shardings inside the updates: `shardings` (the TrainState's NamedShardings, given by train/build.make_steps) pins
  every gradient (grads are sharded like their parameters) and the state carried by the mini-batch and epoch scans
  to the state's layout. Without it XLA may pick a replicated layout for a scan carry: at 7B over 8 devices that
  was ~100 GiB of float32 temporaries (whole-model gradients and moments on every device).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from ral_jax.models.vlm import Qwen25VL, compute_params, lm_head_kernel
from ral_jax.rl.aggregation import masked_mean, masked_sum
from ral_jax.rl.attention_loss import record_rows
from ral_jax.rl.config import ObjectiveConfig
from ral_jax.rl.logprobs import response_slice, token_stats_from_hidden
from ral_jax.rl.objective import RLBatch, loss_denominators, loss_from_hidden
from ral_jax.train.state import TrainState, all_finite, select_tree


@flax.struct.dataclass
class ModelInputs:
  input_ids: jax.Array
  positions: jax.Array
  attention_mask: jax.Array
  visual_embeds: Optional[jax.Array] = None


def split_rows(tree, n: int, group: int = 1, knob: str = ''):
  """Leaves [N,...] -> [n, N/n, ...]. group = 1: row i in slice i mod n. group = G: whole groups of G consecutive
  rows (rows b*G + g), group b in slice b mod n (rows inside a slice stay in b*G + g order). None leaves stay None.
  `knob` names the setting that chose n, for the error."""
  def f(x):
    N = x.shape[0]
    if N % (n * group):
      what = f'{N // group} groups of {group} rows' if group > 1 else f'{N} rows'
      raise ValueError(f'batch of {what} does not split into {n} equal slices{" of whole groups" if group > 1 else ""}'
                       + (f'; change {knob}' if knob else ''))
    y = x.reshape(N // (n * group), n, group, *x.shape[1:])
    return jnp.swapaxes(y, 0, 1).reshape(n, N // n, *x.shape[1:])
  return jax.tree.map(f, tree)


def merge_rows(tree, group: int = 1):
  """Inverse of split_rows: [n, N/n, ...] -> [N, ...]."""
  def f(y):
    n, m = y.shape[:2]
    z = y.reshape(n, m // group, group, *y.shape[2:])
    return jnp.swapaxes(z, 0, 1).reshape(n * m, *y.shape[2:])
  return jax.tree.map(f, tree)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the step functions (hashable; closed over by jit), made from a RunConfig by
  train.build.step_config."""
  model_cfg: Any
  objective: ObjectiveConfig      # its ral.rows picks the recorded rows
  record_layer: int = -1
  num_minibatches: int = 1
  epochs: int = 1
  micro_batches: int = 1          # per RL mini-batch
  score_micro_batches: int = 1    # chunks of the scoring pass
  sft_micro_batches: int = 1
  record: bool = True             # the attention policy is needed (lambda_attn > 0 or attention distillation)
  ral_grad_share: bool = False    # also log ral/grad_share (one extra backward of the RAL term alone)
  share_prompt: bool = False      # RL passes compute each prompt once for its group (models/shared_prefix.py)
  group_size: int = 1             # G: > 1 makes the RL mini-/micro-batch and scoring splits keep whole groups
  cast_once: bool = True          # passes read the layers cast once per step to the compute dtype (compute_params)

  def __post_init__(self):
    if self.share_prompt and self.group_size < 1:
      raise ValueError(f'share_prompt needs the group size G >= 1 (got {self.group_size})')


def forward(sc: StepConfig, params, x: ModelInputs, response_len: int, record: bool, model_cfg=None,
            shared: Optional[bool] = None):
  """-> (hidden of the states predicting the response [N,Tr,D], attention policy [N,Tr,S] or None).
  shared (default sc.share_prompt): rows are groups of sc.group_size samples of one prompt (b*G + g); the prompt of
  group b is read from row b*G and computed once (Qwen25VL.shared_prefix). Same results as the full forward."""
  cfg = model_cfg or sc.model_cfg
  n, t = x.input_ids.shape
  tp = t - response_len
  rows = record_rows(n, tp, response_len, sc.objective.ral.rows) if record else None
  if sc.share_prompt if shared is None else shared:
    g = sc.group_size
    if n % g:
      raise ValueError(f'{n} rows are not whole groups of G = {g} samples')
    pos = jnp.swapaxes(x.positions, 0, 1)                                   # [3,N,T]
    out = Qwen25VL(cfg).apply(
        {'params': params}, x.input_ids[::g, :tp], pos[:, ::g, :tp], x.attention_mask[::g, :tp],
        x.input_ids[:, tp:], pos[:, :, tp:], x.attention_mask[:, tp:],
        visual_embeds=None if x.visual_embeds is None else x.visual_embeds[::g], record_rows=rows,
        record_layers=(sc.record_layer,), method=Qwen25VL.shared_prefix)
    hidden = out.hidden
  else:
    out = Qwen25VL(cfg).apply({'params': params}, x.input_ids, jnp.swapaxes(x.positions, 0, 1), x.attention_mask,
                              visual_embeds=x.visual_embeds, record_rows=rows, record_layers=(sc.record_layer,),
                              return_hidden=True)
    hidden = response_slice(out.hidden, tp, response_len)
  policy = next(iter(out.record.values()))['policy'] if record else None
  return hidden, policy


def score(sc: StepConfig, params, ref_params, x: ModelInputs, response_ids, need_ref: bool):
  """Scoring pass (no grad): old log-probs [N,Tr], old attention policy [N,Tr,S] (or None), reference log-probs
  [N,Tr] (or None), in `score_micro_batches` chunks."""
  obj = sc.objective
  tr = response_ids.shape[1]

  def one(chunk):
    xc, ids = chunk
    h, pol = forward(sc, params, xc, tr, sc.record)
    lp = token_stats_from_hidden(h, lm_head_kernel(params, sc.model_cfg), ids, obj.logprob_chunk, obj.temperature,
                                 with_entropy=False).logprobs
    out = {'old_logprobs': lp}
    if pol is not None:
      out['old_policy'] = pol
    if need_ref:
      hr, _ = forward(sc, ref_params, xc, tr, False)
      out['ref_logprobs'] = token_stats_from_hidden(hr, lm_head_kernel(ref_params, sc.model_cfg), ids,
                                                    obj.logprob_chunk, obj.temperature, with_entropy=False).logprobs
    return out

  g = sc.group_size
  params, ref_params = (p if p is None else _compute_view(sc, p) for p in (params, ref_params))
  out = merge_rows(jax.lax.map(one, split_rows((x, response_ids), sc.score_micro_batches, g,
                                               'rl.score_micro_batches')), g)
  out = jax.lax.stop_gradient(out)
  return out['old_logprobs'], out.get('old_policy'), out.get('ref_logprobs')


def teacher_score(sc: StepConfig, teacher_cfg, teacher_params, x: ModelInputs, response_ids, with_policy: bool):
  """Teacher-forced teacher on the student's rollouts: response hidden [N,Tr,Dt] and attention rows (or None).
  `x.visual_embeds` must come from the teacher's own vision tower."""
  tr = response_ids.shape[1]
  h, pol = forward(sc, teacher_params, x, tr, with_policy, model_cfg=teacher_cfg)
  return jax.lax.stop_gradient(h), (None if pol is None else jax.lax.stop_gradient(pol))


def constrain(tree, shardings):
  """`tree` pinned to `shardings` (a matching tree of Shardings; None = leave to XLA)."""
  if shardings is None:
    return tree
  return jax.tree.map(lambda x, s: x if x is None else jax.lax.with_sharding_constraint(x, s), tree, shardings)


def _compute_view(sc: StepConfig, params):
  return compute_params(params, sc.model_cfg) if sc.cast_once else params


def _accumulate(loss_fn: Callable, params, micro, n_micro: int, grad_shardings=None, grads_like=None):
  """Sum of the micro-batch losses and gradients (each micro-batch loss is already normalised by the whole
  mini-batch's denominator, so the sum is the mini-batch loss exactly); metrics: loss parts summed, others
  averaged. Every gradient (and the scan's accumulator) is pinned to `grad_shardings` (the parameters') and cast
  to the dtype of its leaf in `grads_like` (the float32 parameters when `params` is their compute-dtype view:
  the sum runs in float32, and the cast is the exact transpose of compute_params' cast)."""
  vg = jax.value_and_grad(loss_fn, has_aux=True)

  def grad_fn(p, mb):
    (l, m), g = vg(p, mb)
    if grads_like is not None:
      g = jax.tree.map(lambda a, b: a.astype(b.dtype), g, grads_like)
    return (l, m), constrain(g, grad_shardings)

  first = lambda m: jax.tree.map(lambda v: v[0], m)
  (loss, metrics), grads = grad_fn(params, first(micro))
  if n_micro == 1:
    return loss, grads, metrics

  def body(acc, mb):
    (l, m), g = grad_fn(params, mb)
    l0, g0, m0 = acc
    return (l0 + l, constrain(jax.tree.map(jnp.add, g0, g), grad_shardings), jax.tree.map(jnp.add, m0, m)), None

  rest = jax.tree.map(lambda v: v[1:], micro)
  (loss, grads, metrics), _ = jax.lax.scan(body, (loss, grads, metrics), rest)
  # Loss parts are normalised by the whole mini-batch (their sum is the mini-batch value); the rest are means.
  return loss, grads, {k: v if k.endswith('loss') else v / n_micro for k, v in metrics.items()}


def _ral_grad_share(loss_fn, params, micro, grads, lambda_attn: float):
  """|grad(lambda_attn * L_RAL)| / |grad L| (global norms, before clipping) on the first micro-batch."""
  first = jax.tree.map(lambda v: v[0], micro)
  f32 = lambda g: jax.tree.map(lambda x: x.astype(jnp.float32), g)        # (params may be the compute-dtype view)
  g_ral = f32(jax.grad(lambda p: lambda_attn * loss_fn(p, first)[1]['ral/loss'])(params))
  g_all = grads if jax.tree.leaves(micro)[0].shape[0] == 1 else f32(jax.grad(lambda p: loss_fn(p, first)[0])(params))
  return optax.tree.norm(g_ral) / jnp.maximum(optax.tree.norm(g_all), 1e-30)


def _guarded_apply(state: TrainState, tx, loss, grads, metrics):
  ok = jnp.isfinite(loss) & all_finite(grads)
  new = state.apply_gradients(grads, tx)
  state = select_tree(ok, new, state)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), skipped=1.0 - ok.astype(jnp.float32))
  return state, metrics


def rl_update(sc: StepConfig, tx, state: TrainState, x: ModelInputs, batch: RLBatch, teacher_hidden=None,
              teacher_kernel=None, *, shardings=None) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """epochs x num_minibatches optimizer steps on one scored rollout batch; metrics averaged over the steps, plus
  'first/...' and 'last/...' copies of the RAL JSD (0 at the first step by construction, ral_jax/docs/method.md
  s.3). `shardings`: the state's shardings (module docstring), or None."""
  tr = batch.response_ids.shape[1]
  obj = sc.objective
  grad_sh = None if shardings is None else shardings.params

  def minibatch_step(st, mb):
    st = constrain(st, shardings)
    den = loss_denominators(obj, mb[1].response_mask)          # whole mini-batch: exact accumulation

    def loss_fn(params, micro_batch):
      xm, bm, th = micro_batch
      h, pol = forward(sc, params, xm, tr, sc.record)
      return loss_from_hidden(obj, bm, h, lm_head_kernel(params, sc.model_cfg), pol, th,
                              None if th is None else teacher_kernel, denominators=den)

    micro = split_rows(mb, sc.micro_batches, sc.group_size, 'rl.micro_batches')
    params = _compute_view(sc, st.params)
    loss, grads, metrics = _accumulate(loss_fn, params, micro, sc.micro_batches, grad_sh, grads_like=st.params)
    if sc.ral_grad_share:
      metrics = dict(metrics, **{'ral/grad_share': _ral_grad_share(loss_fn, params, micro, grads,
                                                                    obj.ral.lambda_attn)})
    st, metrics = _guarded_apply(st, tx, loss, grads, dict(metrics, loss=loss))
    return constrain(st, shardings), metrics

  mbs = split_rows((x, batch, teacher_hidden), sc.num_minibatches, sc.group_size, 'rl.num_minibatches')

  def epoch(st, _):
    return jax.lax.scan(minibatch_step, st, mbs)

  state, metrics = jax.lax.scan(epoch, state, None, length=sc.epochs)
  flat = jax.tree.map(lambda v: v.reshape(-1), metrics)          # [epochs * num_minibatches]
  out = {k: jnp.mean(v) for k, v in flat.items()}
  out['skipped'] = jnp.sum(flat['skipped'])
  for k in ('ral/jsd', 'loss'):
    if k in flat:
      out[f'first/{k}'], out[f'last/{k}'] = flat[k][0], flat[k][-1]
  return state, out


def sft_update(sc: StepConfig, tx, state: TrainState, x: ModelInputs, response_ids, response_mask, *,
               shardings=None):
  """One optimizer step of token-mean cross-entropy on the target responses (micro-batch accumulation);
  `shardings` as in rl_update."""
  tr = response_ids.shape[1]
  n_tokens = jnp.maximum(jnp.sum(response_mask.astype(jnp.float32)), 1.0)

  def loss_fn(params, mb):
    xm, ids, mask = mb
    h, _ = forward(sc, params, xm, tr, False, shared=False)      # SFT rows are not groups
    lp = token_stats_from_hidden(h, lm_head_kernel(params, sc.model_cfg), ids, sc.objective.logprob_chunk, 1.0,
                                 with_entropy=False).logprobs
    loss = -masked_sum(lp, mask) / n_tokens
    return loss, {'token_p50': masked_mean((lp > jnp.log(0.5)).astype(jnp.float32), mask)}

  micro = split_rows((x, response_ids, response_mask), sc.sft_micro_batches)
  loss, grads, metrics = _accumulate(loss_fn, _compute_view(sc, state.params), micro, sc.sft_micro_batches,
                                     None if shardings is None else shardings.params, grads_like=state.params)
  state, metrics = _guarded_apply(state, tx, loss, grads, dict(metrics, loss=loss))
  state = constrain(state, shardings)
  metrics['tokens'] = jnp.sum(response_mask).astype(jnp.float32)
  return state, metrics


def encode_vision(model_cfg, params, pixel_values, vision_meta):
  """visual_embeds [B,Nv,D] of the frozen tower (no gradient)."""
  vis = Qwen25VL(model_cfg).apply({'params': params}, pixel_values, vision_meta, method=Qwen25VL.encode_vision)
  return jax.lax.stop_gradient(vis)
