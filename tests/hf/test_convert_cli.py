"""`eemo-jax import-hf` and `eemo-jax export-hf` through `eemo_jax.cli.main`, as a user runs them.

HF -> Orbax checkpoint -> HF must load in transformers with no missing keys and identical logits,
carrying the tokenizer / processor files along; a user error exits 2 with one line on stderr.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_fixtures import EOS, make_batch, save_hf_model, tiny_hf_config, torch_logits  # noqa: E402

from eemo_jax.cli import main  # noqa: E402
from eemo_jax.hf.convert import parse_size  # noqa: E402

TOKENIZER_FILES = {"tokenizer_config.json": '{"model_max_length": 512}\n', "chat_template.jinja": "{{ x }}\n",
                   "preprocessor_config.json": '{"patch_size": 14}\n'}
BATCH = make_batch([[(1, 4, 6)], [(1, 2, 2)]])


def load_torch(folder):
  model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      folder, attn_implementation="eager", output_loading_info=True)
  assert {k: sorted(v) for k, v in info.items()} == {
      "missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
  return model.eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  folder = os.fspath(tmp_path_factory.mktemp("hf"))
  _, ref = save_hf_model(folder, tiny_hf_config(tie=True, eos=EOS))
  for name, text in TOKENIZER_FILES.items():
    with open(os.path.join(folder, name), "w") as f:
      f.write(text)
  return folder, ref


@pytest.fixture(scope="module")
def checkpoint(source, tmp_path_factory):
  ckpt = os.fspath(tmp_path_factory.mktemp("ckpt") / "ckpt")
  assert main(["import-hf", source[0], ckpt]) == 0
  return ckpt


def test_import_writes_checkpoint_and_assets(checkpoint, source):
  assert {"params", "model_config.json", "hf_assets"} <= set(os.listdir(checkpoint))
  assert sorted(os.listdir(os.path.join(checkpoint, "hf_assets"))) == sorted(
      [*TOKENIZER_FILES, "generation_config.json"])


def test_import_then_export_loads_in_transformers(checkpoint, source, tmp_path, capsys):
  out = os.fspath(tmp_path / "out")
  assert main(["export-hf", checkpoint, out]) == 0
  assert "exported" in capsys.readouterr().out
  back = load_torch(out)
  ref = source[1]
  assert np.array_equal(torch_logits(ref, BATCH), torch_logits(back, BATCH))
  for key, value in ref.state_dict().items():
    assert torch.equal(value, back.state_dict()[key]), key
  for name, text in TOKENIZER_FILES.items():
    with open(os.path.join(out, name)) as f:
      assert f.read() == text
  for name in ("generation_config.json",):
    with open(os.path.join(source[0], name)) as a, open(os.path.join(out, name)) as b:
      assert a.read() == b.read()


def test_export_sharded_bfloat16(checkpoint, source, tmp_path):
  out = os.fspath(tmp_path / "out")
  assert main(["export-hf", checkpoint, out, "--dtype", "bfloat16", "--max-shard-size", "100KB"]) == 0
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    shards = set(json.load(f)["weight_map"].values())
  assert len(shards) > 1
  back = load_torch(out)
  assert back.dtype == torch.bfloat16
  for key, value in source[1].state_dict().items():
    assert torch.equal(value.to(torch.bfloat16), back.state_dict()[key]), key


def one_line_error(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "Traceback" not in err, err
  return err


def test_import_bad_path_exits_2(tmp_path, capsys):
  missing = os.fspath(tmp_path / "no_such_model")
  assert main(["import-hf", missing, os.fspath(tmp_path / "ckpt")]) == 2
  err = one_line_error(capsys)
  assert err.startswith("eemo-jax import-hf: error:") and missing in err
  assert not os.path.exists(tmp_path / "ckpt")


def test_import_unsupported_config_exits_2(source, tmp_path, capsys):
  folder = tmp_path / "hf"
  folder.mkdir()
  with open(os.path.join(source[0], "config.json")) as f:
    config = json.load(f)
  config["text_config"]["foo_bar"] = 1
  (folder / "config.json").write_text(json.dumps(config))
  os.link(os.path.join(source[0], "model.safetensors"), folder / "model.safetensors")
  assert main(["import-hf", os.fspath(folder), os.fspath(tmp_path / "ckpt")]) == 2
  assert "foo_bar" in one_line_error(capsys)


def test_import_into_existing_checkpoint_exits_2(checkpoint, source, capsys):
  assert main(["import-hf", source[0], checkpoint]) == 2
  assert "already holds a checkpoint" in one_line_error(capsys)


def test_export_bad_checkpoint_exits_2(source, tmp_path, capsys):
  assert main(["export-hf", source[0], os.fspath(tmp_path / "out")]) == 2  # an HF folder, not a checkpoint
  err = one_line_error(capsys)
  assert "is not an EEmo-JAX checkpoint" in err and "import-hf" in err


def test_bad_shard_size_is_a_usage_error(checkpoint, tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    main(["export-hf", checkpoint, os.fspath(tmp_path / "out"), "--max-shard-size", "lots"])
  assert info.value.code == 2
  assert "'lots' is not a size" in capsys.readouterr().err


def test_parse_size():
  assert parse_size("5GB") == 5 * 10**9
  assert parse_size("500MB") == 500 * 10**6
  assert parse_size("2GiB") == 2 * 2**30
  assert parse_size("1024") == 1024
