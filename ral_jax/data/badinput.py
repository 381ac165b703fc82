"""Bad-input accounting (ral_jax/docs/design.md 'Bad input and failure').

A bad record raises `BadRecord(reason, ...)` where it is found (manifest parsing, media loading, prompt
building); the pipeline turns it into a skipped element, counted here by reason and logged once per reason.
`BadInputCounter.check` stops the run with `DataError` naming the manifest file once the bad fraction of that file
exceeds the configured limit (after `min_records` records of it were seen, so one early bad record cannot trip it).
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Dict, Optional

REASONS = ('malformed_record', 'missing_answer', 'missing_target', 'missing_media', 'corrupt_media',
           'unsupported_media', 'zero_frames', 'prompt_over_budget', 'media_over_budget', 'target_over_budget')
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
    self._logged = set()

  def good(self, source: str = '', stage: str = 'process') -> None:
    with self._lock:
      self.seen[stage][source] += 1

  def bad(self, err: BadRecord, source: Optional[str] = None, stage: str = 'process') -> None:
    """Counts one skipped record, logs the first of each reason; while processing, applies the limit."""
    source = err.source if source is None else source
    with self._lock:
      self.by_reason[err.reason] += 1
      self.seen[stage][source] += 1
      self.bad_seen[stage][source] += 1
      first = err.reason not in self._logged
      self._logged.add(err.reason)
    if first:
      logging.warning('skipping bad record %r from %s (%s); further %r records are counted, not logged',
                      err.record_id, source or '?', err, err.reason)
    if stage == 'process':
      self.check(source, stage)

  def check(self, source: str, stage: str = 'process') -> None:
    """Raises DataError if more than max_bad_fraction of the records of `source` were bad in `stage`."""
    seen, bad = self.seen[stage][source], self.bad_seen[stage][source]
    if (stage == 'parse' or seen >= self.min_records) and seen and bad / seen > self.max_bad_fraction:
      raise DataError(f'{bad} of {seen} records of {source} are bad ({stage} stage; {dict(self.by_reason)}), above '
                      f'max_bad_fraction={self.max_bad_fraction}: fix the data or raise the limit')

  def metrics(self, prefix: str = 'data/') -> Dict[str, float]:
    """Scalars for the metric writers: records (parsed), seen (processed), bad (both stages), bad_fraction
    (processing stage) and bad/<reason> counts."""
    with self._lock:
      seen = sum(self.seen['process'].values())
      out = {f'{prefix}records': sum(self.seen['parse'].values()), f'{prefix}seen': seen,
             f'{prefix}bad': sum(sum(c.values()) for c in self.bad_seen.values()),
             f'{prefix}bad_fraction': sum(self.bad_seen['process'].values()) / max(seen, 1)}
      out.update({f'{prefix}bad/{r}': n for r, n in sorted(self.by_reason.items())})
    return out
