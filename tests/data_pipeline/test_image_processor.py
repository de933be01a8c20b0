"""The image processor against transformers 5.23's `Qwen2VLImageProcessorPil` on the same inputs.

The first test checks that this is the class AutoImageProcessor picks for a Qwen2.5-VL folder when torchvision is
absent. Every other case needs the same `image_grid_thw` and max |Δpixel_values| <= 1e-5 (the measured difference
is 0.0 throughout: the port runs transformers' operations in the same dtypes). Photographs are in
tests/data/photos; grayscale, alpha, palette and 16-bit variants are made from them here.
"""

import dataclasses
import glob
import inspect
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor, Qwen2VLImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from data_pipeline import image_processor as ip

TOLERANCE = 1e-5
PHOTO_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "data", "photos")
PHOTOS = sorted(glob.glob(os.path.join(PHOTO_DIR, "*.jpg")))
HUB_CONFIG = {  # the layout of the released Qwen2.5-VL preprocessor_config.json files
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


def hf_preprocess(image, **settings):
  """transformers' output as numpy. Pixel limits go to the constructor, like a preprocessor_config.json."""
  out = Qwen2VLImageProcessorPil(**settings)(image, return_tensors="np")
  return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def assert_same(ours, ref):
  np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
  assert ours["image_grid_thw"].dtype == np.int64 and ours["pixel_values"].dtype == np.float32
  assert ours["pixel_values"].shape == ref["pixel_values"].shape
  assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= TOLERANCE


def photo(name: str = "chelsea") -> Image.Image:
  with Image.open(os.path.join(PHOTO_DIR, f"{name}.jpg")) as im:
    return im.convert("RGB")


def test_photos_are_present_and_small():
  assert len(PHOTOS) == 3, "tests/data/photos should hold three .jpg photographs"
  assert sum(os.path.getsize(p) for p in PHOTOS) < 300_000


# --- the reference class and the defaults ---------------------------------------------------------------------------


def test_auto_image_processor_for_qwen25vl_is_the_pil_backend(tmp_path):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(HUB_CONFIG))
  resolved = AutoImageProcessor.from_pretrained(str(tmp_path))
  assert type(resolved) is Qwen2VLImageProcessorPil
  assert resolved.backend == "pil"


def test_defaults_equal_transformers_class_defaults():
  hf = Qwen2VLImageProcessorPil()
  ours = ip.ImageProcessorConfig()
  assert (ours.min_pixels, ours.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
  assert (ours.patch_size, ours.merge_size, ours.temporal_patch_size) == (
      hf.patch_size, hf.merge_size, hf.temporal_patch_size)
  assert ours.mean == tuple(hf.image_mean) and ours.std == tuple(hf.image_std)
  assert hf.resample == Image.Resampling.BICUBIC and hf.rescale_factor == ip.RESCALE_FACTOR
  hf_defaults = inspect.signature(hf_smart_resize).parameters
  our_defaults = inspect.signature(ip.smart_resize).parameters
  for name in ("factor", "min_pixels", "max_pixels"):
    assert our_defaults[name].default == hf_defaults[name].default, name
  kwargs = inspect.signature(ip.preprocess_image).parameters
  assert {k: kwargs[k].default for k in ("min_pixels", "max_pixels", "patch_size", "merge_size",
                                         "temporal_patch_size", "mean", "std")} == dataclasses.asdict(ours)


# --- smart_resize ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,max_pixels,expected", [
    ((480, 640), 1003520, (476, 644)), ((100, 150), 1003520, (112, 140)), ((28, 28), 1003520, (56, 56)),
    ((10, 1000), 1003520, (28, 560)), ((224, 224), 1003520, (224, 224)), ((3000, 4000), 1003520, (840, 1148)),
    ((3000, 4000), 12845056, (2996, 4004))])
def test_smart_resize_spec_examples(size, max_pixels, expected):
  ours = ip.smart_resize(*size, factor=28, min_pixels=3136, max_pixels=max_pixels)
  assert ours == hf_smart_resize(*size, factor=28, min_pixels=3136, max_pixels=max_pixels) == expected


def test_smart_resize_rounds_half_to_even_like_python():
  # 42 / 28 = 1.5 -> 2 and 70 / 28 = 2.5 -> 2 (not 3): Python's round, as in transformers.
  for size in [(42, 70), (70, 42), (70, 98), (126, 154)]:
    assert ip.smart_resize(*size) == hf_smart_resize(*size)
  assert ip.smart_resize(70, 70, min_pixels=1) == (56, 56)


def test_smart_resize_matches_transformers_on_random_sizes():
  rng = np.random.default_rng(0)
  heights = np.exp(rng.uniform(0, np.log(20000), 1500)).astype(int) + 1
  widths = np.clip((heights * np.exp(rng.uniform(-np.log(250), np.log(250), 1500))).astype(int), 1, None)
  half_steps = [(14 * a, 14 * b) for a in range(1, 40, 2) for b in range(1, 40, 3)]  # exact .5 ratios to 28
  settings = [(28, 3136, 1003520), (28, 3136, 12845056), (28, 262144, 4194304), (28, 3136, 224 * 224),
              (32, 4096, 16384 * 28), (28, 1, 10**9)]
  compared = 0
  for factor, lo, hi in settings:
    for h, w in [*zip(heights.tolist(), widths.tolist()), *half_steps]:
      try:
        expected = hf_smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
      except ValueError:
        with pytest.raises(ValueError, match="aspect ratio"):
          ip.smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
        continue
      assert ip.smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi) == expected, (h, w, factor, lo, hi)
      compared += 1
  assert compared > 8000  # most sizes are within the aspect limit; the rest checked the error above


def test_aspect_ratio_limit_is_200_inclusive():
  assert ip.smart_resize(28, 5600) == hf_smart_resize(28, 5600)  # exactly 200 is allowed
  for size in [(28, 5601), (10000, 28)]:
    with pytest.raises(ValueError, match="aspect ratio"):
      hf_smart_resize(*size)
    with pytest.raises(ValueError, match=r"aspect ratio \d+\.\d.*at most 200.*Crop or pad"):
      ip.smart_resize(*size)


# --- photographs ----------------------------------------------------------------------------------------------------

PIXEL_SETTINGS = {
    "class defaults": {},
    "down to ~224x224": {"min_pixels": 3136, "max_pixels": 224 * 224},
    "exactly 448x448 budget": {"min_pixels": 448 * 448, "max_pixels": 448 * 448},
    "up to >= 800x800": {"min_pixels": 800 * 800, "max_pixels": 12845056},
}


@pytest.mark.parametrize("setting", list(PIXEL_SETTINGS))
@pytest.mark.parametrize("path", PHOTOS, ids=os.path.basename)
def test_photograph_matches_transformers(path, setting):
  settings = PIXEL_SETTINGS[setting]
  with Image.open(path) as image:
    assert_same(ip.preprocess_image(image, **settings), hf_preprocess(image, **settings))


@pytest.mark.parametrize("path", PHOTOS, ids=os.path.basename)
def test_path_and_bytes_match_transformers_given_the_path(path):
  ref = hf_preprocess(path, max_pixels=300 * 300)
  assert_same(ip.preprocess_image(path, max_pixels=300 * 300), ref)
  with open(path, "rb") as f:
    assert_same(ip.preprocess_image(f.read(), max_pixels=300 * 300), ref)


def test_other_patch_and_merge_sizes_and_statistics():
  settings = dict(min_pixels=5000, max_pixels=120_000, patch_size=16, merge_size=3, temporal_patch_size=3)
  ours = ip.preprocess_image(photo("coffee"), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), **settings)
  ref = hf_preprocess(photo("coffee"), image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0], **settings)
  assert_same(ours, ref)


def test_several_images_concatenate_like_a_transformers_batch():
  images = [photo(name) for name in ("astronaut", "chelsea", "coffee")]
  ours = [ip.preprocess_image(im, max_pixels=200 * 200) for im in images]
  ref = hf_preprocess(images, max_pixels=200 * 200)
  assert_same({"pixel_values": np.concatenate([o["pixel_values"] for o in ours]),
               "image_grid_thw": np.concatenate([o["image_grid_thw"] for o in ours])}, ref)


# --- extreme sizes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (1, 3), (27, 29), (50, 9000), (9000, 50), (28, 5600)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_extreme_sizes_match_transformers(size):
  height, width = size
  image = photo("astronaut").resize((width, height), Image.Resampling.BILINEAR)
  assert_same(ip.preprocess_image(image), hf_preprocess(image))


def test_one_pixel_upscales_to_the_minimum():
  ours = ip.preprocess_image(photo().crop((100, 100, 101, 101)))
  assert ours["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56: the smallest area >= min_pixels = 56*56


def test_aspect_ratio_above_200_is_rejected_by_both():
  image = photo("astronaut").resize((10000, 28), Image.Resampling.BILINEAR)  # aspect 357
  with pytest.raises(ValueError, match="aspect ratio"):
    hf_preprocess(image)
  with pytest.raises(ValueError, match="aspect ratio 357.1.*Crop or pad"):
    ip.preprocess_image(image)


# --- image modes (PIL objects, files, arrays) -----------------------------------------------------------------------


def with_alpha(image: Image.Image) -> Image.Image:
  """The photo, fully transparent in its left quarter, then opaque by a ramp to 255 at the right edge."""
  rgba = image.convert("RGBA")
  ramp = np.clip(np.linspace(-85, 255, image.width), 0, 255).astype(np.uint8)
  ramp = np.broadcast_to(ramp, (image.height, image.width))
  rgba.putalpha(Image.fromarray(np.ascontiguousarray(ramp)))
  return rgba


def with_transparency_key(image: Image.Image, key) -> Image.Image:
  """A transparency key instead of an alpha channel: pixels of value `key` are see-through (PNG tRNS)."""
  image = image.copy()
  image.info["transparency"] = key
  return image


def mode_variants():
  base = photo("chelsea")
  gray = np.asarray(base.convert("L"))
  return {
      "L": base.convert("L"),
      "LA": with_alpha(base).convert("LA"),
      "RGBA": with_alpha(base),
      "P": base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
      "P+transparency": with_transparency_key(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), 5),
      "L+transparency": with_transparency_key(base.convert("L"), int(gray[0, 0])),
      "RGB+transparency": with_transparency_key(base, tuple(int(v) for v in np.asarray(base)[0, 0])),
      "1": base.convert("1"),
      "CMYK": base.convert("CMYK"),
      "I;16 full range": Image.fromarray(gray.astype(np.uint16) * 257),  # clipped to 255 by PIL, not scaled
      "I;16 low values": Image.fromarray(gray.astype(np.uint16)),
      "I signed": Image.fromarray(gray.astype(np.int32) * 3 - 200),  # values below 0 and above 255
  }


@pytest.mark.parametrize("mode", list(mode_variants()))
def test_pil_image_modes_match_transformers(mode):
  image = mode_variants()[mode]
  assert_same(ip.preprocess_image(image, max_pixels=256 * 256), hf_preprocess(image, max_pixels=256 * 256))


def write_png16_rgb(path, rgb16: np.ndarray) -> None:
  """A 16-bit-per-channel RGB PNG, which PIL cannot write."""
  height, width, _ = rgb16.shape
  rows = rgb16.astype(">u2").reshape(height, width * 3).view(np.uint8)  # big-endian samples
  raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row

  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_files_in_each_mode_match_transformers_given_the_path(tmp_path):
  # A path goes through transformers' load_image first: convert("RGB") drops alpha channels before compositing,
  # while a transparency key survives in `info` and is still composited onto white.
  files = {}
  for mode, image in mode_variants().items():
    if mode not in ("1", "CMYK", "I;16 low values", "I signed"):  # PNG has these modes
      files[mode] = str(tmp_path / f"{mode.replace(' ', '_')}.png")
      image.save(files[mode])
  rgb = np.asarray(photo("coffee")).astype(np.uint16)
  files["16-bit RGB"] = str(tmp_path / "rgb16.png")
  low_byte = (np.arange(rgb.shape[1]) % 256).astype(np.uint16)[None, :, None]  # differs from the high byte
  write_png16_rgb(files["16-bit RGB"], rgb * 256 + low_byte)
  with Image.open(files["I;16 full range"]) as opened:
    assert opened.mode == "I;16"
  with Image.open(files["16-bit RGB"]) as opened:
    assert opened.mode == "RGB"  # PIL keeps the high byte of each 16-bit sample
  for mode, path in files.items():
    ours, ref = ip.preprocess_image(path, max_pixels=256 * 256), hf_preprocess(path, max_pixels=256 * 256)
    assert_same(ours, ref)
    with open(path, "rb") as f:  # encoded bytes behave like the path
      assert_same(ip.preprocess_image(f.read(), max_pixels=256 * 256), ref)


def test_alpha_from_a_path_is_dropped_but_from_pil_composited_on_white(tmp_path):
  image = with_alpha(photo("chelsea"))
  image.save(tmp_path / "rgba.png")
  from_path = ip.preprocess_image(str(tmp_path / "rgba.png"))["pixel_values"]
  from_pil = ip.preprocess_image(image)["pixel_values"]
  assert not np.array_equal(from_path, from_pil)  # transformers differs the same way (tested above)
  white = ip.preprocess_image(Image.new("RGB", image.size, (255, 255, 255)))["pixel_values"]
  assert np.abs(from_pil[0] - white[0]).max() < 1e-6  # the top-left patch is fully transparent


def test_exif_orientation_applies_to_paths_only(tmp_path):
  image = photo("coffee")  # 600 wide, 400 high
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
  path = str(tmp_path / "rotated.jpg")
  image.save(path, exif=exif, quality=90)
  from_path = ip.preprocess_image(path)
  assert_same(from_path, hf_preprocess(path))
  with Image.open(path) as opened:
    from_pil = ip.preprocess_image(opened)
    assert_same(from_pil, hf_preprocess(opened))
  assert from_path["image_grid_thw"].tolist() == [[1, 42, 28]]  # upright: taller than wide
  assert from_pil["image_grid_thw"].tolist() == [[1, 28, 42]]


def array_variants():
  rgb = np.asarray(photo("chelsea").resize((160, 120)))  # (120, 160, 3) uint8
  rgba = np.asarray(with_alpha(photo("chelsea").resize((160, 120))))
  return {
      "HWC uint8": rgb,
      "CHW uint8": np.ascontiguousarray(rgb.transpose(2, 0, 1)),
      "HW1 uint8": rgb[..., :1],
      "1HW uint8": rgb[None, ..., 0],
      "HWC RGBA uint8": rgba,
      "CHW RGBA uint8": np.ascontiguousarray(rgba.transpose(2, 0, 1)),
      "HWC uint16 <= 255": rgb.astype(np.uint16),
      "HWC RGBA uint16 <= 255": rgba.astype(np.uint16),
      "HWC int64 <= 255": rgb.astype(np.int64),
      "3x40x3, read as channels-first": rgb[:3, :40],
  }


@pytest.mark.parametrize("kind", list(array_variants()))
def test_arrays_match_transformers(kind):
  array = array_variants()[kind]
  assert_same(ip.preprocess_image(array, max_pixels=128 * 128), hf_preprocess(array, max_pixels=128 * 128))


def test_2d_gray_array_equals_transformers_on_its_hw1_form():
  gray = np.asarray(photo().convert("L"))  # transformers itself takes only (H, W, 1)
  assert_same(ip.preprocess_image(gray), hf_preprocess(gray[..., None]))


def test_uint16_array_above_255_is_rejected_by_both():
  array = np.asarray(photo()).astype(np.uint16) * 257
  with pytest.raises(ValueError, match="outside the range"):
    hf_preprocess(array)
  with pytest.raises(ValueError, match=r"8-bit values.*\(x >> 8\)"):
    ip.preprocess_image(array)


# --- configs from model folders -------------------------------------------------------------------------------------


def test_config_from_a_hub_style_folder_matches_auto_image_processor(tmp_path):
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({**HUB_CONFIG, "max_pixels": 320 * 320}))
  config = ip.ImageProcessorConfig.from_folder(tmp_path)
  assert (config.min_pixels, config.max_pixels) == (3136, 320 * 320)
  ref = AutoImageProcessor.from_pretrained(str(tmp_path))(photo("astronaut"), return_tensors="np")
  assert_same(config.preprocess(photo("astronaut")), ref)


def test_config_from_a_folder_saved_by_transformers(tmp_path):
  hf = Qwen2VLImageProcessorPil(min_pixels=5000, max_pixels=90_000, patch_size=16, merge_size=2,
                                image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
  hf.save_pretrained(str(tmp_path))
  assert "size" in json.loads((tmp_path / "preprocessor_config.json").read_text())  # the size={...} spelling
  config = ip.ImageProcessorConfig.from_folder(tmp_path)
  assert config == ip.ImageProcessorConfig(patch_size=16, min_pixels=5000, max_pixels=90_000,
                                           mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
  assert_same(config.preprocess(photo("coffee")), hf(photo("coffee"), return_tensors="np"))


def test_config_top_level_pixels_win_over_size_like_transformers():
  d = {**HUB_CONFIG, "min_pixels": 2000, "max_pixels": 50_000,
       "size": {"shortest_edge": 9999, "longest_edge": 99_999}}
  hf = Qwen2VLImageProcessorPil.from_dict(d)
  config = ip.ImageProcessorConfig.from_hf(d)
  assert (config.min_pixels, config.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge) == (2000, 50_000)
  old_spelling = {"size": {"min_pixels": 2000, "max_pixels": 50_000}, "min_pixels": 3000, "max_pixels": 60_000}
  assert ip.ImageProcessorConfig.from_hf(old_spelling).max_pixels == 60_000
  assert Qwen2VLImageProcessorPil.from_dict(old_spelling).size.longest_edge == 60_000


def test_config_from_a_transformers5_processor_config(tmp_path):
  (tmp_path / "processor_config.json").write_text(json.dumps(
      {"processor_class": "Qwen2_5_VLProcessor", "image_processor": {**HUB_CONFIG, "min_pixels": 12_345}}))
  assert ip.ImageProcessorConfig.from_folder(tmp_path).min_pixels == 12_345


@pytest.mark.parametrize("change,message", [
    ({"do_resize": False}, r"do_resize=False.*only True"),
    ({"resample": 2}, r"resample=2"),
    ({"rescale_factor": 1 / 127.5}, r"rescale_factor"),
    ({"do_convert_rgb": False}, r"do_convert_rgb"),
    ({"input_data_format": "channels_last"}, r"Unsupported field\(s\) \['input_data_format'\]"),
    ({"image_processor_type": "SiglipImageProcessor"}, r"Qwen2VLImageProcessor only"),
])
def test_config_rejects_unimplemented_settings(change, message):
  with pytest.raises(ValueError, match=message):
    ip.ImageProcessorConfig.from_hf({**HUB_CONFIG, **change})


def test_config_size_without_pixel_limits_fails_in_both():
  d = {"size": {"min_pixels": 2000, "max_pixels": 50_000}}  # the transformers 4.45 spelling alone
  with pytest.raises(ValueError, match="shortest_edge"):
    hf_preprocess(photo(), **d)
  with pytest.raises(ValueError, match="add top-level min_pixels and max_pixels"):
    ip.ImageProcessorConfig.from_hf(d)


def test_config_missing_folder_and_bad_values(tmp_path):
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
    ip.ImageProcessorConfig.from_folder(tmp_path)
  with pytest.raises(ValueError, match="min_pixels must be a positive integer"):
    ip.ImageProcessorConfig(min_pixels=0)
  with pytest.raises(ValueError, match="one value per RGB channel"):
    ip.preprocess_image(photo(), mean=(0.5, 0.5))


# --- placeholders and failures --------------------------------------------------------------------------------------


def test_num_image_tokens_matches_transformers_patch_count():
  hf = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=1003520)
  rng = np.random.default_rng(1)
  for height, width in rng.integers(20, 3000, size=(50, 2)).tolist():
    grid = np.array([[1, *(np.array(ip.smart_resize(height, width)) // 14)]])
    assert ip.num_image_tokens(grid[0], 2) == hf.get_number_of_image_patches(height, width) // 4
  grids = np.array([[1, 34, 46], [1, 16, 16], [2, 4, 6]])
  assert ip.num_image_tokens(grids, merge_size=2).tolist() == [391, 64, 12]  # 476x644 -> 391 (spec §5.4)
  with pytest.raises(ValueError, match=r"\(t, h, w\) rows"):
    ip.num_image_tokens([1, 2])


def test_unreadable_inputs_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="No image file at"):
    ip.preprocess_image(str(tmp_path / "missing.jpg"))
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(open(PHOTOS[0], "rb").read()[:2000])
  with pytest.raises(ValueError, match="Cannot read the image .*truncated.jpg"):
    ip.preprocess_image(str(truncated))
  with pytest.raises(ValueError, match="Cannot read the image <5 bytes>"):
    ip.preprocess_image(b"hello")
  with pytest.raises(TypeError, match="float32.*astype\\(np.uint8\\)"):
    ip.preprocess_image(np.zeros((64, 64, 3), np.float32))
  with pytest.raises(TypeError, match="Cannot preprocess a list"):
    ip.preprocess_image([np.zeros((64, 64, 3), np.uint8)])
  with pytest.raises(ValueError, match="channel axis"):
    ip.preprocess_image(np.zeros((64, 64, 5), np.uint8))


def test_module_imports_neither_jax_nor_torch():
  # Grain workers import it; pulling in jax or torch there would cost seconds and memory per worker.
  code = ("import sys, data_pipeline.image_processor; "
          "print(sorted(m for m in ('jax', 'torch', 'transformers', 'tensorflow') if m in sys.modules))")
  root = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_pixel_limit_refuses_encoded_images_from_their_header(tmp_path):
  path = str(tmp_path / "wide.png")
  Image.new("RGB", (300, 200), (40, 90, 160)).save(path)
  data = open(path, "rb").read()
  for image, name in ((path, path), (data, f"<{len(data)} bytes>")):
    with pytest.raises(ip.PixelLimitError, match=rf"^The image {name} has 300x200 = 60,000 pixels, more than the "
                       r"limit of 59,999; it was not decoded$") as caught:
      ip.preprocess_image(image, max_image_pixels=59_999)
    assert (caught.value.pixels, caught.value.limit) == (60_000, 59_999)
    assert_same(ip.preprocess_image(image, max_image_pixels=60_000), hf_preprocess(path))  # at the limit: kept
  array = np.asarray(Image.open(path))  # already decoded: the limit has nothing to save
  assert_same(ip.preprocess_image(array, max_image_pixels=10), hf_preprocess(array))


def test_pixel_limit_defaults_follow_max_pixels_up_to_pils_bomb_threshold(tmp_path):
  assert ip.PIXEL_LIMIT_CAP == Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb warning threshold
  assert ip.default_pixel_limit(200704) == 256 * 200704  # EmoVerse's max_pixels: a 16x downscale per side
  assert ip.default_pixel_limit(ip.DEFAULT_MAX_PIXELS) == ip.default_pixel_limit(12845056) == Image.MAX_IMAGE_PIXELS
  # Over twice the threshold PIL refuses to open the file at all; with a limit, that is the same refusal.
  from huge_image_probe import huge_png
  bomb = huge_png(14000)  # 196 megapixels in 26 KB
  with pytest.raises(ip.PixelLimitError, match="has more pixels than PIL opens") as caught:
    ip.preprocess_image(bomb, max_image_pixels=ip.PIXEL_LIMIT_CAP)
  assert caught.value.pixels is None
  with pytest.raises(ValueError, match="Cannot read the image .*decompression bomb"):
    ip.preprocess_image(bomb)  # without a limit, as before: a ValueError naming PIL's reason
