"""RL config validation: defaults follow ral_jax/docs/method.md; bad values fail with a message naming the fix."""
import pytest

from ral_jax.rl.config import AdvantageConfig, DistillConfig, GRPOConfig, ObjectiveConfig, RALConfig


def test_defaults_follow_method_md():
  g, r, a = GRPOConfig(), RALConfig(), AdvantageConfig()
  assert (g.clip_eps_low, g.clip_eps_high, g.dual_clip, g.beta, g.kl_estimator, g.aggregation) == (
      0.2, 0.2, None, 0.04, 'k3', 'token_mean')
  assert (r.lambda_attn, r.rows, r.aggregation) == (1.0, 'response', None)
  assert (a.estimator, a.eps) == ('grpo', 1e-6)
  d = DistillConfig()
  assert (d.mu, d.kd_estimator) == (1.0, 'full')
  o = ObjectiveConfig(grpo=GRPOConfig(aggregation='seq_mean_token_sum'), distill=d)
  assert o.ral_aggregation == o.kd_aggregation == o.attn_distill_aggregation == 'seq_mean_token_sum'
  assert ObjectiveConfig(ral=RALConfig(aggregation='drgrpo')).ral_aggregation == 'drgrpo'


@pytest.mark.parametrize('make,match', [
    (lambda: GRPOConfig(clip_eps_low=1.0), 'clip_eps_low'),
    (lambda: GRPOConfig(clip_eps_high=-0.1), 'clip_eps_high'),
    (lambda: GRPOConfig(dual_clip=1.0), 'dual_clip'),
    (lambda: GRPOConfig(beta=-1.0), 'beta'),
    (lambda: GRPOConfig(kl_estimator='k4'), "'k1', 'k2', 'k3'"),
    (lambda: GRPOConfig(aggregation='mean'), 'token_mean'),
    (lambda: GRPOConfig(aggregation='drgrpo', max_response_length=0), 'max_response_length'),
    (lambda: RALConfig(lambda_attn=-1.0), 'lambda_attn'),
    (lambda: RALConfig(rows='all'), 'producing'),
    (lambda: RALConfig(aggregation='sum'), 'ral.aggregation'),
    (lambda: DistillConfig(kd_estimator='topk'), 'sampled'),
    (lambda: DistillConfig(gamma_attn=-0.5), 'gamma_attn'),
    (lambda: DistillConfig(mu=float('nan')), 'mu'),
    (lambda: AdvantageConfig(eps=-1.0), 'eps'),
    (lambda: ObjectiveConfig(temperature=0.0), 'temperature'),
    (lambda: ObjectiveConfig(logprob_chunk=0), 'logprob_chunk'),
])
def test_bad_values_fail_with_the_field_name(make, match):
  with pytest.raises(ValueError, match=match):
    make()
