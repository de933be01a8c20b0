"""Wrong input folders through the command line: one line naming the path and what was expected, exit 2.

A pod user's first mistakes are paths: the HF folder, the data directory, the tokenizer. Each one must stop
`train` and `grpo` before anything is written into the run directory (and `eval --config` and `predict`
before their outputs), with one line on stderr rather than a traceback, and before any weight is read or
step compiled (minutes on a real model).
"""

from __future__ import annotations

import json
import os

import pytest

from eemo_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {"train": os.path.join(ROOT, "configs", "tiny_demo.py"),
           "grpo": os.path.join(ROOT, "configs", "tiny_grpo.py")}
KIND = {"train": "emoverse", "grpo": "eemo"}  # the synthetic data set each recipe trains on


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
  """Good inputs (tokenizer, both synthetic data sets, an HF config.json that fits the tokenizer) and the
  wrong folders of every case."""
  from data_pipeline.builders import build
  from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer
  from hf_fixtures import tiny_hf_config
  root = tmp_path_factory.mktemp("inputs")
  paths = {"tokenizer": str(root / "tokenizer"), "data": str(root / "data")}
  build_offline_tokenizer(paths["tokenizer"])
  for kind in KIND.values():
    paths[kind] = build("synthetic", paths["data"], config=kind, num_train=8, num_test=4).config
  special = load_tokenizer(paths["tokenizer"]).special
  fitting = tiny_hf_config(vocab_size=512).to_dict()
  fitting.update(image_token_id=special.image_pad, video_token_id=special.video_pad,
                 vision_start_token_id=special.vision_start, vision_end_token_id=special.vision_end)

  def folder(name: str, files: dict[str, str]) -> str:
    path = root / name
    path.mkdir()
    for file, text in files.items():
      (path / file).write_text(text)
    return str(path)

  paths.update(
      hf_no_config=folder("hf_no_config", {"model.safetensors": ""}),
      hf_llama=folder("hf_llama", {"config.json": json.dumps({"model_type": "llama", "hidden_size": 64})}),
      hf_no_weights=folder("hf_no_weights", {"config.json": json.dumps(fitting)}),
      hf_other_tokens=folder("hf_other_tokens", {"config.json": json.dumps({**fitting, "image_token_id": 5})}),
      data_without_sets=folder("data_without_sets", {}),
      tokenizer_without_json=folder("tokenizer_without_json", {"vocab.json": "{}"}),
      tokenizer_damaged=folder("tokenizer_damaged", {"tokenizer.json": '{"version": "1.0", "model": '}),
      missing=str(root / "missing"),
  )
  return paths


# (overrides, what the line must say besides the path): every `{name}` is a path of the `inputs` fixture.
CASES = {
    "hf dir missing": ({"model.hf_dir": "{missing}"}, "does not exist; point it at a local Qwen2.5-VL folder"),
    "hf dir without config.json": ({"model.hf_dir": "{hf_no_config}"}, "has no config.json"),
    "hf config not Qwen2.5-VL": ({"model.hf_dir": "{hf_llama}"}, "model_type is 'llama'; EEmo-JAX loads Qwen2.5-VL"),
    "hf dir without safetensors": ({"model.hf_dir": "{hf_no_weights}"}, "holds no model*.safetensors weights"),
    "tokenizer that does not fit the model": ({"model.hf_dir": "{hf_other_tokens}"},
                                              "does not fit the model in {hf_other_tokens} (image_token_id: model 5"),
    "data dir missing": ({"data.data_dir": "{missing}"}, "does not exist (data.data_dir)"),
    "data dir without the data set": ({"data.data_dir": "{data_without_sets}"}, "no data set 'synthetic'"),
    "data set without the config": ({"data.dataset_config": "nosuch"}, "has no config 'nosuch'"),
    "train split missing": ({"data.split": "nosuch"}, "has no split 'nosuch'"),
    "eval split missing": ({"eval.split": "nosuch", "eval.batches": "1"}, "has no split 'nosuch'"),
    "tokenizer dir missing": ({"data.tokenizer_dir": "{missing}"}, "folder with tokenizer.json"),
    "tokenizer dir without tokenizer.json": ({"data.tokenizer_dir": "{tokenizer_without_json}"}, "no tokenizer.json"),
    "tokenizer.json unreadable": ({"data.tokenizer_dir": "{tokenizer_damaged}"}, "cannot be read"),
}
PATH_OF = {"model.hf_dir": "model.hf_dir", "data.data_dir": "data.data_dir", "data.tokenizer_dir": "data.tokenizer_dir",
           "data.dataset_config": "data.data_dir", "data.split": "data.data_dir", "eval.split": "data.data_dir"}


def _one_line(capsys, command: str) -> str:
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"eemo-jax {command}: ") and "Traceback" not in err, err
  return err


@pytest.mark.parametrize("command", ["train", "grpo"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_wrong_input_folder_is_one_line_exit_2_and_no_run_dir(command, case, inputs, tmp_path, capsys):
  overrides, expected = CASES[case]
  fields = {"data.tokenizer_dir": inputs["tokenizer"], "data.data_dir": inputs["data"],
            "data.dataset_config": inputs[KIND[command]], "train.run_dir": str(tmp_path / "run"), "train.steps": 1,
            "eval.batches": 0, "mesh.fsdp": 8, "train.global_batch_size": 8}
  fields.update({k: v.format(**inputs) for k, v in overrides.items()})
  argv = [command, "--config", CONFIGS[command], *(f"--config.{k}={v}" for k, v in fields.items())]
  assert cli.main(argv) == 2
  err = _one_line(capsys, command)
  assert expected.format(**inputs) in err, err
  assert fields[PATH_OF[next(iter(overrides))]] in err, err  # the path at fault
  assert not (tmp_path / "run").exists()


EVAL_CASES = {  # (argument values, what the line must say besides the path)
    "hf dir missing": ({"--hf-dir": "{missing}"}, "{missing} does not exist"),
    "hf dir without config.json": ({"--hf-dir": "{hf_no_config}"}, "{hf_no_config} has no config.json"),
    "hf config not Qwen2.5-VL": ({"--hf-dir": "{hf_llama}"}, "model_type is 'llama'"),
    "hf dir without safetensors": ({"--hf-dir": "{hf_no_weights}"}, "{hf_no_weights} holds no model*.safetensors"),
    "tokenizer that does not fit the model": ({"--hf-dir": "{hf_other_tokens}"},
                                              "the tokenizer in {tokenizer} does not fit the model"),
    "tokenizer dir missing": ({"--tokenizer-dir": "{missing}"}, "no tokenizer.json in {missing}"),
    "tokenizer dir without tokenizer.json": ({"--tokenizer-dir": "{tokenizer_without_json}"},
                                             "no tokenizer.json in {tokenizer_without_json}"),
    "tokenizer.json unreadable": ({"--tokenizer-dir": "{tokenizer_damaged}"}, "tokenizer.json cannot be read"),
}


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_and_predict_refuse_a_wrong_model_or_tokenizer_folder(command, case, inputs, tmp_path, capsys):
  """Checked before the weights are read: the config and the tokenizer first, then the weight files."""
  values, expected = EVAL_CASES[case]
  arguments = {"--hf-dir": inputs["hf_no_weights"], "--tokenizer-dir": inputs["tokenizer"]}
  arguments.update({k: v.format(**inputs) for k, v in values.items()})
  out = tmp_path / "out"
  if command == "eval":
    argv = ["eval", "--config", CONFIGS["grpo"], "--out", str(out), f"--config.data.data_dir={inputs['data']}",
            f"--config.data.dataset_config={inputs['eemo']}"]
  else:
    argv = ["predict", "--image", os.path.join(ROOT, "tests", "data", "photos"), "--out", str(out / "p.jsonl"),
            "--boxes", str(out / "boxes")]
  argv += [word for pair in arguments.items() for word in pair]
  assert cli.main(argv) == 2
  assert expected.format(**inputs) in _one_line(capsys, command)
  assert not out.exists()


@pytest.mark.parametrize("override, expected", [
    ("--config.data.data_dir={missing}", "the data directory {missing} does not exist"),
    ("--config.data.data_dir={data_without_sets}", "no data set 'synthetic' under {data_without_sets}"),
    ("--config.eval.split=nosuch", "has no split 'nosuch'"),
])
def test_eval_refuses_missing_records_before_loading_the_model(override, expected, inputs, tmp_path, capsys):
  """The model given is a folder without weights: the data error comes first, so the records were checked
  before any weight was read."""
  argv = ["eval", "--config", CONFIGS["grpo"], "--out", str(tmp_path / "out"), "--hf-dir", inputs["hf_no_weights"],
          "--tokenizer-dir", inputs["tokenizer"], f"--config.data.data_dir={inputs['data']}",
          f"--config.data.dataset_config={inputs['eemo']}", override.format(**inputs)]
  assert cli.main(argv) == 2
  assert expected.format(**inputs) in _one_line(capsys, "eval")
  assert not (tmp_path / "out").exists()


def test_eval_without_a_model_says_what_to_pass(inputs, tmp_path, capsys):
  """`eval --config` with no export, no run and no model.hf_dir: the line names the arguments that give a model.
  A run directory is evaluated from its newest checkpoint (tests/eval/test_loading_runs.py); one that has none
  yet says so."""
  run_dir, export = tmp_path / "run", tmp_path / "run" / "export"
  base = ["eval", "--config", CONFIGS["grpo"], "--out", str(tmp_path / "out"), "--tokenizer-dir", inputs["tokenizer"],
          f"--config.data.data_dir={inputs['data']}", f"--config.data.dataset_config={inputs['eemo']}",
          f"--config.train.run_dir={run_dir}", f"--config.train.export_dir={export}"]
  assert cli.main(base) == 2
  assert "pass --hf-dir or --checkpoint (the config names no export that exists" in _one_line(capsys, "eval")
  (run_dir / "checkpoints").mkdir(parents=True)
  (run_dir / "config.json").write_text('{"model": {}, "train": {}}')
  assert cli.main(base) == 2
  assert f"{run_dir} is a run directory without a saved checkpoint" in _one_line(capsys, "eval")
  assert not (tmp_path / "out").exists()
