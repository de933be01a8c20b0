"""The batcher's handling of records that yield no row: per-reason counters, `strict` for every reason,
rate-limited warnings, and giving up on a stream with nothing usable (instead of reading it forever).

Streams are hand-made lists of `example` / `rejected` dicts (what the per-example work hands over), so
every count below is known exactly; the pipeline-level behaviour is in test_pipeline.py.
"""

import json
import logging

import grain
import numpy as np
import pytest

from data_pipeline import batching
from data_pipeline.batching import BatchIterDataset, BatchLayout, Counters, example, rejected
from data_pipeline.errors import (CorruptImageError, ImagesOverBudgetError, ImageTooLargeError, InvalidFieldError,
                                  MissingFileError, NoUsableRecordError, OverlongRecordError, RecordError)

LAYOUT = BatchLayout(batch_size=1, seq_len=16, patch_budget=256, frame_budget=256, pad_id=0)


def usable(n: int) -> dict:
  """A text-only example of 4 tokens."""
  return example(f"good-{n}", input_ids=[1, 2, 3, 4], labels=[-100, -100, 3, 4], position_ids=np.zeros((3, 4)),
                 rope_delta=0, patches=np.zeros((0, 3, 14, 14)), image_grid_thw=np.zeros((0, 3)), frame_slots=[])


def overlong(n: int, tokens: int) -> dict:
  return rejected("dropped_overlong", OverlongRecordError(f"long-{n}", "<text>", f"has {tokens} tokens, more than "
                                                          "seq_len=16", "raise seq_len", size=tokens, limit=16))


def corrupt(n: int) -> dict:
  return rejected("skipped", CorruptImageError(f"corrupt-{n}", "image", "the image bytes are not a JPEG", "re-encode"))


def missing(n: int) -> dict:
  return rejected("skipped", MissingFileError(f"missing-{n}", "image", "no image file at x.jpg", "check the path"))


def batcher(items, *, repeat: bool, strict: bool = False, at_start: int = 50, in_a_row: int = 100):
  source = grain.MapDataset.source(items)
  source = source.repeat(None) if repeat else source
  return iter(BatchIterDataset(source.to_iter_dataset(), LAYOUT, strict=strict, max_unusable_at_start=at_start,
                               max_unusable_in_a_row=in_a_row))


def test_a_repeating_stream_with_no_usable_record_stops_naming_the_reason_and_fix():
  it = batcher([overlong(0, 300), overlong(1, 212), overlong(2, 250)], repeat=True, at_start=50)
  with pytest.raises(NoUsableRecordError) as caught:
    next(it)
  assert str(caught.value) == (
      "none of the first 50 records read is usable (data.max_unusable_at_start=50): every record is longer than "
      "data.seq_len=16 (shortest: 212 tokens). To fix: raise data.seq_len to at least 212, or lower "
      "data.max_pixels (fewer image tokens).")


def test_mixed_reasons_name_the_most_common_and_count_the_others():
  it = batcher([corrupt(0), missing(0), corrupt(1)], repeat=True, at_start=30)
  with pytest.raises(NoUsableRecordError) as caught:
    next(it)
  assert str(caught.value) == (
      "none of the first 30 records read is usable (data.max_unusable_at_start=30): 20 of them have an image that "
      "cannot be decoded (e.g. record 'corrupt-0', field 'image': the image bytes are not a JPEG) (the others: "
      "missing_file: 10). To fix: re-encode or replace the images and rebuild the data set.")


def test_unusable_runs_shorter_than_the_limit_never_stop_a_stream():
  # One usable record in every 100 read: 99 unusable in a row, one short of the limit, batch after batch.
  it = batcher([usable(0)] + [corrupt(i) for i in range(99)], repeat=True, at_start=100, in_a_row=100)
  batches = [next(it) for _ in range(5)]
  assert all(b["attention_mask"][0].sum() == 4 for b in batches)
  assert it.counters.skipped == 5 * 99 and it.counters.examples == 5  # up to the usable record carried over


def test_after_usable_records_a_long_unusable_run_stops():
  it = batcher([usable(i) for i in range(3)] + [missing(i) for i in range(200)], repeat=False, in_a_row=100)
  assert [next(it)["input_ids"][0, 0] for _ in range(2)] == [1, 1]  # the third waits for a record after it
  with pytest.raises(NoUsableRecordError, match=r"^the last 100 records read were all unusable "
                     r"\(data.max_unusable_in_a_row=100\): every record names an image file that does not exist "
                     r"\(e.g. record 'missing-0', field 'image': no image file at x.jpg\). To fix: check "
                     r"data.image_root"):
    next(it)


def test_a_finite_stream_without_a_usable_record_stops_at_its_end():
  it = batcher([corrupt(0), overlong(1, 40), corrupt(2)], repeat=False)
  with pytest.raises(NoUsableRecordError, match=r"^the data stream ended after 3 records without a usable one: 2 "
                     r"of them have an image that cannot be decoded .* \(the others: overlong: 1\)"):
    next(it)
  assert it.counters.reasons == {**dict.fromkeys(batching.SKIP_REASONS, 0), "corrupt_image": 2, "overlong": 1}


REASONS = {
    "corrupt_image": ("skipped", CorruptImageError),
    "missing_file": ("skipped", MissingFileError),
    "image_too_large": ("skipped", ImageTooLargeError),
    "invalid_record": ("skipped", InvalidFieldError),
    "overlong": ("dropped_overlong", OverlongRecordError),
    "images_over_budget": ("dropped_images", ImagesOverBudgetError),
}


def test_every_skip_reason_has_an_error_class():
  assert sorted(REASONS) == sorted(batching.SKIP_REASONS)
  assert {reason: kind.reason for reason, (_, kind) in REASONS.items()} == {r: r for r in REASONS}


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_strict_stops_at_the_first_record_of_every_reason_with_its_own_error(reason):
  outcome, kind = REASONS[reason]
  bad = rejected(outcome, kind("bad-1", "image", "is wrong", "fix it", size=7, limit=5))
  it = batcher([usable(0), bad, usable(1)], repeat=False, strict=True)
  with pytest.raises(kind) as caught:
    next(it)
  error = caught.value
  assert type(error) is kind and (error.record_id, error.field, error.size, error.limit) == ("bad-1", "image", 7, 5)
  assert str(error) == "record 'bad-1', field 'image': is wrong. To fix: fix it."


def test_counters_count_each_reason_and_survive_a_checkpoint():
  items = [usable(0), corrupt(0), overlong(0, 30), missing(0), corrupt(1), usable(1), usable(2)]
  it = batcher(items, repeat=False)
  next(it), next(it)
  expected = {**dict.fromkeys(batching.SKIP_REASONS, 0), "corrupt_image": 2, "overlong": 1, "missing_file": 1}
  assert it.counters.reasons == expected
  assert (it.counters.skipped, it.counters.dropped_overlong) == (3, 1)
  state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint writes
  restored = batcher(items, repeat=False)
  restored.set_state(state)
  assert restored.counters == it.counters
  next(restored)
  assert restored.counters.reasons == expected and restored.counters.examples == 3


def test_counters_saved_before_reasons_existed_restore_with_zeros():
  old = Counters(examples=5, skipped=2).to_state()
  del old["reasons"]
  restored = Counters.from_state(json.loads(json.dumps(old)))
  assert restored.reasons == dict.fromkeys(batching.SKIP_REASONS, 0) and restored.skipped == 2


def test_warnings_are_rate_limited_to_the_first_few_then_a_count(caplog):
  items = [usable(0)] + [corrupt(i) for i in range(2500)] + [usable(1)]
  it = batcher(items, repeat=False, in_a_row=10_000)
  with caplog.at_level(logging.WARNING, logger="data_pipeline.pipeline"):
    assert len(list(it)) == 2
  lines = [r.getMessage() for r in caplog.records]
  full = batching.WARN_IN_FULL
  assert [line.split(":")[0] for line in lines[:full]] == [f"skipping record corrupt-{i}" for i in range(full)]
  assert lines[full] == "further unusable records are counted (Counters.reasons) and logged once every 1000"
  assert lines[full + 1:] == [
      f"{n} unusable records so far (corrupt_image {n}); the latest: record 'corrupt-{n - 1}', field 'image': "
      "the image bytes are not a JPEG. To fix: re-encode." for n in (1000, 2000)]


def test_rejected_needs_a_known_outcome_and_reason():
  error = CorruptImageError("r", "image", "bad", "fix")
  with pytest.raises(ValueError, match="outcome"):
    rejected("lost", error)

  class Odd(RecordError):
    reason = "odd"

  with pytest.raises(ValueError, match="reason"):
    rejected("skipped", Odd("r", "image", "bad", "fix"))
  with pytest.raises(ValueError, match="max_unusable"):
    BatchIterDataset(grain.MapDataset.source([]).to_iter_dataset(), LAYOUT, max_unusable_at_start=0)
