"""The one table between HF checkpoint keys and EEmo-JAX parameter paths, used in both directions.

Each rule names an HF key (with `{i}` for the layer index of stacked layers), the parameter path in
the NNX state, and a layout transform with its inverse. Import and export both walk this table, so
a key can never be read one way and written another.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from eemo_jax.model.config import Qwen25VLConfig


@dataclasses.dataclass(frozen=True)
class Transform:
  """A layout change between an HF tensor (per layer) and the JAX parameter (per layer)."""
  name: str

  def to_jax(self, w: np.ndarray) -> np.ndarray:
    if self.name == "identity":
      return w
    if self.name == "linear":  # torch (out, in) -> (in, out)
      return w.T
    if self.name == "patch":  # Conv3d (D, C, Tp, P, P) -> (C*Tp*P*P, D), same column order as pixel_values
      return w.reshape(w.shape[0], -1).T
    raise AssertionError(self.name)

  def to_hf(self, k: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    if self.name == "identity":
      return k
    if self.name == "linear":
      return k.T
    if self.name == "patch":
      return k.T.reshape(hf_shape)
    raise AssertionError(self.name)

  def hf_shape(self, jax_shape: tuple[int, ...], cfg: Qwen25VLConfig) -> tuple[int, ...]:
    if self.name == "identity":
      return jax_shape
    if self.name == "linear":
      return jax_shape[::-1]
    v = cfg.vision
    return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


IDENTITY, LINEAR, PATCH = Transform("identity"), Transform("linear"), Transform("patch")


@dataclasses.dataclass(frozen=True)
class KeyRule:
  hf: str  # on-disk (4.x layout) key; "{i}" marks the layer index of a stacked parameter
  path: tuple[str, ...]  # path of the parameter in nnx.state(model)
  transform: Transform

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf

  def hf_key(self, layer: int | None = None) -> str:
    return self.hf.format(i=layer) if self.stacked else self.hf


def _linear(hf_prefix: str, path: tuple[str, ...], bias: bool) -> list[KeyRule]:
  rules = [KeyRule(f"{hf_prefix}.weight", path + ("kernel",), LINEAR)]
  if bias:
    rules.append(KeyRule(f"{hf_prefix}.bias", path + ("bias",), IDENTITY))
  return rules


def _norm(hf_prefix: str, path: tuple[str, ...]) -> KeyRule:
  return KeyRule(f"{hf_prefix}.weight", path + ("weight",), IDENTITY)


def key_table(cfg: Qwen25VLConfig) -> list[KeyRule]:
  """Every parameter of the model for `cfg`, in the order HF's state dict lists them."""
  vb, tl = "visual.blocks.{i}", "model.layers.{i}"
  vp, tp = ("visual", "blocks"), ("language_model", "layers")
  rules = [KeyRule("visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), PATCH)]
  rules += [
      _norm(f"{vb}.norm1", vp + ("norm1",)), _norm(f"{vb}.norm2", vp + ("norm2",)),
      *_linear(f"{vb}.attn.qkv", vp + ("attn", "qkv"), True),
      *_linear(f"{vb}.attn.proj", vp + ("attn", "proj"), True),
      *(r for m in ("gate_proj", "up_proj", "down_proj") for r in _linear(f"{vb}.mlp.{m}", vp + ("mlp", m), True)),
      _norm("visual.merger.ln_q", ("visual", "merger", "ln_q")),
      *_linear("visual.merger.mlp.0", ("visual", "merger", "mlp_0"), True),
      *_linear("visual.merger.mlp.2", ("visual", "merger", "mlp_2"), True),
      KeyRule("model.embed_tokens.weight", ("language_model", "embed_tokens", "embedding"), IDENTITY),
      *(r for m in ("q_proj", "k_proj", "v_proj") for r in _linear(f"{tl}.self_attn.{m}", tp + ("self_attn", m), True)),
      *_linear(f"{tl}.self_attn.o_proj", tp + ("self_attn", "o_proj"), False),
      *(r for m in ("gate_proj", "up_proj", "down_proj") for r in _linear(f"{tl}.mlp.{m}", tp + ("mlp", m), False)),
      _norm(f"{tl}.input_layernorm", tp + ("input_layernorm",)),
      _norm(f"{tl}.post_attention_layernorm", tp + ("post_attention_layernorm",)),
      _norm("model.norm", ("language_model", "norm")),
  ]
  if not cfg.tie_word_embeddings:
    rules += _linear("lm_head", ("lm_head",), False)
  return rules


def num_layers(rule: KeyRule, cfg: Qwen25VLConfig) -> int:
  return cfg.vision.depth if rule.hf.startswith("visual.blocks") else cfg.text.num_hidden_layers


# transformers 5.x keeps `model.visual.*` / `model.language_model.*` in memory (and on disk with
# save_original_format=False); 4.x and the Hub use `visual.*` / `model.*` (spec §2.1).
_5X_TO_DISK = [(re.compile(r"^model\.visual\."), "visual."), (re.compile(r"^model\.language_model\."), "model.")]


def canonical_key(key: str) -> str:
  """Any supported layout's key -> the on-disk 4.x key used in the table."""
  for pattern, repl in _5X_TO_DISK:
    if pattern.match(key):
      return pattern.sub(repl, key, count=1)
  return key
