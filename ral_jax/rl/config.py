"""Typed, validated configs of the RL objectives (defaults = ral_jax/docs/method.md).

Every knob of rl/ lives in one of these frozen dataclasses; `__post_init__` rejects a bad value with a message that
says what to change. The names accepted by each selector are declared here once and used by the modules that
implement them.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

# Selectors (each implemented by the module named in the comment).
ADVANTAGE_ESTIMATORS = ('grpo', 'drgrpo', 'rloo')                  # advantages.py
KL_ESTIMATORS = ('k1', 'k2', 'k3')                                 # policy_loss.py
AGGREGATIONS = ('token_mean', 'seq_mean_token_mean', 'seq_mean_token_sum', 'drgrpo')  # aggregation.py
ROW_VARIANTS = ('response', 'producing')                           # attention_loss.record_rows
ATTN_DIVERGENCES = ('jsd', 'kl')                                   # attention_loss.ral_loss
KD_ESTIMATORS = ('full', 'sampled')                                # distill.py


class RALSingleUpdateWarning(UserWarning):
  """lambda_attn > 0 but each rollout batch gets one optimizer step: the RAL term is exactly zero."""


def _choice(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'{field}={value!r} is not supported; set it to one of {list(allowed)}')


def _check_aggregation(field: str, mode: Optional[str], max_len: Optional[int], allow_none: bool) -> None:
  if mode is None and allow_none:
    return
  _choice(field, mode, AGGREGATIONS)
  if max_len is not None and max_len < 1:
    raise ValueError(f'max_response_length={max_len} must be a positive int (or None to use the padded Tr)')


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  """Group advantages, one per sequence (ral_jax/docs/method.md s.2).

  estimator: 'grpo'   A_i = (r_i - mean_g r) / (std_g(r, ddof=1) + eps)   (veRL; the paper)
             'drgrpo' A_i = r_i - mean_g r                                 (Dr.GRPO: no std division)
             'rloo'   A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_g r)   (leave-one-out)
  eps: added to the std (grpo only).
  """
  estimator: str = 'grpo'
  eps: float = 1e-6

  def __post_init__(self):
    _choice('advantage.estimator', self.estimator, ADVANTAGE_ESTIMATORS)
    if not self.eps >= 0:
      raise ValueError(f'advantage.eps={self.eps} must be >= 0 (default 1e-6)')


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """The clipped token loss + beta * KL(pi_theta || pi_ref) (ral_jax/docs/method.md s.2).

  clip_eps_low / clip_eps_high: ratio clipped to [1 - eps_low, 1 + eps_high] (PPO epsilon; default 0.2 both).
  dual_clip: c > 1 bounds the loss of A < 0 tokens by -c * A (dual-clip PPO); None disables it.
  beta: weight of the KL penalty to the frozen reference (0.04); 0 needs no reference log-probs.
  kl_estimator: 'k1' log r, 'k2' (log r)^2 / 2, 'k3' exp(-log r) + log r - 1 with r = pi_theta / pi_ref (default k3).
  aggregation: how per-token losses become a scalar (aggregation.py): 'token_mean' (default, veRL),
    'seq_mean_token_mean', 'seq_mean_token_sum', 'drgrpo' (sum / (sequences x max_response_length)).
  max_response_length: Dr.GRPO's constant; None uses the padded response length Tr of the batch.
  """
  clip_eps_low: float = 0.2
  clip_eps_high: float = 0.2
  dual_clip: Optional[float] = None
  beta: float = 0.04
  kl_estimator: str = 'k3'
  aggregation: str = 'token_mean'
  max_response_length: Optional[int] = None

  def __post_init__(self):
    if not 0 <= self.clip_eps_low < 1:
      raise ValueError(f'grpo.clip_eps_low={self.clip_eps_low} must be in [0, 1) (default 0.2)')
    if not self.clip_eps_high >= 0:
      raise ValueError(f'grpo.clip_eps_high={self.clip_eps_high} must be >= 0 (default 0.2)')
    if self.dual_clip is not None and not self.dual_clip > 1:
      raise ValueError(f'grpo.dual_clip={self.dual_clip} must be > 1 (typically 3.0), or None to disable it')
    if not self.beta >= 0:
      raise ValueError(f'grpo.beta={self.beta} must be >= 0 (paper: 0.04)')
    _choice('grpo.kl_estimator', self.kl_estimator, KL_ESTIMATORS)
    _check_aggregation('grpo.aggregation', self.aggregation, self.max_response_length, allow_none=False)


@dataclasses.dataclass(frozen=True)
class RALConfig:
  """The attention-policy term lambda_attn * E_t[A * JSD(p_theta^t || p_old^t)] (ral_jax/docs/method.md s.3).

  lambda_attn: weight (paper: 0.5, 1, 5; default 1); 0 turns RAL off (plain GRPO).
  rows: 'response' = the response tokens' own query rows (paper), 'producing' = the rows that produce them.
  aggregation: None = the token loss's mode; else one of rl.config.AGGREGATIONS.
  allow_single_update: lambda_attn > 0 with one optimizer update per rollout batch makes the term identically
    zero (p_theta == p_old); check_updates_per_rollout raises unless this is True (then it only warns).
  """
  lambda_attn: float = 1.0
  rows: str = 'response'
  aggregation: Optional[str] = None
  allow_single_update: bool = False
  divergence: str = 'jsd'    # 'jsd' (paper) | 'kl': KL(p_theta || p_old), an open-question variant

  def __post_init__(self):
    _choice('ral.divergence', self.divergence, ATTN_DIVERGENCES)
    if not self.lambda_attn >= 0:
      raise ValueError(f'ral.lambda_attn={self.lambda_attn} must be >= 0 (paper: 0.5, 1 or 5; 0 = plain GRPO)')
    _choice('ral.rows', self.rows, ROW_VARIANTS)
    _check_aggregation('ral.aggregation', self.aggregation, None, allow_none=True)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """On-policy distillation (ral_jax/docs/method.md s.5): mu * L_gkd + gamma_attn * L_attn_distill.

  mu: weight of the token reverse KL(pi_student || pi_teacher) (default 1); 0 = attention distillation only.
  gamma_attn: weight of JSD(p_student^t || p_teacher^t) (paper: 0.05, 0.5, 1; default 0.5 here, the paper gives
    none); 0 = the "GRPO + GKD" baseline.
  kd_estimator: 'full' = exact KL over the vocabulary at each response position; 'sampled' = the one-sample
    estimate log pi_s(y_t) - log pi_t(y_t) at the sampled token, with its score-function gradient.
  kd_aggregation / attn_aggregation: None = the token loss's mode; 'seq_mean_token_sum' is the paper's Eq. 5 sum.
  """
  mu: float = 1.0
  gamma_attn: float = 0.5
  kd_estimator: str = 'full'
  kd_aggregation: Optional[str] = None
  attn_aggregation: Optional[str] = None

  def __post_init__(self):
    if not self.mu >= 0:
      raise ValueError(f'distill.mu={self.mu} must be >= 0 (default 1)')
    if not self.gamma_attn >= 0:
      raise ValueError(f'distill.gamma_attn={self.gamma_attn} must be >= 0 (paper: 0.05, 0.5 or 1)')
    _choice('distill.kd_estimator', self.kd_estimator, KD_ESTIMATORS)
    _check_aggregation('distill.kd_aggregation', self.kd_aggregation, None, allow_none=True)
    _check_aggregation('distill.attn_aggregation', self.attn_aggregation, None, allow_none=True)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Everything total_loss needs: GRPO + lambda_attn * RAL (+ mu * KD + gamma_attn * attention distillation).

  temperature: the sampler's temperature; log-probs are taken under logits / temperature so ratios match.
  logprob_chunk: response positions per chunk when log-probs come from hidden states (logprobs.py).
  distill: None = no distillation terms.
  """
  grpo: GRPOConfig = GRPOConfig()
  ral: RALConfig = RALConfig()
  distill: Optional[DistillConfig] = None
  temperature: float = 1.0
  logprob_chunk: int = 256

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f'temperature={self.temperature} must be > 0 (the sampler temperature, default 1.0)')
    if self.logprob_chunk < 1:
      raise ValueError(f'logprob_chunk={self.logprob_chunk} must be a positive number of positions (default 256)')

  @property
  def needs_attention(self) -> bool:
    """The losses read attention rows: the RAL term or attention distillation is on."""
    return self.ral.lambda_attn > 0 or (self.distill is not None and self.distill.gamma_attn > 0)

  @property
  def ral_aggregation(self) -> str:
    return self.ral.aggregation or self.grpo.aggregation

  @property
  def kd_aggregation(self) -> str:
    return (self.distill and self.distill.kd_aggregation) or self.grpo.aggregation

  @property
  def attn_distill_aggregation(self) -> str:
    return (self.distill and self.distill.attn_aggregation) or self.grpo.aggregation


def check_updates_per_rollout(cfg: ObjectiveConfig, updates_per_rollout: int) -> None:
  """Fails (or warns, with ral.allow_single_update) when RAL cannot act: lambda_attn > 0 and one update per rollout.

  At p_theta == p_old the JSD and its gradient are exactly zero (ral_jax/docs/method.md s.3), so with a single
  optimizer step per rollout batch the RAL term never contributes. Call this before compiling the update step.
  """
  if updates_per_rollout < 1:
    raise ValueError(f'updates_per_rollout={updates_per_rollout} must be >= 1 (mini-batches x epochs per rollout)')
  if cfg.ral.lambda_attn > 0 and updates_per_rollout == 1:
    msg = (f'rl.lambda_attn = {cfg.ral.lambda_attn} > 0 but each rollout batch is used for a single update '
           '(rl.num_minibatches * rl.epochs == 1): p_theta == p_old at that step, so the RAL term and its gradient '
           'are exactly zero and the run is plain GRPO (ral_jax/docs/method.md s.3). Set --config.rl.num_minibatches=4 '
           '(or rl.epochs > 1), or rl.lambda_attn=0.')
    if not cfg.ral.allow_single_update:
      raise ValueError(msg + ' (Set rl.allow_single_update=True to run anyway.)')
    warnings.warn(msg, RALSingleUpdateWarning, stacklevel=2)
