"""An SFT run from an experiment config: model, data, sharded train state, the loop, checkpoints, export.

    config = eemo_jax.config.load_config("configs/tiny_demo.py", overrides)
    summary = train(config)

Every host runs the same program (see launch/). The run directory holds `config.json`, `metrics.jsonl`,
`tensorboard/`, `checkpoints/`, `model_config.json` and `hf_assets/` (the architecture and tokenizer files, so
that the directory alone can start a later run, `model.init_from`, or be exported, `export-hf RUN_DIR`) and, at
the end, the export. A new run starts from what `model.init_from` names (`init_from`). A run directory that
already has a checkpoint resumes from it: the state is restored into the current mesh's shardings (the mesh may
differ from the one that saved it) and the data iterator continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable

import jax
from flax import nnx

from eemo_jax import paths
from eemo_jax import status
from eemo_jax.config import ConfigError
from eemo_jax.host_memory import use_host_memory_for_cpu_steps
from eemo_jax.model.config import Qwen25VLConfig, preset
from eemo_jax.model.heads import EmotionHead, HeadConfig
from eemo_jax.model.lora import LoraConfig, LoraParam, apply_lora
from eemo_jax.model.qwen25vl import Qwen25VL
from eemo_jax.parallel.distributed import announce_process, main_process_stream
from eemo_jax.parallel.sharding import make_mesh
from eemo_jax.train import freeze, losses, run_record
from eemo_jax.train.checkpointing import RunCheckpoints, quiet_orbax_tracebacks
from eemo_jax.train.flops import train_step_flops
from eemo_jax.train.metrics import MetricsWriter, ProgressLine
from eemo_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from eemo_jax.train.state import abstract_train_state, create_train_state
from eemo_jax.train.step import (Batch, ForwardOutput, emotion_forward, jit_eval_step, jit_train_step, lm_forward,
                                 make_eval_step, make_train_step, reseed_dropout)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the run stopped without saving that state."""


# Peak dense bf16 FLOP/s per device, for MFU (vendor figures). Other devices: `train.peak_flops`.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


# --------------------------------------------------------------------------------------------------
# Building the pieces from the config
# --------------------------------------------------------------------------------------------------


def model_config(config, tokenizer) -> Qwen25VLConfig:
  """The architecture: from the HF folder, or a preset whose vocabulary and special ids follow the tokenizer
  (a randomly initialised preset must agree with the tokenizer it will be fed)."""
  if config.model.hf_dir:
    from eemo_jax.hf.load import read_config
    if not paths.isdir(config.model.hf_dir):
      raise ConfigError(f"model.hf_dir {config.model.hf_dir} does not exist; point it at a local Qwen2.5-VL folder "
                        "(config.json + *.safetensors), or leave it empty to start from model.preset")
    return read_config(config.model.hf_dir)
  arch = preset(config.model.preset)
  special = tokenizer.special
  text = dataclasses.replace(arch.text, vocab_size=max(arch.text.vocab_size, tokenizer.vocab_size))
  return dataclasses.replace(arch, text=text, image_token_id=special.image_pad, video_token_id=special.video_pad,
                             vision_start_token_id=special.vision_start, vision_end_token_id=special.vision_end,
                             eos_token_id=special.im_end, pad_token_id=special.endoftext)


def head_config(config, arch: Qwen25VLConfig, tokenizer) -> HeadConfig | None:
  h = config.head
  if h.kind == "none":
    return None
  hidden = arch.text.hidden_size
  common = dict(num_attention_heads=h.num_attention_heads, projection_dropout=h.projection_dropout,
                attention_dropout=h.attention_dropout, classifier_dropout=h.classifier_dropout)
  if h.kind == "pooled":
    extra = dict(des_dim=h.des_dim) if h.des_dim else {}
    return HeadConfig.pooled(hidden, classifier_hidden=h.classifier_hidden, mask_padding=h.mask_padding,
                             num_hidden_layers_mean=h.num_hidden_layers_mean, **common, **extra)
  if h.kind == "token":
    from data_pipeline.tasks import DES_MARKER
    emo_id = tokenizer.encode(DES_MARKER)[-1]
    extra = dict(des_dim=h.des_dim) if h.des_dim else {}
    return HeadConfig.token(hidden, emo_id, **extra)
  raise ConfigError(f"head.kind {h.kind!r} is unknown; use none, pooled or token")


class EmotionSFTModel(nnx.Module):
  """The trained module: the backbone and, optionally, the emotion head (paths `backbone/...`, `head/...`)."""

  def __init__(self, backbone: Qwen25VL, head: EmotionHead | None):
    self.backbone = backbone
    self.head = head


def build_model(config, arch: Qwen25VLConfig, head_cfg: HeadConfig | None, *, backbone: Qwen25VL | None = None,
                mesh=None) -> EmotionSFTModel:
  """Backbone (given, e.g. loaded from HF, or random), head and LoRA adapters. Traceable when backbone is None."""
  seed = int(config.train.seed)
  if backbone is None:
    backbone = Qwen25VL(arch, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                        remat=config.model.remat, attention_impl=config.model.attention, rngs=nnx.Rngs(seed))
  head = None
  if head_cfg is not None:
    head = EmotionHead(head_cfg, rngs=nnx.Rngs(params=seed + 1, dropout=seed + 2))
  model = EmotionSFTModel(backbone, head)
  if config.lora.rank:
    lora = LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                      targets=tuple(config.lora.targets), exclude=tuple(config.lora.exclude))
    apply_lora(model.backbone, lora, nnx.Rngs(seed + 3), mesh=mesh)
  return model


def _in_model(pattern: str) -> str:
  """Config patterns name backbone paths as in HF-style modules (`visual/...`, `language_model/...`) or
  `head/...`; in the trained module the backbone sits under `backbone/`."""
  return pattern if pattern.startswith(("head/", "backbone/")) else f"backbone/{pattern}"


def trainable_set(config, has_head: bool) -> freeze.Trainable:
  t = config.trainable
  head = ("head/.*",) if has_head else ()
  frozen = freeze.paths(*map(_in_model, t.freeze)) if t.freeze else nnx.Nothing
  if t.adapters_only:
    return freeze.Trainable(include=nnx.Any(LoraParam, *(freeze.paths(h) for h in head)), exclude=frozen)
  if t.last_text_layers:
    layers = _in_model(freeze.TEXT_LAYERS)
    return freeze.Trainable(include=freeze.paths(layers, *head), exclude=frozen,
                            last_layers=((layers, int(t.last_text_layers)),))
  return freeze.Trainable(exclude=frozen)


def sft_forward(model: EmotionSFTModel, batch: Batch, rng: jax.Array) -> ForwardOutput:
  """The backbone alone, or backbone + emotion head; dropout masks (head, LoRA) from the step's key."""
  if model.head is None:
    reseed_dropout(model, rng)
    return lm_forward(model.backbone, batch, rng)
  return emotion_forward(model, batch, rng)


def step_flops(arch: Qwen25VLConfig, head_cfg: HeadConfig | None, batch_spec: Batch, config) -> float:
  """Analytic FLOPs of one optimizer step, for MFU: text exact from the batch shapes; the images
  counted as one square image per row filling the row's share of the patch budget."""
  accum, rows, seq = batch_spec.input_ids.shape  # (microbatches, rows, seq)
  grids = ()
  if batch_spec.vision is not None:
    slots = batch_spec.vision.pixel_values.shape[-2] // rows  # patches per row
    side = max(arch.vision.spatial_merge_size, int(math.isqrt(slots)) // 2 * 2)
    grids = [(1, side, side)] * (rows * accum)
  return train_step_flops(arch, batch=rows * accum, seq_len=seq, image_grid_thw=grids, head_config=head_cfg,
                          remat=config.model.remat, lm_loss=bool(config.loss.lm_weight))


def pipeline_config(config, arch: Qwen25VLConfig, *, split: str | None = None, eval_mode: bool = False,
                    examples_per_step: int | None = None, stacked: bool = True):
  """The input pipeline of a config: each process's share of `examples_per_step` (default
  `train.global_batch_size`) records per optimizer step, in `optimizer.accum_steps` micro-batches (stacked
  on a leading axis, or, with `stacked=False`, as that many plain batches)."""
  from data_pipeline.pipeline import PipelineConfig
  d, t = config.data, config.train
  accum = 1 if eval_mode else int(config.optimizer.accum_steps)
  examples = int(t.global_batch_size) if examples_per_step is None else int(examples_per_step)
  per_process, rest = divmod(examples, accum * jax.process_count())
  if rest or per_process < 1:
    what = "train.global_batch_size" if examples_per_step is None else "the records per step"
    raise ConfigError(f"{what} ({examples}) must be a multiple of optimizer.accum_steps ({accum}) x JAX processes "
                      f"({jax.process_count()})")
  v = arch.vision
  fields = dict(d.items())
  fields.update(batch_size=per_process, patch_budget=d.patch_budget or None, frame_budget=d.frame_budget or None,
                max_image_pixels=d.max_image_pixels or None,
                seed=int(t.seed), num_epochs=1 if eval_mode else None,
                microbatches=0 if eval_mode or not stacked else accum,
                patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
                window_size=v.window_size)
  if split:
    fields.update(split=split, shuffle=False)
  return PipelineConfig(**fields)


def check_rows_shard(rows: int, mesh) -> None:
  """Raises unless the mesh's batch axes divide the rows of a global microbatch.

  The batch axis is sharded over `data` x `fsdp`; a row count they do not divide cannot be sharded and
  would silently stay whole on every device (a 32-row microbatch on v5p:4x4x4's 64 chips compiled to
  46 GiB per chip instead of a fraction of it).
  """
  shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  if rows % shards:
    raise ConfigError(f"a microbatch holds {rows} rows, which the mesh's data x fsdp = {shards} devices do not divide, "
                     f"so the batch could not be sharded. Make train.global_batch_size / optimizer.accum_steps a "
                     f"multiple of {shards}, or change the mesh")


def optimizer_settings(config, total_steps: int) -> OptimizerConfig:
  """The warmup is `ceil(warmup_ratio x steps)` as the HF Trainer counts it (`TrainingArguments.get_warmup_steps`),
  so a recipe's warmup ratio gives the authors' number of warmup steps."""
  o = config.optimizer
  return OptimizerConfig(learning_rate=o.learning_rate, schedule=o.schedule,
                         warmup_steps=math.ceil(o.warmup_ratio * total_steps), total_steps=total_steps,
                         end_learning_rate=o.end_learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
                         weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm or None,
                         accum_steps=int(o.accum_steps))


def loss_settings(config) -> losses.LossConfig:
  return losses.LossConfig(**dict(config.loss.items()))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunSummary:
  run_dir: str
  steps: int
  resumed_from: int | None
  final_metrics: dict[str, float]
  eval_metrics: dict[str, float]
  export_dir: str | None
  seconds: float


def _host_metrics(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluate(eval_step, state, config, arch, tokenizer, mesh, *, source=None) -> dict[str, float]:
  """Loss, token accuracy and CES accuracy over up to `eval.batches` batches of the held-out split."""
  from data_pipeline.pipeline import make_iterator, to_train_batch
  pcfg = pipeline_config(config, arch, split=config.eval.split, eval_mode=True)
  iterator = make_iterator(pcfg, mesh=mesh, tokenizer=tokenizer, source=source)
  total = None
  try:
    for index, batch in enumerate(iterator):
      if index >= config.eval.batches:
        break
      sums = eval_step(state, to_train_batch(batch))
      total = sums if total is None else total + sums
  finally:
    iterator.close()  # stops its worker processes now, not at garbage collection
  if total is None:
    return {}
  return _host_metrics(losses.metrics_from_sums(total, loss_settings(config)))


def train(config, *, tokenizer=None, train_source=None, eval_source=None, progress_stream=None,
          on_step: Callable[[int, dict], None] | None = None) -> RunSummary:
  """Runs (or resumes) the SFT run the config describes. `*_source` replace the built data sets (tests).

  The inputs (tokenizer, HF folder, data, export target) are checked before anything is written into the
  run directory, and a resume is checked against the config the run was started with (`run_record`).
  """
  from data_pipeline.pipeline import abstract_batch, make_iterator, skip_counts, to_train_batch
  from eemo_jax.train import saved_run

  started = time.time()
  use_host_memory_for_cpu_steps()  # before the backend starts: the CPU step's buffers stay mapped
  announce_process()  # every process: its index and devices, once
  t = config.train
  run_dir = paths.absolute(t.run_dir)
  is_main = jax.process_index() == 0
  paths.check_all(config, "train.run_dir", "train.export_dir", "data.data_dir", "data.tokenizer_dir", "model.hf_dir")

  source, tokenizer_dir, tokenizer, arch = run_model_inputs(config, tokenizer)
  head_cfg = head_config(config, arch, tokenizer)
  mesh = make_mesh(dict(config.mesh.items()))
  rules = tuple(tuple(r) for r in config.rules)
  trainable = trainable_set(config, head_cfg is not None)
  pcfg = dataclasses.replace(pipeline_config(config, arch), tokenizer_dir=tokenizer_dir)
  check_rows_shard(pcfg.batch_size * jax.process_count(), mesh)
  check_tokenizer_fits(config, arch, tokenizer, tokenizer_dir)
  export_dir = paths.absolute(t.export_dir)
  check_export_target(export_dir, run_dir, overwrite=t.export_overwrite)

  total_steps = run_length(config, pcfg, train_source, examples_per_step=int(t.global_batch_size))
  check_eval_split(config, pcfg, eval_source)
  opt_cfg = optimizer_settings(config, total_steps)
  optimizer = make_optimizer(opt_cfg)
  schedule = learning_rate_schedule(opt_cfg)

  data = make_iterator(pcfg, mesh=mesh, tokenizer=tokenizer, model_config=arch, source=train_source)
  def open_checkpoints() -> RunCheckpoints:
    return RunCheckpoints(run_dir, save_every=t.checkpoint_every, keep=t.keep_checkpoints,
                          async_save=t.async_checkpoints, clean_up=True)

  quiet_orbax_tracebacks()
  # A new run creates its checkpoint folder only once its first batch is in hand (below).
  checkpoints = open_checkpoints() if RunCheckpoints.present(run_dir) else None
  resumed_from = checkpoints.latest_step() if checkpoints is not None else None
  config_check = run_record.check_config(config, run_dir, resuming_from=resumed_from)
  writer = progress = None
  try:
    with jax.set_mesh(mesh):
      restore_warnings, init_lines = [], []
      if resumed_from is not None:
        factory = lambda: build_model(config, arch, head_cfg)  # noqa: E731
        graphdef, abstract = abstract_train_state(factory, optimizer, mesh, rules, trainable=trainable, seed=t.seed)
        resumed_from, state, restore_warnings = checkpoints.restore_newest_intact(abstract, data)
      else:
        graphdef, state, init_lines = initial_state(config, arch, head_cfg, optimizer, mesh, rules, trainable, source)
      start = int(jax.device_get(state.step))
      # The first batch before anything is written: a data set that yields nothing usable (or a strict-mode
      # bad record) stops the run here, with the run directory as it was.
      pending = next(data) if start < total_steps else None
      if checkpoints is None:
        checkpoints = open_checkpoints()
      if is_main:  # the inputs are usable and the state is in hand: now the run directory records this config
        run_record.write_config(config, run_dir, config_check, step=resumed_from)
        saved_run.record_model(run_dir, arch, tokenizer_dir)

      batch_spec = to_train_batch(abstract_batch(pcfg, tokenizer, mesh=mesh))
      step_fn = jit_train_step(make_train_step(graphdef, optimizer, trainable=trainable,
                                               loss_config=loss_settings(config), schedule=schedule,
                                               forward=sft_forward, mesh=mesh, rules=rules),
                               state, batch_spec, mesh, rules)
      # Compiled here, explicitly, to time it; the specs carry the batches' shardings, so the first step's
      # call finds this executable in jit's cache.
      if start < total_steps:
        status.compile_timed("train step", lambda: step_fn.lower(state, batch_spec).compile())
      eval_fn = None
      if config.eval.batches:
        eval_spec = to_train_batch(abstract_batch(pipeline_config(config, arch, split=config.eval.split,
                                                                  eval_mode=True), tokenizer, mesh=mesh))
        eval_fn = jit_eval_step(make_eval_step(graphdef, loss_config=loss_settings(config), forward=sft_forward,
                                               mesh=mesh, rules=rules), state, eval_spec, mesh, rules)
        status.compile_timed("eval step", lambda: eval_fn.lower(state, eval_spec).compile())

      flops = step_flops(arch, head_cfg, batch_spec, config)
      peak = _peak_flops(config) * jax.device_count()
      writer = MetricsWriter(run_dir, enabled=is_main)
      progress = ProgressLine(total_steps, stream=main_process_stream(progress_stream), every=t.log_every)
      announce_start(progress, run_dir, start, resumed_from, restore_warnings, config_check)
      for line in init_lines:
        progress.message(line)
      last, eval_metrics = {}, {}
      window_start = time.time()
      tokens_per_step = math.prod(batch_spec.input_ids.shape)  # processed (padded) tokens of all microbatches
      last_logged = start
      for step in range(start + 1, total_steps + 1):
        batch = to_train_batch(next(data) if pending is None else pending)
        pending = None
        state, metrics = step_fn(state, batch)
        metrics = _host_metrics(metrics)
        if not math.isfinite(metrics["loss"]):
          raise NonFiniteLossError(_non_finite(metrics["loss"], step, data, checkpoints))
        metrics.update(skipped_metrics(skip_counts(data)))
        if step % t.log_every == 0 or step == total_steps:
          seconds = max(time.time() - window_start, 1e-9)
          metrics["tokens_per_s"] = tokens_per_step * (step - last_logged) / seconds
          if peak and flops:
            metrics["mfu"] = flops * (step - last_logged) / seconds / peak
          window_start, last_logged = time.time(), step
          progress.update(step, {k: metrics[k] for k in _SHOWN if metrics.get(k)})
        writer.write(step, metrics)
        last = metrics
        if on_step is not None:
          on_step(step, metrics)
        checkpoints.save(step, state, data, force=step == total_steps)
        report_saved(checkpoints.poll(), checkpoints, progress)
        if eval_fn is not None and config.eval.every and step % config.eval.every == 0 and step != total_steps:
          eval_metrics = evaluate(eval_fn, state, config, arch, tokenizer, mesh, source=eval_source)
          writer.write(step, eval_metrics, split="eval")
          progress.message(f"eval @ {step}: " + _describe(eval_metrics))
      if eval_fn is not None:
        eval_metrics = evaluate(eval_fn, state, config, arch, tokenizer, mesh, source=eval_source)
        writer.write(total_steps, eval_metrics, split="eval")
        progress.message(f"eval @ {total_steps}: " + _describe(eval_metrics))
      report_saved(checkpoints.wait(), checkpoints, progress)
  finally:
    close_all(progress, writer, checkpoints, data)

  if export_dir:
    export(config, graphdef, state, tokenizer_dir, export_dir, run_dir=run_dir)
  return RunSummary(run_dir=run_dir, steps=total_steps, resumed_from=resumed_from, final_metrics=last,
                    eval_metrics=eval_metrics, export_dir=export_dir or None, seconds=time.time() - started)


def run_model_inputs(config, tokenizer=None):
  """(source, tokenizer folder, tokenizer, architecture) of a run (SFT or GRPO), all checked: `model.init_from`'s
  source (None without one), whose tokenizer and architecture come first; else `model.hf_dir` or the preset.
  `data.tokenizer_dir` overrides the tokenizer folder; `tokenizer`, when given (tests), is used as it is."""
  from eemo_jax.train import init_from
  source = init_from.resolve(config)
  tokenizer_dir = paths.absolute(config.data.tokenizer_dir or (source.tokenizer_dir if source else
                                                               config.model.hf_dir))
  if tokenizer is None:
    tokenizer = load_run_tokenizer(tokenizer_dir)
  arch = source.arch if source else model_config(config, tokenizer)
  return source, tokenizer_dir, tokenizer, arch


def initial_state(config, arch: Qwen25VLConfig, head_cfg: HeadConfig | None, optimizer, mesh, rules,
                  trainable: freeze.Trainable, source=None):
  """(graphdef, train state, lines saying where the weights came from) of a new run (SFT or GRPO): from
  `model.init_from`'s `source` (`init_from.resolve`), else from `model.hf_dir`, else random."""
  seed = int(config.train.seed)
  if source is not None:
    from eemo_jax.train import init_from
    model, lines = init_from.initial_model(source, config, arch, head_cfg, mesh=mesh, rules=rules)
  elif config.model.hf_dir:
    from eemo_jax.hf.load import load_hf
    m = config.model
    backbone = load_hf(m.hf_dir, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, rules=rules, remat=m.remat,
                       attention_impl=m.attention)
    model, lines = build_model(config, arch, head_cfg, backbone=backbone, mesh=mesh), []
  else:
    model, lines = (lambda: build_model(config, arch, head_cfg)), []  # traced: parameters made in place, sharded
  graphdef, state = create_train_state(model, optimizer, mesh, rules, trainable=trainable, seed=seed)
  return graphdef, state, lines


def run_length(config, pcfg, source, *, examples_per_step: int) -> int:
  """Optimizer steps of a run: `train.steps`, or else `train.epochs` over the data set's records."""
  if config.train.steps:
    return int(config.train.steps)
  from data_pipeline.pipeline import load_source
  examples = len(source) if source is not None else len(load_source(pcfg))
  return max(1, math.ceil(float(config.train.epochs) * examples / examples_per_step))


def announce_start(progress: ProgressLine, run_dir: str, start: int, resumed_from: int | None, warnings: list[str],
                   config_check: run_record.ConfigCheck) -> None:
  """The lines a run prints before its first step: damaged checkpoints set aside, accepted config changes, where
  it resumes."""
  for line in warnings:
    progress.message(f"warning: {line}")
  if config_check.message():
    progress.message(config_check.message())
  if resumed_from is not None:
    progress.message(f"resumed {run_dir} at step {start} (checkpoint {resumed_from})")


def close_all(*resources) -> None:
  """Closes a run's resources in order, skipping those not opened yet (None): the progress line, the metrics
  writer, the checkpoint manager (waiting for a pending save), the data iterator (its worker processes stop
  now, not at garbage collection)."""
  for resource in resources:
    close = getattr(resource, "close", None)
    if close is not None:
      close()


def report_saved(step: int | None, checkpoints: RunCheckpoints, progress: ProgressLine) -> None:
  """Claims a checkpoint only once it is complete on disk."""
  if step is not None:
    progress.message(f"checkpoint {step} -> {checkpoints.directory}")


def load_run_tokenizer(folder: str):
  from data_pipeline.tokenizer import load_tokenizer
  if not folder:
    raise ConfigError("no tokenizer: set data.tokenizer_dir (or model.hf_dir, whose tokenizer is used)")
  if not paths.isdir(folder):
    raise ConfigError(f"the tokenizer folder {folder} does not exist; set data.tokenizer_dir (or model.hf_dir) to a "
                      "folder with tokenizer.json: a Qwen2.5-VL checkpoint, or the one `eemo-jax demo` builds")
  try:
    return load_tokenizer(folder)
  except FileNotFoundError as error:
    raise ConfigError(str(error)) from None
  except Exception as error:  # tokenizers raises its own exception types for a damaged file
    raise ConfigError(f"{paths.join(folder, 'tokenizer.json')} cannot be read ({type(error).__name__}: "
                      f"{error}); point data.tokenizer_dir at a folder with a valid tokenizer.json") from None


def check_tokenizer_fits(config, arch: Qwen25VLConfig, tokenizer, tokenizer_dir: str) -> None:
  """Refuses, before anything is written, a tokenizer whose vision token ids or vocabulary are not the model's:
  a model folder paired with another model's tokenizer (the pipeline refuses it too, but as a traceback)."""
  from data_pipeline.tokenizer import token_mismatches
  wrong = token_mismatches(arch, tokenizer)
  if wrong:
    model = f"the model in {config.model.hf_dir}" if config.model.hf_dir else "the model"
    raise ConfigError(f"the tokenizer in {tokenizer_dir} does not fit {model} ({'; '.join(wrong)}); set "
                      "data.tokenizer_dir to the folder of the model's own tokenizer (by default model.hf_dir's)")


def check_eval_split(config, pcfg, source) -> None:
  """Opens the held-out split now: it is otherwise first read at the first evaluation, after the run directory
  is written and the steps are compiled (or, in SFT, after eval.every steps)."""
  if not config.eval.batches or source is not None:
    return
  from data_pipeline.pipeline import load_source
  load_source(dataclasses.replace(pcfg, split=config.eval.split))


_SHOWN = ("loss", "lm_loss", "token_accuracy", "ces_loss", "ces_accuracy", "grad_norm", "lr", "tokens_per_s", "mfu",
          "skipped")


def skipped_metrics(counts: dict[str, int]) -> dict[str, float]:
  """Records this process's pipeline has skipped so far, per reason and in total (`skipped`), for the log."""
  out = {f"skipped_{reason}": float(n) for reason, n in counts.items()}
  out["skipped"] = float(sum(counts.values()))
  return out


def _describe(metrics: dict[str, float]) -> str:
  return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _non_finite(loss: float, step: int, data, checkpoints: RunCheckpoints) -> str:
  """Stops a run whose loss went NaN/inf. The checkpoint of step - 1 holds the very state that produced
  it (resuming from it would replay the same batch into the same NaN), so it is removed too."""
  checkpoints.wait()
  if checkpoints.latest_step() == step - 1:
    checkpoints.delete(step - 1)
  good = checkpoints.latest_step()
  kept = f"the last good checkpoint is step {good}" if good is not None else "no earlier checkpoint is left"
  return (f"loss is {loss} at step {step} (the run's batch #{step}, data iterator state {_short_state(data)}); "
          f"neither this state nor the one before it is kept: {kept}. Lower optimizer.learning_rate or check "
          "that batch's records, then run the same command to resume.")


def _short_state(data) -> str:
  try:
    return json.dumps(data.get_state(), default=str)[:200]
  except Exception:  # the state is only for the message
    return "unavailable"


def _peak_flops(config) -> float:
  """Per-device peak: the config's `train.peak_flops` if set, else the vendor figure of this device kind."""
  configured = float(config.train.peak_flops)
  if configured:
    return configured
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), 0.0)


EXPORTS_FILE = "exports.json"  # in the run directory: the export folders this run wrote


def _exports_of(run_dir: str) -> list[str]:
  path = paths.join(run_dir, EXPORTS_FILE)
  if not paths.isfile(path):
    return []
  try:
    return list(json.loads(paths.read_text(path)))
  except (OSError, ValueError, TypeError):
    return []


def check_export_target(export_dir: str, run_dir: str, *, overwrite: bool) -> None:
  """Refuses, before any training, an export folder that holds something this run did not write there.

  Finding that out after hours of training would be too late; a folder this run exported to before (a
  re-run of a finished run) is replaced, since the run owns it.
  """
  from eemo_jax.hf.staging import ExportError, check_target
  if not export_dir:
    return
  owned = export_dir in _exports_of(run_dir)
  try:
    check_target(export_dir, overwrite=overwrite or owned)
  except ExportError as error:
    hint = "" if overwrite else (" (this run did not write it; set --config.train.export_overwrite=true to replace "
                                 "it when the run ends)")
    raise ConfigError(f"train.export_dir: {error}{hint}") from None


def export(config, graphdef, state, tokenizer_dir: str, out_dir: str, *, run_dir: str | None = None, dtype=None,
           max_shard_bytes: int = 5 * 2**30, adapter_base: str | None = None) -> str:
  """The trained model as an HF folder (LoRA merged) plus the head's safetensors beside it, replacing
  `out_dir` whole once complete (a kill leaves the old export or the new one).

  `dtype` casts the weights (None: as trained). With `adapter_base` (the model the adapters were trained on) the
  LoRA adapters are written as a PEFT adapter folder instead (`hf.peft_io`), with the tokenizer files and head."""
  from eemo_jax.hf.heads_io import save_head
  from eemo_jax.hf.save import check_exportable, copy_assets, export_folder, write_hf
  from eemo_jax.model.lora import merge_lora
  model = nnx.merge(graphdef, state.params, state.frozen)
  backbone = model.backbone if adapter_base else merge_lora(model.backbone)
  if not adapter_base:
    check_exportable(backbone)
  # The whole folder (HF files and the head) is put in place at once; replacing is safe here because
  # `check_export_target` refused, before training, a folder that was neither this run's nor allowed.
  with export_folder(out_dir, overwrite=True) as folder:
    if adapter_base:
      from eemo_jax.hf.peft_io import write_peft_adapter
      write_peft_adapter(backbone, folder, base_model_name_or_path=adapter_base, dtype=dtype)
      if jax.process_index() == 0:
        copy_assets(tokenizer_dir or None, folder)
    else:
      write_hf(backbone, folder, source_dir=tokenizer_dir or None, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if model.head is not None:
      save_head(model.head, folder)
  if run_dir is not None and jax.process_index() == 0 and out_dir not in _exports_of(run_dir):
    run_record.write_json(paths.join(run_dir, EXPORTS_FILE), _exports_of(run_dir) + [out_dir])
  return out_dir
