"""An export is put in place whole: killed at any file operation, the target is the old export or the new one.

The kill test runs a realistic export (sharded safetensors with an index, a JSON config, a copied
tokenizer file) over an old export that holds a symlink to a file outside it (an HF-cache layout),
and SIGKILLs the exporting process just before its 1st, 2nd, ... file operation, until one export
runs to the end. The operations are counted by a profile hook on the C functions that touch files
(open, write, rename, unlink, fsync, ...), so the test does not depend on how staging is written.
After every kill the target must be byte-for-byte the old export or the new one, the file outside
untouched, and a later export must succeed over whatever the killed one left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from eemo_jax import paths
from eemo_jax.hf import staging
from eemo_jax.hf.staging import ExportError, check_target, staged_folder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DRIVER = textwrap.dedent(r'''
    import json, os, shutil, signal, sys
    import numpy as np
    from eemo_jax.hf import staging
    from eemo_jax.hf.safetensors_io import TensorSpec, write_sharded

    root, mode = sys.argv[1], sys.argv[2]
    if mode == "fallback":  # a system without renameat2(RENAME_EXCHANGE)
      staging._exchange = lambda a, b: False
    target, old = os.path.join(root, "export"), os.path.join(root, "old")
    OPS = {"open", "write", "writelines", "flush", "close", "rename", "replace", "unlink", "remove", "rmdir",
           "mkdir", "fsync", "sendfile", "symlink", "link", "truncate", "ftruncate", "copy_file_range"}

    def new_export(folder):
      specs = [TensorSpec(f"t{i}", np.dtype(np.float32), (64,)) for i in range(6)]
      write_sharded(folder, specs, ((f"t{i}", np.full(64, i, np.float32)) for i in range(6)), max_shard_bytes=600)
      with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"version": "new"}, f)
      shutil.copyfile(os.path.join(root, "tokenizer.json"), os.path.join(folder, "tokenizer.json"))

    def export(kill_at=None):
      count = 0
      def hook(frame, event, arg):
        nonlocal count
        if event == "c_call" and getattr(arg, "__name__", None) in OPS:
          count += 1
          if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
      sys.setprofile(hook)
      with staging.staged_folder(target, overwrite=True) as folder:
        new_export(folder)
      sys.setprofile(None)

    def snapshot(path):
      if not os.path.isdir(path):
        return None
      return {n: (["link", os.readlink(os.path.join(path, n))] if os.path.islink(os.path.join(path, n)) else
                  ["file", open(os.path.join(path, n), "rb").read().hex()]) for n in sorted(os.listdir(path))}

    def extras():
      return sorted(n for n in os.listdir(root) if n.startswith(".export."))

    def reset():
      """The old export, and nothing else: every run then makes the same operations in the same order."""
      for name in extras() + ["export"]:
        if os.path.lexists(os.path.join(root, name)):
          shutil.rmtree(os.path.join(root, name))
      shutil.copytree(old, target, symlinks=True)

    reset()
    export()
    want = {"old": snapshot(old), "new": snapshot(target)}
    outside = open(os.path.join(root, "outside.json"), "rb").read()
    results = []
    for kill_at in range(1, 10_000):
      reset()
      pid = os.fork()
      if pid == 0:
        export(kill_at)
        os._exit(0)
      _, status = os.waitpid(pid, 0)
      killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
      assert killed or status == 0, status
      state = next((name for name, files in want.items() if snapshot(target) == files), "other")
      aside = [n for n in extras() if ".replaced-" in n]
      if state == "other" and not os.path.lexists(target) and len(aside) == 1:
        state = "old moved aside" if snapshot(os.path.join(root, aside[0])) == want["old"] else "other"
      results.append({"kill_at": kill_at, "killed": killed, "state": state,
                      "outside_intact": open(os.path.join(root, "outside.json"), "rb").read() == outside})
      if not killed:
        break
    reset()
    pid = os.fork()  # one more kill, half-way, to leave a temporary folder behind
    if pid == 0:
      export(len(results) // 2)
      os._exit(0)
    os.waitpid(pid, 0)
    leftovers = extras()
    export()  # over what the killed export left
    print(json.dumps({"results": results, "leftovers_before": leftovers, "leftovers_after": extras(),
                      "final": snapshot(target) == want["new"]}))
''')


def make_old_export(root):
  """An old export whose tokenizer.json is a symlink to a file outside it, as in the HF cache."""
  old = root / "old"
  old.mkdir()
  (old / "model.safetensors").write_bytes(b"old weights")
  (old / "config.json").write_text('{"version": "old"}')
  (old / "only_in_old.txt").write_text("x")
  (root / "outside.json").write_text('{"outside": true}')
  os.symlink(os.path.join("..", "outside.json"), old / "tokenizer.json")
  (root / "tokenizer.json").write_text('{"tokenizer": "new"}')


def run_driver(root, mode):
  make_old_export(root)
  env = {**os.environ, "PYTHONPATH": REPO, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
  proc = subprocess.run([sys.executable, "-c", DRIVER, os.fspath(root), mode], capture_output=True, text=True,
                        env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_killed_export_leaves_the_old_or_the_new_export(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  if not staging._exchange(os.fspath(tmp_path / "a"), os.fspath(tmp_path / "b")):
    pytest.skip("this file system has no atomic exchange; test_killed_export_without_atomic_exchange covers it")
  for name in ("a", "b"):
    (tmp_path / name).rmdir()
  report = run_driver(tmp_path, "exchange")
  results = report["results"]
  kills = [r for r in results if r["killed"]]
  assert len(kills) >= 30 and not results[-1]["killed"]  # the hook fired at every operation, then one ran through
  assert {r["state"] for r in kills} == {"old", "new"}, [r for r in kills if r["state"] not in ("old", "new")]
  assert all(r["outside_intact"] for r in results)
  # The target switches from old to new exactly once: at the atomic exchange, after everything is written.
  states = [r["state"] for r in kills]
  first_new = states.index("new")
  assert set(states[:first_new]) == {"old"} and set(states[first_new:]) == {"new"}
  assert report["leftovers_before"] and not report["leftovers_after"] and report["final"]


def test_killed_export_without_atomic_exchange(tmp_path):
  """Without renameat2 there is one moment (between two renames) with no target; the old export is then aside."""
  report = run_driver(tmp_path, "fallback")
  kills = [r for r in report["results"] if r["killed"]]
  states = [r["state"] for r in kills]
  aside = states.index("old moved aside")
  assert set(states[:aside]) == {"old"} and set(states[aside + 1:]) == {"new"}, states
  assert all(r["outside_intact"] for r in report["results"])
  assert not report["leftovers_after"] and report["final"]


# --------------------------------------------------------------------------------------------------
def write_files(folder, files):
  for name, text in files.items():
    with open(os.path.join(folder, name), "w") as f:
      f.write(text)


def listing(path):
  return {n: open(os.path.join(path, n)).read() for n in sorted(os.listdir(path))}


def test_new_target_and_missing_parents_are_created(tmp_path):
  target = tmp_path / "a" / "b" / "export"
  with staged_folder(os.fspath(target)) as folder:
    assert not target.exists() and os.path.dirname(folder) == os.fspath(target.parent)
    write_files(folder, {"config.json": "{}"})
  assert listing(target) == {"config.json": "{}"}
  assert sorted(os.listdir(target.parent)) == ["export"]


def test_an_empty_existing_folder_is_filled(tmp_path):
  with staged_folder(os.fspath(tmp_path)) as folder:
    write_files(folder, {"config.json": "{}"})
  assert listing(tmp_path) == {"config.json": "{}"}


def test_a_folder_with_files_is_refused_before_anything_is_written(tmp_path):
  target = tmp_path / "export"
  target.mkdir()
  write_files(target, {"config.json": "old"})
  with pytest.raises(ExportError) as info:
    with staged_folder(os.fspath(target)):
      raise AssertionError("the block must not run")
  assert "already holds files (config.json)" in str(info.value) and "--overwrite" in str(info.value)
  assert sorted(os.listdir(tmp_path)) == ["export"] and listing(target) == {"config.json": "old"}


def test_overwrite_replaces_the_folder_whole(tmp_path):
  target = tmp_path / "export"
  target.mkdir()
  write_files(target, {"config.json": "old", "model.safetensors": "old", "stale.txt": "old"})
  with staged_folder(os.fspath(target), overwrite=True) as folder:
    write_files(folder, {"config.json": "new"})
    assert listing(target)["config.json"] == "old"  # untouched until the block ends
  assert listing(target) == {"config.json": "new"} and sorted(os.listdir(tmp_path)) == ["export"]


def test_overwrite_refuses_a_folder_that_is_not_an_export(tmp_path):
  target = tmp_path / "home"
  target.mkdir()
  write_files(target, {"notes.txt": "precious"})
  with pytest.raises(ExportError, match="it holds no config.json or \\*.safetensors"):
    check_target(os.fspath(target), overwrite=True)
  assert listing(target) == {"notes.txt": "precious"}


def test_a_file_target_is_refused(tmp_path):
  (tmp_path / "export").write_text("x")
  with pytest.raises(ExportError, match="exists and is not a folder"):
    check_target(os.fspath(tmp_path / "export"), overwrite=True)


def test_an_error_in_the_block_leaves_the_old_export_and_no_trace(tmp_path):
  target = tmp_path / "out" / "export"
  with pytest.raises(RuntimeError):
    with staged_folder(os.fspath(target)) as folder:
      write_files(folder, {"config.json": "new"})
      raise RuntimeError("gather failed")
  assert not (tmp_path / "out").exists()  # the parents it created are gone too
  target.mkdir(parents=True)
  write_files(target, {"config.json": "old"})
  with pytest.raises(RuntimeError):
    with staged_folder(os.fspath(target), overwrite=True) as folder:
      write_files(folder, {"config.json": "new"})
      raise RuntimeError("gather failed")
  assert listing(target) == {"config.json": "old"} and sorted(os.listdir(tmp_path / "out")) == ["export"]


def test_disk_full_names_the_file_and_keeps_the_old_export(tmp_path):
  target = tmp_path / "export"
  target.mkdir()
  write_files(target, {"config.json": "old"})
  with pytest.raises(ExportError) as info:
    with staged_folder(os.fspath(target), overwrite=True) as folder:
      write_files(folder, {"a.bin": "x" * 1000})
      raise OSError(28, "No space left on device", os.path.join(folder, "config.json"))
  message = str(info.value)
  assert "no space left on the device writing" in message and "config.json" in message
  assert "more than the 1000 bytes written so far" in message and f"{target} is unchanged" in message
  assert listing(target) == {"config.json": "old"} and sorted(os.listdir(tmp_path)) == ["export"]


def test_a_symlink_to_a_folder_as_target_is_followed(tmp_path):
  real = tmp_path / "disk" / "export"
  real.mkdir(parents=True)
  write_files(real, {"config.json": "old"})
  os.symlink(real, tmp_path / "link")
  with staged_folder(os.fspath(tmp_path / "link"), overwrite=True) as folder:
    write_files(folder, {"config.json": "new"})
  assert os.path.islink(tmp_path / "link") and listing(real) == {"config.json": "new"}


def test_non_writers_get_a_path_and_touch_nothing(tmp_path):
  target = tmp_path / "export"
  with staged_folder(os.fspath(target), writer=False) as folder:
    assert not os.path.exists(folder)
  assert os.listdir(tmp_path) == []


def test_the_fallback_replaces_the_old_export(tmp_path, monkeypatch):
  monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
  target = tmp_path / "export"
  target.mkdir()
  write_files(target, {"config.json": "old", "stale.txt": "old"})
  with staged_folder(os.fspath(target), overwrite=True) as folder:
    write_files(folder, {"config.json": "new"})
  assert listing(target) == {"config.json": "new"} and sorted(os.listdir(tmp_path)) == ["export"]


# --------------------------------------------------------------------------------------------------
# In a bucket (a GCS emulator on localhost): no folder rename, so config.json goes last
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket():
  from gcs_emulator import gcs_emulator
  with gcs_emulator():
    yield


def bucket_listing(prefix: str) -> dict[str, str]:
  from gcs_emulator import bucket_files, read_object
  return {name.removeprefix(prefix + "/"): read_object(name).decode() for name in bucket_files(prefix)}


def write_export(folder: str, version: str, names=("model.safetensors", "tokenizer.json")) -> None:
  for name in (*names, "config.json"):
    paths.write_text(paths.join(folder, name), version)


def test_a_bucket_export_replaces_the_old_one_whole(bucket):
  from gcs_emulator import BUCKET
  target = f"gs://{BUCKET}/replace/export"
  with staged_folder(target) as folder:
    write_export(folder, "old", names=("model.safetensors", "stale.txt"))
  with pytest.raises(ExportError, match="already holds files"):
    check_target(target)
  with staged_folder(target, overwrite=True) as folder:
    write_export(folder, "new")
  assert bucket_listing("replace") == {"export/config.json": "new", "export/model.safetensors": "new",
                                       "export/tokenizer.json": "new"}


def test_a_failed_bucket_export_leaves_the_old_one_and_nothing_beside(bucket):
  from gcs_emulator import BUCKET
  target = f"gs://{BUCKET}/failed/export"
  with staged_folder(target) as folder:
    write_export(folder, "old")
  with pytest.raises(RuntimeError, match="gather failed"):
    with staged_folder(target, overwrite=True) as folder:
      paths.write_text(paths.join(folder, "model.safetensors"), "new")
      raise RuntimeError("gather failed")
  assert bucket_listing("failed") == {"export/config.json": "old", "export/model.safetensors": "old",
                                      "export/tokenizer.json": "old"}


def test_a_bucket_export_stopped_while_copied_in_claims_no_model_and_the_next_one_finishes(bucket, monkeypatch):
  """Stopped before its last copy (config.json), the target holds no config.json, so nothing loads it as a
  model; the complete new export waits under the .partial- prefix, and the next export removes it."""
  from gcs_emulator import BUCKET
  target = f"gs://{BUCKET}/stopped/export"
  with staged_folder(target) as folder:
    write_export(folder, "old")
  copy = paths.copy_file

  def stopped_before_config(src, dst):
    if dst.endswith("/config.json"):
      raise KeyboardInterrupt  # stands for the kill
    copy(src, dst)

  monkeypatch.setattr(paths, "copy_file", stopped_before_config)
  with pytest.raises(KeyboardInterrupt):
    with staged_folder(target, overwrite=True) as folder:
      write_export(folder, "new")
  monkeypatch.setattr(paths, "copy_file", copy)
  left = bucket_listing("stopped")
  assert {k: v for k, v in left.items() if k.startswith("export/")} == {"export/model.safetensors": "new",
                                                                        "export/tokenizer.json": "new"}
  partial = {k.split("/", 1)[1]: v for k, v in left.items() if k.startswith(f".export{staging.PARTIAL}")}
  assert partial == {"config.json": "new", "model.safetensors": "new", "tokenizer.json": "new"}
  with staged_folder(target, overwrite=True) as folder:
    write_export(folder, "newer")
  assert bucket_listing("stopped") == {"export/config.json": "newer", "export/model.safetensors": "newer",
                                       "export/tokenizer.json": "newer"}


def test_the_root_of_a_bucket_is_refused(bucket):
  from gcs_emulator import BUCKET
  with pytest.raises(ExportError, match="root of the file system"):
    check_target(f"gs://{BUCKET}")
