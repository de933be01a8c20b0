#!/usr/bin/env python
"""Issue 13: EEmo-JAX's GRPO engine against TRL 1.16's `GRPOTrainer` on CPU: completions per second and
seconds per optimizer step, with the split between rollout and update, same weights, prompts and reward.

    python benchmarks/grpo_throughput.py [--configs tiny,small] [--repeats N] [--wait-idle S] [--json out.json]

The setting (both sides): fp32, G = 4 completions of at most 32 tokens per prompt, 4 prompts (16 completions)
per optimizer step, one optimizer step per rollout (`num_iterations` 1), beta 0 (no reference model), loss
`dapo` (TRL's default), temperature 1, no top-k/top-p, AdamW at a constant 1e-6, gradient clipping at 1, no
gradient checkpointing / remat.

* **Model.** A preset of `eemo_jax.model.config` (`tiny`, `small`) with the offline tokenizer's vocabulary and
  special ids, as `eemo-jax grpo` builds it (`train.run.model_config`), randomised and saved by
  `model_throughput.build_hf_models` (norms and biases randomised too); both sides load that folder.
* **Prompts.** The synthetic EmoVerse set (`builders.build("synthetic", config="emoverse")`), task
  `emoverse_ces` (the Mikels-8 question), each record's picture resized to 112x112 (PNG, so both sides decode
  the same pixels; min = max pixels = 112²: an 8x8 patch grid, 16 image tokens). Both sides take the records in
  the same order, 4 per step; every prompt has the same length, so neither side pads. The script checks that
  TRL's prompt token ids equal the pipeline's.
* **Reward.** The share of a completion's tokens whose id is below a quarter of the vocabulary (the toy reward
  of tests/rl/test_run.py), a Python function on each side.
* **EEmo-JAX.** The engine of `eemo-jax grpo` (`eemo_jax.rl.run.Engine`), built as `grpo()` builds it from
  configs/tiny_grpo.py plus the overrides recorded in the JSON, on prompt batches the prompt-only pipeline
  made beforehand (the pipeline's cost per batch is measured and reported apart: a run makes them in
  background threads). A step is `engine.rollout` (prefix-shared sampling, decode, parse, rewards,
  advantages) then `engine.update` (log-prob forward, backward, AdamW), its metrics fetched to the host.
* **TRL.** `GRPOTrainer.train()` in its own process (`model_throughput.TorchWorker`), on a `datasets.Dataset`
  of the same conversational prompts with an `image` column, a `Qwen2_5_VLProcessor` built locally from the
  offline tokenizer and `Qwen2VLImageProcessorPil`, the model loaded with sdpa attention (transformers'
  default). Its training loop runs in a thread that a callback holds at the start of every optimizer step
  until the parent asks for one, so TRL's steps interleave with the JAX steps and never overlap them. A step
  is timed from `on_step_begin` to `on_step_end` (generation, scoring, forward, backward, clipping, AdamW);
  its rollout is the `_generate_and_score_completions` call (sampling alone: `_generate_single_turn`); the
  update is the rest. What TRL does between steps (logging, fetching the next prompts) is reported apart.

Timing: `model_throughput.race` (interleaved rounds in rotating order, each timed step right after an
untimed step of the same side, rounds in which other processes used more than --max-foreign of the CPU
redone, --wait-idle), after two warm-up steps per side (the first JAX step compiles). Medians over rounds,
and the paired per-round TRL/JAX ratio with a bootstrap 90% interval. The machine's fp32 matmul peaks and
read bandwidth are measured in the same run (`model_throughput.machine_limits`) and the CPU is named.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import platform
import queue
import shutil
import sys
import tempfile
import threading
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import model_throughput as mt  # noqa: E402

TARGETS = {"tiny": 5.0, "small": 2.0}  # JAX/TRL completions per second the issue asks for
TINY_GRPO = os.path.join(ROOT, "configs", "tiny_grpo.py")
TASK = "emoverse_ces"


# ------------------------------------------------------------------------------------------ shared pieces
class Timed(float):
  """A step's seconds (what `mt.race` ranks and keeps) that carries the step's parts (rollout, update, ...)."""

  def __new__(cls, seconds: float, **parts):
    value = super().__new__(cls, seconds)
    value.parts = parts
    return value


def low_id_share(tokens: list[np.ndarray], threshold: int) -> list[float]:
  """The reward of both sides: per completion (its kept tokens, EOS included), the share of ids below
  `threshold`; 0 for an empty completion."""
  return [float(np.mean(np.asarray(ids) < threshold)) if len(ids) else 0.0 for ids in tokens]


def reward_threshold(vocab_size: int) -> int:
  return vocab_size // 4


# ------------------------------------------------------------------------------------------ TRL (worker process)
class _Stop(Exception):
  """Raised in TRL's training thread to leave `trainer.train()` when the benchmark is done with it."""


class TRLSteps:
  """`GRPOTrainer.train()` in a thread, released one optimizer step at a time (`step()`).

  A callback blocks the thread at every `on_step_begin` until `step()` releases it; `step()` returns when the
  thread blocks again, after the step and TRL's logging and prompt fetching that follow it, so nothing of TRL
  runs while the parent times JAX.
  """

  def __init__(self, trainer, threads: int):
    from transformers import TrainerCallback

    self.trainer, self.threads = trainer, threads
    self.waiting = queue.Queue()  # ("ready", last step's record) / ("error", traceback)
    self.go = threading.Semaphore(0)
    self.stopping = False
    self.record: dict | None = None
    self.parts = {"rollout_s": 0.0, "sample_s": 0.0}
    self.step_start = self.step_end = 0.0
    self._time_method("_generate_and_score_completions", "rollout_s")
    self._time_method("_generate_single_turn", "sample_s")
    owner = self

    class Gate(TrainerCallback):
      def on_step_begin(self, args, state, control, **kwargs):
        owner._begin()

      def on_step_end(self, args, state, control, **kwargs):
        owner._end()

    trainer.add_callback(Gate())
    self.thread = threading.Thread(target=self._train, name="trl-train", daemon=True)
    self.thread.start()
    self._wait()  # held at the first step's start

  def _time_method(self, name: str, part: str) -> None:
    inner = getattr(self.trainer, name)

    @functools.wraps(inner)
    def timed(*args, **kwargs):
      t0 = time.perf_counter()
      try:
        return inner(*args, **kwargs)
      finally:
        self.parts[part] += time.perf_counter() - t0

    setattr(self.trainer, name, timed)  # an instance attribute: TRL calls self.<name>(...)

  def _train(self) -> None:
    import torch
    torch.set_num_threads(self.threads)  # OpenMP's thread count is per calling thread
    try:
      self.trainer.train()
      self.waiting.put(("error", "GRPOTrainer.train() ended: raise max_steps"))
    except _Stop:
      pass
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
      self.waiting.put(("error", traceback.format_exc()))

  def _begin(self) -> None:
    if self.record is not None:
      self.record["between_s"] = time.perf_counter() - self.step_end
      logged = self.trainer.state.log_history[-1] if self.trainer.state.log_history else {}
      self.record.update({key: logged.get(name) for key, name in (
          ("loss", "loss"), ("reward", "reward"), ("completion_length", "completions/mean_length"),
          ("trl_step_time_s", "step_time"))})
    self.waiting.put(("ready", self.record))
    self.go.acquire()
    if self.stopping:
      raise _Stop
    self.parts = {"rollout_s": 0.0, "sample_s": 0.0}
    self.step_start = time.perf_counter()

  def _end(self) -> None:
    self.step_end = time.perf_counter()
    self.record = {"step_s": self.step_end - self.step_start, **self.parts}

  def _wait(self):
    kind, value = self.waiting.get()
    if kind == "error":
      raise RuntimeError(f"TRL's training thread failed:\n{value}")
    return value

  def step(self) -> dict:
    self.go.release()
    return self._wait()

  def close(self) -> None:
    self.stopping = True
    self.go.release()
    self.thread.join(timeout=120)


def _local_processor(tokenizer_dir: str, pixels: int):
  """A `Qwen2_5_VLProcessor` from the offline tokenizer folder and the PIL image processor, no hub access.

  transformers 5.23's processor always wants a video processor, which needs torchvision (not installed here);
  as in tests/data_pipeline/test_tokenizer.py, its sub-processor list is narrowed to the image processor and
  the tokenizer, for this process's lifetime (the processor consults the list on every call).
  """
  from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil
  from transformers.utils import is_torchvision_available
  if not is_torchvision_available():
    Qwen2_5_VLProcessor.get_attributes = classmethod(lambda cls: ["image_processor", "tokenizer"])
  tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
  with open(os.path.join(tokenizer_dir, "chat_template.json")) as f:
    template = json.load(f)["chat_template"]
  images = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
  return Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)


def _trl_build(state: dict, arch, folder: str, seed: int) -> None:
  """Writes the random model of `arch` to `folder` (both sides load it from there)."""
  mt.build_hf_models(arch, folder, seed)


def _trl_setup(state: dict, folder: str, tokenizer_dir: str, rows: list, settings: dict) -> list[list[int]]:
  """Builds the trainer on `rows` ((messages, PNG bytes) in step order) and holds it at its first step.

  Returns the prompt token ids TRL's own `_tokenize_prompts` makes of the rows, for the parent to compare.
  """
  import datasets
  import torch
  import transformers
  from PIL import Image
  from transformers.trainer_callback import PrinterCallback
  from trl import GRPOConfig, GRPOTrainer
  from trl.data_utils import prepare_multimodal_messages

  transformers.logging.set_verbosity_error()
  datasets.disable_progress_bars()
  processor = _local_processor(tokenizer_dir, settings["pixels"])
  images = [Image.open(io.BytesIO(png)).convert("RGB") for _, png in rows]
  dataset = datasets.Dataset.from_dict({"prompt": [messages for messages, _ in rows], "image": images})
  threshold = settings["threshold"]

  def low_id_share_reward(completion_ids, **kwargs):
    return low_id_share(completion_ids, threshold)

  output_dir = tempfile.mkdtemp(prefix="eemo_trl_grpo_")
  args = GRPOConfig(
      output_dir=output_dir, num_generations=settings["generations"],
      max_completion_length=settings["completion_length"], beta=0.0,
      per_device_train_batch_size=settings["generations"] * settings["prompts"], gradient_accumulation_steps=1,
      temperature=1.0, use_vllm=False, bf16=False, report_to=[], logging_steps=1, use_cpu=True,
      learning_rate=settings["learning_rate"], lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0,
      gradient_checkpointing=settings["gradient_checkpointing"], shuffle_dataset=False, max_steps=10**6,
      save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=settings["seed"])
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      folder, attn_implementation=settings["attention"], dtype=torch.float32)
  trainer = GRPOTrainer(model=model, reward_funcs=low_id_share_reward, args=args, train_dataset=dataset,
                        processing_class=processor)
  trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every step's logs to stdout
  prompts = [prepare_multimodal_messages(messages, images=[image]) for (messages, _), image in zip(rows, images)]
  prompt_ids = [list(map(int, ids)) for ids in trainer._tokenize_prompts(prompts)[0]]
  state["trl"] = TRLSteps(trainer, settings["threads"])
  state["trl_dir"] = output_dir
  optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # made by train(): the thread holds there
  state["trl_env"] = {"trl_eos_ids": [int(i) for i in trainer.eos_token_ids], "trl_args_optim": str(args.optim),
                      "trl_optimizer": type(optimizer).__name__,
                      "trl_optimizer_fused": bool(optimizer.defaults.get("fused"))}
  return prompt_ids


def _trl_step(state: dict) -> dict:
  return state["trl"].step()


def _trl_env(state: dict) -> dict:
  return state["trl_env"]


def _trl_free(state: dict) -> None:
  runner = state.pop("trl", None)
  if runner is not None:
    runner.close()
  shutil.rmtree(state.pop("trl_dir", ""), ignore_errors=True)
  state.clear()


# Served by model_throughput's torch worker (`mt.TorchWorker(threads, "grpo_throughput")`).
TORCH_OPS = {"trl_build": _trl_build, "trl_setup": _trl_setup, "trl_step": _trl_step, "trl_env": _trl_env,
             "trl_free": _trl_free}


# ------------------------------------------------------------------------------------------ prompts
def prompt_source(folder: str, records: int, side: int, seed: int) -> list[dict]:
  """The synthetic EmoVerse train split, each picture resized to side x side and stored as PNG."""
  from PIL import Image

  from data_pipeline.builders import build, load_records

  report = build("synthetic", folder, config="emoverse", seed=seed, num_train=records, num_test=1)
  records, source = load_records("synthetic", folder, "train", config=report.config), []
  for features in (records[i] for i in range(len(records))):
    picture = Image.open(io.BytesIO(features["image"])).convert("RGB")
    scale = np.asarray([side / picture.width, side / picture.height] * 2, np.float32)
    out = io.BytesIO()
    picture.resize((side, side), Image.Resampling.BICUBIC).save(out, format="PNG")
    source.append({**features, "image": out.getvalue(), "width": side, "height": side,
                   "boxes": (np.asarray(features["boxes"], np.float32).reshape(-1, 4) * scale).astype(
                       np.asarray(features["boxes"]).dtype).reshape(np.shape(features["boxes"]))})
  return source


def prompt_messages(source: list[dict], side: int) -> list[list[dict]]:
  """Each record's generation prompt, as the pipeline's task builds it (`pipeline.TASKS`)."""
  from data_pipeline import pipeline
  return [pipeline.TASKS[TASK](f, [(side, side)], [(side, side)], prompt_only=True).messages for f in source]


def prompt_length(messages: list[dict], tokenizer, side: int) -> int:
  """Tokens of one prompt with its side x side image (the prompt bucket: all prompts are this long)."""
  from data_pipeline.prompts import encode_chat
  grid = (1, side // 14, side // 14)
  return len(encode_chat(messages, tokenizer, [grid], add_generation_prompt=True).input_ids)


# ------------------------------------------------------------------------------------------ EEmo-JAX
def grpo_overrides(args, name: str, tokenizer_dir: str, bucket: int, hf_dir: str = "") -> list[str]:
  """configs/tiny_grpo.py's fields changed for the benchmark (`eemo-jax grpo --config.<field>=<value>`)."""
  pixels = args.image_side**2
  fields = {
      "model.preset": name, "model.hf_dir": hf_dir, "data.tokenizer_dir": tokenizer_dir,
      "data.dataset_config": "emoverse", "data.task": TASK, "data.seq_len": bucket, "data.shuffle": False,
      "data.min_pixels": pixels, "data.max_pixels": pixels,
      "grpo.num_generations": args.generations, "grpo.max_completion_length": args.completion_length,
      "grpo.beta": 0.0, "grpo.rewards": "()", "grpo.sample_every": 0,
      "train.global_batch_size": args.generations * args.prompts, "train.steps": 10**6,
      "optimizer.learning_rate": args.learning_rate, "optimizer.end_learning_rate": args.learning_rate,
      "optimizer.warmup_ratio": 0.0, "optimizer.weight_decay": 0.0, "optimizer.max_grad_norm": 1.0,
  }
  return [f"{key}={value}" for key, value in fields.items()]


class JaxSteps:
  """The engine of `eemo-jax grpo`, built as `eemo_jax.rl.run.grpo` builds it, stepping on prepared prompts."""

  def __init__(self, config, tokenizer, source: list[dict], threshold: int):
    import jax

    from data_pipeline.pipeline import make_iterator, to_prompt_batch
    from eemo_jax.parallel.sharding import make_mesh
    from eemo_jax.rl import run as rl_run
    from eemo_jax.train import run as train_run
    from eemo_jax.train.optimizer import learning_rate_schedule, make_optimizer

    settings = rl_run.grpo_settings(config)
    loss = rl_run.loss_settings(config, settings)
    assert rl_run.check_reference_policy(config, loss) is None, "the benchmark is beta 0: no reference policy"
    arch = train_run.model_config(config, tokenizer)
    self.mesh = make_mesh(dict(config.mesh.items()))
    rules = tuple(tuple(r) for r in config.rules)
    trainable = train_run.trainable_set(config, has_head=False)
    prompts_per_step = int(config.train.global_batch_size) // settings.num_generations
    pcfg = dataclasses.replace(train_run.pipeline_config(config, arch, examples_per_step=prompts_per_step,
                                                         stacked=False),
                               tokenizer_dir=config.data.tokenizer_dir, prompt_only=True)
    train_run.check_rows_shard(pcfg.batch_size * settings.num_generations * jax.process_count(), self.mesh)
    opt_cfg = train_run.optimizer_settings(config, int(config.train.steps))
    optimizer = make_optimizer(dataclasses.replace(opt_cfg, accum_steps=1))

    # The prompt batches of one pass over the records, pulled back to back: their rate is the pipeline's.
    data = make_iterator(pcfg, tokenizer=tokenizer, model_config=arch, source=source)
    steps = len(source) // prompts_per_step
    t0 = time.perf_counter()
    self.batches = [rl_run.next_prompts(data, int(config.optimizer.accum_steps), to_prompt_batch)]
    t1 = time.perf_counter()
    self.batches += [rl_run.next_prompts(data, int(config.optimizer.accum_steps), to_prompt_batch)
                     for _ in range(steps - 1)]
    self.pipeline_first_s = t1 - t0
    self.pipeline_s_per_batch = (time.perf_counter() - t1) / max(steps - 1, 1)
    data.close()

    with jax.set_mesh(self.mesh):
      graphdef, self.state, _ = train_run.initial_state(config, arch, None, optimizer, self.mesh, rules, trainable)
      self.engine = rl_run.Engine(config, settings, loss, None, graphdef, self.state, optimizer, trainable,
                                   learning_rate_schedule(opt_cfg), self.mesh, rules, tokenizer, arch)

    def low_id_share_reward(parsed, truth, completions):
      kept = [row[mask.astype(bool)] for row, mask in zip(completions.tokens, completions.mask)]
      return low_id_share(kept, threshold)

    self.rewards = [("low_id_share", 1.0, low_id_share_reward)]
    self.count = 0
    self.completions = prompts_per_step * settings.num_generations

  def prompt_ids(self) -> list[list[int]]:
    """The unpadded prompt token ids of the batches, in step order (what TRL must see too)."""
    out = []
    for prompts in self.batches:
      for p in prompts:
        ids, mask = np.asarray(p.inputs.input_ids), np.asarray(p.inputs.attention_mask)
        out += [list(map(int, row[m.astype(bool)])) for row, m, real in zip(ids, mask, p.real_rows) if real]
    return out

  def step(self) -> dict:
    import jax
    prompts = self.batches[self.count % len(self.batches)]
    self.count += 1
    with jax.set_mesh(self.mesh):
      t0 = time.perf_counter()
      batch, rollout_metrics, _ = self.engine.rollout(self.state, prompts, self.count, None, self.rewards)
      t1 = time.perf_counter()
      self.state, metrics = self.engine.update(self.state, batch)
      metrics = jax.device_get(metrics)
      t2 = time.perf_counter()
    return {"step_s": t2 - t0, "rollout_s": t1 - t0, "sample_s": rollout_metrics["rollout_s"],
            "update_s": t2 - t1, "loss": float(metrics["loss"]), "reward": rollout_metrics["reward"],
            "completion_length": rollout_metrics["completion_length"]}


# ------------------------------------------------------------------------------------------ one config
PARTS = ("step_s", "rollout_s", "sample_s", "update_s")


def bench_config(name: str, args, limits: dict, worker: mt.TorchWorker, assets: dict) -> dict:
  import jax

  from eemo_jax.config import load_config
  from eemo_jax.train.run import model_config

  tokenizer, source = assets["tokenizer"], assets["source"]
  res: dict = {"config": name}
  with tempfile.TemporaryDirectory(prefix=f"eemo_grpo_bench_{name}_") as folder:
    arch = model_config(load_config(TINY_GRPO, grpo_overrides(args, name, assets["tokenizer_dir"], 1)), tokenizer)
    t0 = time.perf_counter()
    worker.call("trl_build", arch, folder, args.seed)
    res["build_s"] = time.perf_counter() - t0
    overrides = grpo_overrides(args, name, assets["tokenizer_dir"], assets["bucket"], hf_dir=folder)
    res["overrides"] = [o for o in overrides if not o.startswith(("model.hf_dir", "data.tokenizer_dir"))]
    config = load_config(TINY_GRPO, overrides)
    threshold = reward_threshold(arch.text.vocab_size)
    res.update(vocab_size=arch.text.vocab_size, reward_threshold=threshold, prompt_tokens=assets["bucket"])
    jax_side = JaxSteps(config, tokenizer, source, threshold)
    res["params_m"] = sum(x.size for x in jax.tree.leaves(jax_side.state.params)) / 1e6
    res["jax_pipeline_ms_per_batch"] = 1e3 * jax_side.pipeline_s_per_batch
    used = len(jax_side.batches) * args.prompts  # whole steps of the records, as the JAX side cycles them
    rows = [(messages, f["image"]) for messages, f in zip(assets["messages"][:used], source[:used])]
    settings = {"pixels": args.image_side**2, "threshold": threshold, "generations": args.generations,
                "prompts": args.prompts, "completion_length": args.completion_length,
                "learning_rate": args.learning_rate, "gradient_checkpointing": args.trl_gradient_checkpointing,
                "attention": args.trl_attention, "threads": args.threads, "seed": args.seed}
    t0 = time.perf_counter()
    trl_ids = worker.call("trl_setup", folder, assets["tokenizer_dir"], rows, settings)
    res["trl_setup_s"] = time.perf_counter() - t0
  jax_ids = jax_side.prompt_ids()
  res["prompt_ids_equal"] = trl_ids == jax_ids
  if not res["prompt_ids_equal"]:
    raise RuntimeError("TRL's prompt token ids differ from the pipeline's: the two sides would not see the same "
                       f"prompts (first JAX row {jax_ids[0][:24]}..., first TRL row {trl_ids[0][:24]}...)")
  res.update(worker.call("trl_env"))

  # Warm-up, outside the timing: the first JAX step compiles the rollout and the update.
  warm = {"jax": [jax_side.step() for _ in range(2)], "trl": [worker.call("trl_step") for _ in range(2)]}
  res["warmup"] = warm
  _print(name, "warm-up steps (s)", {k: [round(x["step_s"], 3) for x in v] for k, v in warm.items()})

  def contestant(fn):
    def run():
      parts = fn()
      return mt.Remote(Timed(parts["step_s"], **parts))
    return run

  times = mt.race({"jax": contestant(jax_side.step), "trl": contestant(lambda: worker.call("trl_step"))},
                  args.repeats, warmup=0)
  res["foreign_cpu"] = mt.FOREIGN_CPU[-1]
  worker.call("trl_free")
  n = jax_side.completions
  res["completions_per_step"] = n
  res["sides"] = {}
  for side, steps in times.items():
    parts = [s.parts for s in steps]
    if side == "trl":
      for p in parts:
        p["update_s"] = p["step_s"] - p["rollout_s"]
    out = {f"{key[:-2]}_median_s": mt.med([p[key] for p in parts]) for key in PARTS}
    out.update(step_min_s=min(p["step_s"] for p in parts), completions_per_s=n / out["step_median_s"],
               rollout_completions_per_s=n / out["rollout_median_s"],
               sample_completions_per_s=n / out["sample_median_s"],
               completion_length=mt.med([p["completion_length"] for p in parts if p.get("completion_length")
                                         is not None] or [float("nan")]),
               steps=parts)
    if side == "trl":
      out["between_steps_median_s"] = mt.med([p["between_s"] for p in parts])
    res["sides"][side] = out
  res["paired"] = {key: mt.paired_ratio([s.parts[key] for s in times["trl"]], [s.parts[key] for s in times["jax"]])
                   for key in PARTS}
  res["jax_compile_s"] = warm["jax"][0]["step_s"] - res["sides"]["jax"]["step_median_s"]
  res["ratio"] = res["sides"]["jax"]["completions_per_s"] / res["sides"]["trl"]["completions_per_s"]
  res["target"] = TARGETS.get(name)
  res["meets_target"] = None if res["target"] is None else res["paired"]["step_s"]["low"] >= res["target"]
  jax_with_pipeline = res["sides"]["jax"]["step_median_s"] + jax_side.pipeline_s_per_batch
  res["ratio_with_jax_pipeline"] = res["sides"]["trl"]["step_median_s"] / jax_with_pipeline
  _print(name, "median s", {k: {p: v[f"{p[:-2]}_median_s"] for p in PARTS} for k, v in res["sides"].items()})
  del jax_side
  return res


def _print(name: str, what: str, value) -> None:
  print(f"[{name}] {what}: {json.dumps(value, default=float)}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ report
MEASURED_SOURCES = ("eemo_jax/rl", "eemo_jax/model", "eemo_jax/generate", "eemo_jax/train", "data_pipeline")



def print_table(cpu: dict, limits: dict, results: list[dict]) -> None:
  print()
  print(mt.cpu_line(cpu))
  print("Machine limits (same run): fp32 %dx%d matmul GFLOP/s: jax %.1f, torch %.1f; read bandwidth %.1f GB/s" % (
      limits["matmul_n"], limits["matmul_n"], limits["matmul_gflops"]["jax"], limits["matmul_gflops"]["torch"],
      limits["read_bandwidth_gbs"]))
  hdr = ("config", "metric", "EEmo-JAX", "TRL", "JAX/TRL", "paired [90% CI]", "target", "ok")
  rows = []
  for r in results:
    name, j, t, pr = r["config"], r["sides"]["jax"], r["sides"]["trl"], r["paired"]
    tgt = TARGETS.get(name)
    paired = lambda key: f"{pr[key]['median']:.2f}x [{pr[key]['low']:.2f}, {pr[key]['high']:.2f}]"  # noqa: E731
    n = r["completions_per_step"]
    rows.append((name, f"completions/s (end to end, {n}/step)", f"{j['completions_per_s']:.1f}",
                 f"{t['completions_per_s']:.1f}", f"{j['completions_per_s'] / t['completions_per_s']:.2f}x",
                 paired("step_s"), f">={tgt}x" if tgt else "",
                 ("yes" if pr["step_s"]["low"] >= tgt else "NO") if tgt else ""))
    rows.append((name, "s per optimizer step", f"{j['step_median_s']:.3f}", f"{t['step_median_s']:.3f}",
                 "", "", "", ""))
    rows.append((name, "  rollout s (sample+decode+reward+adv.)", f"{j['rollout_median_s']:.3f}",
                 f"{t['rollout_median_s']:.3f}", f"{t['rollout_median_s'] / j['rollout_median_s']:.2f}x",
                 paired("rollout_s"), "", ""))
    rows.append((name, "    of which sampling s", f"{j['sample_median_s']:.3f}", f"{t['sample_median_s']:.3f}",
                 f"{t['sample_median_s'] / j['sample_median_s']:.2f}x", paired("sample_s"), "", ""))
    rows.append((name, "  update s (log-probs, backward, AdamW)", f"{j['update_median_s']:.3f}",
                 f"{t['update_median_s']:.3f}", f"{t['update_median_s'] / j['update_median_s']:.2f}x",
                 paired("update_s"), "", ""))
    rows.append((name, "rollout completions/s", f"{j['rollout_completions_per_s']:.1f}",
                 f"{t['rollout_completions_per_s']:.1f}", "", "", "", ""))
    rows.append((name, "mean completion length", f"{j['completion_length']:.1f}", f"{t['completion_length']:.1f}",
                 "", "", "", ""))
    rows.append((name, "outside the step: pipeline / TRL log+fetch s", f"{r['jax_pipeline_ms_per_batch'] / 1e3:.3f}",
                 f"{t['between_steps_median_s']:.3f}", f"{r['ratio_with_jax_pipeline']:.2f}x (JAX step + pipeline)",
                 "", "", ""))
    rows.append((name, "JAX compile s (first step - median)", f"{r['jax_compile_s']:.1f}", "", "", "", "", ""))
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
    print(f"[{r['config']}] {r['params_m']:.1f}M parameters, vocabulary {r['vocab_size']}, {r['prompt_tokens']} prompt "
          f"tokens, prompt ids equal on both sides: {r['prompt_ids_equal']}; TRL optimizer {r['trl_optimizer']}, "
          f"EOS ids {r['trl_eos_ids']}")
  print("JAX/TRL = TRL's median time over JAX's (= the throughput ratio); paired = the median over rounds of the "
        "same ratio within a round, with a bootstrap interval; 'ok' asks the interval's low end to clear the "
        "target. The JAX step excludes the prompt pipeline (a run makes batches in background threads; its "
        "back-to-back cost per batch is shown), TRL's excludes its logging and prompt fetching between steps.")
  fmt = lambda x: f"{x[0]:.0%} ({x[1]} rounds redone)"  # noqa: E731
  loads = [f"limits {fmt(limits['foreign_cpu'][0])}"] + [f"{r['config']} {fmt(r['foreign_cpu'])}" for r in results]
  print("CPU used by other processes in the kept timed rounds (0% = machine was ours): " + ", ".join(loads))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="tiny,small")
  p.add_argument("--repeats", type=int, default=8, help="timed rounds (optimizer steps per side)")
  p.add_argument("--limit-repeats", type=int, default=5, help="timed rounds for the machine limits")
  p.add_argument("--matmul-n", type=int, default=2048, help="side of the matmul that measures the peak")
  p.add_argument("--bandwidth-mb", type=int, default=512, help="buffer that measures the read bandwidth")
  p.add_argument("--generations", type=int, default=4, help="G, completions per prompt")
  p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
  p.add_argument("--completion-length", type=int, default=32, help="max_completion_length")
  p.add_argument("--records", type=int, default=32, help="distinct prompts (synthetic records), cycled")
  p.add_argument("--image-side", type=int, default=112, help="every prompt's one image is side x side pixels")
  p.add_argument("--learning-rate", type=float, default=1e-6)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  p.add_argument("--trl-attention", default="sdpa", choices=["sdpa", "eager"])
  p.add_argument("--trl-gradient-checkpointing", action="store_true",
                 help="TRL's GRPOConfig default; off by default here, as the JAX side does not rematerialise")
  p.add_argument("--wait-idle", type=float, default=0.0,
                 help="before each timed phase wait up to this many seconds for other processes to go idle")
  p.add_argument("--max-foreign", type=float, default=0.10,
                 help="redo timed rounds in which other processes used more than this share of the CPU")
  mt.add_host_memory_argument(p)
  mt.add_lead_in_argument(p)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.image_side % 28:
    p.error("--image-side must be a multiple of 28 (a merged patch), e.g. 112")
  if args.records < args.prompts:
    p.error("--records must be at least --prompts")
  mt.WAIT_IDLE_S, mt.MAX_FOREIGN, mt.LEAD_IN_S = args.wait_idle, args.max_foreign, args.lead_in_ms / 1e3

  import flax
  import jax
  import transformers

  from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer
  from eemo_jax.host_memory import use_host_memory_for_cpu_steps

  digest = mt.source_digest(MEASURED_SOURCES)  # before the run: what it measures
  reuse = mt.apply_host_memory(args)
  use_host_memory_for_cpu_steps()  # what `grpo()` does on the CPU backend, whatever --host-memory says
  worker = mt.TorchWorker(args.threads, extra_ops_module="grpo_throughput", reuse_host_memory=reuse)
  cpu = mt.cpu_model()
  try:
    with tempfile.TemporaryDirectory(prefix="eemo_grpo_bench_") as folder:
      tokenizer_dir = build_offline_tokenizer(os.path.join(folder, "tokenizer"))
      tokenizer = load_tokenizer(tokenizer_dir)
      source = prompt_source(os.path.join(folder, "data"), args.records, args.image_side, args.seed)
      messages = prompt_messages(source, args.image_side)
      lengths = {prompt_length(m, tokenizer, args.image_side) for m in messages}
      assert len(lengths) == 1, f"the prompts should all have one length, got {sorted(lengths)}"
      assets = {"tokenizer_dir": tokenizer_dir, "tokenizer": tokenizer, "source": source, "messages": messages,
                "bucket": lengths.pop()}
      torch_env = worker.call("env")
      limits = mt.machine_limits(args.limit_repeats, worker, n=args.matmul_n, mbytes=args.bandwidth_mb)
      print(f"[limits] peak {limits['peak_gflops']:.1f} GFLOP/s {json.dumps(limits['matmul_gflops'])}, read "
            f"{limits['read_bandwidth_gbs']:.1f} GB/s", file=sys.stderr, flush=True)
      results = [bench_config(name.strip(), args, limits, worker, assets)
                 for name in args.configs.split(",") if name.strip()]
  finally:
    worker.close()
  print_table(cpu, limits, results)
  if args.json:
    import trl
    env = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
           "transformers": transformers.__version__, "trl": trl.__version__, **torch_env, "cpu": cpu,
           "cpu_count": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()], **mt._provenance(),
           "sources_sha256": digest, "git_status": mt.git_status(MEASURED_SOURCES),
           "env_vars": mt.timing_env_vars()}
    with open(args.json, "w") as f:
      json.dump({"env": env, "args": vars(args), "targets": TARGETS, "limits": limits, "results": results}, f,
                indent=1, default=float)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
