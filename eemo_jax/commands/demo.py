"""`eemo-jax demo`: the main job on the embedded default.

Until the SFT demo lands (training on the synthetic emotion data set), the demo is the HF round
trip a team shipping models relies on, on a tiny model the project builds itself: random EEmo-JAX
weights -> HF folder -> transformers loads it with no missing keys and gives the same logits and
the same greedy tokens -> back into EEmo-JAX unchanged. Nothing is downloaded.
"""

from __future__ import annotations

import os
import sys
import time


def add_arguments(parser, name):
  del name
  parser.add_argument("--out", default="runs/demo", help="where the exported HF folder goes")
  parser.add_argument("--seed", type=int, default=0)


def _say(msg: str) -> None:
  print(msg, flush=True)


def run(args) -> int:
  import jax
  import numpy as np
  from flax import nnx

  import eemo_jax
  from eemo_jax.model import config as cfglib

  jax.config.update("jax_default_matmul_precision", "highest")
  start = time.time()
  config = cfglib.tiny().replace(eos_token_id=124)
  _say(f"[1/5] building the tiny Qwen2.5-VL ({_count(config) / 1e3:.0f}k parameters, random weights, seed {args.seed})")
  model = eemo_jax.Qwen25VL(config, rngs=nnx.Rngs(args.seed))
  batch = _batch(config, np.random.RandomState(args.seed))

  out_dir = os.path.abspath(args.out)
  _say(f"[2/5] exporting to an HF folder: {out_dir}")
  eemo_jax.save_hf(model, out_dir)

  try:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
  except ImportError:
    print("transformers/torch are not installed: install the test extra (scripts/setup_venv.sh test) to check the "
          "export against the PyTorch reference", file=sys.stderr)
    return 2
  _say("[3/5] loading it with transformers and comparing logits on an image batch")
  ref, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager",
                                                                 output_loading_info=True)
  problems = {k: v for k, v in info.items() if v}
  if problems:
    print(f"transformers reported loading problems: {problems}", file=sys.stderr)
    return 1
  ref.eval()
  ours = np.asarray(model(**batch).logits)
  with torch.no_grad():
    theirs = ref(**{k: torch.tensor(v) for k, v in batch.items()},
                 mm_token_type_ids=torch.tensor((batch["input_ids"] == config.image_token_id).astype(np.int64))
                 ).logits.numpy()
  valid = batch["attention_mask"].astype(bool)
  diff = float(np.abs(ours - theirs)[valid].max())
  _say(f"      max |Δlogits| = {diff:.2e} (logit scale {np.abs(theirs).max():.2f})")

  _say("[4/5] greedy generation, 16 tokens, both implementations")
  eos, pad = config.eos_token_id, 0  # rows stop at EOS and are padded after it, in both
  tokens = np.asarray(eemo_jax.generate(model, **batch, max_new_tokens=16, temperature=0.0, eos_token_id=eos,
                                        pad_token_id=pad))
  with torch.no_grad():
    hf_tokens = ref.generate(**{k: torch.tensor(v) for k, v in batch.items()}, do_sample=False, max_new_tokens=16,
                             eos_token_id=eos, pad_token_id=pad)
  hf_tokens = hf_tokens[:, batch["input_ids"].shape[1]:].numpy()
  hf_tokens = np.pad(hf_tokens, ((0, 0), (0, tokens.shape[1] - hf_tokens.shape[1])), constant_values=pad)
  same = bool((tokens == hf_tokens).all())
  _say(f"      token-identical: {same}")

  _say("[5/5] importing the HF folder back into EEmo-JAX")
  again = eemo_jax.load_hf(out_dir)
  identical = all(bool((np.asarray(a) == np.asarray(b)).all()) for a, b in
                  zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))))
  _say(f"      parameters identical after the round trip: {identical}")
  ok = diff <= 1e-4 and same and identical
  _say(f"\n{'OK' if ok else 'FAILED'} in {time.time() - start:.0f}s. HF folder: {out_dir}")
  return 0 if ok else 1


def _count(config) -> int:
  import jax
  import numpy as np
  from flax import nnx

  from eemo_jax.hf.load import abstract_model
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract_model(config), nnx.Param)))


def _batch(config, rs):
  """Two left-padded rows, each with one image of a different size and a short prompt."""
  import numpy as np
  v = config.vision
  grids = [(1, 8, 12), (1, 4, 4)]
  rows = []
  for t, h, w in grids:
    n = t * h * w // v.merge_unit
    rows.append([config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]
                + list(rs.randint(0, 100, 6)))
  length = max(map(len, rows))
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, length - len(r):] = r
    mask[i, length - len(r):] = 1
  patches = sum(t * h * w for t, h, w in grids)
  return dict(input_ids=ids, attention_mask=mask, pixel_values=rs.randn(patches, v.patch_dim).astype(np.float32),
              image_grid_thw=np.array(grids, np.int64))
