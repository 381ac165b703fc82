"""Image RL post-training: the same recipes as configs/video.py on synthetic (or manifest) image tasks.

  python -m ral_jax.main --config=configs/image.py --workdir=./workdir_image
`--config=configs/image.py:PRESET` picks a preset (see configs/common.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(arg: str = ''):
  return common.get_config_for('image', arg)
