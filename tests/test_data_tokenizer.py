"""Embedded tokenizer ids, and TextEncoder (workers' jinja + tokenizers path) == transformers' tokenizer."""
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from ral_jax.data import prompts, tokenizer
from ral_jax.models.config import get_preset

CFG = get_preset('tiny')


@pytest.fixture(scope='module')
def tok():
  return tokenizer.load_tokenizer()


def test_embedded_tokenizer_matches_tiny_preset(tok):
  ids = tokenizer.check_matches_model(tok, CFG)
  assert (ids.vision_start, ids.vision_end, ids.image_pad, ids.video_pad) == (1019, 1020, 1021, 1022)
  assert (ids.pad, ids.im_start, ids.end_of_turn) == (1023, 1024, 1025)
  assert ids.pad == tok.pad_token_id and ids.end_of_turn == tok.eos_token_id and ids.eos == (1025, 1023)
  assert len(tok) == 1026 <= CFG.vocab_size
  with pytest.raises(ValueError, match='disagree'):
    tokenizer.check_matches_model(tok, get_preset('qwen2_5_vl_7b'))


def test_missing_dir_error():
  with pytest.raises(FileNotFoundError, match='embedded'):
    tokenizer.load_tokenizer('/no/such/dir')


MESSAGES = [
    prompts.build_messages('What colour?\nOptions:\nA. red', ['image'], prompts.PromptConfig()),
    prompts.build_messages('Which part?', ['video', 'image'], prompts.PromptConfig(style='answer_only')),
    [{'role': 'user', 'content': [{'type': 'text', 'text': 'no system turn'}]}],
    [{'role': 'user', 'content': 'plain string'}, {'role': 'assistant', 'content': '<answer>A</answer>'}],
]


@pytest.mark.parametrize('i', range(len(MESSAGES)))
@pytest.mark.parametrize('gen', [True, False])
def test_text_encoder_renders_like_transformers(tok, i, gen):
  enc = tokenizer.text_encoder(tok)
  want = tok.apply_chat_template(MESSAGES[i], tokenize=False, add_generation_prompt=gen)
  assert enc.render(MESSAGES[i], add_generation_prompt=gen) == want
  assert enc.render(MESSAGES[i], add_generation_prompt=gen) == prompts.render_prompt(tok, MESSAGES[i]) or not gen
  assert enc.encode(want) == tok(want)['input_ids']


def test_chat_template_text_by_hand(tok):
  text = tokenizer.text_encoder(tok).render(
      [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': [{'type': 'video'}, {'type': 'text', 'text': 'Q'}]}])
  assert text == ('<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Q'
                  '<|im_end|>\n<|im_start|>assistant\n')


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=('Cs',)), max_size=40) |
       st.sampled_from(['<think>a</think><answer>B</answer>', ' 3.14\n\n x', '<|im_end|><|image_pad|>x']))
def test_encode_matches_transformers_and_roundtrips(text):
  tok = tokenizer.load_tokenizer()
  enc = tokenizer.text_encoder(tok)
  ids = enc.encode(text)
  assert ids == tok(text)['input_ids']
  import unicodedata
  assert tok.decode(ids) == unicodedata.normalize('NFC', text)


def test_workers_need_no_transformers(tok, tmp_path):
  """The pickled per-example transform runs in a fresh interpreter without importing transformers."""
  from PIL import Image
  from ral_jax.data import pipeline
  from ral_jax.data.features import ExampleProcessor
  from ral_jax.data.records import Example
  Image.new('RGB', (112, 112), (200, 30, 30)).save(tmp_path / 'a.png')
  ex = Example('x', 'What colour?', ('red', 'green'), 'A', 'multiple choice', (('image', str(tmp_path / 'a.png')),),
               '<think>red</think><answer>A</answer>')
  proc = ExampleProcessor(pipeline.synthetic_config(['unused.jsonl']), CFG, tokenizer.text_encoder(tok))
  (tmp_path / 'job.pkl').write_bytes(pickle.dumps((proc, ex)))
  want = proc(ex)
  code = ('import pickle, sys; proc, ex = pickle.load(open(sys.argv[1], "rb")); out = proc(ex); '
          'assert "transformers" not in sys.modules, "transformers imported"; '
          'print(list(out["prompt_ids"]) + [-1] + list(out["target_ids"]))')
  res = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'job.pkl')], capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip() == str(list(want['prompt_ids']) + [-1] + list(want['target_ids']))
