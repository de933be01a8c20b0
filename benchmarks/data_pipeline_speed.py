#!/usr/bin/env python
"""The Grain input pipeline vs a plain loop over transformers' processor: examples per second, same records.

    python benchmarks/data_pipeline_speed.py [--records 320] [--rounds 3] [--workers 0,2] [--wait-idle 60]

Data: SYNTHETIC EmoVerse records (drawn images, `data_pipeline.synthetic`) at realistic sizes, each side drawn
from 300-640 px, stored as JPEG in ArrayRecord by the `synthetic` TFDS builder. EmoVerse's pixel limit
(max_pixels = 200704 = 256·28², papers.md §2.3) and its DES task (B-A-S answer with the subject box, then the
DES marker; task `emoverse_des`).

Contestants, each over every record of the split, one epoch:
* HF processor loop: for each record, read it from ArrayRecord, open the JPEG with PIL, build the same chat
  messages, `processor.apply_chat_template(tokenize=False)`, then `processor(text=[...], images=[...])`
  (Qwen2VLImageProcessorPil + the fast tokenizer). Its output lacks what a train step needs beyond that
  (labels, M-RoPE positions, padding to static shapes, the vision slot layout); the pipeline produces those.
* pipeline, k workers: `make_iterator` (shuffled, host batches, no device) from creation to the last batch:
  decode + resize + normalise, prompt + tokenise + labels, positions, static-shape batches with the vision
  slot layout. "total" includes starting the worker processes (each imports Grain and JAX, ~4 s here);
  "steady" is the rate after the first `--warmup` batches, once every worker is running.
  float32 pixels are the parity setting; bfloat16 pixels are what a bf16 model makes of them; uint8 pixels
  are the resized image's levels, which the vision tower normalises on the device to exactly the float32
  values (the lookup's cost on this CPU is in the profile).

Rounds interleave the contestants in rotating order; medians are reported with the share of the CPU other
processes used meanwhile (the machine is shared). A per-stage profile (one thread, per example) says where
the pipeline's time goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_pipeline import pipeline, prompts, synthetic  # noqa: E402
from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer  # noqa: E402
from eemo_jax.model import positions  # noqa: E402

SIZE_RANGE = (300, 640)
TASK = "emoverse_des"


# ------------------------------------------------------------------------------------------ CPU accounting


def _process_tree_cpu(root: int) -> float:
  """CPU seconds of `root` and all its live descendants (Grain workers are child processes)."""
  tick = os.sysconf("SC_CLK_TCK")
  stats = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
        stats[int(entry)] = (int(fields[1]), (float(fields[11]) + float(fields[12])) / tick)  # ppid, utime+stime
      except (OSError, ValueError, IndexError):
        continue
  tree, frontier = {root}, [root]
  while frontier:
    parent = frontier.pop()
    children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in tree]
    tree.update(children)
    frontier.extend(children)
  own = os.times()
  return own.user + own.system + own.children_user + own.children_system + sum(
      stats[pid][1] for pid in tree if pid != root and pid in stats)


def _machine_busy() -> float:
  with open("/proc/stat") as f:
    fields = [float(x) for x in f.readline().split()[1:]]
  return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class ForeignCpu:
  """Share of all cores used by other processes while a block ran (0 = the machine was ours)."""

  def __enter__(self):
    self.start = (_machine_busy(), time.perf_counter())
    self.own_start = _process_tree_cpu(os.getpid())
    return self

  def stop(self) -> float:
    """Call before the block's child processes exit, so their CPU time is still visible."""
    busy, wall = _machine_busy() - self.start[0], time.perf_counter() - self.start[1]
    own = _process_tree_cpu(os.getpid()) - self.own_start
    self.share = max(0.0, (busy - own) / max(wall, 1e-9) / (os.cpu_count() or 1))
    return self.share

  def __exit__(self, *exc):
    if not hasattr(self, "share"):
      self.stop()


def wait_idle(limit_s: float, threshold: float = 0.15) -> None:
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < limit_s:
    with ForeignCpu() as cpu:
      time.sleep(2.0)
    if cpu.share < threshold:
      return
  print(f"[wait-idle] gave up after {limit_s:.0f}s", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- data


def build_data(folder: str, records: int) -> tuple[str, str]:
  """(data_dir, config name) of `records` synthetic EmoVerse records with 300-640 px images."""
  from data_pipeline.builders import build
  with mock.patch.object(synthetic, "SIZE_RANGE", SIZE_RANGE):  # the drawing reads it at call time
    report = build("synthetic", folder, config="emoverse", seed=640, num_train=records, num_test=1)
  return folder, report.config


def hf_processor(folder: str, max_pixels: int):
  """`AutoProcessor` on the offline tokenizer folder, with EmoVerse's pixel limit. transformers 5.23 builds a
  video processor that needs torchvision (not installed); images and text use the real code."""
  import json

  import transformers
  from transformers import Qwen2_5_VLProcessor
  path = os.path.join(folder, "preprocessor_config.json")
  with open(path) as f:
    settings = json.load(f)
  settings.update(max_pixels=max_pixels, size={"shortest_edge": settings["min_pixels"], "longest_edge": max_pixels})
  with open(path, "w") as f:
    json.dump(settings, f)
  with mock.patch.object(Qwen2_5_VLProcessor, "get_attributes",
                         classmethod(lambda cls: ["image_processor", "tokenizer"])):
    return transformers.AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ contestants


def run_hf_loop(processor, source, config) -> tuple[int, float]:
  """(examples, seconds) of the plain loop."""
  from PIL import Image
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
  t0 = time.perf_counter()
  for i in range(len(source)):
    features = source[i]
    image = Image.open(io.BytesIO(features["image"]))
    image.load()
    factor = config.patch_size * config.merge_size  # the box answer needs the resized size: arithmetic only
    resized = [hf_smart_resize(image.height, image.width, factor, config.min_pixels, config.max_pixels)]
    messages = pipeline.TASKS[config.task](features, [(features["height"], features["width"])], resized).messages
    text = processor.apply_chat_template(messages, tokenize=False)
    processor(text=[text], images=[image], return_tensors="np")
  return len(source), time.perf_counter() - t0


def run_pipeline(config, tokenizer, warmup: int = 1) -> tuple[int, float, tuple[int, float], float]:
  """(examples, seconds to the last batch, (examples, seconds) at the end of batch `warmup`, foreign CPU share)."""
  with ForeignCpu() as cpu:
    t0 = time.perf_counter()
    it = pipeline.make_iterator(config, tokenizer=tokenizer)
    first, batches = None, 0
    for _ in it:
      batches += 1
      if batches == warmup:
        first = (it.counters.examples, time.perf_counter() - t0)
    total = time.perf_counter() - t0
    cpu.stop()
    examples = it.counters.examples
    it.close()
  return examples, total, first, cpu.share


# ------------------------------------------------------------------------------------------------ profile


def stage_profile(config, tokenizer, source, n: int) -> dict[str, float]:
  """Milliseconds per example of each pipeline stage, one thread, medians over the first n records."""
  maker = pipeline.ExampleMaker(config, tokenizer)
  special = tokenizer.special
  times = {k: [] for k in ("read record (ArrayRecord + decode features)", "image: decode + resize (uint8 patches)",
                           "prompt + tokenise + labels", "M-RoPE positions", "whole example (ExampleMaker)")}
  examples = []
  for i in range(n):
    t = time.perf_counter()
    features = source[i]
    times["read record (ArrayRecord + decode features)"].append(time.perf_counter() - t)
    t = time.perf_counter()
    _, thw = pipeline.image_patches(features["image"], config.image_config)
    times["image: decode + resize (uint8 patches)"].append(time.perf_counter() - t)
    grid = np.asarray([thw])
    resized = [(int(grid[0, 1]) * 14, int(grid[0, 2]) * 14)]
    t = time.perf_counter()
    messages = pipeline.TASKS[config.task](features, [(features["height"], features["width"])], resized).messages
    chat = prompts.encode_chat(messages, tokenizer, grid, train=True)
    times["prompt + tokenise + labels"].append(time.perf_counter() - t)
    t = time.perf_counter()
    positions.get_rope_index(chat.input_ids[None], None, grid, image_token_id=special.image_pad,
                             video_token_id=special.video_pad, spatial_merge_size=2)
    times["M-RoPE positions"].append(time.perf_counter() - t)
    t = time.perf_counter()
    examples.append(maker.map(features))
    times["whole example (ExampleMaker)"].append(time.perf_counter() - t)
  out = {k: 1e3 * statistics.median(v) for k, v in times.items()}
  from data_pipeline.batching import BatchBuilder
  labels = {"float32": "batch assembly (pad, normalise into the vision slots), per example",
            "uint8": "batch assembly, uint8 pixels (pad, place levels in the vision slots), per example"}
  for dtype, label in labels.items():
    layout = dataclasses.replace(maker.layout, pixel_dtype=dtype)
    per_batch = []
    for start in range(0, len(examples) - config.batch_size + 1, config.batch_size):
      builder = BatchBuilder(layout)
      for ex in examples[start:start + config.batch_size]:
        builder.add(ex)
      t = time.perf_counter()
      builder.assemble()
      per_batch.append((time.perf_counter() - t) / len(builder))
    out[label] = 1e3 * statistics.median(per_batch)
  patches = [len(ex["patches"]) for ex in examples]
  return out | {"_patches": float(np.mean(patches)), "_tokens": float(np.mean([len(e["input_ids"]) for e in examples]))}


def device_lookup_ms(config, tokenizer, repeats: int = 10) -> float:
  """Milliseconds per example of `VisionInputs.float_pixels` (the uint8 -> float32 lookup the train step does
  on the device), jitted on this CPU, for one batch of the pipeline."""
  import jax
  it = pipeline.make_iterator(dataclasses.replace(config, prefetch=0), tokenizer=tokenizer)
  batch = next(it)
  rows = int(batch["attention_mask"].any(axis=1).sum())
  it.close()
  lookup = jax.jit(lambda v: v.float_pixels())
  vision = jax.device_put(batch["vision"])
  lookup(vision).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    lookup(vision).block_until_ready()
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times) / rows


def hf_profile(processor, source, config, n: int) -> dict[str, float]:
  from PIL import Image
  image_t, text_t = [], []
  for i in range(n):
    features = source[i]
    t = time.perf_counter()
    image = Image.open(io.BytesIO(features["image"]))
    out = processor.image_processor(images=[image])
    image_t.append(time.perf_counter() - t)
    grid = out["image_grid_thw"][0]
    resized = [(int(grid[1]) * 14, int(grid[2]) * 14)]
    messages = pipeline.TASKS[config.task](features, [(features["height"], features["width"])], resized).messages
    t = time.perf_counter()
    text = processor.apply_chat_template(messages, tokenize=False)
    processor.tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * int(np.prod(grid) // 4)))
    text_t.append(time.perf_counter() - t)
  return {"image processor (decode + resize + normalise + patchify)": 1e3 * statistics.median(image_t),
          "chat template + tokenise": 1e3 * statistics.median(text_t)}


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--records", type=int, default=960)
  parser.add_argument("--warmup", type=int, default=8, help="batches before the steady rate is timed")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
  parser.add_argument("--bf16-workers", default="0", help="worker counts also run with pixel_dtype=bfloat16")
  parser.add_argument("--uint8-workers", default="0,2", help="worker counts also run with pixel_dtype=uint8")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--read-threads", type=int, default=4)
  parser.add_argument("--wait-idle", type=float, default=0.0, help="wait up to S seconds for a quiet machine")
  parser.add_argument("--profile", type=int, default=48, help="records in the per-stage profile")
  args = parser.parse_args(argv)

  tmp = tempfile.mkdtemp(prefix="eemo_pipeline_bench_")
  t = time.perf_counter()
  data_dir, dataset_config = build_data(os.path.join(tmp, "data"), args.records)
  tokenizer_dir = build_offline_tokenizer(os.path.join(tmp, "tokenizer"))
  print(f"built {args.records} records in {time.perf_counter() - t:.1f}s under {tmp}", file=sys.stderr)
  tokenizer = load_tokenizer(tokenizer_dir)
  base = pipeline.PipelineConfig(dataset="synthetic", data_dir=data_dir, dataset_config=dataset_config,
                                 tokenizer_dir=tokenizer_dir, task=TASK, seq_len=args.seq_len,
                                 batch_size=args.batch_size, num_epochs=1, read_threads=args.read_threads)
  source = pipeline.load_source(base)
  processor = hf_processor(tokenizer_dir, base.max_pixels)
  variants = [(int(w), "float32") for w in args.workers.split(",") if w] + [
      (int(w), "bfloat16") for w in args.bf16_workers.split(",") if w] + [
      (int(w), "uint8") for w in args.uint8_workers.split(",") if w]
  contestants = ["hf"] + [f"pipeline-{w}-{dtype}" for w, dtype in variants]
  results = {name: [] for name in contestants}
  for r in range(args.rounds):
    if args.wait_idle:
      wait_idle(args.wait_idle)
    for name in contestants[r % len(contestants):] + contestants[:r % len(contestants)]:
      if name == "hf":
        with ForeignCpu() as cpu:
          examples, seconds = run_hf_loop(processor, source, base)
        results[name].append((examples, seconds, None, cpu.share))
      else:
        _, workers, dtype = name.split("-")
        config = pipeline.PipelineConfig(**{**base.__dict__, "worker_count": int(workers), "pixel_dtype": dtype,
                                            "seed": r})
        results[name].append(run_pipeline(config, tokenizer, args.warmup))
      examples, seconds, _, share = results[name][-1]
      print(f"[round {r}] {name}: {examples / seconds:.1f} examples/s (others used {share:.0%} CPU)",
            file=sys.stderr)

  hf_rate = statistics.median(n / s for n, s, _, _ in results["hf"])
  patch, frame = pipeline.vision_budgets(base)
  print(f"\n{args.records} SYNTHETIC EmoVerse records, images {SIZE_RANGE[0]}-{SIZE_RANGE[1]} px, max_pixels "
        f"{base.max_pixels}, task {TASK}, batch {args.batch_size} x seq {args.seq_len}, patch_budget {patch}, "
        f"frame_budget {frame}, {args.read_threads} read threads, {os.cpu_count()} cores; medians of "
        f"{args.rounds} rounds\n")
  print("| contestant | examples/s (total) | examples/s (steady) | total vs HF loop | steady vs HF loop | "
        "others' CPU |")
  print("|---|---|---|---|---|---|")
  for name in contestants:
    rows = results[name]
    total = statistics.median(n / s for n, s, _, _ in rows)
    steady = statistics.median((n - f[0]) / (s - f[1]) for n, s, f, _ in rows) if rows[0][2] else total
    share = statistics.mean(x for *_, x in rows)
    _, workers, dtype = (name.split("-") + ["", ""])[:3]
    label = "HF processor loop" if name == "hf" else f"pipeline, {workers} workers, {dtype} pixels"
    print(f"| {label} | {total:.1f} | {steady:.1f} | {total / hf_rate:.2f}x | {steady / hf_rate:.2f}x | "
          f"{share:.0%} |")

  profile = stage_profile(base, tokenizer, source, min(args.profile, len(source)))
  profile["uint8 pixels: the lookup on the device (jitted, this CPU), per example"] = device_lookup_ms(
      dataclasses.replace(base, pixel_dtype="uint8"), tokenizer)
  hf = hf_profile(processor, source, base, min(args.profile, len(source)))
  print(f"\nWhere the time goes (ms per example, one thread, median of {min(args.profile, len(source))} records; "
        f"{profile.pop('_patches'):.0f} patches and {profile.pop('_tokens'):.0f} tokens per example on average)\n")
  print("| stage | ms |")
  print("|---|---|")
  for name, ms in profile.items():
    print(f"| pipeline: {name} | {ms:.2f} |")
  for name, ms in hf.items():
    print(f"| HF: {name} | {ms:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
