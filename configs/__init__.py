"""ral_jax experiment configs: `common` declares every knob; `video` and `image` pick presets (get_config(arg)).
Run from the repository root (`python -m ral_jax.main --config=configs/video.py`), which puts this package on the
import path next to ral_jax."""
