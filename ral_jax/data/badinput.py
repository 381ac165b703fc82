"""Bad-input accounting (design.md 'Bad input and failure').

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
           'zero_frames', 'prompt_over_budget', 'media_over_budget', 'target_over_budget')


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
  """Thread-safe counts of good and bad records, by reason and by source file."""

  def __init__(self, max_bad_fraction: float = 0.1, min_records: int = 32):
    if not 0.0 <= max_bad_fraction <= 1.0:
      raise ValueError(f'max_bad_fraction={max_bad_fraction} must be in [0, 1]')
    self.max_bad_fraction, self.min_records = max_bad_fraction, min_records
    self._lock = threading.Lock()
    self.by_reason: Dict[str, int] = collections.Counter()
    self.seen_by_source: Dict[str, int] = collections.Counter()
    self.bad_by_source: Dict[str, int] = collections.Counter()
    self._logged = set()

  def good(self, source: str = '') -> None:
    with self._lock:
      self.seen_by_source[source] += 1

  def bad(self, err: BadRecord, source: Optional[str] = None, check: bool = True) -> None:
    """Counts one skipped record, logs the first of each reason, then applies the bad-fraction limit."""
    source = err.source if source is None else source
    with self._lock:
      self.by_reason[err.reason] += 1
      self.seen_by_source[source] += 1
      self.bad_by_source[source] += 1
      first = err.reason not in self._logged
      self._logged.add(err.reason)
    if first:
      logging.warning('skipping bad record %r from %s (%s); further %r records are counted, not logged',
                      err.record_id, source or '?', err, err.reason)
    if check:
      self.check(source)

  def check(self, source: str, final: bool = False) -> None:
    """Raises DataError if more than max_bad_fraction of the records of `source` were bad."""
    seen, bad = self.seen_by_source[source], self.bad_by_source[source]
    if (final or seen >= self.min_records) and seen and bad / seen > self.max_bad_fraction:
      reasons = dict(self.by_reason)
      raise DataError(f'{bad} of {seen} records of {source} are bad ({reasons}), above max_bad_fraction='
                      f'{self.max_bad_fraction}: fix the data or raise the limit')

  @property
  def total_seen(self) -> int:
    return sum(self.seen_by_source.values())

  @property
  def total_bad(self) -> int:
    return sum(self.bad_by_source.values())

  def metrics(self, prefix: str = 'data/') -> Dict[str, float]:
    """Scalars for the metric writers: seen, bad, bad_fraction and bad/<reason> counts."""
    with self._lock:
      seen, bad = self.total_seen, self.total_bad
      out = {f'{prefix}seen': seen, f'{prefix}bad': bad, f'{prefix}bad_fraction': bad / max(seen, 1)}
      out.update({f'{prefix}bad/{r}': n for r, n in sorted(self.by_reason.items())})
    return out
