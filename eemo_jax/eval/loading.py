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
  (from `tokenizer_dir`, else the model folder)."""
  from data_pipeline.tokenizer import load_tokenizer
  from eemo_jax.hf import heads_io
  if (hf_dir is None) == (checkpoint is None):
    raise ModelSourceError("give the model as exactly one of --hf-dir (an HF folder) or --checkpoint (an "
                           "`eemo-jax import-hf` checkpoint folder)")
  folder = paths.absolute(hf_dir or checkpoint)
  if not paths.isdir(folder):
    raise ModelSourceError(f"{folder} does not exist; pass the folder that holds the model")
  if hf_dir is not None:
    from eemo_jax.hf.load import load_hf
    backbone = load_hf(folder, dtype=dtype, mesh=mesh)
  else:
    from eemo_jax.hf.checkpoint import load_checkpoint
    backbone = load_checkpoint(folder, dtype=dtype, mesh=mesh)
  head = heads_io.load_head(folder, mesh=mesh) if paths.exists(paths.join(folder, heads_io.WEIGHTS)) else None
  tokenizer_dir = paths.absolute(tokenizer_dir) if tokenizer_dir else folder
  if not paths.exists(paths.join(tokenizer_dir, "tokenizer.json")):
    raise ModelSourceError(f"no tokenizer.json in {tokenizer_dir}: pass --tokenizer-dir (the HF folder the model "
                           "came from, or the demo's tokenizer folder)")
  return EvalModel(backbone=backbone, head=head, tokenizer=load_tokenizer(tokenizer_dir),
                   name=paths.basename(folder.rstrip(os.sep)) or "model", folder=folder,
                   tokenizer_dir=tokenizer_dir)
