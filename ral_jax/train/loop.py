"""The outer training loop: SFT warm-up steps, then RL steps; evaluation, metrics, checkpoints, resume.

Outer steps are numbered 1..sft_steps (SFT) then sft_steps+1..sft_steps+rl_steps (RL, one rollout batch each).
At the first RL step the RL optimizer state is created and the frozen reference is copied from the policy (none
when rl.beta = 0; checkpoints save it only when it cannot be re-derived: checkpoint.reference_source).
Per-step randomness: fold_in(PRNGKey(seed), outer_step). A run started in a workdir with a checkpoint resumes from
its latest step (state, reference, data-iterator positions, and the held-out accuracy measured before training).
Asynchronous dispatch: step t is dispatched before step t-1's metrics are fetched and written (`_log`), so the host
never waits for a step only to read its numbers. Non-finite values: an update with a non-finite loss or gradient is
skipped on device (train/step.py) and reported from the fetched metrics a step late; parameters are checked for
finiteness before every checkpoint (a non-finite state stops the run and is never saved), and
train.max_skipped_updates consecutive skipped updates stop the run without saving (SkipStreak).
Faults (README 'Failure handling'): SIGTERM / SIGINT save at the next step boundary and raise Preempted; a damaged
newest checkpoint falls back to the newest intact one (checkpoint.restore_newest_intact); a finished workdir says so
(already_done); a resumed run drops the metrics.jsonl lines past the restored step. Multi-host: host-computed
metrics are gathered over hosts, every host's data position is saved. The workdir may be a gs:// URL (ral_jax.paths).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, Optional

import jax
from absl import logging

from ral_jax import metrics as metrics_lib
from ral_jax import paths
from ral_jax.data import tokenizer as tokenizer_lib
from ral_jax.train import build as train_init
from ral_jax.train import checkpoint as ckpt_lib
from ral_jax.train import data as train_data
from ral_jax.train import eval_summary
from ral_jax.train import run_setup
from ral_jax.train import stages


class Preempted(Exception):
  """Raised (after a checkpoint) when the loop stops early: SIGINT / SIGTERM (`signum`) or train.stop_after
  (`signum` None). `step`: the outer step saved."""

  def __init__(self, msg: str, step: int = 0, signum: Optional[int] = None):
    super().__init__(msg)
    self.step, self.signum = step, signum


class Diverged(FloatingPointError):
  """train.max_skipped_updates consecutive optimizer updates were skipped (non-finite loss or gradient)."""


class SkipStreak:
  """Consecutive skipped optimizer updates across outer steps. An outer step whose `skipped` equals its number of
  updates extends the streak; one with any applied update ends it (the order inside a step is not known, so a
  partly skipped step counts as applied)."""

  def __init__(self, limit: int):
    self.limit, self.count = limit, 0

  def update(self, skipped: float, updates: int, outer: int) -> None:
    self.count = self.count + updates if skipped >= updates else 0
    if self.limit and self.count >= self.limit:
      raise Diverged(f'step {outer}: the last {self.count} optimizer updates were all skipped (non-finite loss or '
                     f'gradient); stopping without saving. Lower the learning rate (sft.lr / rl.lr) or check the '
                     f'data; the last saved checkpoint is intact (limit: train.max_skipped_updates='
                     f'{self.limit}).')


def _any_host(flag: bool) -> bool:
  """True when `flag` is set on any process (a signal may reach only some hosts; all must stop at one step)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.process_allgather(jax.numpy.asarray(flag, jax.numpy.int32)).max())


def _say(msg: str, writer: Optional[metrics_lib.MetricsWriter] = None):
  logging.info(msg)
  if writer is not None:
    writer.print(msg)
  elif jax.process_index() == 0:
    print(msg, flush=True)


class Trainer:
  """Holds the run's objects; `run()` executes the loop. Built once per process."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.ctx = run_setup.build_run(config)
    run = self.run_cfg = self.ctx.run
    self.mesh, self.rules, self.model_cfg = self.ctx.mesh, self.ctx.rules, run.model
    if run.teacher is not None and run.loop.rl_steps:
      self.ctx.teacher_cfg, self.ctx.teacher_params = train_init.load_teacher(run, self.mesh, self.rules)
    train_files, eval_files = train_data.manifests(run, workdir)
    self.sft_data = self.rl_data = None
    counter = train_data.make_counter(run)   # one for both stages: a file read by both is counted once
    if run.loop.sft_steps:
      self.sft_data = train_data.make_stage_data(run, train_files, run.loop.sft_batch_size, 'sft', counter)
    if run.loop.rl_steps:
      self.rl_data = train_data.make_stage_data(run, train_files, run.rl.prompts_per_batch, 'rl', counter)
    self.eval_batches = train_data.eval_batches(run, eval_files, run.loop.eval_examples, run.loop.eval_batch)
    self.ckpt = ckpt_lib.Checkpointer(workdir, run.loop.ckpt_every, run.loop.ckpt_keep, run.loop.ckpt_async)
    self.ref_record: Optional[Dict] = None   # the RL reference's source, as checkpoints record it (meta['ref'])
    self.base_rng = jax.random.PRNGKey(run.seed)
    self._steps: Dict[str, train_init.Steps] = {}
    self.streak = SkipStreak(config.train.max_skipped_updates)

  # ---- state -----------------------------------------------------------------------------------------------
  def steps_for(self, stage: str, state=None) -> train_init.Steps:
    if stage not in self._steps:
      sh = train_init.state_shardings_of(state)
      self._steps[stage] = train_init.make_steps(self.run_cfg, self.model_cfg, stage, sh, self.ctx.teacher_cfg)
    return self._steps[stage]

  def new_state(self, stage: str, params):
    tx = train_init.optim.make_optimizer(self.run_cfg.rl_optim if stage == 'rl' else self.run_cfg.sft_optim)
    return train_init.create_state(params, tx, self.run_cfg.seed)

  def stage_of(self, outer_step: int) -> str:
    """Stage of outer step k (1-based)."""
    return 'sft' if outer_step <= self.run_cfg.loop.sft_steps else 'rl'

  def reference_source(self, rl_from_start: bool) -> str:
    return ckpt_lib.reference_source(self.run_cfg.objective.grpo.beta, rl_from_start)

  def new_reference(self, params, source: str):
    """(the frozen reference or None, its checkpoint record) for an RL stage starting from `params`."""
    if source == 'none':
      return None, {'source': 'none'}
    ref = train_init.reference_of(params)
    return ref, ({'source': 'init', 'checksum': ckpt_lib.tree_checksum(ref)} if source == 'init' else
                 {'source': 'saved'})

  def restore_or_init(self):
    """(outer step done, stage, state, ref params, meta) from the latest checkpoint, else a fresh start. Sets
    self.ref_record, the reference's source as checkpoints record it."""
    params = run_setup.restore_params(self.ctx)
    first_stage = 'sft' if self.run_cfg.loop.sft_steps else 'rl'

    def templates(step):   # the stage a step was saved in (its meta), so a step beyond the total restores too
      stage = self.ckpt.read_meta(step).get('stage') or self.stage_of(step)
      ref_like = {k: v for k, v in params.items() if k != 'visual'} if stage == 'rl' else None   # shapes only
      return self.new_state(stage, params), ref_like

    found = self.ckpt.restore_newest_intact(templates)   # skips (and reports) damaged newer steps
    if found is None:
      ref, self.ref_record = (None, None) if first_stage == 'sft' else self.new_reference(
          params, self.reference_source(rl_from_start=True))
      return 0, first_stage, self.new_state(first_stage, params), ref, {}
    latest, state, ref, meta = found
    stage = meta.get('stage') or self.stage_of(latest)
    self.ref_record = None
    if stage == 'rl':
      ref = self._restored_reference(latest, ref, meta.get('ref') or {'source': 'saved'}, params)
    for name, data in (('sft', self.sft_data), ('rl', self.rl_data)):
      if data is not None and name in meta.get('data_state', {}):
        data.import_state(meta['data_state'][name])
    return latest, stage, state, ref, meta

  def _restored_reference(self, step: int, ref, record: dict, params):
    """The reference of RL checkpoint `step`: saved in it, or re-derived from the run's initial `params` and
    checked against the checksum saved with it, or none (saved with beta = 0)."""
    where = f'checkpoint {step} in {self.ckpt.directory}'
    source = record.get('source', 'saved')
    if source == 'init':
      ref, self.ref_record = self.new_reference(params, 'init')
      if self.ref_record['checksum'] != record.get('checksum'):
        raise ValueError(f"{where} re-derives its reference model from the run's initial parameters, but they "
                         f"differ from those it was saved with (checksum {self.ref_record['checksum']} != "
                         f"{record.get('checksum')}): resume with the same model.hf_checkpoint, seed and "
                         'model.init_checkpoint, or start a new workdir')
      return ref
    if source == 'none':
      if self.run_cfg.objective.grpo.beta > 0:
        raise ValueError(f'{where} was saved with rl.beta=0 and holds no reference model; resume with rl.beta=0, '
                         'or start a new workdir')
      self.ref_record = record
      return None
    if ref is None:
      raise ValueError(f"{where} is an RL step but holds no reference model ('ref'); resume from an earlier step "
                       'or start a new workdir')
    self.ref_record = {'source': 'saved'}
    return ref

  # ---- the loop ----------------------------------------------------------------------------------------------
  def _save(self, outer: int, stage: str, state, ref, extra: Dict, force: bool = False):
    data_state = {}
    for name, data in (('sft', self.sft_data), ('rl', self.rl_data)):
      if data is not None:
        data_state[name] = data.export_state()   # every host's position (a collective)
    meta = dict(extra, outer_step=outer, stage=stage, data_state=data_state)
    if stage == 'rl':
      meta['ref'] = self.ref_record
    self.ckpt.save(outer, state, meta, ref=self._saved_ref(stage, ref), force=force)

  def _saved_ref(self, stage: str, ref):
    """The reference an RL checkpoint holds: only a 'saved' one (else it is re-derived at restore); none in SFT."""
    return ref if stage == 'rl' and (self.ref_record or {}).get('source') == 'saved' else None

  def _prepare_saves(self, stage: str, state, ref) -> None:
    """Starts the checkpointer's warm-up for what `_save` will save (`Checkpointer.prepare`)."""
    self.ckpt.prepare(state, self._saved_ref(stage, ref))

  def evaluate(self, params, outer: int) -> Dict[str, float]:
    if not self.eval_batches:
      return {}
    ev = stages.evaluate(self.ctx, params, self.eval_batches, jax.random.fold_in(self.base_rng, 10 ** 9 + outer))
    return metrics_lib.gather_host_metrics(ev)   # each host scored its own rows: the run-wide accuracy

  def heatmaps(self, params, outer: int, tag: str, writer):
    """Attention heat maps of the first held-out examples (ral_jax/eval/attention.py): PNGs + TensorBoard."""
    n = self.run_cfg.loop.heatmap_examples
    if not n or not self.eval_batches:
      return
    from ral_jax.eval import attention
    with paths.staged_dir(paths.join(self.workdir, 'attention')) as out:   # PNGs: local, uploaded if remote
      attention.snapshot(self.ctx, params, self.eval_batches[0], out, tag, step=outer, examples=range(n),
                         tb_writer=writer.tb, layer=self.run_cfg.record_layer, rows=self.run_cfg.objective.ral.rows)

  def run(self) -> Dict[str, float]:
    run = self.run_cfg
    total = run.loop.total_steps
    done, stage, state, ref, meta = self.restore_or_init()
    if already_done(done, total, self.workdir, run.loop.export_hf):
      self.ckpt.close()
      return {'already_complete': 1.0}
    self._prepare_saves(stage, state, ref)   # the first save's one-time costs, in the background from here
    writer = metrics_lib.MetricsWriter(self.workdir, total, done, drop_after=done)
    guard = ckpt_lib.PreemptionGuard()
    points = dict(meta.get('eval_points') or {})   # milestone -> eval_summary.point (saved in the checkpoint meta)
    extra = {'eval_points': points}
    if 'eval_before' in meta and 'before' not in points:   # a checkpoint written before eval_points existed
      points['before'] = eval_summary.point({'eval/accuracy': meta['eval_before'], **(
          {'eval/evidence_mass': meta['eval_before_evidence_mass']} if 'eval_before_evidence_mass' in meta else {})}, 0)
    try:
      if done:
        _say(f'resumed from {self.ckpt.directory} at step {done} ({stage})', writer)
      if 'before' not in points and self.eval_batches:
        ev = self.evaluate(state.params, 0)
        points['before'] = eval_summary.point(ev, 0)
        writer.write(0, ev, stage='eval')
        _say(f'held-out accuracy before training: {ev["eval/accuracy"]:.3f} '
             f'(format {ev["eval/format"]:.3f}, {int(ev["eval/examples"])} examples, greedy)', writer)
        self.heatmaps(state.params, 0, 'step0_before', writer)
      last, pending, periodic = {}, None, None   # periodic: (outer step, metrics) of the last train.eval_every eval
      t_prev = time.perf_counter()
      for outer in range(done + 1, total + 1):
        new_stage = self.stage_of(outer)
        if new_stage != stage:          # SFT -> RL: fresh RL optimizer, reference = the policy now
          last = self._log(pending, writer) or last
          pending = None
          self._eval_after_sft(state.params, outer - 1, periodic, points, writer)
          state = self.new_state('rl', state.params)
          ref, self.ref_record = self.new_reference(state.params, self.reference_source(rl_from_start=False))
          stage = new_stage
          if ref is not None:           # RL checkpoints hold the reference too: a larger snapshot
            self._prepare_saves(stage, state, ref)
        if stage == 'rl' and outer == run.loop.sft_steps + 1:
          _say(f'step {outer}: RL stage ({run.algo}, lambda_attn={run.objective.ral.lambda_attn}, '
               f'G={run.rl.group_size}, {run.rl.updates_per_rollout} updates per rollout)', writer)
        steps = self.steps_for(stage, state)
        if stage == 'sft':
          state, m = stages.sft_step(self.ctx, steps, state, self.sft_data.next())
        else:
          rng = jax.random.fold_in(self.base_rng, outer)
          state, m, texts = stages.rl_step(self.ctx, steps, state, ref, self.rl_data.next(), rng)
          if outer % max(run.loop.log_every * 10, 1) == 0 or outer == done + 1:
            logging.info('step %d sample response: %r', outer, texts[0][:300])
        # Step `outer` is dispatched: only now are the previous step's metrics fetched (no stall between steps).
        last = self._log(pending, writer) or last
        m = metrics_lib.gather_host_metrics(m)   # rewards, lengths, times: computed per host
        m.update(self._data_metrics())
        now = time.perf_counter()
        m['time/step_wall'], t_prev = now - t_prev, now
        pending = (outer, stage, m)
        if run.loop.eval_every and outer % run.loop.eval_every == 0 and outer < total:
          periodic = (outer, self.evaluate(state.params, outer))
          m.update(periodic[1])
        if run.loop.heatmap_every and outer % run.loop.heatmap_every == 0 and outer < total:
          self.heatmaps(state.params, outer, f'step{outer}', writer)
        signalled = _any_host(guard.requested)
        stop = signalled or (run.loop.stop_after and outer >= run.loop.stop_after)
        if self.ckpt.should_save(outer) or stop or outer == total:
          last = self._log(pending, writer) or last
          pending = None
          if not ckpt_lib.params_finite(state.params):   # never checkpoint non-finite parameters
            _say(f'step {outer}: non-finite parameters; stopping without saving', writer)
            raise FloatingPointError(f'non-finite parameters at step {outer}')
          self._save(outer, stage, state, ref, extra, force=bool(stop))
        if stop:
          self.ckpt.wait()
          raise Preempted(f'stopped after step {outer} (checkpoint saved)', outer,
                          (guard.signum or signal.SIGTERM) if signalled else None)
      ev = self.evaluate(state.params, total)
      if ev:
        writer.write(total, ev, stage='eval')
        points['after_rl' if run.loop.rl_steps else 'after_sft'] = eval_summary.point(ev, total)
        self._report(points, writer)
        self.heatmaps(state.params, total, f'step{total}_after', writer)
      self.ckpt.wait()
      if run.loop.export_hf:
        self.export(state.params, writer)
      return {**last, **ev, 'eval_before': float('nan'), 'eval_before_evidence_mass': float('nan'),
              **eval_summary.flat(points)}   # flat: eval_before[_evidence_mass], eval_after_sft, ... where measured
    finally:
      guard.close()
      writer.close()
      self.ckpt.close()

  def _eval_after_sft(self, params, outer: int, periodic, points: Dict, writer) -> None:
    """Records the 'after_sft' milestone at the SFT -> RL boundary (outer = the last SFT step), reusing that
    step's periodic evaluation (train.eval_every; `periodic` = (step, metrics) of the last one) when it ran."""
    if 'after_sft' in points or not self.eval_batches:
      return
    ev = periodic[1] if periodic is not None and periodic[0] == outer else None
    if ev is None:
      ev = self.evaluate(params, outer)
      writer.write(outer, ev, stage='eval')
    points['after_sft'] = eval_summary.point(ev, outer)
    _say(f'held-out accuracy after SFT (step {outer}): {points["after_sft"]["accuracy"]:.3f}', writer)

  def _report(self, points: Dict, writer) -> None:
    """Prints the milestone table and writes <workdir>/eval_summary.json (process 0)."""
    run = self.run_cfg
    # one message, so that the progress bar is redrawn once, not between the table's lines
    _say('\n'.join(eval_summary.table(points, run.algo if run.loop.rl_steps else '')), writer)
    if jax.process_index() == 0:
      eval_summary.write(self.workdir, points, algo=run.algo, lambda_attn=run.objective.ral.lambda_attn,
                         sft_steps=run.loop.sft_steps, rl_steps=run.loop.rl_steps, seed=run.seed)

  def _log(self, pending, writer) -> Dict[str, float]:
    """Fetches and writes the metrics of a dispatched step (outer, stage, metrics) and reports skipped (non-finite)
    updates; returns the host metrics when the step is logged, else {}."""
    if pending is None:
      return {}
    outer, stage, m = pending
    total = self.run_cfg.loop.total_steps
    host = {}
    if outer % self.run_cfg.loop.log_every == 0 or outer == total:
      host = writer.write(outer, m, stage=stage)
    skipped = float(host['skipped'] if 'skipped' in host else m.get('skipped', 0.0))
    if skipped > 0:
      _say(f'step {outer}: {int(skipped)} optimizer update(s) skipped (non-finite loss or gradient)', writer)
    writer.advance(1, stage)
    self.streak.update(skipped, 1 if stage == 'sft' else self.run_cfg.rl.updates_per_rollout, outer)
    return host

  def _data_metrics(self) -> Dict[str, float]:
    return train_data.bad_input_metrics(self.sft_data, self.rl_data)

  def export(self, params, writer=None):
    """The policy as an HF checkpoint directory (config.json, safetensors, tokenizer files) in <workdir>/hf_export."""
    out = paths.join(self.workdir, 'hf_export')
    tok_dir = tokenizer_lib.tokenizer_path(self.run_cfg.tokenizer)
    export_policy(params, self.model_cfg, tok_dir, out)
    _say(f'exported the policy as an HF checkpoint to {out}', writer)


def host_params(params):
  """Parameters as host numpy arrays; multi-host, an all-gather every process takes part in."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(params, tiled=True)


def export_policy(params, model_cfg, tok_dir: str, out: str) -> None:
  """Writes params as an HF checkpoint (+ the tokenizer files of `tok_dir`) to `out` (local or gs://); called
  by every process, written by process 0."""
  from ral_jax.models import hf_io
  host = host_params(params)
  if jax.process_index() != 0:
    return
  with paths.staged_dir(out) as local:
    hf_io.save_hf(host, model_cfg, local, max_shard_bytes=4 << 30)
    for name in paths.listdir(tok_dir):
      src = paths.join(tok_dir, name)
      if paths.isfile(src) and ('token' in name or 'chat_template' in name or name in ('vocab.json', 'merges.txt')):
        with open(os.path.join(local, name), 'wb') as f:
          f.write(paths.read_bytes(src))


def already_done(done: int, total: int, workdir: str, export_hf: bool) -> bool:
  """True (and says so) when the restored step leaves nothing to do; warns when it lies beyond the total."""
  if done < total:
    return False
  ckpts = paths.join(workdir, 'checkpoints')
  if done > total:
    _say(f'WARNING: checkpoint step {done} in {ckpts} is beyond this run\'s {total} steps (train.sft_steps + '
         'train.rl_steps): nothing to train. Raise the step counts to continue, or use a new --workdir.')
  if export_hf and not paths.exists(paths.join(workdir, 'hf_export', 'config.json')):
    return False      # finished training but not the export (killed during it): finish that
  _say(f'this run is already complete: {ckpts} holds step {done} of {total}. Use a new --workdir for a new run, or '
       'raise train.sft_steps / train.rl_steps to train further.')
  return True


def _remove_if_empty(workdir: str) -> None:
  """Removes `workdir` if it holds nothing but empty folders (what a run that failed at start leaves)."""
  if jax.process_index() != 0 or not paths.isdir(workdir):
    return
  if next(paths.walk_files(workdir), None) is None:
    paths.rmtree(workdir)


def run(config, workdir: str) -> Dict[str, float]:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint); returns the last logged metrics.
  A run that fails before writing anything removes the workdir it created."""
  existed = paths.exists(workdir)
  newest = ckpt_lib.newest_step(workdir) if existed else None
  if newest is not None and already_done(newest, config.train.sft_steps + config.train.rl_steps, workdir,
                                         config.train.export_hf):
    return {'already_complete': 1.0}   # known before building anything (a model, the data pipelines)
  paths.makedirs(workdir)
  t0 = time.time()
  try:
    out = Trainer(config, workdir).run()
  except BaseException:
    if not existed:
      _remove_if_empty(workdir)
    raise
  if out.get('already_complete'):
    return out
  _say(f'done in {time.time() - t0:.0f} s; metrics in {paths.join(workdir, "metrics.jsonl")}, TensorBoard: '
       f'tensorboard --logdir {paths.join(workdir, "tb")}')
  return out
