"""The model an evaluation or a prediction runs: an HF folder or an `import-hf` checkpoint, with the
EmoVerse head when its files lie beside the weights (`emotion_head.safetensors`, as `train` exports it), or a
training run's saved step (its directory for the newest, `RUN_DIR/checkpoints/N` for step N), read as
`export-hf` reads it: LoRA adapters merged, the run's head, the tokenizer the run recorded. A run stopped
before its export is then evaluated as it is, without exporting it first."""

from __future__ import annotations

import dataclasses
import os

from eemo_jax import paths
from eemo_jax.model.heads import EmotionHead
from eemo_jax.model.qwen25vl import Qwen25VL


class ModelSourceError(ValueError):
  """The folder given for the model is missing or is not a model; the message says what to pass."""


@dataclasses.dataclass
class EvalModel:
  backbone: Qwen25VL
  head: EmotionHead | None
  tokenizer: object  # data_pipeline.tokenizer.TextTokenizer
  name: str  # what the predictions file calls the model: the folder's name
  folder: str
  tokenizer_dir: str


def load_eval_model(*, hf_dir: str | None = None, checkpoint: str | None = None, tokenizer_dir: str | None = None,
                    dtype: str = "float32", mesh=None) -> EvalModel:
  """Loads the backbone (sharded over `mesh` when given), the head if exported beside it (a run's own head for a
  run), and the tokenizer (from `tokenizer_dir`, else the model folder, else the run's recorded one).

  The tokenizer and the model's config are read and checked against each other first: loading the weights
  takes minutes on a real model, and a wrong folder should not cost them.
  """
  from data_pipeline.tokenizer import token_mismatches
  from eemo_jax.hf import heads_io
  if (hf_dir is None) == (checkpoint is None):
    raise ModelSourceError("give the model as exactly one of --hf-dir (an HF folder) or --checkpoint (an "
                           "`eemo-jax import-hf` checkpoint folder, or a training run's directory)")
  folder = paths.absolute(hf_dir or checkpoint)
  run, step = _run_step(folder) if checkpoint is not None else (None, None)
  if run is None and not paths.isdir(folder):
    raise ModelSourceError(f"{folder} does not exist; pass the folder that holds the model")
  tokenizer_dir = paths.absolute(tokenizer_dir) if tokenizer_dir else (run.tokenizer_dir if run else folder)
  if not tokenizer_dir:
    raise ModelSourceError(f"{run.run_dir} keeps no tokenizer files (no hf_assets/, and the tokenizer folder its "
                           "config.json names is gone): pass --tokenizer-dir")
  tokenizer = _read_tokenizer(tokenizer_dir)
  if run is not None:
    arch, where = run.arch, f"the run {run.run_dir}"
  elif hf_dir is not None:
    from eemo_jax.hf.load import read_config
    arch, where = read_config(folder), f"the model in {folder}"
  else:
    from eemo_jax.hf.checkpoint import read_checkpoint_config
    arch, where = read_checkpoint_config(folder), f"the model in {folder}"
  wrong = token_mismatches(arch, tokenizer)
  if wrong:
    raise ModelSourceError(f"the tokenizer in {tokenizer_dir} does not fit {where} ({'; '.join(wrong)})"
                           ": pass --tokenizer-dir with the model's own tokenizer")
  if run is not None:
    backbone, head = _run_step_model(run, step, dtype=dtype, mesh=mesh)
    return EvalModel(backbone=backbone, head=head, tokenizer=tokenizer,
                     name=f"{paths.basename(run.run_dir.rstrip(os.sep)) or 'run'}_step{step}", folder=run.run_dir,
                     tokenizer_dir=tokenizer_dir)
  if hf_dir is not None:
    from eemo_jax.hf.load import load_hf
    backbone = load_hf(folder, dtype=dtype, mesh=mesh)
  else:
    from eemo_jax.hf.checkpoint import load_checkpoint
    backbone = load_checkpoint(folder, dtype=dtype, mesh=mesh)
  head = heads_io.load_head(folder, mesh=mesh) if paths.exists(paths.join(folder, heads_io.WEIGHTS)) else None
  return EvalModel(backbone=backbone, head=head, tokenizer=tokenizer,
                   name=paths.basename(folder.rstrip(os.sep)) or "model", folder=folder,
                   tokenizer_dir=tokenizer_dir)


def _run_step(folder: str):
  """(`SavedRun`, step) when `folder` is a run directory (its newest step) or `RUN_DIR/checkpoints/N`, else
  (None, None)."""
  from eemo_jax.config import ConfigError
  from eemo_jax.train.init_from import named_step
  from eemo_jax.train.saved_run import SavedRun, is_run_dir
  named = named_step(folder)
  if named is None and not (paths.isdir(folder) and is_run_dir(folder)):
    return None, None
  run_dir, step = named or (folder, None)
  try:
    run = SavedRun.open(run_dir)
    return run, run.step(step)
  except ConfigError as error:
    raise ModelSourceError(str(error)) from None


def _run_step_model(run, step: int, *, dtype: str, mesh):
  """(backbone, head) of a run's step as `export-hf` would write it (LoRA merged), computing in `dtype`."""
  import jax

  from eemo_jax.config import ConfigError
  from eemo_jax.model.lora import merge_lora
  from eemo_jax.parallel.sharding import make_mesh
  mesh = mesh if mesh is not None else make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  settings = dict(dtype=dtype, param_dtype=dtype, remat="none", attention=run.config.model.attention)
  try:
    loaded = run.load(step, mesh=mesh, rules=tuple(tuple(r) for r in run.config.rules),
                      model_settings=settings).model()
  except ConfigError as error:
    raise ModelSourceError(str(error)) from None
  return (merge_lora(loaded.backbone) if int(run.config.lora.rank) else loaded.backbone), loaded.head


def _read_tokenizer(folder: str):
  from data_pipeline.tokenizer import load_tokenizer
  path = paths.join(folder, "tokenizer.json")
  if not paths.exists(path):
    raise ModelSourceError(f"no tokenizer.json in {folder}: pass --tokenizer-dir (the HF folder the model "
                           "came from, or the demo's tokenizer folder)")
  try:
    return load_tokenizer(folder)
  except Exception as error:  # tokenizers raises its own exception types for a damaged file
    raise ModelSourceError(f"{path} cannot be read ({type(error).__name__}: {error}); pass --tokenizer-dir with a "
                           "folder holding a valid tokenizer.json") from None
