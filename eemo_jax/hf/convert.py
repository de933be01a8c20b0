"""`eemo-jax import-hf HF_DIR CKPT_DIR` and `eemo-jax export-hf CKPT_DIR OUT_DIR`.

Import reads an HF folder (safetensors only) into an Orbax checkpoint and keeps the tokenizer /
processor files in `CKPT_DIR/hf_assets`, so a later export writes a complete HF folder again.
A user error (bad path, mismatched checkpoint, unsupported config) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

ASSETS = "hf_assets"
DTYPES = ("float32", "bfloat16", "float16")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
  parser.add_argument("--dtype", default=None, choices=DTYPES,
                      help="parameter dtype, e.g. float32 or bfloat16 (default: import float32; export keeps "
                           "the checkpoint's dtype)")
  if name == "import-hf":
    parser.add_argument("hf_dir", metavar="HF_DIR", help="HF Qwen2.5-VL folder (config.json + *.safetensors)")
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR", help="new folder for the Orbax checkpoint")
  else:
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR",
                        help="checkpoint written by `eemo-jax import-hf` (eemo_jax.hf.checkpoint.save_checkpoint)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the HF model (loads with from_pretrained)")
    parser.add_argument("--max-shard-size", default="5GB", type=parse_size,
                        help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")


def parse_size(text: str) -> int:
  """'5GB' -> 5e9 bytes, as transformers' `max_shard_size` reads it; 'GiB' units are powers of 2."""
  match = _SIZE.match(str(text))
  if not match:
    raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
  return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def run(args: argparse.Namespace) -> int:
  from eemo_jax.hf.safetensors_io import CheckpointError
  try:
    if args.command == "import-hf":
      import_hf(args.hf_dir, args.ckpt_dir, dtype=args.dtype or "float32")
    else:
      export_hf(args.ckpt_dir, args.out_dir, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
  except (CheckpointError, ValueError, OSError) as e:
    print(f"eemo-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 2
  return 0


def import_hf(hf_dir: str, ckpt_dir: str, *, dtype="float32") -> None:
  """HF folder -> Orbax checkpoint, plus the tokenizer / processor files in `hf_assets/`."""
  import jax

  from eemo_jax.hf.checkpoint import save_checkpoint
  from eemo_jax.hf.load import load_hf
  from eemo_jax.hf.save import copy_assets
  model = load_hf(hf_dir, dtype=dtype)
  save_checkpoint(model, ckpt_dir)
  if jax.process_index() == 0:
    assets = os.path.join(ckpt_dir, ASSETS)
    os.makedirs(assets, exist_ok=True)
    copy_assets(hf_dir, assets)
    generation = os.path.join(hf_dir, "generation_config.json")
    if os.path.isfile(generation):  # sampling defaults; export copies it back
      shutil.copyfile(generation, os.path.join(assets, "generation_config.json"))
  print(f"imported {hf_dir} -> {ckpt_dir}")


def export_hf(ckpt_dir: str, out_dir: str, *, dtype=None, max_shard_bytes: int = 5 * 10**9) -> None:
  """Orbax checkpoint -> HF folder; tokenizer files come from the checkpoint's `hf_assets/`."""
  from eemo_jax.hf.checkpoint import load_checkpoint
  from eemo_jax.hf.save import save_hf
  model = load_checkpoint(ckpt_dir, dtype=dtype) if dtype else _load_stored_dtype(ckpt_dir)
  assets = os.path.join(ckpt_dir, ASSETS)
  names = save_hf(model, out_dir, source_dir=assets if os.path.isdir(assets) else None, dtype=dtype,
                  max_shard_bytes=max_shard_bytes)
  print(f"exported {ckpt_dir} -> {out_dir} ({len(names)} safetensors file{'s' * (len(names) != 1)})")


def _load_stored_dtype(ckpt_dir: str):
  """Restores in the dtype the checkpoint was saved in, so an export does not change precision."""
  from eemo_jax.hf.checkpoint import load_checkpoint, stored_dtype
  return load_checkpoint(ckpt_dir, dtype=stored_dtype(ckpt_dir))


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())
