"""attn/evidence_mass: how much of the attention policy's visual mass lands on the evidence.

For a recorded policy row p^t [S] (ral_jax/docs/method.md s.1) of a sequence with a visual key mask v [S] and an
evidence key mask e [S] (e <= v; data/evidence.py maps the manifest's boxes and time spans to visual tokens):
    mass_t = sum_s p^t_s e_s / sum_s p^t_s v_s
averaged over the valid rows (response rows) of the sequences that have evidence and some visual attention.
A uniform policy over the visual tokens scores (evidence tokens / visual tokens): the chance level, returned by
`evidence_share` for comparison.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from ral_jax.rl.aggregation import as_mask, masked_mean


def evidence_rows(policy, visual_key_mask, evidence_key_mask):
  """Per-row share [B,R] of the visual mass on evidence keys, and the rows where it is defined (visual mass > 0).
  policy [B,R,S]; masks [B,S]."""
  p = jnp.asarray(policy, jnp.float32)
  vis = as_mask(visual_key_mask)[:, None, :]
  ev = as_mask(evidence_key_mask)[:, None, :] & vis
  vm = jnp.sum(jnp.where(vis, p, 0.0), axis=-1)
  em = jnp.sum(jnp.where(ev, p, 0.0), axis=-1)
  ok = vm > 0
  return jnp.where(ok, em / jnp.where(ok, vm, 1.0), 0.0), ok


def evidence_mass(policy, row_mask, visual_key_mask, evidence_key_mask, has_evidence: Optional[jnp.ndarray] = None):
  """Mean over valid rows (row_mask [B,R], sequences with has_evidence [B] != 0) of evidence_rows; 0 when none."""
  share, ok = evidence_rows(policy, visual_key_mask, evidence_key_mask)
  valid = as_mask(row_mask) & ok
  if has_evidence is not None:
    valid = valid & as_mask(has_evidence)[:, None]
  return masked_mean(share, valid)


def evidence_share(visual_key_mask, evidence_key_mask, has_evidence=None):
  """Chance level: mean over sequences (with evidence) of (# evidence tokens / # visual tokens)."""
  vis = as_mask(visual_key_mask)
  ev = as_mask(evidence_key_mask) & vis
  nv = jnp.sum(vis, axis=-1)
  share = jnp.sum(ev, axis=-1) / jnp.maximum(nv, 1)
  valid = nv > 0
  if has_evidence is not None:
    valid = valid & as_mask(has_evidence)
  return masked_mean(share, valid)


def evidence_key_mask(prompt_evidence, response_len: int, repeats: int = 1):
  """[B,Tp] prompt evidence mask (data/collate.py 'evidence_mask') -> [B*repeats, Tp+Tr] over `prompt | response`
  keys (rows b*repeats + g, the rollout order); response keys are never evidence."""
  e = jnp.asarray(prompt_evidence, jnp.int32)
  e = jnp.concatenate([e, jnp.zeros((e.shape[0], response_len), jnp.int32)], axis=1)
  return jnp.repeat(e, repeats, axis=0) if repeats > 1 else e


def batch_fields(dev, response_len: int, repeats: int):
  """RLBatch keyword fields {'evidence_key_mask', 'has_evidence'} from a device data batch (empty dict when the
  batch has no evidence arrays)."""
  if 'evidence_mask' not in dev:
    return {}
  has = dev['has_evidence']
  return {'evidence_key_mask': evidence_key_mask(dev['evidence_mask'], response_len, repeats),
          'has_evidence': jnp.repeat(has, repeats, axis=0) if repeats > 1 else has}
