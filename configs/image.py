"""Image RL post-training: the same recipes as configs/video.py on synthetic (or manifest) image tasks.

  python -m ral_jax.main --config=configs/image.py --workdir=./workdir_image
`--config=configs/image.py:PRESET` picks a preset (see configs/common.py).
"""
from configs import common


def get_config(arg: str = ''):
  return common.get_config_for('image', arg)
