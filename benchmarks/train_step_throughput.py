#!/usr/bin/env python
"""EEmo-JAX vs transformers+torch: SFT train-step throughput and MFU on CPU, fp32, same weights and batch.

    python benchmarks/train_step_throughput.py [--configs small,tiny] [--repeats N] [--wait-idle S]
                                               [--breakdown] [--hlo] [--json out.json]

Everything that `model_throughput.py` already does is reused from it (imported as a module): the random model saved once and loaded by both frameworks (so the weights
are identical), the batch (4 rows x one 224x224 image + 64 text tokens, L = 130), the machine limits
(fp32 matmul peak, bandwidth) measured in the same run, and the interleaved `race` that redoes rounds
in which other processes used the CPU. Only the training op is new here.

* JAX: the project's real step, `eemo_jax.train`: `create_train_state(model, make_optimizer(
  OptimizerConfig(lr=1e-5, max_grad_norm=None)))`, `make_train_step`, `jit_train_step` (state
  donated, fed back in), a one-microbatch stacked `Batch`. fp32 compute, remat "none".
* torch: `Qwen2_5_VLForConditionalGeneration(labels=...)` in train mode, eager and sdpa attention,
  `torch.optim.AdamW(lr=1e-5, weight_decay=0)`; one forward + `loss.backward(); opt.step();
  opt.zero_grad()` per timed call, 2 threads, in its own process (see `mt.TorchWorker` for why).
* Labels: the input ids with -100 at the image pads (and padding, of which this batch has none).
* MFU: `eemo_jax.train.flops.train_step_flops` (analytic, the same count for both sides) / step time
  / the measured matmul peak. Tokens/s = batch x seq / step time.
  The count includes one extra LM-head forward that only JAX's chunked, rematerialised loss does.
* Sanity: the first-step losses of both sides (same weights, same batch) must agree to ~1e-5; the
  second-step losses (after one AdamW update) are shown too, which also checks the optimizers agree.
* Kernel cost: system CPU time and MB of fresh pages first touched per step, for each process. On
  this machine they were a large, FLOP-free part of the step (XLA maps its temp buffer anew per call).

`--breakdown` additionally races the pieces of a step on both sides: forward (loss only), forward +
backward (gradients, no update), and the optimizer update alone. `--hlo` summarises the compiled
step's standalone data movement (copies, transposes, zero fills, the layer loops' slices).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_throughput as mt  # noqa: E402

TARGETS = {"small": 1.2, "tiny": 2.0}  # JAX/reference train-step throughput the issue asks for
IMPLS = mt.IMPLS  # torch attention implementations; the reference is the faster one
LEARNING_RATE = 1e-5


# ------------------------------------------------------------------------------------------ torch worker
def _train_setup(state: dict, labels: np.ndarray) -> None:
  """After mt's `build` and `data`: train mode, one AdamW per attention implementation, the labels."""
  import torch
  state["labels"] = torch.from_numpy(labels)
  state["opt"] = {}
  for impl, model in state["refs"].items():
    model.train()
    state["opt"][impl] = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)


def _loss(state: dict, impl: str):
  return state["refs"][impl](**state["targs"], labels=state["labels"]).loss


def _train(state: dict, impl: str) -> tuple[float, float, tuple[float, int]]:
  """One optimizer step, as a torch training loop runs it: (seconds, loss before the update, kernel cost)."""
  opt = state["opt"][impl]
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  t0 = time.perf_counter()
  loss = _loss(state, impl)
  loss.backward()
  opt.step()
  opt.zero_grad()
  dt = time.perf_counter() - t0
  return dt, float(loss.detach()), kernel_cost(r0)


def _train_part(state: dict, impl: str, part: str) -> float:
  """Seconds of one piece of the step (--breakdown): the forward with the loss, forward + backward, or
  the AdamW update alone (on the gradients the last forward + backward left)."""
  import torch
  model, opt = state["refs"][impl], state["opt"][impl]
  if part == "optimizer" and any(p.grad is None for p in model.parameters()):
    _loss(state, impl).backward()
  t0 = time.perf_counter()
  if part == "forward":
    with torch.no_grad():
      _loss(state, impl)
  elif part == "fwd_bwd":
    model.zero_grad()  # set_to_none, as opt.zero_grad() in the step: backward allocates the gradients
    _loss(state, impl).backward()
  elif part == "optimizer":
    opt.step()
  else:
    raise ValueError(f"unknown part {part!r}")
  return time.perf_counter() - t0


# Served by model_throughput's torch worker child (`mt.TorchWorker(threads, "train_step_throughput")`).
TORCH_OPS = {"train_setup": _train_setup, "train": _train, "train_part": _train_part}


def kernel_cost(before) -> tuple[float, int]:
  """(system CPU seconds, minor page faults) of this process since `before` (a getrusage result).

  Fresh memory is zeroed by the kernel on first touch: a step that allocates its temporaries anew
  each call (XLA's temp buffer, torch's activations and gradients above glibc's mmap threshold)
  pays for it here, in system time, not in the FLOPs.
  """
  now = resource.getrusage(resource.RUSAGE_SELF)
  return now.ru_stime - before.ru_stime, now.ru_minflt - before.ru_minflt


# ------------------------------------------------------------------------------------------ one config
def make_labels(cfg, data: dict) -> np.ndarray:
  """The input ids as labels, -100 where no loss is taken (image pads, padding): what both sides train on."""
  from eemo_jax.train import IGNORE_INDEX
  ids = data["input_ids"]
  return np.where((ids == cfg.image_token_id) | (data["attention_mask"] == 0), IGNORE_INDEX, ids).astype(np.int64)


def bench_config(name: str, args, limits: dict, worker: mt.TorchWorker) -> dict:
  import jax

  import eemo_jax
  from eemo_jax.train import (Batch, OptimizerConfig, create_train_state, jit_train_step, make_optimizer,
                              make_train_step, stack_microbatches, train_step_flops)

  res: dict = {"config": name}
  with tempfile.TemporaryDirectory(prefix=f"eemo_train_bench_{name}_") as folder:
    t0 = time.perf_counter()
    worker.call("build", name, folder, args.seed)
    model = eemo_jax.load_hf(folder)  # fp32 parameters and compute
    res["build_s"] = time.perf_counter() - t0
  cfg = model.config
  assert model.language_model.remat == "none" and model.visual.remat == "none", "the benchmark is remat 'none'"
  data = mt.make_batch(cfg, args.batch, args.text_tokens, args.seed)
  labels = make_labels(cfg, data)
  worker.call("data", data)
  worker.call("train_setup", labels)
  b, l = data["input_ids"].shape
  res.update(batch=b, seq_len=l, patches=int(data["pixel_values"].shape[0]),
             label_tokens=int((labels[:, 1:] != -100).sum()))

  inputs = eemo_jax.prepare_inputs(cfg, data["input_ids"], data["attention_mask"], data["pixel_values"],
                                   data["image_grid_thw"], mm_token_type_ids=data["mm_token_type_ids"])
  batch = jax.device_put(stack_microbatches([Batch.from_inputs(inputs, labels)]))
  optimizer = make_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, total_steps=1000, max_grad_norm=None))
  graphdef, state = create_train_state(model, optimizer, mesh=None)
  del model  # its arrays are in `state`, which the step donates
  jitted = jit_train_step(make_train_step(graphdef, optimizer), state, batch)
  t0 = time.perf_counter()
  lowered = jitted.lower(state, batch)
  t1 = time.perf_counter()
  step = lowered.compile()
  res["jax_lower_s"], res["jax_compile_s"] = t1 - t0, time.perf_counter() - t1
  if args.hlo:
    res["hlo"] = hlo_summary(step.as_text())
    _print_hlo(name, res["hlo"])

  if args.breakdown:  # before the step runs: it donates (invalidates) the parameter buffers
    parts = jax_parts(graphdef, optimizer, state, batch)

  res["jax_temp_mb"] = step.memory_analysis().temp_size_in_bytes / 2**20
  state_box = [state]
  jax_metrics = []  # every call's metrics; converted after timing
  kernel = collections.defaultdict(list)  # contestant -> [(system seconds, page faults)] per step

  def jax_step():
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    state_box[0], metrics = step(state_box[0], batch)
    jax.block_until_ready(metrics)
    kernel["jax"].append(kernel_cost(r0))
    jax_metrics.append(metrics)

  torch_losses = {impl: [] for impl in IMPLS}

  def torch_step(impl):
    def run():
      dt, loss, cost = worker.call("train", impl)
      torch_losses[impl].append(loss)
      kernel[f"torch_{impl}"].append(cost)
      return mt.Remote(dt)
    return run

  # The first two steps of each, outside the timing: the sanity check of losses (before / after one update).
  for _ in range(2):
    jax_step()
    for impl in IMPLS:
      torch_step(impl)()
  res["first_losses"] = {"jax": [float(m["loss"]) for m in jax_metrics[:2]],
                         **{f"torch_{impl}": torch_losses[impl][:2] for impl in IMPLS}}
  res["max_abs_dloss_step1"] = max(abs(res["first_losses"]["jax"][0] - torch_losses[impl][0]) for impl in IMPLS)
  res["max_abs_dloss_step2"] = max(abs(res["first_losses"]["jax"][1] - torch_losses[impl][1]) for impl in IMPLS)
  print(f"[{name}] first-step losses: " + ", ".join(f"{k} {v[0]:.7f} (then {v[1]:.7f})"
                                                    for k, v in res["first_losses"].items()), file=sys.stderr)

  contestants = {"jax": jax_step, **{f"torch_{impl}": torch_step(impl) for impl in IMPLS}}
  times = mt.race(contestants, args.repeats, warmup=1)
  res["foreign_cpu"] = mt.FOREIGN_CPU[-1]
  res["last_losses"] = {"jax": float(jax_metrics[-1]["loss"]),
                        **{f"torch_{impl}": torch_losses[impl][-1] for impl in IMPLS}}
  flops = train_step_flops(cfg, batch=b, seq_len=l, image_grid_thw=data["image_grid_thw"])
  res["train_step_flops"] = flops
  res["train"] = {}
  for k, ts in times.items():
    tmed = mt.med(ts)
    timed = kernel[k][2:]  # every step after the two sanity-check ones
    res["train"][k] = {"median_ms": 1e3 * tmed, "min_ms": 1e3 * min(ts), "tokens_per_s": b * l / tmed,
                       "best_tokens_per_s": b * l / min(ts), "gflops": flops / tmed / 1e9,
                       "mfu": flops / tmed / 1e9 / limits["peak_gflops"], "times_ms": [1e3 * x for x in ts],
                       "sys_ms": 1e3 * mt.med([c[0] for c in timed]),
                       "faulted_mb": mt.med([c[1] for c in timed]) * resource.getpagesize() / 2**20}
  ref = min((f"torch_{impl}" for impl in IMPLS), key=lambda k: res["train"][k]["median_ms"])
  res["paired_ratio"] = {"ref": ref, **mt.paired_ratio(times[ref], times["jax"])}
  mt._print_progress(name, "train step", {k: {"median_ms": v["median_ms"], "mfu": v["mfu"]}
                                          for k, v in res["train"].items()})

  if args.breakdown:
    res["breakdown"] = race_parts(name, parts, worker, args)
  return res


# ------------------------------------------------------------------------------------------ --breakdown
def jax_parts(graphdef, optimizer, state, batch) -> dict:
  """Compiled pieces of the JAX step on copies of the state: forward (the loss), forward + backward
  (loss and gradients), and the optimizer update alone (params and moments donated, as in the step)."""
  import jax
  import jax.numpy as jnp
  import optax

  from eemo_jax.train.step import make_loss_fn, window_denominators

  loss_fn = make_loss_fn(graphdef)
  micro = jax.tree.map(lambda x: x[0], batch)  # the only microbatch
  params, frozen = jax.tree.map(jnp.copy, state.params), jax.tree.map(jnp.copy, state.frozen)
  opt_state = jax.tree.map(jnp.copy, state.opt_state)
  rng = state.rng

  def forward(p, f, mb):
    return loss_fn(p, f, mb, window_denominators(batch), rng)[0]

  def fwd_bwd(p, f, mb):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, f, mb, window_denominators(batch), rng)
    return loss, grads

  def update(p, o, g):
    updates, o = optimizer.update(g, o, p)
    return optax.apply_updates(p, updates), o

  compiled = {"forward": jax.jit(forward).lower(params, frozen, micro).compile(),
              "fwd_bwd": jax.jit(fwd_bwd).lower(params, frozen, micro).compile()}
  grads = compiled["fwd_bwd"](params, frozen, micro)[1]
  compiled["optimizer"] = jax.jit(update, donate_argnums=(0, 1)).lower(params, opt_state, grads).compile()
  box = {"params": params, "opt_state": opt_state}

  def run_update():
    box["params"], box["opt_state"] = compiled["optimizer"](box["params"], box["opt_state"], grads)
    jax.block_until_ready(box["params"])

  return {"forward": lambda: jax.block_until_ready(compiled["forward"](box["params"], frozen, micro)),
          "fwd_bwd": lambda: jax.block_until_ready(compiled["fwd_bwd"](box["params"], frozen, micro)),
          "optimizer": run_update}


def race_parts(name: str, jax_fns: dict, worker: mt.TorchWorker, args) -> dict:
  """Median ms of each piece, JAX and both torch implementations, raced in interleaved rounds."""
  contestants = {}
  for part, fn in jax_fns.items():
    contestants[f"jax/{part}"] = fn
    for impl in IMPLS:
      contestants[f"torch_{impl}/{part}"] = (lambda impl=impl, part=part:
                                             mt.Remote(worker.call("train_part", impl, part)))
  times = mt.race(contestants, args.breakdown_repeats, warmup=1)
  out = {"foreign_cpu": mt.FOREIGN_CPU[-1]}
  for k, ts in times.items():
    who, part = k.split("/")
    out.setdefault(part, {})[who] = {"median_ms": 1e3 * mt.med(ts), "min_ms": 1e3 * min(ts)}
  mt._print_progress(name, "breakdown (median ms)", {p: {w: v["median_ms"] for w, v in d.items()}
                                                     for p, d in out.items() if p != "foreign_cpu"})
  return out


# ------------------------------------------------------------------------------------------ --hlo
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+)")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([0-9,]*)\]\S* (\w[\w\-]*)\(")
_MOVES = ("dynamic-update-slice", "dynamic-slice", "transpose", "copy", "broadcast")


def hlo_summary(text: str, top: int = 12) -> dict:
  """Memory traffic in the optimised HLO that is not arithmetic: standalone copies and transposes,
  zero-filled buffers (broadcasts) and the layer loops' dynamic-(update-)slices.

  Instructions inside fusions are skipped (a fused transpose is a strided read of a real op); a fusion
  counts as a move when XLA named it after one (`copy_bitcast_fusion`, `wrapped_broadcast`, ...).
  `entry` instructions run once per step, `loop` ones once per layer iteration. MB is the output
  buffer's size (for a dynamic-update-slice, the whole stacked buffer it writes one slice of).
  """
  comps, current = {}, None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      current = _HEADER.match(line).group(1)
      comps[current] = (line.startswith("ENTRY"), [])
    elif current is not None:
      comps[current][1].append(line)
  fused = {c for _, lines in comps.values() for line in lines if " fusion(" in line
           for c in re.findall(r"calls=%([\w.\-]+)", line)}
  moves = []
  for comp, (is_entry, lines) in comps.items():
    if comp in fused:
      continue
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      name, dtype, dims, op = m.groups()
      label = op if op in ("copy", "transpose") else name if op == "fusion" else ""
      if name.startswith("wrapped_") and "broadcast" not in name and "copy" not in name and "transpose" not in name:
        continue  # a single elementwise op
      if "broadcast" in label and not name.startswith("wrapped_broadcast"):
        continue  # a broadcast fused into arithmetic
      kind = next((k for k in _MOVES if k in label), None)
      if kind is None:
        continue
      elems = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      moves.append({"kind": kind, "where": "entry" if is_entry else "loop", "name": name,
                    "shape": f"{dtype}[{dims}]", "mb": elems * (1 if dtype == "pred" else 4) / 2**20})
  totals = collections.defaultdict(lambda: [0, 0.0])
  for x in moves:
    totals[f"{x['where']} {x['kind']}"][0] += 1
    totals[f"{x['where']} {x['kind']}"][1] += x["mb"]
  moves.sort(key=lambda x: -x["mb"])
  return {"totals": {k: {"count": n, "mb": mb} for k, (n, mb) in sorted(totals.items())},
          "largest": moves[:top]}


def _print_hlo(name: str, h: dict) -> None:
  print(f"[{name}] step HLO, standalone data movement (count, MB): " + ", ".join(
      f"{k} {v['count']} / {v['mb']:.0f}" for k, v in h["totals"].items()), file=sys.stderr)
  for x in h["largest"]:
    print(f"    {x['where']:5s} {x['kind']:20s} {x['shape']:26s} {x['mb']:6.1f} MB  {x['name']}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ report
def print_table(limits: dict, results: list[dict]) -> None:
  print()
  print("Machine limits (same run): fp32 %dx%d matmul GFLOP/s: jax %.1f, torch %.1f -> peak %.1f" % (
      limits["matmul_n"], limits["matmul_n"], limits["matmul_gflops"]["jax"], limits["matmul_gflops"]["torch"],
      limits["peak_gflops"]))
  hdr = ("config", "metric", "JAX", "torch eager", "torch sdpa", "ref", "JAX/ref", "best-of", "target", "ok")
  rows = []
  for r in results:
    name, t = r["config"], r["train"]
    ref = max((f"torch_{impl}" for impl in IMPLS), key=lambda k: t[k]["tokens_per_s"])
    ratio = t["jax"]["tokens_per_s"] / t[ref]["tokens_per_s"]
    best = t["jax"]["best_tokens_per_s"] / max(t[f"torch_{impl}"]["best_tokens_per_s"] for impl in IMPLS)
    tgt = TARGETS.get(name)
    cols = lambda f: tuple(f(t[k]) for k in ("jax", "torch_eager", "torch_sdpa"))
    rows.append((name, f"train tok/s (B={r['batch']}xL={r['seq_len']})", *cols(lambda v: f"{v['tokens_per_s']:.0f}"),
                 ref[6:], f"{ratio:.2f}x", f"{best:.2f}x", f">={tgt}x" if tgt else "",
                 ("yes" if ratio >= tgt else "NO") if tgt else ""))
    pr = r["paired_ratio"]
    rows.append((name, f"paired JAX/{pr['ref'][6:]} (median, {pr['level']:.0%} CI)", "", "", "", "",
                 f"{pr['median']:.2f}x", f"[{pr['low']:.2f}, {pr['high']:.2f}]", f">={tgt}x" if tgt else "",
                 ("yes" if pr["low"] >= tgt else "NO") if tgt else ""))
    rows.append((name, "step ms median", *cols(lambda v: f"{v['median_ms']:.1f}")))
    rows.append((name, "step ms best", *cols(lambda v: f"{v['min_ms']:.1f}")))
    rows.append((name, "MFU (analytic FLOPs / peak)", *cols(lambda v: f"{v['mfu']:.1%}")))
    fl = r["first_losses"]
    rows.append((name, "loss step 1", *(f"{fl[k][0]:.7f}" for k in ("jax", "torch_eager", "torch_sdpa"))))
    rows.append((name, "loss step 2 (after 1 update)", *(f"{fl[k][1]:.7f}" for k in ("jax", "torch_eager",
                                                                                      "torch_sdpa"))))
    rows.append((name, "kernel (sys) ms per step", *cols(lambda v: f"{v['sys_ms']:.0f}")))
    rows.append((name, "MB page-faulted per step", *cols(lambda v: f"{v['faulted_mb']:.0f}")))
    rows.append((name, "JAX lower + compile s", f"{r['jax_lower_s']:.2f} + {r['jax_compile_s']:.2f}", "", ""))
    rows.append((name, "JAX temp buffer MB", f"{r['jax_temp_mb']:.0f}", "", ""))
    if "breakdown" in r:
      for part in ("forward", "fwd_bwd", "optimizer"):
        rows.append((name, f"  {part} ms median", *cols_of(r["breakdown"][part])))
  rows = [row + ("",) * (len(hdr) - len(row)) for row in rows]
  widths = [max(len(str(x[i])) for x in rows + [hdr]) for i in range(len(hdr))]
  line = lambda x: "  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w) for i, (c, w) in enumerate(zip(x, widths)))
  print()
  print(line(hdr))
  print("  ".join("-" * w for w in widths))
  for row in rows:
    print(line(row))
  print()
  for r in results:
    print(f"[{r['config']}] train-step GFLOP (analytic, both sides): {r['train_step_flops'] / 1e9:.2f}; "
          f"{r['label_tokens']} label tokens; max |dloss| JAX vs torch: step 1 {r['max_abs_dloss_step1']:.1e}, "
          f"step 2 {r['max_abs_dloss_step2']:.1e}")
  print("Ratios are JAX/ref tokens/s of the medians; ref = the faster of torch eager and sdpa; best-of = the same "
        "ratio from each side's fastest step. Paired = the median over rounds of ref/JAX step time within each "
        "round (it cancels the machine's drift between rounds), with a bootstrap interval; its 'ok' asks the "
        "interval's low end to clear the target. MFU counts the same analytic FLOPs for both sides "
        "(train_step_flops, including the LM-head recompute only JAX's chunked loss does).")
  fmt = lambda x: f"{x[0]:.0%} ({x[1]} rounds redone)"
  loads = [f"limits {fmt(limits['foreign_cpu'][0])}"] + [f"{r['config']} {fmt(r['foreign_cpu'])}" for r in results]
  print("CPU used by other processes in the kept timed rounds (0% = machine was ours): " + ", ".join(loads))


def cols_of(part: dict) -> tuple[str, ...]:
  return tuple(f"{part[k]['median_ms']:.1f}" for k in ("jax", "torch_eager", "torch_sdpa"))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="small,tiny")
  p.add_argument("--repeats", type=int, default=8, help="timed rounds (train steps per contestant)")
  p.add_argument("--limit-repeats", type=int, default=5, help="timed rounds for the machine limits")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--text-tokens", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  p.add_argument("--breakdown", action="store_true", help="also race forward, forward+backward and the optimizer")
  p.add_argument("--breakdown-repeats", type=int, default=5)
  p.add_argument("--hlo", action="store_true", help="summarise the compiled step's transposes and copies")
  p.add_argument("--wait-idle", type=float, default=0.0,
                 help="before each timed phase wait up to this many seconds for other processes to go idle")
  p.add_argument("--max-foreign", type=float, default=0.10,
                 help="redo timed rounds in which other processes used more than this share of the CPU")
  mt.add_host_memory_argument(p)
  mt.add_lead_in_argument(p)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  mt.WAIT_IDLE_S, mt.MAX_FOREIGN, mt.LEAD_IN_S = args.wait_idle, args.max_foreign, args.lead_in_ms / 1e3

  import flax
  import jax
  import transformers

  worker = mt.TorchWorker(args.threads, extra_ops_module="train_step_throughput",
                          reuse_host_memory=mt.apply_host_memory(args))
  try:
    torch_env = worker.call("env")
    limits = mt.machine_limits(args.limit_repeats, worker)
    print(f"[limits] peak {limits['peak_gflops']:.1f} GFLOP/s {json.dumps(limits['matmul_gflops'])}", file=sys.stderr,
          flush=True)
    results = []
    for name in (n.strip() for n in args.configs.split(",") if n.strip()):
      results.append(bench_config(name, args, limits, worker))
      worker.call("free")
  finally:
    worker.close()
  print_table(limits, results)
  if args.json:
    env = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
           "transformers": transformers.__version__, "cpu_count": os.cpu_count(), **torch_env,
           "jax_devices": [str(d) for d in jax.devices()], "machine": platform.machine(),
           "processor": platform.processor(), **mt._provenance(),
           "env_vars": mt.timing_env_vars()}
    with open(args.json, "w") as f:
      json.dump({"env": env, "args": vars(args), "targets": TARGETS, "limits": limits, "results": results}, f,
                indent=1, default=float)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
