"""`eemo-jax predict --hf-dir DIR | --checkpoint DIR --image PATH|FOLDER [--task TASK] --out FILE.jsonl`.

    eemo-jax predict --hf-dir runs/demo/export --image photos/ --out runs/demo/predictions.jsonl --boxes runs/demo/boxes
    eemo-jax predict --hf-dir /models/eemo-logic-7b --image cat.jpg --task dominant_emotion --out cat.jsonl

One JSON line per image (a model with the EmoVerse head: the 8-class distribution, the DES row in the
`.des.npy` beside the output, the B-A-S attribution with its box; an EEmo model: the answer, its reasoning
and the parsed value). Unreadable images are listed on stderr and skipped. Exit 0 when at least one image
was predicted, 2 for what the user must fix (one line on stderr).
"""

from __future__ import annotations

import sys


def add_arguments(parser, name):
  del name
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--hf-dir", metavar="DIR", help="the model as an HF folder (with the head files if any)")
  source.add_argument("--checkpoint", metavar="DIR", help="the model as an `eemo-jax import-hf` checkpoint, or a "
                      "training run: RUN_DIR (its newest checkpoint) or RUN_DIR/checkpoints/N")
  parser.add_argument("--image", required=True, metavar="PATH", help="an image file or a folder of images")
  parser.add_argument("--out", required=True, metavar="FILE", help="the JSONL output")
  parser.add_argument("--task", default="auto", help="auto (bas with a head, else dominant_emotion), bas, ces, or an "
                      "EEmo task: yes_no, multiple_choice, dominant_emotion, emotion_ranking, valence, arousal, "
                      "dominance, open_ended")
  parser.add_argument("--question", default="", help="the question of yes_no / multiple_choice / open_ended")
  parser.add_argument("--options", default="", help="comma-separated options (choices, or the emotions offered)")
  parser.add_argument("--boxes", metavar="DIR", help="write each image with its subject box drawn here")
  parser.add_argument("--tokenizer-dir", metavar="DIR", help="tokenizer.json folder (default: the model's)")
  parser.add_argument("--max-new-tokens", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--max-pixels", type=int, default=448 * 448, help="resize budget per image (pixels)")
  parser.add_argument("--min-pixels", type=int, default=56 * 56)


def run(args) -> int:
  from eemo_jax import status
  from eemo_jax.eval.loading import ModelSourceError, load_eval_model
  from eemo_jax.eval.predict import PredictInputError, PredictSettings, list_images, predict
  from eemo_jax.hf.safetensors_io import CheckpointError
  try:
    images = list_images(args.image)
    with status.printed():  # the weights read, one line per file
      model = load_eval_model(hf_dir=args.hf_dir, checkpoint=args.checkpoint, tokenizer_dir=args.tokenizer_dir)
    settings = PredictSettings(task=args.task, question=args.question,
                               options=tuple(o.strip() for o in args.options.split(",") if o.strip()),
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               min_pixels=args.min_pixels, max_pixels=args.max_pixels)

    def progress(done, total):
      sys.stderr.write(f"\r  predicted {done}/{total}")
      sys.stderr.flush()

    summary = predict(model, images, settings, out_path=args.out, boxes_dir=args.boxes, progress=progress)
  except (ModelSourceError, PredictInputError, CheckpointError) as error:
    print(f"eemo-jax predict: {error}", file=sys.stderr)
    return 2
  sys.stderr.write("\n")
  for path, why in summary.failed:
    print(f"eemo-jax predict: skipped {path}: {why}", file=sys.stderr)
  print(f"predicted {summary.predicted} of {len(images)} images -> {summary.out_path}"
        + (f" (DES: {summary.des_path})" if summary.des_path else ""))
  return 0 if summary.predicted else 2
