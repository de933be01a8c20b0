"""What a user installs: pyproject's compatible ranges hold the tested pins of constraints.txt, and the base install
(no TFDS, Grain or ArrayRecord) loads, runs, exports and predicts with a model, while the data jobs refuse in one
line naming the `data` extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTED_EXTRAS = ("data", "test", "tpu", "gcs")  # what scripts/test.sh installs, so what constraints.txt was made from


def read_pins(path: str) -> dict[str, str]:
  """constraints.txt as {canonical name: version}; every line a `name==version` pin."""
  pins = {}
  with open(path) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
  return pins


def test_every_requirement_has_a_tested_pin_in_its_range():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  pins = read_pins(os.path.join(ROOT, "constraints.txt"))
  assert "eemo-jax" not in pins and "torchvision" not in pins
  extras = project["optional-dependencies"]
  requirements = [Requirement(r) for r in project["dependencies"] + [r for e in TESTED_EXTRAS for r in extras[e]]]
  assert requirements
  for requirement in requirements:
    name = canonicalize_name(requirement.name)
    assert requirement.specifier, f"{requirement}: give it a range"
    assert name in pins, f"{requirement} has no pin in constraints.txt"
    assert requirement.specifier.contains(pins[name]), f"constraints.txt's {name}=={pins[name]} is not in {requirement}"


def test_every_gpu_extra_names_jax_extras_of_the_pinned_jax():
  """`cuda` / `cuda12` install the jax the tests ran, with one of its own CUDA extras."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  jax_version = read_pins(os.path.join(ROOT, "constraints.txt"))["jax"]
  from importlib.metadata import metadata
  assert metadata("jax")["Version"] == jax_version
  jax_extras = set(metadata("jax").get_all("Provides-Extra"))
  for extra in ("cuda", "cuda12", "tpu"):
    (requirement,) = [Requirement(r) for r in extras[extra]]
    assert requirement.name == "jax" and requirement.extras <= jax_extras, requirement
    assert requirement.specifier.contains(jax_version), requirement


@pytest.fixture(scope="module")
def without_data_packages(tmp_path_factory):
  """results.json and arrays.npz of tests/without_data_packages.py, run in a fresh interpreter."""
  out = tmp_path_factory.mktemp("without_data_packages")
  done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "without_data_packages.py"), str(out)],
                        capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out / "results.json") as f:
    results = json.load(f)
  return results, dict(np.load(out / "arrays.npz"))


def test_import_export_load_and_run_a_model_without_the_data_packages(without_data_packages):
  results, arrays = without_data_packages
  assert results["import-hf"][0] == 0 and results["export-hf"] == [0, ""]
  # import-hf prints only its loading lines (eemo_jax.status): no warning, no traceback
  loading = results["import-hf"][1].splitlines()
  assert loading[0].startswith("loading ") and loading[-1].startswith("placed "), loading
  valid = arrays["attention_mask"].astype(bool)  # (batch, seq): left padding is not compared
  ours, theirs = arrays["logits"], arrays["torch_logits"]
  err = np.abs(ours[valid] - theirs[valid]).max()
  assert err <= 1e-4, err  # the parity bound of tests/model/test_parity.py
  # Greedy: the first generated token is transformers' argmax at the last (real) position, decisively.
  last = np.sort(theirs[:, -1], axis=-1)
  assert (last[:, -1] - last[:, -2]).min() > 10 * err
  np.testing.assert_array_equal(arrays["generated"][:, 0], theirs[:, -1].argmax(-1))
  assert arrays["generated"].shape == (2, 3)


def test_predict_without_the_data_packages(without_data_packages):
  results, _ = without_data_packages
  code, err = results["predict"]
  assert code == 0, err
  (line,) = results["predictions"]
  assert line["image"].endswith("astronaut.jpg") and isinstance(line["answer"], str)
  assert abs(sum(line["probabilities"].values()) - 1) < 1e-4


@pytest.mark.parametrize("command", ["train", "grpo"])
def test_data_jobs_name_the_data_extra_in_one_line_and_write_nothing(without_data_packages, command):
  results, _ = without_data_packages
  code, err = results[command]
  assert code == 2
  assert err.count("\n") == 1 and err.startswith(f"eemo-jax {command}: ")
  assert "pip install 'eemo-jax[data]'" in err
  assert "tensorflow-datasets, grain, array-record" in err
  assert not results[f"{command}_run_dir_exists"]
