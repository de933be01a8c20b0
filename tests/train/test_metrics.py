"""The hand-written TensorBoard writer is read back by TensorBoard's own event loader."""

import io
import json

import numpy as np
import pytest

from eemo_jax.train.metrics import MetricsWriter, ProgressLine, crc32c


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


def test_progress_line_without_a_terminal_prints_every_n_steps():
  stream = io.StringIO()
  line = ProgressLine(total_steps=20, stream=stream, every=10)
  for step in range(1, 21):
    line.update(step, {"loss": 1.0 / step, "lr": 3e-4})
  line.message("eval ces_accuracy 0.5")
  assert stream.getvalue().splitlines() == [
      "step 10/20  loss 0.1  lr 3.00e-04", "step 20/20  loss 0.05  lr 3.00e-04", "eval ces_accuracy 0.5"]


def test_disabled_writer_writes_nothing(tmp_path):
  writer = MetricsWriter(str(tmp_path / "run"), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "run").exists()
