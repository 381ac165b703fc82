"""Tokenizer loading: a real checkpoint's tokenizer or the embedded one, through the same transformers call.

`load_tokenizer(path)` reads a local HF tokenizer directory (tokenizer.json / tokenizer_config.json, e.g. a
Qwen2.5-VL checkpoint directory); `path=None` or 'embedded' gives the small tokenizer kept in
ral_jax/data/assets/tokenizer (built by ral_jax/data/build_tokenizer.py). Never touches the hub.
A checkpoint whose tokenizer has no chat template gets it from chat_template.json / chat_template.jinja in the same
directory, else Qwen's template (prompts.QWEN_VL_CHAT_TEMPLATE).

`TextEncoder` is what Grain workers use: the loaded tokenizer's `tokenizers` backend and its chat template,
rendered with jinja2 in the environment transformers uses (trim_blocks, lstrip_blocks, loopcontrols, tojson,
raise_exception; the special-token strings as variables). It pickles without transformers, so worker processes
never import transformers (that import alone takes seconds per worker); its ids equal `tok(text)` and its text
equals `tok.apply_chat_template(...)` (tests/test_data_tokenizer.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, List, Optional, Tuple

from ral_jax.data import prompts

EMBEDDED_DIR = os.path.join(os.path.dirname(__file__), 'assets', 'tokenizer')


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of the tokens the data, rollout and reward code need."""
  pad: int             # <|endoftext|>: padding of prompts and responses
  eos: Tuple[int, ...]  # generation stops at any of these: <|im_end|>, <|endoftext|>
  end_of_turn: int     # <|im_end|>: last token of every SFT target
  im_start: int
  image_pad: int
  video_pad: int
  vision_start: int
  vision_end: int


def tokenizer_path(path: Optional[str] = None) -> str:
  """The directory of a tokenizer name: None, '' or 'embedded' -> the embedded tokenizer's directory."""
  return EMBEDDED_DIR if path in (None, '', 'embedded') else path


def load_tokenizer(path: Optional[str] = None):
  """A transformers fast tokenizer from a local directory (None / 'embedded': the embedded one)."""
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  from transformers import AutoTokenizer
  path = tokenizer_path(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'tokenizer directory {path!r} does not exist: point the config at a local checkpoint '
                            "directory or use 'embedded'")
  tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  if not tok.chat_template:
    tok.chat_template = _find_chat_template(path) or prompts.QWEN_VL_CHAT_TEMPLATE
  return tok


def _find_chat_template(path: str) -> Optional[str]:
  jinja, js = os.path.join(path, 'chat_template.jinja'), os.path.join(path, 'chat_template.json')
  if os.path.exists(jinja):
    with open(jinja) as f:
      return f.read()
  if os.path.exists(js):
    with open(js) as f:
      return json.load(f).get('chat_template')
  return None


def special_ids(tok) -> SpecialIds:
  def tid(t):
    i = tok.convert_tokens_to_ids(t)
    if i is None or i == tok.unk_token_id:
      raise ValueError(f'tokenizer {tok.name_or_path!r} has no {t} token: not a Qwen2-VL-style tokenizer')
    return int(i)
  return SpecialIds(pad=tid('<|endoftext|>'), eos=(tid('<|im_end|>'), tid('<|endoftext|>')),
                    end_of_turn=tid('<|im_end|>'), im_start=tid('<|im_start|>'), image_pad=tid('<|image_pad|>'),
                    video_pad=tid('<|video_pad|>'), vision_start=tid('<|vision_start|>'),
                    vision_end=tid('<|vision_end|>'))


def check_matches_model(tok, cfg) -> SpecialIds:
  """Raises if the tokenizer's vision token ids or size disagree with the model config (models.config)."""
  ids = special_ids(tok)
  pairs = {'image_token_id': ids.image_pad, 'video_token_id': ids.video_pad,
           'vision_start_token_id': ids.vision_start, 'vision_end_token_id': ids.vision_end}
  bad = {k: (getattr(cfg, k), v) for k, v in pairs.items() if getattr(cfg, k) != v}
  if bad:
    raise ValueError(f'model config and tokenizer disagree on {bad} (config, tokenizer): use the tokenizer of the '
                     'checkpoint, or the embedded tokenizer with the tiny preset')
  if len(tok) > cfg.vocab_size:
    raise ValueError(f'tokenizer has {len(tok)} tokens but model vocab_size is {cfg.vocab_size}')
  return ids


_GENERATION_TAG = re.compile(r'{%-?\s*(end)?generation\s*-?%}')


@dataclasses.dataclass
class TextEncoder:
  """Picklable chat rendering + tokenisation without transformers (see the module docstring)."""
  backend: object              # tokenizers.Tokenizer
  chat_template: str
  template_vars: Dict[str, object]
  ids: SpecialIds

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop('_compiled', None)
    return state

  def encode(self, text: str) -> List[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def render(self, messages, add_generation_prompt: bool = True) -> str:
    if getattr(self, '_compiled', None) is None:
      self._compiled = _compile(self.chat_template)
    return self._compiled.render(messages=messages, tools=None, documents=None,
                                 add_generation_prompt=add_generation_prompt, **self.template_vars)


def _compile(template: str):
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  return env.from_string(_GENERATION_TAG.sub('', template))  # {% generation %} only marks spans for masks


def text_encoder(tok) -> TextEncoder:
  """The TextEncoder of a loaded transformers tokenizer."""
  template = tok.chat_template or prompts.QWEN_VL_CHAT_TEMPLATE
  return TextEncoder(tok.backend_tokenizer, template, dict(tok.special_tokens_map), special_ids(tok))
