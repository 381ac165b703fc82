"""Benchmarks (README: every figure names its command, card and versions). Each prints its result as JSON and
writes it to a file (`report`)."""
import json
import os


def report(result, path: str) -> None:
  """Prints `result` as indented JSON and writes the same to `path` (its folder created)."""
  print(json.dumps(result, indent=1), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
