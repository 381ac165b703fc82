"""Builds the embedded tokenizer in ral_jax/data/assets/tokenizer/ (HF format) with the `tokenizers` library.

    python -m ral_jax.data.build_tokenizer [--out ral_jax/data/assets/tokenizer]

A byte-level BPE like Qwen2's (same pre-tokeniser regex: digits split one by one, NFC normaliser, byte-level
alphabet so every string encodes), trained on the synthetic tasks' texts plus the prompt texts, with the ordinary
vocabulary filled to exactly FIRST_SPECIAL_ID tokens (reserved tokens pad it if the corpus runs out of merges) and
Qwen's special tokens after it, so that the ids match the `tiny` preset of models/config.py:
  <|vision_start|>=1019 <|vision_end|>=1020 <|image_pad|>=1021 <|video_pad|>=1022
  <|endoftext|>=1023 (pad) <|im_start|>=1024 <|im_end|>=1025 (end of turn / eos)
The tokenizer is loaded back with transformers' AutoTokenizer (tokenizer.load_tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os

from ral_jax.data import prompts, synthetic

FIRST_SPECIAL_ID = 1019
SPECIAL_TOKENS = ('<|vision_start|>', '<|vision_end|>', '<|image_pad|>', '<|video_pad|>',
                  '<|endoftext|>', '<|im_start|>', '<|im_end|>')
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), 'assets', 'tokenizer')


def corpus():
  """Training texts: prompts (system, instructions, chat scaffolding) and the synthetic tasks, repeated so the
  frequent strings win merges."""
  fixed = list(prompts.SYSTEM_PROMPTS.values()) + list(prompts.TYPE_INSTRUCTIONS.values())
  fixed += ['system\n', 'user\n', 'assistant\n', 'Options:\n', 'You are a helpful assistant.']
  fixed += [f'{c}. ' for c in 'ABCDEFGH'] + [str(i) for i in range(100)]
  for _ in range(50):
    yield from fixed
  yield from synthetic.text_corpus(num_per_task=200)


def build(out: str = DEFAULT_OUT) -> None:
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior='isolated', invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  trainer = trainers.BpeTrainer(vocab_size=FIRST_SPECIAL_ID, min_frequency=2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
  tok.train_from_iterator(corpus(), trainer=trainer)
  n = tok.get_vocab_size()
  if n < FIRST_SPECIAL_ID:  # pad with reserved (never produced by the BPE) tokens up to the first special id
    tok.add_tokens([AddedToken(f'<|reserved_{i}|>', special=True, normalized=False)
                    for i in range(FIRST_SPECIAL_ID - n)])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  for i, t in enumerate(SPECIAL_TOKENS):
    if tok.token_to_id(t) != FIRST_SPECIAL_ID + i:
      raise RuntimeError(f'{t} got id {tok.token_to_id(t)}, expected {FIRST_SPECIAL_ID + i}')
  os.makedirs(out, exist_ok=True)
  tok.save(os.path.join(out, 'tokenizer.json'))
  config = {
      'tokenizer_class': 'Qwen2TokenizerFast', 'model_max_length': 32768, 'errors': 'replace',
      'bos_token': None, 'unk_token': None, 'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>',
      'clean_up_tokenization_spaces': False, 'split_special_tokens': False, 'add_prefix_space': False,
      'chat_template': prompts.QWEN_VL_CHAT_TEMPLATE,
  }
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=1)
  print(f'wrote {tok.get_vocab_size()} tokens to {out}')


if __name__ == '__main__':
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default=DEFAULT_OUT)
  build(p.parse_args().out)
