"""Video RL post-training (the project's main config).

  python -m ral_jax.main --config=configs/video.py --workdir=./workdir
runs the embedded default on a 2-core CPU in 3-10 minutes: tiny Qwen2.5-VL-architecture model, embedded
tokenizer, synthetic video tasks written into the workdir, an SFT warm-up (200 steps) then RAL (30 rollout
batches); prints held-out accuracy and attention-on-evidence mass before training, after SFT and after RL (measured on
the 2-core CPU: 0.000 -> 0.641 -> 0.641, chance 0.25, the `grpo` preset the same: the gain is SFT's; 2 min 24 s idle,
8 min 12 s at load average 10).
`--config=configs/video.py:PRESET` picks a preset (see configs/common.py): paper, grpo, ral,
ral_zero, sft, distill and tiny_<algo> for tests. The paper preset (Qwen2.5-VL-7B, 8 x H100 in the paper) needs
  --config.model.hf_checkpoint=/path/Qwen2.5-VL-7B --config.data.train_manifest=/path/Video-R1-260k.json
  --config.data.data_root=/path/Video-R1-data
"""
from configs import common


def get_config(arg: str = ''):
  return common.get_config_for('video', arg)
