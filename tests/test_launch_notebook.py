"""The Colab demo notebook: well-formed, and its code cells run top to bottom on CPU with the tiny setting."""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'launch', 'colab_tpu_demo.ipynb')


def _cells():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb['nbformat'] == 4
  return nb['cells']


def test_notebook_structure_prose_before_every_step():
  cells = _cells()
  kinds = [c['cell_type'] for c in cells]
  assert kinds[0] == 'markdown' and kinds.count('code') >= 6
  for i, k in enumerate(kinds):        # every code cell is introduced by prose
    if k == 'code':
      assert kinds[i - 1] == 'markdown', f'code cell {i} has no explanation before it'
  code = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'code')
  for needle in ('jax[tpu]', 'jax.devices()', 'train.run(', 'plots.main(', "'before'", "'after'"):
    assert needle in code
  assert all(not c.get('outputs') for c in cells if c['cell_type'] == 'code')   # stored without outputs


def test_notebook_code_cells_execute_on_cpu(tmp_path, monkeypatch):
  import matplotlib
  matplotlib.use('Agg')
  monkeypatch.setenv('RAL_DEMO_TINY', '1')
  monkeypatch.setenv('RAL_DEMO_WORKDIR', str(tmp_path / 'demo'))
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.chdir(ROOT)
  ns = {'__name__': '__main__'}
  for i, cell in enumerate(c for c in _cells() if c['cell_type'] == 'code'):
    src = ''.join(cell['source'])
    assert not any(line.lstrip().startswith(('!', '%')) for line in src.splitlines()), 'shell/magic lines'
    exec(compile(src, f'<notebook code cell {i}>', 'exec'), ns)  # noqa: S102 - the notebook is ours
  assert ns['PLATFORM'] == 'cpu' and not ns['IN_COLAB']
  att = tmp_path / 'demo' / 'attention'
  names = set(os.listdir(att))
  assert {'before_ex0_m0.png', 'after_ex0_m0.png', 'before_answers.txt', 'after_answers.txt'} <= {
      n.replace('_t0', '') for n in names}
  assert os.path.exists(tmp_path / 'demo' / 'plots' / 'training_curves.png')
  assert 'loss' in ns['result'] or 'reward' in ns['result']
