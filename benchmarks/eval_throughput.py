#!/usr/bin/env python
"""Issue 15: examples per second of `eemo-jax eval` answering EEmo-Bench questions on CPU, against the benchmark's
own example script's approach (transformers `generate`, one question at a time), same model, prompts and length.

    python benchmarks/eval_throughput.py [--configs small] [--examples 32] [--max-new-tokens 32] [--json out.json]

* **Questions.** EEmo-Bench's single-image set (`eemo_bench` config `single`), built by the project's builder
  from the first `--images` entries of the real annotation file (`eemo_jax.eval.BENCH_DATA`/Ebench_single.json),
  each entry's picture made from the photos in tests/data/photos (a square crop, resized to `--image-side`
  pixels, stored as PNG). min = max pixels = side², so both sides see one fixed patch grid (224: 16x16
  patches, 64 image tokens). The first `--examples` records of the built split are asked, in its order.
* **Prompts.** The `eemo_tasks` generation prompts, under the Stage-2 system message, as `eemo-jax eval`'s
  pipeline makes them (configs/eemo_bench_eval.py). The reference gets the same messages through its
  processor's chat template (with the image by path, as the example script passes it); the script checks
  that the ids it gets equal the pipeline's, and refuses to time otherwise.
* **Model.** A preset of `eemo_jax.model.config` with the offline tokenizer's vocabulary and special ids
  (`train.run.model_config`), randomised and saved as an HF folder by `model_throughput.build_hf_models`;
  both sides load that folder, fp32.
* **EEmo-JAX.** What `eemo-jax eval --config configs/eemo_bench_eval.py` runs (`commands/eval._from_model`):
  the config's mesh, `load_eval_model`, the config's pipeline with `train.global_batch_size` = `--batch-size`
  prompts per generation batch and `data.seq_len` = the longest prompt (the smallest bucket that holds every
  prompt), then `eval.run.generate_predictions` with `EvalSettings(max_new_tokens, limit=examples,
  level_scores=False)`: the prompt-only pipeline and the greedy rollout loop, batched, each answer decoded.
  Every call compiles its rollout once (an eval run does, whatever its length); JAX's own compile events
  (tracing, lowering, XLA compile) are summed during the call, so a call gives its time with and without
  that one-off cost. The headline is without: the rate a full run (12k questions) approaches.
* **Reference.** The example script's `evaluate()` (github.com/workerred/EEmo-Bench,
  example_code_for_qwen2_5_7b/evaluate_qwen2_5-7b(single).py) per question, in its own process
  (`model_throughput.TorchWorker`): open the image (`process_vision_info`: PIL, RGB; at side² pixels it
  resizes nothing), `apply_chat_template(tokenize=False, add_generation_prompt=True)`, `processor(text=[...],
  images=[...], padding=True, return_tensors="pt")`, `Qwen2_5_VLForConditionalGeneration.generate(do_sample=False,
  max_new_tokens=...)`, trim the prompt, `batch_decode(skip_special_tokens=True)`. transformers' sdpa attention
  (the script asks for flash_attention_2, a GPU kernel), stop ids `<|im_end|>` and `<|endoftext|>` (the
  released Qwen2.5-VL generation config's; EEmo-JAX stops at the same two).
* **Agreement.** The pipeline's greedy tokens (the same pipeline batches through the same rollout) against the
  reference's, example by example: how many agree token for token, and where the others first differ. The
  texts `generate_predictions` wrote are checked to be the decoding of those tokens.

Timing: `model_throughput.race` (interleaved rounds in rotating order, rounds in which other processes used
more than --max-foreign of the CPU redone, --wait-idle); each timed run is a whole pass over the examples,
right after an untimed lead-in of the same side (one example for the reference, one generation batch for
EEmo-JAX). Medians over rounds, and the paired per-round ratio with a bootstrap 90% interval. The machine's
fp32 matmul peaks (XLA and torch) and read bandwidth are measured in the same run, and the CPU is named.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import grpo_throughput as gt  # noqa: E402
import model_throughput as mt  # noqa: E402

TARGET = 5.0  # EEmo-JAX / reference examples per second the issue asks for
CONFIG = os.path.join(ROOT, "configs", "eemo_bench_eval.py")
PHOTOS = os.path.join(ROOT, "tests", "data", "photos")
QUESTIONS_PER_IMAGE = 6  # yes/no, what/how, ranking, valence, arousal, dominance (+ open-ended for some)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
MEASURED_SOURCES = ("eemo_jax/eval", "eemo_jax/rl", "eemo_jax/model", "eemo_jax/generate", "data_pipeline")


# ------------------------------------------------------------------------------------------ the questions
def bench_split(folder: str, images: int, side: int) -> dict:
  """Builds `eemo_bench`/single from the first `images` entries of the real annotation file, every entry's
  image a side x side PNG cut from the test photos; returns where the build, the images and the entries are."""
  from PIL import Image

  from data_pipeline.builders import build
  from eemo_jax.eval import BENCH_DATA

  with open(os.path.join(BENCH_DATA, "Ebench_single.json"), encoding="utf-8") as f:
    entries = json.load(f)[:images]
  manual, image_dir = os.path.join(folder, "annotations"), os.path.join(folder, "images")
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(manual, exist_ok=True)
  with open(os.path.join(manual, "single.json"), "w", encoding="utf-8") as f:
    json.dump(entries, f)
  photos = sorted(os.path.join(PHOTOS, name) for name in os.listdir(PHOTOS) if name.endswith(".jpg"))
  for k, entry in enumerate(entries):
    photo = Image.open(photos[k % len(photos)]).convert("RGB")
    edge = min(photo.size)
    shift = min(max(photo.size) - edge, (k // len(photos)) * edge // 16)  # another crop when a photo comes back
    box = (shift, 0, shift + edge, edge) if photo.width > photo.height else (0, shift, edge, shift + edge)
    photo.crop(box).resize((side, side), Image.Resampling.BICUBIC).save(
        os.path.join(image_dir, entry["image_name"]), format="PNG")
  data_dir = os.path.join(folder, "data")
  build("eemo_bench", data_dir, manual_dir=manual, config="single", annotations="single.json", image_root=image_dir)
  return {"data_dir": data_dir, "image_dir": image_dir, "entries": entries}


def eval_overrides(args, name: str, split: dict, tokenizer_dir: str, seq_len: int) -> list[str]:
  """configs/eemo_bench_eval.py's fields changed for the benchmark (`--config.<field>=<value>`)."""
  pixels = args.image_side**2
  fields = {"model.preset": name, "model.dtype": "float32", "data.data_dir": split["data_dir"],
            "data.dataset_config": "single", "data.tokenizer_dir": tokenizer_dir, "data.seq_len": seq_len,
            "data.min_pixels": pixels, "data.max_pixels": pixels, "train.global_batch_size": args.batch_size}
  return [f"{key}={value}" for key, value in fields.items()]


def prompts_of(source, count: int, task: str, side: int) -> list[list[dict]]:
  """The generation prompt (messages) of each of the first `count` records, as the pipeline's task makes it."""
  from data_pipeline import pipeline
  return [pipeline.TASKS[task](source[i], [(side, side)], [(side, side)], prompt_only=True).messages
          for i in range(count)]


def reference_messages(messages: list[dict], image_path: str) -> list[dict]:
  """The same conversation with the image given by path, as the example script writes its message."""
  def item(x):
    return {"type": "image", "image": f"file://{image_path}"} if x.get("type") == "image" else x
  return [{**m, "content": [item(x) for x in m["content"]]} if isinstance(m["content"], list) else m
          for m in messages]


def image_path_of(record_id: str, split: dict) -> str:
  """A record id is single/<entry index>/<task>: the entry names its image."""
  index = int(record_id.split("/")[1])
  return os.path.join(split["image_dir"], split["entries"][index]["image_name"])


# ------------------------------------------------------------------------------------------ reference (worker)
def _ref_build(state: dict, arch, folder: str, seed: int, attention: str) -> None:
  """Writes the random model of `arch` to `folder` (both sides load it from there) and keeps `attention`'s."""
  models = mt.build_hf_models(arch, folder, seed)
  state["model"] = models[attention]
  del models


def _ref_setup(state: dict, tokenizer_dir: str, pixels: int, rows: list, settings: dict) -> list[list[int]]:
  """Holds the questions ((messages, image path) each) and the processor; returns the prompt ids the processor
  makes of each, for the parent to compare with the pipeline's."""
  import transformers
  transformers.logging.set_verbosity_error()
  state["processor"] = gt._local_processor(tokenizer_dir, pixels)
  state["rows"], state["settings"] = rows, settings
  return [[int(i) for i in _ref_inputs(state, messages, path)["input_ids"][0]] for messages, path in rows]


def _ref_inputs(state: dict, messages: list[dict], image_path: str):
  """The example script's preparation: chat template, image read (`process_vision_info`), processor."""
  from PIL import Image
  processor = state["processor"]
  text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  image = Image.open(image_path).convert("RGB")
  return processor(text=[text], images=[image], padding=True, return_tensors="pt")


def _ref_answer(state: dict, messages: list[dict], image_path: str) -> tuple[list[int], str]:
  """The example script's `evaluate()` on one question: (generated ids, EOS kept; decoded answer)."""
  import torch
  settings = state["settings"]
  inputs = _ref_inputs(state, messages, image_path)
  with torch.inference_mode():
    generated = state["model"].generate(**inputs, do_sample=False, max_new_tokens=settings["max_new_tokens"],
                                        eos_token_id=settings["eos_ids"], pad_token_id=settings["pad_id"])
  trimmed = [out[len(prompt):] for prompt, out in zip(inputs.input_ids, generated)]
  text = state["processor"].batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)
  return [int(t) for t in trimmed[0]], text[0]


def _ref_run(state: dict) -> dict:
  """Every question in order, one at a time; the seconds of the whole pass and of each question."""
  answers, each = [], []
  t0 = time.perf_counter()
  for messages, path in state["rows"]:
    t = time.perf_counter()
    answers.append(_ref_answer(state, messages, path))
    each.append(time.perf_counter() - t)
  seconds = time.perf_counter() - t0
  state["answers"] = answers
  return {"seconds": seconds, "per_example_s": each}


def _ref_lead_in(state: dict) -> None:
  _ref_answer(state, *state["rows"][0])


def _ref_answers(state: dict) -> list[tuple[list[int], str]]:
  return state["answers"]


def _ref_free(state: dict) -> None:
  state.clear()


# Served by model_throughput's torch worker (`mt.TorchWorker(threads, "eval_throughput")`).
TORCH_OPS = {"ref_build": _ref_build, "ref_setup": _ref_setup, "ref_run": _ref_run, "ref_lead_in": _ref_lead_in,
             "ref_answers": _ref_answers, "ref_free": _ref_free}


# ------------------------------------------------------------------------------------------ EEmo-JAX
class CompileClock:
  """Seconds JAX spends tracing, lowering and compiling while `active` (its monitoring events)."""

  def __init__(self):
    import jax
    self.active, self.seconds = False, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event: str, duration: float, **kwargs) -> None:
    if self.active and event in COMPILE_EVENTS:
      self.seconds += duration


class JaxEval:
  """`eemo-jax eval`'s generation (`generate_predictions`) on the benchmark's questions, as the command sets it
  up, plus the pipeline's prompt ids and greedy tokens of the same batches for the comparison."""

  def __init__(self, config, folder: str, tokenizer_dir: str, args, clock: CompileClock):
    import jax

    from eemo_jax.eval.loading import load_eval_model
    from eemo_jax.eval.run import EvalSettings
    from eemo_jax.parallel.sharding import make_mesh
    from eemo_jax.train import run as runlib

    self.mesh = make_mesh(dict(config.mesh.items()))
    self.model = load_eval_model(hf_dir=folder, tokenizer_dir=tokenizer_dir, dtype=config.model.dtype, mesh=self.mesh)
    pcfg = runlib.pipeline_config(config, self.model.backbone.config, split=config.eval.split, eval_mode=True)
    self.pcfg = dataclasses.replace(pcfg, tokenizer_dir=self.model.tokenizer_dir)
    self.settings = EvalSettings(max_new_tokens=args.max_new_tokens, limit=args.examples, level_scores=False)
    self.clock, self.jax = clock, jax
    self.last_items: list[dict] = []

  def run(self) -> gt.Timed:
    """One `generate_predictions` pass: its seconds less the compiling in it, carrying both."""
    from eemo_jax.eval.run import generate_predictions
    self.clock.seconds, self.clock.active = 0.0, True
    try:
      with self.jax.set_mesh(self.mesh):
        items, seconds = generate_predictions(self.model, self.pcfg, self.settings, mesh=self.mesh)
    finally:
      self.clock.active = False
    self.last_items = items
    return gt.Timed(seconds - self.clock.seconds, wall_s=seconds, compile_s=self.clock.seconds, examples=len(items))

  def greedy_pass(self) -> dict[str, dict]:
    """Per record id: the pipeline's unpadded prompt ids and the rollout's kept greedy tokens, from the same
    pipeline batches and the same rollout settings `generate_predictions` uses; keeps the first batch and the
    compiled rollout for the lead-in."""
    from data_pipeline.pipeline import load_source, make_iterator, to_prompt_batch
    from eemo_jax.rl.rollout import make_rollout_fn
    from flax import nnx

    model, special = self.model, self.model.tokenizer.special
    pcfg = dataclasses.replace(self.pcfg, prompt_only=True, shuffle=False, num_epochs=1, microbatches=0,
                               packing=False)
    graphdef, self.state = nnx.split(model.backbone)
    self.rollout = make_rollout_fn(graphdef, self.mesh, group_size=1,
                                   max_completion_length=self.settings.max_new_tokens, temperature=0.0)
    pad = model.backbone.config.pad_token_id
    self.rollout_args = {"eos_ids": tuple(special.stop_ids), "pad_id": int(pad if pad is not None else special.pad)}
    source = load_source(pcfg)
    records = [source[i] for i in range(min(len(source), self.settings.limit))]
    out, self.first_batch = {}, None
    iterator = make_iterator(pcfg, tokenizer=model.tokenizer, model_config=model.backbone.config, source=records,
                             mesh=self.mesh)
    try:
      with self.jax.set_mesh(self.mesh):
        for batch in iterator:
          prompts = to_prompt_batch(batch)
          if self.first_batch is None:
            self.first_batch = prompts.inputs
          rolled = self.rollout(self.state, prompts.inputs, self.jax.random.key(0), **self.rollout_args)
          tokens, mask = np.asarray(rolled.tokens), np.asarray(rolled.mask).astype(bool)
          ids, attention = np.asarray(prompts.inputs.input_ids), np.asarray(prompts.inputs.attention_mask)
          for row, record_id in enumerate(prompts.ids):
            if record_id:
              out[record_id] = {"prompt_ids": [int(t) for t in ids[row][attention[row] > 0]],
                                "tokens": [int(t) for t in tokens[row][mask[row]]]}
    finally:
      iterator.close()
    return out

  def lead_in(self) -> None:
    """One generation batch through the compiled rollout (the untimed call before a timed one)."""
    with self.jax.set_mesh(self.mesh):
      rolled = self.rollout(self.state, self.first_batch, self.jax.random.key(0), **self.rollout_args)
      self.jax.block_until_ready(rolled.tokens)


class LeadInThenTimed:
  """A `mt.race` contestant whose calls alternate between an untimed lead-in (at least `mt.LEAD_IN_S` of the
  side's own work) and the timed pass. `race` makes exactly one call right before each timed call when that
  call lasts `LEAD_IN_S`; a whole pass as that call would double the benchmark's length for no gain."""

  def __init__(self, lead_in, timed):
    self.lead_in, self.timed, self.calls = lead_in, timed, 0

  def __call__(self):
    self.calls += 1
    if self.calls % 2:
      end = time.perf_counter() + mt.LEAD_IN_S
      self.lead_in()
      while time.perf_counter() < end:
        self.lead_in()
      return None
    return mt.Remote(self.timed())


# ------------------------------------------------------------------------------------------ agreement
def agreement(jax_out: dict[str, dict], ref_answers: list, record_ids: list[str]) -> dict:
  """How many examples' greedy tokens agree token for token, and where the others first differ."""
  equal, first_differences = 0, {}
  for record_id, (tokens, _) in zip(record_ids, ref_answers):
    mine = jax_out[record_id]["tokens"]
    if mine == tokens:
      equal += 1
      continue
    common = next((i for i, (a, b) in enumerate(zip(mine, tokens)) if a != b), min(len(mine), len(tokens)))
    first_differences[record_id] = {"position": common, "jax_length": len(mine), "reference_length": len(tokens)}
  return {"examples": len(record_ids), "equal": equal, "first_differences": first_differences}


# ------------------------------------------------------------------------------------------ one config
def bench_config(name: str, args, worker: mt.TorchWorker, assets: dict, clock: CompileClock) -> dict:
  import jax
  from flax import nnx

  from data_pipeline.pipeline import vision_budgets
  from eemo_jax.config import load_config
  from eemo_jax.train.run import model_config

  tokenizer, split = assets["tokenizer"], assets["split"]
  res: dict = {"config": name}
  with tempfile.TemporaryDirectory(prefix=f"eemo_eval_bench_{name}_") as folder:
    config = load_config(CONFIG, eval_overrides(args, name, split, assets["tokenizer_dir"], assets["seq_len"]))
    arch = model_config(config, tokenizer)
    t0 = time.perf_counter()
    worker.call("ref_build", arch, folder, args.seed, args.reference_attention)
    res["build_s"] = time.perf_counter() - t0
    jax_side = JaxEval(config, folder, assets["tokenizer_dir"], args, clock)
  res["overrides"] = [o for o in eval_overrides(args, name, split, "", assets["seq_len"])
                      if not o.startswith(("data.data_dir", "data.tokenizer_dir"))]
  patch_budget, frame_budget = vision_budgets(jax_side.pcfg)
  res.update(batch_size=jax_side.pcfg.batch_size, seq_len=jax_side.pcfg.seq_len, patch_budget=patch_budget,
             frame_budget=frame_budget, vocab_size=arch.text.vocab_size,
             params_m=sum(x.size for x in jax.tree.leaves(nnx.state(jax_side.model.backbone))) / 1e6)

  t0 = time.perf_counter()
  greedy = jax_side.greedy_pass()
  res["jax_greedy_pass_s"] = time.perf_counter() - t0
  record_ids = assets["record_ids"]
  missing = [r for r in record_ids if r not in greedy]
  if missing:
    raise RuntimeError(f"the pipeline made no prompt for {missing}: raise --seq-len or check the build")
  eos = list(tokenizer.special.stop_ids)
  pad = jax_side.rollout_args["pad_id"]
  rows = [(reference_messages(m, image_path_of(r, split)), image_path_of(r, split))
          for m, r in zip(assets["messages"], record_ids)]
  t0 = time.perf_counter()
  ref_ids = worker.call("ref_setup", assets["tokenizer_dir"], args.image_side**2, rows,
                        {"max_new_tokens": args.max_new_tokens, "eos_ids": eos, "pad_id": pad})
  res["reference_setup_s"] = time.perf_counter() - t0
  jax_ids = [greedy[r]["prompt_ids"] for r in record_ids]
  res["prompt_ids_equal"] = ref_ids == jax_ids
  if not res["prompt_ids_equal"]:
    bad = next(i for i, (a, b) in enumerate(zip(jax_ids, ref_ids)) if a != b)
    raise RuntimeError(f"the reference's prompt ids differ from the pipeline's for {record_ids[bad]}: the two sides "
                       f"would not answer the same prompts (pipeline {jax_ids[bad][:24]}..., reference "
                       f"{ref_ids[bad][:24]}...)")
  lengths = [len(ids) for ids in jax_ids]
  res["prompt_tokens"] = {"min": min(lengths), "max": max(lengths), "mean": float(np.mean(lengths))}

  # Warm-up outside the timing: the first generate_predictions call also compiles the pipeline's small jits.
  warm = jax_side.run()
  res["jax_warmup"] = {"seconds": float(warm), **warm.parts}
  _print(name, "warm-up", res["jax_warmup"])

  contestants = {"eemo_jax": LeadInThenTimed(jax_side.lead_in, jax_side.run),
                 "reference": LeadInThenTimed(lambda: worker.call("ref_lead_in"),
                                              lambda: _ref_timed(worker.call("ref_run")))}
  times = mt.race(contestants, args.repeats, warmup=0)
  if not all(isinstance(t, gt.Timed) for side in times.values() for t in side):
    raise RuntimeError("a timed call was not a whole pass: mt.race's lead-in calls no longer alternate with its "
                       "timed calls (see LeadInThenTimed)")
  res["foreign_cpu"] = mt.FOREIGN_CPU[-1]
  n = args.examples
  sides = {}
  for side, runs in times.items():
    out = {"median_s": mt.med([float(t) for t in runs]), "min_s": min(float(t) for t in runs),
           "runs": [{"seconds": float(t), **t.parts} for t in runs]}
    out["examples_per_s"] = n / out["median_s"]
    if side == "eemo_jax":
      walls = [t.parts["wall_s"] for t in runs]
      out.update(wall_median_s=mt.med(walls), compile_median_s=mt.med([t.parts["compile_s"] for t in runs]),
                 examples_per_s_with_compile=n / mt.med(walls))
    else:
      out["per_example_median_s"] = mt.med([s for t in runs for s in t.parts["per_example_s"]])
    sides[side] = out
  res["sides"] = sides
  ref_times = [float(t) for t in times["reference"]]
  res["paired"] = mt.paired_ratio(ref_times, [float(t) for t in times["eemo_jax"]])
  res["paired_with_compile"] = mt.paired_ratio(ref_times, [t.parts["wall_s"] for t in times["eemo_jax"]])
  res["ratio"] = sides["eemo_jax"]["examples_per_s"] / sides["reference"]["examples_per_s"]
  res["ratio_with_compile"] = sides["eemo_jax"]["examples_per_s_with_compile"] / sides["reference"]["examples_per_s"]
  res["target"] = TARGET
  res["meets_target"] = res["paired"]["low"] >= TARGET
  res["meets_target_with_compile"] = res["paired_with_compile"]["low"] >= TARGET

  answers = worker.call("ref_answers")
  res["greedy_agreement"] = agreement(greedy, answers, record_ids)
  texts = {i["id"]: i[f"response({jax_side.model.name})"] for i in jax_side.last_items}
  decoded = {r: jax_side.model.tokenizer.decode(greedy[r]["tokens"], skip_special_tokens=True) for r in record_ids}
  res["eval_texts_equal_greedy_pass"] = all(texts.get(r) == decoded[r] for r in record_ids)
  res["texts_equal_reference"] = sum(texts.get(r) == text for r, (_, text) in zip(record_ids, answers))
  res["generated_tokens"] = {"jax_mean": float(np.mean([len(greedy[r]["tokens"]) for r in record_ids])),
                             "reference_mean": float(np.mean([len(t) for t, _ in answers]))}
  worker.call("ref_free")
  _print(name, "examples/s", {k: v["examples_per_s"] for k, v in sides.items()})
  return res


def _ref_timed(report: dict) -> gt.Timed:
  return gt.Timed(report["seconds"], per_example_s=report["per_example_s"])


def _print(name: str, what: str, value) -> None:
  print(f"[{name}] {what}: {json.dumps(value, default=float)}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ report

def print_table(cpu: dict, limits: dict, results: list[dict], args) -> None:
  print()
  print(mt.cpu_line(cpu))
  print("Machine limits (same run): fp32 %dx%d matmul GFLOP/s: jax %.1f, torch %.1f; read bandwidth %.1f GB/s" % (
      limits["matmul_n"], limits["matmul_n"], limits["matmul_gflops"]["jax"], limits["matmul_gflops"]["torch"],
      limits["read_bandwidth_gbs"]))
  hdr = ("config", "metric", "EEmo-JAX", "reference", "JAX/ref", "paired [90% CI]", "target", "ok")
  rows = []
  for r in results:
    name, j, t = r["config"], r["sides"]["eemo_jax"], r["sides"]["reference"]
    ci = lambda p: f"{p['median']:.2f}x [{p['low']:.2f}, {p['high']:.2f}]"  # noqa: E731
    rows.append((name, f"examples/s ({args.examples} questions, {args.max_new_tokens} new tokens)",
                 f"{j['examples_per_s']:.2f}", f"{t['examples_per_s']:.2f}", f"{r['ratio']:.2f}x", ci(r["paired"]),
                 f">={r['target']:g}x", "yes" if r["meets_target"] else "NO"))
    rows.append((name, "  with the run's compile (one per eval run)", f"{j['examples_per_s_with_compile']:.2f}",
                 f"{t['examples_per_s']:.2f}", f"{r['ratio_with_compile']:.2f}x", ci(r["paired_with_compile"]),
                 f">={r['target']:g}x", "yes" if r["meets_target_with_compile"] else "NO"))
    rows.append((name, "s per pass (median)", f"{j['median_s']:.2f}", f"{t['median_s']:.2f}", "", "", "", ""))
    rows.append((name, "  JAX compile s in a pass / reference s per question", f"{j['compile_median_s']:.2f}",
                 f"{t['per_example_median_s']:.3f}", "", "", "", ""))
    agree = r["greedy_agreement"]
    rows.append((name, "greedy answers equal token for token", f"{agree['equal']}/{agree['examples']}", "", "", "",
                 "", ""))
  widths = [max(len(str(x[i])) for x in rows + [hdr]) for i in range(len(hdr))]
  line = lambda x: "  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w)  # noqa: E731
                             for i, (c, w) in enumerate(zip(x, widths)))
  print()
  print(line(hdr))
  print("  ".join("-" * w for w in widths))
  for row in rows:
    print(line(row))
  print()
  for r in results:
    p = r["prompt_tokens"]
    print(f"[{r['config']}] {r['params_m']:.1f}M parameters, vocabulary {r['vocab_size']}; EEmo-JAX batch "
          f"{r['batch_size']} prompts, bucket {r['seq_len']} tokens (prompts {p['min']}-{p['max']}, mean "
          f"{p['mean']:.0f}), patch budget {r['patch_budget']}; prompt ids equal on both sides: "
          f"{r['prompt_ids_equal']}; generated tokens per answer: JAX {r['generated_tokens']['jax_mean']:.1f}, "
          f"reference {r['generated_tokens']['reference_mean']:.1f}")
  print("JAX/ref = the reference's median pass time over EEmo-JAX's (= the examples/s ratio); paired = the median "
        "over rounds of that ratio within a round, with a bootstrap interval; 'ok' asks its low end to clear the "
        "target. The headline excludes the compiling inside each `generate_predictions` call (once per eval run); "
        "the second row includes it.")
  fmt = lambda x: f"{x[0]:.0%} ({x[1]} rounds redone)"  # noqa: E731
  loads = [f"limits {fmt(limits['foreign_cpu'][0])}"] + [f"{r['config']} {fmt(r['foreign_cpu'])}" for r in results]
  print("CPU used by other processes in the kept timed rounds (0% = machine was ours): " + ", ".join(loads))


# ------------------------------------------------------------------------------------------ main
def prepare(folder: str, args) -> dict:
  """The tokenizer, the built questions, and the first `--examples` records' ids, prompts and bucket."""
  from data_pipeline.builders import load_records
  from data_pipeline.prompts import encode_chat
  from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer

  tokenizer_dir = build_offline_tokenizer(os.path.join(folder, "tokenizer"))
  tokenizer = load_tokenizer(tokenizer_dir)
  split = bench_split(os.path.join(folder, "bench"), args.images, args.image_side)
  source = load_records("eemo_bench", split["data_dir"], "test", config="single")
  if len(source) < args.examples:
    raise SystemExit(f"the {args.images} images made {len(source)} questions, fewer than --examples "
                     f"{args.examples}: raise --images")
  messages = prompts_of(source, args.examples, "eemo_tasks", args.image_side)
  grid = (1, args.image_side // 14, args.image_side // 14)
  lengths = [len(encode_chat(m, tokenizer, [grid], add_generation_prompt=True).input_ids) for m in messages]
  return {"tokenizer_dir": tokenizer_dir, "tokenizer": tokenizer, "split": split, "messages": messages,
          "record_ids": [str(source[i]["id"]) for i in range(args.examples)],
          "seq_len": args.seq_len or max(lengths)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="small", help="model presets, comma-separated (small, tiny)")
  p.add_argument("--examples", type=int, default=32, help="questions answered per pass")
  p.add_argument("--images", type=int, default=0,
                 help="annotation entries (images) built; 0: enough for --examples (6+ questions each)")
  p.add_argument("--max-new-tokens", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=16, help="EEmo-JAX prompts per generation batch")
  p.add_argument("--image-side", type=int, default=224, help="every image is side x side pixels (min = max pixels)")
  p.add_argument("--seq-len", type=int, default=0, help="EEmo-JAX prompt bucket; 0: the longest prompt")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds (passes per side)")
  p.add_argument("--limit-repeats", type=int, default=5, help="timed rounds for the machine limits")
  p.add_argument("--matmul-n", type=int, default=2048, help="side of the matmul that measures the peak")
  p.add_argument("--bandwidth-mb", type=int, default=512, help="buffer that measures the read bandwidth")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  p.add_argument("--reference-attention", default="sdpa", choices=["sdpa", "eager"])
  p.add_argument("--wait-idle", type=float, default=0.0,
                 help="before each timed phase wait up to this many seconds for other processes to go idle")
  p.add_argument("--max-foreign", type=float, default=0.10,
                 help="redo timed rounds in which other processes used more than this share of the CPU")
  p.add_argument("--host-memory", choices=["reuse", "default"], default="default",
                 help="default: glibc's malloc and JAX's dispatch as `eemo-jax eval` runs them; reuse: both sides "
                      "with eemo_jax.host_memory's settings (what `eemo-jax train` / `grpo` use on CPU)")
  mt.add_lead_in_argument(p)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.image_side % 28:
    p.error("--image-side must be a multiple of 28 (a merged patch), e.g. 224")
  args.images = args.images or math.ceil(args.examples / QUESTIONS_PER_IMAGE)
  mt.WAIT_IDLE_S, mt.MAX_FOREIGN, mt.LEAD_IN_S = args.wait_idle, args.max_foreign, args.lead_in_ms / 1e3

  import flax
  import jax
  import transformers

  digest = mt.source_digest(MEASURED_SOURCES)  # before the run: what it measures
  reuse = mt.apply_host_memory(args)
  worker = mt.TorchWorker(args.threads, extra_ops_module="eval_throughput", reuse_host_memory=reuse)
  cpu = mt.cpu_model()
  clock = CompileClock()
  try:
    with tempfile.TemporaryDirectory(prefix="eemo_eval_bench_") as folder:
      assets = prepare(folder, args)
      torch_env = worker.call("env")
      limits = mt.machine_limits(args.limit_repeats, worker, n=args.matmul_n, mbytes=args.bandwidth_mb)
      print(f"[limits] peak {limits['peak_gflops']:.1f} GFLOP/s {json.dumps(limits['matmul_gflops'])}, read "
            f"{limits['read_bandwidth_gbs']:.1f} GB/s", file=sys.stderr, flush=True)
      results = [bench_config(name.strip(), args, worker, assets, clock)
                 for name in args.configs.split(",") if name.strip()]
  finally:
    worker.close()
  print_table(cpu, limits, results, args)
  if args.json:
    env = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
           "transformers": transformers.__version__, **torch_env, "cpu": cpu,
           "cpu_count": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()], **mt._provenance(),
           "sources_sha256": digest, "git_status": mt.git_status(MEASURED_SOURCES),
           "env_vars": mt.timing_env_vars()}
    with open(args.json, "w") as f:
      json.dump({"env": env, "args": vars(args), "target": TARGET, "limits": limits, "results": results}, f,
                indent=1, default=float)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
