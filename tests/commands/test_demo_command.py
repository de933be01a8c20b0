"""`eemo-jax demo` as a user runs it, shortened only in its step counts (the same code path): its SFT learns the
synthetic cues, its export computes in transformers what it computes in EEmo-JAX, and its GRPO stage runs.
"""

import os
import re
import subprocess
import sys

from eemo_jax.commands import demo

EPOCHS = 1.5  # 188 SFT steps instead of the recipe's 375; `--grpo-steps 1` instead of 80
# The head's CES accuracy on the 400 held-out images must beat chance (1/8) by this margin, i.e. reach 0.5, the
# demo's own bar (it exits 1 below it). Measured after 1.5 epochs (2-core AMD EPYC): 0.688 with seed 0, the one run
# here, and 0.562 / 0.750 with seeds 1 / 2; after 1 epoch 0.465 (seed 0, below the bar: hence 1.5), after 2 epochs
# 0.77-0.82. The generated answers (the LM's CES word) score 0.69-0.78 after 1.5 epochs, held to the same margin.
MARGIN = 0.375
# max |Δlogits| the demo reports between its export in transformers and in EEmo-JAX (fp32, 4 held-out examples):
# measured 1.9e-6 - 3.1e-6 after 1-2 epochs; ~10x that (the demo's own bar is 1e-4).
LOGITS_TOL = 3e-5


def test_the_demo_learns_and_its_export_matches_transformers(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user's machine has
  env["JAX_PLATFORMS"] = "cpu"
  out = tmp_path / "demo"
  (out / "export").mkdir(parents=True)  # an earlier demo's export: a second run trains again and replaces it
  (out / "export" / "stale.safetensors").write_bytes(b"an earlier run's weights")
  result = subprocess.run([sys.executable, "-m", "eemo_jax.cli", "demo", "--out", str(out), "--epochs", str(EPOCHS),
                           "--grpo-steps", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  log = result.stdout + result.stderr
  assert result.returncode == 0, log[-4000:]
  assert re.search(r"^OK in \d+ s\.$", result.stdout, re.MULTILINE), result.stdout[-2000:]

  accuracy = re.search(r"CES accuracy ([\d.]+) from the head, ([\d.]+) from the generated answers", result.stdout)
  assert accuracy, result.stdout[-2000:]
  head, answers = float(accuracy.group(1)), float(accuracy.group(2))
  assert head >= demo.CHANCE + MARGIN and answers >= demo.CHANCE + MARGIN, (head, answers)

  logits = re.search(r"max \|Δlogits\| = (\S+);", result.stdout)
  assert logits and float(logits.group(1)) <= LOGITS_TOL, result.stdout[-2000:]

  assert re.search(r"1 steps in \d+ s; held-out mean reward [\d.]+ before, [\d.]+ after", result.stdout)
  assert not (out / "export" / "stale.safetensors").exists()
  for folder in ("export", "grpo_export"):  # the SFT and the GRPO exports, and their evaluation reports
    assert (out / folder / "config.json").is_file() and (out / folder / "model.safetensors").is_file(), folder
  assert (out / "eval" / "sft" / "report.md").is_file() and (out / "eval" / "grpo" / "report.md").is_file()
