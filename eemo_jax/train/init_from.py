"""Where a new run's weights come from: `model.init_from`, one field for every kind of saved model.

| model.init_from | weights | architecture, tokenizer |
|---|---|---|
| an HF Qwen2.5-VL folder (config.json + *.safetensors) | the folder's | its config.json and tokenizer files |
| an `eemo-jax import-hf` checkpoint (params/ + model_config.json) | the checkpoint's | model_config.json, hf_assets/ |
| a run directory (config.json + checkpoints/) | its newest checkpoint | what the run recorded (`saved_run`) |
| RUN_DIR/checkpoints/N | that run's step N | the same |

A run's weights come with what trained on them: its LoRA adapters are merged into the base weights (the new
run then adds its own, if its config has any), and its emotion head (or the `emotion_head.safetensors` beside
an exported HF folder) is kept when the new config asks for a head of the same kind and shapes; otherwise the
new run starts a fresh one. A line at the start says which. Nothing else carries over (optimizer state, step,
data position): the new run is a new run. `data.tokenizer_dir`, when set, still wins over the source's tokenizer.

The source is read when the run starts, and again when it resumes (for its architecture and tokenizer, and
GRPO's reference policy), so it must stay where it is until the run ends; a run directory named without a step
means its newest checkpoint at that time, so name `RUN_DIR/checkpoints/N` to pin one while the source still
trains. A source that is not usable is one `ConfigError` naming the path and what was expected, raised before
anything is written. `model.hf_dir`, the older field, still names an HF folder (and is what `eval`, `aot` and
the demo read); a config may set one of the two, not both.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from eemo_jax import paths
from eemo_jax.config import ConfigError
from eemo_jax.hf.checkpoint import CONFIG as CHECKPOINT_CONFIG
from eemo_jax.hf.checkpoint import PARAMS, read_checkpoint_config
from eemo_jax.hf.convert import ASSETS
from eemo_jax.hf.load import read_config
from eemo_jax.hf.safetensors_io import CheckpointError
from eemo_jax.model.config import Qwen25VLConfig
from eemo_jax.model.lora import merge_lora
from eemo_jax.train.run import build_model
from eemo_jax.train.saved_run import SavedRun, is_run_dir

EXPECTED = ("an HF Qwen2.5-VL folder (config.json + *.safetensors), an `eemo-jax import-hf` checkpoint (params/ + "
            "model_config.json), or a run directory (config.json + checkpoints/; RUN_DIR/checkpoints/N for step N)")


@dataclasses.dataclass(frozen=True)
class Source:
  """A checked `model.init_from`: what it is, and the architecture and tokenizer folder the new run takes from it."""
  kind: str  # "hf", "checkpoint" or "run"
  path: str
  arch: Qwen25VLConfig
  tokenizer_dir: str  # "" when the source holds no tokenizer files
  run: SavedRun | None = None
  step: int | None = None

  def describe(self) -> str:
    if self.kind == "run":
      return f"run {self.path}, checkpoint {self.step}"
    return f"{'the HF folder' if self.kind == 'hf' else 'the checkpoint'} {self.path}"


def resolve(config) -> Source | None:
  """The source `model.init_from` names, checked; None when the field is empty."""
  text = str(config.model.init_from)
  if not text:
    return None
  if config.model.hf_dir:
    raise ConfigError(f"model.init_from ({text}) and model.hf_dir ({config.model.hf_dir}) are both set; set only "
                      "model.init_from, which takes an HF folder too")
  try:
    return locate(paths.absolute(text))
  except (ConfigError, CheckpointError) as error:
    raise ConfigError(f"model.init_from: {error}") from None


def locate(path: str) -> Source:
  """What the folder at `path` is, as a `Source`; a `ConfigError` naming it and what was expected otherwise."""
  named = named_step(path)
  if named is not None:
    run = SavedRun.open(named[0])
    return Source("run", run.run_dir, run.arch, run.tokenizer_dir, run=run, step=run.step(named[1]))
  if not paths.exists(path):
    raise ConfigError(f"{path} does not exist; expected {EXPECTED}")
  if not paths.isdir(path):
    raise ConfigError(f"{path} is not a folder; expected {EXPECTED}")
  if paths.isdir(paths.join(path, PARAMS)) and paths.isfile(paths.join(path, CHECKPOINT_CONFIG)):
    assets = paths.join(path, ASSETS)
    return Source("checkpoint", path, read_checkpoint_config(path), assets if paths.isdir(assets) else "")
  if is_run_dir(path):
    run = SavedRun.open(path)
    return Source("run", run.run_dir, run.arch, run.tokenizer_dir, run=run, step=run.step())
  if paths.isfile(paths.join(path, "config.json")) and any(n.endswith(".safetensors") for n in paths.listdir(path)):
    return Source("hf", path, read_config(path), path)
  raise ConfigError(f"{path} is none of the folders a run starts from: {EXPECTED}")


def named_step(path: str) -> tuple[str, int] | None:
  """(run directory, N) for `RUN_DIR/checkpoints/N`, whether or not that step exists."""
  path = str(path).rstrip("/") if paths.is_url(path) else os.path.normpath(path)
  parent, name = paths.dirname(path), paths.basename(path)
  run_dir, folder = paths.dirname(parent), paths.basename(parent)
  if folder == "checkpoints" and name.isdigit() and is_run_dir(run_dir):
    return run_dir, int(name)
  return None


def initial_model(source: Source, config, arch: Qwen25VLConfig, head_cfg, *, mesh, rules):
  """(the new run's `EmotionSFTModel` before its first step, the lines that say where it came from).

  The source's weights (a run's LoRA adapters merged into them), then the new config's head (the source's,
  when it has the same kind and shapes) and LoRA adapters. Parameters are placed on `mesh` by `rules`.
  """
  m = config.model
  settings = dict(dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, rules=rules, remat=m.remat,
                  attention_impl=m.attention)
  source_head, merged = None, False
  if source.kind == "run":
    loaded = source.run.load(source.step, mesh=mesh, rules=rules, model_settings=m).model()
    merged = bool(int(source.run.config.lora.rank))
    backbone, source_head = merge_lora(loaded.backbone), loaded.head
  elif source.kind == "checkpoint":
    from eemo_jax.hf.checkpoint import load_checkpoint
    backbone = load_checkpoint(source.path, **settings)
  else:
    from eemo_jax.hf.heads_io import WEIGHTS, load_head
    from eemo_jax.hf.load import load_hf
    backbone = load_hf(source.path, **settings)
    if paths.isfile(paths.join(source.path, WEIGHTS)):  # an export of a run with a head
      source_head = load_head(source.path, mesh=mesh, rules=rules)
  model = build_model(config, arch, head_cfg, backbone=backbone, mesh=mesh)
  lines = [f"starting from {source.describe()}" + (", its LoRA adapters merged into the weights" if merged else "")]
  head_line = carry_head(source_head, model.head)
  if head_line and (source_head is not None or source.kind == "run"):
    lines.append(head_line)
  return model, lines


def carry_head(source_head, head) -> str | None:
  """Puts the source's head weights into the new `head` when both have the same kind and parameter shapes;
  returns the line that says what the new run's head is (None without either)."""
  if head is None:
    return None if source_head is None else (f"emotion head: the source's {source_head.config.kind} head is not used "
                                             "(head.kind is none)")
  if source_head is None:
    return f"emotion head: a new {head.config.kind} head (the source has none)"
  if source_head.config.kind == head.config.kind and _shapes(source_head) == _shapes(head):
    nnx.update(head, nnx.state(source_head, nnx.Param))
    return f"emotion head: the source's {head.config.kind} head, kept"
  return (f"emotion head: a new {head.config.kind} head (the source's {source_head.config.kind} head has another "
          "kind or shape)")


def _shapes(head) -> dict:
  return {path: tuple(v.get_value().shape) for path, v in nnx.to_flat_state(nnx.state(head, nnx.Param))}
