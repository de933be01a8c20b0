"""`eemo-jax import-hf` and `eemo-jax export-hf` through `eemo_jax.cli.main`, as a user runs them.

HF -> Orbax checkpoint -> HF must load in transformers with no missing keys and identical logits,
carrying the tokenizer / processor files along; a user error (a malformed config.json, index or
checkpoint config, a target that holds files) exits 2 with one line on stderr that names the file
or key, and writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil

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


# -------------------------------------------------------------------------- malformed inputs (issue 12)
def damaged_copy(source_folder, folder, config_text=None, change=None):
  """A copy of an HF folder (weights hard-linked) whose config.json is replaced or edited."""
  os.makedirs(folder)
  for name in os.listdir(source_folder):
    if name != "config.json":
      os.link(os.path.join(source_folder, name), os.path.join(folder, name))
  if config_text is None:
    with open(os.path.join(source_folder, "config.json")) as f:
      config = json.load(f)
    change(config)
    config_text = json.dumps(config)
  mode = "wb" if isinstance(config_text, bytes) else "w"
  with open(os.path.join(folder, "config.json"), mode) as f:
    f.write(config_text)
  return folder


CONFIG_DAMAGE = {
    "hidden_size_string": (lambda c: c["text_config"].update(hidden_size="64"),
                           'text_config.hidden_size is "64" (a string); expected a positive integer'),
    "negative_layers": (lambda c: c["text_config"].update(num_hidden_layers=-1),
                        "text_config.num_hidden_layers is -1; expected a positive integer"),
    "float_heads": (lambda c: c["vision_config"].update(num_heads=2.0),
                    "vision_config.num_heads is 2.0 (a number); expected a positive integer"),
    "missing_field": (lambda c: c["vision_config"].pop("depth"), "vision_config.depth is missing"),
    "missing_text_config": (lambda c: c.pop("text_config"), "vocab_size is missing"),
    "vision_config_list": (lambda c: c.update(vision_config=[1]),
                           "vision_config is [1] (a list); expected a JSON object"),
    "tie_string": (lambda c: c.update(tie_word_embeddings="false"),
                   'tie_word_embeddings is "false" (a string); expected true or false'),
    "mrope_strings": (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=["2", "3", "3"]),
                      "text_config.rope_parameters.mrope_section is"),
    "rope_list": (lambda c: c["text_config"].update(rope_parameters=[1]),
                  "text_config.rope_parameters is [1] (a list); expected a JSON object"),
    "eps_zero": (lambda c: c["text_config"].update(rms_norm_eps=0),
                 "text_config.rms_norm_eps is 0; expected a positive number"),
    "eos_float": (lambda c: c["text_config"].update(eos_token_id=1.5), "text_config.eos_token_id is 1.5"),
    "json_list": ("[1, 2]", "expected a JSON object at the top level (an HF config.json), got [1, 2] (a list)"),
    "not_json": ('{"model_type": ', "is not valid JSON"),
    "binary": (b"\xff\xfe\x00\x01", "is not valid JSON"),
}


@pytest.mark.parametrize("case", list(CONFIG_DAMAGE))
def test_import_malformed_config_exits_2_writing_nothing(case, source, tmp_path, capsys):
  damage, expected = CONFIG_DAMAGE[case]
  kwargs = {"change": damage} if callable(damage) else {"config_text": damage}
  folder = damaged_copy(source[0], os.fspath(tmp_path / "hf"), **kwargs)
  assert main(["import-hf", folder, os.fspath(tmp_path / "ckpt")]) == 2
  err = one_line_error(capsys)
  assert err.startswith("eemo-jax import-hf: error:") and os.path.join(folder, "config.json") in err
  assert expected in err
  assert os.listdir(tmp_path) == ["hf"]


@pytest.fixture(scope="module")
def sharded_source(source, tmp_path_factory):
  folder = os.fspath(tmp_path_factory.mktemp("sharded") / "hf")
  save_hf_model(folder, tiny_hf_config(tie=True, eos=EOS), max_shard_size="100KB")
  return folder


@pytest.mark.parametrize("index,expected", [
    ("{", "is not valid JSON"),
    ("[]", "is not a safetensors index"),
    ('{"weight_map": {"model.norm.weight": ["a"]}}', "is not a safetensors index"),
    ("OUTSIDE", "which is not a file inside"),
])
def test_import_malformed_index_exits_2_writing_nothing(index, expected, sharded_source, tmp_path, capsys):
  folder = tmp_path / "hf"
  folder.mkdir()
  for name in os.listdir(sharded_source):
    os.link(os.path.join(sharded_source, name), folder / name)
  index_path = folder / "model.safetensors.index.json"
  if index == "OUTSIDE":  # one shard named by a path out of the folder, as the issue found
    data = json.loads(index_path.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "../" + data["weight_map"][key]
    index = json.dumps(data)
  index_path.unlink()
  index_path.write_text(index)
  assert main(["import-hf", os.fspath(folder), os.fspath(tmp_path / "ckpt")]) == 2
  err = one_line_error(capsys)
  assert os.fspath(index_path) in err and expected in err
  assert os.listdir(tmp_path) == ["hf"]


@pytest.mark.parametrize("text,expected", [
    ("[1]", "expected a JSON object at the top level"),
    ("{", "is not valid JSON"),
    ("CHANGE", 'text_config.hidden_size is "64" (a string)'),
])
def test_export_bad_checkpoint_config_exits_2_writing_nothing(text, expected, checkpoint, tmp_path, capsys):
  ckpt = os.fspath(tmp_path / "ckpt")
  shutil.copytree(checkpoint, ckpt)
  path = os.path.join(ckpt, "model_config.json")
  if text == "CHANGE":
    with open(path) as f:
      config = json.load(f)
    config["text_config"]["hidden_size"] = "64"
    text = json.dumps(config)
  with open(path, "w") as f:
    f.write(text)
  assert main(["export-hf", ckpt, os.fspath(tmp_path / "out" / "hf")]) == 2
  err = one_line_error(capsys)
  assert err.startswith("eemo-jax export-hf: error:") and path in err and expected in err
  assert os.listdir(tmp_path) == ["ckpt"]


# ------------------------------------------------------------------------------ export targets (issue 12)
def files_of(folder):
  return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_export_into_a_folder_with_files_exits_2_and_keeps_it(checkpoint, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "config.json").write_text("old")
  (out / "model.safetensors").write_text("old weights")
  assert main(["export-hf", checkpoint, os.fspath(out)]) == 2
  err = one_line_error(capsys)
  assert "already holds files (config.json, model.safetensors)" in err and "--overwrite" in err
  assert files_of(out) == {"config.json": b"old", "model.safetensors": b"old weights"}
  assert os.listdir(tmp_path) == ["out"]


def test_export_overwrite_replaces_the_old_export(checkpoint, source, tmp_path):
  out = os.fspath(tmp_path / "out")
  fresh = os.fspath(tmp_path / "fresh")
  assert main(["export-hf", checkpoint, fresh]) == 0
  assert main(["export-hf", checkpoint, out, "--max-shard-size", "100KB"]) == 0
  with open(os.path.join(out, "notes.txt"), "w") as f:
    f.write("only in the old export")
  assert main(["export-hf", checkpoint, out, "--overwrite"]) == 0
  assert files_of(out) == files_of(fresh)
  assert sorted(os.listdir(tmp_path)) == ["fresh", "out"]
  back = load_torch(out)
  for key, value in source[1].state_dict().items():
    assert torch.equal(value, back.state_dict()[key]), key


def test_export_over_its_own_checkpoint_is_refused(checkpoint, tmp_path, capsys):
  ckpt = os.fspath(tmp_path / "ckpt")
  shutil.copytree(checkpoint, ckpt)
  before = sorted(os.listdir(ckpt))
  assert main(["export-hf", ckpt, ckpt, "--overwrite"]) == 2
  assert "holds the checkpoint" in one_line_error(capsys)
  assert main(["export-hf", ckpt, os.fspath(tmp_path), "--overwrite"]) == 2
  assert "holds the checkpoint" in one_line_error(capsys)
  assert sorted(os.listdir(ckpt)) == before


def test_export_damaged_checkpoint_exits_2_writing_nothing(checkpoint, tmp_path, capsys):
  ckpt = os.fspath(tmp_path / "ckpt")
  shutil.copytree(checkpoint, ckpt)
  os.remove(os.path.join(ckpt, "params", "_METADATA"))
  assert main(["export-hf", ckpt, os.fspath(tmp_path / "out" / "hf")]) == 2
  ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eemo-jax")]  # Orbax logs too
  assert len(ours) == 1 and ours[0].startswith("eemo-jax export-hf: error:")
  assert f"{ckpt}/params is damaged or incomplete" in ours[0] and "import-hf" in ours[0]
  assert os.listdir(tmp_path) == ["ckpt"]


def test_import_and_export_through_a_bucket_write_what_local_folders_get(checkpoint, source, tmp_path, monkeypatch):
  """The HF folder, the checkpoint and the export all gs:// URLs (a GCS emulator on localhost): the export in the
  bucket is byte for byte the local export of the local import, and nothing is written locally."""
  from gcs_emulator import BUCKET, bucket_files, gcs_emulator, read_object

  from eemo_jax import paths
  local = tmp_path / "local"
  assert main(["export-hf", checkpoint, os.fspath(local)]) == 0
  bucket = f"gs://{BUCKET}"
  work = tmp_path / "cwd"
  work.mkdir()
  monkeypatch.chdir(work)  # a URL taken for a local path would land here
  with gcs_emulator():
    for name in os.listdir(source[0]):
      paths.copy_file(os.path.join(source[0], name), f"{bucket}/hf/{name}")
    assert main(["import-hf", f"{bucket}/hf", f"{bucket}/ckpt"]) == 0
    assert main(["export-hf", f"{bucket}/ckpt", f"{bucket}/out"]) == 0
    exported = {name.removeprefix("out/"): read_object(name) for name in bucket_files("out")}
  assert exported == {name: (local / name).read_bytes() for name in os.listdir(local)}
  assert os.listdir(work) == []
