"""RL objective benchmark: what chunked log-probs and the RAL term cost, each against its peer on the same device.

  python -m ral_jax.bench.rl_losses --case=logprobs      # chunked lm-head log-probs vs full [B,T,V] logits
  python -m ral_jax.bench.rl_losses --case=ral           # GRPO + RAL vs GRPO alone (loss + grad of the loss math)
  python -m ral_jax.bench.rl_losses --case=all --size=small   # CPU smoke sizes

'logprobs': value_and_grad w.r.t. (hidden, kernel) of sum(log pi(y_t)) + entropy, ours (token_stats_from_hidden,
  chunk C) vs the direct einsum + log_softmax over the full [B,T,V] logits. Printed: step time (median of --iters,
  compile excluded), XLA's temp buffer size of the compiled program (memory_analysis; the peak scratch memory),
  and the ratios.
'ral': value_and_grad of total_loss w.r.t. (log-probs, attention rows) with lambda_attn = 1 vs 0 on [B,R,S]
  attention rows, i.e. the extra cost of the JSD term alone (the model forward that records the rows is not in it).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ral_jax.rl.config import ObjectiveConfig, RALConfig
from ral_jax.rl.logprobs import TokenStats, token_stats_from_hidden
from ral_jax.rl.objective import RLBatch, total_loss

SIZES = {  # logprobs: B, T, D, V, chunk;  ral: B, R, S
    'small': dict(lp=(2, 128, 64, 4096, 32), ral=(2, 64, 512)),
    '7b': dict(lp=(4, 1024, 3584, 152064, 256), ral=(4, 1024, 4096)),
}


def _time(fn, args, iters):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _temp_bytes(fn, args):
  try:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
  except Exception:  # noqa: BLE001 - not every backend reports it
    return float('nan')


def bench_logprobs(size, dtype, iters):
  b, t, d, v, c = SIZES[size]['lp']
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  h = jax.random.normal(k[0], (b, t, d), dtype)
  w = (jax.random.normal(k[1], (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
  y = jax.random.randint(k[2], (b, t), 0, v)

  def ours(h, w):
    st = token_stats_from_hidden(h, w, y, c)
    return jnp.sum(st.logprobs) + jnp.sum(st.entropy)

  def full(h, w):
    lp = jax.nn.log_softmax(jnp.einsum('btd,dv->btv', h, w, preferred_element_type=jnp.float32), -1)
    ent = -jnp.sum(jnp.exp(lp) * lp, -1)
    return jnp.sum(jnp.take_along_axis(lp, y[..., None], -1)) + jnp.sum(ent)

  res = {}
  for name, f in (('chunked', ours), ('full', full)):
    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    res[name] = (_time(g, (h, w), iters), _temp_bytes(g, (h, w)))
  print(f'logprobs B={b} T={t} D={d} V={v} chunk={c} {jnp.dtype(dtype).name} on {jax.devices()[0].device_kind}')
  for name, (s, m) in res.items():
    print(f'  {name:8s} {s * 1e3:9.2f} ms   temp {m / 2**20:9.1f} MiB')
  print(f'  chunked/full: time x{res["chunked"][0] / res["full"][0]:.2f}, temp memory '
        f'x{res["chunked"][1] / res["full"][1]:.3f}')


def bench_ral(size, iters):
  b, r, s = SIZES[size]['ral']
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  rows = lambda kk: jax.nn.softmax(jax.random.normal(kk, (b, r, s)), -1)
  batch = RLBatch(response_ids=jnp.zeros((b, r), jnp.int32), response_mask=jnp.ones((b, r)),
                  advantages=jax.random.normal(k[0], (b,)), old_logprobs=-jax.random.uniform(k[1], (b, r)),
                  ref_logprobs=-jax.random.uniform(k[2], (b, r)), old_policy=rows(k[3]), key_mask=jnp.ones((b, s)))
  pol = rows(k[0])
  lp = -jax.random.uniform(k[3], (b, r))
  res = {}
  for name, lam in (('grpo+ral', 1.0), ('grpo', 0.0)):
    cfg = ObjectiveConfig(ral=RALConfig(lambda_attn=lam))
    g = jax.jit(jax.value_and_grad(lambda lp, p: total_loss(cfg, batch, TokenStats(lp), p)[0], argnums=(0, 1)))
    res[name] = (_time(g, (lp, pol), iters), _temp_bytes(g, (lp, pol)))
  print(f'ral loss math B={b} R={r} S={s} float32 on {jax.devices()[0].device_kind}')
  for name, (t, m) in res.items():
    print(f'  {name:8s} {t * 1e3:9.3f} ms   temp {m / 2**20:9.1f} MiB')
  print(f'  grpo+ral / grpo: time x{res["grpo+ral"][0] / res["grpo"][0]:.2f}')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--case', default='all', choices=('logprobs', 'ral', 'all'))
  p.add_argument('--size', default='7b', choices=tuple(SIZES))
  p.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  p.add_argument('--iters', type=int, default=10)
  a = p.parse_args()
  if a.case in ('logprobs', 'all'):
    bench_logprobs(a.size, jnp.dtype(a.dtype), a.iters)
  if a.case in ('ral', 'all'):
    bench_ral(a.size, a.iters)


if __name__ == '__main__':
  main()
