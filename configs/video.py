"""Video RL post-training (the project's main config).

  python -m ral_jax.main --config=configs/video.py --workdir=./workdir
runs the embedded default on a 2-core CPU in 2-4 minutes: tiny Qwen2.5-VL-architecture model, embedded
tokenizer, synthetic video tasks written into the workdir, an SFT warm-up (180 steps) then RAL (40 rollout
batches, 8 updates each at lr 2e-4, answer-only responses); prints held-out accuracy and attention-on-evidence mass
before training, after SFT and after RL (measured on the 2-core CPU, default seed 1: 0.000 -> 0.156 -> 0.641,
chance 0.25: RL learns `flash`, which SFT had left at one answer letter; the `grpo` preset ends at the same 0.641;
seeds 0 and 2 in README 'Training').
`--config=configs/video.py:PRESET` picks a preset (see configs/common.py): paper, grpo, ral,
ral_zero, sft, distill and tiny_<algo> for tests. The paper preset (Qwen2.5-VL-7B, 8 x H100 in the paper) needs
  --config.model.hf_checkpoint=/path/Qwen2.5-VL-7B --config.data.train_manifest=/path/Video-R1-260k.json
  --config.data.data_root=/path/Video-R1-data
"""
from configs import common


def get_config(arg: str = ''):
  return common.get_config_for('video', arg)
