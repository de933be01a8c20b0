"""EEmo-JAX: Qwen2.5-VL for image-evoked emotion (EmoVerse, EEmo-Logic) in JAX and Flax NNX.

    import eemo_jax
    model = eemo_jax.load_hf("path/to/Qwen2.5-VL-3B-Instruct", dtype="bfloat16")
    out = model(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...)
    eemo_jax.save_hf(model, "out_dir")
    tokens = eemo_jax.generate(model, input_ids=..., max_new_tokens=64, temperature=0.0)

Names are imported on first use, so `import eemo_jax` stays cheap for data-loading workers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_hf": "eemo_jax.hf.load",
    "save_hf": "eemo_jax.hf.save",
    "generate": None,  # the eemo_jax.generate package, which is callable
    "Qwen25VL": "eemo_jax.model.qwen25vl",
    "Qwen25VLConfig": "eemo_jax.model.config",
    "prepare_inputs": "eemo_jax.model.qwen25vl",
    "make_mesh": "eemo_jax.parallel.sharding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name == "generate":
    return importlib.import_module("eemo_jax.generate")
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'eemo_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
