"""The model an evaluation or a prediction runs: an HF folder or an `import-hf` checkpoint, with the
EmoVerse head when its files lie beside the weights (`emotion_head.safetensors`, as `train` exports it)."""

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
  """Loads the backbone (sharded over `mesh` when given), the head if exported beside it, and the tokenizer
  (from `tokenizer_dir`, else the model folder).

  The tokenizer and the model's config are read and checked against each other first: loading the weights
  takes minutes on a real model, and a wrong folder should not cost them.
  """
  from data_pipeline.tokenizer import token_mismatches
  from eemo_jax.hf import heads_io
  if (hf_dir is None) == (checkpoint is None):
    raise ModelSourceError("give the model as exactly one of --hf-dir (an HF folder) or --checkpoint (an "
                           "`eemo-jax import-hf` checkpoint folder)")
  folder = paths.absolute(hf_dir or checkpoint)
  if not paths.isdir(folder):
    raise ModelSourceError(f"{folder} does not exist; pass the folder that holds the model")
  tokenizer_dir = paths.absolute(tokenizer_dir) if tokenizer_dir else folder
  tokenizer = _read_tokenizer(tokenizer_dir)
  if hf_dir is not None:
    from eemo_jax.hf.load import read_config
    arch = read_config(folder)
  else:
    from eemo_jax.hf.checkpoint import read_checkpoint_config
    arch = read_checkpoint_config(folder)
  wrong = token_mismatches(arch, tokenizer)
  if wrong:
    raise ModelSourceError(f"the tokenizer in {tokenizer_dir} does not fit the model in {folder} ({'; '.join(wrong)})"
                           ": pass --tokenizer-dir with the model's own tokenizer")
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
