"""`eemo-jax import-hf HF_DIR CKPT_DIR`, `eemo-jax export-hf CKPT_DIR OUT_DIR`, `export-hf RUN_DIR [--step N] OUT_DIR`.

Import reads an HF folder (safetensors only) into an Orbax checkpoint and keeps the tokenizer /
processor files in `CKPT_DIR/hf_assets`, so a later export writes a complete HF folder again.
`import-hf --adapter PEFT_DIR` merges a PEFT LoRA adapter (e.g. the EmoVerse release) into the weights.
Export also takes a training run's directory: any saved step (the newest by default) is written as the run's
own end-of-run export is (`train.run.export`: LoRA merged, the head's safetensors beside, the tokenizer files
the run recorded), or with `--adapter` its LoRA adapters as a PEFT adapter folder.
A user error (bad path, mismatched checkpoint, malformed or unsupported config or index, a target
that already holds files) prints one line naming the file or key and exits 2, having written
nothing. `export-hf --overwrite` replaces an existing export whole, once the new one is complete.
"""

from __future__ import annotations

import argparse
import re
import sys

from eemo_jax import paths

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
    parser.add_argument("--adapter", metavar="PEFT_DIR", default=None,
                        help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) made on "
                             "HF_DIR, e.g. the EmoVerse release; it is merged into the imported weights")
  else:
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR|RUN_DIR",
                        help="checkpoint written by `eemo-jax import-hf`, or the run directory of `eemo-jax train` "
                             "or `eemo-jax grpo`")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the HF model (loads with from_pretrained)")
    parser.add_argument("--max-shard-size", default="5GB", type=parse_size,
                        help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing export in OUT_DIR (whole, once the new one is complete); "
                             "without it a non-empty OUT_DIR is refused")
    parser.add_argument("--step", type=int, default=None, metavar="N",
                        help="RUN_DIR only: the saved step to export (default: the newest)")
    parser.add_argument("--adapter", action="store_true",
                        help="RUN_DIR only: write the run's LoRA adapters as a PEFT adapter folder "
                             "(adapter_config.json + adapter_model.safetensors, for PeftModel.from_pretrained on the "
                             "model the run started from) instead of merging them into the weights")


def parse_size(text: str) -> int:
  """'5GB' -> 5e9 bytes, as transformers' `max_shard_size` reads it; 'GiB' units are powers of 2."""
  match = _SIZE.match(str(text))
  if not match:
    raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
  return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def run(args: argparse.Namespace) -> int:
  from eemo_jax import status
  from eemo_jax.hf.safetensors_io import CheckpointError
  try:
    if args.command == "import-hf":
      with status.printed():  # the weights read, one line per file
        import_hf(args.hf_dir, args.ckpt_dir, dtype=args.dtype or "float32", adapter=args.adapter)
    elif _is_run_dir(args.ckpt_dir):
      with status.printed():
        export_run(args.ckpt_dir, args.out_dir, step=args.step, dtype=args.dtype, adapter=args.adapter,
                   max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
    else:
      if args.step is not None or args.adapter:
        raise ValueError(f"--step and --adapter take a run directory (config.json + checkpoints/); {args.ckpt_dir} "
                         "is not one")
      export_hf(args.ckpt_dir, args.out_dir, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                overwrite=args.overwrite)
  except (CheckpointError, ValueError, OSError) as e:
    print(f"eemo-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 2
  return 0


def import_hf(hf_dir: str, ckpt_dir: str, *, dtype="float32", adapter: str | None = None) -> None:
  """HF folder -> Orbax checkpoint, plus the tokenizer / processor files in `hf_assets/`.

  `adapter`, a PEFT LoRA folder, is put on the loaded model (`eemo_jax.hf.peft_io`) and merged into its
  weights: a checkpoint holds plain weights. Everything is checked (target, config, index, headers,
  key set, shapes, the adapter) before the first byte is written; a failure after that removes the
  checkpoint folder if this import created it.
  """
  import jax

  from eemo_jax.hf.checkpoint import check_new_checkpoint_dir, save_checkpoint
  from eemo_jax.hf.load import load_hf
  check_new_checkpoint_dir(ckpt_dir)
  if adapter is not None:
    from eemo_jax.hf.peft_io import read_adapter_config
    read_adapter_config(adapter)  # a bad adapter fails before minutes of weight loading
  model = load_hf(hf_dir, dtype=dtype)
  if adapter is not None:
    from eemo_jax.hf.peft_io import load_peft_adapter
    from eemo_jax.model.lora import merge_lora
    load_peft_adapter(model, adapter)
    merge_lora(model)
  created = not paths.exists(ckpt_dir)
  try:
    save_checkpoint(model, ckpt_dir)
    if jax.process_index() == 0:
      keep_assets(hf_dir, paths.join(ckpt_dir, ASSETS))
  except BaseException:
    if created and jax.process_index() == 0:
      paths.rmtree(ckpt_dir)
    raise
  print(f"imported {hf_dir}{f' + adapter {adapter}' if adapter else ''} -> {ckpt_dir}")


def keep_assets(source_dir: str, assets: str) -> None:
  """Copies the tokenizer / processor files and `generation_config.json` (sampling defaults, which an export
  copies back) of `source_dir` into the folder `assets`."""
  from eemo_jax.hf.save import copy_assets
  paths.makedirs(assets)
  copy_assets(source_dir, assets)
  generation = paths.join(source_dir, "generation_config.json")
  if paths.isfile(generation):
    paths.copy_file(generation, paths.join(assets, "generation_config.json"))


def export_hf(ckpt_dir: str, out_dir: str, *, dtype=None, max_shard_bytes: int = 5 * 10**9,
              overwrite: bool = False) -> None:
  """Orbax checkpoint -> HF folder; tokenizer files come from the checkpoint's `hf_assets/`.

  The checkpoint's config and the target are checked before anything is loaded or written, and
  the export is written beside `out_dir` and put in place whole (`eemo_jax.hf.save.export_folder`).
  """
  from eemo_jax.hf.checkpoint import read_checkpoint_config
  from eemo_jax.hf.save import export_folder, write_hf
  from eemo_jax.hf.staging import ExportError, resolve_target
  read_checkpoint_config(ckpt_dir)
  if paths.inside(ckpt_dir, resolve_target(out_dir)):
    raise ExportError(f"{out_dir} holds the checkpoint {ckpt_dir} being exported; choose another OUT_DIR")
  assets = paths.join(ckpt_dir, ASSETS)
  with export_folder(out_dir, overwrite=overwrite) as folder:
    model = _load_for_export(ckpt_dir, dtype)
    names = write_hf(model, folder, source_dir=assets if paths.isdir(assets) else None, dtype=dtype,
                     max_shard_bytes=max_shard_bytes)
  print(f"exported {ckpt_dir} -> {out_dir} ({len(names)} safetensors file{'s' * (len(names) != 1)})")


def export_run(run_dir: str, out_dir: str, *, step: int | None = None, dtype=None, adapter: bool = False,
               max_shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> None:
  """A run's saved step -> HF folder (or PEFT adapter folder) + the head, through the run's own `export`.

  The step is restored without its optimizer state, its parameters sharded over every local device, and
  the run's record, the step and the target are checked before anything is written.
  """
  import jax

  from eemo_jax.hf.staging import ExportError, check_target, resolve_target
  from eemo_jax.parallel.sharding import make_mesh
  from eemo_jax.train.run import export
  from eemo_jax.train.saved_run import SavedRun
  run = SavedRun.open(run_dir)
  step = run.step(step)
  target = resolve_target(out_dir)
  if paths.inside(run.run_dir, target) or paths.inside(target, paths.join(run.run_dir, "checkpoints")):
    raise ExportError(f"{out_dir} would replace the run {run_dir} or part of its checkpoints; choose another OUT_DIR")
  check_target(out_dir, overwrite=overwrite)
  mesh = make_mesh({"fsdp": -1})
  rules = tuple(tuple(r) for r in run.config.rules)
  loaded = run.load(step, mesh=mesh, rules=rules)
  base = run.adapter_base(loaded) if adapter else None
  with jax.set_mesh(mesh):
    export(run.config, loaded.graphdef, loaded, run.tokenizer_dir, out_dir, dtype=dtype,
           max_shard_bytes=max_shard_bytes, adapter_base=base)
  kind = "PEFT adapter" if adapter else "HF model"
  print(f"exported {run.run_dir} step {step} -> {out_dir} ({kind})")


def _is_run_dir(path: str) -> bool:
  from eemo_jax.train.saved_run import is_run_dir
  return is_run_dir(path)


def _load_for_export(ckpt_dir: str, dtype=None):
  """In `dtype`, or in the dtype the checkpoint was saved in, so an export does not change precision."""
  from eemo_jax.hf.checkpoint import load_checkpoint, stored_dtype
  return load_checkpoint(ckpt_dir, dtype=dtype or stored_dtype(ckpt_dir))


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())
