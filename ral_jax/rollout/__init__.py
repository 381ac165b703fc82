"""Rollout: the KV-cache sampler (engine) and token sampling (sampling); the one-token decode step is the model's
own (models.vlm.decode_token, DecoderLayer.decode)."""
