"""RL objectives as pure functions (rewards on host strings; everything else on arrays). See each module."""
from ral_jax.rl.advantages import group_advantages
from ral_jax.rl.aggregation import aggregate, aggregation_denominator, masked_mean
from ral_jax.rl.attention_loss import attention_distill_loss, jsd, ral_loss, record_rows, visual_mass
from ral_jax.rl.config import (AdvantageConfig, DistillConfig, GRPOConfig, ObjectiveConfig, RALConfig,
                               check_updates_per_rollout)
from ral_jax.rl.distill import token_distill_loss
from ral_jax.rl.logprobs import (TokenStats, response_slice, reverse_kl_from_hidden, token_entropy, token_logprobs,
                                 token_logprobs_from_hidden, token_stats_from_hidden)
from ral_jax.rl.objective import RLBatch, loss_denominators, loss_from_hidden, total_loss
from ral_jax.rl.policy_loss import grpo_loss, kl_penalty
from ral_jax.rl.rewards import RAL_ZERO_REWARDS, RewardConfig, compute_rewards, register_reward
