"""The lines loading prints: one per safetensors file (name, size, i/n, seconds), then the placing.

A real checkpoint takes minutes to read; a command that says nothing meanwhile looks hung. The lines are
checked against the folder itself (the index's shard names and the files' sizes), and loading with them
must give the same parameters as loading without.
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from hf_fixtures import build_hf_model, tiny_hf_config  # noqa: E402

from eemo_jax import cli, status  # noqa: E402
from eemo_jax.hf import load  # noqa: E402
from eemo_jax.parallel.sharding import make_mesh  # noqa: E402

READ = re.compile(r"^read (\S+) \((.+)\) (\d+)/(\d+) in (\d+\.\d) s$")


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory) -> str:
  folder = str(tmp_path_factory.mktemp("sharded"))
  build_hf_model(tiny_hf_config()).save_pretrained(folder, max_shard_size="300KB")
  return folder


def _shards(folder: str) -> list[str]:
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    return sorted(set(json.load(f)["weight_map"].values()))


def _params(model) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_one_line_per_file_then_the_placing(sharded_folder, capsys):
  shards = _shards(sharded_folder)
  assert len(shards) >= 3
  stream = io.StringIO()
  with status.printed(stream):
    model = load.load_hf(sharded_folder, mesh=make_mesh({"fsdp": 8}))
  lines = stream.getvalue().splitlines()
  total = sum(os.path.getsize(os.path.join(sharded_folder, s)) for s in shards)
  assert lines[0] == f"loading {sharded_folder}: {len(shards)} safetensors files, {status.format_bytes(total)}"
  reads = [READ.match(line) for line in lines[1:-1]]
  assert all(reads), lines
  assert [m.group(1) for m in reads] == shards  # in order, each once
  assert [m.group(2) for m in reads] == [status.format_bytes(os.path.getsize(os.path.join(sharded_folder, s)))
                                         for s in shards]
  assert [(int(m.group(3)), int(m.group(4))) for m in reads] == [(i, len(shards)) for i in range(1, len(shards) + 1)]
  assert re.fullmatch(r"placed \d+ parameters on 8 devices in \d+\.\d s", lines[-1]), lines[-1]
  assert capsys.readouterr().err == ""  # printed to the stream given, nowhere else

  quiet = load.load_hf(sharded_folder)  # library use: no lines, the same weights
  assert capsys.readouterr().err == ""
  ours, theirs = _params(model), _params(quiet)
  assert ours.keys() == theirs.keys()
  for path in ours:
    np.testing.assert_array_equal(ours[path], theirs[path], err_msg=str(path))


@pytest.mark.parametrize("reason", ["memory", "hosts"])
def test_without_the_read_ahead_the_placing_reports_its_progress(sharded_folder, monkeypatch, reason):
  """Reading ahead would only evict its own pages (weights over the free memory), or make every host read every
  byte (multi-host): it is skipped, a line says why, and the placing reports every tenth of the parameters."""
  if reason == "memory":
    monkeypatch.setattr(load, "available_memory", lambda: 1000)
  else:
    monkeypatch.setattr(load, "host_count", lambda: 4)
  stream = io.StringIO()
  with status.printed(stream):
    load.load_hf(sharded_folder)
  lines = stream.getvalue().splitlines()
  assert lines[0].startswith(f"loading {sharded_folder}: ")
  if reason == "memory":
    assert lines[1].startswith("the weights (") and "exceed the free memory (1.0 kB)" in lines[1]
  else:
    assert lines[1] == "each of the 4 hosts reads only its slices of the weights"
  total = int(re.fullmatch(r"placed (\d+) parameters on 1 device in \d+\.\d s", lines[-1]).group(1))
  tenth = max(1, total // 10)
  counts = [int(re.fullmatch(r"placed (\d+)/(\d+) parameters in \d+\.\d s", line).group(1)) for line in lines[2:-1]]
  assert counts == list(range(tenth, total, tenth))
  assert not any(READ.match(line) for line in lines)


def test_import_hf_prints_the_loading_lines(sharded_folder, tmp_path, capsys):
  assert cli.main(["import-hf", sharded_folder, str(tmp_path / "ckpt")]) == 0
  err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("WARNING", "I0", "W0"))]
  shards = _shards(sharded_folder)
  assert err[0].startswith(f"loading {sharded_folder}: {len(shards)} safetensors files")
  assert [READ.match(line).group(1) for line in err[1:1 + len(shards)]] == shards
  assert err[1 + len(shards)].startswith("placed ")
