"""A GRPO run from an experiment config: rollouts, rewards, advantages, updates, checkpoints, metrics, export.

    config = eemo_jax.config.load_config("configs/tiny_grpo.py", overrides)
    summary = grpo(config)

One step of a run (`num_iterations` optimizer steps share one rollout):

1. **Rollout.** `train.global_batch_size / grpo.num_generations` prompts (left-padded, from the prompt-only
   pipeline) in `optimizer.accum_steps` micro-batches; each micro-batch's images and prompt prefill run once
   per prompt and its G completions decode together (`rollout.py`), with a key derived from the run's key
   and the step, so a resumed run samples what the interrupted one would have.
2. **Rewards.** The completions are decoded and parsed once on the host (`parsing.parse_completions`); every
   reward of `grpo.rewards` is a jitted array function of the parsed arrays and the prompts' ground truth
   (`rewards.compute_rewards`), plus any Python reward functions passed to `grpo(...)`.
3. **Advantages** per group (`advantages.group_advantages`, TRL's semantics), the reference policy's
   log-probs when beta > 0 (`step.make_reference_logprobs`).
4. **Updates**: `num_iterations` optimizer steps (`step.make_grpo_step`) on the same rollout, the rollout's
   sampling log-probs as the old policy's when there is more than one.

The run directory is the SFT run's (`train/run.py`): `config.json` written once the inputs are checked,
`metrics.jsonl` and `tensorboard/`, `checkpoints/` (params, optimizer state, step, the run's key and the
data iterator; saved only at the end of a rollout's iterations, so a resume starts with a fresh rollout),
`samples.jsonl` (decoded completions with their rewards every `grpo.sample_every` steps) and the export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eemo_jax import paths
from eemo_jax import status
from eemo_jax.config import ConfigError
from eemo_jax.host_memory import use_host_memory_for_cpu_steps
from eemo_jax.parallel.distributed import announce_process, main_process_stream
from eemo_jax.parallel.sharding import make_mesh
from eemo_jax.rl import parsing, rewards
from eemo_jax.rl.advantages import group_advantages, nanstd
from eemo_jax.rl.logprobs import GroupBatch
from eemo_jax.rl.losses import mask_truncated_completions
from eemo_jax.rl.step import (GRPOLossConfig, UpdateBatch, jit_grpo_step, make_grpo_step, make_reference_logprobs,
                              policy_of)
from eemo_jax.train import run_record, saved_run
from eemo_jax.train.checkpointing import RunCheckpoints, quiet_orbax_tracebacks
from eemo_jax.train.metrics import MetricsWriter, ProgressLine
from eemo_jax.train.optimizer import learning_rate_schedule, make_optimizer
from eemo_jax.train.run import (NonFiniteLossError, announce_start, build_model, check_eval_split, check_export_target,
                                check_rows_shard, check_tokenizer_fits, close_all, export, initial_state,
                                optimizer_settings, pipeline_config, report_saved, run_length, run_model_inputs,
                                skipped_metrics, trainable_set)
from eemo_jax.train.state import abstract_train_state

ROLLOUT_STREAM = 0x524F4C4C  # folded into the run's key for rollouts ("ROLL"), apart from dropout's per-step keys
EVAL_STREAM = 0x4556414C  # the held-out evaluation's sampling keys ("EVAL"), the same at every step
SAMPLES_FILE = "samples.jsonl"


class RewardFunctionError(RuntimeError):
  """A reward function raised or returned something other than one number per completion."""


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
  """`config.grpo` as typed values, checked (`grpo_settings`)."""
  num_generations: int
  max_completion_length: int
  temperature: float
  top_k: int
  top_p: float
  num_iterations: int
  scale_rewards: str
  aggregation: str
  mask_truncated_completions: bool
  rewards: tuple  # rewards.RewardSpec, labelled
  sample_every: int
  sample_rows: int


def grpo_settings(config) -> GRPOSettings:
  g = config.grpo
  settings = GRPOSettings(
      num_generations=int(g.num_generations), max_completion_length=int(g.max_completion_length),
      temperature=float(g.temperature), top_k=int(g.top_k), top_p=float(g.top_p),
      num_iterations=int(g.num_iterations), scale_rewards=str(g.scale_rewards), aggregation=str(g.aggregation),
      mask_truncated_completions=bool(g.mask_truncated_completions), rewards=_reward_specs(g.rewards),
      sample_every=int(g.sample_every), sample_rows=int(g.sample_rows))
  if settings.num_generations < 2:
    raise ConfigError(f"grpo.num_generations is {settings.num_generations}: a group needs at least 2 completions "
                      "to compare (advantages are rewards minus the group's mean)")
  if settings.max_completion_length < 1:
    raise ConfigError("grpo.max_completion_length must be >= 1")
  if settings.num_iterations < 1:
    raise ConfigError("grpo.num_iterations must be >= 1")
  if settings.temperature <= 0:
    raise ConfigError(f"grpo.temperature is {settings.temperature}: GRPO samples, so it must be > 0")
  if settings.scale_rewards not in ("group", "batch", "none"):
    raise ConfigError(f"grpo.scale_rewards must be group, batch or none, got {settings.scale_rewards!r}")
  if settings.aggregation not in ("sum_then_normalize", "normalize_then_sum"):
    raise ConfigError(f"grpo.aggregation must be sum_then_normalize or normalize_then_sum, got {settings.aggregation!r}")
  prompts, rest = divmod(int(config.train.global_batch_size), settings.num_generations)
  if rest or prompts < 1:
    raise ConfigError(f"train.global_batch_size ({config.train.global_batch_size}) counts the completions of an "
                      f"optimizer step and must be a multiple of grpo.num_generations ({settings.num_generations}): "
                      f"e.g. {settings.num_generations * max(prompts, 1)}")
  return settings


def _reward_specs(entries) -> tuple:
  if not entries:
    return ()  # only Python reward functions (grpo(..., reward_functions=...)); checked there
  try:
    return rewards.reward_specs(tuple(entries))
  except ValueError as error:
    raise ConfigError(f"grpo.rewards: {error}") from None


def loss_settings(config, settings: GRPOSettings) -> GRPOLossConfig:
  g = config.grpo
  try:
    return GRPOLossConfig(loss_type=str(g.loss_type), epsilon_low=float(g.epsilon_low),
                          epsilon_high=float(g.epsilon_high) or None, delta=float(g.delta) or None,
                          beta=float(g.beta), use_bias_correction_kl=bool(g.use_bias_correction_kl),
                          importance_sampling_level=str(g.importance_sampling_level),
                          max_completion_length=settings.max_completion_length, temperature=settings.temperature,
                          chunk_size=int(config.loss.chunk_size))
  except ValueError as error:
    raise ConfigError(f"grpo: {error}") from None


def check_reference_policy(config, loss: GRPOLossConfig) -> str | None:
  """How the reference policy is built ("lora": adapters off; "initial": the initial weights), or None.

  LoRA's adapters-off model is the base model only while the base weights do not train.
  """
  if not loss.beta:
    return None
  if config.lora.rank:
    if not config.trainable.adapters_only:
      raise ConfigError(f"grpo.beta={loss.beta} with LoRA takes the base model (adapters off) as the reference "
                        "policy, which needs the base weights frozen: set trainable.adapters_only=true, or beta=0")
    return "lora"
  return "initial"


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------

# A Python reward: fn(parsed, truth, completions) -> (N,) floats (NaN where it does not apply), where
# `completions` holds the decoded texts and the (N, T) tokens and mask.
RewardFunction = Callable[..., Sequence[float]]


@dataclasses.dataclass(frozen=True)
class Completions:
  texts: list[str]
  tokens: np.ndarray  # (N, T) int32
  mask: np.ndarray  # (N, T) int32


def reward_matrix(parsed, truth, specs, extra: Sequence[tuple[str, float, RewardFunction]],
                  completions: Completions) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """((N, F) float32, (F,) weights, labels): the config's jitted rewards, then the Python ones."""
  columns, weights, labels = [], [], []
  if specs:
    matrix, _ = rewards.compute_rewards(parsed, truth, specs)
    columns, weights = [np.asarray(matrix, np.float32)], [rewards.reward_weights(specs)]
    labels = [spec.label for spec in specs]
  n = len(completions.texts)
  for label, weight, fn in extra:
    try:
      values = fn(parsed, truth, completions)
    except Exception as error:
      raise RewardFunctionError(f"reward function {label!r} raised {type(error).__name__}: {error}") from error
    values = np.asarray(values, np.float32)
    if values.shape != (n,):
      raise RewardFunctionError(f"reward function {label!r} returned shape {values.shape}; it must return one number "
                                f"per completion, shape ({n},) (NaN where it does not apply)")
    columns.append(values[:, None])
    weights.append(np.asarray([weight], np.float32))
    labels.append(label)
  return np.concatenate(columns, axis=1), np.concatenate(weights), labels


def reward_metrics(matrix: np.ndarray, labels: Sequence[str], parse_ok: np.ndarray, task: np.ndarray) -> dict:
  """Per reward its mean and std over the rows it scores (`rewards/{label}/mean|std`, TRL's names), and per
  task the share of answers that did not parse (`parse_failure/{task}`: a rising rate is the first sign of
  a collapsing format); over the rows given (the loop passes the real ones)."""
  out = {}
  for f, label in enumerate(labels):
    column = matrix[:, f]
    scored = column[~np.isnan(column)]
    out[f"rewards/{label}/mean"] = float(scored.mean()) if scored.size else math.nan
    out[f"rewards/{label}/std"] = float(scored.std(ddof=1)) if scored.size > 1 else math.nan
  for task_id, name in enumerate(rewards.TASKS):
    rows = task == task_id
    if rows.any():
      out[f"parse_failure/{name}"] = float(np.mean(~parse_ok[rows]))
  out["parse_failure/all"] = float(np.mean(~parse_ok)) if parse_ok.size else math.nan
  return out


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GRPOSummary:
  run_dir: str
  steps: int
  resumed_from: int | None
  final_metrics: dict[str, float]
  reward_history: list[float]  # the mean total reward of each rollout of this invocation
  eval_history: list[tuple[int, dict]]  # (step, held-out metrics) of this invocation's evaluations
  export_dir: str | None
  seconds: float


def grpo(config, *, tokenizer=None, train_source=None, eval_source=None, progress_stream=None,
         reward_functions: Sequence[tuple[str, float, RewardFunction]] = (),
         on_step: Callable[[int, dict], None] | None = None) -> GRPOSummary:
  """Runs (or resumes) the GRPO run the config describes. `*_source` replace the built data sets (tests);
  `reward_functions` adds Python rewards `(label, weight, fn)` to the config's.

  With `eval.batches`, the held-out split's rewards (G samples per prompt, the same keys each time) are
  measured before the first step, every `eval.every` steps and at the end (`split: "eval"` rows)."""
  from data_pipeline.pipeline import make_iterator, skip_counts, to_prompt_batch

  started = time.time()
  use_host_memory_for_cpu_steps()
  announce_process()  # every process: its index and devices, once
  t = config.train
  run_dir = paths.absolute(t.run_dir)
  paths.check_all(config, "train.run_dir", "train.export_dir", "data.data_dir", "data.tokenizer_dir", "model.hf_dir")
  is_main = jax.process_index() == 0
  settings = grpo_settings(config)
  loss_cfg = loss_settings(config, settings)
  reference = check_reference_policy(config, loss_cfg)
  if not settings.rewards and not reward_functions:
    raise ConfigError("no rewards: name at least one in grpo.rewards (" + ", ".join(rewards.REWARDS) + ")")
  if config.head.kind != "none":
    raise ConfigError(f"head.kind is {config.head.kind!r}: GRPO trains the language model's answers; set "
                      "head.kind=none")

  source, tokenizer_dir, tokenizer, arch = run_model_inputs(config, tokenizer)
  mesh = make_mesh(dict(config.mesh.items()))
  rules = tuple(tuple(r) for r in config.rules)
  trainable = trainable_set(config, has_head=False)
  accum = int(config.optimizer.accum_steps)
  g = settings.num_generations
  prompts_per_step = int(t.global_batch_size) // g
  pcfg = dataclasses.replace(prompt_pipeline_config(config, arch, settings), tokenizer_dir=tokenizer_dir)
  check_rows_shard(pcfg.batch_size * g * jax.process_count(), mesh)
  check_tokenizer_fits(config, arch, tokenizer, tokenizer_dir)
  export_dir = paths.absolute(t.export_dir)
  check_export_target(export_dir, run_dir, overwrite=t.export_overwrite)

  total_steps = run_length(config, pcfg, train_source, examples_per_step=prompts_per_step)
  if not t.steps:  # epochs count rollouts; each gives num_iterations optimizer steps
    total_steps *= settings.num_iterations
  check_eval_split(config, pcfg, eval_source)
  opt_cfg = optimizer_settings(config, total_steps)
  optimizer = make_optimizer(dataclasses.replace(opt_cfg, accum_steps=1))  # micro-batches are summed in the step
  schedule = learning_rate_schedule(opt_cfg)

  data = make_iterator(pcfg, tokenizer=tokenizer, model_config=arch, source=train_source)
  quiet_orbax_tracebacks()

  def open_checkpoints() -> RunCheckpoints:
    return RunCheckpoints(run_dir, save_every=max(t.checkpoint_every, 1), keep=t.keep_checkpoints,
                          async_save=t.async_checkpoints, clean_up=True)

  checkpoints = open_checkpoints() if RunCheckpoints.present(run_dir) else None
  resumed_from = checkpoints.latest_step() if checkpoints is not None else None
  config_check = run_record.check_config(config, run_dir, resuming_from=resumed_from)
  writer = progress = samples = None
  reward_history: list[float] = []
  eval_history: list[tuple[int, dict]] = []
  last: dict[str, float] = {}
  try:
    with jax.set_mesh(mesh):
      restore_warnings, init_lines = [], []
      initial = None  # the reference policy's weights (full fine-tuning with beta > 0)
      if resumed_from is not None:
        factory = lambda: build_model(config, arch, None)  # noqa: E731
        graphdef, abstract = abstract_train_state(factory, optimizer, mesh, rules, trainable=trainable, seed=t.seed)
        resumed_from, state, restore_warnings = checkpoints.restore_newest_intact(abstract, data)
        if reference == "initial":
          initial = initial_weights(config, arch, optimizer, mesh, rules, trainable, source)
      else:
        graphdef, state, init_lines = initial_state(config, arch, None, optimizer, mesh, rules, trainable, source)
        if reference == "initial":
          initial = jax.tree.map(jnp.copy, (state.params, state.frozen))  # the step donates the state
      start = int(jax.device_get(state.step))
      pending = next_prompts(data, accum, to_prompt_batch) if start < total_steps else None
      if checkpoints is None:
        checkpoints = open_checkpoints()
      if is_main:
        run_record.write_config(config, run_dir, config_check, step=resumed_from)
        saved_run.record_model(run_dir, arch, tokenizer_dir)

      engine = Engine(config, settings, loss_cfg, reference, graphdef, state, optimizer, trainable, schedule,
                       mesh, rules, tokenizer, arch)
      writer = MetricsWriter(run_dir, enabled=is_main)
      samples = (paths.AppendedFile(paths.join(run_dir, SAMPLES_FILE)) if is_main and settings.sample_every
                 else None)
      progress = ProgressLine(total_steps, stream=main_process_stream(progress_stream), every=t.log_every)
      announce_start(progress, run_dir, start, resumed_from, restore_warnings, config_check)
      for line in init_lines:
        progress.message(line)

      def evaluate(at: int) -> dict[str, float]:
        if not config.eval.batches:
          return {}
        metrics = engine.evaluate(state, _eval_prompts(config, pcfg, tokenizer, arch, eval_source),
                                  reward_functions)
        writer.write(at, metrics, split="eval")
        progress.message(f"eval @ {at}: held-out reward {metrics.get('reward', math.nan):.4g} ("
                         f"{int(config.eval.batches)} batches x {g} samples)")
        eval_history.append((at, metrics))
        return metrics

      if start == 0:
        evaluate(0)  # the policy the run starts from, for the comparison at the end
      update_batch, rollout_metrics = None, {}
      for step in range(start + 1, total_steps + 1):
        iteration = (step - 1) % settings.num_iterations
        if iteration == 0 or update_batch is None:
          prompts = pending if pending is not None else next_prompts(data, accum, to_prompt_batch)
          pending = None
          update_batch, rollout_metrics, sample_rows = engine.rollout(state, prompts, step, initial,
                                                                      reward_functions)
          reward_history.append(rollout_metrics["reward"])
          if samples is not None and (step - 1) % settings.sample_every == 0:
            for row in sample_rows[:settings.sample_rows]:
              samples.write(json.dumps({"step": step, **row}) + "\n")
            samples.flush()
        update_start = time.time()
        state, metrics = engine.update(state, update_batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics["update_s"] = time.time() - update_start
        if not math.isfinite(metrics["loss"]):
          raise NonFiniteLossError(f"loss is {metrics['loss']} at step {step}; the last good checkpoint is step "
                                   f"{checkpoints.latest_step()}. Lower optimizer.learning_rate, then run the same "
                                   "command to resume")
        metrics.update(rollout_metrics if iteration == 0 else {})
        metrics.update(skipped_metrics(skip_counts(data)))
        writer.write(step, metrics)
        shown = {**rollout_metrics, **metrics}  # the latest rollout's rewards on every step's line
        progress.update(step, {k: shown[k] for k in _SHOWN if k in shown})
        last = metrics
        if on_step is not None:
          on_step(step, metrics)
        at_cycle_end = step % settings.num_iterations == 0
        if at_cycle_end:
          checkpoints.save(step, state, data, force=step == total_steps)
        report_saved(checkpoints.poll(), checkpoints, progress)
        if config.eval.every and step % config.eval.every == 0 and step != total_steps:
          evaluate(step)
      if start < total_steps:
        evaluate(total_steps)
      report_saved(checkpoints.wait(), checkpoints, progress)
  finally:
    close_all(progress, writer, samples, checkpoints, data)

  if export_dir:
    export(config, graphdef, state, tokenizer_dir, export_dir, run_dir=run_dir)
  return GRPOSummary(run_dir=run_dir, steps=total_steps, resumed_from=resumed_from, final_metrics=last,
                     reward_history=reward_history, eval_history=eval_history, export_dir=export_dir or None,
                     seconds=time.time() - started)


_SHOWN = ("reward", "reward_std", "kl", "entropy", "completion_length", "clip_ratio/region_mean", "grad_norm",
          "lr", "completions_per_s", "rollout_s", "update_s", "skipped")


def prompt_pipeline_config(config, arch, settings: GRPOSettings):
  """The generation-prompt pipeline of a GRPO config: each process's share of the
  `train.global_batch_size / num_generations` prompts a rollout takes, as one plain batch (the update splits
  the completions into `optimizer.accum_steps` micro-batches itself)."""
  prompts_per_step = int(config.train.global_batch_size) // settings.num_generations
  return dataclasses.replace(pipeline_config(config, arch, examples_per_step=prompts_per_step, stacked=False),
                             prompt_only=True)


def initial_weights(config, arch, optimizer, mesh, rules, trainable, source=None):
  """The weights the run started from, rebuilt the way it built them: the frozen reference policy."""
  _, state, _ = initial_state(config, arch, None, optimizer, mesh, rules, trainable, source)
  return state.params, state.frozen


def _eval_prompts(config, pcfg, tokenizer, arch, source):
  """Up to `eval.batches` one-micro-batch lists of the held-out split's prompts, in order."""
  from data_pipeline.pipeline import make_iterator, to_prompt_batch
  iterator = make_iterator(dataclasses.replace(pcfg, split=config.eval.split, shuffle=False, num_epochs=1),
                           tokenizer=tokenizer, model_config=arch, source=source)
  try:
    for index, batch in enumerate(iterator):
      if index >= config.eval.batches:
        break
      yield [to_prompt_batch(batch)]
  finally:
    iterator.close()


def next_prompts(data, accum: int, to_prompt_batch) -> list:
  """The prompts of one rollout: `accum` micro-batches of prompt batches."""
  return [to_prompt_batch(next(data)) for _ in range(accum)]


@dataclasses.dataclass
class _Scored:
  """Sampled completions with their rewards (host arrays, N = prompts * G rows)."""
  outs: list  # the rollouts' device outputs, one per micro-batch
  tokens: np.ndarray  # (N, T)
  mask: np.ndarray  # (N, T)
  truncated: np.ndarray  # (N,)
  logprobs: np.ndarray  # (N, T)
  texts: list[str]
  parsed: object  # parsing.ParsedCompletions
  truth: object  # rewards.GroundTruth
  matrix: np.ndarray  # (N, F), NaN rows for padding
  weights: np.ndarray  # (F,)
  labels: list[str]
  real: np.ndarray  # (N,) rows that hold a prompt
  ids: list[str]
  seconds: float

  def total(self) -> np.ndarray:
    """(N,) the weighted sum of each completion's rewards, NaN where none applies."""
    total = np.nansum(self.matrix * self.weights, axis=1)
    return np.where(np.all(np.isnan(self.matrix), axis=1), np.nan, total)

  def reward_metrics(self) -> dict[str, float]:
    total = self.total()[self.real]
    out = reward_metrics(self.matrix[self.real], self.labels, np.asarray(self.parsed.parse_ok)[self.real],
                         np.asarray(self.truth.task)[self.real])
    out["reward"] = float(np.nanmean(total)) if np.any(~np.isnan(total)) else math.nan
    return out

  @classmethod
  def concatenate(cls, parts: list[_Scored]) -> _Scored:
    """The rows of several samplings as one (for metrics: outs, logprobs and timing are not merged)."""
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    parsed = jax.tree.map(lambda *xs: np.concatenate(xs), *[p.parsed for p in parts])
    truth = jax.tree.map(lambda *xs: np.concatenate(xs), *[p.truth for p in parts])
    return cls(outs=[], tokens=cat("tokens"), mask=cat("mask"), truncated=cat("truncated"), logprobs=cat("logprobs"),
               texts=sum((p.texts for p in parts), []), parsed=parsed, truth=truth, matrix=cat("matrix"),
               weights=parts[0].weights, labels=parts[0].labels, real=cat("real"), ids=sum((p.ids for p in parts), []),
               seconds=sum(p.seconds for p in parts))


class Engine:
  """The compiled pieces of a run and the host work between them (decode, parse, rewards, advantages)."""

  def __init__(self, config, settings: GRPOSettings, loss: GRPOLossConfig, reference, graphdef, state, optimizer,
               trainable, schedule, mesh, rules, tokenizer, arch):
    from eemo_jax.rl.rollout import make_rollout_fn
    self.settings, self.loss, self.reference = settings, loss, reference
    self.graphdef, self.mesh, self.rules = graphdef, mesh, rules
    self.tokenizer = tokenizer
    self.eos_ids = tuple(tokenizer.special.stop_ids)
    self.pad_id = int(arch.pad_token_id if arch.pad_token_id is not None else tokenizer.special.pad)
    self.specs = settings.rewards
    policy_graphdef, _ = nnx.split(self._policy(state))
    self._rollout = make_rollout_fn(policy_graphdef, mesh, rules, group_size=settings.num_generations,
                                    max_completion_length=settings.max_completion_length,
                                    temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    self._step_fn = make_grpo_step(graphdef, optimizer, loss=loss, trainable=trainable, schedule=schedule, mesh=mesh,
                                   rules=rules)
    self._jitted_step = None
    self._rollout_compiled = False
    self._ref = None
    if reference is not None:
      self._ref = jax.jit(make_reference_logprobs(graphdef, loss=loss, lora=reference == "lora", mesh=mesh,
                                                  rules=rules))

  def _policy(self, state) -> nnx.Module:
    """The Qwen2.5-VL of the train state (merging concrete arrays copies nothing)."""
    return policy_of(nnx.merge(self.graphdef, state.params, state.frozen))

  def update(self, state, batch: UpdateBatch):
    if self._jitted_step is None:  # compiled explicitly at the first update, with its batch: timed apart from the run
      self._jitted_step = jit_grpo_step(self._step_fn, state, batch, self.mesh, self.rules)
      status.compile_timed("GRPO update", lambda: self._jitted_step.lower(state, batch).compile())
    return self._jitted_step(state, batch)

  def sample(self, state, prompts: list, key, extra_rewards) -> _Scored:
    """G completions for every prompt of the micro-batches, decoded, parsed and scored."""
    g = self.settings.num_generations
    _, policy_state = nnx.split(self._policy(state))
    if not self._rollout_compiled:  # explicitly, at the first sampling, with its prompts: timed apart from decoding
      status.compile_timed("GRPO rollout", lambda: self._rollout.compile(
          policy_state, prompts[0].inputs, key, eos_ids=self.eos_ids, pad_id=self.pad_id))
      self._rollout_compiled = True
    started = time.time()
    outs = [self._rollout(policy_state, p.inputs, jax.random.fold_in(key, m), eos_ids=self.eos_ids,
                          pad_id=self.pad_id) for m, p in enumerate(prompts)]
    host = jax.device_get([(o.tokens, o.mask, o.truncated, o.logprobs) for o in outs])
    seconds = time.time() - started
    tokens = np.concatenate([h[0] for h in host])  # (N, T), micro-batches in order
    mask = np.concatenate([h[1] for h in host]).astype(np.int32)
    texts = [self._decode(row, m) for row, m in zip(tokens, mask)]
    questions = [q if q is not None else parsing.Question("open_ended") for p in prompts for q in p.questions
                 for _ in range(g)]
    truth = jax.tree.map(lambda *xs: np.concatenate(xs), *[p.truth.repeat(g) for p in prompts])
    parsed = parsing.parse_completions(texts, questions)
    matrix, weights, labels = reward_matrix(parsed, truth, self.specs, extra_rewards,
                                            Completions(texts=texts, tokens=tokens, mask=mask))
    real = np.repeat(np.concatenate([p.real_rows for p in prompts]), g)  # (N,) rows that hold a prompt
    matrix[~real] = np.nan  # a padding row is unscorable: advantage 0, no part in any statistic
    return _Scored(outs=outs, tokens=tokens, mask=mask, truncated=np.concatenate([h[2] for h in host]).astype(bool),
                   logprobs=np.concatenate([h[3] for h in host]).astype(np.float32), texts=texts, parsed=parsed,
                   truth=truth, matrix=matrix, weights=weights, labels=labels, real=real,
                   ids=[i for p in prompts for i in p.ids for _ in range(g)], seconds=seconds)

  def rollout(self, state, prompts: list, step: int, initial, extra_rewards):
    """Samples, scores and packs one step's rollout: (UpdateBatch, metrics, sample rows for the log)."""
    s = self.settings
    g = s.num_generations
    key = jax.random.fold_in(jax.random.fold_in(state.rng, ROLLOUT_STREAM), step)
    r = self.sample(state, prompts, key, extra_rewards)
    adv = np.asarray(group_advantages(r.matrix, group_size=g, weights=r.weights, scale_rewards=s.scale_rewards,
                                      aggregation=s.aggregation))
    loss_mask = r.mask.astype(np.float32) * r.real[:, None]  # nor in the loss or its token count
    if s.mask_truncated_completions:
      loss_mask = np.asarray(mask_truncated_completions(loss_mask, r.truncated))

    groups = [GroupBatch(prompt_ids=p.inputs.input_ids, prompt_mask=p.inputs.attention_mask,
                         prompt_positions=p.inputs.position_ids, next_positions=o.next_positions,
                         completion_ids=o.tokens, completion_mask=o.mask, vision=p.inputs.vision)
              for p, o in zip(prompts, r.outs)]
    ref_logp = None
    if self._ref is not None:
      params, frozen = (state.params, state.frozen) if self.reference == "lora" else initial
      ref_logp = np.concatenate([np.asarray(self._ref(params, frozen, grp)) for grp in groups])
    old_logp = r.logprobs if s.num_iterations > 1 else None

    def per_micro(x):
      return None if x is None else np.stack(np.split(np.asarray(x), len(prompts)))

    group = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *groups)
    batch = UpdateBatch(group=group, advantages=per_micro(adv), loss_mask=per_micro(loss_mask),
                        old_logp=per_micro(old_logp), ref_logp=per_micro(ref_logp))

    total = r.total()
    real = r.real
    lengths = r.mask.sum(1)[real]
    grouped = total.reshape(-1, g)[real.reshape(-1, g)[:, 0]]
    metrics = r.reward_metrics()
    metrics.update(
        reward_std=float(nanstd(jnp.asarray(total))),
        frac_reward_zero_std=float(np.mean(np.nanstd(grouped, axis=1) == 0)),
        advantage_std=float(np.std(adv[real])),
        completion_length=float(lengths.mean()), completion_length_max=float(lengths.max()),
        truncation_rate=float(r.truncated[real].mean()), rollout_s=r.seconds,
        completions_per_s=r.tokens.shape[0] / max(r.seconds, 1e-9))
    sample_rows = [{"id": i, "completion": text, "rewards": {lab: _json_float(v) for lab, v in zip(r.labels, row)},
                    "advantage": float(a), "truncated": bool(tr)}
                   for i, text, row, a, tr, ok in zip(r.ids, r.texts, r.matrix, adv, r.truncated, real) if ok]
    return batch, metrics, sample_rows

  def evaluate(self, state, batches, extra_rewards) -> dict[str, float]:
    """Rewards of G sampled completions for each held-out prompt: `batches` yields micro-batch lists.

    The keys depend only on the batch's index, so evaluations at different steps see the same sampling
    noise and their difference is the policy's."""
    key = jax.random.fold_in(jax.random.key(0), EVAL_STREAM)
    scored = [self.sample(state, prompts, jax.random.fold_in(key, i), extra_rewards)
              for i, prompts in enumerate(batches)]
    if not scored:
      return {}
    merged = _Scored.concatenate(scored)
    return merged.reward_metrics()

  def _decode(self, row: np.ndarray, mask: np.ndarray) -> str:
    """The completion's text, as TRL decodes it: the kept tokens, special tokens skipped."""
    return self.tokenizer.decode([int(x) for x in row[mask.astype(bool)]], skip_special_tokens=True)


def _json_float(value) -> float | None:
  value = float(value)
  return None if math.isnan(value) else value
