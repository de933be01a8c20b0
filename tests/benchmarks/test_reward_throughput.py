"""The reward benchmark runs end to end on a small batch: its three contestants (parse once + jitted rewards,
the authors' per-reward loops, a lean loop) must give the same reward matrix before anything is timed."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import reward_throughput as bench  # noqa: E402


def test_reward_benchmark_runs_and_reports(tmp_path):
  out = tmp_path / "rewards.json"
  assert bench.main(["--rows", "224", "--group", "4", "--repeats", "1", "--jit-repeats", "2", "--jit-seconds", "0",
                     "--json", str(out)]) == 0  # main asserts that the three contestants agree
  result = json.loads(out.read_text())
  assert result["rows"] == 224 and set(result["tasks"]) == set(bench.TASK_CYCLE)
  assert result["tasks"]["dominant_emotion"] == 32  # 56 prompts, the 7 task types in turn, 4 completions each
  for key in ("parse_us_per_completion", "jitted_ms", "ratio_vs_authors_loop", "ratio_vs_lean_loop"):
    assert result[key] > 0
  assert set(result["ok"]) == set(bench.TARGETS)
