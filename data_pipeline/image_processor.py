"""Qwen2.5-VL image preprocessing with the same output as transformers' PIL backend, bit for bit.

Without torchvision, transformers 5.23 resolves `qwen2_5_vl` to `Qwen2VLImageProcessorPil`. Its torchvision
backend gives slightly different pixels (it uses antialiased bicubic). This module repeats the PIL class step by step,
so the `pixel_values` a Grain worker makes equal the reference's:

1. Convert to RGB the way `transformers.image_transforms.convert_to_rgb` does for PIL images and arrays. For
   paths and encoded bytes, follow `transformers.image_utils.load_image` (see `_to_rgb`).
2. Choose the size with `smart_resize`: both sides are multiples of patch_size * merge_size and the area lies in
   [min_pixels, max_pixels]. Then resize the uint8 image with PIL BICUBIC.
3. Rescale and normalise: `x.astype(float64) * (1/255)`, cast to float32, then `(x - mean) / std` in float32.
   A uint8 pixel has only 256 levels, so `_normalization_table` runs these operations once per level in the same
   dtypes. A gather then gives the same bits as running them on every pixel, and it is much cheaper.
4. Patchify: patches come in merge-window-major order, and each is repeated temporal_patch_size times (an image is
   treated as a one-frame video).

Only numpy and PIL are imported, because this runs in data-loader worker processes.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from eemo_jax import paths

# OpenAI CLIP statistics (transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), Qwen2-VL's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Qwen2VLImageProcessorPil.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}. The released
# checkpoints' preprocessor_config.json raise max_pixels to 12845056; read it with ImageProcessorConfig.from_hf.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200
RESCALE_FACTOR = 1 / 255  # transformers' default rescale_factor, 0.00392156862745098
# Pixel-count limits, checked on the header before anything is decoded (`PixelLimitError`). Decoding and resizing
# costs about 12 bytes of host memory per source pixel (a 144-megapixel PNG of 449 KB peaked at 1.7 GB in one
# decode + resize), and a training host decodes in several threads and workers at once.
# An image may have PIXEL_LIMIT_MARGIN times the pixels it is resized to (a 16x downscale per side): every
# camera photo up to 51 megapixels at EmoVerse's max_pixels (200704). Above that the decode costs hundreds of
# times what the model sees, and such files are scans, panoramas or decompression bombs.
PIXEL_LIMIT_MARGIN = 256
# ... but never more than PIL's own decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS at import,
# 89,478,485 pixels, ~1 GB at the peak above), whatever max_pixels is (the released checkpoints' 12845056
# would otherwise allow 3.3 gigapixels).
PIXEL_LIMIT_CAP = 89_478_485

ImageInput = Any  # PIL.Image.Image | np.ndarray | str | os.PathLike | bytes


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
  """Returns the (height, width) an image is resized to: multiples of `factor`, area in [min_pixels, max_pixels].

  The arithmetic is transformers' `smart_resize`, including Python's round, which rounds half to even
  (42 / 28 = 1.5 rounds to 2, and 70 / 28 = 2.5 also rounds to 2). So grids and placeholder counts agree with
  the reference. A too-large image is scaled down and a too-small one scaled up, keeping the aspect ratio
  as closely as the multiples of `factor` allow.
  """
  if min(height, width) <= 0:
    raise ValueError(f"Image has no pixels ({height}x{width}); check that it decoded correctly.")
  aspect = max(height, width) / min(height, width)
  if aspect > MAX_ASPECT_RATIO:
    raise ValueError(f"Image of {height}x{width} pixels has aspect ratio {aspect:.1f}; the Qwen2-VL image processor "
                     f"accepts at most {MAX_ASPECT_RATIO} (transformers raises here too). Crop or pad the image first.")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def num_image_tokens(grid_thw, merge_size: int = 2):
  """Counts the `<|image_pad|>` placeholders for an image: t * h * w // merge_size**2.

  This is how transformers' Qwen2.5-VL processor expands each placeholder, because the patch merger turns every
  merge_size x merge_size patches into one LLM token. `grid_thw` is one (t, h, w) row, which gives an int, or an
  (n, 3) array such as `image_grid_thw`, which gives an (n,) int64 array.
  """
  grid = np.asarray(grid_thw, dtype=np.int64)
  if grid.shape[-1:] != (3,):
    raise ValueError(f"grid_thw must hold (t, h, w) rows, got shape {grid.shape}")
  counts = grid.prod(axis=-1) // merge_size**2
  return int(counts) if counts.ndim == 0 else counts


def default_pixel_limit(max_pixels: int) -> int:
  """The most pixels an encoded image may have before decoding, for images resized to <= max_pixels."""
  return min(PIXEL_LIMIT_CAP, PIXEL_LIMIT_MARGIN * int(max_pixels))


class PixelLimitError(ValueError):
  """An encoded image declares more pixels than allowed; it was refused from its header, before decoding.

  `pixels` is None when PIL itself refused to open it (above twice its bomb threshold, size not reported).
  """

  def __init__(self, name: str, size: tuple[int, int] | None, limit: int):
    self.pixels = size[0] * size[1] if size is not None else None
    self.limit = limit
    has = (f"has {size[0]}x{size[1]} = {self.pixels:,} pixels" if size is not None else
           "has more pixels than PIL opens (it refuses a possible decompression bomb)")
    super().__init__(f"The image {name} {has}, more than the limit of {limit:,}; it was not decoded")


def preprocess_image(image: ImageInput, *, min_pixels: int = DEFAULT_MIN_PIXELS,
                     max_pixels: int = DEFAULT_MAX_PIXELS, patch_size: int = 14, merge_size: int = 2,
                     temporal_patch_size: int = 2, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD, max_image_pixels: int | None = None) -> dict[str, np.ndarray]:
  """Makes the vision tower's inputs for one image, as `Qwen2VLImageProcessorPil` would.

  `image` can be:
  * a PIL image. Transparency is composited onto white.
  * a uint8 (or other integer, values <= 255) numpy array: (H, W), (H, W, C) or (C, H, W), with C in {1, 3, 4}.
    As in transformers, if the first axis is 1, 3 or 4 the array is read as channels-first.
  * a file path or the encoded file's bytes. Like transformers' `load_image`, this applies the EXIF orientation
    and drops an alpha channel without compositing it (a transparency key is still composited onto white).

  16-bit images are not rescaled, because transformers does not rescale them either. PIL clips "I;16"/"I"
  grayscale to 255 when converting it to RGB, so a 16-bit grayscale photo comes out nearly white. PIL reads a
  16-bit RGB PNG as the high byte of each sample. A uint16 array above 255 is an error in transformers and here.

  `max_image_pixels` refuses a file or bytes whose header declares more pixels (`PixelLimitError`) before
  decoding it; None (transformers' behaviour) leaves only PIL's decompression-bomb check.

  Returns {"pixel_values": float32 (patches, 3 * T * P * P), "image_grid_thw": int64 (1, 3)}. Concatenate the
  rows of several images, as transformers does for a batch.
  """
  _check_settings(min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size, mean, std)
  rgb = _to_rgb(image, max_image_pixels)
  height, width = smart_resize(rgb.height, rgb.width, patch_size * merge_size, min_pixels, max_pixels)
  if (width, height) != rgb.size:  # transformers resizes to the same size too; PIL then returns a copy
    rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
  table = _normalization_table(tuple(map(float, mean)), tuple(map(float, std)))
  pixel_values = _patchify(np.asarray(rgb), table, patch_size, merge_size, temporal_patch_size)
  grid = np.array([[1, height // patch_size, width // patch_size]], dtype=np.int64)
  return {"pixel_values": pixel_values, "image_grid_thw": grid}


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """The settings `preprocess_image` takes, usually read from a model folder's preprocessor_config.json."""

  patch_size: int = 14
  merge_size: int = 2
  temporal_patch_size: int = 2
  min_pixels: int = DEFAULT_MIN_PIXELS
  max_pixels: int = DEFAULT_MAX_PIXELS
  mean: tuple[float, ...] = CLIP_MEAN
  std: tuple[float, ...] = CLIP_STD

  def __post_init__(self):
    object.__setattr__(self, "mean", tuple(map(float, self.mean)))
    object.__setattr__(self, "std", tuple(map(float, self.std)))
    _check_settings(self.min_pixels, self.max_pixels, self.patch_size, self.merge_size, self.temporal_patch_size,
                    self.mean, self.std)

  def preprocess(self, image: ImageInput) -> dict[str, np.ndarray]:
    """`preprocess_image` with these settings."""
    return preprocess_image(image, **dataclasses.asdict(self))

  @classmethod
  def from_hf(cls, preprocessor_config: Mapping[str, Any]) -> ImageProcessorConfig:
    """Reads the dict of a preprocessor_config.json, or of a transformers 5 processor_config.json.

    Pixel limits can be written as top-level `min_pixels`/`max_pixels` (the released checkpoints) or as
    `size={"shortest_edge", "longest_edge"}` (what transformers 5 saves). As in transformers, the top-level keys
    win when a file has both. Settings this module does not implement, such as another resample filter,
    do_resize=false or unknown keys, raise an error instead of giving different pixels.
    """
    d = dict(preprocessor_config)
    if isinstance(d.get("image_processor"), Mapping):  # processor_config.json nests the image processor
      d = dict(d["image_processor"])
    unknown = sorted(set(d) - _CONFIG_FIELDS - set(_FIXED_FIELDS) - _IGNORED_FIELDS)
    if unknown:
      raise ValueError(f"Unsupported field(s) {unknown} in the image processor config. If they do not change the "
                       "pixels, add them to _IGNORED_FIELDS in data_pipeline/image_processor.py.")
    for key, supported in _FIXED_FIELDS.items():
      if d.get(key) is not None and d[key] != supported:
        raise ValueError(f"Image processor config has {key}={d[key]!r}; only {supported!r} (the Qwen2-VL default) "
                         "is implemented.")
    kind = d.get("image_processor_type")
    if kind is not None and not kind.startswith("Qwen2VLImageProcessor"):
      raise ValueError(f"image_processor_type is {kind!r}; this module reproduces Qwen2VLImageProcessor only.")
    size = d.get("size") or {"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": DEFAULT_MAX_PIXELS}
    min_pixels = d["min_pixels"] if d.get("min_pixels") is not None else size.get("shortest_edge")
    max_pixels = d["max_pixels"] if d.get("max_pixels") is not None else size.get("longest_edge")
    if min_pixels is None or max_pixels is None:
      raise ValueError(f"Image processor config has size={size!r} and no min_pixels/max_pixels. transformers 5.23 "
                       "needs size={'shortest_edge': ..., 'longest_edge': ...} (it rejects this file too); add "
                       "top-level min_pixels and max_pixels.")
    return cls(patch_size=d.get("patch_size", 14), merge_size=d.get("merge_size", 2),
               temporal_patch_size=d.get("temporal_patch_size", 2), min_pixels=min_pixels, max_pixels=max_pixels,
               mean=_per_channel(d.get("image_mean", CLIP_MEAN)), std=_per_channel(d.get("image_std", CLIP_STD)))

  @classmethod
  def from_folder(cls, folder: str | os.PathLike) -> ImageProcessorConfig:
    """Reads a model folder's preprocessor_config.json (or processor_config.json if it has only that)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
      path = paths.join(folder, name)
      if paths.isfile(path):
        return cls.from_hf(json.loads(paths.read_text(path)))
    raise FileNotFoundError(f"No preprocessor_config.json or processor_config.json in {os.fspath(folder)!r}; "
                            "point to the Hugging Face model folder, or build ImageProcessorConfig(...) directly.")


_CONFIG_FIELDS = frozenset({"min_pixels", "max_pixels", "size", "patch_size", "temporal_patch_size", "merge_size",
                            "image_mean", "image_std"})
# Fields that only work at transformers' default value here: any other value changes the pixels in a way this module
# does not implement.
_FIXED_FIELDS = {"do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
                 "resample": 3, "rescale_factor": RESCALE_FACTOR}
# File metadata, plus generic ImagesKwargs that Qwen2VLImageProcessorPil._preprocess accepts and never uses.
_IGNORED_FIELDS = frozenset({"image_processor_type", "processor_class", "default_to_square", "do_center_crop",
                             "crop_size", "do_pad", "pad_size", "data_format", "device", "return_tensors",
                             "disable_grouping", "image_seq_length"})


def _per_channel(value) -> tuple[float, ...]:
  """Takes a list of 3 values, or one scalar used for every channel (as transformers' normalize does)."""
  return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(map(float, value))


def _check_settings(min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size, mean, std) -> None:
  for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels), ("patch_size", patch_size),
                      ("merge_size", merge_size), ("temporal_patch_size", temporal_patch_size)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  for name, value in (("mean", mean), ("std", std)):
    if len(value) != 3:
      raise ValueError(f"{name} needs one value per RGB channel, got {value!r}")
  if any(s == 0 for s in std):
    raise ValueError(f"std must be non-zero, got {std!r}")


# --- RGB conversion ------------------------------------------------------------------------------------------------


def _to_rgb(image: ImageInput, max_image_pixels: int | None = None) -> Image.Image:
  """An RGB PIL image, converted as transformers converts this kind of input.

  Encoded inputs (paths, bytes) over `max_image_pixels` raise `PixelLimitError` before being decoded; arrays
  and PIL images are already decoded, so the limit does not apply to them.
  """
  if isinstance(image, Image.Image):
    return _pil_to_rgb(image)
  if isinstance(image, np.ndarray):
    return _array_to_rgb(image)
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"No image file at {path!r}")
    return _load_rgb(path, path, max_image_pixels)
  if isinstance(image, (bytes, bytearray)):
    return _load_rgb(io.BytesIO(image), f"<{len(image)} bytes>", max_image_pixels)
  raise TypeError(f"Cannot preprocess a {type(image).__name__}; pass a PIL image, a numpy array, a file path or "
                  "the encoded file's bytes.")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
  """transformers' `convert_to_rgb`: any transparency is composited onto white, then the mode becomes RGB.

  Everything else is PIL's own conversion, so the quirks are transformers' too. Grayscale and palette images are
  expanded. 16-bit "I;16" and 32-bit "I" images are clipped to [0, 255], not scaled, so most 16-bit
  photographs come out nearly white.
  """
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image if image.mode == "RGB" else image.convert("RGB")


def _load_rgb(source, name: str, max_image_pixels: int | None = None) -> Image.Image:
  """transformers' `load_image` (EXIF orientation, then `convert("RGB")`), followed by `_pil_to_rgb` as in HF.

  An alpha channel is dropped by the first `convert("RGB")` and never reaches the white compositing. So an RGBA or
  LA file gives a different result from a path than from the same image opened first, in transformers and here
  alike. A palette/RGB/L transparency key survives the conversion in `info`, so it is still composited.
  """
  try:
    with Image.open(source) as opened:  # reads the header only
      if max_image_pixels is not None and opened.width * opened.height > max_image_pixels:
        raise PixelLimitError(name, opened.size, max_image_pixels)
      loaded = ImageOps.exif_transpose(opened).convert("RGB")
  except Image.DecompressionBombError as e:
    if max_image_pixels is not None:
      raise PixelLimitError(name, None, max_image_pixels) from e
    raise ValueError(f"Cannot read the image {name}: {e}. Is it a complete image file?") from e
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"Cannot read the image {name}: {e}. Is it a complete image file?") from e
  return _pil_to_rgb(loaded)


def _array_to_rgb(array: np.ndarray) -> Image.Image:
  """transformers' numpy path: infer the channel axis, expand gray, composite RGBA onto white, require <= 255."""
  if not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f"Image arrays must hold integers in [0, 255] (uint8), got dtype {array.dtype}; convert a "
                    "float image in [0, 1] with (x * 255).round().astype(np.uint8).")
  if array.ndim == 2:  # grayscale; transformers accepts only its (H, W, 1) form
    array = array[:, :, None]
  elif array.ndim == 3:
    # transformers' infer_channel_dimension_format: if the first axis is 1, 3 or 4, the array is channels-first,
    # even when the last axis would also fit (transformers only logs a warning then).
    if array.shape[0] in (1, 3, 4):
      array = np.moveaxis(array, 0, -1)
    elif array.shape[-1] not in (1, 3, 4):
      raise ValueError(f"Cannot find the channel axis of an image array of shape {array.shape}; expected "
                       "(H, W, C) or (C, H, W) with C = 1, 3 or 4.")
  else:
    raise ValueError(f"Image arrays must be (H, W), (H, W, C) or (C, H, W); got shape {array.shape}")
  channels = array.shape[-1]  # array is now (H, W, C)
  if channels == 1:
    rgb = np.repeat(array, 3, axis=-1)
  elif channels == 4:
    alpha = array[..., 3:4] / 255  # (H, W, 1) float64, as in transformers
    rgb = np.round(alpha * array[..., :3] + (1 - alpha) * 255)
  else:
    rgb = array
  if array.dtype != np.uint8 and (rgb.min() < 0 or rgb.max() > 255):
    raise ValueError(f"Image array of dtype {array.dtype} has values in [{rgb.min()}, {rgb.max()}]; the Qwen2-VL "
                     "processor takes 8-bit values (transformers rejects this array too). Scale it to uint8 first, "
                     "e.g. (x >> 8).astype(np.uint8) for 16-bit data.")
  return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))


# --- normalisation and patches -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """(3, 256) float32: the normalised value of every uint8 level in every channel.

  It runs transformers' operations in transformers' dtypes: `level.astype(float64) * rescale_factor` cast to
  float32, then `(x - mean) / std` with float32 mean and std. Each output element depends only on its own level,
  and IEEE arithmetic is the same elementwise, so a lookup gives exactly the bits of the per-pixel computation.
  """
  levels = (np.arange(256).astype(np.float64) * RESCALE_FACTOR).astype(np.float32)  # (256,)
  mean32 = np.asarray(mean, dtype=np.float32)[:, None]  # (3, 1)
  std32 = np.asarray(std, dtype=np.float32)[:, None]
  table = (levels[None, :] - mean32) / std32  # (3, 256) float32
  table.setflags(write=False)
  return table


def _patchify(pixels: np.ndarray, table: np.ndarray, patch_size: int, merge_size: int,
              temporal_patch_size: int) -> np.ndarray:
  """(H, W, C) uint8 -> (patches, C * T * P * P) float32, in the order the vision tower expects.

  Rows run over merge windows in raster order, then over the merge_size**2 patches inside a window, also in raster
  order. Columns are (channel, time, py, px), with the image repeated over time. The uint8 image is rearranged first,
  because it has a quarter of float32's bytes. Each channel is then gathered from `table` straight into place.
  """
  height, width, channels = pixels.shape
  p, m, t = patch_size, merge_size, temporal_patch_size
  rows, cols = height // (p * m), width // (p * m)  # merge windows down and across
  n = rows * cols * m * m
  windows = pixels.reshape(rows, m, p, cols, m, p, channels)  # (rows, mh, py, cols, mw, px, C)
  windows = windows.transpose(6, 0, 3, 1, 4, 2, 5)  # (C, rows, cols, mh, mw, py, px)
  out = np.empty((n, channels, t, p, p), dtype=np.float32)  # (patches, C, T, P, P)
  for c in range(channels):
    # mode="clip" skips the bounds-check buffering; uint8 indices are always inside the 256-entry table.
    np.take(table[c], windows[c].reshape(n, p, p), out=out[:, c, 0], mode="clip")
  out[:, :, 1:] = out[:, :, :1]  # the temporal copies of the single frame
  return out.reshape(n, channels * t * p * p)
