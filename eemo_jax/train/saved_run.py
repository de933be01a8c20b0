"""A run directory read as a model: the architecture and tokenizer it recorded, and the weights of any saved step.

When a run starts it records, beside its `config.json`, what a reader needs besides the checkpoints:
`model_config.json` (the architecture, HF-style) and `hf_assets/` (the tokenizer and processor files), the
two things an `import-hf` checkpoint keeps too. A run directory alone is then enough for a later run's
`model.init_from` and for `eemo-jax export-hf RUN_DIR`, even once the folder it started from is gone. A run
made before this record is read through its config.json instead (its preset or `model.hf_dir` and its
tokenizer folder, which must then still exist).

A step's weights are read without its optimizer state or data position: the model is rebuilt abstractly from
the run's config (architecture, head, LoRA), split the way the checkpoint stores it (trainable `params` and
`frozen`, read from the checkpoint's metadata, so a step saved before a `trainable` change reads too), and
every array is restored straight into its sharding on the current mesh.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
from flax import nnx

from eemo_jax import paths
from eemo_jax.config import ConfigError
from eemo_jax.hf.checkpoint import CONFIG as MODEL_CONFIG
from eemo_jax.hf.convert import ASSETS, keep_assets
from eemo_jax.hf.load import read_config_file
from eemo_jax.model.config import Qwen25VLConfig
from eemo_jax.model.lora import LoraParam
from eemo_jax.parallel.sharding import state_shardings
from eemo_jax.train import run_record
from eemo_jax.train.checkpointing import RunCheckpoints
from eemo_jax.train.freeze import path_string
from eemo_jax.train.run import build_model, head_config, load_run_tokenizer, model_config

# Where a run's model may be computed differently from how it trained: a reader's choice, not the weights'.
HOW_IT_COMPUTES = ("dtype", "param_dtype", "remat", "attention")


def record_model(run_dir: str, arch: Qwen25VLConfig, tokenizer_dir: str | None) -> None:
  """Writes the run's `hf_assets/` (the tokenizer folder's files) and then `model_config.json`, which marks the
  record complete. Once, when the run starts (process 0, after its inputs are checked): a resume keeps it."""
  if paths.isfile(paths.join(run_dir, MODEL_CONFIG)):
    return
  if tokenizer_dir and paths.isdir(tokenizer_dir):
    keep_assets(tokenizer_dir, paths.join(run_dir, ASSETS))
  run_record.write_json(paths.join(run_dir, MODEL_CONFIG), arch.to_hf())


def is_run_dir(path: str) -> bool:
  """A folder with `checkpoints/`, or whose config.json is a run's (it has `model` and `train` sections)."""
  if paths.isdir(paths.join(path, "checkpoints")):
    return True
  try:
    recorded = json.loads(paths.read_text(paths.join(path, run_record.CONFIG_FILE)))
  except (OSError, ValueError):
    return False
  return _is_run_record(recorded)


def _is_run_record(recorded) -> bool:
  """A run's config.json has `model` and `train` sections (an HF folder's config.json has neither)."""
  return isinstance(recorded, dict) and {"model", "train"} <= set(recorded)


@dataclasses.dataclass
class LoadedStep:
  """One saved step's model, split as the train state holds it: `nnx.merge(graphdef, params, frozen)`."""
  graphdef: nnx.GraphDef
  params: nnx.State  # what the run trained (base weights, LoRA factors, head), as stored
  frozen: nnx.State  # the rest: frozen weights, LoRA dropout keys, the head's RNG state

  def model(self):
    """The run's `EmotionSFTModel` (backbone with its LoRA adapters, and head)."""
    return nnx.merge(self.graphdef, self.params, self.frozen)


@dataclasses.dataclass(frozen=True)
class SavedRun:
  run_dir: str
  config: ml_collections.ConfigDict  # the run's config.json
  arch: Qwen25VLConfig
  tokenizer_dir: str  # its hf_assets/ (older runs: the tokenizer folder its config names); "" if none
  steps: tuple[int, ...]  # its complete checkpoints, oldest first

  @classmethod
  def open(cls, run_dir: str) -> SavedRun:
    """Reads a run directory's record; a folder that is not a run with a saved step is a `ConfigError`."""
    run_dir = paths.absolute(run_dir)
    recorded = run_record.read_recorded(run_dir)
    if not _is_run_record(recorded):
      raise ConfigError(f"{run_dir} has no {run_record.CONFIG_FILE} of a run (it records the model the checkpoints "
                        "hold); name the run directory that `eemo-jax train` or `eemo-jax grpo` wrote")
    steps = _complete_steps(run_dir)
    if not steps:
      raise ConfigError(f"{run_dir} is a run directory without a saved checkpoint (it stopped before its first "
                        "save, or they were removed); name a run with at least one checkpoint")
    config = ml_collections.ConfigDict(recorded)
    arch, tokenizer_dir = _recorded_model(run_dir, config)
    return cls(run_dir, config, arch, tokenizer_dir, tuple(steps))

  def step(self, step: int | None = None) -> int:
    """`step` if the run saved it, else a `ConfigError` listing the saved ones; None: the newest."""
    if step is None:
      return self.steps[-1]
    if int(step) not in self.steps:
      raise ConfigError(f"{self.run_dir} has no checkpoint {step}; its saved steps are "
                        f"{', '.join(map(str, self.steps))}")
    return int(step)

  @property
  def started_from(self) -> str:
    """The folder the run's weights came from (`model.init_from` or `model.hf_dir`); "" for a random preset."""
    model = self.config.model
    return str(model.get("init_from", "") or model.get("hf_dir", ""))

  def load(self, step: int, *, mesh, rules, model_settings=None) -> LoadedStep:
    """Checkpoint `step`'s model, LoRA adapters and head as the run had them, each array in its sharding on `mesh`.

    `model_settings` (a config's `model` section) replaces how the model computes (dtype, param_dtype, remat,
    attention), e.g. with a new run's; the stored weights are cast to its param_dtype.
    """
    config = self._config_with(model_settings)
    head = head_config(config, self.arch, self._tokenizer() if config.head.kind == "token" else None)
    with jax.set_mesh(mesh):
      abstract = nnx.eval_shape(lambda: build_model(config, self.arch, head))
    checkpoints = RunCheckpoints(self.run_dir, save_every=1)
    try:
      stored = checkpoints.stored_tree(step).get("params", {})
      graphdef, params, frozen = nnx.split(abstract, lambda path, _: _holds(stored, path), ...)
      params, frozen = checkpoints.restore_weights(step, _placed(params, mesh, rules), _placed(frozen, mesh, rules))
    except Exception as error:  # Orbax and tensorstore raise many types for a mismatched or damaged checkpoint
      first = (str(error).strip().splitlines() or [""])[0][:240]
      raise ConfigError(f"checkpoint {step} of {self.run_dir} cannot be read as the model its "
                        f"{run_record.CONFIG_FILE} describes ({type(error).__name__}: {first}); name another step "
                        "(RUN_DIR/checkpoints/N), or check the folder is complete") from None
    finally:
      checkpoints.close()
    return LoadedStep(graphdef, params, frozen)

  def adapter_base(self, loaded: LoadedStep) -> str:
    """The base model of the run's LoRA adapters (for adapter_config.json); a `ConfigError` when the adapters alone
    would not be the run's model."""
    export = "export it without --adapter (the adapters merged into the weights)"
    if not int(self.config.lora.rank):
      raise ConfigError(f"{self.run_dir} trained no LoRA adapters (lora.rank is 0); {export}")
    if not self.started_from:
      raise ConfigError(f"{self.run_dir} started from a randomly initialised model.preset, so its adapters have no "
                        f"saved base model; {export}")
    base = [path_string(p) for p, v in nnx.to_flat_state(loaded.params)
            if not isinstance(v, LoraParam) and p[0] != "head"]
    if base:
      raise ConfigError(f"{self.run_dir} trained base weights too (e.g. {base[0]}), which an adapter does not hold; "
                        f"{export}")
    return self.started_from

  def _config_with(self, model_settings) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(self.config.to_dict())
    if model_settings is not None:
      for key in HOW_IT_COMPUTES:
        config.model[key] = model_settings[key]
    return config

  def _tokenizer(self):
    return load_run_tokenizer(self.tokenizer_dir)


def _complete_steps(run_dir: str) -> list[int]:
  if not RunCheckpoints.present(run_dir):
    return []
  checkpoints = RunCheckpoints(run_dir, save_every=1)
  try:
    return sorted(checkpoints.all_steps())
  finally:
    checkpoints.close()


def _recorded_model(run_dir: str, config: ml_collections.ConfigDict) -> tuple[Qwen25VLConfig, str]:
  """(architecture, tokenizer folder) from the run's record, or from the folders its config names."""
  recorded, assets = paths.join(run_dir, MODEL_CONFIG), paths.join(run_dir, ASSETS)
  if paths.isfile(recorded):
    return read_config_file(recorded), assets if paths.isdir(assets) else ""
  tokenizer_dir = paths.absolute(config.data.tokenizer_dir or config.model.hf_dir)
  try:
    return model_config(config, load_run_tokenizer(tokenizer_dir)), tokenizer_dir
  except ValueError as error:  # ConfigError, CheckpointError
    raise ConfigError(f"{run_dir} has no {MODEL_CONFIG} (it was made before runs recorded their model), and what "
                      f"its {run_record.CONFIG_FILE} names cannot be read: {error}") from None


def _holds(tree: dict, path: tuple) -> bool:
  """Whether the stored nested dict (lists for sequences) has the variable at `path`."""
  node = tree
  for key in path:
    if isinstance(node, dict) and str(key) in node:
      node = node[str(key)]
    elif isinstance(node, (list, tuple)) and isinstance(key, int) and key < len(node):
      node = node[key]
    else:
      return False
  return True


def _placed(state: nnx.State, mesh, rules) -> nnx.State:
  """Abstract arrays carrying their shardings on `mesh` (one sharding per variable, from the logical axes)."""
  shardings = state_shardings(state, mesh, rules)

  def place(sharding, subtree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), subtree)

  return jax.tree.map(place, shardings, state)
