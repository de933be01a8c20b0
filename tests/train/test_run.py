"""The SFT run end to end on the tiny recipe: resume after SIGKILL and on another mesh, NaN stop, run artefacts.

A resumed run must be the run that was interrupted: same batches, same dropout keys, same optimizer
state, so its per-step losses are the uninterrupted run's, bit for bit on the same mesh. Everything
runs on the synthetic data set (64 train / 16 test images) and 8 fake CPU devices, a few steps each.
"""

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax_compiles import compiles_logged
from kill_once import kill_once
from run_assets import Assets, build_assets

from eemo_jax import cli, status
from eemo_jax.config import ConfigError, load_config
from eemo_jax.parallel.sharding import make_mesh
from eemo_jax.train.checkpointing import RunCheckpoints
from eemo_jax.train.run import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_demo.py")
STEPS = 12  # checkpoints every 2 steps (the last 3 kept), eval every 4: the killed run is still busy after 2 or 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
  return build_assets(str(tmp_path_factory.mktemp("assets")), num_train=64, num_test=16)


def _overrides(assets: Assets, run_dir, **extra) -> list[str]:
  """The tiny recipe, shortened: `steps` steps of 8 rows, a checkpoint every 2, one eval batch, FSDP over 8."""
  fields = {"train.run_dir": str(run_dir), "train.steps": STEPS, "train.checkpoint_every": 2,
            "train.global_batch_size": 8, "train.log_every": 1, "data.data_dir": assets.data_dir,
            "data.dataset_config": assets.dataset_config, "data.tokenizer_dir": assets.tokenizer_dir,
            "eval.batches": 1, "mesh.fsdp": 8}
  fields.update({k.replace("__", "."): v for k, v in extra.items()})
  return [f"--config.{k}={v}" for k, v in fields.items()]


def _rows(run_dir, split: str = "train", *, offset: int = 0) -> list[dict]:
  """metrics.jsonl rows of a split, from byte `offset` on (a resumed run appends to the same file)."""
  with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
    f.seek(offset)
    lines = f.read().decode().splitlines()
  return [row for row in map(json.loads, lines) if row["split"] == split]


def _by_step(rows: list[dict]) -> dict[int, dict]:
  out = {}
  for row in rows:
    assert row["step"] not in out, f"step {row['step']} logged twice in one run: {rows}"
    out[row["step"]] = row
  return out


def _steps_on_disk(run_dir) -> list[int]:
  """Complete checkpoints, as a new process would see them (Orbax renames a step folder when it is done)."""
  checkpoints = RunCheckpoints(str(run_dir), save_every=1)
  try:
    return checkpoints.all_steps()
  finally:
    checkpoints.close()


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
  """One uninterrupted in-process run with mid-run eval and the HF export: the other runs compare with it."""
  root = tmp_path_factory.mktemp("reference")
  run_dir, export_dir = root / "run", root / "export"
  config = load_config(TINY, _overrides(assets, run_dir, train__export_dir=export_dir, eval__every=4))
  progress = io.StringIO()
  with status.printed(progress), compiles_logged() as compiled:  # as `eemo-jax train` prints them
    summary = train(config, progress_stream=progress)
  return run_dir, export_dir, summary, progress.getvalue(), compiled


# --------------------------------------------------------------------------------------------------
# What a run writes
# --------------------------------------------------------------------------------------------------


def test_run_writes_config_metrics_tensorboard_checkpoints_and_export(reference):
  """What a user reads after a run: the resolved config, one JSONL row per step and per eval, the same
  scalars in TensorBoard, the newest checkpoints, and an HF folder transformers loads cleanly + the head."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  run_dir, export_dir, summary, progress, _ = reference
  assert summary.steps == STEPS and summary.resumed_from is None and summary.export_dir == str(export_dir)

  saved = json.loads((run_dir / "config.json").read_text())
  assert saved["train"]["steps"] == STEPS and saved["train"]["run_dir"] == str(run_dir)
  assert saved["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and saved["head"]["kind"] == "pooled"

  train_rows, eval_rows = _by_step(_rows(run_dir)), _by_step(_rows(run_dir, "eval"))
  assert sorted(train_rows) == list(range(1, STEPS + 1))
  for row in train_rows.values():
    for key in ("loss", "lm_loss", "ces_loss", "grad_norm", "lr", "token_accuracy", "tokens_per_s"):
      assert math.isfinite(row[key]), (key, row)
  assert sorted(eval_rows) == [4, 8, STEPS]  # eval.every=4; the last one is the final evaluation
  for row in eval_rows.values():
    assert {"loss", "lm_loss", "ces_loss", "ces_accuracy", "token_accuracy"} <= set(row)
  assert summary.final_metrics["loss"] == train_rows[STEPS]["loss"]
  assert summary.eval_metrics == {k: v for k, v in eval_rows[STEPS].items() if k not in ("step", "split")}
  assert "eval @ 4: " in progress and f"checkpoint {STEPS} -> " in progress

  events = EventAccumulator(str(run_dir / "tensorboard"))
  events.Reload()
  train_loss = events.Scalars("train/loss")
  assert [e.step for e in train_loss] == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([e.value for e in train_loss],
                                np.float32([train_rows[s]["loss"] for s in range(1, STEPS + 1)]))
  assert [e.step for e in events.Scalars("eval/ces_accuracy")] == [4, 8, STEPS]

  assert _steps_on_disk(run_dir) == [8, 10, 12]  # train.keep_checkpoints=3

  import transformers
  from eemo_jax.hf.heads_io import load_head
  model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      str(export_dir), attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert model.config.text_config.num_hidden_layers == 2
  assert (export_dir / "emotion_head.safetensors").is_file() and (export_dir / "tokenizer.json").is_file()
  head = load_head(str(export_dir))
  assert head.config.kind == "pooled" and head.config.classifier_hidden == 32
  assert head.config.num_hidden_layers_mean == 3


def test_each_compile_is_announced_and_happens_once(reference):
  """A line before and after each compile (minutes on a real model), before the first step; the first step's
  call runs the executable compiled for those lines instead of compiling again. The step lines between the
  first and the last show an eta."""
  *_, progress, compiled = reference
  lines = progress.splitlines()
  steps = [i for i, line in enumerate(lines) if re.match(r"step \d+/", line)]
  for name in ("train step", "eval step"):
    starts = [i for i, line in enumerate(lines) if line == f"compiling {name}…"]
    ends = [i for i, line in enumerate(lines) if re.fullmatch(rf"compiled {name} in \d+\.\d s", line)]
    assert len(starts) == len(ends) == 1 and starts[0] < ends[0] < steps[0], lines
  assert compiled.count("train_step") == 1 and compiled.count("eval_step") == 1, compiled
  assert all(re.match(r"step \d+/\d+  eta \d", lines[i]) for i in steps[1:-1]), lines


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------


def _command(assets, run_dir) -> list[str]:
  """`eemo-jax train` as a user runs it: the reference run's config, without the export (`run_dir` may be
  relative to the working directory the command starts in)."""
  return [sys.executable, "-m", "eemo_jax.cli", "train", "--config", TINY,
          *_overrides(assets, run_dir, eval__every=4)]


def _env() -> dict[str, str]:
  """This process's environment (8 fake CPU devices) and matmul precision, so a child computes the same floats."""
  precision = jax.config.jax_default_matmul_precision
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if precision is not None:
    env["JAX_DEFAULT_MATMUL_PRECISION"] = str(precision)
  return env


@pytest.mark.slow  # tests/test_recipes_end_to_end.py: each SFT recipe SIGKILLed, resumed by the CLI, run dir relative
def test_sigkilled_run_resumes_to_exactly_the_uninterrupted_losses(assets, reference, tmp_path):
  """The CLI run is SIGKILLed once checkpoint 2 or 4 is complete; the same command again resumes from the
  last complete checkpoint, and every step after it (and every eval) equals the uninterrupted run's.

  As the shipped recipes do, the run directory is relative (`runs/x`), and the command starts in a
  directory other than the repository's: Orbax accepts only absolute paths."""
  ref_dir = reference[0]
  run_dir, log_path = tmp_path / "runs" / "x", tmp_path / "killed.log"
  kill_once(_command(assets, "runs/x"), log_path,
            lambda: (run_dir / "checkpoints").is_dir() and bool({2, 4} & set(_steps_on_disk(run_dir))),
            cwd=tmp_path, env=_env())

  before_kill = _by_step(_rows(run_dir))
  complete = _steps_on_disk(run_dir)
  assert max(before_kill) < STEPS and complete and max(complete) < STEPS, (before_kill.keys(), complete)

  offset = os.path.getsize(run_dir / "metrics.jsonl")
  again = subprocess.run(_command(assets, "runs/x"), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=400)
  assert again.returncode == 0, again.stdout + again.stderr
  resumed = _by_step(_rows(run_dir, offset=offset))
  start = min(resumed) - 1
  assert start == max(complete) and start >= 2
  assert f"resumed {run_dir} at step {start} (checkpoint {start})" in again.stderr
  assert sorted(resumed) == list(range(start + 1, STEPS + 1))

  uninterrupted = _by_step(_rows(ref_dir))
  for step, row in before_kill.items():  # the same computation before the kill (same process setup)
    assert row["loss"] == uninterrupted[step]["loss"], step
  for step, row in resumed.items():
    for key in ("loss", "lm_loss", "ces_loss", "grad_norm", "lr", "token_accuracy", "ces_accuracy"):
      assert row[key] == uninterrupted[step][key], (step, key, row[key], uninterrupted[step][key])
  resumed_eval, reference_eval = _by_step(_rows(run_dir, "eval", offset=offset)), _by_step(_rows(ref_dir, "eval"))
  assert sorted(resumed_eval) == [s for s in sorted(reference_eval) if s > start]
  for step, row in resumed_eval.items():
    assert row == reference_eval[step], step


def test_resume_on_another_mesh_continues_the_run(assets, reference, tmp_path):
  """Saved on FSDP over 8 devices, resumed on data 2 x fsdp 2 x tensor 2: the state lands in the new
  shardings and the run goes on with the same batches; only the reduction order differs."""
  ref_dir = reference[0]
  assert dict(make_mesh({"data": 1, "fsdp": -1, "tensor": 1}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  run_dir = tmp_path / "run"
  shutil.copytree(ref_dir / "checkpoints" / "8", run_dir / "checkpoints" / "8")  # as if it had stopped after 8
  config = load_config(TINY, _overrides(assets, run_dir, eval__batches=0, mesh__data=2, mesh__fsdp=2,
                                        mesh__tensor=2))
  progress = io.StringIO()
  summary = train(config, progress_stream=progress)
  assert summary.resumed_from == 8 and f"resumed {run_dir} at step 8 (checkpoint 8)" in progress.getvalue()
  assert _steps_on_disk(run_dir) == [8, 10, 12]

  resumed, expected = _by_step(_rows(run_dir)), _by_step(_rows(ref_dir))
  assert sorted(resumed) == list(range(9, STEPS + 1))
  for step, row in resumed.items():
    for key in ("loss", "lm_loss", "ces_loss", "grad_norm"):
      np.testing.assert_allclose(row[key], expected[step][key], rtol=0, atol=1e-5, err_msg=f"{key} at step {step}")
    assert row["lr"] == expected[step]["lr"] and row["token_accuracy"] == expected[step]["token_accuracy"]


# --------------------------------------------------------------------------------------------------
# A diverging run
# --------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_and_names_a_checkpoint_it_can_resume_from(assets, reference, tmp_path, capsys):
  """The reference run, continued from its step-8 checkpoint with lr 1e30 and a checkpoint every step:
  step 9's loss comes from good weights, its update blows them up, and step 10's loss is not finite.

  `eemo-jax train` exits 3 (only NonFiniteLossError does) naming the step and the last good checkpoint,
  and nothing of step 10 is saved. The loss of step k is a function of the state saved as checkpoint
  k-1 and batch k alone (the learning rate enters only the update after it), so resuming from k-1 -
  what the same command does with the latest checkpoint - replays the same non-finite loss whatever
  the new learning rate: the checkpoint named good, and left as the latest, must be older than k-1."""
  run_dir = tmp_path / "run"
  shutil.copytree(reference[0] / "checkpoints" / "8", run_dir / "checkpoints" / "8")
  overrides = _overrides(assets, run_dir, optimizer__learning_rate=1e30, train__checkpoint_every=1, eval__batches=0)
  assert cli.main(["train", "--config", TINY, *overrides]) == 3
  err = capsys.readouterr().err
  found = re.search(r"^eemo-jax train: loss is (nan|-?inf) at step 10 .*the last good checkpoint is step (\d+)\.",
                    err, re.MULTILINE)
  assert found, err
  rows = _rows(run_dir)
  assert [r["step"] for r in rows] == [9] and math.isfinite(rows[0]["loss"])
  steps = _steps_on_disk(run_dir)
  assert 10 not in steps and not [name for name in os.listdir(run_dir / "checkpoints") if name.startswith("10")]
  good = int(found.group(2))
  assert max(steps) == good, (steps, good)  # what a plain re-run resumes from
  assert good < 10 - 1, f"checkpoint {good} holds the weights whose loss at step 10 was not finite"


# --------------------------------------------------------------------------------------------------
# Nothing lost (issue: relative run dirs, failed saves, damaged checkpoints, the run's config record)
# --------------------------------------------------------------------------------------------------


def _resumable_copy(reference_dir, run_dir, steps=(8, 10), with_config=True):
  """The reference run as if it had stopped after its last step in `steps` (its config.json too)."""
  for step in steps:
    shutil.copytree(reference_dir / "checkpoints" / str(step), run_dir / "checkpoints" / str(step))
  if with_config:
    shutil.copy(reference_dir / "config.json", run_dir / "config.json")


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(assets, reference, tmp_path):
  """Checkpoint 10 lost its data files (a preemption during the save): the run warns once, moves it aside
  and resumes from 8, and steps 9-12 equal the uninterrupted run's bit for bit. The same run also
  continues with a deliberate guarded change (train.epochs, unused with train.steps) that is recorded."""
  ref_dir = reference[0]
  run_dir = tmp_path / "run"
  _resumable_copy(ref_dir, run_dir)
  for chunk in (run_dir / "checkpoints" / "10" / "state").rglob("*"):
    if chunk.parent.name == "d":
      chunk.unlink()
  original = (run_dir / "config.json").read_text()
  config = load_config(TINY, _overrides(assets, run_dir, eval__batches=0, train__epochs=2.0,
                                        train__allow_config_changes=True))
  progress = io.StringIO()
  summary = train(config, progress_stream=progress)
  text = progress.getvalue()
  assert summary.resumed_from == 8
  warning = re.search(r"warning: checkpoint 10 is damaged \(.+\); moved to (\S+); resuming from checkpoint 8", text)
  assert warning, text
  assert os.path.isdir(warning.group(1)) and os.path.dirname(warning.group(1)) == str(run_dir / "damaged_checkpoints")
  assert "continuing with changed train.allow_config_changes, train.epochs" not in text
  assert "continuing with changed train.epochs (train.allow_config_changes" in text

  resumed, expected = _by_step(_rows(run_dir)), _by_step(_rows(ref_dir))
  assert sorted(resumed) == list(range(9, STEPS + 1))
  for step, row in resumed.items():
    for key in ("loss", "lm_loss", "ces_loss", "grad_norm", "lr", "token_accuracy", "ces_accuracy"):
      assert row[key] == expected[step][key], (step, key)

  changes = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
  assert len(changes) == 1 and changes[0]["step"] == 8
  assert changes[0]["changes"]["train.epochs"] == {"from": json.loads(original)["train"]["epochs"], "to": 2.0,
                                                   "guarded": True}
  assert changes[0]["changes"]["eval.batches"]["guarded"] is False
  assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 2.0


def test_a_resume_that_changes_the_run_is_refused_and_the_record_kept(assets, reference, tmp_path, capsys):
  """A changed learning rate and batch size (and a moved data dir, which is fine) on resume: exit 2 naming
  the guarded keys, the run's config.json untouched and nothing else written."""
  run_dir = tmp_path / "run"
  _resumable_copy(reference[0], run_dir)
  before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
  moved_data = tmp_path / "data"
  shutil.copytree(assets.data_dir, moved_data)
  overrides = _overrides(assets, run_dir, optimizer__learning_rate=1e-3, train__global_batch_size=16,
                         data__data_dir=moved_data)
  assert cli.main(["train", "--config", TINY, *overrides]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"eemo-jax train: resuming {run_dir} from checkpoint 10 ")
  assert "optimizer.learning_rate (0.002 -> 0.001)" in err and "train.global_batch_size (8 -> 16)" in err
  assert "data.data_dir" not in err and "--config.train.allow_config_changes=true" in err
  after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
  assert after == before


def test_bad_inputs_exit_2_before_anything_is_written(assets, tmp_path, capsys):
  """A missing tokenizer folder, HF folder or data dir, or an export folder holding someone else's files:
  one line naming the path and what to do, exit 2, and the run directory is never created."""
  run_dir = tmp_path / "run"
  foreign_export = tmp_path / "export"
  foreign_export.mkdir()
  (foreign_export / "model.safetensors").write_bytes(b"precious")
  cases = {
      "data__tokenizer_dir": (tmp_path / "no-tokenizer", "the tokenizer folder"),
      "model__hf_dir": (tmp_path / "no-model", "model.hf_dir"),
      "data__data_dir": (tmp_path / "no-data", "no-data"),
      "train__export_dir": (foreign_export, "train.export_dir"),
  }
  for key, (value, expected) in cases.items():
    assert cli.main(["train", "--config", TINY, *_overrides(assets, run_dir, **{key: value})]) == 2, key
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eemo-jax train: ") and expected in err, (key, err)
    assert str(value) in err, (key, err)
    assert not run_dir.exists(), key
  assert (foreign_export / "model.safetensors").read_bytes() == b"precious"


def test_a_failed_checkpoint_save_stops_the_run_at_once(assets, tmp_path, capsys, monkeypatch):
  """The background save of checkpoint 2 fails (disk full): the run stops with one line and exit 1 instead
  of training on without checkpoints, and nothing claims checkpoint 2 was written."""
  from orbax.checkpoint._src.path import atomicity
  real_rename = atomicity.async_path.rename

  async def fail_step_2(source, target, *args, **kwargs):
    if os.path.basename(str(target)) == "2":
      raise OSError(28, "No space left on device")
    return await real_rename(source, target, *args, **kwargs)

  monkeypatch.setattr(atomicity.async_path, "rename", fail_step_2)
  run_dir = tmp_path / "run"
  overrides = _overrides(assets, run_dir, eval__batches=0, train__checkpoint_every=1)
  assert cli.main(["train", "--config", TINY, *overrides]) == 1
  captured = capsys.readouterr()
  lines = [line for line in captured.err.splitlines() if line.startswith("eemo-jax train: ")]
  assert len(lines) == 1 and lines[0].startswith("eemo-jax train: checkpoint 2 could not be written to "), lines
  assert "No space left on device" in lines[0] and "the last complete checkpoint is step 1" in lines[0]
  assert "checkpoint 2 -> " not in captured.err + captured.out
  assert max(r["step"] for r in _rows(run_dir)) <= 3  # stopped at once: the failure shows within a step or two
  assert _steps_on_disk(run_dir) == [1]


def test_skipped_records_are_counted_in_the_metrics_and_the_progress_line(assets, tmp_path):
  """Two undecodable images among the records: training goes on, and how many were skipped, and why, is in
  every metrics.jsonl row and on the progress line (not only in warnings a user may never see)."""
  from data_pipeline.builders import load_records
  built = load_records("synthetic", assets.data_dir, "train", config=assets.dataset_config)
  records = [built[i] for i in range(len(built))]
  source = records[:3] + [{**records[0], "id": "broken-1", "image": b"GIF89a?"}] + records[3:9] + \
      [{**records[1], "id": "broken-2", "image": b"\x89PNG\r\n"}] + records[9:]
  run_dir = tmp_path / "run"
  config = load_config(TINY, _overrides(assets, run_dir, train__steps=2, eval__batches=0, data__shuffle=False))
  progress = io.StringIO()
  train(config, train_source=source, progress_stream=progress)
  rows = _by_step(_rows(run_dir))
  assert rows[2]["skipped"] == 2 and rows[2]["skipped_corrupt_image"] == 2
  assert rows[1]["skipped"] == 1  # the first batch of 8 read past broken-1 only
  for reason in ("missing_file", "image_too_large", "invalid_record", "overlong", "images_over_budget"):
    assert rows[2][f"skipped_{reason}"] == 0
  assert re.search(r"step 2/2 .* skipped 2", progress.getvalue()), progress.getvalue()

  # data.strict: the first bad record stops the run before anything is written into its directory.
  from data_pipeline.errors import CorruptImageError
  strict_dir = tmp_path / "strict"
  strict = load_config(TINY, _overrides(assets, strict_dir, train__steps=2, eval__batches=0, data__shuffle=False,
                                        data__strict=True))
  with pytest.raises(CorruptImageError, match="record 'broken-1', field 'image'"):
    train(strict, train_source=source, progress_stream=io.StringIO())
  assert not strict_dir.exists()


def test_a_field_added_to_the_project_after_a_run_started_does_not_block_its_resume(tmp_path):
  """A run recorded before `optimizer.schedule` existed resumes: the new field's default is the old behaviour.
  A field the record has and the config changes is still refused."""
  from eemo_jax.train import run_record
  config = load_config(TINY)
  recorded = run_record.config_as_json(config)
  del recorded["optimizer"]["schedule"]
  (tmp_path / run_record.CONFIG_FILE).write_text(json.dumps(recorded))
  check = run_record.check_config(config, str(tmp_path), resuming_from=3)
  assert check.changes == {"optimizer.schedule": (None, "cosine")} and check.guarded == ()
  changed = load_config(TINY, ["--config.optimizer.learning_rate=0.5"])
  with pytest.raises(ConfigError, match="optimizer.learning_rate"):
    run_record.check_config(changed, str(tmp_path), resuming_from=3)
