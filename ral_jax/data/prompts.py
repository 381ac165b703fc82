"""Chat prompts: system prompts, Video-R1 question formatting, the Qwen2-VL chat template, pad-token expansion.

Prompt styles (`PromptConfig.style`):
  'think'        the think/answer format of the paper's RAL runs: the system prompt asks for
                 `<think> ... </think><answer> ... </answer>`.
  'answer_only'  RAL-zero (ral_jax/docs/method.md s.4): the system prompt asks for `<answer> ... </answer>` only.
The user turn is the media placeholder(s) followed by the question text, formatted as Video-R1 does:
  problem + '\nOptions:\n' + one option per line ('A. red'), then the answer-type instruction
  (Video-R1's TYPE_TEMPLATE wording) when `type_instruction` is on.

Pad-token expansion: the chat template emits one `<|vision_start|><|image_pad|><|vision_end|>` per image
(`<|video_pad|>` per video); after tokenisation each pad id is repeated t*h*w / merge**2 times (the number of
merged visual tokens of that media item), in media order, exactly like `Qwen2_5_VLProcessor.__call__` does on the
string. Expanding ids instead of strings gives the same ids because the pad tokens are atomic special tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import numpy as np

THINK_SYSTEM_PROMPT = (
    'A conversation between User and Assistant. The user asks a question about an image or a video, and the '
    'Assistant answers it. The Assistant first thinks about the reasoning process and then gives the answer. '
    'The reasoning process and the answer are enclosed within <think> </think> and <answer> </answer> tags, '
    'i.e., <think> reasoning process here </think><answer> answer here </answer>.')

ANSWER_ONLY_SYSTEM_PROMPT = (
    'A conversation between User and Assistant. The user asks a question about an image or a video, and the '
    'Assistant answers it directly, without reasoning, giving only the final answer within <answer> </answer> '
    'tags, i.e., <answer> answer here </answer>.')

SYSTEM_PROMPTS = {'think': THINK_SYSTEM_PROMPT, 'answer_only': ANSWER_ONLY_SYSTEM_PROMPT}

# Video-R1's per-problem-type answer instructions (appended to the question).
TYPE_INSTRUCTIONS = {
    'multiple choice': ' Please provide only the single option letter (e.g., A, B, C, D, etc.) within the '
                       '<answer> </answer> tags.',
    'numerical': ' Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.',
    'OCR': ' Please transcribe text from the image/video clearly and provide your text answer within the '
           '<answer> </answer> tags.',
    'free-form': ' Please provide your text answer within the <answer> </answer> tags.',
    'regression': ' Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.',
}

# The Qwen2-VL / Qwen2.5-VL chat template (Jinja), used when a tokenizer directory ships none.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

END_OF_TURN = '<|im_end|>'
LETTERS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  style: str = 'think'            # 'think' | 'answer_only' (RAL-zero)
  system_prompt: str = ''         # overrides the style's system prompt when non-empty
  type_instruction: bool = True   # append Video-R1's answer-type instruction to the question

  def __post_init__(self):
    if self.style not in SYSTEM_PROMPTS:
      raise ValueError(f'prompt style {self.style!r} unknown; choose one of {sorted(SYSTEM_PROMPTS)}')


def lettered_options(options: Sequence[str]) -> List[str]:
  """Video-R1 options already read 'A. text'; bare option texts get 'A. ', 'B. ', ... prefixed."""
  out = []
  for i, opt in enumerate(options):
    opt = str(opt).strip()
    has_letter = len(opt) >= 2 and opt[0] in LETTERS and opt[1] in '.)'
    out.append(opt if has_letter else f'{LETTERS[i]}. {opt}')
  return out


def format_question(problem: str, options: Sequence[str], problem_type: str, cfg: PromptConfig) -> str:
  """Question text of the user turn: problem, 'Options:' block (multiple choice), answer-type instruction."""
  text = problem.strip()
  if options:
    text += '\nOptions:\n' + '\n'.join(lettered_options(options))
  if cfg.type_instruction:
    text += TYPE_INSTRUCTIONS.get(problem_type, TYPE_INSTRUCTIONS['free-form'])
  return text


def build_messages(question: str, media_kinds: Sequence[str], cfg: PromptConfig) -> List[Dict]:
  """Chat messages: system prompt, then one user turn with the media placeholders before the question."""
  system = cfg.system_prompt or SYSTEM_PROMPTS[cfg.style]
  content = [{'type': kind} for kind in media_kinds] + [{'type': 'text', 'text': question}]
  return [{'role': 'system', 'content': system}, {'role': 'user', 'content': content}]


def render_prompt(tokenizer, messages: List[Dict]) -> str:
  """The chat template applied with the generation prompt ('<|im_start|>assistant\\n' at the end)."""
  template = tokenizer.chat_template or QWEN_VL_CHAT_TEMPLATE
  return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=True)


def strip_think(target: str) -> str:
  """RAL-zero SFT target: the '<think>...</think>' block removed, only '<answer>...</answer>' kept."""
  start, end = target.find('<think>'), target.find('</think>')
  if start < 0 or end < 0:
    return target.strip()
  return (target[:start] + target[end + len('</think>'):]).strip()


def expand_vision_pads(ids: Sequence[int], pad_ids: Sequence[int], counts: Sequence[int]) -> np.ndarray:
  """Repeats the k-th vision pad token (any id in `pad_ids`) counts[k] times; errors if the numbers disagree."""
  ids = np.asarray(ids, np.int32)
  where = np.flatnonzero(np.isin(ids, np.asarray(pad_ids, np.int32)))
  if len(where) != len(counts):
    raise ValueError(f'prompt has {len(where)} vision pad tokens but {len(counts)} media items were loaded')
  reps = np.ones(len(ids), np.int64)
  reps[where] = np.asarray(counts, np.int64)
  return np.repeat(ids, reps)
