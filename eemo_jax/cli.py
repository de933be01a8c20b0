"""The `eemo-jax` command. Each subcommand lives in its own module exposing
`add_arguments(parser, name)` and `run(args) -> int`. Command modules import jax and the model
inside `run`, so building the parser (and `eemo-jax --help`) stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from data_pipeline.data_packages import MissingDataPackagesError

COMMANDS = {
    "demo": ("eemo_jax.commands.demo", "the main job on the embedded default, end to end"),
    "import-hf": ("eemo_jax.hf.convert", "HF folder -> Orbax checkpoint"),
    "export-hf": ("eemo_jax.hf.convert", "Orbax checkpoint -> HF folder (loads with transformers)"),
    "parity": ("eemo_jax.commands.parity", "per-component differences against transformers"),
    "train": ("eemo_jax.commands.train", "run or resume an SFT run from a config (the same command on every host)"),
    "grpo": ("eemo_jax.commands.grpo", "run or resume a GRPO run from a config (the same command on every host)"),
    "eval": ("eemo_jax.commands.eval", "score a benchmark predictions file, or a model over a built split; report"),
    "predict": ("eemo_jax.commands.predict", "a model's emotion, DES, attribution or task answer for images"),
    "aot": ("eemo_jax.commands.aot", "compile a config's train step for a TPU topology; per-device memory and cost"),
}


CONFIG_COMMANDS = ("train", "grpo", "aot", "eval")  # take --config.key=value overrides


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="eemo-jax", description="EEmo-JAX: Qwen2.5-VL emotion models in JAX")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  argv = sys.argv[1:] if argv is None else list(argv)
  for name, (module, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    if argv and argv[0] == name:  # only the chosen command's module is imported
      importlib.import_module(module).add_arguments(p, name)
  args, extra = parser.parse_known_args(argv)
  overrides = [a for a in extra if a.startswith("--config.")]
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown or (overrides and args.command not in CONFIG_COMMANDS):
    parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
  args.overrides = overrides
  module = importlib.import_module(COMMANDS[args.command][0])
  try:
    return int(module.run(args) or 0)
  except MissingDataPackagesError as error:  # a data job (train, grpo, demo, eval of a split, aot) without the extra
    print(f"eemo-jax {args.command}: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
