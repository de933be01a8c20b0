"""`eemo-jax aot --config configs/X.py --topology v5e:4x4`: will the real train step fit on that slice?

Compiles the config's SFT step (model, head, LoRA, freezing, optimizer, batch shapes and shardings
exactly as `eemo-jax train` builds them) for a TPU topology on this machine, with libtpu and no TPU,
and prints per-device memory against the chip's HBM and the compiler's cost estimate. Nothing is
allocated: the train state and the batch are abstract. For a GRPO config (`data.prompt_only`) it
compiles the two programs of `eemo-jax grpo` instead: the rollout of one micro-batch of prompts (vision,
prefill, the repeated cache and the decode loop) and the update step (every micro-batch's policy forward
and backward, and the optimizer), and reports both. The architecture is the one the run will build
(`model_choice`: `model.init_from`'s when it exists here, else `model.hf_dir`'s or the preset), named in
the report. Needs the `tpu` extra, which pins the libtpu matching jax, and the `data` extra, whose input
pipeline gives the batch shapes (`pip install 'eemo-jax[data,tpu]'`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

# HBM per chip, bytes (vendor figures).
HBM_BYTES = {"TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30, "TPU v5e": 16 * 2**30, "TPU v5": 95 * 2**30,
             "TPU v5p": 95 * 2**30, "TPU v6 lite": 32 * 2**30, "TPU v6e": 32 * 2**30}


def add_arguments(parser, name):
  del name
  from eemo_jax.config import add_config_argument
  add_config_argument(parser)
  parser.add_argument("--topology", default=None,
                      help="TPU topology, e.g. v5e:4x4, v5p:2x2x2, v4:2x2x1 (default: the config's aot.topology)")


class DoesNotFit(RuntimeError):
  """The compiler ran out of device memory while compiling: the step does not fit this slice."""


@dataclasses.dataclass
class AotReport:
  topology: str
  device_kind: str
  num_devices: int
  mesh: dict[str, int]
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int | None
  compiler_flops: float | None
  analytic_flops: float | None
  compile_seconds: float

  program: str = "train step"
  model: str = ""  # where the architecture came from (`model_choice`)

  @property
  def total_bytes(self) -> int:
    """Live bytes per device at the step's peak: inputs + outputs not aliased to inputs + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def fits(self) -> bool | None:
    return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes


def _prepare_libtpu_environment() -> None:
  """libtpu on a machine without TPUs: skip the metadata server and the single-process lock file."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: str):
  _prepare_libtpu_environment()
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as error:  # missing libtpu, or a topology name libtpu does not know
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise RuntimeError(f"cannot describe TPU topology {topology!r}: {message}. Install the tpu extra "
                       "(pip install -e '.[tpu]', which pins libtpu for this jax) and use a name such as "
                       "v5e:4x4, v5p:2x2x2 or v4:2x2x1") from None


@dataclasses.dataclass
class SftStepParts:
  """What the config's SFT step is made of, as `eemo-jax train` makes it, without weights or data."""

  arch: object  # Qwen25VLConfig
  head_cfg: object  # HeadConfig | None
  trainable: object
  optimizer: object
  pcfg: object  # data_pipeline PipelineConfig: the batch's static shapes
  mesh: object
  rules: tuple
  tokenizer: object
  model_source: str = ""  # `ModelChoice.source`

  def model(self, config):
    """A randomly initialised model (traceable: pass it as a factory)."""
    from eemo_jax.train import run as runlib
    return runlib.build_model(config, self.arch, self.head_cfg)

  def train_step(self, config, graphdef):
    from eemo_jax.train import run as runlib
    from eemo_jax.train.step import make_train_step
    return make_train_step(graphdef, self.optimizer, trainable=self.trainable, loss_config=runlib.loss_settings(config),
                           forward=runlib.sft_forward, mesh=self.mesh, rules=self.rules)


def sft_step_parts(config, devices, batch_size: int | None = None) -> SftStepParts:
  """The config's model architecture, head, freezing, optimizer, batch shapes and mesh over `devices`.

  The architecture is `model_choice`'s; `batch_size` replaces the rows of a microbatch. Used by
  `eemo-jax aot` and the accelerator benchmark.
  """
  from eemo_jax.parallel.sharding import make_mesh
  from eemo_jax.train import run as runlib
  from eemo_jax.train.optimizer import make_optimizer

  mesh = make_mesh(dict(config.mesh.items()), devices=devices)
  choice = model_choice(config)
  arch, tokenizer = choice.arch, choice.tokenizer
  head_cfg = runlib.head_config(config, arch, tokenizer) if config.head.kind != "token" or tokenizer else None
  pcfg = runlib.pipeline_config(config, arch)
  if batch_size:
    pcfg = dataclasses.replace(pcfg, batch_size=int(batch_size))
  runlib.check_rows_shard(pcfg.batch_size, mesh)  # one process here holds the whole global batch
  return SftStepParts(arch=arch, head_cfg=head_cfg, trainable=runlib.trainable_set(config, head_cfg is not None),
                      optimizer=make_optimizer(runlib.optimizer_settings(config, total_steps=1000)), pcfg=pcfg,
                      mesh=mesh, rules=tuple(tuple(r) for r in config.rules), tokenizer=tokenizer,
                      model_source=choice.source)


def _compile(lowered, topology: str, devices, mesh, program: str = "train step"):
  """(compiled, seconds), or DoesNotFit when XLA refuses a program that cannot fit the device memory."""
  started = time.time()
  try:
    compiled = lowered.compile()
  except Exception as error:  # XLA refuses programs that cannot fit: report that as the answer
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    raise DoesNotFit(f"{program}: topology {topology}: {len(devices)} x {devices[0].device_kind}, mesh "
                     f"{dict(mesh.shape)}: the compiler reports {str(error).splitlines()[0]}") from None
  return compiled, time.time() - started


def _report(compiled, seconds, topology, devices, mesh, analytic_flops, program, model: str = "") -> AotReport:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  kind = devices[0].device_kind
  return AotReport(
      topology=topology, device_kind=kind, num_devices=len(devices), mesh=dict(mesh.shape),
      argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      hbm_bytes=next((v for k, v in HBM_BYTES.items() if kind == k), None),
      compiler_flops=float(cost.get("flops", 0.0)) if cost else None, analytic_flops=analytic_flops,
      compile_seconds=seconds, program=program, model=model)


def compile_grpo_for_topology(config, topology: str) -> list[AotReport]:
  """The rollout and the update step of `eemo-jax grpo` for one micro-batch of prompts, compiled for `topology`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from data_pipeline.pipeline import abstract_batch
  from eemo_jax.model.qwen25vl import ModelInputs
  from eemo_jax.parallel.sharding import make_mesh, state_shardings
  from eemo_jax.rl import run as grpolib
  from eemo_jax.rl.logprobs import GroupBatch
  from eemo_jax.rl.rollout import input_shardings, make_rollout_fn
  from eemo_jax.rl.step import UpdateBatch, jit_grpo_step, make_grpo_step, policy_of, update_shardings
  from eemo_jax.train import run as runlib
  from eemo_jax.train.optimizer import make_optimizer
  from eemo_jax.train.state import abstract_train_state

  devices = topology_devices(topology)
  settings = grpolib.grpo_settings(config)
  loss = grpolib.loss_settings(config, settings)
  grpolib.check_reference_policy(config, loss)
  mesh = make_mesh(dict(config.mesh.items()), devices=devices)
  rules = tuple(tuple(r) for r in config.rules)
  choice = model_choice(config)
  arch, tokenizer = choice.arch, choice.tokenizer
  g = settings.num_generations
  pcfg = grpolib.prompt_pipeline_config(config, arch, settings)
  if config.aot.batch_size:
    pcfg = dataclasses.replace(pcfg, batch_size=int(config.aot.batch_size))
  prompts, accum, steps = pcfg.batch_size, int(config.optimizer.accum_steps), settings.max_completion_length
  runlib.check_rows_shard(prompts * g, mesh)
  trainable = runlib.trainable_set(config, has_head=False)
  optimizer = make_optimizer(dataclasses.replace(runlib.optimizer_settings(config, 1000), accum_steps=1))
  reports = []
  with jax.set_mesh(mesh):
    graphdef, state = abstract_train_state(lambda: runlib.build_model(config, arch, None), optimizer, mesh, rules,
                                           trainable=trainable, seed=config.train.seed)
    # The rollout: the policy's state as `eemo-jax grpo` passes it, and one micro-batch of prompts.
    policy_graphdef, policy_abstract = nnx.split(nnx.eval_shape(lambda: policy_of(runlib.build_model(config, arch,
                                                                                                        None))))
    policy_state = jax.tree.map(  # a prefix tree: one sharding per Variable
        lambda sh, sub: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), sub),
        state_shardings(policy_abstract, mesh, rules), policy_abstract)
    batch = abstract_batch(pcfg, tokenizer)
    inputs = ModelInputs(**batch)
    inputs = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), inputs,
                          input_shardings(inputs, mesh, rules))
    rollout = make_rollout_fn(policy_graphdef, mesh, rules, group_size=g, max_completion_length=steps,
                              temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    args = (policy_state, inputs, jax.eval_shape(lambda: jax.random.key(0)), np.float32(settings.temperature),
            np.float32(settings.top_p), np.full((4,), -1, np.int32), np.int32(0))
    program = f"rollout ({prompts} prompts x {g} completions of {steps} tokens)"
    compiled, seconds = _compile(rollout.jitted.lower(*args), topology, devices, mesh, program)
    reports.append(_report(compiled, seconds, topology, devices, mesh, None, program, choice.source))

    # The update: accum micro-batches of `prompts` groups, as the loop stacks them.
    rows = prompts * g
    per_row = jax.ShapeDtypeStruct((accum, rows, steps), jnp.float32)
    group = GroupBatch(prompt_ids=_stack(inputs.input_ids, accum), prompt_mask=_stack(inputs.attention_mask, accum),
                       prompt_positions=_stack(inputs.position_ids, accum),
                       next_positions=jax.ShapeDtypeStruct((accum, 3, prompts), jnp.int32),
                       completion_ids=jax.ShapeDtypeStruct((accum, rows, steps), jnp.int32),
                       completion_mask=jax.ShapeDtypeStruct((accum, rows, steps), jnp.int32),
                       vision=jax.tree.map(lambda a: _stack(a, accum), inputs.vision))
    update = UpdateBatch(group=group, advantages=jax.ShapeDtypeStruct((accum, rows), jnp.float32), loss_mask=per_row,
                         old_logp=per_row if settings.num_iterations > 1 else None,
                         ref_logp=per_row if loss.beta else None)
    update = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), update,
                          update_shardings(update, mesh, rules))
    step = make_grpo_step(graphdef, optimizer, loss=loss, trainable=trainable, mesh=mesh, rules=rules)
    program = f"update step ({accum} x {rows} completions of {steps} tokens after {pcfg.seq_len}-token prompts)"
    compiled, seconds = _compile(jit_grpo_step(step, state, update, mesh, rules).lower(state, update), topology,
                                 devices, mesh, program)
    reports.append(_report(compiled, seconds, topology, devices, mesh, None, program, choice.source))
  return reports


def _stack(a, n: int):
  """The abstract array `a` with a leading micro-batch axis of n (shardings are set afterwards)."""
  import jax
  return jax.ShapeDtypeStruct((n,) + tuple(a.shape), a.dtype)


def compile_for_topology(config, topology: str) -> AotReport:
  import jax

  from data_pipeline.pipeline import abstract_batch, to_train_batch
  from eemo_jax.train import run as runlib
  from eemo_jax.train.state import abstract_train_state
  from eemo_jax.train.step import jit_train_step

  devices = topology_devices(topology)
  parts = sft_step_parts(config, devices, batch_size=config.aot.batch_size or None)
  mesh, rules = parts.mesh, parts.rules
  with jax.set_mesh(mesh):
    graphdef, state = abstract_train_state(lambda: parts.model(config), parts.optimizer, mesh, rules,
                                           trainable=parts.trainable, seed=config.train.seed)
    batch = to_train_batch(abstract_batch(parts.pcfg, parts.tokenizer))
    step = parts.train_step(config, graphdef)
    compiled, seconds = _compile(jit_train_step(step, state, batch, mesh, rules).lower(state, batch), topology,
                                 devices, mesh)
  return _report(compiled, seconds, topology, devices, mesh,
                 runlib.step_flops(parts.arch, parts.head_cfg, batch, config), "train step", parts.model_source)


@dataclasses.dataclass(frozen=True)
class ModelChoice:
  """The architecture an AOT check compiles for, the tokenizer (or None), and where they came from."""
  arch: object  # Qwen25VLConfig
  tokenizer: object  # TextTokenizer | None
  source: str


def model_choice(config) -> ModelChoice:
  """The architecture `eemo-jax train` / `grpo` would build for `config`, as far as this machine can see it.

  `model.init_from`'s (an HF folder, a checkpoint or a run directory, as the run reads it) when it names
  one that exists; an AOT check often plans a stage before the run it starts from exists (the shipped
  second stages name their first stage's run directory), so a missing one falls back to the preset, and
  the report says so. Without `init_from`: `model.hf_dir`'s, else the preset, with the tokenizer's ids
  when there is a tokenizer (`data.tokenizer_dir`, else the source's).
  """
  from eemo_jax.config import ConfigError
  from eemo_jax.model.config import preset
  from eemo_jax.train import init_from
  from eemo_jax.train import run as runlib

  fallback = ""
  if str(config.model.init_from):
    try:
      source = init_from.resolve(config)
    except ConfigError as error:
      if config.model.hf_dir:
        raise  # both fields set: a config to fix, not a first stage still to run
      fallback = f" ({error}; compiled for the preset instead)"
    else:
      return ModelChoice(source.arch, _tokenizer(config.data.tokenizer_dir or source.tokenizer_dir,
                                                 strict=bool(config.data.tokenizer_dir)),
                         f"from model.init_from: {source.describe()}")
  tokenizer = _tokenizer(config.data.tokenizer_dir or config.model.hf_dir, strict=bool(config.data.tokenizer_dir))
  if tokenizer is not None:
    where = f"the HF folder {config.model.hf_dir}" if config.model.hf_dir else f"the preset {config.model.preset}"
    return ModelChoice(runlib.model_config(config, tokenizer), tokenizer, f"{where}, the tokenizer's ids{fallback}")
  if config.model.hf_dir:
    from eemo_jax.hf.load import read_config
    return ModelChoice(read_config(config.model.hf_dir), None, f"the HF folder {config.model.hf_dir}")
  return ModelChoice(preset(config.model.preset), None, f"the preset {config.model.preset}{fallback}")


def _tokenizer(folder: str, *, strict: bool = False):
  """The tokenizer in `folder`; None where there is no folder, or no tokenizer.json in a model folder (which
  need not hold one). `strict` (`data.tokenizer_dir`, named for its tokenizer) makes a missing one an error."""
  from eemo_jax import paths
  from eemo_jax.train import run as runlib
  if not folder or (not strict and not paths.isfile(paths.join(folder, "tokenizer.json"))):
    return None
  return runlib.load_run_tokenizer(folder)


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def describe(report: AotReport) -> str:
  lines = [
      f"{report.program}",
      f"topology {report.topology}: {report.num_devices} x {report.device_kind}, mesh {report.mesh}",
      *([f"model {report.model}"] if report.model else []),
      f"compiled in {report.compile_seconds:.1f} s",
      "per device:",
      f"  arguments    {_gib(report.argument_bytes)}  (train state shard + batch shard)",
      f"  outputs      {_gib(report.output_bytes)}  ({_gib(report.alias_bytes)} aliased to donated arguments)",
      f"  temporaries  {_gib(report.temp_bytes)}",
      f"  code         {_gib(report.code_bytes)}",
      f"  total        {_gib(report.total_bytes)}"
      + (f"  of {_gib(report.hbm_bytes)} HBM -> {'fits' if report.fits else 'DOES NOT FIT'}"
         f" ({100 * report.total_bytes / report.hbm_bytes:.0f}%)" if report.hbm_bytes else "  (HBM of this chip unknown)"),
  ]
  if report.analytic_flops:
    lines.append(f"step FLOPs    {report.analytic_flops:.3e} (analytic, all devices; "
                 f"{report.analytic_flops / report.num_devices:.3e} per device)")
  if report.compiler_flops:
    lines.append(f"compiler cost {report.compiler_flops:.3e} FLOPs per device (XLA counts each scanned layer once)")
  return "\n".join(lines)


def run(args) -> int:
  from eemo_jax.config import ConfigError, config_from_args
  config = config_from_args(args, "aot")
  if config is None:
    return 2
  topology = args.topology or config.aot.topology
  try:
    reports = compile_grpo_for_topology(config, topology) if config.data.prompt_only else \
        [compile_for_topology(config, topology)]
  except DoesNotFit as error:
    print(f"{error}\n-> DOES NOT FIT: lower data.seq_len, the batch per microbatch (more optimizer.accum_steps), "
          "use model.remat=full, or a larger slice / tensor parallelism (mesh.tensor)")
    return 1
  except (RuntimeError, ConfigError) as error:
    print(f"eemo-jax aot: {error}", file=sys.stderr)
    return 2
  print("\n\n".join(describe(report) for report in reports))
  return 0 if all(report.fits is not False for report in reports) else 1
