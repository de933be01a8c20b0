"""`eemo-jax grpo` end to end on the tiny recipe: learning a toy reward, metrics and samples, resume after SIGKILL,
sharded against unsharded, and the mistakes a user can make.

The toy reward is the share of a completion's tokens with an id below 128 (a quarter of the tiny
vocabulary): a random model scores about 0.25 with spread inside each group, so GRPO has a signal from the
first step, and the best policy scores 1.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax_compiles import compiles_logged
from kill_once import kill_once

from eemo_jax import cli, status
from eemo_jax.config import ConfigError, load_config
from eemo_jax.rl.run import RewardFunctionError, grpo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_GRPO = os.path.join(ROOT, "configs", "tiny_grpo.py")


def low_ids(parsed, truth, completions):
  """The toy reward: the share of the completion's tokens with an id below 128."""
  mask = completions.mask.astype(bool)
  return np.array([np.mean(t[m] < 128) if m.any() else 0.0 for t, m in zip(completions.tokens, mask)])


TOY = [("low_ids", 1.0, low_ids)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  from data_pipeline.builders import build
  from data_pipeline.tokenizer import build_offline_tokenizer
  root = tmp_path_factory.mktemp("grpo_assets")
  tokenizer_dir, data_dir = str(root / "tokenizer"), str(root / "data")
  build_offline_tokenizer(tokenizer_dir)
  report = build("synthetic", data_dir, config="eemo", num_train=48, num_test=8)
  return {"data.data_dir": data_dir, "data.dataset_config": report.config, "data.tokenizer_dir": tokenizer_dir}


def overrides(assets, run_dir, **extra) -> list[str]:
  fields = dict(assets)
  fields.update({"train.run_dir": str(run_dir), "train.steps": 4, "grpo.max_completion_length": 16,
                 "grpo.rewards": "()", "optimizer.learning_rate": 1e-2, "train.checkpoint_every": 2,
                 "grpo.sample_every": 2, "grpo.sample_rows": 3, "eval.batches": 0})
  fields.update({k.replace("__", "."): v for k, v in extra.items()})
  return [f"--config.{k}={v}" for k, v in fields.items()]


def rows(run_dir, offset: int = 0) -> dict[int, dict]:
  """The training rows of metrics.jsonl by step, from byte `offset` on."""
  with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
    f.seek(offset)
    return {r["step"]: r for r in map(json.loads, f.read().decode().splitlines()) if r["split"] == "train"}


def test_the_mean_reward_rises_on_a_learnable_toy_task(assets, tmp_path):
  config = load_config(TINY_GRPO, overrides(assets, tmp_path / "run", train__steps=30, grpo__sample_every=0))
  summary = grpo(config, reward_functions=TOY, progress_stream=io.StringIO())
  history = np.asarray(summary.reward_history)
  assert len(history) == 30
  assert history[:5].mean() < 0.4 and history[-5:].mean() > history[:5].mean() + 0.3, history.round(3)


def test_metrics_samples_and_the_config_rewards(assets, tmp_path):
  """Every step logs the rewards (per function and total), advantage spread, KL, clipping, entropy, completion
  lengths, truncation and the rollout/update time split; samples.jsonl holds readable completions."""
  run_dir = tmp_path / "run"
  config = load_config(TINY_GRPO, overrides(assets, run_dir, grpo__rewards="(('format', 1.0), ('eemo_task', 0.5))",
                                            grpo__beta=0.04, grpo__num_iterations=2, eval__batches=1))
  progress = io.StringIO()
  with status.printed(progress), compiles_logged() as compiled:  # as `eemo-jax grpo` prints them
    summary = grpo(config, reward_functions=TOY, progress_stream=progress)
  logged = rows(run_dir)
  assert sorted(logged) == [1, 2, 3, 4] and len(summary.reward_history) == 2  # two rollouts, two updates each
  first = logged[1]
  for key in ("reward", "reward_std", "advantage_std", "kl", "entropy", "completion_length", "completion_length_max",
              "truncation_rate", "completions_per_s", "rollout_s", "update_s", "loss", "grad_norm", "lr",
              "clip_ratio/region_mean", "rewards/format/mean", "rewards/eemo_task/mean", "rewards/low_ids/mean",
              "rewards/low_ids/std", "parse_failure/all", "frac_reward_zero_std", "skipped"):
    assert key in first and (isinstance(first[key], float) or first[key] is None), key
  assert "rollout_s" not in logged[2]  # the second iteration reuses the rollout
  assert 0 < first["completion_length"] <= 16 and first["parse_failure/all"] == 1.0  # a random model never parses
  assert first["kl"] == pytest.approx(0.0, abs=1e-6) and logged[2]["kl"] > 0  # beta: the policy moved off the start
  samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
  assert [s["step"] for s in samples] == [1, 1, 1, 3, 3, 3]
  assert set(samples[0]["rewards"]) == {"format", "eemo_task", "low_ids"} and samples[0]["id"].startswith("synthetic")
  assert isinstance(samples[0]["completion"], str) and "advantage" in samples[0]
  assert re.search(r"step 4/4 .*reward", progress.getvalue())
  # The held-out rewards before the first step and after the last, with the same sampling keys.
  with open(run_dir / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [0, 4] and [s for s, _ in summary.eval_history] == [0, 4]
  assert {"reward", "rewards/low_ids/mean", "rewards/format/mean", "parse_failure/all"} <= set(evals[0])
  assert "eval @ 0: held-out reward" in progress.getvalue()
  # A line before and after each compile, which the first call then reuses (the held-out prompts and the
  # rollout's have the same shapes): one compile of each.
  lines = progress.getvalue().splitlines()
  for name in ("GRPO rollout", "GRPO update"):
    assert lines.count(f"compiling {name}…") == 1, lines
    assert len([line for line in lines if re.fullmatch(rf"compiled {name} in \d+\.\d s", line)]) == 1, lines
  assert lines.index("compiling GRPO rollout…") < lines.index(next(x for x in lines if x.startswith("eval @ 0")))
  assert compiled.count("_rollout") == 1 and compiled.count("grpo_step") == 1, compiled


def _script(tmp_path, assets, run_dir) -> list[str]:
  """`grpo(...)` with the toy reward in a child process (a Python reward cannot be named on the CLI)."""
  path = tmp_path / "run_grpo.py"
  path.write_text(textwrap.dedent(f"""\
      import sys
      sys.path[:0] = [{os.path.dirname(__file__)!r}, {os.path.dirname(os.path.dirname(__file__))!r}]  # tests/rl, tests
      from test_grpo_run import TOY
      from eemo_jax.config import load_config
      from eemo_jax.rl.run import grpo
      grpo(load_config({TINY_GRPO!r}, sys.argv[1:]), reward_functions=TOY)
      """))
  return [sys.executable, str(path), *overrides(assets, run_dir, train__steps=8, train__checkpoint_every=2)]


def _env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if jax.config.jax_default_matmul_precision is not None:
    env["JAX_DEFAULT_MATMUL_PRECISION"] = str(jax.config.jax_default_matmul_precision)
  return env


def _complete_steps(run_dir) -> list[int]:
  from eemo_jax.train.checkpointing import RunCheckpoints
  checkpoints = RunCheckpoints(str(run_dir), save_every=1)
  try:
    return checkpoints.all_steps()
  finally:
    checkpoints.close()


def test_sigkill_and_resume_give_the_same_rewards_and_losses(assets, tmp_path):
  """An uninterrupted run, and one killed once checkpoint 2 or 4 is complete and run again: every step after
  the checkpoint has the same rewards, losses and gradient norms, bit for bit (rollout keys, data order,
  optimizer state and parameters all resume)."""
  reference = tmp_path / "reference"
  done = subprocess.run(_script(tmp_path, assets, reference), env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  run_dir, log_path = tmp_path / "run", tmp_path / "killed.log"
  kill_once(_script(tmp_path, assets, run_dir), log_path,
            lambda: (run_dir / "checkpoints").is_dir() and bool({2, 4} & set(_complete_steps(run_dir))), env=_env())
  complete = max(_complete_steps(run_dir))
  offset = os.path.getsize(run_dir / "metrics.jsonl")
  again = subprocess.run(_script(tmp_path, assets, run_dir), env=_env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  resumed, expected = rows(run_dir, offset), rows(reference)
  assert sorted(resumed) == list(range(complete + 1, 9)), (complete, sorted(resumed))
  for step, row in resumed.items():
    for key in ("reward", "rewards/low_ids/mean", "advantage_std", "loss", "grad_norm", "entropy", "completion_length"):
      assert row[key] == expected[step][key], (step, key, row[key], expected[step][key])


def test_sharded_and_unsharded_runs_agree(assets, tmp_path):
  """The same two steps on one device and on 8 (data 2 x fsdp 4): the same completions and rewards, and losses
  and gradient norms equal up to the reduction order."""
  one = load_config(TINY_GRPO, overrides(assets, tmp_path / "one", train__steps=2, mesh__fsdp=1, mesh__data=1,
                                         grpo__sample_every=0))
  eight = load_config(TINY_GRPO, overrides(assets, tmp_path / "eight", train__steps=2, mesh__fsdp=4, mesh__data=2,
                                           grpo__sample_every=0))
  grpo(one, reward_functions=TOY, progress_stream=io.StringIO())
  grpo(eight, reward_functions=TOY, progress_stream=io.StringIO())
  a, b = rows(tmp_path / "one"), rows(tmp_path / "eight")
  for step in (1, 2):
    for key in ("reward", "completion_length", "advantage_std"):
      assert a[step][key] == pytest.approx(b[step][key], abs=1e-6), (step, key)
    for key in ("loss", "grad_norm", "entropy"):
      assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.parametrize("extra, message", [
    (dict(grpo__num_generations=1), "grpo.num_generations is 1: a group needs at least 2"),
    (dict(train__global_batch_size=10), r"train.global_batch_size \(10\) counts the completions .* multiple of "
                                        r"grpo.num_generations \(4\)"),
    (dict(grpo__beta=0.04, lora__rank=4), "grpo.beta=0.04 with LoRA .* set trainable.adapters_only=true"),
    (dict(grpo__rewards="(('nope', 1.0),)"), "grpo.rewards: unknown reward 'nope'"),
    (dict(data__seq_len=64), r"every record is longer than data.seq_len=64 \(shortest: \d+ tokens\)"),
])
def test_bad_configs_exit_2_with_one_line(assets, tmp_path, capsys, extra, message):
  run_dir = tmp_path / "run"
  args = overrides(assets, run_dir, **extra)
  if "grpo__rewards" not in extra:
    args = [a for a in args if not a.startswith("--config.grpo.rewards=")]  # the config's own rewards
  assert cli.main(["grpo", "--config", TINY_GRPO, *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("eemo-jax grpo: ") and re.search(message, err[0]), err
  assert not run_dir.exists()


@pytest.mark.parametrize("bad, message", [
    (lambda parsed, truth, c: 1 / 0, "reward function 'bad' raised ZeroDivisionError"),
    (lambda parsed, truth, c: np.zeros(3), r"reward function 'bad' returned shape \(3,\); it must return one number "
                                           r"per completion, shape \(16,\)"),
])
def test_a_broken_reward_function_is_named(assets, tmp_path, bad, message):
  config = load_config(TINY_GRPO, overrides(assets, tmp_path / "run", train__steps=1))
  with pytest.raises(RewardFunctionError, match=message):
    grpo(config, reward_functions=[("bad", 1.0, bad)], progress_stream=io.StringIO())


def test_no_reward_at_all_is_refused(assets, tmp_path):
  with pytest.raises(ConfigError, match="no rewards"):
    grpo(load_config(TINY_GRPO, overrides(assets, tmp_path / "run")), progress_stream=io.StringIO())
