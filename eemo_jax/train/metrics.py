"""Training metrics: a JSONL log, TensorBoard event files, and a live progress line.

The TensorBoard writer encodes the few protobuf fields of `Event` / `Summary` by hand (scalars
only) and frames them as TFRecords, so writing needs neither TensorFlow nor the tensorboard package;
TensorBoard reads the files as usual. Only JAX process 0 writes.

The writer is our own rather than a maintained one because none writes to a bucket without TensorFlow
(tensorboard's and flax's writers go through `tf.io.gfile`, tensorboardX has no gs://): its events are plain
bytes, so they go through the project's path layer (`eemo_jax.paths.AppendedFile`) like metrics.jsonl, to a
local folder or a bucket alike.
"""

from __future__ import annotations

import collections
import json
import math
import socket
import struct
import sys
import time
from collections.abc import Mapping

from eemo_jax import paths

# --------------------------------------------------------------------------------------------------
# TFRecord framing (masked CRC32-C) and the protobuf fields of a scalar Event
# --------------------------------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the payload, the payload's masked CRC."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1  # int64 fields are two's complement varints
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def scalar_event(step: int, scalars: Mapping[str, float], wall_time: float) -> bytes:
  """`Event{wall_time=1, step=2, summary=5{value=1{tag=1, simple_value=2}}}` as protobuf bytes."""
  values = b"".join(
      _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v)))
      for tag, v in scalars.items())
  return _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step)) + _length_delimited(5, values)


def version_event(wall_time: float) -> bytes:
  """The first record TensorBoard expects: `Event{wall_time, file_version="brain.Event:2"}`."""
  return _field(1, 1) + struct.pack("<d", wall_time) + _length_delimited(3, b"brain.Event:2")


class TensorBoardWriter:
  """Appends scalar summaries to `<logdir>/events.out.tfevents.<time>.<host>`."""

  def __init__(self, logdir: str):
    paths.makedirs(logdir)
    now = time.time()
    self.path = paths.join(logdir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}")
    self._file = paths.AppendedFile(self.path, binary=True)
    self._file.write(tfrecord(version_event(now)))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if values:
      self._file.write(tfrecord(scalar_event(step, values, time.time())))

  def close(self) -> None:
    self._file.close()


# --------------------------------------------------------------------------------------------------
# The writer the training loop uses
# --------------------------------------------------------------------------------------------------


class MetricsWriter:
  """Writes each step's metrics to `metrics.jsonl` and TensorBoard under the run directory.

  Records are `{"step": n, "split": "train"|"eval", **metrics}`; TensorBoard tags are
  `<split>/<name>`. Resuming appends to the same JSONL. A no-op on processes other than 0.
  """

  def __init__(self, run_dir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    paths.makedirs(run_dir)
    self.jsonl_path = paths.join(run_dir, "metrics.jsonl")
    self._jsonl = paths.AppendedFile(self.jsonl_path)
    self._tb = TensorBoardWriter(paths.join(run_dir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
    numbers = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    self._tb.scalars(step, {f"{split}/{k}": v for k, v in numbers.items()})

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _plain(value):
  """A plain Python scalar for JSON (numpy and JAX scalars included); other values as strings."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, (bool, int)):
    return value
  try:
    return float(value)
  except (TypeError, ValueError):
    return str(value)


class ProgressLine:
  """A one-line live status (`\\r`-updated on a terminal, a plain line every `every` steps otherwise), with the
  time left (`eta 1h02m`) once two updates give a step rate.

  The rate is measured from the first update on, over the last `RATE_WINDOW` updates: the steps up to the
  first update (the first step's warm-up, a resume's restore) do not count, and a run whose speed changes
  (evaluations, a slower phase) is soon estimated at its current pace.
  """

  RATE_WINDOW = 20

  def __init__(self, total_steps: int, *, stream=None, every: int = 10, clock=time.monotonic):
    self.total = total_steps
    self.stream = stream if stream is not None else sys.stderr
    self.every = max(1, every)
    self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._clock = clock
    self._marks: collections.deque[tuple[int, float]] = collections.deque(maxlen=self.RATE_WINDOW + 1)

  def seconds_left(self, step: int) -> float | None:
    """The time the remaining steps take at the recent rate; None before two updates or after the last step."""
    if len(self._marks) < 2 or step >= self.total:
      return None
    (first_step, first_time), (last_step, last_time) = self._marks[0], self._marks[-1]
    if last_step <= first_step or last_time <= first_time:
      return None
    return (self.total - step) * (last_time - first_time) / (last_step - first_step)

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    self._marks.append((step, self._clock()))
    left = self.seconds_left(step)
    eta = f"  eta {format_duration(left)}" if left is not None else ""
    shown = "  ".join(_format(k, v) for k, v in metrics.items())
    line = f"step {step}/{self.total}{eta}  {shown}"
    if self.live:
      self.stream.write("\r\033[K" + line)
      self.stream.flush()
    elif step % self.every == 0 or step == self.total:
      self.stream.write(line + "\n")
      self.stream.flush()

  def message(self, text: str) -> None:
    """A line that stays (evaluation results, checkpoints), printed below the live line."""
    self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.live:
      self.stream.write("\n")
      self.stream.flush()


def format_duration(seconds: float) -> str:
  """The two largest units, the smaller truncated: `42s`, `12m05s`, `1h02m`, `2d03h`."""
  total = int(round(seconds))
  days, rest = divmod(total, 86400)
  hours, rest = divmod(rest, 3600)
  minutes, secs = divmod(rest, 60)
  if days:
    return f"{days}d{hours:02d}h"
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _format(name: str, value) -> str:
  if isinstance(value, float):
    if math.isnan(value) or math.isinf(value):
      return f"{name} {value}"
    if name in ("lr", "learning_rate"):
      return f"{name} {value:.2e}"
    if name.endswith("tokens_per_s") or name.endswith("tok/s"):
      return f"{name} {value:,.0f}"
    return f"{name} {value:.4g}"
  return f"{name} {value}"
