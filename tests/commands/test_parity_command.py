"""`eemo-jax parity`: the per-component report a researcher uses to trust the port."""

import pytest

from eemo_jax import cli
from eemo_jax.commands.parity import compare
from hf_fixtures import save_hf_model, tiny_hf_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("hf"))
  save_hf_model(folder, tiny_hf_config(fullatt=(0,)))
  return folder


def test_every_component_agrees_in_fp32(hf_dir, tmp_path):
  from PIL import Image
  import numpy as np
  image = tmp_path / "photo.png"
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (150, 260, 3), np.uint8)).save(image)
  rows, kl = compare(hf_dir, image=str(image))
  names = [r.component for r in rows]
  assert names[:2] == ["vision blocks", "patch merger"] and names[-1] == "logits"
  assert any(n.startswith("decoder layer 0") for n in names)
  for r in rows:
    assert r.max_abs <= 1e-5 * max(1.0, r.ref_scale), r
  assert 0 <= kl < 1e-9


def test_command_prints_table_and_fails_cleanly(hf_dir, capsys):
  assert cli.main(["parity", hf_dir]) == 0
  out = capsys.readouterr().out
  assert "logits KL" in out and "vision blocks" in out
  assert cli.main(["parity", hf_dir + "-missing"]) == 2
  assert "no config.json" in capsys.readouterr().err
