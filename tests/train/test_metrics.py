"""The hand-written TensorBoard writer is read back by TensorBoard's own event loader."""

import io
import json
import re

import numpy as np
import pytest

from eemo_jax.train.metrics import MetricsWriter, ProgressLine, crc32c, format_duration


def test_crc32c_known_vectors():
  # RFC 3720 B.4 test vectors for CRC32-C.
  assert crc32c(b"") == 0
  assert crc32c(b"123456789") == 0xE3069283
  assert crc32c(bytes(32)) == 0x8A9136AA
  assert crc32c(bytes([0xFF] * 32)) == 0x62A8AB43


def test_tensorboard_reads_our_scalars(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  writer = MetricsWriter(str(tmp_path))
  losses = [2.5, 1.25, 0.625]
  for step, loss in enumerate(losses, start=1):
    writer.write(step, {"loss": np.float32(loss), "lr": 1e-4 * step, "tokens": 128})
  writer.write(3, {"ces_accuracy": 0.75}, split="eval")
  writer.close()

  acc = EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/tokens", "eval/ces_accuracy"}
  events = acc.Scalars("train/loss")
  assert [e.step for e in events] == [1, 2, 3]
  np.testing.assert_allclose([e.value for e in events], losses, rtol=1e-7)
  assert acc.Scalars("eval/ces_accuracy")[0].value == pytest.approx(0.75)

  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[0] == {"step": 1, "split": "train", "loss": 2.5, "lr": 1e-4, "tokens": 128}
  assert rows[-1] == {"step": 3, "split": "eval", "ces_accuracy": 0.75}


def test_tensorboard_crc_checks_pass(tmp_path):
  """TensorBoard's record reader verifies both CRCs of every record."""
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

  writer = MetricsWriter(str(tmp_path))
  writer.write(7, {"loss": 1.0})
  writer.close()
  (path,) = (tmp_path / "tensorboard").iterdir()
  reader = PyRecordReader_New(str(path).encode())
  count = 0
  while True:
    try:
      reader.GetNext()
    except Exception as error:  # the stub raises errors.OutOfRangeError at the end, DataLossError on bad CRCs
      assert "OutOfRange" in type(error).__name__, error
      break
    count += 1
  assert count == 2  # version record + one scalar record


class FakeClock:
  """The seconds at which each successive update happens."""

  def __init__(self, times):
    self.times = iter(times)

  def __call__(self) -> float:
    return next(self.times)


def test_progress_line_without_a_terminal_prints_every_n_steps():
  stream = io.StringIO()
  line = ProgressLine(total_steps=20, stream=stream, every=10, clock=FakeClock(range(1, 21)))  # a step a second
  for step in range(1, 21):
    line.update(step, {"loss": 1.0 / step, "lr": 3e-4})
  line.message("eval ces_accuracy 0.5")
  assert stream.getvalue().splitlines() == [
      "step 10/20  eta 10s  loss 0.1  lr 3.00e-04", "step 20/20  loss 0.05  lr 3.00e-04", "eval ces_accuracy 0.5"]


def _etas(total: int, steps, times, every: int = 1) -> list[str | None]:
  """The eta shown on each update's line, or None."""
  stream = io.StringIO()
  line = ProgressLine(total_steps=total, stream=stream, every=every, clock=FakeClock(times))
  for step in steps:
    line.update(step, {"loss": 1.0})
  return [re.search(r"eta (\S+)", text).group(1) if "eta" in text else None
          for text in stream.getvalue().splitlines()]


def test_eta_leaves_out_the_first_step():
  """Step 1 ends at 100 s (it compiled), then 2 s a step: after step 3, 997 steps left take 1994 s. Counting
  the first step (3 steps in 104 s) would say 9h36m."""
  assert _etas(1000, [1, 2, 3], [100.0, 102.0, 104.0]) == [None, "33m16s", "33m14s"]


def test_eta_follows_the_recent_rate():
  """1 s a step for steps 1-21, then 10 s a step: at step 42 the window (the last 21 updates: steps 22-42,
  200 s for 20 steps) gives 10 s a step, so the 58 steps left take 580 s."""
  times = [float(k) for k in range(1, 22)] + [21.0 + 10 * (k - 21) for k in range(22, 43)]
  assert _etas(100, range(1, 43), times)[-1] == "9m40s"


def test_eta_of_a_resumed_run_logging_every_10_steps():
  """Updates at steps 510, 520, 530, 50 s apart (5 s a step): after step 530, 470 steps left take 2350 s; no
  eta on the last step's line."""
  assert _etas(1000, [510, 520, 530], [0.0, 50.0, 100.0], every=10) == [None, "40m00s", "39m10s"]
  assert _etas(530, [510, 520, 530], [0.0, 50.0, 100.0], every=10) == [None, "50s", None]


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (59.6, "1m00s"), (725, "12m05s"),
                                           (3599.6, "1h00m"), (3720, "1h02m"), (3 * 3600 + 59 * 60 + 59, "3h59m"),
                                           (2 * 86400 + 3 * 3600 + 59, "2d03h")])
def test_format_duration(seconds, text):
  assert format_duration(seconds) == text


def test_disabled_writer_writes_nothing(tmp_path):
  writer = MetricsWriter(str(tmp_path / "run"), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "run").exists()
