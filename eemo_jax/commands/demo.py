"""`eemo-jax demo`: the main job on the embedded default, end to end, on CPU in a few minutes.

1. builds the offline tokenizer (byte-level BPE with the Qwen special tokens);
2. builds the synthetic EmoVerse-style data set as ArrayRecord (drawn images whose colours, shapes
   and composition carry the emotion; see data_pipeline/synthetic.py);
3. runs SFT of a tiny Qwen2.5-VL with the EmoVerse head (configs/tiny_demo.py), live progress line,
   metrics in JSONL and TensorBoard, Orbax checkpoints;
4. exports the HF folder (+ the head's safetensors);
5. evaluates the export on the held-out synthetic images with `eemo-jax eval`'s code (CES accuracy of the
   head, chance 1/8, and of the generated answers; report, confusion matrix and training curves in
   `eval/sft/`);
6. loads the export with transformers and compares its logits with EEmo-JAX's on held-out examples;
7. runs a short GRPO stage from that export (configs/tiny_demo_grpo.py: G completions per CES prompt,
   EmoVerse's category reward), prints the held-out mean reward before and after, and evaluates the GRPO
   export's generated answers the same way (`eval/grpo/`).

Nothing is downloaded. A second run reuses the tokenizer and data and trains again from scratch.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

CHANCE = 1 / 8
MIN_ACCURACY = 0.5  # "clearly above chance": the demo fails below this


def add_arguments(parser, name):
  del name
  parser.add_argument("--out", default="runs/demo", help="where the tokenizer, data, run and export go")
  parser.add_argument("--epochs", type=float, default=None, help="training epochs (default: the config's)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps (default: the config's; 0 skips GRPO)")


def _say(msg: str) -> None:
  print(msg, flush=True)


def _config_path(name: str = "tiny_demo.py") -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.path.normpath(os.path.join(here, "..", "..", "configs", name))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; run the demo from a checkout of the repository")
  return path


def run(args) -> int:
  import logging

  logging.getLogger("data_pipeline").setLevel(logging.ERROR)  # counted drops are in the run's metrics
  from data_pipeline.builders import build
  from data_pipeline.synthetic import SYNTHETIC_NOTICE
  from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer
  from eemo_jax import status
  from eemo_jax.config import load_config
  from eemo_jax.rl.run import grpo
  from eemo_jax.train.run import train

  start = time.time()
  out = os.path.abspath(args.out)
  tokenizer_dir, data_dir = os.path.join(out, "tokenizer"), os.path.join(out, "data")
  run_dir, export_dir = os.path.join(out, "run"), os.path.join(out, "export")

  _say(f"[1/7] tokenizer: byte-level BPE with the Qwen special tokens, built offline -> {tokenizer_dir}")
  build_offline_tokenizer(tokenizer_dir)
  tokenizer = load_tokenizer(tokenizer_dir)

  _say(f"[2/7] data: {SYNTHETIC_NOTICE.splitlines()[0]}")
  report = build("synthetic", data_dir, config="emoverse")
  _say(f"      {report.written.get('train', 0)} train / {report.written.get('test', 0)} test records "
       f"-> {report.dataset_dir}{' (reused)' if report.reused else ''}")

  overrides = [f"--config.train.run_dir={run_dir}", f"--config.data.data_dir={data_dir}",
               f"--config.data.tokenizer_dir={tokenizer_dir}", f"--config.train.seed={args.seed}",
               f"--config.train.export_dir={export_dir}",
               "--config.train.export_overwrite=true"]  # the demo's own folder: a second run replaces it
  if args.epochs is not None:
    overrides.append(f"--config.train.epochs={args.epochs}")
  config = load_config(_config_path(), overrides)
  shutil.rmtree(run_dir, ignore_errors=True)  # each demo trains from scratch
  _say(f"[3/7] SFT: tiny Qwen2.5-VL + EmoVerse head (configs/tiny_demo.py) -> {run_dir}")
  with status.printed():  # the compile lines
    summary = train(config, tokenizer=tokenizer)
  _say(f"      {summary.steps} steps in {summary.seconds:.0f} s; metrics in {run_dir}/metrics.jsonl and "
       f"{run_dir}/tensorboard")

  _say(f"[4/7] exported the HF folder and the head -> {summary.export_dir}")

  sft_eval = _evaluate(summary.export_dir, tokenizer_dir, config, os.path.join(out, "eval", "sft"), run_dir)
  accuracy = sft_eval.metrics.get("emoverse.ces.accuracy", float("nan"))
  answers = sft_eval.metrics.get("emoverse.answer.accuracy", float("nan"))
  _say(f"[5/7] eval on the {sft_eval.examples} held-out images: CES accuracy {accuracy:.3f} from the head, "
       f"{answers:.3f} from the generated answers (chance {CHANCE:.3f}); report {out}/eval/sft/report.md")

  _say("[6/7] transformers loads the export; logits against EEmo-JAX on held-out examples")
  try:
    diff, ours_pred, labels = _check_with_transformers(summary.export_dir, data_dir, tokenizer, config.data)
  except ImportError:
    print("transformers/torch are not installed: scripts/setup_venv.sh test installs them", file=sys.stderr)
    return 2
  _say(f"      max |Δlogits| = {diff:.2e}; head predictions {ours_pred} vs labels {labels}")
  ok = accuracy >= MIN_ACCURACY and diff <= 1e-4

  grpo_dir = os.path.join(out, "grpo")
  if args.grpo_steps != 0:
    grpo_overrides = [f"--config.train.run_dir={grpo_dir}", f"--config.data.data_dir={data_dir}",
                      f"--config.data.tokenizer_dir={tokenizer_dir}", f"--config.model.hf_dir={summary.export_dir}",
                      f"--config.train.seed={args.seed}",
                      f"--config.train.export_dir={os.path.join(out, 'grpo_export')}",
                      "--config.train.export_overwrite=true"]
    if args.grpo_steps is not None:
      grpo_overrides.append(f"--config.train.steps={args.grpo_steps}")
    grpo_config = load_config(_config_path("tiny_demo_grpo.py"), grpo_overrides)
    shutil.rmtree(grpo_dir, ignore_errors=True)
    _say(f"[7/7] GRPO: {grpo_config.grpo.num_generations} completions per CES prompt, EmoVerse's category reward "
         f"(configs/tiny_demo_grpo.py) -> {grpo_dir}")
    with status.printed():  # the weights read, the compile lines
      rl = grpo(grpo_config, tokenizer=tokenizer)
    before, after = (rl.eval_history[0][1].get("reward", float("nan")),
                     rl.eval_history[-1][1].get("reward", float("nan")))
    _say(f"      {rl.steps} steps in {rl.seconds:.0f} s; held-out mean reward {before:.3f} before, {after:.3f} after "
         f"({grpo_config.eval.batches * grpo_config.train.global_batch_size // grpo_config.grpo.num_generations} "
         f"prompts x {grpo_config.grpo.num_generations} samples); completions in {grpo_dir}/samples.jsonl")
    if rl.export_dir:
      grpo_eval = _evaluate(rl.export_dir, tokenizer_dir, config, os.path.join(out, "eval", "grpo"), grpo_dir)
      _say(f"      eval of the GRPO export: generated answers' CES accuracy "
           f"{grpo_eval.metrics.get('emoverse.answer.accuracy', float('nan')):.3f} (SFT: {answers:.3f}); "
           f"report {out}/eval/grpo/report.md")
  _say(f"\n{'OK' if ok else 'FAILED'} in {time.time() - start:.0f} s.\n  tokenizer {tokenizer_dir}\n  data      "
       f"{data_dir}\n  run       {run_dir}\n  export    {summary.export_dir}"
       + (f"\n  grpo      {grpo_dir}" if args.grpo_steps != 0 else ""))
  if accuracy < MIN_ACCURACY:
    print(f"CES accuracy {accuracy:.3f} is below {MIN_ACCURACY}: training did not learn the synthetic cues",
          file=sys.stderr)
  return 0 if ok else 1


def _evaluate(model_dir: str, tokenizer_dir: str, config, out_dir: str, run_dir: str):
  """`eemo-jax eval --config configs/tiny_demo.py --hf-dir MODEL_DIR`: the held-out split, scored and reported."""
  import dataclasses

  from eemo_jax.eval.loading import load_eval_model
  from eemo_jax.eval.run import EvalSettings, evaluate_model
  from eemo_jax.train.run import pipeline_config
  model = load_eval_model(hf_dir=model_dir, tokenizer_dir=tokenizer_dir)
  pcfg = pipeline_config(config, model.backbone.config, split=config.eval.split, eval_mode=True)
  pcfg = dataclasses.replace(pcfg, tokenizer_dir=tokenizer_dir)
  return evaluate_model(model, pcfg, EvalSettings(max_new_tokens=8, level_scores=False), out_dir=out_dir,
                        run_dir=run_dir, progress_stream=_Quiet())


class _Quiet:
  """Drops the evaluation's progress line (the demo prints its own summary)."""

  def write(self, text: str) -> None:
    del text

  def flush(self) -> None:
    pass


def _check_with_transformers(export_dir: str, data_dir: str, tokenizer, data, examples: int = 4):
  """Max |Δlogits| between the exported folder in transformers and in EEmo-JAX, on test examples
  prepared exactly as the HF processor would (image processor + chat template); and the reloaded
  head's predictions for them."""
  import jax
  import numpy as np
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  import eemo_jax
  from data_pipeline.builders import load_records
  from data_pipeline.image_processor import preprocess_image
  from data_pipeline.prompts import encode_chat
  from data_pipeline.tasks import MIKELS_8, ces_messages
  from eemo_jax.hf.heads_io import load_head

  jax.config.update("jax_default_matmul_precision", "highest")
  source = load_records("synthetic", data_dir, "test", config="emoverse")
  model = eemo_jax.load_hf(export_dir)
  head = load_head(export_dir)
  ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(export_dir, attn_implementation="eager").eval()
  worst, predictions, labels = 0.0, [], []
  for index in range(examples):
    record = source.record(index)
    image = preprocess_image(record.image, min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    chat = encode_chat(ces_messages(record.to_features(), with_answer=False), tokenizer,
                       [tuple(image["image_grid_thw"][0])], add_generation_prompt=True)
    batch = dict(input_ids=chat.input_ids[None].astype(np.int64), attention_mask=np.ones((1, len(chat.input_ids)),
                 np.int64), pixel_values=image["pixel_values"], image_grid_thw=image["image_grid_thw"])
    out = model(**batch, hf_hidden_states=head.config.hidden_states_needed)
    image_tokens = (batch["input_ids"] == model.config.image_token_id).astype(np.int64)  # as the processor returns
    with torch.no_grad():
      theirs = ref(**{k: torch.tensor(v) for k, v in batch.items()}, mm_token_type_ids=torch.tensor(image_tokens)
                   ).logits.numpy()
    worst = max(worst, float(np.abs(np.asarray(out.logits) - theirs).max()))
    result = head(out.hidden_states, batch["attention_mask"], batch["input_ids"], deterministic=True)
    predictions.append(MIKELS_8[int(np.argmax(np.asarray(result.ces_logits)[0]))].lower())
    labels.append(record.emotion)
  return worst, predictions, labels
