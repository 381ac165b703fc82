"""Bad-input accounting (ral_jax/docs/design.md 'Bad input and failure').

A bad record raises `BadRecord(reason, ...)` where it is found (manifest parsing, media loading, prompt
building, tokenizing); the pipeline turns it into a skipped element, counted here by reason and by file, and logged
once per reason with its file and record. Any other exception while processing one record is counted as
'processing_error' (its type and message kept). `BadInputCounter.check` stops the run with `DataError` naming the
manifest file once the bad fraction of that file exceeds the configured limit (after `min_records` records of it
were seen, so one early bad record cannot trip it).

Bad fraction of a file (one definition for the limit and for the metric `data/bad_fraction`, which is the worst
file's): max(parse-stage bad / lines parsed, process-stage bad / elements read). A file read by several pipelines
(SFT and RL read the same training manifest) shares one counter: its lines are counted once (`data/records`).
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Dict, List, Optional, Sequence

import numpy as np

REASONS = ('malformed_record', 'missing_answer', 'missing_target', 'missing_media', 'corrupt_media',
           'unsupported_media', 'zero_frames', 'prompt_over_budget', 'media_over_budget', 'target_over_budget',
           'processing_error', 'malformed_evidence')
STAGES = ('parse', 'process')


class DataError(RuntimeError):
  """The data cannot be used at all (empty manifest, too many bad records)."""


class BadRecord(Exception):
  """One record is unusable; `reason` is one of REASONS."""

  def __init__(self, reason: str, detail: str, record_id: str = '', source: str = ''):
    if reason not in REASONS:
      raise ValueError(f'unknown bad-record reason {reason!r}; add it to badinput.REASONS')
    super().__init__(f'{reason}: {detail}')
    self.reason, self.detail, self.record_id, self.source = reason, detail, record_id, source


class BadInputCounter:
  """Thread-safe counts of bad records by reason, and of records per source file in two stages:
  parsing (each manifest record once) and processing (each element the pipeline reads, every epoch). The
  bad-fraction limit is applied to each stage separately: at the end of parsing a file, and while processing once
  `min_records` elements of the file were read."""

  def __init__(self, max_bad_fraction: float = 0.1, min_records: int = 32):
    if not 0.0 <= max_bad_fraction <= 1.0:
      raise ValueError(f'max_bad_fraction={max_bad_fraction} must be in [0, 1]')
    self.max_bad_fraction, self.min_records = max_bad_fraction, min_records
    self._lock = threading.Lock()
    self.by_reason: Dict[str, int] = collections.Counter()
    self.seen = {stage: collections.Counter() for stage in STAGES}   # stage -> source -> count
    self.bad_seen = {stage: collections.Counter() for stage in STAGES}
    self.stage_reasons = {stage: collections.Counter() for stage in STAGES}   # stage -> reason -> count
    self._logged = set()
    self._parsed = set()

  def begin_parse(self, source: str) -> bool:
    """True the first time `source` is parsed with this counter (its lines are counted then, never again)."""
    with self._lock:
      first = source not in self._parsed
      self._parsed.add(source)
    return first

  def good(self, source: str = '', stage: str = 'process') -> None:
    with self._lock:
      self.seen[stage][source] += 1
    if stage == 'process':   # the fraction may stand above the limit when the threshold is reached
      self.check(source, stage)

  def bad(self, err: BadRecord, source: Optional[str] = None, stage: str = 'process') -> None:
    """Counts one skipped record, logs the first of each reason; while processing, applies the limit."""
    source = err.source if source is None else source
    with self._lock:
      self.by_reason[err.reason] += 1
      self.stage_reasons[stage][err.reason] += 1
      self.seen[stage][source] += 1
      self.bad_seen[stage][source] += 1
      first = err.reason not in self._logged
      self._logged.add(err.reason)
    if first:
      logging.warning('skipping bad record %r from %s (%s); further %r records are counted, not logged',
                      err.record_id, source or '?', err, err.reason)
    if stage == 'process':
      self.check(source, stage)

  def fraction(self, source: str, stage: str) -> float:
    seen = self.seen[stage][source]
    return self.bad_seen[stage][source] / seen if seen else 0.0

  def check(self, source: str, stage: str = 'process') -> None:
    """Raises DataError if more than max_bad_fraction of the records of `source` were bad in `stage`."""
    seen, bad = self.seen[stage][source], self.bad_seen[stage][source]
    if not bad:
      return
    # enforced after min_records elements, or after as many as the file has lines (a whole pass of a small file)
    threshold = min(self.min_records, self.seen['parse'][source] or self.min_records)
    if (stage == 'parse' or seen >= threshold) and bad / seen > self.max_bad_fraction:
      raise DataError(f'{bad} of {seen} records of {source} are bad ({stage} stage; {dict(self.by_reason)}), above '
                      f'max_bad_fraction={self.max_bad_fraction}: fix the data or raise the limit')

  def per_file(self) -> Dict[str, Dict[str, float]]:
    """{file: {records (lines parsed, once), seen (elements read), bad (both stages), bad_fraction}}."""
    with self._lock:
      files = sorted(set(self.seen['parse']) | set(self.seen['process']))
      return {f: {'records': self.seen['parse'][f], 'seen': self.seen['process'][f],
                  'bad': self.bad_seen['parse'][f] + self.bad_seen['process'][f],
                  'bad_fraction': max(self.fraction(f, 'parse'), self.fraction(f, 'process'))} for f in files}

  def to_vector(self, files: Sequence[str]) -> np.ndarray:
    """Counts as one float vector (per stage: seen and bad of each of `files`, then each reason of REASONS), for
    gathering across hosts; `from_vectors` inverts it."""
    with self._lock:
      out = [float(c[f]) for stage in STAGES for c in (self.seen[stage], self.bad_seen[stage]) for f in files]
      out += [float(self.stage_reasons[stage][r]) for stage in STAGES for r in REASONS]
    return np.asarray(out, np.float64)

  @classmethod
  def from_vectors(cls, vectors: np.ndarray, files: Sequence[str], max_bad_fraction: float = 1.0,
                   min_records: int = 32) -> 'BadInputCounter':
    """The run-wide counter of several hosts' `to_vector`s ([hosts, K]): each host parses every manifest line, so
    the parse stage is host 0's; each host processes only its own rows, so the process stage is summed."""
    out = cls(max_bad_fraction, min_records)
    vectors = np.asarray(vectors, np.float64)
    merged = {'parse': vectors[0], 'process': vectors.sum(axis=0)}
    nf = len(files)
    for i, stage in enumerate(STAGES):
      v = merged[stage]
      for j, f in enumerate(files):
        out.seen[stage][f] = int(round(v[2 * i * nf + j]))
        out.bad_seen[stage][f] = int(round(v[(2 * i + 1) * nf + j]))
      base = 2 * len(STAGES) * nf + i * len(REASONS)
      for j, r in enumerate(REASONS):
        if v[base + j]:
          out.stage_reasons[stage][r] = int(round(v[base + j]))
          out.by_reason[r] += int(round(v[base + j]))
    return out

  def files(self) -> List[str]:
    with self._lock:
      return sorted(set(self.seen['parse']) | set(self.seen['process']))

  def metrics(self, prefix: str = 'data/') -> Dict[str, float]:
    """Scalars for the metric writers: records (lines parsed, each file once), seen (elements processed), bad
    (both stages), bad_fraction (the worst file's, as the limit defines it) and bad/<reason> counts."""
    files = self.per_file()
    out = {f'{prefix}records': sum(f['records'] for f in files.values()),
           f'{prefix}seen': sum(f['seen'] for f in files.values()),
           f'{prefix}bad': sum(f['bad'] for f in files.values()),
           f'{prefix}bad_fraction': max([f['bad_fraction'] for f in files.values()], default=0.0)}
    with self._lock:
      out.update({f'{prefix}bad/{r}': n for r, n in sorted(self.by_reason.items())})
    return out
