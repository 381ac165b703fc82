"""Rollout: the KV-cache sampler (engine), token sampling (sampling) and the one-token decode step (decode_step)."""
