"""The GRPO benchmark runs end to end on tiny settings: EEmo-JAX's engine and TRL's GRPOTrainer both train the
tiny model on the same prompts (the script refuses to time them otherwise), and the JSON holds every figure
benchmarks/README.md quotes, each step's parts adding up. Nothing here is timed against a limit."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "grpo_throughput.py")
TINY = ["--configs", "tiny", "--repeats", "1", "--limit-repeats", "1", "--records", "4", "--prompts", "2",
        "--generations", "2", "--completion-length", "4", "--matmul-n", "128", "--bandwidth-mb", "8"]


def test_grpo_benchmark_runs_both_sides_and_reports(tmp_path):
  out = tmp_path / "grpo.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as `eemo-jax grpo` runs here
  env["JAX_PLATFORMS"] = "cpu"
  done = subprocess.run([sys.executable, SCRIPT, *TINY, "--json", str(out)], env=env, cwd=ROOT, capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stderr[-4000:]
  assert "completions/s (end to end, 4/step)" in done.stdout and "CPU: " in done.stdout

  report = json.loads(out.read_text())
  assert report["env"]["trl"] == "1.16.0" and report["env"]["cpu"]["Model name"]
  assert set(report["env"]["sources_sha256"]) >= {"eemo_jax/rl", "data_pipeline"}
  limits = report["limits"]
  assert limits["peak_gflops"] > 0 and limits["read_bandwidth_gbs"] > 0 and set(limits["matmul_gflops"]) == {
      "jax", "torch"}
  (result,) = report["results"]
  assert result["config"] == "tiny" and result["prompt_ids_equal"] is True
  assert result["completions_per_step"] == 4 and result["target"] == 5.0 and isinstance(result["meets_target"], bool)
  assert "grpo.max_completion_length=4" in result["overrides"] and "grpo.beta=0.0" in result["overrides"]
  for name in ("jax", "trl"):
    side = result["sides"][name]
    (step,) = side["steps"]
    assert 0 < step["sample_s"] <= step["rollout_s"] < step["step_s"], (name, step)
    assert math.isclose(step["rollout_s"] + step["update_s"], step["step_s"], rel_tol=1e-9), (name, step)
    assert 1 <= step["completion_length"] <= 4 and 0 <= step["reward"] <= 1 and math.isfinite(step["loss"])
    assert math.isclose(side["completions_per_s"], 4 / side["step_median_s"])
  assert result["sides"]["trl"]["between_steps_median_s"] > 0 and result["jax_pipeline_ms_per_batch"] > 0
  assert math.isclose(result["ratio"], result["sides"]["trl"]["step_median_s"] / result["sides"]["jax"]["step_median_s"])
  assert set(result["paired"]) == {"step_s", "rollout_s", "sample_s", "update_s"}
