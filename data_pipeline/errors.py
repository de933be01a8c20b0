"""Errors raised while reading data set annotations and images.

Every record-level problem is a `RecordError`: the builders and the input pipeline catch it, count the
record as skipped under its `reason` (or stop when `strict=True`) and keep every other record. The message
always names the record id, the field or path at fault, and what to do about it, so one line in a log is
enough to fix the data. A problem with the data set as a whole is a `DatasetError`: one message naming the
path, split or setting at fault and the fix, for the command line to print as is.
"""

from __future__ import annotations


class RecordError(ValueError):
  """One annotation record cannot be used; the rest of the data set is unaffected.

  `reason` is the skip-counter key (`batching.SKIP_REASONS`). `size` and `limit` quantify a record that is
  too large (tokens, vision slots or pixels against the setting it exceeds), so a data set in which every
  record is too large can say by how much; None for other problems.
  """

  reason = "invalid_record"

  def __init__(self, record_id: str, field: str, problem: str, fix: str, *, size: int | None = None,
               limit: int | None = None):
    self.record_id = record_id
    self.field = field
    self.problem = problem
    self.fix = fix
    self.size = size
    self.limit = limit
    super().__init__(f"record {record_id!r}, field {field!r}: {problem}. To fix: {fix}.")

  def __reduce__(self):  # Exception pickles `args` (the message) only; Grain workers pickle what they hand over
    return type(self), (self.record_id, self.field, self.problem, self.fix), {"size": self.size, "limit": self.limit}


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

  reason = "missing_file"


class CorruptImageError(RecordError):
  """The image bytes cannot be decoded."""

  reason = "corrupt_image"


class ImageTooLargeError(RecordError):
  """An image's header declares more pixels (`size`) than the limit (`limit`); it was never decoded.

  Found from the header alone, so a small file of huge dimensions costs no memory (a 450 KB PNG of
  12000x12000 decodes to 432 MB of RGB, and its resize needs several copies).
  """

  reason = "image_too_large"


class OverlongRecordError(RecordError):
  """A record's text (`size` tokens) cannot be fitted to seq_len (`limit`): dropped, or a cut would split
  its image placeholders or leave no answer token."""

  reason = "overlong"


class ImagesOverBudgetError(RecordError):
  """A record's images need more vision slots than an empty batch holds (`size`: the slots of all its frames,
  `limit`: patch_budget; a single frame may also exceed frame_budget)."""

  reason = "images_over_budget"


class DuplicateIdError(RecordError):
  """Two records of one split share an id; the first one is kept."""


class DatasetError(ValueError):
  """A problem with the data set as a whole (no annotation files, unreadable file, bad arguments)."""


class NoUsableRecordError(DatasetError):
  """No record read has been usable for a bounded number of attempts: the data or the settings are wrong.

  Raised by the input pipeline instead of reading a repeating stream forever; the message names the most
  common reason and its fix (settings are named by their `data.*` config keys, which are also the
  `PipelineConfig` fields).
  """
