"""Record errors keep their class, fields and sizes through pickling (Grain worker processes pickle what
they raise or hand over), and every class has the skip reason the batcher counts it under."""

import pickle

import pytest

from data_pipeline import errors
from data_pipeline.batching import SKIP_REASONS


@pytest.mark.parametrize("kind", [errors.RecordError, errors.CorruptImageError, errors.ImageTooLargeError,
                                  errors.OverlongRecordError, errors.UnsafePathError])
def test_record_errors_pickle_whole(kind):
  error = kind("r-1", "image", "is 9 pixels, more than 4", "downscale it", size=9, limit=4)
  again = pickle.loads(pickle.dumps(error))
  assert type(again) is kind and str(again) == str(error) == ("record 'r-1', field 'image': is 9 pixels, more than "
                                                              "4. To fix: downscale it.")
  assert (again.record_id, again.field, again.problem, again.fix, again.size, again.limit) == (
      "r-1", "image", "is 9 pixels, more than 4", "downscale it", 9, 4)


def test_every_record_error_class_counts_under_a_known_reason():
  kinds = [k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.RecordError)]
  assert len(kinds) >= 11
  assert {k.reason for k in kinds} == set(SKIP_REASONS)
  assert issubclass(errors.NoUsableRecordError, errors.DatasetError)
