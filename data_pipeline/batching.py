"""Static-shape batches from a stream of tokenised examples: rows, padding, packing, the vision slot budget.

Every batch has the same shapes (DESIGN decision 5), so a train step compiles once:

  input_ids, attention_mask, labels  (batch, seq) int32   right-padded; labels IGNORE_INDEX off the answers
  position_ids                       (3, batch, seq) int32  M-RoPE t/h/w per row (per example when packed)
  rope_deltas                        (batch, 1) int32       the row's (last example's) M-RoPE delta
  ces_label                          (batch,) int32         emotion class, IGNORE_INDEX when none
  des_target, des_mask               (batch, DES_DIM) float32, (batch,) bool
  vision                             VisionInputs over all images of the batch, in a fixed slot budget

Rows are filled in stream order. An example that does not fit (no free row, too few tokens left in any
row when packing, or its images overflow the batch's patch budget) ends the batch and opens the next
one: nothing is reordered beyond that one carried example, and nothing that fits alone is dropped.

Packing puts several examples in one row. `attention_mask` then holds segment ids (1, 2, 3, ... per
example, 0 padding) and `causal_mask` keeps attention inside a segment; positions restart per example.
Packed rows train the language-model loss only: a row holding several examples has no single emotion
label, so its `ces_label` / `des_mask` are left empty.

Prompt batches (`BatchLayout.prompt_only`, GRPO's generation batches) hold one prompt per row, LEFT-padded
so that every row ends at the last column, where generation continues (`eemo_jax.generate`):

  input_ids, attention_mask          (batch, seq) int32   left-padded: 0...0 1...1, the last column real
  position_ids, rope_deltas, vision  as above, for the left-padded rows (padding positions 0)
  truth_task, truth_choice, truth_option_set, truth_emotion  (batch,) int32, -1 where absent
  truth_ranking                      (batch, 3) int32, -1 where absent
  truth_score                        (batch,) float32, NaN where absent
  questions, ids                     host-only lists: each row's `eemo_jax.rl.parsing.Question` and record id

The truth_* arrays are the fields of `eemo_jax.rl.rewards.GroundTruth`. A row with no prompt (the batch
ended early on the vision budget, or the stream ended) is one pad token in its last column with attention 1,
so that every row keeps generation's layout; its truth is -1/NaN (task -1), its question None, its id "".

`BatchIterDataset` runs this in the main process after the per-example work (Grain workers), with a
checkpointable state and counters of what was skipped, truncated or dropped, per reason. A stream that
yields no usable record for a bounded number of reads stops with `NoUsableRecordError`, naming the most
common reason and its fix, instead of reading a repeating data set forever.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

from data_pipeline import data_packages

data_packages.require()  # without the `data` extra: one line naming it, before the imports below fail
import grain
import ml_dtypes
import numpy as np

from data_pipeline import errors
from data_pipeline.errors import NoUsableRecordError, RecordError
from data_pipeline.image_processor import CLIP_MEAN, CLIP_STD, _normalization_table
from data_pipeline.prompts import IGNORE_INDEX
from data_pipeline.records import DES_DIM
from eemo_jax.model import positions
from eemo_jax.model.config import VisionConfig
from eemo_jax.model.vision import VisionInputs

log = logging.getLogger("data_pipeline.pipeline")

# Outcomes of the per-example work: usable ("ok", "truncated") or not: "skipped" (a bad record),
# "dropped_overlong" / "dropped_images" (a good record whose text or images cannot fit the static shapes).
USABLE = ("ok", "truncated")
REJECTED = ("skipped", "dropped_overlong", "dropped_images")
# Why a record yields no row: the `reason` of its RecordError (errors.py), and the keys of `Counters.reasons`.
# Stable names, all always present: the training log has one column per reason.
SKIP_REASONS = ("corrupt_image", "missing_file", "image_too_large", "invalid_record", "overlong",
                "images_over_budget")
# When to give up on a stream that yields nothing usable (PipelineConfig.max_unusable_at_start / _in_a_row).
# None of the first 1000 records usable: a data set with even 1% usable records passes that with probability
# 1 - 0.99**1000 > 0.9999, and 1000 reads take about a second or two of per-example work.
MAX_UNUSABLE_AT_START = 1000
# Later, once records have been usable, 10000 unusable in a row: at a 99% skip rate that happens by chance
# with probability 0.99**10000 ~ 2e-44 per record, so only a data set that has become unusable stops.
MAX_UNUSABLE_IN_A_ROW = 10_000
WARN_IN_FULL = 10  # unusable records logged one by one; after that, one count line every WARN_EVERY
WARN_EVERY = 1000
# pixel_values dtypes. bfloat16 values are the float32 ones rounded, exactly what a model computing in
# bfloat16 makes of float32 pixel_values, at half the host work and transfer.
# "uint8": the batch carries the resized image's levels and their table; the vision tower normalises on the
# device (`VisionInputs.pixel_levels`), to the same values as "float32" at a quarter of the bytes.
PIXEL_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "uint8": np.dtype(np.uint8)}
# Prompt batches: the ground truth of each row, as the fields of `eemo_jax.rl.rewards.GroundTruth` (name:
# dtype, value where absent, shape per row), and the keys that go to the device (the rest stays on the host).
TRUTH_FIELDS = {"task": (np.int32, -1, ()), "choice": (np.int32, -1, ()), "option_set": (np.int32, -1, ()),
                "emotion": (np.int32, -1, ()), "ranking": (np.int32, -1, (3,)), "score": (np.float32, np.nan, ())}
PROMPT_DEVICE_KEYS = ("input_ids", "attention_mask", "position_ids", "rope_deltas", "vision")
_COUNTERS_KEY = "pipeline_counters"  # marks the batcher's entry in a (nested) Grain iterator state
_MAX_MESSAGES = 8


# --------------------------------------------------------------------------------------------------
# Examples: what a worker hands to the batcher
# --------------------------------------------------------------------------------------------------


def example(record_id: str, *, input_ids, labels, position_ids, rope_delta: int, patches, image_grid_thw,
            frame_slots, ces_label: int = IGNORE_INDEX, des_target=None, truncated: bool = False,
            truth: dict[str, Any] | None = None, question: Any = None) -> dict[str, Any]:
  """One tokenised example, as a dict of numpy arrays (Grain moves those through shared memory).

  input_ids, labels: (n,) int32; position_ids: (3, n) int32; patches: (patches, C, P, P) uint8, the resized
  images' patches in `pixel_values` row order, normalised only when the batch is assembled (an eighth of
  the bytes of float32 pixel_values with their temporal copy to move between processes);
  image_grid_thw: (images, 3); frame_slots: (frames,) slots each frame takes in the vision layout.
  truth, question: a prompt's ground truth (one value per `TRUTH_FIELDS` key) and its parser `Question`.
  """
  item = {
      "id": record_id, "outcome": "truncated" if truncated else "ok", "message": "",
      "input_ids": np.asarray(input_ids, np.int32), "labels": np.asarray(labels, np.int32),
      "position_ids": np.asarray(position_ids, np.int32), "rope_delta": int(rope_delta),
      "patches": np.asarray(patches, np.uint8),
      "image_grid_thw": np.asarray(image_grid_thw, np.int64).reshape(-1, 3),
      "frame_slots": np.asarray(frame_slots, np.int64).reshape(-1), "ces_label": int(ces_label),
      "des_target": np.zeros((DES_DIM,), np.float32) if des_target is None else np.asarray(des_target, np.float32),
      "des_mask": des_target is not None,
  }
  if truth is not None:
    item["truth"] = {k: np.asarray(truth[k], TRUTH_FIELDS[k][0]) for k in TRUTH_FIELDS}
    item["question"] = question
  return item


def rejected(outcome: str, error: RecordError) -> dict[str, Any]:
  """An example that yields no row: `outcome` (one of `REJECTED`) names the counter it adds to, `error` why.

  The error travels as plain values (workers hand examples over pickled), and `strict` raises it again in
  the main process, as the same `RecordError` subclass.
  """
  if outcome not in REJECTED:
    raise ValueError(f"outcome must be one of {REJECTED}, got {outcome!r}")
  if error.reason not in SKIP_REASONS:
    raise ValueError(f"{type(error).__name__}.reason must be one of {SKIP_REASONS}, got {error.reason!r}")
  return {"id": error.record_id, "outcome": outcome, "message": str(error), "reason": error.reason,
          "error": (type(error).__name__, error.field, error.problem, error.fix), "size": error.size,
          "limit": error.limit}


def error_of(item: dict[str, Any]) -> RecordError:
  """The `RecordError` a `rejected` example carries, rebuilt as its own subclass."""
  name, field, problem, fix = item["error"]
  kind = getattr(errors, name, None)
  if not (isinstance(kind, type) and issubclass(kind, RecordError)):
    kind = RecordError
  return kind(item["id"], field, problem, fix, size=item["size"], limit=item["limit"])


def bins_needed(frame_slots: Sequence[int], frame_budget: int) -> int | None:
  """Attention bins the vision layout opens for these frames, in order (its next-fit packing).

  None when a frame is larger than a bin. Mirrors `positions.vision_layout`, so a batch accepted here
  always has a layout; `prepare_vision` checks it again.
  """
  bins, used = 0, frame_budget
  for need in frame_slots:
    if need > frame_budget:
      return None
    if used + need > frame_budget:
      bins, used = bins + 1, 0
    used += need
  return bins


# --------------------------------------------------------------------------------------------------
# One batch
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """The static shapes of a batch and the vision geometry of the model it feeds."""

  batch_size: int
  seq_len: int
  patch_budget: int  # S_pad, vision slots per batch
  frame_budget: int  # F, slots per full-attention bin
  pad_id: int
  packing: bool = False
  image_mean: tuple[float, ...] = CLIP_MEAN
  image_std: tuple[float, ...] = CLIP_STD
  pixel_dtype: str = "float32"  # or "bfloat16", "uint8" (PIXEL_DTYPES)
  prompt_only: bool = False  # generation prompts: one per row, left-padded, with their truth (module docstring)
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  window_size: int = 112

  def __post_init__(self):
    if self.prompt_only and self.packing:
      raise ValueError("prompt_only batches hold one left-padded prompt per row; packing cannot be used with them")

  @property
  def vision_config(self) -> VisionConfig:
    return VisionConfig(patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
                        spatial_merge_size=self.merge_size, window_size=self.window_size)

  def fits_alone(self, frame_slots: Sequence[int]) -> bool:
    """Whether an example's images fit an otherwise empty batch."""
    bins = bins_needed(frame_slots, self.frame_budget)
    return bins is not None and bins * self.frame_budget <= self.patch_budget


class BatchBuilder:
  """Rows being filled with examples, then assembled into one static-shape batch."""

  def __init__(self, layout: BatchLayout):
    self.layout = layout
    self.rows: list[list[dict]] = []
    self._used: list[int] = []  # tokens per row

  def __len__(self) -> int:
    return sum(len(row) for row in self.rows)

  def add(self, item: dict) -> bool:
    """Places `item` if it fits (a row with room, and all images within the budget); False otherwise."""
    n = len(item["input_ids"])
    row = self._row_for(n)
    if row is None:
      return False
    rows = [list(r) for r in self.rows] + [[]] * (row == len(self.rows))
    rows[row].append(item)
    frames = [s for r in rows for ex in r for s in ex["frame_slots"]]  # row-major: the layout's order
    bins = bins_needed(frames, self.layout.frame_budget)
    if bins is None or bins * self.layout.frame_budget > self.layout.patch_budget:
      return False
    self.rows = rows
    if row == len(self._used):
      self._used.append(0)
    self._used[row] += n
    return True

  def _row_for(self, n: int) -> int | None:
    """First row with room for n tokens (packing), else the next empty row; None when the batch is full."""
    if self.layout.packing:
      for r, used in enumerate(self._used):
        if used + n <= self.layout.seq_len:
          return r
    return len(self.rows) if len(self.rows) < self.layout.batch_size else None

  def assemble(self) -> dict[str, Any]:
    """The batch as numpy arrays (shapes in the module docstring)."""
    if self.layout.prompt_only:
      return self._assemble_prompts()
    lay = self.layout
    b, length = lay.batch_size, lay.seq_len
    batch = {
        "input_ids": np.full((b, length), lay.pad_id, np.int32),
        "attention_mask": np.zeros((b, length), np.int32),
        "labels": np.full((b, length), IGNORE_INDEX, np.int32),
        "position_ids": np.zeros((3, b, length), np.int32),
        "rope_deltas": np.zeros((b, 1), np.int32),
        "ces_label": np.full((b,), IGNORE_INDEX, np.int32),
        "des_target": np.zeros((b, DES_DIM), np.float32),
        "des_mask": np.zeros((b,), bool),
    }
    patches, grids = [], []
    for r, row in enumerate(self.rows):
      start = 0
      for k, ex in enumerate(row):
        span = slice(start, start + len(ex["input_ids"]))
        batch["input_ids"][r, span] = ex["input_ids"]
        batch["attention_mask"][r, span] = k + 1  # segment id; always 1 without packing
        batch["labels"][r, span] = ex["labels"]
        batch["position_ids"][:, r, span] = ex["position_ids"]
        batch["rope_deltas"][r, 0] = ex["rope_delta"]
        patches.append(ex["patches"])
        grids.append(ex["image_grid_thw"])
        start = span.stop
      if len(row) == 1:  # one example, one emotion label (packed rows: LM loss only)
        batch["ces_label"][r] = row[0]["ces_label"]
        batch["des_target"][r] = row[0]["des_target"]
        batch["des_mask"][r] = row[0]["des_mask"]
    batch["vision"] = _vision_inputs(patches, grids, lay)
    return batch

  def _assemble_prompts(self) -> dict[str, Any]:
    """Left-padded prompt rows with their truth; an empty row is one pad token at the end (attention 1)."""
    lay = self.layout
    b, length = lay.batch_size, lay.seq_len
    batch = {
        "input_ids": np.full((b, length), lay.pad_id, np.int32),
        "attention_mask": np.zeros((b, length), np.int32),
        "position_ids": np.zeros((3, b, length), np.int32),  # padding positions 0, as get_rope_index
        "rope_deltas": np.zeros((b, 1), np.int32),
        **{f"truth_{k}": np.full((b, *shape), absent, dtype) for k, (dtype, absent, shape) in TRUTH_FIELDS.items()},
    }
    # Generation continues from the last column, so it must be real in every row (`eemo_jax.generate`).
    batch["attention_mask"][:, -1] = 1
    questions, ids = [None] * b, [""] * b
    patches, grids = [], []
    for r, (ex,) in enumerate(self.rows):  # one prompt per row (no packing)
      span = slice(length - len(ex["input_ids"]), length)
      batch["input_ids"][r, span] = ex["input_ids"]
      batch["attention_mask"][r, span] = 1
      batch["position_ids"][:, r, span] = ex["position_ids"]
      batch["rope_deltas"][r, 0] = ex["rope_delta"]  # max position + 1 - real tokens: padding does not change it
      for key in TRUTH_FIELDS:
        batch[f"truth_{key}"][r] = ex["truth"][key]
      questions[r], ids[r] = ex["question"], ex["id"]
      patches.append(ex["patches"])
      grids.append(ex["image_grid_thw"])
    batch["vision"] = _vision_inputs(patches, grids, lay)
    batch["questions"], batch["ids"] = questions, ids
    return batch


def _vision_inputs(patches: list[np.ndarray], grids: list[np.ndarray], layout: BatchLayout) -> VisionInputs:
  """`prepare_vision` from uint8 patches: normalised once, in raster order, then placed in their slots.

  The same values as the image processor's `pixel_values` (one lookup table holds the exact float32
  result of every uint8 level, `image_processor._normalization_table`) and as `prepare_vision`'s slots;
  with pixel_dtype="bfloat16", those values rounded to bfloat16; with "uint8", the levels and the table,
  for the vision tower to look up on the device.
  """
  config = layout.vision_config
  grid = np.concatenate(grids) if grids else np.zeros((0, 3), np.int64)
  vision = positions.vision_layout(grid, patch_size=config.patch_size, spatial_merge_size=config.spatial_merge_size,
                                   window_size=config.window_size, patch_budget=layout.patch_budget,
                                   frame_budget=layout.frame_budget)
  c, t, p = config.in_channels, config.temporal_patch_size, config.patch_size
  raw = np.concatenate(patches) if patches else np.zeros((0, c, p, p), np.uint8)  # (S, C, P, P) raster order
  if raw.shape[1:] != (c, p, p) or len(raw) != vision.num_patches:
    raise ValueError(f"the images have patches of shape {raw.shape} but their grids {grid.tolist()} need "
                     f"({vision.num_patches}, {c}, {p}, {p})")
  dtype = PIXEL_DTYPES[layout.pixel_dtype]
  pixels = np.empty((len(raw), c, t, p, p), dtype)  # pixel_values rows: (channel, time, py, px)
  levels = None
  if dtype == np.uint8:
    pixels[:, :, 0] = raw
    levels = _level_table(tuple(layout.image_mean), tuple(layout.image_std))
  else:
    table = _normalization_table(tuple(layout.image_mean), tuple(layout.image_std)).astype(dtype)  # (C, 256)
    for channel in range(c):
      np.take(table[channel], raw[:, channel], out=pixels[:, channel, 0], mode="clip")
  pixels[:, :, 1:] = pixels[:, :, :1]  # an image is one frame repeated over the temporal patch
  slots = np.zeros((vision.patch_budget, config.patch_dim), dtype)  # (S_pad, patch_dim), padding zero
  slots[vision.raster_slot[:len(raw)]] = pixels.reshape(len(raw), config.patch_dim)
  return VisionInputs(pixel_values=slots, raster_slot=vision.raster_slot, window_segment_ids=vision.window_segment_ids,
                      full_segment_ids=vision.full_segment_ids, rope_positions=vision.rope_positions,
                      pixel_levels=levels)


@functools.lru_cache(maxsize=8)
def _level_table(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
  """`_normalization_table` as `VisionInputs.pixel_levels` (static, hashable). Cached: every batch then holds
  the same object, which the jit cache compares by identity."""
  return tuple(tuple(float(v) for v in row) for row in _normalization_table(mean, std))


def empty_batch(layout: BatchLayout) -> dict[str, Any]:
  """An all-padding batch: the exact structure, shapes and dtypes of every batch of this layout."""
  return BatchBuilder(layout).assemble()


# --------------------------------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Counters:
  """What the pipeline did with the examples it read, for the training log (and checkpointed with it).

  Fill fractions say how much of the static shapes is real data: `tokens / token_slots` and
  `patches / patch_slots`.
  """

  examples: int = 0  # placed into batches (truncated ones included)
  truncated: int = 0  # text cut at seq_len (overlong="truncate")
  skipped: int = 0  # bad records (unreadable, missing or too large image, invalid fields)
  dropped_overlong: int = 0  # text longer than seq_len with overlong="drop", or a cut would split an image
  dropped_images: int = 0  # images that cannot fit the vision budget even in an empty batch
  batches: int = 0
  tokens: int = 0
  token_slots: int = 0
  patches: int = 0
  patch_slots: int = 0
  last_messages: list[str] = dataclasses.field(default_factory=list)  # the latest skip / drop messages
  # skipped + dropped by reason, every SKIP_REASONS key present
  reasons: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

  def note(self, message: str) -> None:
    self.last_messages = (self.last_messages + [message])[-_MAX_MESSAGES:]

  def to_state(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_state(cls, state: dict[str, Any]) -> Counters:
    """Counters from `to_state` (or a JSON round trip of it); states saved before `reasons` existed read as zeros."""
    def value(key, v):
      if key == "last_messages":
        return list(v)
      if key == "reasons":
        return {**dict.fromkeys(SKIP_REASONS, 0), **{str(r): int(n) for r, n in v.items()}}
      return int(v)
    return cls(**{k: value(k, v) for k, v in state.items()})


def find_counters(state: Any) -> Counters | None:
  """The batcher's counters inside a (nested) Grain iterator state, or None."""
  if isinstance(state, dict):
    if _COUNTERS_KEY in state:
      return Counters.from_state(state[_COUNTERS_KEY])
    for value in state.values():
      found = find_counters(value)
      if found is not None:
        return found
  elif isinstance(state, (list, tuple)):
    for value in state:
      found = find_counters(value)
      if found is not None:
        return found
  return None


# --------------------------------------------------------------------------------------------------
# The batching stage of the Grain pipeline
# --------------------------------------------------------------------------------------------------


class BatchIterDataset(grain.IterDataset):
  """Per-example dicts (from `example` / `rejected`) -> static-shape batches, counting what is not used.

  With `strict`, every record that yields no row (bad, too long or too large) raises its `RecordError`
  here, in the main process; otherwise it is counted and logged (the first `WARN_IN_FULL` in full, then a
  count every `WARN_EVERY`). When none of the first `max_unusable_at_start` records read is usable, or,
  later, `max_unusable_in_a_row` in a row are not, or a finite stream ends without one usable record,
  `NoUsableRecordError` stops the stream. The last batch of a finite stream is padded to full shape.
  """

  def __init__(self, parent: grain.IterDataset, layout: BatchLayout, *, strict: bool = False,
               max_unusable_at_start: int = MAX_UNUSABLE_AT_START, max_unusable_in_a_row: int = MAX_UNUSABLE_IN_A_ROW):
    super().__init__(parent)
    self.layout = layout
    self.strict = strict
    self.limits = (int(max_unusable_at_start), int(max_unusable_in_a_row))
    if min(self.limits) < 1:
      raise ValueError(f"max_unusable_at_start and max_unusable_in_a_row must be >= 1, got {self.limits}")

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._parent.__iter__(), self.layout, self.strict, self.limits)

  def __str__(self) -> str:
    return f"BatchIterDataset(batch_size={self.layout.batch_size}, seq_len={self.layout.seq_len})"


class _BatchIterator(grain.DatasetIterator):
  """Fills a `BatchBuilder` from the parent; checkpoint state = the parent's position before the first
  example not yet in an emitted batch (the carried one), plus the counters up to there."""

  def __init__(self, parent: grain.DatasetIterator, layout: BatchLayout, strict: bool, limits: tuple[int, int]):
    super().__init__(parent)
    self._layout = layout
    self._strict = strict
    self._limits = limits
    self._counters = Counters()
    self._carry: tuple[dict, Any] | None = None  # (example, parent state before it)
    self._state = self._snapshot(self._parent.get_state())
    self._unusable = _UnusableRun(layout, *limits, usable_seen=False)
    self._logged = 0  # unusable records this iterator has logged or counted in the log

  def __next__(self) -> dict[str, Any]:
    builder = BatchBuilder(self._layout)
    while True:
      if self._carry is not None:
        item, before = self._carry
        self._carry = None
      else:
        before = copy.deepcopy(self._parent.get_state())  # the live state moves on with next()
        try:
          item = next(self._parent)
        except StopIteration:
          break
        if item["outcome"] not in USABLE:
          self._reject(item)
          continue
        self._unusable.usable()
      if not builder.add(item):
        self._carry = (item, before)
        break
      self._count(item)
    if not len(builder):  # the end: keep what was counted after the last batch
      self._state = self._snapshot(self._parent.get_state())
      if self._unusable.count and not self._unusable.usable_seen:
        raise self._unusable.error(ended=True)
      raise StopIteration
    batch = builder.assemble()
    self._count_batch(batch)
    resume = self._carry[1] if self._carry is not None else self._parent.get_state()
    self._state = self._snapshot(resume)
    return batch

  def _reject(self, item: dict) -> None:
    if self._strict:
      raise error_of(item)
    outcome = item["outcome"]
    setattr(self._counters, outcome, getattr(self._counters, outcome) + 1)
    self._counters.reasons[item["reason"]] += 1
    self._counters.note(item["message"])
    self._log(item)
    if self._unusable.add(item):
      raise self._unusable.error()

  def _log(self, item: dict) -> None:
    """The first WARN_IN_FULL unusable records in full, then one count line every WARN_EVERY."""
    self._logged += 1
    if self._logged <= WARN_IN_FULL:
      log.warning("%s record %s: %s", "skipping" if item["outcome"] == "skipped" else "dropping", item["id"],
                  item["message"])
      if self._logged == WARN_IN_FULL:
        log.warning("further unusable records are counted (Counters.reasons) and logged once every %d", WARN_EVERY)
    elif self._logged % WARN_EVERY == 0:
      reasons = ", ".join(f"{r} {n}" for r, n in self._counters.reasons.items() if n)
      log.warning("%d unusable records so far (%s); the latest: %s", sum(self._counters.reasons.values()),
                  reasons, item["message"])

  def _count(self, item: dict) -> None:
    self._counters.examples += 1
    self._counters.truncated += item["outcome"] == "truncated"
    self._counters.tokens += len(item["input_ids"])
    self._counters.patches += len(item["patches"])

  def _count_batch(self, batch: dict) -> None:
    self._counters.batches += 1
    self._counters.token_slots += batch["input_ids"].size
    self._counters.patch_slots += self._layout.patch_budget

  def _snapshot(self, parent_state: Any) -> dict[str, Any]:
    return {"parent": parent_state, _COUNTERS_KEY: self._counters.to_state()}

  def get_state(self) -> dict[str, Any]:
    return self._state

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._counters = Counters.from_state(state[_COUNTERS_KEY])
    self._carry = None
    self._state = self._snapshot(state["parent"])
    self._unusable = _UnusableRun(self._layout, *self._limits, usable_seen=self._counters.examples > 0)

  @property
  def counters(self) -> Counters:
    return dataclasses.replace(self._counters, last_messages=list(self._counters.last_messages))


# --------------------------------------------------------------------------------------------------
# Giving up on a stream with nothing usable
# --------------------------------------------------------------------------------------------------


# How `_UnusableRun` describes records of one reason: verb (one record, several), what they are, the fix.
# Filled in with the smallest size seen, the limit it exceeds, the budgets, and the first example's problem.
_REASON_TEXT = {
    "overlong": ("is", "are", "longer than data.seq_len={limit} (shortest: {smallest} tokens)",
                 "raise data.seq_len to at least {smallest}, or lower data.max_pixels (fewer image tokens)"),
    "images_over_budget": ("has", "have", "images needing more vision slots than data.frame_budget={frame} / "
                           "data.patch_budget={patch} hold (e.g. {example})",
                           "raise data.frame_budget and data.patch_budget, or lower data.max_pixels"),
    "image_too_large": ("has", "have", "an image of more than data.max_image_pixels={limit} pixels (smallest: "
                        "{smallest})", "downscale the images and rebuild the data set, or raise data.max_image_pixels "
                        "(decoding costs up to ~12 bytes of host memory per pixel)"),
    "corrupt_image": ("has", "have", "an image that cannot be decoded (e.g. {example})",
                      "re-encode or replace the images and rebuild the data set"),
    "missing_file": ("names", "name", "an image file that does not exist (e.g. {example})",
                     "check data.image_root (relative image paths start there) and the files"),
    "invalid_record": ("is", "are", "invalid (e.g. {example})", "fix the records and rebuild the data set"),
}


class _UnusableRun:
  """The unusable records read in a row (since the start, or since the last usable one), by reason.

  Not checkpointed: after a restore the run starts again, with the longer limit if the restored counters
  show usable records.
  """

  def __init__(self, layout: BatchLayout, at_start: int, in_a_row: int, usable_seen: bool):
    self.layout = layout
    self.limits = (at_start, in_a_row)
    self.usable_seen = usable_seen
    self._clear()

  def _clear(self) -> None:
    self.count = 0
    self.reasons: collections.Counter[str] = collections.Counter()
    self.smallest: dict[str, int] = {}  # per reason, the smallest size (tokens, pixels) seen in the run
    self.limit: dict[str, int] = {}  # per reason, the setting those sizes exceed
    self.example: dict[str, str] = {}  # per reason, the first record's problem

  def usable(self) -> None:
    """A usable record: the run ends (cheap when there was none, as for almost every record)."""
    if self.count or not self.usable_seen:
      self.usable_seen = True
      self._clear()

  def add(self, item: dict) -> bool:
    """Counts one unusable record; True when the run has reached its limit."""
    reason = item["reason"]
    self.count += 1
    self.reasons[reason] += 1
    if item["size"] is not None:
      self.smallest[reason] = min(self.smallest.get(reason, item["size"]), item["size"])
    if item["limit"] is not None:
      self.limit[reason] = item["limit"]
    if reason not in self.example:
      _, field, problem, _ = item["error"]
      self.example[reason] = f"record {item['id']!r}, field {field!r}: {problem}"
    at_start, in_a_row = self.limits
    return self.count >= (in_a_row if self.usable_seen else at_start)

  def error(self, ended: bool = False) -> NoUsableRecordError:
    at_start, in_a_row = self.limits
    if ended:
      head = f"the data stream ended after {self.count} records without a usable one"
    elif not self.usable_seen:
      head = f"none of the first {self.count} records read is usable (data.max_unusable_at_start={at_start})"
    else:
      head = f"the last {self.count} records read were all unusable (data.max_unusable_in_a_row={in_a_row})"
    reason, n = self.reasons.most_common(1)[0]
    one, many, what, fix = _REASON_TEXT[reason]
    values = {"smallest": self.smallest.get(reason, "?"), "limit": self.limit.get(reason, "?"),
              "frame": self.layout.frame_budget, "patch": self.layout.patch_budget,
              "example": self.example.get(reason, "")}
    who = f"every record {one}" if n == self.count else f"{n} of them {many}"
    others = ", ".join(f"{r}: {k}" for r, k in self.reasons.most_common() if r != reason)
    others = f" (the others: {others})" if others else ""
    return NoUsableRecordError(f"{head}: {who} {what.format(**values)}{others}. To fix: {fix.format(**values)}.")
