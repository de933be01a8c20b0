"""`eemo-jax aot` compiles the real train step for a TPU topology on this CPU machine (libtpu, no TPU)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _aot(*args):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  return subprocess.run([sys.executable, "-m", "eemo_jax.cli", "aot", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


def test_tiny_config_compiles_for_a_v5e_slice_and_fits():
  result = _aot("--config", "configs/tiny_demo.py", "--topology", "v5e:2x2", "--config.mesh.fsdp=-1")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "4 x TPU v5 lite" in out and "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in out
  for line in ("arguments", "temporaries", "total"):
    assert line in out
  assert "fits" in out and "DOES NOT FIT" not in out


def test_unknown_topology_explains():
  result = _aot("--config", "configs/tiny_demo.py", "--topology", "v9z:1x1")
  assert result.returncode == 2
  assert "cannot describe TPU topology 'v9z:1x1'" in result.stderr


def test_a_batch_the_mesh_cannot_shard_is_refused():
  result = _aot("--config", "configs/tiny_demo.py", "--topology", "v5e:2x2", "--config.mesh.fsdp=-1",
                "--config.train.global_batch_size=6")
  assert result.returncode == 2
  assert "6 rows, which the mesh's data x fsdp = 4 devices do not divide" in result.stderr


def test_a_grpo_config_compiles_the_rollout_and_the_update_step():
  """For a GRPO config both of `eemo-jax grpo`'s programs are compiled and reported: the rollout of one
  micro-batch of prompts (prefill once per prompt, G completions decoded) and the update step."""
  result = _aot("--config", "configs/tiny_grpo.py", "--topology", "v5e:2x2")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "rollout (4 prompts x 4 completions of 48 tokens)" in out
  assert "update step (1 x 16 completions of 48 tokens after 448-token prompts)" in out
  assert out.count("fits (") == 2 and "DOES NOT FIT" not in out
  assert out.count("model the preset tiny") == 2


# --------------------------------------------------------------------------------------------------
# Which architecture the check compiles for (no compile: `model_choice` alone)
# --------------------------------------------------------------------------------------------------


def _config(*overrides):
  from eemo_jax.config import load_config
  return load_config(os.path.join(REPO, "configs", "tiny_grpo.py"), list(overrides))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A transformers Qwen2.5-VL folder whose decoder is not the `tiny` preset's (3 layers, MLP 80)."""
  from hf_fixtures import save_hf_model, tiny_hf_config
  folder = str(tmp_path_factory.mktemp("aot_hf"))
  save_hf_model(folder, tiny_hf_config(text_layers=3, intermediate_size=80))
  return folder


def test_the_model_init_from_names_is_what_compiles(hf_folder):
  """A run starts from `model.init_from`'s architecture, so the AOT check of that run compiles that one."""
  from eemo_jax.commands.aot import model_choice
  from eemo_jax.hf.load import read_config
  from eemo_jax.model.config import preset
  choice = model_choice(_config(f"--config.model.init_from={hf_folder}"))
  assert choice.arch == read_config(hf_folder) != preset("tiny")
  assert (choice.arch.text.num_hidden_layers, choice.arch.text.intermediate_size) == (3, 80)
  assert choice.source == f"from model.init_from: the HF folder {hf_folder}"


def test_a_stage_planned_before_its_first_stage_exists_compiles_the_preset_and_says_so(tmp_path):
  from eemo_jax.commands.aot import model_choice
  from eemo_jax.model.config import preset
  missing = str(tmp_path / "runs" / "stage1")
  choice = model_choice(_config(f"--config.model.init_from={missing}"))
  assert choice.arch == preset("tiny")
  assert choice.source.startswith("the preset tiny (model.init_from: ") and missing in choice.source
  assert f"{missing} does not exist" in choice.source and choice.source.endswith("compiled for the preset instead)")


def test_conflicting_or_missing_model_fields_are_refused(hf_folder, tmp_path):
  from eemo_jax.commands.aot import model_choice
  from eemo_jax.config import ConfigError
  with pytest.raises(ConfigError, match="are both set"):
    model_choice(_config(f"--config.model.init_from={hf_folder}", f"--config.model.hf_dir={hf_folder}"))
  with pytest.raises(ConfigError, match="tokenizer"):  # named for its tokenizer, it must hold one
    model_choice(_config(f"--config.data.tokenizer_dir={tmp_path}"))
