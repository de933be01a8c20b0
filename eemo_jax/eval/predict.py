"""`eemo-jax predict`: what a model says about images, one JSON line per image.

An EmoVerse model (one exported with its head) gives the 8-class distribution and the DES vector from the
head, and the B-A-S attribution generated with the subject's box, which is scaled back to the image's own
pixels and drawn on a copy of it. An EEmo model answers the chosen task prompt (`--task`, the EEmo-Logic
format with its `<think>` reasoning); the answer is read with the project's answer parser.

A file that cannot be read as an image is reported and skipped; the others are predicted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import tasks
from eemo_jax.eval import prompting
from eemo_jax.eval.loading import EvalModel
from eemo_jax.paths import is_url

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EMOVERSE_TASKS = ("bas", "ces")
EEMO_TASKS = tuple(tasks.ANSWER_KEYS)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class PredictSettings:
  task: str = "auto"  # auto: bas for a model with the EmoVerse head, dominant_emotion otherwise
  question: str = ""  # the question of yes_no / multiple_choice / open_ended
  options: tuple[str, ...] = ()  # their options (A, B, ... in order), or the emotions offered
  max_new_tokens: int = 256
  batch_size: int = 4
  min_pixels: int = 56 * 56
  max_pixels: int = 448 * 448


@dataclasses.dataclass
class PredictSummary:
  predicted: int
  failed: list[tuple[str, str]]  # (path, why)
  out_path: str
  des_path: str | None


class PredictInputError(ValueError):
  """The images or the task cannot be predicted as given; the message says what to pass."""


def list_images(path: str) -> list[str]:
  """The image file, or the image files of a folder (sorted; other files are not images and are left out)."""
  if is_url(path):
    raise PredictInputError(f"{path}: predict reads local images only; copy them to this machine first")
  if os.path.isfile(path):
    return [os.path.abspath(path)]
  if not os.path.isdir(path):
    raise PredictInputError(f"{path} is neither an image file nor a folder")
  found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
  if not found:
    raise PredictInputError(f"{path} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
  return [os.path.abspath(f) for f in found]


def resolve_task(model: EvalModel, settings: PredictSettings) -> str:
  task = settings.task
  if task == "auto":
    task = "bas" if model.head is not None else "dominant_emotion"
  if task not in EMOVERSE_TASKS + EEMO_TASKS:
    raise PredictInputError(f"--task {task!r} is unknown; use one of {', '.join(('auto',) + EMOVERSE_TASKS + EEMO_TASKS)}")
  if task in ("yes_no", "multiple_choice", "open_ended") and not settings.question:
    raise PredictInputError(f"--task {task} needs --question (and --options for a choice)")
  if task == "multiple_choice" and len(settings.options) < 2:
    raise PredictInputError("--task multiple_choice needs at least two --options")
  return task


def predict(model: EvalModel, images: Sequence[str], settings: PredictSettings, *, out_path: str,
            boxes_dir: str | None = None, progress: Callable[[int, int], None] | None = None) -> PredictSummary:
  """Writes `out_path` (JSONL), the DES vectors beside it (`.npy`, row i = line i) for a model with a head,
  and with `boxes_dir` a copy of each image with the subject box drawn."""
  for where in (out_path, boxes_dir):
    if where and is_url(where):
      raise PredictInputError(f"{where}: predict writes local files only; write them here and copy them to the bucket")
  task = resolve_task(model, settings)
  arch = model.backbone.config
  pad = arch.pad_token_id
  pad_id = int(pad if pad is not None else model.tokenizer.special.pad)
  generate = _generator(model, settings.max_new_tokens, pad_id)
  from eemo_jax.eval.run import head_fn
  head = head_fn(model) if model.head is not None else None
  os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
  if boxes_dir:
    os.makedirs(boxes_dir, exist_ok=True)
  failed, des_rows, done = [], [], 0
  tmp = out_path + ".tmp"
  with open(tmp, "w") as out:
    for start in range(0, len(images), settings.batch_size):
      paths, rows = [], []
      for path in images[start:start + settings.batch_size]:
        try:
          rows.append(_prompt_row(model, path, task, settings))
          paths.append(path)
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported, never fatal
          failed.append((path, f"{type(error).__name__}: {error}"))
      if rows:
        inputs, real = prompting.collate(rows, arch, batch_size=settings.batch_size, pad_id=pad_id,
                                         max_pixels=settings.max_pixels)
        inputs = jax.tree.map(jnp.asarray, inputs)
        texts = generate(inputs)[:real]
        heads = head(inputs) if head is not None else None
        for index, (path, row, text) in enumerate(zip(paths, rows, texts)):
          line = _result(path, row, text, task, settings)
          if heads is not None:
            probs, des = heads[0][index], heads[1][index]
            line["emotion"] = tasks.MIKELS_8[int(np.argmax(probs))]
            line["probabilities"] = {label: round(float(p), 6) for label, p in zip(tasks.MIKELS_8, probs)}
            line["des_row"] = len(des_rows)
            des_rows.append(des)
          if boxes_dir and line.get("attribution", {}).get("boxes"):
            line["boxed_image"] = _draw_boxes(path, line["attribution"]["boxes"], boxes_dir)
          out.write(json.dumps(line) + "\n")
      done += len(images[start:start + settings.batch_size])
      if progress is not None:
        progress(done, len(images))
  os.replace(tmp, out_path)
  des_path = None
  if des_rows:
    des_path = os.path.splitext(out_path)[0] + ".des.npy"
    np.save(des_path, np.stack(des_rows).astype(np.float32))
  return PredictSummary(predicted=len(images) - len(failed), failed=failed, out_path=out_path, des_path=des_path)


def _messages(task: str, settings: PredictSettings, resized_hw) -> list[dict]:
  if task == "bas":
    return tasks.bas_messages({}, resized_hw=resized_hw, with_answer=False)
  if task == "ces":
    return tasks.ces_messages({}, with_answer=False)
  record = {"task": task, "question": settings.question, "num_images": 1}
  if task in ("yes_no", "multiple_choice"):
    record["options"] = list(settings.options) if settings.options else ["No", "Yes"]
    record["answer"] = "A"  # the prompt builder validates a record; the answer is not shown
  elif task == "dominant_emotion":
    record.update(options=list(settings.options) or "mikels8", answer=(list(settings.options) or
                                                                         [tasks.MIKELS_8_FI[0]])[0])
  elif task == "emotion_ranking":
    emotions = list(settings.options) or list(tasks.EKMAN_7)
    record.update(options=emotions, answer=emotions[:3])
  elif task in tasks.VAD_DIMENSIONS:
    record["answer"] = 0.5
  else:
    record["answer"] = ""
  return tasks.eemo_messages(record, with_answer=False, system=tasks.EEMO_SYSTEM_MESSAGE)


def _prompt_row(model: EvalModel, path: str, task: str, settings: PredictSettings) -> prompting.PromptRow:
  v = model.backbone.config.vision
  processed = prompting.preprocess([path], v, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
  grid = processed[0]["image_grid_thw"][0]
  resized_hw = (int(grid[1]) * v.patch_size, int(grid[2]) * v.patch_size)
  messages = _messages(task, settings, resized_hw)
  return prompting.encode_prompt(messages, [path], model.tokenizer, v, min_pixels=settings.min_pixels,
                                 max_pixels=settings.max_pixels)


def _result(path: str, row: prompting.PromptRow, text: str, task: str, settings: PredictSettings) -> dict:
  from PIL import Image
  line = {"image": path, "task": task, "answer": text}
  if task in EMOVERSE_TASKS:
    parsed = tasks.parse_emoverse_answer(text) if task == "bas" else None
    if task == "ces":
      line["generated_emotion"] = tasks.parse_ces_answer(text)
    if parsed is not None:
      with Image.open(path) as image:
        width, height = image.size
      (rh, rw) = row.resized_hw[0]
      boxes = [[round(x1 * width / rw, 1), round(y1 * height / rh, 1), round(x2 * width / rw, 1),
                round(y2 * height / rh, 1)] for x1, y1, x2, y2 in parsed.boxes]
      line["attribution"] = {"emotion": parsed.emotion, "description": parsed.description,
                             "background": parsed.background, "adjective": parsed.adjective, "noun": parsed.noun,
                             "intensity": parsed.intensity, "boxes": boxes}
    return line
  think = _THINK_RE.search(text)
  line["reasoning"] = think.group(1).strip() if think else None
  options = list(settings.options) or None
  if task == "dominant_emotion" and options is None:
    options = "mikels8"
  value = tasks.parse_answer(text, task, options=options)
  line["parsed"] = list(value) if isinstance(value, tuple) else value
  return line


def _draw_boxes(path: str, boxes, folder: str) -> str:
  from PIL import Image, ImageDraw
  with Image.open(path) as image:
    copy = image.convert("RGB")
  draw = ImageDraw.Draw(copy)
  width = max(2, round(min(copy.size) / 150))
  for box in boxes:
    draw.rectangle([float(b) for b in box], outline=(255, 32, 32), width=width)
  target = os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + ".boxes.png")
  copy.save(target)
  return target


def _generator(model: EvalModel, max_new_tokens: int, pad_id: int):
  from eemo_jax.rl.rollout import make_rollout_fn
  graphdef, state = nnx.split(model.backbone)
  rollout = make_rollout_fn(graphdef, None, group_size=1, max_completion_length=max_new_tokens, temperature=0.0)
  eos = tuple(model.tokenizer.special.stop_ids)

  def generate(inputs) -> list[str]:
    out = rollout(state, inputs, jax.random.key(0), eos_ids=eos, pad_id=pad_id)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask).astype(bool)
    return [model.tokenizer.decode([int(t) for t in row[m]], skip_special_tokens=True) for row, m in zip(tokens, mask)]

  return generate


