"""Run as a script by tests/test_dependencies.py: the model jobs with the data packages uninstalled.

    python tests/without_data_packages.py OUT_DIR

TensorFlow Datasets, Grain and ArrayRecord are made absent before anything is imported (`sys.modules[name] = None`
is what an uninstalled package looks like to both `import` and `importlib.util.find_spec`). Then, as a user of the
base install would: a tiny transformers model is saved, `eemo-jax import-hf`, `eemo-jax export-hf`, the export
loaded with `eemo_jax.load_hf`, one forward and a greedy `eemo_jax.generate`; `eemo-jax predict` on a photo; and
`eemo-jax train` and `eemo-jax grpo`, which must refuse. What each step returned goes to OUT_DIR/results.json and
arrays.npz, for the test to check against the transformers reference computed here too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

DATA_MODULES = ("tensorflow_datasets", "grain", "array_record")
for name in DATA_MODULES:
  sys.modules[name] = None  # import raises ModuleNotFoundError; find_spec returns None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(HERE, "eval")]

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py, for the parity check


def cli(*argv: str) -> tuple[int, str]:
  """(exit code, stderr) of one `eemo-jax` command run in this process."""
  from eemo_jax.cli import main
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = main(list(argv))
  return code, err.getvalue()


def main(out: str) -> None:
  import eemo_jax
  from eval_fixtures import PHOTOS, TINY_DEMO, export_tiny_model
  from hf_fixtures import EOS, make_batch, save_hf_model, tiny_hf_config, torch_logits

  results, arrays = {}, {}
  hf_dir, ckpt, export = (os.path.join(out, name) for name in ("hf", "ckpt", "export"))
  _, ref = save_hf_model(hf_dir, tiny_hf_config(eos=EOS))
  results["import-hf"] = cli("import-hf", hf_dir, ckpt)
  results["export-hf"] = cli("export-hf", ckpt, export)

  model = eemo_jax.load_hf(export)
  batch = make_batch([[(1, 4, 6)], [(1, 2, 2)]], pad="left")
  args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
  arrays["logits"] = np.asarray(model(*args).logits)  # (batch, seq, vocab)
  arrays["torch_logits"] = torch_logits(ref, batch)  # (batch, seq, vocab)
  arrays["attention_mask"] = batch["attention_mask"]  # (batch, seq)
  arrays["generated"] = eemo_jax.generate(model, *args, max_new_tokens=3)  # (batch, 3)

  predictor = export_tiny_model(os.path.join(out, "predictor"))
  predictions = os.path.join(out, "predictions.jsonl")
  results["predict"] = cli("predict", "--hf-dir", predictor, "--image", os.path.join(PHOTOS, "astronaut.jpg"),
                           "--out", predictions, "--max-new-tokens", "4", "--max-pixels", str(56 * 56))
  with open(predictions) as f:
    results["predictions"] = [json.loads(line) for line in f]

  run_dir = os.path.join(out, "run")
  results["train"] = cli("train", "--config", TINY_DEMO, f"--config.train.run_dir={run_dir}",
                         f"--config.data.data_dir={os.path.join(out, 'data')}",
                         f"--config.data.tokenizer_dir={predictor}_tokenizer")
  results["train_run_dir_exists"] = os.path.exists(run_dir)
  grpo_dir = os.path.join(out, "grpo")
  results["grpo"] = cli("grpo", "--config", os.path.join(ROOT, "configs", "tiny_demo_grpo.py"),
                        f"--config.train.run_dir={grpo_dir}", f"--config.model.hf_dir={predictor}",
                        f"--config.data.data_dir={os.path.join(out, 'data')}",
                        f"--config.data.tokenizer_dir={predictor}_tokenizer")
  results["grpo_run_dir_exists"] = os.path.exists(grpo_dir)

  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f)
  np.savez(os.path.join(out, "arrays.npz"), **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
