"""Token sampling for the rollout engine: the config, per-sample PRNG streams and the token choice.

Conventions (shared with `rollout.py` and the training forward):
- The sampler's log-prob of a token is `log_softmax(logits / temperature)[token]` in float32: the log-prob under the
  *temperature-scaled, untruncated* distribution. top-k / top-p only restrict which tokens can be drawn; they do not
  renormalise the reported log-prob. This is the quantity the training forward recomputes teacher-forced (with the
  same temperature), so old and new log-probs of the GRPO ratio agree at step 0. Greedy reports the same quantity.
- Randomness: sample `i` (its global row `b*G + g`) at decode step `j` uses
  `fold_in(fold_in(rng, j), i)`. The key depends neither on the batch layout nor on the device count, so a sample is
  reproducible from (rng, j, i) alone.
Axis letters: B rows (prompts x samples), V vocab.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How responses are sampled.

  temperature: softmax temperature tau (paper: 1.0); logits are divided by it before sampling and for log-probs.
  top_k: keep the k most likely tokens (0 = off).
  top_p: nucleus sampling, keep the smallest prefix of the sorted distribution with mass >= top_p (1.0 = off).
  greedy: take the argmax (temperature, top_k and top_p do not change the choice; log-probs still use temperature).
  max_new_tokens: Tr, the response bucket; the loop stops there at the latest.
  stop_ids: any of these ends a sequence (the stop token is kept in the response and counted in its length).
  pad_id: written after a sequence stops.
  ignore_stop: never stop at a stop id (benchmarks: always produce max_new_tokens).
  dtype: compute dtype of the sampler (parameters are cast to it once per call; the KV cache is kept in it).
  prefill_batch: prompts per prefill pass (0 = all at once); B must be a multiple. Bounds the prefill's working set
    (attention logits [b,N,Tp,Tp] float32 per layer) for large rollout batches.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  max_new_tokens: int = 512
  stop_ids: Tuple[int, ...] = ()
  pad_id: int = 0
  ignore_stop: bool = False
  dtype: str = 'bfloat16'
  prefill_batch: int = 0

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f'temperature={self.temperature} must be > 0 (use greedy=True for argmax decoding)')
    if self.top_k < 0:
      raise ValueError(f'top_k={self.top_k} must be >= 0 (0 turns it off)')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1] (1.0 turns it off)')
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={self.max_new_tokens} must be >= 1')
    if self.prefill_batch < 0:
      raise ValueError(f'prefill_batch={self.prefill_batch} must be >= 0 (0 = all prompts in one pass)')
    object.__setattr__(self, 'stop_ids', tuple(int(s) for s in self.stop_ids))


def sample_keys(rng: jax.Array, step: jax.Array, sample_index: jax.Array) -> jax.Array:
  """Per-row keys `fold_in(fold_in(rng, step), sample_index[b])`; sample_index [B] int32 -> keys [B]."""
  step_key = jax.random.fold_in(rng, step)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(sample_index)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float) -> jax.Array:
  """log_softmax(logits / temperature)[tokens] in float32; logits [..., V], tokens [...] -> [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _mask_top_k(scaled: jax.Array, k: int) -> jax.Array:
  """Sets every logit below the k-th largest of its row to -inf (ties with the k-th are kept)."""
  kth = jax.lax.top_k(scaled, k)[0][..., -1:]
  return jnp.where(scaled < kth, -jnp.inf, scaled)


def _mask_top_p(scaled: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keep token i iff the probability mass strictly above it (sorted descending) is < p.

  The most likely token is always kept. Tokens tied with the last kept one are kept too (threshold on the logit).
  """
  sorted_desc = -jnp.sort(-scaled, axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < p
  n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
  return jnp.where(scaled < threshold, -jnp.inf, scaled)


def filtered_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """float32 logits / temperature with the top-k then top-p filters applied (filtered entries -inf)."""
  scaled = logits.astype(jnp.float32) / cfg.temperature
  if cfg.top_k and cfg.top_k < scaled.shape[-1]:
    scaled = _mask_top_k(scaled, cfg.top_k)
  if cfg.top_p < 1.0:
    scaled = _mask_top_p(scaled, cfg.top_p)
  return scaled


def sample_tokens(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> Tuple[jax.Array, jax.Array]:
  """Draws one token per row. logits [B,V], keys [B] -> (tokens [B] int32, logprobs [B] float32).

  logprobs follow the module convention: untruncated temperature-scaled log-softmax at the drawn token.
  """
  if cfg.greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    scaled = filtered_logits(logits, cfg)
    tokens = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
  return tokens, token_logprobs(logits, tokens, cfg.temperature)
