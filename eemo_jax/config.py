"""Experiment configs: ml_collections `get_config(arg)` files, locked, with `--config.key=value` overrides.

    cfg = load_config("configs/tiny_demo.py")                  # or "configs/x.py:arg" for get_config(arg)
    cfg = load_config("configs/tiny_demo.py", ["--config.optimizer.learning_rate=3e-4", "--config.mesh.fsdp=8"])

The config is locked after `get_config` returns, so a typo in a file or an override fails, naming
the closest valid keys instead of silently adding a field. Override values are parsed by the type of
the field they replace (bool, int, float, str, tuples/lists as Python literals).

`--config.shrink=tiny` cuts a recipe's sizes to what a CPU runs in a minute (`shrink`), before the other overrides.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
import sys
from collections.abc import Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file or override the user must fix; the message says how."""


def add_config_argument(parser) -> None:
  """`--config FILE[:ARG]` and the override help, for the commands that run a config (train, aot)."""
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="an experiment config file in configs/ (get_config(ARG) when :ARG is given)")
  parser.epilog = "Override any config field with --config.section.key=value (e.g. --config.train.run_dir=runs/x)."


def config_from_args(args, command: str) -> ml_collections.ConfigDict | None:
  """The command's config, or None after printing what the user must fix (the command exits 2)."""
  try:
    return load_config(args.config, args.overrides)
  except ConfigError as error:
    print(f"eemo-jax {command}: {error}", file=sys.stderr)
    return None


def load_module(path: str):
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found; configs live in configs/ (e.g. configs/tiny_demo.py)")
  name = "eemo_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg=None) function")
  return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`spec` is `path` or `path:arg`; `overrides` are `--config.a.b=value` (or `a.b=value`) strings.

  A `shrink` (from the file or an override) applies before the other overrides, wherever it stands among
  them, so an override of a field it sets still wins."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except (AttributeError, KeyError) as error:  # a locked base config refuses a misspelled field
    raise ConfigError(f"{path}: {error.args[0] if error.args else error}") from error
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict, got {type(config).__name__}")
  config.lock()
  shrinks = [item for item in overrides if _override_key(item) == "shrink"]
  for item in shrinks:
    apply_override(config, item)
  if config.get("shrink"):
    shrink(config, config.shrink)
  for item in overrides:
    if item not in shrinks:
      apply_override(config, item)
  return config


SHRINKS = ("tiny",)
# --config.shrink=tiny
TINY_ROWS = 8  # rows of a micro-batch: they still shard over up to 8 devices (a v5e-8 host, 8 fake CPU devices)
TINY_SEQ_LEN = 256  # SFT: the synthetic examples take 90-200 tokens, B-A-S answers ~370 (cut, as overlong="truncate")
TINY_PROMPT_LEN = 448  # GRPO's prompt bucket: the synthetic EEmo prompts take 230-400 tokens, and are never cut
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 56 * 56, 112 * 112  # 4-16 image tokens an image
TINY_COMPLETION = 16  # GRPO completion tokens: room for a short <answer>...</answer>
TINY_STEPS, TINY_CHECKPOINT_EVERY = 4, 2  # a checkpoint, and steps after it to resume


def shrink(config: ml_collections.ConfigDict, name: str) -> None:
  """`--config.shrink=tiny`: the recipe with its sizes cut to what a CPU runs in a minute, all else as shipped.

  So the shipped recipe file is what runs, not a copy of it that could drift: the tests run every recipe this
  way, with `model.hf_dir` a tiny HF folder (which replaces the architecture) and the synthetic data set.
  It changes only these fields (a size never grows):
    data.seq_len              at most 256; GRPO's prompt bucket at most 448 (a prompt is never cut, and the
                              synthetic ones take up to ~400 tokens)
    data.min_pixels           at most 56 x 56;  data.max_pixels at most 112 x 112
    train.global_batch_size   at most 8 rows a micro-batch x optimizer.accum_steps (GRPO: lcm(8,
                              grpo.num_generations) completions, whole groups), so every micro-batch still runs
    train.steps               4 (in place of train.epochs), train.checkpoint_every 2, train.log_every 1: a
                              checkpoint, steps after it to resume, and every step's row in metrics.jsonl
    eval.batches              at most 1 (the held-out evaluation still runs)
    grpo.max_completion_length  at most 16; grpo.sample_every 2 (completion samples within 4 steps)
  It never changes the model (dtype, remat, attention, preset), the head, LoRA, what trains, the losses, the
  optimizer (accumulation, learning rate, schedule, warmup ratio, weight decay, clipping), the GRPO algorithm
  (group size, loss, KL, rewards, sampling), the mesh, or the data set and task.
  """
  if name not in SHRINKS:
    raise ConfigError(f"shrink {name!r} is unknown; use one of {', '.join(SHRINKS)}, or leave it empty")
  d, t, accum = config.data, config.train, int(config.optimizer.accum_steps)
  d.seq_len = min(int(d.seq_len), TINY_PROMPT_LEN if d.prompt_only else TINY_SEQ_LEN)
  d.min_pixels = min(int(d.min_pixels), TINY_MIN_PIXELS)
  d.max_pixels = min(int(d.max_pixels), TINY_MAX_PIXELS)
  rows = TINY_ROWS
  if d.prompt_only:  # GRPO: the batch counts completions, and a micro-batch holds whole groups
    rows = math.lcm(TINY_ROWS, int(config.grpo.num_generations))
    config.grpo.max_completion_length = min(int(config.grpo.max_completion_length), TINY_COMPLETION)
    config.grpo.sample_every = 2
  t.global_batch_size = min(int(t.global_batch_size), rows * accum)
  t.steps, t.checkpoint_every, t.log_every = TINY_STEPS, TINY_CHECKPOINT_EVERY, 1
  config.eval.batches = min(int(config.eval.batches), 1)


def _override_key(item: str) -> str:
  text = item[len("--config."):] if item.startswith("--config.") else item
  return text.partition("=")[0]


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  text = item[len("--config."):] if item.startswith("--config.") else item
  key, sep, raw = text.partition("=")
  if not sep or not key:
    raise ConfigError(f"override {item!r} must look like --config.section.key=value")
  parts = key.split(".")
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      here = ".".join(parts[:depth]) or "config"
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, valid, n=3)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(f"unknown config key {key!r}: {here} has no field {part!r}.{hint} "
                        f"Valid keys of {here}: {', '.join(valid)}")
    if depth < len(parts) - 1:
      node = node[part]
  last = parts[-1]
  node[last] = parse_value(raw, node[last], key)


def parse_value(raw: str, current, key: str):
  """The override text as the type of the value it replaces."""
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"{key} is a section; override its fields (e.g. --config.{key}.{next(iter(current.keys()))}=...)")
  if isinstance(current, bool):
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"{key} is a bool; use true or false, not {raw!r}")
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      raise ConfigError(f"{key} is an int; {raw!r} is not one") from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise ConfigError(f"{key} is a float; {raw!r} is not one") from None
  if isinstance(current, str):
    return raw
  if isinstance(current, (tuple, list)) or current is None:
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      if current is None:
        return raw
      raise ConfigError(f"{key} is a {type(current).__name__}; give a Python literal such as "
                        f"\"('a', 'b')\", not {raw!r}") from None
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(current, tuple) and isinstance(value, str):
      value = (value,)
    return value
  raise ConfigError(f"{key} holds a {type(current).__name__}, which cannot be overridden from the command line")
