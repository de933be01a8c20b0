"""Architecture of Qwen2.5-VL as frozen dataclasses, with presets and HF `config.json` conversion.

The dataclasses hold only what changes the computation; everything else in an HF config is either
accepted as known-irrelevant (`_IGNORED_*`) or rejected, so that an unsupported checkpoint fails at
load time with the offending field named instead of producing silently different logits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 2048
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 2
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6  # hard-coded in HF's vision RMSNorm

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Columns of `pixel_values`: (channel, temporal, py, px) flattened."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    """Patches merged into one LLM token (m²)."""
    return self.spatial_merge_size**2

  @property
  def merged_window(self) -> int:
    """Merged tokens per window side (4 for the released checkpoints)."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  def validate(self) -> None:
    _require(self.hidden_size % self.num_heads == 0,
             f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    _require(self.head_dim % 4 == 0, f"vision head_dim {self.head_dim} must be a multiple of 4 (2D rotary)")
    _require(self.merged_window >= 1,
             f"window_size {self.window_size} is smaller than one merged patch "
             f"({self.spatial_merge_size * self.patch_size} pixels)")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    _require(not bad, f"fullatt_block_indexes {bad} are outside [0, depth={self.depth})")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_hidden_layers: int = 36
  num_attention_heads: int = 16
  num_key_value_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128000

  @property
  def head_dim(self) -> int:
    # HF's text config has no head_dim field; attention always derives it (spec §1.4).
    return self.hidden_size // self.num_attention_heads

  def validate(self) -> None:
    _require(self.hidden_size % self.num_attention_heads == 0,
             f"text hidden_size {self.hidden_size} is not divisible by num_attention_heads "
             f"{self.num_attention_heads}")
    _require(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
             f"{self.num_key_value_heads}")
    _require(sum(self.mrope_section) == self.head_dim // 2,
             f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}")


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tie_word_embeddings: bool = True
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    self.vision.validate()
    self.text.validate()
    _require(self.vision.out_hidden_size == self.text.hidden_size,
             f"vision out_hidden_size {self.vision.out_hidden_size} must equal text hidden_size "
             f"{self.text.hidden_size}")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
      tok = getattr(self, name)
      _require(0 <= tok < self.text.vocab_size, f"{name}={tok} is outside the vocabulary ({self.text.vocab_size})")

  def replace(self, **changes) -> Qwen25VLConfig:
    return dataclasses.replace(self, **changes)

  # ------------------------------------------------------------------ HF conversion
  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> Qwen25VLConfig:
    """Builds the config from an HF `config.json` dict (flat 4.x Hub layout or nested 5.x layout)."""
    return _from_hf(hf)

  def to_hf(self) -> dict[str, Any]:
    """The `config.json` dict that transformers 5.23 writes for this architecture."""
    return _to_hf(self)


def _require(cond: bool, message: str) -> None:
  if not cond:
    raise ValueError(f"Invalid Qwen2.5-VL config: {message}")


# ---------------------------------------------------------------------------- presets
def qwen25vl_3b() -> Qwen25VLConfig:
  """Qwen2.5-VL-3B-Instruct (Hub config.json values; spec §1.2–1.3)."""
  return Qwen25VLConfig(
      vision=VisionConfig(out_hidden_size=2048),
      text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                      num_attention_heads=16, num_key_value_heads=2),
      tie_word_embeddings=True)


def qwen25vl_7b() -> Qwen25VLConfig:
  """Qwen2.5-VL-7B-Instruct (Hub config.json values; spec §1.2–1.3)."""
  return Qwen25VLConfig(
      vision=VisionConfig(out_hidden_size=3584),
      text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4),
      tie_word_embeddings=False)


def tiny() -> Qwen25VLConfig:
  """A few-layer model for tests and the demo; exercises windows, full attention and GQA."""
  return Qwen25VLConfig(
      vision=VisionConfig(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=(1,)),
      text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                      max_position_embeddings=512),
      image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)


def small() -> Qwen25VLConfig:
  """The benchmark's `small` shape: about 30M parameters, where matmuls dominate on a CPU."""
  return Qwen25VLConfig(
      vision=VisionConfig(depth=8, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                          fullatt_block_indexes=(3, 7)),
      text=TextConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, mrope_section=(8, 12, 12),
                      max_position_embeddings=4096),
      image_token_id=31995, video_token_id=31996, vision_start_token_id=31997, vision_end_token_id=31998,
      tie_word_embeddings=False, bos_token_id=None, eos_token_id=31999)


PRESETS = {"qwen25vl_3b": qwen25vl_3b, "qwen25vl_7b": qwen25vl_7b, "tiny": tiny, "small": small}


def preset(name: str) -> Qwen25VLConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]()


# ---------------------------------------------------------------------------- HF <-> dataclass
# Fields of HF configs that do not change the forward pass (bookkeeping, training-only, or fixed
# by the architecture). Anything not listed here and not mapped below fails loudly.
_IGNORED_COMMON = frozenset({
    "architectures", "transformers_version", "dtype", "torch_dtype", "model_type", "_name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "initializer_range", "use_cache",
    "attention_dropout", "tokenizer_class", "prefix", "task_specific_params", "add_cross_attention",
    "finetuning_task", "tf_legacy_loss", "pruned_heads", "torchscript", "use_bfloat16",
    "_attn_implementation_autoset", "_attn_implementation", "layer_types", "max_window_layers",
    "sliding_window", "decoder_start_token_id", "sep_token_id", "cross_attention_hidden_size",
    "tie_encoder_decoder", "is_decoder", "rope_scaling", "rope_parameters", "rope_theta", "vision_token_id",
})
_IGNORED_VISION = frozenset({"in_chans", "spatial_patch_size", "embed_dim", "num_hidden_layers",
                             "num_attention_heads"})

_VISION_FIELDS = {f.name for f in dataclasses.fields(VisionConfig)} - {"rope_theta", "rms_norm_eps"}
_TEXT_FIELDS = {f.name for f in dataclasses.fields(TextConfig)} - {"rope_theta", "mrope_section"}
_ROOT_FIELDS = {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"}


def _rope(d: Mapping[str, Any], default_theta: float, where: str) -> tuple[float, tuple[int, ...] | None]:
  """Reads theta and mrope_section from either the 5.x `rope_parameters` or 4.x `rope_scaling`."""
  name = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
  params = d.get(name) or {}
  if not isinstance(params, Mapping):
    raise ValueError(f"{where}{name} is {_show(params)}; expected a JSON object")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ("default", "mrope", "axial"):
    raise ValueError(f"Unsupported rope type {rope_type!r} in config; only default/mrope are implemented")
  unknown = set(params) - {"rope_type", "type", "mrope_section", "rope_theta"}
  if unknown:
    raise ValueError(f"Unsupported rope parameters {sorted(unknown)} in config (e.g. scaling); "
                     "remove them or extend eemo_jax.model.config")
  _check_values(params, {"rope_theta": "positive", "mrope_section": "section"}, f"{where}{name}.")
  _check_values(d, {"rope_theta": "positive"}, where)
  theta = float(params.get("rope_theta", d.get("rope_theta", default_theta)))
  section = params.get("mrope_section")
  return theta, (tuple(section) if section is not None else None)


def _check_known(d: Mapping[str, Any], known: set[str], where: str) -> None:
  unknown = sorted(set(d) - known - _IGNORED_COMMON - {"text_config", "vision_config"})
  if unknown:
    raise ValueError(f"Unsupported field(s) {unknown} in the {where} config of this checkpoint. "
                     "EEmo-JAX refuses to guess what they change; if they are harmless, add them to "
                     "eemo_jax/model/config.py:_IGNORED_COMMON.")


# What each field of an HF config must hold; a value of another type or range is refused naming the
# field, rather than failing later in some arithmetic. Fields whose transformers default differs
# from the released checkpoints (spec §1.2-1.3) are required: EEmo-JAX never guesses a size.
def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


_KINDS = {
    "count": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "index": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "positive": (lambda v: (_is_int(v) or isinstance(v, float)) and 0 < v < float("inf"), "a positive number"),
    "bool": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "token": (lambda v: v is None or (_is_int(v) and v >= 0), "a token id or null"),
    "tokens": (lambda v: v is None or (_is_int(v) and v >= 0) or (
        isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)),
        "a token id, a list of token ids, or null"),
    "indexes": (lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v),
                "a list of non-negative integers"),
    "section": (lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(x) and x >= 0 for x in v),
                "a list of 3 non-negative integers (temporal, height, width)"),
}
_VISION_KINDS = {
    **{k: "count" for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                            "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size",
                            "tokens_per_second")},
    "fullatt_block_indexes": "indexes",
}
_TEXT_KINDS = {
    **{k: "count" for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "num_key_value_heads", "max_position_embeddings")},
    "rms_norm_eps": "positive", "bos_token_id": "token", "eos_token_id": "tokens", "pad_token_id": "token",
    "tie_word_embeddings": "bool",
}
_ROOT_KINDS = {
    **{k: "index" for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")},
    "bos_token_id": "token", "eos_token_id": "tokens", "pad_token_id": "token", "tie_word_embeddings": "bool",
}
_REQUIRED_VISION = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "tokens_per_second")
_REQUIRED_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps")


def _check_values(d: Mapping[str, Any], kinds: Mapping[str, str], where: str, required=()) -> None:
  for key in required:
    if key not in d:
      raise ValueError(f"{where}{key} is missing; expected {_KINDS[kinds[key]][1]} (EEmo-JAX builds the model from "
                       "config.json alone and does not guess sizes)")
  for key, kind in kinds.items():
    ok, expected = _KINDS[kind]
    if key in d and not ok(d[key]):
      raise ValueError(f"{where}{key} is {_show(d[key])}; expected {expected}")


def _show(value) -> str:
  text = json.dumps(value)
  text = text if len(text) <= 60 else text[:57] + "..."
  kind = {str: "a string", bool: "a boolean", list: "a list", dict: "an object", type(None): "null",
          float: "a number"}.get(type(value))
  return f"{text} ({kind})" if kind else text


def _sub_config(hf: Mapping[str, Any], key: str) -> dict:
  sub = hf.get(key)
  if sub is not None and not isinstance(sub, Mapping):
    raise ValueError(f"{key} is {_show(sub)}; expected a JSON object")
  return dict(sub or {})


def _from_hf(hf: Mapping[str, Any]) -> Qwen25VLConfig:
  if not isinstance(hf, Mapping):
    raise ValueError(f"expected a JSON object at the top level (an HF config.json), got {_show(hf)}")
  hf = dict(hf)
  if hf.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
    raise ValueError(f"model_type is {hf.get('model_type')!r}; EEmo-JAX loads Qwen2.5-VL ('qwen2_5_vl') only")
  vision_d = _sub_config(hf, "vision_config")
  # 5.x nests the text fields; 4.x Hub configs keep them flat at the root (spec §1.1).
  text_d = _sub_config(hf, "text_config")
  text_where = "text_config." if text_d else ""
  text_d = text_d or {k: v for k, v in hf.items() if k in _TEXT_FIELDS | {
      "rope_parameters", "rope_scaling", "rope_theta", "hidden_act", "use_sliding_window"}}
  if vision_d.get("hidden_act", "silu") != "silu" or text_d.get("hidden_act", "silu") != "silu":
    raise ValueError("Only hidden_act='silu' is implemented for Qwen2.5-VL")
  if text_d.get("use_sliding_window"):
    raise ValueError("use_sliding_window=True is not supported (the released checkpoints do not use it)")
  text_d.pop("use_sliding_window", None)
  text_d.pop("hidden_act", None)
  vision_d.pop("hidden_act", None)

  _check_known(vision_d, _VISION_FIELDS | _IGNORED_VISION, "vision")
  _check_known(text_d, _TEXT_FIELDS | {"bos_token_id", "eos_token_id", "pad_token_id",
                                       "tie_word_embeddings"}, "text")
  root_known = _ROOT_FIELDS | _TEXT_FIELDS | {"hidden_act", "use_sliding_window", "vision_start_token_id"}
  _check_known(hf, root_known, "root")
  _check_values(vision_d, _VISION_KINDS, "vision_config.", _REQUIRED_VISION)
  _check_values(text_d, _TEXT_KINDS, text_where, _REQUIRED_TEXT)
  _check_values(hf, _ROOT_KINDS, "")

  v_theta, _ = _rope(vision_d, 10000.0, "vision_config.")
  vision = VisionConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                           for k, v in vision_d.items() if k in _VISION_FIELDS}, rope_theta=v_theta)
  theta, section = _rope(text_d, 1_000_000.0, text_where)
  text = TextConfig(**{k: v for k, v in text_d.items() if k in _TEXT_FIELDS}, rope_theta=theta,
                    **({"mrope_section": section} if section is not None else {}))

  def root_or_text(key, default):
    return hf.get(key, text_d.get(key, default))

  tie = bool(hf.get("tie_word_embeddings", False)) or bool(text_d.get("tie_word_embeddings", False))
  eos = root_or_text("eos_token_id", None)
  return Qwen25VLConfig(
      vision=vision, text=text,
      image_token_id=hf.get("image_token_id", 151655), video_token_id=hf.get("video_token_id", 151656),
      vision_start_token_id=hf.get("vision_start_token_id", 151652),
      vision_end_token_id=hf.get("vision_end_token_id", 151653),
      tie_word_embeddings=tie, bos_token_id=root_or_text("bos_token_id", None),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=root_or_text("pad_token_id", None))


def _to_hf(cfg: Qwen25VLConfig) -> dict[str, Any]:
  v, t = cfg.vision, cfg.text
  vision = {
      "depth": v.depth, "fullatt_block_indexes": list(v.fullatt_block_indexes), "hidden_act": "silu",
      "hidden_size": v.hidden_size, "in_channels": v.in_channels, "initializer_range": 0.02,
      "intermediate_size": v.intermediate_size, "model_type": "qwen2_5_vl_vision", "num_heads": v.num_heads,
      "out_hidden_size": v.out_hidden_size, "patch_size": v.patch_size,
      "rope_parameters": {"rope_theta": v.rope_theta, "rope_type": "axial"},
      "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
      "tokens_per_second": v.tokens_per_second, "window_size": v.window_size,
  }
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  text = {
      "attention_dropout": 0.0, "bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "hidden_act": "silu",
      "hidden_size": t.hidden_size, "initializer_range": 0.02, "intermediate_size": t.intermediate_size,
      "max_position_embeddings": t.max_position_embeddings, "model_type": "qwen2_5_vl_text",
      "num_attention_heads": t.num_attention_heads, "num_hidden_layers": t.num_hidden_layers,
      "num_key_value_heads": t.num_key_value_heads, "pad_token_id": cfg.pad_token_id,
      "rms_norm_eps": t.rms_norm_eps,
      "rope_parameters": {"mrope_section": list(t.mrope_section), "rope_theta": t.rope_theta,
                          "rope_type": "default"},
      "sliding_window": None, "use_cache": True, "use_sliding_window": False, "vocab_size": t.vocab_size,
  }
  return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
      "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
      "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
      "tie_word_embeddings": cfg.tie_word_embeddings, "text_config": text, "vision_config": vision,
      "transformers_version": "5.23.0",
  }


def load_hf_config(path: str) -> Qwen25VLConfig:
  with open(path) as f:
    return Qwen25VLConfig.from_hf(json.load(f))
