"""One SFT step against transformers + torch, from the same weights and batch (fp32, highest precision);
the step as the recipes run it (bf16 compute over fp32 masters, `dots_no_batch` remat) against the
fp32 step and torch autocast; every remat policy against none; and the analytic step FLOPs (for MFU)
against torch's FlopCounterMode on the same model.

The batch has an image per row, right padding and -100 labels on the prompt and the padding. The
reference is the torch model's own loss (`labels=`), autograd, `clip_grad_norm_` and
`torch.optim.AdamW`: the loss, the gradient of every parameter (names mapped through the one key
table) and the parameters after one update must agree to a few times the fp32 differences measured
(each bound says its measured value).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from hf_fixtures import build_hf_model, make_batch, save_hf_model, tiny_hf_config  # noqa: E402

from eemo_jax.config import load_config  # noqa: E402
from eemo_jax.hf.keys import canonical_key, key_table, num_layers  # noqa: E402
from eemo_jax.hf.load import load_hf  # noqa: E402
from eemo_jax.model.config import Qwen25VLConfig  # noqa: E402
from eemo_jax.model.layers import REMAT_POLICIES  # noqa: E402
from eemo_jax.model.qwen25vl import prepare_inputs  # noqa: E402
from eemo_jax.train.flops import forward_flops, train_step_flops  # noqa: E402
from eemo_jax.train.freeze import Trainable, split_trainable  # noqa: E402
from eemo_jax.train.losses import IGNORE_INDEX, LossConfig, metrics_from_sums  # noqa: E402
from eemo_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer  # noqa: E402
from eemo_jax.train.state import create_train_state  # noqa: E402
from eemo_jax.train.step import (Batch, jit_train_step, make_eval_step, make_loss_fn, make_train_step,  # noqa: E402
                                 stack_microbatches, window_denominators)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = 4  # leading tokens of each row without a loss (text + <vision_start>), as a chat template's prompt
# The first Adam step is lr·g/(|g| + eps), a sign function for |g| >> eps: with eps=1e-8 a gradient
# element at the 1e-7 level, whose fp32 rounding differs by ~1% between any two implementations,
# would already move its weight differently by ~lr/100. eps=1e-4 keeps the map well conditioned
# (update error <= lr·|Δg|/eps), so gradients that agree give updates that agree far below the
# 1e-6 (= lr/1000) checked here, and eps's placement (outside the square root) is still tested.
OPT = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=100, b1=0.9, b2=0.999, eps=1e-4,
                      weight_decay=0.1, max_grad_norm=1.0)


def sft_batch():
  batch = make_batch([[(1, 4, 6)], [(1, 2, 2)]], pad="right", seed=1)
  labels = np.where(batch["attention_mask"] == 1, batch["input_ids"], IGNORE_INDEX)
  labels[:, :PROMPT] = IGNORE_INDEX
  return batch, labels


@pytest.fixture(scope="module")
def references(tmp_path_factory):
  """tie -> (folder, batch, labels, torch loss before/after the update, grads and updated params by HF key)."""
  cache = {}

  def get(tie: bool):
    if tie not in cache:
      cache[tie] = torch_reference(os.fspath(tmp_path_factory.mktemp("hf")), tie)
    return cache[tie]

  return get


def torch_reference(folder: str, tie: bool):
  _, ref = save_hf_model(folder, tiny_hf_config(tie=tie))
  batch, labels = sft_batch()
  args = {k: torch.tensor(v) for k, v in batch.items() if v is not None}
  ref.train()  # no dropout in Qwen2.5-VL; train() only to mirror a training step
  loss = ref(**args, labels=torch.tensor(labels)).loss
  loss.backward()
  named = dict(ref.named_parameters())
  grads = {canonical_key(k): p.grad.detach().numpy().copy() for k, p in named.items()}
  no_decay = [p for k, p in named.items() if k.endswith("bias") or "norm" in k or "ln_q" in k]
  decay = [p for k, p in named.items() if not any(p is q for q in no_decay)]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": OPT.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=OPT.learning_rate, betas=(OPT.b1, OPT.b2), eps=OPT.eps)
  torch.nn.utils.clip_grad_norm_(ref.parameters(), OPT.max_grad_norm)
  optimizer.step()
  updated = {canonical_key(k): p.detach().numpy().copy() for k, p in ref.named_parameters()}
  with torch.no_grad():
    loss_after = ref(**args, labels=torch.tensor(labels)).loss.item()
  return folder, batch, labels, (loss.item(), loss_after), grads, updated


def by_path(tensors: dict, config) -> dict:
  """HF-keyed torch tensors -> our parameter paths and layouts (stacked layers), via the key table."""
  out = {}
  for rule in key_table(config):
    if rule.stacked:
      out[rule.path] = np.stack([rule.transform.to_jax(tensors[rule.hf_key(i)])
                                 for i in range(num_layers(rule, config))])
    else:
      out[rule.path] = rule.transform.to_jax(tensors[rule.hf_key()])
  return out


def flat(state) -> dict:
  return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def stacked_batch(config, batch, labels):
  inputs = prepare_inputs(config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"])
  return stack_microbatches([Batch.from_inputs(inputs, labels)])


# The comparisons are of numbers: compiling without LLVM's optimisations makes a step compile about 2x
# faster on CPU (see test_sharded_step.py); used for the bf16 and remat variants.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def our_step_gradients(folder: str, dtype: str = "float32", param_dtype: str = "float32", remat: str = "none",
                       fast_compile: bool = False):
  """(loss, {path: gradient}, config) of one SFT step's loss on `sft_batch`, from the HF folder's weights,
  every parameter trained: `value_and_grad` of the step's own loss function, as `make_train_step` takes it."""
  model = load_hf(folder, dtype=dtype, param_dtype=param_dtype, remat=remat)
  graphdef, params, frozen = split_trainable(model, Trainable())
  stacked = stacked_batch(model.config, *sft_batch())
  args = (params, frozen, jax.tree.map(lambda x: x[0], stacked), window_denominators(stacked), jax.random.key(0))
  grad_fn = jax.jit(jax.value_and_grad(make_loss_fn(graphdef), has_aux=True))
  (loss, _), grads = grad_fn.lower(*args).compile(FAST_COMPILE if fast_compile else None)(*args)
  return float(loss), flat(grads), model.config


def relative_error(got: dict, want: dict) -> float:
  """||got - want|| / ||want|| over every entry of two {path: array} dicts taken as one vector."""
  diff = sum(float(np.sum((got[k].astype(np.float64) - want[k]) ** 2)) for k in want)
  return (diff / sum(float(np.sum(want[k].astype(np.float64) ** 2)) for k in want)) ** 0.5


# Measured (fp32, "highest", AMD EPYC), untied / tied: |Δloss| 0 / 9.5e-7 (2 ulps of the loss 4.8), and the
# worst parameter's max|Δgrad| / max|grad| 1.2e-6 / 1.1e-6 (a vision MLP kernel). Bounds ~10x those.
LOSS_TOL = 1e-5
GRAD_RTOL = 1e-5


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_loss_and_every_gradient_match_torch(references, tie):
  folder, _, _, (torch_loss, _), torch_grads, _ = references(tie)
  loss, ours, config = our_step_gradients(folder)
  print(f"{tie=}: |Δloss| {abs(loss - torch_loss):.2g}")
  assert abs(loss - torch_loss) <= LOSS_TOL
  expected = by_path(torch_grads, config)
  assert sorted(ours) == sorted(expected), "the key table and the trainable state disagree"
  errors = {}
  for path, want in expected.items():
    got = ours[path]
    assert got.shape == want.shape, path
    errors["/".join(path)] = float(np.abs(got - want).max() / np.abs(want).max())
  worst = max(errors, key=errors.get)
  print(f"{tie=}: worst gradient {worst}: {errors[worst]:.2g}")
  assert errors[worst] <= GRAD_RTOL, (worst, errors[worst])


# bf16 keeps 8 significant bits: one rounding moves a value by up to u = 2^-9 ~ 2e-3 of itself. A
# gradient passes through many roundings (weights cast at use, every activation stored in bf16, the
# backward's matmul outputs), so its error is a few u. Measured on this batch (AMD EPYC; the roundings,
# not the machine, set it): the loss 4.81 moves by 3.4e-4 (torch autocast: 3.7e-5; on other batches
# ours 1.4e-4..3.4e-4 and torch's 3.7e-5..2.5e-4: the mean of 27 token NLLs, each moved by about the
# rms bf16 logit error ~1e-3); the gradient as one vector by 5.6e-3 = 2.8u of its norm (torch autocast
# 4.8e-3: it keeps the residual stream in fp32, which ours rounds to bf16 between layers); the worst
# single parameter (a k_proj bias) by 1.24e-2 = 6.4u (torch: 1.18e-2, the same bias).
BF16_U = 2.0**-9
BF16_LOSS_TOL = 1.5e-3  # 4.4x the measured 3.4e-4
BF16_GRAD_RTOL = 10 * BF16_U  # 3.5x the measured 2.8u
BF16_TENSOR_RTOL = 24 * BF16_U  # 3.8x the measured 6.4u
BF16_VS_TORCH = 1.5  # ours / torch autocast's gradient error, measured 1.16


def torch_autocast_gradients(folder: str, config) -> tuple[float, dict]:
  """torch's loss and gradients (by our paths) under `torch.autocast("cpu", bfloat16)`, fp32 weights."""
  ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
  batch, labels = sft_batch()
  args = {k: torch.tensor(v) for k, v in batch.items() if v is not None}
  with torch.autocast("cpu", dtype=torch.bfloat16):
    loss = ref(**args, labels=torch.tensor(labels)).loss
  loss.backward()
  return loss.item(), by_path({canonical_key(k): p.grad.float().numpy() for k, p in ref.named_parameters()}, config)


def test_bf16_step_is_within_bf16_rounding_of_fp32_and_of_torch_autocast(references):
  """The step as configs/base.py sets every recipe: bf16 compute, fp32 master weights, `dots_no_batch`."""
  recipe = load_config(os.path.join(ROOT, "configs", "base.py")).model
  assert (recipe.dtype, recipe.param_dtype, recipe.remat) == ("bfloat16", "float32", "dots_no_batch")
  folder, _, _, (torch_loss, _), torch_grads, _ = references(False)
  loss32, grads32, config = our_step_gradients(folder)
  loss, grads, _ = our_step_gradients(folder, recipe.dtype, recipe.param_dtype, recipe.remat, fast_compile=True)
  assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}  # gradients of the fp32 masters
  loss_err, grad_err = abs(loss - loss32), relative_error(grads, grads32)
  tensor_errs = {"/".join(k): relative_error({k: grads[k]}, {k: grads32[k]}) for k in grads32}
  worst = max(tensor_errs, key=tensor_errs.get)

  autocast_loss, autocast_grads = torch_autocast_gradients(folder, config)
  torch32 = by_path(torch_grads, config)
  torch_loss_err, torch_grad_err = abs(autocast_loss - torch_loss), relative_error(autocast_grads, torch32)
  print(f"bf16 step vs fp32: |Δloss| {loss_err:.2g} (torch autocast {torch_loss_err:.2g}); |Δgrad|/|grad| "
        f"{grad_err:.2g} = {grad_err / BF16_U:.2g}u (torch autocast {torch_grad_err:.2g}); worst parameter "
        f"{worst} {tensor_errs[worst]:.2g}")
  assert grad_err > 0.1 * BF16_U, "the step did not compute in bf16"
  assert loss_err <= BF16_LOSS_TOL
  assert grad_err <= BF16_GRAD_RTOL
  assert tensor_errs[worst] <= BF16_TENSOR_RTOL, worst
  assert grad_err <= BF16_VS_TORCH * torch_grad_err


# Measured against no remat (the remat steps compiled with FAST_COMPILE, the reference with the default
# options): |Δloss| 0 and max|Δgrad| 1.2e-7 for each of full, dots and dots_no_batch. The bound is 8x that.
REMAT_TOL = 1e-6


@pytest.mark.parametrize("remat", [p for p in REMAT_POLICIES if p != "none"])
def test_every_remat_policy_gives_the_gradients_of_no_remat(references, remat):
  """Rematerialisation recomputes the same operations in the same precision (fp32 here): same loss and gradients."""
  folder = references(False)[0]
  loss, grads, _ = our_step_gradients(folder)
  remat_loss, remat_grads, _ = our_step_gradients(folder, remat=remat, fast_compile=True)
  err = max(float(np.abs(remat_grads[k] - grads[k]).max()) for k in grads)
  print(f"{remat}: |Δloss| {abs(remat_loss - loss):.2g}, max|Δgrad| {err:.2g}")
  assert abs(remat_loss - loss) <= REMAT_TOL
  assert err <= REMAT_TOL


def test_one_adamw_update_matches_torch(references):
  folder, batch, labels, (torch_loss, torch_loss_after), _, torch_updated = references(False)
  model = load_hf(folder)
  config = model.config
  optimizer = make_optimizer(OPT)
  graphdef, state = create_train_state(model, optimizer)
  stacked = stacked_batch(config, batch, labels)
  step = jit_train_step(make_train_step(graphdef, optimizer, schedule=learning_rate_schedule(OPT)), state, stacked)
  state, metrics = step(state, stacked)

  np.testing.assert_allclose(float(metrics["loss"]), torch_loss, rtol=0, atol=1e-5)  # measured 0
  assert float(metrics["lr"]) == pytest.approx(OPT.learning_rate)
  assert float(metrics["grad_norm"]) > OPT.max_grad_norm  # clipping was active in both
  ours, expected = flat(state.params), by_path(torch_updated, config)
  for path, want in expected.items():
    # The first Adam step moves each weight by about lr; agree to a thousandth of that (measured 1.2e-7).
    np.testing.assert_allclose(ours[path], want, rtol=0, atol=1e-6, err_msg="/".join(path))
  assert int(state.step) == 1



  # The eval step on the updated weights gives torch's loss on its updated weights.
  eval_sums = jax.jit(make_eval_step(graphdef))(state, jax.tree.map(lambda x: x[0], stacked))
  np.testing.assert_allclose(float(metrics_from_sums(eval_sums, LossConfig())["loss"]), torch_loss_after,
                             rtol=0, atol=1e-5)  # measured 1.9e-6
  assert torch_loss_after < torch_loss


# ---------------------------------------------------------------------------- FLOPs for MFU
def torch_flops(model, batch, labels=None, *, frozen_prefixes=()) -> dict:
  """torch's FlopCounterMode on the eager reference: {module name: FLOPs}, forward (and backward with labels)."""
  from torch.utils.flop_counter import FlopCounterMode
  model.set_attn_implementation("eager")  # counted per window/frame segment; sdpa on CPU is not counted
  for name, p in model.named_parameters():
    p.requires_grad_(not name.startswith(frozen_prefixes))
  args = {k: torch.tensor(v) for k, v in batch.items() if v is not None}
  with FlopCounterMode(display=False) as counter:
    if labels is None:
      with torch.no_grad():
        model(**args)
    else:
      model(**args, labels=torch.tensor(labels)).loss.backward()
  return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


FLOPS_ROWS = [[(1, 10, 12)], [(2, 4, 6), (1, 2, 2)]]  # partial windows, two frames, two images in a row


def test_forward_flops_equal_torch_flop_counter():
  """Per part, the analytic forward FLOPs equal what torch counts running transformers' model."""
  config = tiny_hf_config()
  batch = make_batch(FLOPS_ROWS, pad="right")
  counted = torch_flops(build_hf_model(config), batch)
  ours = forward_flops(Qwen25VLConfig.from_hf(config.to_dict()), batch=2, seq_len=batch["input_ids"].shape[1],
                       image_grid_thw=batch["image_grid_thw"])
  root = "Qwen2_5_VLForConditionalGeneration"
  assert ours.patch_embed == counted[f"{root}.model.visual.patch_embed"]
  assert ours.patch_embed + ours.vision_blocks + ours.merger == counted[f"{root}.model.visual"]
  assert ours.merger == counted[f"{root}.model.visual.merger"]
  assert ours.text == counted[f"{root}.model.language_model"]
  assert ours.lm_head == counted[f"{root}.lm_head"]
  assert ours.total == counted["Global"]


@pytest.mark.parametrize("frozen_tower", [False, True], ids=["all-trained", "vision-tower-frozen"])
def test_train_step_flops_equal_torch_forward_backward(frozen_tower):
  """A step = torch's forward + autograd backward, plus the LM head that the chunked loss recomputes.
  With the ViT frozen, neither computes a backward pass through it; the merger still costs 2 (its
  RMSNorm scale trains, so its linear layers need input gradients too)."""
  config = tiny_hf_config()
  batch = make_batch(FLOPS_ROWS, pad="right")
  labels = np.where(batch["attention_mask"] == 1, batch["input_ids"], IGNORE_INDEX)
  frozen = ("model.visual.patch_embed", "model.visual.blocks") if frozen_tower else ()
  counted = torch_flops(build_hf_model(config), batch, labels, frozen_prefixes=frozen)
  ours_config = Qwen25VLConfig.from_hf(config.to_dict())
  seq = batch["input_ids"].shape[1]
  backward = {"patch_embed": 0, "vision_blocks": 0} if frozen_tower else None
  ours = train_step_flops(ours_config, batch=2, seq_len=seq, image_grid_thw=batch["image_grid_thw"],
                          backward=backward)
  recomputed_lm_head = forward_flops(ours_config, batch=2, seq_len=seq).lm_head
  assert ours == counted["Global"] + recomputed_lm_head
