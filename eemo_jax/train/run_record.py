"""What a run directory records about the config that made it, and the check that a resume continues that run.

`<run_dir>/config.json` is the config the run's checkpoints were made with. It is written only once a
run's inputs have been checked (so a failed start cannot replace it), and a resume is compared with it
first: a change that makes the resumed run a different computation (model, head, LoRA, what trains,
optimizer and schedule, losses, batch shape and data, seed) is refused, naming the keys, unless
`train.allow_config_changes` is set. Every change, accepted or operational (paths, mesh, logging,
checkpoint cadence), is appended to `<run_dir>/config_changes.jsonl` with the step it took effect at, so
the record of the run stays complete.
"""

from __future__ import annotations

import dataclasses
import json
import time

from eemo_jax import paths
from eemo_jax.config import ConfigError

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"

# Keys a resume may change freely: where things are, how the run is laid out on devices, what it logs
# and how often it saves. Every other key is part of the computation and guarded.
OPERATIONAL = (
    "model.hf_dir", "model.init_from", "model.attention", "model.remat",
    "data.data_dir", "data.tokenizer_dir", "data.image_root", "data.worker_count", "data.worker_buffer_size",
    "data.read_threads", "data.prefetch", "data.strict", "data.max_unusable_at_start",
    "data.max_unusable_in_a_row",
    "eval.", "mesh.", "aot.",
    "train.run_dir", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpoints", "train.export_dir", "train.export_overwrite", "train.peak_flops",
    "train.allow_config_changes",
)


def _flat(tree, prefix: str = "") -> dict[str, object]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _operational(key: str) -> bool:
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in OPERATIONAL)


def config_as_json(config) -> dict:
  """The config as the JSON a run directory stores (tuples become lists), so both sides compare alike."""
  return json.loads(config.to_json_best_effort())


def config_changes(recorded: dict, current: dict) -> dict[str, tuple[object, object]]:
  """`key -> (recorded, current)` for every dotted key whose value differs (absent: None)."""
  old, new = _flat(recorded), _flat(current)
  return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def read_recorded(run_dir: str) -> dict | None:
  path = paths.join(run_dir, CONFIG_FILE)
  if not paths.isfile(path):
    return None
  try:
    recorded = json.loads(paths.read_text(path))
  except (OSError, ValueError) as error:
    raise ConfigError(f"{path} cannot be read ({error}); it records the config of the run's checkpoints. Restore "
                      "it, or delete it to resume without the check") from None
  if not isinstance(recorded, dict):
    raise ConfigError(f"{path} must hold a JSON object (the run's config); delete it to resume without the check")
  return recorded


@dataclasses.dataclass(frozen=True)
class ConfigCheck:
  """How the current config differs from the recorded one: `key -> (recorded, current)`."""

  changes: dict[str, tuple[object, object]]
  guarded: tuple[str, ...]  # the keys among them that change the computation

  def message(self) -> str | None:
    if not self.guarded:
      return None
    return (f"continuing with changed {', '.join(self.guarded)} (train.allow_config_changes; recorded in "
            f"{CHANGES_FILE})")


def check_config(config, run_dir: str, *, resuming_from: int | None) -> ConfigCheck:
  """Compares a resume with the recorded config; raises ConfigError for guarded changes not allowed."""
  recorded = read_recorded(run_dir) if resuming_from is not None else None
  changes = config_changes(recorded, config_as_json(config)) if recorded is not None else {}
  # A field the record lacks was added to the project after the run started; new fields default to the
  # behaviour the code had before them, so it is logged, not refused.
  added = set(_flat(config_as_json(config))) - set(_flat(recorded)) if recorded is not None else set()
  guarded = tuple(k for k in changes if not _operational(k) and k not in added)
  if guarded and not config.train.allow_config_changes:
    listed = ", ".join(f"{k} ({_show(changes[k][0])} -> {_show(changes[k][1])})" for k in guarded)
    raise ConfigError(f"resuming {run_dir} from checkpoint {resuming_from} with a config that changes what the run "
                      f"computes: {listed}. Use the values it was started with (recorded in "
                      f"{paths.join(run_dir, CONFIG_FILE)}), a new train.run_dir for a new run, or "
                      f"--config.train.allow_config_changes=true to continue with the changes (they are recorded in "
                      f"{CHANGES_FILE})")
  return ConfigCheck(changes, guarded)


def write_config(config, run_dir: str, check: ConfigCheck, *, step: int | None) -> None:
  """Writes `config.json` (atomically) and appends the changes made at `step` to the change log."""
  paths.makedirs(run_dir)
  if check.changes:
    row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "changes": {k: {"from": a, "to": b, "guarded": k in check.guarded} for k, (a, b) in check.changes.items()}}
    changes = paths.AppendedFile(paths.join(run_dir, CHANGES_FILE))
    changes.write(json.dumps(row) + "\n")
    changes.close()
  paths.replace_file(paths.join(run_dir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def write_json(path: str, value) -> None:
  """A small JSON record of the run, replaced atomically."""
  paths.replace_file(path, json.dumps(value, indent=2))


def _show(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."

