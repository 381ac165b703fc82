"""Per-token log-probabilities, entropies and the student/teacher reverse KL, in float32.

Conventions
- Temperature: every quantity is taken under z / temperature (z the logits), the distribution the sampler drew from,
  so that importance ratios pi_theta / pi_old compare like with like.
- Alignment: `hidden[:, t]` (or `logits[:, t]`) must be the state that predicts `targets[:, t]`. For the response of
  a `prompt | response` sequence with prompt bucket Tp, that is `hidden[:, Tp-1 : Tp+Tr-1]` against
  `response_ids` (see `response_slice`).
- log p_t = z_t[y_t] - logsumexp(z_t);  H_t = -sum_v p_tv log p_tv;
  KL_t(s || te) = sum_v p^s_tv (log p^s_tv - log p^te_tv)   (reverse KL of on-policy GKD; teacher never gets a
  gradient).
- Chunking: the `*_from_hidden` functions project hidden [B,T,D] through the kernel [D,V] C positions at a time
  (lax.map over T/C chunks, each body under jax.checkpoint), so only [B,C,V] logits exist at once, in the forward
  and in the backward pass.
"""
from __future__ import annotations

from typing import Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TokenStats:
  """Per-token statistics of the current policy on the response positions, all [B,Tr] float32.

  logprobs: log pi_theta(y_t | y_<t). entropy: H(pi_theta(. | y_<t)) (None when not requested).
  teacher_logprobs: log pi_teacher(y_t | y_<t) (None without a teacher).
  reverse_kl: KL(pi_theta(. | y_<t) || pi_teacher(. | y_<t)) over the full vocabulary (None without a teacher).
  """
  logprobs: jnp.ndarray
  entropy: Optional[jnp.ndarray] = None
  teacher_logprobs: Optional[jnp.ndarray] = None
  reverse_kl: Optional[jnp.ndarray] = None


def response_slice(hidden, prompt_len: int, response_len: int):
  """[B, Tp+Tr, ...] -> the [B, Tr, ...] states that predict the response tokens: positions Tp-1 .. Tp+Tr-2."""
  if prompt_len < 1:
    raise ValueError(f'prompt_len={prompt_len}: the first response token needs at least one prompt position')
  return jax.lax.slice_in_dim(hidden, prompt_len - 1, prompt_len - 1 + response_len, axis=1)


def _log_softmax(z, temperature):
  return jax.nn.log_softmax(jnp.asarray(z, jnp.float32) / temperature, axis=-1)


def _gather(logp_all, targets):
  return jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _entropy(logp_all):
  p = jnp.exp(logp_all)
  return -jnp.sum(jnp.where(p > 0, p * logp_all, 0.0), axis=-1)


def _reverse_kl(logp_s, logp_t):
  p = jnp.exp(logp_s)
  return jnp.sum(jnp.where(p > 0, p * (logp_s - logp_t), 0.0), axis=-1)


def token_logprobs(logits, targets, temperature: float = 1.0) -> jnp.ndarray:
  """logits [B,T,V] (any float dtype), targets [B,T] int -> log softmax(logits / temperature)[targets], [B,T] f32."""
  chex.assert_rank(logits, 3)
  chex.assert_shape(targets, logits.shape[:2])
  return _gather(_log_softmax(logits, temperature), targets)


def token_entropy(logits, temperature: float = 1.0) -> jnp.ndarray:
  """logits [B,T,V] -> entropy of softmax(logits / temperature) per position, [B,T] f32."""
  chex.assert_rank(logits, 3)
  return _entropy(_log_softmax(logits, temperature))


def _project(h, kernel):
  """h [B,C,D] @ kernel [D,V] in h's (compute) dtype with float32 accumulation -> [B,C,V] f32.

  The backward pass takes the logits' cotangent in h's dtype too (`_lowp_logits`), as a bf16 autocast matmul does:
  left to autodiff, the float32 cotangent times the bf16 operand runs both backward matmuls in float32 (at
  Qwen2.5-VL-3B, 4.6% of the RL update on an H200). Gradients keep their dtypes (h's and the cast kernel's)."""
  w = kernel.astype(h.dtype)
  if h.dtype == jnp.float32:
    return jnp.einsum('bcd,dv->bcv', h, w, preferred_element_type=jnp.float32)
  return _lowp_logits(h, w)


@jax.custom_vjp
def _lowp_logits(h, w):
  return jnp.einsum('bcd,dv->bcv', h, w, preferred_element_type=jnp.float32)


def _lowp_logits_fwd(h, w):
  return _lowp_logits(h, w), (h, w)


def _lowp_logits_bwd(res, g):
  h, w = res
  g = g.astype(h.dtype)
  dh = jnp.einsum('bcv,dv->bcd', g, w, preferred_element_type=jnp.float32).astype(h.dtype)
  dw = jnp.einsum('bcd,bcv->dv', h, g, preferred_element_type=jnp.float32).astype(w.dtype)
  return dh, dw


_lowp_logits.defvjp(_lowp_logits_fwd, _lowp_logits_bwd)


def token_stats_from_hidden(hidden, kernel, targets, chunk: int = 256, temperature: float = 1.0, *,
                            with_entropy: bool = True, teacher_hidden=None, teacher_kernel=None) -> TokenStats:
  """Chunked TokenStats from final-normed hidden states (module docstring for alignment and formulas).

  hidden [B,T,D], kernel [D,V], targets [B,T] int; teacher_hidden [B,T,Dt] and teacher_kernel [Dt,V] optional (both
  or neither). T need not divide by chunk (the tail is padded and dropped). The student's logits are computed once
  per chunk and shared by all statistics.
  """
  chex.assert_rank([hidden, kernel, targets], [3, 2, 2])
  chex.assert_shape(targets, hidden.shape[:2])
  if hidden.shape[-1] != kernel.shape[0]:
    raise ValueError(f'hidden dim {hidden.shape[-1]} != kernel rows {kernel.shape[0]}: pass the [D,V] lm-head kernel')
  has_teacher = teacher_hidden is not None
  if has_teacher != (teacher_kernel is not None):
    raise ValueError('pass both teacher_hidden and teacher_kernel, or neither')
  if has_teacher:
    chex.assert_rank([teacher_hidden, teacher_kernel], [3, 2])
    chex.assert_shape(teacher_hidden, (*hidden.shape[:2], teacher_kernel.shape[0]))
    if teacher_kernel.shape[1] != kernel.shape[1]:
      raise ValueError(f'student vocab {kernel.shape[1]} != teacher vocab {teacher_kernel.shape[1]}: slice both '
                       'kernels to the shared tokenizer vocabulary, e.g. kernel[:, :V_shared], before calling')
  if chunk < 1:
    raise ValueError(f'chunk={chunk} must be >= 1 positions')
  b, t = targets.shape
  c = min(chunk, t)
  n = -(-t // c)
  pad = n * c - t

  def split(x):  # [B,T,...] -> [n,B,c,...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

  xs = (split(hidden), split(targets.astype(jnp.int32)))
  if has_teacher:
    xs += (split(jax.lax.stop_gradient(teacher_hidden)),)
    teacher_kernel = jax.lax.stop_gradient(teacher_kernel)

  @jax.checkpoint
  def body(x):
    logp_all = _log_softmax(_project(x[0], kernel), temperature)       # [B,c,V]
    out = {'logprobs': _gather(logp_all, x[1])}
    if with_entropy:
      out['entropy'] = _entropy(logp_all)
    if has_teacher:
      logp_te = _log_softmax(_project(x[2], teacher_kernel), temperature)
      out['teacher_logprobs'] = _gather(logp_te, x[1])
      out['reverse_kl'] = _reverse_kl(logp_all, logp_te)
    return out

  out = jax.lax.map(body, xs)
  out = {k: jnp.moveaxis(v, 0, 1).reshape(b, n * c)[:, :t] for k, v in out.items()}
  return TokenStats(**out)


def token_logprobs_from_hidden(hidden, kernel, targets, chunk: int = 256, temperature: float = 1.0) -> jnp.ndarray:
  """Chunked log pi(targets) [B,T] f32 from hidden [B,T,D] and kernel [D,V]; [B,T,V] never exists at once."""
  return token_stats_from_hidden(hidden, kernel, targets, chunk, temperature, with_entropy=False).logprobs


def reverse_kl_from_hidden(hidden, kernel, teacher_hidden, teacher_kernel, chunk: int = 256,
                           temperature: float = 1.0) -> jnp.ndarray:
  """Chunked KL(pi_student || pi_teacher) [B,T] f32 over the full vocabulary (teacher gets no gradient)."""
  targets = jnp.zeros(hidden.shape[:2], jnp.int32)
  return token_stats_from_hidden(hidden, kernel, targets, chunk, temperature, with_entropy=False,
                                 teacher_hidden=teacher_hidden, teacher_kernel=teacher_kernel).reverse_kl
