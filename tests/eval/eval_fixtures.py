"""A tiny random EmoVerse model exported as the demo exports it (HF folder + head + tokenizer), and the synthetic
data sets, for the eval / predict tests."""

from __future__ import annotations

import os

from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_DEMO = os.path.join(ROOT, "configs", "tiny_demo.py")
PHOTOS = os.path.join(ROOT, "tests", "data", "photos")


def export_tiny_model(folder: str, *, with_head: bool = True, seed: int = 0) -> str:
  """The tiny_demo architecture with random weights, saved with the offline tokenizer (and the head)."""
  import eemo_jax
  from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer
  from eemo_jax.config import load_config
  from eemo_jax.hf.heads_io import save_head
  from eemo_jax.model.heads import EmotionHead
  from eemo_jax.model.qwen25vl import Qwen25VL
  from eemo_jax.train import run as runlib
  tokenizer_dir = folder.rstrip("/") + "_tokenizer"
  tokenizer = load_tokenizer(build_offline_tokenizer(tokenizer_dir))
  config = load_config(TINY_DEMO)
  arch = runlib.model_config(config, tokenizer)
  eemo_jax.save_hf(Qwen25VL(arch, rngs=nnx.Rngs(seed)), folder, source_dir=tokenizer_dir)  # + tokenizer files
  if with_head:
    head_cfg = runlib.head_config(config, arch, tokenizer)
    save_head(EmotionHead(head_cfg, rngs=nnx.Rngs(params=seed + 1, dropout=seed + 2)), folder)
  return folder
