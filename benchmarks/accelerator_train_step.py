"""Step time and MFU of a config's real SFT step on this machine's accelerator; XLA against cuDNN attention.

    python benchmarks/accelerator_train_step.py --config configs/emoverse_3b_sft.py \
        --config.train.global_batch_size=8 --config.optimizer.accum_steps=1 \
        --attention xla,cudnn --steps 10 --json out.json

The step is built as `eemo-jax train` and `eemo-jax aot` build it (model, head, freezing, optimizer,
remat, bf16 compute over fp32 master weights, shardings over all local devices), with random weights
instead of a checkpoint and a synthetic batch of the config's static shapes: every row one square
image at the config's `max_pixels` and random text filling `seq_len`, labels on the text of its
second half. The compute does not depend on the values, so this times what a real batch of the same
shapes costs.

Reported per attention implementation: compile seconds, step time (median and best of `--steps`
timed steps after two untimed ones), tokens/s, and MFU from the analytic FLOPs (`train.flops`, the
figure `eemo-jax train` logs) against the device's vendor bf16 peak (`train.run.PEAK_FLOPS`, or
`--config.train.peak_flops`). Then attention alone, forward + backward at the text decoder's shape,
both implementations on the same inputs, with their largest difference. cuDNN attention needs an
NVIDIA GPU; elsewhere its rows say why they are missing. On CPU this runs the tiny config as a check
of the script (`tests/benchmarks/test_accelerator_train_step.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def synthetic_rows(pcfg, arch, *, seed: int) -> list[dict]:
  """One example per row: a square image at max_pixels, random text around it filling seq_len."""
  from data_pipeline import batching
  from eemo_jax.model import positions
  from data_pipeline.pipeline import _frame_slots

  rs = np.random.RandomState(seed)
  merge, patch = pcfg.merge_size, pcfg.patch_size
  side = max(merge, int(math.isqrt(pcfg.max_pixels)) // (patch * merge) * merge)  # patches per image side
  grid = np.asarray([[1, side, side]], np.int64)
  image_tokens = side * side // merge**2
  text = pcfg.seq_len - image_tokens - 2
  if text < 2:
    raise ValueError(f"seq_len {pcfg.seq_len} leaves no room for text beside a {side}x{side}-patch image; "
                     "raise data.seq_len or lower data.max_pixels")
  vocab = min(arch.vision_start_token_id, arch.image_token_id, arch.text.vocab_size)  # ordinary token ids below
  rows = []
  for r in range(pcfg.batch_size):
    words = rs.randint(0, vocab, size=text)
    ids = np.concatenate([words[:text // 4], [arch.vision_start_token_id], [arch.image_token_id] * image_tokens,
                          [arch.vision_end_token_id], words[text // 4:]]).astype(np.int32)
    answer = (np.arange(len(ids)) >= len(ids) // 2) & (ids != arch.image_token_id)
    labels = np.where(answer, ids, batching.IGNORE_INDEX)
    pos, delta = positions.get_rope_index(ids[None], None, grid, image_token_id=arch.image_token_id,
                                          video_token_id=arch.video_token_id, spatial_merge_size=merge)
    frames = _frame_slots(tuple(int(v) for v in grid[0]), patch, merge, pcfg.window_size)
    rows.append(batching.example(f"synthetic-{r}", input_ids=ids, labels=labels, position_ids=pos[:, 0],
                                 rope_delta=int(delta[0, 0]), image_grid_thw=grid, frame_slots=frames,
                                 patches=rs.randint(0, 256, size=(side * side, 3, patch, patch)).astype(np.uint8),
                                 ces_label=r % 8, des_target=rs.randn(batching.DES_DIM).astype(np.float32)))
  return rows


def synthetic_batch(pcfg, arch, *, seed: int = 0):
  """The stacked train `Batch` (microbatches, rows, ...) of `pcfg`'s static shapes."""
  from data_pipeline import batching
  from data_pipeline.pipeline import batch_layout, to_train_batch
  from eemo_jax.train import stack_microbatches

  micro = []
  for m in range(max(1, pcfg.microbatches)):
    builder = batching.BatchBuilder(batch_layout(pcfg))
    for row in synthetic_rows(pcfg, arch, seed=seed + m):
      if not builder.add(row):
        raise ValueError(f"a synthetic row does not fit the batch layout (patch budget {pcfg.patch_budget})")
    micro.append(to_train_batch(builder.assemble()))
  return stack_microbatches(micro)


def time_step(config, attention: str, steps: int) -> dict:
  """Compiles and times the config's train step with one attention implementation."""
  from eemo_jax.commands.aot import sft_step_parts
  from eemo_jax.train import run as runlib
  from eemo_jax.train.state import create_train_state
  from eemo_jax.train.step import batch_shardings, jit_train_step

  config = config.copy_and_resolve_references()
  config.model.attention = attention
  parts = sft_step_parts(config, jax.devices())  # the architecture model_choice picks; weights random
  mesh, rules, pcfg = parts.mesh, parts.rules, parts.pcfg
  result = {"attention": attention, "rows": pcfg.batch_size, "microbatches": pcfg.microbatches,
            "seq_len": pcfg.seq_len, "mesh": dict(mesh.shape)}
  with jax.set_mesh(mesh):
    graphdef, state = create_train_state(lambda: parts.model(config), parts.optimizer, mesh, rules,
                                         trainable=parts.trainable, seed=config.train.seed)
    host_batch = synthetic_batch(pcfg, parts.arch, seed=config.train.seed)
    batch = jax.device_put(host_batch, batch_shardings(host_batch, mesh, rules))
    step = parts.train_step(config, graphdef)
    started = time.perf_counter()
    compiled = jit_train_step(step, state, batch, mesh, rules).lower(state, batch).compile()
    result["compile_s"] = time.perf_counter() - started
    losses, times = [], []
    for i in range(steps + 2):
      started = time.perf_counter()
      state, metrics = compiled(state, batch)
      loss = float(metrics["loss"])  # waits for the step
      if i >= 2:
        times.append(time.perf_counter() - started)
      losses.append(loss)
  flops = runlib.step_flops(parts.arch, parts.head_cfg, batch, config)
  peak = runlib._peak_flops(config) * jax.device_count()
  median = statistics.median(times)
  tokens = math.prod(batch.input_ids.shape)
  result.update(step_ms=1e3 * median, best_ms=1e3 * min(times), tokens_per_s=tokens / median,
                step_flops=flops, mfu=flops / median / peak if peak else None, peak_flops=peak or None,
                losses=losses, finite=all(math.isfinite(x) for x in losses))
  return result


def time_attention(config, implementations, repeats: int = 20) -> dict:
  """Forward + backward of attention alone at the text decoder's shape (one microbatch, causal, bf16)."""
  from eemo_jax.commands.aot import sft_step_parts
  from eemo_jax.model.attention import attention, causal_mask

  parts = sft_step_parts(config, jax.devices())
  t, pcfg = parts.arch.text, parts.pcfg
  b, l = max(1, pcfg.batch_size // jax.device_count()), pcfg.seq_len
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, l, t.num_attention_heads, t.head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, l, t.num_key_value_heads, t.head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, l, t.num_key_value_heads, t.head_dim), jnp.bfloat16)
  d_out = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  mask = causal_mask(jnp.ones((b, l), jnp.int32), jnp.arange(l), l)
  out = {"shape": {"batch": b, "seq": l, "heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads,
                   "head_dim": t.head_dim}}
  values = {}
  for impl in implementations:
    def fwd_bwd(q, k, v, impl=impl):
      o, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, implementation=impl, causal=True), q, k, v)
      return (o,) + vjp(d_out)
    try:
      compiled = jax.jit(fwd_bwd).lower(q, k, v).compile()
    except Exception as error:  # noqa: BLE001 - cuDNN is missing off NVIDIA GPUs: say so, time the rest
      out[impl] = {"error": str(error).splitlines()[0][:300]}
      continue
    values[impl] = jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(repeats):
      started = time.perf_counter()
      jax.block_until_ready(compiled(q, k, v))
      times.append(time.perf_counter() - started)
    # Model FLOPs of the full square: forward QK^T and PV, backward twice that (both skip the upper blocks).
    flops = 3 * 4 * b * l * l * t.num_attention_heads * t.head_dim
    out[impl] = {"ms": 1e3 * statistics.median(times), "best_ms": 1e3 * min(times),
                 "tflops_per_s": flops / statistics.median(times) / 1e12}
  if len(values) == 2:
    a, c = values.values()
    out["max_abs_diff"] = {name: float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
                           for name, x, y in zip(("out", "dq", "dk", "dv"), a, c)}
  return out


def main(argv=None) -> int:
  from eemo_jax.config import add_config_argument, load_config

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_config_argument(parser)
  parser.add_argument("--attention", default="xla,cudnn", help="comma-separated implementations to time")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
  parser.add_argument("--json", default=None, help="write the results here")
  args, overrides = parser.parse_known_args(argv)
  config = load_config(args.config, overrides)
  impls = [s for s in args.attention.split(",") if s]
  report = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "steps": {}, "config": args.config}
  for impl in impls:
    try:
      report["steps"][impl] = time_step(config, impl, args.steps)
    except Exception as error:  # noqa: BLE001 - e.g. cuDNN off NVIDIA GPUs: report it, keep the others
      if impl == "xla":
        raise
      report["steps"][impl] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    r = report["steps"][impl]
    if "error" in r:
      print(f"[{impl}] not timed: {r['error']}", flush=True)
    else:
      mfu = "n/a (unknown peak; set --config.train.peak_flops)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      print(f"[{impl}] {r['rows']} rows x {r['microbatches']} microbatches x {r['seq_len']} tokens: "
            f"step {r['step_ms']:.1f} ms (best {r['best_ms']:.1f}), {r['tokens_per_s']:.0f} tokens/s, MFU {mfu}, "
            f"compile {r['compile_s']:.1f} s, losses finite: {r['finite']}", flush=True)
  report["attention"] = time_attention(config, impls)
  for impl in impls:
    a = report["attention"].get(impl, {})
    print(f"[attention {impl}] " + (f"fwd+bwd {a['ms']:.2f} ms ({a['tflops_per_s']:.1f} TFLOP/s)" if "ms" in a
                                    else f"not timed: {a.get('error')}"), flush=True)
  if "max_abs_diff" in report["attention"]:
    print(f"[attention] max |xla - cudnn|: {report['attention']['max_abs_diff']}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
