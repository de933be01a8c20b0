"""The evaluation benchmark runs end to end on tiny settings: `eemo-jax eval`'s generation and the EEmo-Bench
example script's one-question-at-a-time `generate` answer the same built questions from the same prompt ids (the
script refuses to time them otherwise), greedily agree token for token in fp32, and the JSON holds every figure
benchmarks/README.md quotes, each pass's parts adding up. Nothing here is timed against a limit."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "eval_throughput.py")
TINY = ["--configs", "tiny", "--examples", "4", "--batch-size", "2", "--max-new-tokens", "4", "--image-side", "56",
        "--repeats", "1", "--limit-repeats", "1", "--matmul-n", "128", "--bandwidth-mb", "8", "--max-foreign", "1"]


def test_eval_benchmark_answers_the_same_prompts_on_both_sides_and_reports(tmp_path):
  out = tmp_path / "eval.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as `eemo-jax eval` runs here
  env["JAX_PLATFORMS"] = "cpu"
  done = subprocess.run([sys.executable, SCRIPT, *TINY, "--json", str(out)], env=env, cwd=ROOT, capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stderr[-4000:]
  assert "examples/s (4 questions, 4 new tokens)" in done.stdout and "CPU: " in done.stdout

  report = json.loads(out.read_text())
  assert report["env"]["transformers"] == "5.23.0" and report["env"]["cpu"]["Model name"]
  assert "eemo_jax/eval" in report["env"]["sources_sha256"] and report["target"] == 5.0
  limits = report["limits"]
  assert limits["peak_gflops"] > 0 and limits["read_bandwidth_gbs"] > 0 and set(limits["matmul_gflops"]) == {
      "jax", "torch"}
  (result,) = report["results"]
  assert result["config"] == "tiny" and result["prompt_ids_equal"] is True
  assert result["batch_size"] == 2 and result["seq_len"] == result["prompt_tokens"]["max"]
  assert "train.global_batch_size=2" in result["overrides"] and "data.max_pixels=3136" in result["overrides"]
  assert result["greedy_agreement"] == {"examples": 4, "equal": 4, "first_differences": {}}
  assert result["eval_texts_equal_greedy_pass"] is True and result["texts_equal_reference"] == 4
  assert 1 <= result["generated_tokens"]["jax_mean"] <= 4

  jax_side, ref = result["sides"]["eemo_jax"], result["sides"]["reference"]
  (jax_run,), (ref_run,) = jax_side["runs"], ref["runs"]
  assert jax_run["examples"] == 4 and jax_run["compile_s"] > 0
  assert math.isclose(jax_run["seconds"] + jax_run["compile_s"], jax_run["wall_s"], rel_tol=1e-9)
  assert len(ref_run["per_example_s"]) == 4 and sum(ref_run["per_example_s"]) <= ref_run["seconds"]
  for side in (jax_side, ref):
    assert math.isclose(side["examples_per_s"], 4 / side["median_s"])
  assert math.isclose(result["ratio"], ref["median_s"] / jax_side["median_s"])
  assert math.isclose(result["ratio_with_compile"], ref["median_s"] / jax_side["wall_median_s"])
  assert result["paired"]["rounds"] == 1 and isinstance(result["meets_target"], bool)
