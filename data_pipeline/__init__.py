"""Data for EEmo-JAX: TFDS/ArrayRecord builders, the HF-exact image processor, prompts and the Grain pipeline.

Exports resolve lazily, so importing one piece (e.g. the image processor in a worker process) does not import
TensorFlow Datasets or Grain.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "preprocess_image": "data_pipeline.image_processor",
    "smart_resize": "data_pipeline.image_processor",
}


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
