#!/usr/bin/env python
"""Measures proposed model-code fixes before anyone writes them: each is monkeypatched into this
process only (eemo_jax sources are not touched), compiled, and raced against the unpatched model
and torch, with the same weights and batch as `model_throughput.py`.

    python benchmarks/prototype_fixes.py [--configs small,tiny] [--repeats N] [--wait-idle S]

Fixes (combinable; each variant is compiled once with its patches active, then all run interleaved):

  unroll  decoder/vision layer scans fully unrolled (lax.scan(unroll=True)): layer i's weights become
          static slices (XLA still copies them: measured, no gain).
  unstack the decoder's stacked (layers, ...) weights split once, outside jit, into one buffer per
          layer, and the decoder run as a Python loop over them: inside the scan every layer of every
          decode step dynamic-slices (copies) its weights out of the stacked arrays first.
  kvcarry (with unstack) the KV cache updated in place per layer (cache.k.at[i].set) instead of being
          re-stacked as the scan's output every step (fresh zero buffer + copies of the whole cache).

The torch reference (sdpa) runs in model_throughput's separate torch process. The prefill fixes
prototyped here earlier (heads-major attention; per-image full attention and (windows, 64) window
attention in the vision tower) have landed in the model: see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_throughput as mt  # noqa: E402

VARIANTS = {  # name -> set of fixes
    "model": set(),
    "unroll": {"unroll"},
    "unstack": {"unstack"},
    "kvcarry": {"unstack", "kvcarry"},
}
DECODE_VARIANTS = ("model", "unroll", "unstack", "kvcarry")


def unstack_decoder(model):
  """A clone of `model` whose decoder layers are an nnx.List of per-layer modules (own buffers)."""
  import jax
  from flax import nnx
  clone = nnx.clone(model)
  graphdef, state = nnx.split(clone.language_model.layers)
  n = clone.config.text.num_hidden_layers
  clone.language_model.layers = nnx.List(
      [nnx.merge(graphdef, jax.tree.map(lambda a: np.array(a[i]), state)) for i in range(n)])
  return clone


@contextlib.contextmanager
def patched(fixes: set):
  """Applies the fixes to the eemo_jax modules for the duration (tracing happens inside)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from eemo_jax.model import text, vision

  saved = [(text, "scan_layers", text.scan_layers), (vision, "scan_layers", vision.scan_layers)]
  try:
    if "unroll" in fixes:
      def scan_unrolled(layers_, body, carry, xs=None, *, remat="none"):
        assert remat == "none"
        graphdef, state = nnx.split(layers_)

        def step(c, inputs):
          layer_state, x = inputs
          return body(nnx.merge(graphdef, layer_state), c, x)
        return jax.lax.scan(step, carry, (state, xs), unroll=True)
      text.scan_layers = vision.scan_layers = scan_unrolled
    if "unstack" in fixes:
      from eemo_jax.model.text import KVCache
      saved.append((text.TextModel, "__call__", text.TextModel.__call__))

      def text_call(self, x, cos, sin, mask, *, cache=None, cache_index=0, output_hidden_states=False):
        assert not output_hidden_states
        k_all, v_all = (None, None) if cache is None else (cache.k, cache.v)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):  # an nnx.List of per-layer modules (see unstack_decoder)
          kv = None if cache is None else (k_all[i], v_all[i])
          x, kv = layer(x, cos, sin, mask, kv, cache_index, self.attention_impl)
          if cache is not None:
            if "kvcarry" in fixes:
              k_all, v_all = k_all.at[i].set(kv[0]), v_all.at[i].set(kv[1])
            else:
              ks.append(kv[0])
              vs.append(kv[1])
        if cache is None:
          return self.norm(x), None, None
        new = KVCache(k=k_all, v=v_all) if "kvcarry" in fixes else KVCache(k=jnp.stack(ks), v=jnp.stack(vs))
        return self.norm(x), None, new
      text.TextModel.__call__ = text_call
    yield
  finally:
    for obj, name, value in saved:
      setattr(obj, name, value)


def run_config(name: str, args, worker) -> None:
  import jax
  from flax import nnx

  from eemo_jax.generate import sampler
  from eemo_jax.model.config import preset
  from eemo_jax.model.qwen25vl import prepare_inputs

  from eemo_jax.hf.load import load_hf

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
  graphdef, state = nnx.split(model)
  new = args.new_tokens
  gen_args = (inputs, sampler.next_positions(host.position_ids), jax.random.key(0), np.float32(1.0), np.float32(1.0),
              np.array([-1], np.int32), np.int32(0))

  def forward(state, inputs):
    m = nnx.merge(graphdef, state)
    return m(inputs.input_ids, inputs.attention_mask, position_ids=inputs.position_ids, vision=inputs.vision).logits

  prefill, gen, states = {}, {}, {}
  unstacked = nnx.split(unstack_decoder(model))
  for vname, fixes in VARIANTS.items():
    jax.clear_caches()  # jit caches traces by function: without this, a patched variant reuses the old trace
    gd, st = unstacked if "unstack" in fixes else (graphdef, state)
    states[vname] = st

    def fwd(st_, inputs_, gd=gd):
      m = nnx.merge(gd, st_)
      return m(inputs_.input_ids, inputs_.attention_mask, position_ids=inputs_.position_ids,
               vision=inputs_.vision).logits
    with patched(fixes):
      prefill[vname] = jax.jit(fwd).lower(st, inputs).compile()
      for n in (1, new):
        if vname in DECODE_VARIANTS:
          gen[(vname, n)] = sampler._generate_compiled.lower(
              gd, st, *gen_args, max_new_tokens=n, greedy=True, top_k=0, use_top_p=False).compile()
    if args.show_hlo and vname in ("model", "hm"):
      txt = prefill[vname].as_text()
      big = [m.group(1) for m in re.finditer(r"= (f32\[[0-9,]+\])\S* transpose\(", txt)
             if np.prod([int(x) for x in m.group(1)[4:-1].split(",")]) >= 2**18]
      print(f"[{name}] {vname}: transposes with >= 256K elements in the prefill HLO: {big}")
  base = np.asarray(prefill["model"](state, inputs))
  base_tokens = np.asarray(gen[("model", new)](state, *gen_args)[0])
  for vname in VARIANTS:
    err = np.abs(np.asarray(prefill[vname](states[vname], inputs)) - base).max()
    same = (np.array_equal(np.asarray(gen[(vname, new)](states[vname], *gen_args)[0]), base_tokens)
            if vname in DECODE_VARIANTS else "n/a")
    print(f"[{name}] {vname}: max |d logits| vs model {err:.1e}; greedy tokens equal: {same}", file=sys.stderr)

  def torch_prefill():
    return mt.Remote(worker.call("prefill", "sdpa"))

  def torch_gen(n):
    return lambda: mt.Remote(worker.call("gen", "sdpa", n, False)[0])

  def jcall(c, *a):
    return lambda: jax.block_until_ready(c(*a))

  times = mt.race({"torch sdpa": torch_prefill, **{v: jcall(c, states[v], inputs) for v, c in prefill.items()}},
                  args.repeats, warmup=2)
  foreign = mt.FOREIGN_CPU[-1]
  b, l = data["input_ids"].shape
  print(f"\n[{name}] prefill, median ms over {args.repeats} interleaved rounds (others used {foreign[0]:.0%} of the CPU)")
  t_ref = mt.med(times["torch sdpa"])
  for k, ts in times.items():
    print(f"  {k:12s} {1e3 * mt.med(ts):8.2f} ms  {b * l / mt.med(ts):8.0f} tok/s  JAX/ref {t_ref / mt.med(ts):.2f}x")

  if args.skip_decode:
    return
  contestants = {f"torch sdpa/{n}": torch_gen(n) for n in (1, new)}
  for (v, n), c in gen.items():
    contestants[f"{v}/{n}"] = jcall(c, states[v], *gen_args)
  times = mt.race(contestants, args.decode_repeats, warmup=1)
  foreign = mt.FOREIGN_CPU[-1]
  print(f"\n[{name}] decode step = (T(gen {new}) - T(gen 1)) / {new - 1}, medians over {args.decode_repeats} rounds "
        f"(others used {foreign[0]:.0%} of the CPU)")
  steps = {}
  for who in ("torch sdpa",) + DECODE_VARIANTS:  # median of per-round paired differences
    steps[who] = mt.med([b_ - a_ for a_, b_ in zip(times[f"{who}/1"], times[f"{who}/{new}"])]) / (new - 1)
  wb = mt.decode_bytes(cfg, b)["weight_bytes"]
  for who, st in steps.items():
    print(f"  {who:12s} {1e3 * st:8.3f} ms/step  {b / st:8.0f} tok/s  JAX/ref {steps['torch sdpa'] / st:.2f}x  "
          f"weights {wb / st / 1e9:.1f} GB/s")


def main(argv=None):
  global VARIANTS, DECODE_VARIANTS
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="small,tiny")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--decode-repeats", type=int, default=5)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--text-tokens", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--skip-decode", action="store_true")
  p.add_argument("--show-hlo", action="store_true")
  p.add_argument("--wait-idle", type=float, default=0.0)
  p.add_argument("--max-foreign", type=float, default=0.10)
  p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
  args = p.parse_args(argv)
  keep = ["model"] + [v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "model"]
  VARIANTS = {v: VARIANTS[v] for v in keep}
  DECODE_VARIANTS = tuple(v for v in DECODE_VARIANTS if v in VARIANTS)
  mt.WAIT_IDLE_S, mt.MAX_FOREIGN = args.wait_idle, args.max_foreign
  worker = mt.TorchWorker(2)  # transformers+torch in its own process, as in model_throughput.py
  try:
    for name in args.configs.split(","):
      run_config(name.strip(), args, worker)
      worker.call("free")
  finally:
    worker.close()


if __name__ == "__main__":
  main()
