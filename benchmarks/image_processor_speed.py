#!/usr/bin/env python
"""preprocess_image vs transformers' Qwen2VLImageProcessorPil: images per second on the test photographs.

    python benchmarks/image_processor_speed.py [--repeats 30] [--wait-idle 60] [--json out.json]

Inputs: the three photographs in tests/data/photos (384x384, 451x300 and 600x400 JPEGs), decoded to RGB PIL images
once, so JPEG decoding is not timed. Targets:
* ~224x224: min_pixels = max_pixels = 224*224, which scales the photos down.
* ~448x448: min_pixels = max_pixels = 448*448, which scales them up.

Contestants, each timed on all three photographs per round:
* ours: `preprocess_image`, one call per image, as a Grain map transform runs it.
* hf: `Qwen2VLImageProcessorPil(...)(image, return_tensors="np")`, also one call per image.
* hf batched: a single call with the list of three images, which amortises transformers' per-call overhead.
The ratio is ours / the faster of the two transformers contestants. Both libraries run single-threaded NumPy and
PIL, and both use PIL's bicubic resize, which they share.

Timing reuses `race` from model_throughput.py: interleaved rounds in rotating order, and rounds disturbed by other
processes are redone. Medians are reported. The max |Δpixel_values| row checks that both produced the same output.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import model_throughput as timing  # noqa: E402  (race, wait-idle and foreign-CPU bookkeeping)
from PIL import Image  # noqa: E402

from data_pipeline.image_processor import preprocess_image  # noqa: E402

TARGETS = {"~224x224": 224 * 224, "~448x448": 448 * 448}


def load_photos() -> dict[str, Image.Image]:
  paths = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "photos", "*.jpg")))
  if not paths:
    raise SystemExit("No photographs in tests/data/photos; run from a full checkout.")
  photos = {}
  for path in paths:
    with Image.open(path) as im:
      photos[os.path.basename(path)] = im.convert("RGB")  # decoded now, not in the timed calls
  return photos


def bench_target(name: str, pixels: int, photos: dict[str, Image.Image], repeats: int) -> dict:
  from transformers import Qwen2VLImageProcessorPil
  hf = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
  images = list(photos.values())

  def ours():
    return [preprocess_image(im, min_pixels=pixels, max_pixels=pixels) for im in images]

  def hf_each():
    return [hf(im, return_tensors="np") for im in images]

  def hf_batched():
    return hf(images, return_tensors="np")

  ref = hf_batched()
  got = ours()
  diff = float(np.abs(np.concatenate([g["pixel_values"] for g in got]) - ref["pixel_values"]).max())
  grids = [g["image_grid_thw"][0].tolist() for g in got]
  assert grids == ref["image_grid_thw"].tolist(), (grids, ref["image_grid_thw"])
  times = timing.race({"ours": ours, "hf": hf_each, "hf batched": hf_batched}, repeats=repeats, warmup=2,
                      min_seconds=3.0)
  per_s = {k: len(images) / timing.med(v) for k, v in times.items()}
  reference = max(("hf", "hf batched"), key=per_s.get)
  return {"target": name, "pixels": pixels, "grids": grids, "max_abs_diff": diff, "images_per_s": per_s,
          "seconds": times, "reference": reference, "ratio": per_s["ours"] / per_s[reference],
          "foreign_cpu": timing.FOREIGN_CPU[-1]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds per target (at least)")
  parser.add_argument("--wait-idle", type=float, default=0.0, help="wait up to S seconds for an idle machine")
  parser.add_argument("--max-foreign", type=float, default=0.10, help="redo rounds where others used more CPU")
  parser.add_argument("--json", help="write all settings and raw times here")
  args = parser.parse_args(argv)
  timing.WAIT_IDLE_S, timing.MAX_FOREIGN = args.wait_idle, args.max_foreign

  photos = load_photos()
  results = [bench_target(name, pixels, photos, args.repeats) for name, pixels in TARGETS.items()]

  print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; photos: "
        + ", ".join(f"{k} {v.width}x{v.height}" for k, v in photos.items()))
  print(f"{'target':<10} {'grids (t,h,w)':<36} {'ours img/s':>10} {'hf img/s':>9} {'hf batch':>9} "
        f"{'ratio':>6} {'max|Δ|':>8} {'foreign CPU':>11}")
  for r in results:
    ips = r["images_per_s"]
    share, dropped = r["foreign_cpu"]
    grids = " ".join("x".join(map(str, g)) for g in r["grids"])
    print(f"{r['target']:<10} {grids:<36} {ips['ours']:>10.1f} {ips['hf']:>9.1f} {ips['hf batched']:>9.1f} "
          f"{r['ratio']:>5.2f}x {r['max_abs_diff']:>8.1e} {share:>7.1%} ({dropped} redone)")
  print("ratio = ours / the faster transformers contestant (per-image or batched calls)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": {"processor": platform.processor(), "cores": os.cpu_count()}, "repeats": args.repeats,
                 "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
