"""Errors raised while reading data set annotations and images.

Every record-level problem is a `RecordError`: the builders catch it, count the record as skipped (or stop
the build when `strict=True`) and keep every other record. The message always names the record id, the
field or path at fault, and what to do about it, so one line in a log is enough to fix the data.
"""

from __future__ import annotations


class RecordError(ValueError):
  """One annotation record cannot be used; the rest of the data set is unaffected."""

  def __init__(self, record_id: str, field: str, problem: str, fix: str):
    self.record_id = record_id
    self.field = field
    self.problem = problem
    self.fix = fix
    super().__init__(f"record {record_id!r}, field {field!r}: {problem}. To fix: {fix}.")


class MissingFieldError(RecordError):
  """A required annotation field is absent."""


class InvalidFieldError(RecordError):
  """A field is present but has the wrong type, shape or value."""


class UnknownLabelError(InvalidFieldError):
  """A label (emotion, task type) is not in the label set it must belong to."""


class UnsafePathError(RecordError):
  """An image path points outside the data set root (absolute path, `..`, or a symlink escaping it)."""


class MissingFileError(RecordError):
  """An image path is inside the data set root but no file is there."""


class CorruptImageError(RecordError):
  """The image bytes cannot be decoded."""


class DuplicateIdError(RecordError):
  """Two records of one split share an id; the first one is kept."""


class DatasetError(ValueError):
  """A problem with the data set as a whole (no annotation files, unreadable file, bad arguments)."""
