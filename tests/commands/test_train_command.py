"""`eemo-jax train`: what a user sees when the command line or the config is wrong.

Each of these fails before JAX starts or any run directory is touched, so a typo on a pod costs
seconds and says what to fix; exit status 2 is a usage error (argparse's and the config's).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from eemo_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_demo.py")


def test_bad_override_key_exits_2_naming_the_valid_keys(tmp_path, capsys):
  run_dir = tmp_path / "run"
  code = cli.main(["train", "--config", TINY, f"--config.train.run_dir={run_dir}",
                   "--config.optimizer.learning_rat=1e-3"])
  assert code == 2
  err = capsys.readouterr().err
  assert err.startswith("eemo-jax train: unknown config key 'optimizer.learning_rat'")
  assert "Did you mean learning_rate" in err and "Valid keys of optimizer:" in err
  assert not run_dir.exists()  # nothing started


def test_bad_override_value_and_missing_file_exit_2(tmp_path, capsys):
  assert cli.main(["train", "--config", TINY, "--config.train.steps=ten"]) == 2
  assert "train.steps is an int; 'ten' is not one" in capsys.readouterr().err
  assert cli.main(["train", "--config", str(tmp_path / "nope.py")]) == 2
  assert "not found" in capsys.readouterr().err


def test_recipe_typo_exits_2_with_the_message(tmp_path, capsys):
  """A misspelled field in the recipe file is the same kind of mistake as one in an override."""
  recipe = tmp_path / "typo.py"
  recipe.write_text(textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {os.path.join(ROOT, "configs")!r})
      import base  # noqa: E402


      def get_config(arg=None):
        c = base.get_config()
        c.optimizer.learning_rat = 3e-4
        return c
      """))
  assert cli.main(["train", "--config", str(recipe), f"--config.train.run_dir={tmp_path / 'run'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("eemo-jax train: ") and "learning_rat" in err and "learning_rate" in err


def test_help_mentions_overrides():
  """Through the real entry point: `--help` builds the parser only (no JAX import) and exits 0."""
  result = subprocess.run([sys.executable, "-m", "eemo_jax.cli", "train", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr
  out = " ".join(result.stdout.split())  # argparse wraps the epilog
  assert "--config FILE[:ARG]" in out
  assert "Override any config field with --config.section.key=value" in out


@pytest.mark.parametrize("argv, bad", [
    (["--bogus"], "--bogus"),
    (["--config.train.steps", "2"], "2"),  # an override must be one --config.key=value word
    (["stray"], "stray"),
])
def test_unknown_arguments_are_refused(argv, bad, capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["train", "--config", TINY, *argv])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert f"unrecognized arguments: {bad}" in err


def test_overrides_are_refused_by_commands_without_a_config(capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["demo", "--config.train.steps=2"])
  assert info.value.code == 2
  assert "unrecognized arguments: --config.train.steps=2" in capsys.readouterr().err


def test_config_is_required(capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["train", "--config.train.steps=2"])
  assert info.value.code == 2
  assert "--config" in capsys.readouterr().err
