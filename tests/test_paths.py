"""The path layer: local paths behave as `os` makes them, bucket URLs go to the bucket (a GCS emulator on
localhost), and a URL the project cannot reach is refused in one line instead of becoming a local folder."""

import os

import pytest
from gcs_emulator import BUCKET, bucket_files, gcs_emulator, read_object

from eemo_jax import paths
from eemo_jax.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = f"gs://{BUCKET}"


@pytest.fixture(scope="module")
def bucket():
  with gcs_emulator():
    yield


def test_local_paths_are_made_absolute_and_urls_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.absolute("runs/x") == os.path.join(str(tmp_path), "runs", "x")
  assert paths.absolute("gs://b/runs/x") == "gs://b/runs/x" and paths.absolute("") == ""
  with pytest.raises(paths.PathError, match=r"gs:/b/x looks like a bucket URL with one slash too few; write gs://b/x"):
    paths.absolute("gs:/b/x")
  assert paths.join("gs://b/x", "y", "z.json") == "gs://b/x/y/z.json"
  assert paths.dirname("gs://b/x/y") == "gs://b/x" and paths.dirname("gs://b/x") == "gs://b"
  assert paths.is_root("gs://b") and not paths.is_root("gs://b/x") and paths.is_root("/")
  assert paths.inside("gs://b/x/ckpt", "gs://b/x") and not paths.inside("gs://b/xy", "gs://b/x")


def test_unusable_urls_are_refused_in_one_line_before_a_run_writes_anything(tmp_path, monkeypatch):
  from eemo_jax.train.run import train
  with pytest.raises(paths.PathError, match=r"^x = memory://m: memory:// is not a file system EEmo-JAX can use"):
    paths.check_usable("memory://m", "x")
  with pytest.raises(paths.PathError, match=r"gs:// names no bucket"):
    paths.check_usable("gs://")
  monkeypatch.chdir(tmp_path)
  config = load_config(os.path.join(ROOT, "configs", "tiny_demo.py"), ["--config.train.run_dir=memory://runs/x"])
  with pytest.raises(ConfigError, match=r"^train.run_dir = memory://runs/x: memory:// is not a file system"):
    train(config)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_files_written_read_listed_copied_and_removed(where, bucket, tmp_path):
  root = str(tmp_path / "d") if where == "local" else f"{B}/layer"
  paths.makedirs(root)
  paths.write_text(paths.join(root, "a.txt"), "α\n")
  paths.makedirs(paths.join(root, "sub"))
  paths.write_bytes(paths.join(root, "sub", "b.bin"), b"\0\1")
  paths.replace_file(paths.join(root, "c.json"), "{}")
  paths.replace_file(paths.join(root, "c.json"), '{"new": 1}')
  assert paths.read_text(paths.join(root, "a.txt")) == "α\n" and paths.read_text(paths.join(root, "c.json")) == \
      '{"new": 1}'
  assert paths.files_under(root) == ["a.txt", "c.json", "sub/b.bin"]
  assert sorted(paths.listdir(root)) == ["a.txt", "c.json", "sub"]
  assert paths.isdir(root) and paths.isfile(paths.join(root, "a.txt")) and not paths.isfile(paths.join(root, "sub"))
  assert paths.size(paths.join(root, "sub", "b.bin")) == 2 and not paths.exists(paths.join(root, "nothing"))
  local = tmp_path / "copy"
  assert paths.download(root, str(local)) == [str(local / "a.txt"), str(local / "c.json"), str(local / "sub" / "b.bin")]
  assert (local / "sub" / "b.bin").read_bytes() == b"\0\1"
  paths.copy_file(str(local / "a.txt"), paths.join(root, "d.txt"))
  paths.move(paths.join(root, "d.txt"), paths.join(root, "e.txt"))
  assert paths.read_bytes(paths.join(root, "e.txt")) == "α\n".encode() and not paths.exists(paths.join(root, "d.txt"))
  paths.remove(paths.join(root, "e.txt"))
  paths.remove(paths.join(root, "e.txt"))  # already gone: fine
  paths.rmtree(root)
  assert not paths.exists(root)
  if where == "bucket":
    assert bucket_files("layer") == [] and os.listdir(tmp_path) == ["copy"]


def test_appended_file_in_a_bucket_is_uploaded_whole_and_continued_on_reopening(bucket):
  """A bucket object cannot grow: the appends are kept and the whole object uploaded, at most every
  `upload_every_s` seconds, on flush and on close; reopening continues it, as appending to a local file does."""
  path = f"{B}/append/metrics.jsonl"
  log = paths.AppendedFile(path, upload_every_s=3600)
  log.write('{"step": 1}\n')
  assert bucket_files("append") == []  # not uploaded yet: the interval has not passed
  log.flush()
  assert read_object("append/metrics.jsonl") == b'{"step": 1}\n'
  log.write('{"step": 2}\n')
  log.close()
  assert read_object("append/metrics.jsonl") == b'{"step": 1}\n{"step": 2}\n'
  resumed = paths.AppendedFile(path, upload_every_s=0)  # every write uploads
  resumed.write('{"step": 2}\n')
  assert read_object("append/metrics.jsonl") == b'{"step": 1}\n{"step": 2}\n{"step": 2}\n'
  resumed.close()
  events = paths.AppendedFile(f"{B}/append/events", binary=True)
  events.write(b"\x00\xff")
  events.close()
  assert read_object("append/events") == b"\x00\xff"


def test_appended_file_locally_appends_and_flushes_each_write(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("old\n")
  log = paths.AppendedFile(str(path))
  log.write("new\n")
  assert path.read_text() == "old\nnew\n"  # on disk before close: a kill loses nothing written
  log.close()


def test_a_file_larger_than_an_upload_chunk_is_streamed_into_one_object(bucket):
  """A weight shard is written in pieces larger in all than gcsfs's 5 MiB block: a resumable upload of several
  chunks, which becomes one object only once closed."""
  import numpy as np
  data = np.random.default_rng(0).integers(0, 256, 11 * 2**20 + 123, dtype=np.uint8).tobytes()
  with paths.open_file(f"{B}/large/model.safetensors", "wb") as f:
    for start in range(0, len(data), 2**20):
      f.write(data[start:start + 2**20])
    assert bucket_files("large") == []  # nothing visible before the upload completes
  assert read_object("large/model.safetensors") == data
