"""The learning-rate schedules against transformers' own schedulers, step by step, and the recipes' schedules
against the schedulers the authors' scripts build.

The reference lr of update k is what a torch optimizer driven by the transformers scheduler holds when its
k-th `step()` runs, so an off-by-one between the optax count and HF's scheduler steps shows up too.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from eemo_jax.config import ConfigError, load_config
from eemo_jax.train import run
from eemo_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
PEAK = 3e-4
# The schedule is float32 (as optax's are) and HF's is float64: 8 float32 ulps of the peak.
TOLERANCE = dict(rtol=1e-6, atol=1e-6 * PEAK)

HF_SCHEDULES = {
    "constant": lambda opt, warmup, total: transformers.get_constant_schedule_with_warmup(opt, warmup),
    "linear": transformers.get_linear_schedule_with_warmup,
    "cosine": transformers.get_cosine_schedule_with_warmup,
}

# (total, warmup): no warmup, an odd total, a one-step run, a run that is all warmup, a long odd decay
CASES = [(10, 0), (10, 3), (7, 2), (1, 0), (5, 5), (101, 4)]


def hf_learning_rates(make_scheduler, peak: float, total: int) -> np.ndarray:
  """(total + 1,) the lr each of `total` torch updates runs with, then the lr after the last one."""
  param = torch.nn.Parameter(torch.zeros(1))
  optimizer = torch.optim.SGD([param], lr=peak)
  scheduler = make_scheduler(optimizer)
  rates = []
  for _ in range(total):
    rates.append(optimizer.param_groups[0]["lr"])
    optimizer.step()  # no gradient: nothing moves, but the scheduler sees a real step
    scheduler.step()
  rates.append(optimizer.param_groups[0]["lr"])
  return np.asarray(rates)


def our_learning_rates(cfg: OptimizerConfig) -> np.ndarray:
  return np.asarray(learning_rate_schedule(cfg)(jnp.arange(cfg.total_steps + 1)))


# --------------------------------------------------------------------------------------------------
# Each schedule is transformers'
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total,warmup", CASES)
@pytest.mark.parametrize("schedule", sorted(HF_SCHEDULES))
def test_schedule_is_transformers_schedule_with_warmup(schedule, total, warmup):
  hf = hf_learning_rates(lambda opt: HF_SCHEDULES[schedule](opt, warmup, total), PEAK, total)
  ours = our_learning_rates(OptimizerConfig(learning_rate=PEAK, schedule=schedule, warmup_steps=warmup,
                                            total_steps=total))
  np.testing.assert_allclose(ours, hf, **TOLERANCE)


def test_the_default_schedule_is_still_cosine():
  """A recipe that does not name a schedule trains as it did before the choice existed."""
  cfg = OptimizerConfig(learning_rate=PEAK, warmup_steps=3, total_steps=20)
  hf = hf_learning_rates(lambda opt: transformers.get_cosine_schedule_with_warmup(opt, 3, 20), PEAK, 20)
  np.testing.assert_allclose(our_learning_rates(cfg), hf, **TOLERANCE)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_decay_ends_at_end_learning_rate_and_stays_there(schedule):
  """HF decays to 0 only; with an end value the shapes are optax's warmup + linear / cosine decay."""
  peak, end, warmup, total = 1.0, 0.1, 3, 11
  decay = (optax.linear_schedule(peak, end, total - warmup) if schedule == "linear"
           else optax.cosine_decay_schedule(peak, total - warmup, alpha=end / peak))
  reference = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
  cfg = OptimizerConfig(learning_rate=peak, schedule=schedule, warmup_steps=warmup, total_steps=total,
                        end_learning_rate=end)
  steps = jnp.arange(total + 5)  # past the end too (a resume with fewer steps than were run)
  np.testing.assert_allclose(np.asarray(learning_rate_schedule(cfg)(steps)),
                             np.asarray(jax.vmap(reference)(steps)), rtol=1e-6, atol=1e-6 * peak)
  assert float(learning_rate_schedule(cfg)(total + 4)) == pytest.approx(end)


def test_the_optimizer_updates_with_the_schedule_step_by_step():
  """With zero gradients AdamW only decays, by (1 - lr_k x wd) at update k: the kernel's path against torch's
  AdamW driven by HF's linear schedule shows the lr of every update. The bias is not decayed here."""
  peak, wd, warmup, total = 0.1, 0.5, 2, 7
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  kernel0, bias0 = np.asarray(params["kernel"].get_value()), np.asarray(params["bias"].get_value())
  optimizer = make_optimizer(OptimizerConfig(learning_rate=peak, schedule="linear", warmup_steps=warmup,
                                             total_steps=total, weight_decay=wd))
  opt_state = optimizer.init(params)

  reference = torch.nn.Parameter(torch.from_numpy(kernel0.copy()))
  torch_adamw = torch.optim.AdamW([reference], lr=peak, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)
  scheduler = transformers.get_linear_schedule_with_warmup(torch_adamw, warmup, total)
  for step in range(total):
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    reference.grad = torch.zeros_like(reference)
    torch_adamw.step()
    scheduler.step()
    np.testing.assert_allclose(np.asarray(params["kernel"].get_value()), reference.detach().numpy(), rtol=1e-6,
                               err_msg=f"update {step}")
  assert not np.allclose(np.asarray(params["kernel"].get_value()), kernel0)  # the check saw a decay
  np.testing.assert_array_equal(np.asarray(params["bias"].get_value()), bias0)


# --------------------------------------------------------------------------------------------------
# Errors the user fixes
# --------------------------------------------------------------------------------------------------


def test_an_unknown_schedule_is_a_one_line_config_error_naming_the_valid_ones():
  with pytest.raises(ConfigError) as info:
    OptimizerConfig(schedule="exponential")
  message = str(info.value)
  assert "\n" not in message and "'exponential'" in message and "constant, linear, cosine" in message

  config = load_config(os.path.join(CONFIGS, "tiny_demo.py"), ["--config.optimizer.schedule=step"])
  with pytest.raises(ConfigError, match=r"optimizer\.schedule 'step' is not one of constant, linear, cosine"):
    run.optimizer_settings(config, 100)


def test_an_end_learning_rate_with_the_constant_schedule_is_a_config_error():
  with pytest.raises(ConfigError, match="never reached by the constant schedule"):
    OptimizerConfig(schedule="constant", end_learning_rate=1e-6)


# --------------------------------------------------------------------------------------------------
# The recipes run the authors' schedules
# --------------------------------------------------------------------------------------------------


def _trainer_scheduler(lr_scheduler_type: str, warmup_ratio: float):
  """What the HF Trainer builds from a script's `--lr_scheduler_type` and `--warmup_ratio`: `get_scheduler`
  with the warmup `TrainingArguments.get_warmup_steps` counts (5.23 takes the ratio as `warmup_steps` < 1)."""
  args = transformers.TrainingArguments(output_dir="unused", warmup_steps=warmup_ratio, report_to="none")
  return lambda total: lambda opt: transformers.get_scheduler(
      lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total)


def _grpo_trainer_defaults():
  """finetune_grpo.sh passes no schedule, warmup or lr: the TrainingArguments defaults, trl 0.15.1's lr."""
  args = transformers.TrainingArguments(output_dir="unused", report_to="none")
  return lambda total: lambda opt: transformers.get_scheduler(
      args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total)


# recipe -> (the script's lr, how its code builds the scheduler), typed from the authors' files
AUTHORS = {
    # EmoVerse training/scripts/sft_7b_lora.sh L12, L45, L47 (HF Trainer)
    "emoverse_3b_sft.py": (5e-6, _trainer_scheduler("constant", 0.03)),
    # EmoVerse classify.sh L30, L33; train_qwen_classify.py L271-276 builds its own `get_scheduler("constant")`
    "emoverse_3b_head.py": (1e-5, lambda total: lambda opt: transformers.get_scheduler(
        name="constant", optimizer=opt, num_warmup_steps=int(total * 0.05), num_training_steps=total)),
    # EEmo-Logic train/Stage_1/scripts/finetune_lora_vision.sh L51, L53, L54 (HF Trainer)
    "eemo_7b_sft_lora.py": (2e-4, _trainer_scheduler("cosine", 0.03)),
    # EEmo-Logic train/Stage_2/finetune_grpo.sh: nothing passed (trl 0.15.1 GRPOConfig lr 1e-6)
    "eemo_7b_grpo.py": (1e-6, _grpo_trainer_defaults()),
}


@pytest.mark.parametrize("total", [37, 100])
@pytest.mark.parametrize("recipe", sorted(AUTHORS))
def test_each_recipe_runs_its_script_s_learning_rates(recipe, total):
  lr, scheduler_for = AUTHORS[recipe]
  hf = hf_learning_rates(scheduler_for(total), lr, total)
  ours = our_learning_rates(run.optimizer_settings(load_config(os.path.join(CONFIGS, recipe)), total))
  np.testing.assert_allclose(ours, hf, rtol=1e-6, atol=1e-6 * lr)
