#!/usr/bin/env python
"""Where the prefill time goes: per-component times, JAX vs torch, and prototypes of fixes.

    python benchmarks/prefill_profile.py [--configs small,tiny] [--repeats N] [--hlo DIR]

Same model, weights and batch as `model_throughput.py` (4 rows x (one 224x224 image + 64 text tokens)).
Components, each jitted separately in JAX and called separately in torch, interleaved:

  vision   the vision tower (JAX `model.visual(vision)`; torch `model.model.get_image_features`)
  decoder  embeddings already given -> 8 decoder layers + final norm (no lm_head)
  lm_head  (B, L, D) -> (B, L, V) logits
  full     the whole prefill, as in model_throughput.py

(torch in model_throughput's separate torch process). `v:model` is the model's VisionTower; the
vision-attention variants prototyped here earlier have landed in the model (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_throughput as mt  # noqa: E402


def vision_variants(model, vision, cfg):
  """Returns {name: f(state, vision) -> features}: the model's tower (earlier prototypes have landed)."""
  from flax import nnx

  graphdef, state = nnx.split(model.visual)

  def as_model(state, inputs):
    return nnx.merge(graphdef, state)(inputs)

  return state, {"v:model": as_model}


def profile_config(name: str, args, worker):
  import tempfile

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from eemo_jax.hf.load import load_hf
  from eemo_jax.model.attention import causal_mask
  from eemo_jax.model.config import preset
  from eemo_jax.model.qwen25vl import prepare_inputs
  from eemo_jax.model.rope import mrope_cos_sin

  cfg = preset(name)
  with tempfile.TemporaryDirectory() as folder:
    worker.call("build", name, folder, args.seed)
    model = load_hf(folder)
  cfg = model.config
  data = mt.make_batch(cfg, args.batch, args.text_tokens, args.seed)
  worker.call("data", data)
  host = prepare_inputs(cfg, data["input_ids"], data["attention_mask"], data["pixel_values"], data["image_grid_thw"],
                        mm_token_type_ids=data["mm_token_type_ids"])
  inputs = jax.device_put(host)
  b, l = data["input_ids"].shape
  graphdef, state = nnx.split(model)
  tcfg = cfg.text

  def full(state, inputs):
    m = nnx.merge(graphdef, state)
    return m(inputs.input_ids, inputs.attention_mask, position_ids=inputs.position_ids, vision=inputs.vision).logits

  def decoder(state, embeds, inputs):
    m = nnx.merge(graphdef, state)
    cos, sin = mrope_cos_sin(inputs.position_ids, tcfg.head_dim, tcfg.rope_theta, tcfg.mrope_section, jnp.float32)
    mask = causal_mask(inputs.attention_mask, jnp.arange(l), l)
    return m.language_model(embeds, cos, sin, mask)[0]

  def lm_head(state, hidden):
    return nnx.merge(graphdef, state).logits(hidden)

  embeds = jax.jit(lambda s, i: nnx.merge(graphdef, s).embed(i.input_ids, i.vision))(state, inputs)
  hidden = jax.jit(decoder)(state, embeds, inputs)
  vstate, variants = vision_variants(model, inputs.vision, cfg)
  compiled = {
      "full": jax.jit(full).lower(state, inputs).compile(),
      "decoder": jax.jit(decoder).lower(state, embeds, inputs).compile(),
      "lm_head": jax.jit(lm_head).lower(state, hidden).compile(),
  }
  for k, f in variants.items():
    compiled[k] = jax.jit(f).lower(vstate, inputs.vision).compile()
  ref_feat = np.asarray(compiled["v:model"](vstate, inputs.vision))[: host.vision.pixel_values.shape[0] // 4]
  for k in variants:
    got = np.asarray(compiled[k](vstate, inputs.vision))[: ref_feat.shape[0]]
    print(f"[{name}] {k}: max |d features| vs model = {np.abs(got - ref_feat).max():.2e}", file=sys.stderr)
  if args.hlo:
    os.makedirs(args.hlo, exist_ok=True)
    for k, c in compiled.items():
      with open(os.path.join(args.hlo, f"{name}_{k.replace(':', '_')}.hlo.txt"), "w") as f:
        f.write(c.as_text())

  # torch pieces, in model_throughput's torch worker process, on JAX's decoder input/output
  worker.call("component_setup", np.asarray(embeds), np.asarray(hidden))
  t_impl = args.torch_attn
  _, d_dec = worker.call("component", t_impl, "decoder")
  print(f"[{name}] decoder parity: max |d hidden| torch vs JAX = {d_dec:.2e}", file=sys.stderr)

  def remote(what):
    return lambda: mt.Remote(worker.call("component", t_impl, what)[0])

  def jcall(c, *a):
    return lambda: jax.block_until_ready(c(*a))

  contestants = {
      "jax full": jcall(compiled["full"], state, inputs),
      "torch full": lambda: mt.Remote(worker.call("prefill", t_impl)),
      "jax decoder": jcall(compiled["decoder"], state, embeds, inputs), "torch decoder": remote("decoder"),
      "jax lm_head": jcall(compiled["lm_head"], state, hidden), "torch lm_head": remote("lm_head"),
      "torch vision": remote("vision"),
  }
  for k in variants:
    contestants[f"jax {k}"] = jcall(compiled[k], vstate, inputs.vision)
  times = mt.race(contestants, args.repeats, warmup=2)
  foreign, redone = mt.FOREIGN_CPU[-1]
  flops = mt.prefill_flops(cfg, data, host.vision)
  print(f"\n[{name}] component times (median / min ms over {args.repeats} interleaved rounds; torch attn = "
        f"{args.torch_attn}; other processes used {foreign:.0%} of the CPU in the kept rounds, {redone} redone)")
  for k, ts in times.items():
    print(f"  {k:22s} {1e3 * mt.med(ts):9.2f} {1e3 * min(ts):9.2f}")
  print(f"  analytic GFLOP: vision {(flops['vision_matmul'] + flops['vision_attn']) / 1e9:.2f}, decoder "
        f"{(flops['text_matmul'] + flops['text_attn']) / 1e9:.2f}, lm_head {flops['lm_head'] / 1e9:.2f}")
  return times


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="small,tiny")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--text-tokens", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch-attn", default="sdpa", choices=["eager", "sdpa"])
  p.add_argument("--hlo", default=None, help="write each compiled JAX function's HLO text here")
  p.add_argument("--wait-idle", type=float, default=0.0, help="see model_throughput.py")
  p.add_argument("--max-foreign", type=float, default=0.10, help="see model_throughput.py")
  args = p.parse_args(argv)
  mt.WAIT_IDLE_S, mt.MAX_FOREIGN = args.wait_idle, args.max_foreign
  worker = mt.TorchWorker(2)  # torch in its own process, as in model_throughput.py
  try:
    for name in args.configs.split(","):
      profile_config(name.strip(), args, worker)
      worker.call("free")
  finally:
    worker.close()


if __name__ == "__main__":
  main()
