"""Every config knob with its value, its default and its doc: `python -m ral_jax.main --config=FILE --show_config`.

The docs are the comments written next to each knob in configs/common.py (`c.rl.beta = 0.04  # KL weight`, plus
comment-only continuation lines below it), read from that file's source, so they cannot drift from the code.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

_ASSIGN = re.compile(r'^\s*c\.([A-Za-z_][\w.]*)\s*=\s*(.*?)\s*$')
_CONT = re.compile(r'^\s+#\s?(.*)$')


def _split_comment(rhs: str) -> Tuple[str, str]:
  """'0.04  # KL weight' -> ('0.04', 'KL weight'); a '#' inside a string literal is kept."""
  quote = None
  for i, ch in enumerate(rhs):
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch == '#':
      return rhs[:i].strip(), rhs[i + 1:].strip()
  return rhs.strip(), ''


def docs_from_source(path: str, function: str = 'base_config') -> Dict[str, str]:
  """{dotted knob: doc} from the comments in `function` (the one declaring every knob) of a config module,
  written as `c.<group>.<name> = value  # doc`."""
  docs: Dict[str, str] = {}
  last = None
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  start = next((i for i, l in enumerate(lines) if l.startswith(f'def {function}(')), None)
  if start is None:
    raise ValueError(f'{path} has no function {function}()')
  end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('def ')), len(lines))
  for line in lines[start + 1:end]:
    m = _ASSIGN.match(line)
    if m and 'ConfigDict()' not in m.group(2):
      last = m.group(1)
      docs[last] = _split_comment(m.group(2))[1]
      continue
    c = _CONT.match(line)
    if c and last is not None and line.index('#') > 20:   # an indented continuation of the comment above
      docs[last] = (docs[last] + ' ' + c.group(1)).strip()
    else:
      last = None
  return docs


def _flatten(config, prefix: str = '') -> List[Tuple[str, object]]:
  out = []
  for k in config.keys():
    v = config[k]
    if hasattr(v, 'keys'):
      out += _flatten(v, f'{prefix}{k}.')
    else:
      out.append((f'{prefix}{k}', v))
  return out


def describe(config, defaults, docs: Dict[str, str]) -> str:
  """One line per knob: `name = value` (with `[default: X]` where the preset or flags changed it) and its doc."""
  base = dict(_flatten(defaults))
  rows = []
  for name, value in _flatten(config):
    shown = f'{name} = {value!r}'
    if name in base and base[name] != value:
      shown += f'  [default: {base[name]!r}]'
    doc = docs.get(name, '')
    rows.append(f'{shown:<48}  {doc}' if doc else shown)
  return '\n'.join(rows)
