"""The Grain input pipeline: built data set -> static-shape, device-sharded training batches.

    config = PipelineConfig(dataset="synthetic", dataset_config="emoverse", data_dir="data/",
                            tokenizer_dir="checkpoints/Qwen2.5-VL-3B-Instruct", task="emoverse_des")
    it = make_iterator(config, mesh=mesh)     # mesh=None: numpy batches on the host
    batch = next(it)                          # dict; to_train_batch(batch) is the SFT step's Batch
    it.counters                               # skipped / truncated / dropped, fill fractions
    skip_counts(it)                           # records not used so far, per reason (for the training log)
    state = it.get_state(); it.set_state(state)   # or grain.checkpoint via Orbax (train/checkpointing.py)

    # GRPO: prompt-only, left-padded generation batches that carry each record's ground truth
    it = make_iterator(dataclasses.replace(config, prompt_only=True), mesh=mesh)
    prompts = to_prompt_batch(next(it))       # .inputs (ModelInputs) for the rollout, .truth / .questions / .ids

Stages (DESIGN decisions 5, 6, 11):

  random-access source (ArrayRecord)  -> seeded shuffle, reshuffled every epoch -> repeat
  -> this process's shard (ShardByJaxProcess: every `process_count`-th example from `process_index`)
  -> per example, in Grain workers: decode + resize the images (HF-exact; an image whose header declares
     more than `max_image_pixels` is refused undecoded), prompt + tokenise with labels on the answer,
     M-RoPE positions (`positions.get_rope_index`), truncate or drop if too long; handed to the main
     process in groups of EXAMPLES_PER_GROUP (the hand-over costs ~1 ms per element)
  -> batches of static shape in the main process (`batching.py`): rows padded or packed, one vision slot
     layout per batch within fixed `patch_budget` / `frame_budget`; skips and drops counted per reason,
     `strict` stopping at the first, and a stream with nothing usable stopping with one message
  -> optional microbatch stacking -> host prefetch -> global arrays on the mesh (batch axis over
     `data` x `fsdp`, `jax.make_array_from_process_local_data`) -> device prefetch

With `prompt_only` (GRPO), an example is the task's prompt without its answer, ending in the generation cue
`<|im_start|>assistant\n`: what the model sees when it generates. A prompt longer than `seq_len` (the prompt
bucket) is dropped as overlong, never cut (`overlong` does not apply); batches are left-padded, one prompt
per row, and carry each record's ground truth (`eemo_jax.rl.rewards.GroundTruth` fields as `truth_*` arrays)
and its parser `Question` (`batching.py` has the layout). Only the model inputs go to the devices; the truth,
questions and record ids stay on the host, where completions are parsed and scored (`to_prompt_batch`).

Worker-side code imports numpy, PIL, tokenizers and the host halves of the model (positions) only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from data_pipeline import data_packages

data_packages.require()  # without the `data` extra: one line naming it, before the imports below fail
import grain
import numpy as np
from PIL import Image

from data_pipeline import prompts, tasks
from data_pipeline.batching import (MAX_UNUSABLE_AT_START, MAX_UNUSABLE_IN_A_ROW, PIXEL_DTYPES, PROMPT_DEVICE_KEYS,
                                    TRUTH_FIELDS, BatchIterDataset, BatchLayout, Counters, empty_batch, example,
                                    find_counters, rejected)
from data_pipeline.errors import (CorruptImageError, DatasetError, ImagesOverBudgetError, ImageTooLargeError,
                                  InvalidFieldError, MissingFileError, OverlongRecordError, RecordError)
from data_pipeline.image_processor import (DEFAULT_MIN_PIXELS, ImageProcessorConfig, PixelLimitError, _to_rgb,
                                           default_pixel_limit, smart_resize)
from data_pipeline.records import VAD_TASKS, answer_body
from data_pipeline.tokenizer import TextTokenizer, load_tokenizer, token_mismatches
from eemo_jax import paths
from eemo_jax.model import positions

if TYPE_CHECKING:  # eemo_jax.rl imports data_pipeline.tasks; these are imported where they are used
  from eemo_jax.model.qwen25vl import ModelInputs
  from eemo_jax.rl.parsing import Question
  from eemo_jax.rl.rewards import GroundTruth

EMOVERSE_MAX_PIXELS = 200704  # 256 * 28 * 28, EmoVerse's `emo_200704` SFT data (papers.md §2.3)
TYPICAL_ASPECT = 4  # frame_budget's default holds any image up to this aspect ratio at max_pixels
MAX_IMAGES_PER_RECORD = 2  # the most images a builder puts in one record: an EEmo image pair
EXAMPLES_PER_GROUP = 8  # examples a worker hands over at once
MIN_SHARED_MEMORY_BYTES = 1 << 24  # arrays from workers below this size are pickled (measured faster up to MBs)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything the input pipeline needs; plain fields, so an ml_collections config can fill it.

  `patch_budget` / `frame_budget` are the vision slots per batch and per full-attention bin (see
  `positions.vision_layout`); None derives them from `max_pixels` (`vision_budgets`). The model
  geometry fields must match the checkpoint (`check_compatible` checks them against a model config).
  `max_image_pixels` None is `image_processor.default_pixel_limit(max_pixels)`: 256 x max_pixels, at most
  PIL's bomb threshold of 89,478,485 (51,380,224 at the default max_pixels); see `pixel_limit`.
  """

  dataset: str = "synthetic"  # a builder name: "emoverse", "eemo", "synthetic"
  data_dir: str = ""  # where `data_pipeline.builders.build` wrote it
  split: str = "train"
  dataset_config: str | None = None  # the builder config, e.g. "emoverse" / "eemo" (synthetic), "qa" (eemo)
  tokenizer_dir: str = ""  # a Qwen2.5-VL folder with tokenizer.json
  image_root: str = ""  # base of relative image paths, for sources that store paths instead of bytes
  task: str = "emoverse_ces"  # one of TASKS
  seq_len: int = 1024
  batch_size: int = 8  # rows per batch on this process
  patch_budget: int | None = None
  frame_budget: int | None = None
  min_pixels: int = DEFAULT_MIN_PIXELS
  max_pixels: int = EMOVERSE_MAX_PIXELS
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None  # None: repeat forever
  worker_count: int = 0  # Grain worker processes for the per-example work; 0 = threads in this process
  worker_buffer_size: int = 2  # groups of EXAMPLES_PER_GROUP examples each worker keeps ready
  read_threads: int = 4  # threads per process making examples (PIL and numpy release the GIL)
  prefetch: int = 2  # batches assembled ahead on the host
  microbatches: int = 0  # 0: plain batches; k: k batches stacked on a leading axis (the SFT step's layout)
  overlong: str = "truncate"  # text longer than seq_len: "truncate" (counted) or "drop" (counted)
  packing: bool = False  # several examples per row (segment ids in attention_mask)
  pixel_dtype: str = "float32"  # "bfloat16" halves pixel work and transfer, same inputs for a bf16 model;
  #                               "uint8" ships levels, normalised on the device to the float32 values
  strict: bool = False  # any record that yields no row (bad, too long, too large) stops the run with its RecordError
  #                       instead of being skipped and counted; truncation (overlong="truncate") is not a skip
  prompt_only: bool = False  # GRPO prompts: no answer, generation cue, left-padded, truth per row (module docstring)
  max_image_pixels: int | None = None  # images with more pixels are skipped from their header, never decoded
  max_unusable_at_start: int = MAX_UNUSABLE_AT_START  # none of the first this many records usable: stop
  max_unusable_in_a_row: int = MAX_UNUSABLE_IN_A_ROW  # later, this many unusable in a row: stop
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  window_size: int = 112

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task {self.task!r} is unknown; use one of {sorted(TASKS)}")
    if self.pixel_dtype not in PIXEL_DTYPES:
      raise ValueError(f"pixel_dtype must be one of {sorted(PIXEL_DTYPES)}, got {self.pixel_dtype!r}")
    if self.overlong not in ("truncate", "drop"):
      raise ValueError(f"overlong must be 'truncate' or 'drop', got {self.overlong!r}")
    if self.prompt_only and self.packing:
      raise ValueError("prompt_only=True makes left-padded generation prompts, one per row, and cannot pack them: "
                       "set packing=False (data.packing)")
    if self.prompt_only and self.microbatches:
      raise ValueError(f"prompt_only=True makes whole generation batches, which are not stacked into microbatches "
                       f"(got microbatches={self.microbatches}): set microbatches=0; the GRPO step splits the "
                       "completions into micro-batches itself")
    for name in ("seq_len", "batch_size", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size",
                 "merge_size", "window_size", "max_unusable_at_start", "max_unusable_in_a_row"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"PipelineConfig.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("worker_count", "worker_buffer_size", "read_threads", "prefetch", "microbatches"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"PipelineConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None (repeat forever), got {self.num_epochs}")
    if self.max_image_pixels is not None and int(self.max_image_pixels) < 1:
      raise ValueError(f"PipelineConfig.max_image_pixels must be >= 1 or None (the default limit), got "
                       f"{self.max_image_pixels}")
    vision_budgets(self)  # raises on budgets the vision layout cannot use
    _ = self.image_config  # raises on pixel settings the image processor refuses

  @property
  def window_slots(self) -> int:
    """Slots of one attention window: (window side in merged tokens)² x merge_size²."""
    side = self.window_size // self.merge_size // self.patch_size
    return side * side * self.merge_size**2

  @property
  def pixel_limit(self) -> int:
    """The most pixels an image may have (read from its header) before it is skipped undecoded."""
    if self.max_image_pixels is None:
      return default_pixel_limit(self.max_pixels)
    return int(self.max_image_pixels)

  @property
  def image_config(self) -> ImageProcessorConfig:
    return ImageProcessorConfig(patch_size=self.patch_size, merge_size=self.merge_size,
                                temporal_patch_size=self.temporal_patch_size, min_pixels=self.min_pixels,
                                max_pixels=self.max_pixels)


def vision_budgets(config: PipelineConfig) -> tuple[int, int]:
  """(patch_budget, frame_budget): the configured ones, or derived from `max_pixels`.

  The default frame budget holds one image of up to `TYPICAL_ASPECT`:1 at max_pixels (longer panoramas
  are dropped and counted), and the default patch budget one such frame per row, but never fewer than
  `MAX_IMAGES_PER_RECORD` frames: a batch of one record (GRPO's one prompt per micro-batch, as in
  eemo_7b_grpo) must still take an image pair, or every pair question would be dropped as over budget.
  """
  window = config.window_slots
  if window < 1:
    raise ValueError(f"window_size {config.window_size} is smaller than one merged patch "
                     f"({config.merge_size * config.patch_size} pixels)")
  frame = config.frame_budget or _largest_typical_frame(config)
  patch = config.patch_budget or max(config.batch_size, MAX_IMAGES_PER_RECORD) * frame
  for name, value in (("frame_budget", frame), ("patch_budget", patch)):
    if value < window or value % window:
      raise ValueError(f"{name} {value} must be a positive multiple of {window} (the slots of one attention "
                       f"window)")
  if patch % frame:
    raise ValueError(f"patch_budget {patch} must be a multiple of frame_budget {frame} (the tower attends "
                     f"within bins of frame_budget slots)")
  return patch, frame


def _largest_typical_frame(config: PipelineConfig) -> int:
  """Slots of the largest frame smart_resize can make at max_pixels with aspect ratio <= TYPICAL_ASPECT."""
  tokens = config.max_pixels // (config.patch_size * config.merge_size) ** 2  # merged tokens per image
  side = config.window_size // config.merge_size // config.patch_size
  windows = [math.ceil(rows / side) * math.ceil(tokens // rows / side)
             for rows in range(1, max(tokens, 1) + 1) if tokens // rows and
             max(rows, tokens // rows) <= TYPICAL_ASPECT * min(rows, tokens // rows)]
  return max(windows, default=1) * config.window_slots


# --------------------------------------------------------------------------------------------------
# Tasks: record features -> chat messages and head targets
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskPrompt:
  """A record as one conversation, and the targets of the emotion heads (if the record has them).

  `messages` end with the assistant's answer (SFT), or without it when the task is asked `prompt_only`.
  `truth_record` is the record the prompt builder read (a `data_pipeline.tasks` record dict): GRPO reads the
  ground truth (`rewards.GroundTruth.from_records`) and the parser's `Question` from it, so that the rewards
  compare an answer with the options and labels the model was shown.
  """
  messages: list[dict]
  ces_label: int = prompts.IGNORE_INDEX
  des_target: np.ndarray | None = None
  truth_record: Mapping[str, Any] | None = None


# (features, image_hw, resized_hw, *, prompt_only=False) -> TaskPrompt. image_hw / resized_hw: (height, width)
# of each image as stored and as the processor resized it.
TaskFn = Callable[..., TaskPrompt]

# The system message of GRPO prompts for EEmo-Logic tasks. Its Stage 1 (SFT) trained under the chat template's
# default "You are a helpful assistant." (papers.md §3.4), which SFT prompts keep; its Stage 2 (GRPO) trainer
# sets "You are an emotion analysis expert." (§3.5), with the task wrapped in the <think>/<answer> format of
# its inference prompts (§3.3), so GRPO prompts use that. EmoVerse has no GRPO stage: its prompts are the SFT
# ones, under the default system message.
GRPO_SYSTEM_MESSAGE = tasks.EEMO_SYSTEM_MESSAGE


def _emoverse_heads(features, messages) -> TaskPrompt:
  des = np.asarray(features["des"], np.float32) if bool(features.get("has_des", False)) else None
  return TaskPrompt(messages, ces_label=int(features["label"]), des_target=des)


def _emoverse_record(features) -> dict:
  """Stored EmoVerse features as the record dict `tasks.py` reads."""
  return {"id": features["id"], "emotion": features["emotion"], "description": features["description"],
          "background": features["background"], "attribute": features["attribute"],
          "subject": features["subject"], "confidence": float(features["confidence"]),
          "bbox": np.asarray(features["boxes"]).reshape(-1, 4).tolist()}


def _emoverse_ces(features, image_hw, resized_hw, *, prompt_only: bool = False) -> TaskPrompt:
  record = _emoverse_record(features)
  prompt = _emoverse_heads(features, tasks.ces_messages(record, with_answer=not prompt_only))
  return dataclasses.replace(prompt, truth_record=record)


# B-A-S and DES answers (a dict of description, emotion, background, attribute, subject, intensity and box)
# have no reward in eemo_jax.rl.rewards: their GRPO rows are kept, with the truth of an open-ended question
# (task open_ended, every label -1/NaN), so every emotion reward is NaN (unscorable) on them.
def _open_ended_truth(features) -> dict:
  return {"id": features["id"], "task": "open_ended"}


def _emoverse_bas(features, image_hw, resized_hw, *, prompt_only: bool = False) -> TaskPrompt:
  messages = tasks.bas_messages(_emoverse_record(features), image_hw=image_hw[0], resized_hw=resized_hw[0],
                                with_answer=not prompt_only)
  return dataclasses.replace(_emoverse_heads(features, messages), truth_record=_open_ended_truth(features))


def _emoverse_des(features, image_hw, resized_hw, *, prompt_only: bool = False) -> TaskPrompt:
  messages = tasks.des_messages(_emoverse_record(features), image_hw=image_hw[0], resized_hw=resized_hw[0],
                                with_answer=not prompt_only)
  return dataclasses.replace(_emoverse_heads(features, messages), truth_record=_open_ended_truth(features))


def _eemo_qa(features, image_hw, resized_hw, *, prompt_only: bool = False) -> TaskPrompt:
  """EEmo-Logic Stage 1: the released question and answer, verbatim, behind the images.

  As a GRPO prompt: the released question verbatim under the Stage-2 system message; the truth is the
  record's labels, as `eemo_tasks` reads them.
  """
  user = [{"type": "image"} for _ in image_hw] + [{"type": "text", "text": features["question"]}]
  if prompt_only:
    messages = [{"role": "system", "content": GRPO_SYSTEM_MESSAGE}, {"role": "user", "content": user}]
  else:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": features["answer"]}]
  return TaskPrompt(messages, truth_record=_eemo_record(features, len(image_hw)))


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def _eemo_record(features, num_images: int) -> dict:
  """Stored EEmo features as the record dict `tasks.eemo_messages` reads: the structured labels where the
  record has them, else the released answer's body. Options and option sets are passed as stored, so the
  prompt lists them as `tasks.answer_options` (and the answer parser, `parsing.question`) reads them."""
  task, options, letter = features["task"], list(features["options"]), features["choice"]
  record = {"id": features["id"], "task": task, "question": features["question"], "num_images": num_images}
  think = _THINK.search(features["answer"])
  record["think"] = think.group(1).strip() if think else ""
  if task in ("yes_no", "multiple_choice"):
    record.update(options=options, answer=letter or answer_body(features["answer"]))
  elif task in ("dominant_emotion", "emotion_ranking"):
    label = features["emotion"] if task == "dominant_emotion" else list(features["ranking"])
    record.update(options=options or features["option_set"] or None, answer=label)
  elif task in VAD_TASKS:
    record["answer"] = float(np.asarray(features["scores"])[VAD_TASKS.index(task)])
  else:
    record["answer"] = answer_body(features["answer"])
  return record


def _eemo_tasks(features, image_hw, resized_hw, *, prompt_only: bool = False) -> TaskPrompt:
  """The `<think>…</think><answer>Key: value</answer>` format of `tasks.eemo_messages`; as a GRPO prompt,
  under the Stage-2 system message (`GRPO_SYSTEM_MESSAGE`)."""
  record = _eemo_record(features, len(image_hw))
  if prompt_only:
    return TaskPrompt(tasks.eemo_messages(record, with_answer=False, system=GRPO_SYSTEM_MESSAGE), truth_record=record)
  return TaskPrompt(tasks.eemo_messages(record), truth_record=record)


def task_record(features, task: str) -> dict:
  """The record dict `task`'s prompt and ground truth are built from (question, options, answer, labels),
  for a stored example's features: what evaluation writes beside each generated answer."""
  if task.startswith("emoverse"):
    return _emoverse_record(features)
  return _eemo_record(features, len(features["images"]))


TASKS: dict[str, TaskFn] = {
    "emoverse_ces": _emoverse_ces,  # CES: the Mikels class name; ces_label for the head
    "emoverse_bas": _emoverse_bas,  # B-A-S attribution with the subject box
    "emoverse_des": _emoverse_des,  # B-A-S + the DES marker; des_target where the record has a DES
    "eemo_qa": _eemo_qa,  # EEmoDB questions and released answers (the Stage-1 SFT mix)
    "eemo_tasks": _eemo_tasks,  # EEmoDB with tasks.py's think/answer format
}


# --------------------------------------------------------------------------------------------------
# Per example (runs in Grain workers)
# --------------------------------------------------------------------------------------------------


class ExampleMaker(grain.transforms.Map):
  """Record features -> `batching.example(...)`, or `batching.rejected(...)` naming the record and why.

  Picklable: Grain sends it to every worker process.
  """

  def __init__(self, config: PipelineConfig, tokenizer: TextTokenizer):
    self.config = config
    self.tokenizer = tokenizer
    self.layout = batch_layout(config, tokenizer)
    self.image_config = config.image_config
    self.pixel_limit = config.pixel_limit
    self.task = TASKS[config.task]

  def map(self, features: Mapping[str, Any]) -> dict[str, Any]:
    record_id = str(features.get("id", "?"))
    try:
      return self._make(record_id, features)
    except RecordError as error:
      return rejected("skipped", error)
    except Exception as error:  # noqa: BLE001 - any failure costs only its record (counted, named)
      return rejected("skipped", InvalidFieldError(record_id, "<record>", f"{type(error).__name__}: {error}",
                                                   "fix or remove the record (strict=True stops the run here)"))

  def _make(self, record_id: str, features: Mapping[str, Any]) -> dict[str, Any]:
    cfg, special = self.config, self.tokenizer.special
    processed = [self._preprocess(record_id, field, value) for field, value in record_images(features)]
    grids = np.asarray([grid for _, grid in processed], np.int64).reshape(-1, 3)  # (images, 3)
    resized_hw = [(int(g[1]) * cfg.patch_size, int(g[2]) * cfg.patch_size) for g in grids]
    prompt = self.task(features, stored_image_sizes(features, len(processed)), resized_hw,
                       prompt_only=cfg.prompt_only)
    truth = {}
    if cfg.prompt_only:
      question, values = ground_truth(prompt.truth_record)
      truth = {"truth": values, "question": question}
      chat = prompts.encode_chat(prompt.messages, self.tokenizer, grids, merge_size=cfg.merge_size,
                                 add_generation_prompt=True)
      fitted = self._prompt_within_seq_len(record_id, chat.input_ids, chat.labels)
    else:
      chat = prompts.encode_chat(prompt.messages, self.tokenizer, grids, merge_size=cfg.merge_size, train=True)
      fitted = self._fit_to_seq_len(record_id, chat.input_ids, chat.labels)
    if isinstance(fitted, dict):
      return fitted
    ids, labels = fitted
    frame_slots = [s for g in grids for s in _frame_slots(tuple(int(v) for v in g), cfg.patch_size,
                                                          cfg.merge_size, cfg.window_size)]
    if not self.layout.fits_alone(frame_slots):
      return rejected("dropped_images", ImagesOverBudgetError(
          record_id, "<images>", f"its images (grids {grids.tolist()}) need frames of {frame_slots} vision slots, more "
          f"than frame_budget={self.layout.frame_budget} / patch_budget={self.layout.patch_budget} hold",
          "raise the budgets or lower max_pixels", size=sum(frame_slots), limit=self.layout.patch_budget))
    position_ids, deltas = positions.get_rope_index(
        ids[None], None, grids if len(grids) else None, image_token_id=special.image_pad,
        video_token_id=special.video_pad, spatial_merge_size=cfg.merge_size)  # (3, 1, n), (1, 1)
    empty = np.zeros((0, 3, cfg.patch_size, cfg.patch_size), np.uint8)
    return example(record_id, input_ids=ids, labels=labels, position_ids=position_ids[:, 0],
                   rope_delta=int(deltas[0, 0]), patches=np.concatenate([u8 for u8, _ in processed] or [empty]),
                   image_grid_thw=grids, frame_slots=frame_slots, ces_label=prompt.ces_label,
                   des_target=prompt.des_target, truncated=len(ids) < len(chat.input_ids), **truth)

  def _prompt_within_seq_len(self, record_id: str, ids: np.ndarray, labels: np.ndarray):
    """(ids, labels) of a generation prompt that fits seq_len, or a `rejected` dict: a prompt is never cut
    (the model would answer a question it was not asked), whatever `overlong` says."""
    seq_len = self.config.seq_len
    if len(ids) <= seq_len:
      return ids, labels
    return rejected("dropped_overlong", OverlongRecordError(
        record_id, "<text>", f"its generation prompt has {len(ids)} tokens, more than data.seq_len={seq_len} (the "
        "prompt bucket); prompts are never cut", f"raise data.seq_len to at least {len(ids)}, or lower "
        "data.max_pixels (fewer image tokens)", size=len(ids), limit=seq_len))

  def _fit_to_seq_len(self, record_id: str, ids: np.ndarray, labels: np.ndarray):
    """(ids, labels) within seq_len (cut at the end with overlong="truncate"), or a `rejected` dict."""
    seq_len, special = self.config.seq_len, self.tokenizer.special
    if len(ids) <= seq_len:
      return ids, labels

    def overlong(why: str, fix: str) -> dict[str, Any]:
      return rejected("dropped_overlong", OverlongRecordError(
          record_id, "<text>", f"has {len(ids)} tokens, more than seq_len={seq_len}{why}", fix, size=len(ids),
          limit=seq_len))

    if self.config.overlong == "drop":
      return overlong(" (overlong='drop')", "raise seq_len, or truncate (overlong='truncate')")
    vision = np.flatnonzero(np.isin(ids, (special.vision_start, special.image_pad, special.vision_end)))
    if vision.size and vision[-1] >= seq_len:
      return overlong(", and a cut there would split its image placeholders", "raise seq_len or lower max_pixels")
    if not np.any(labels[:seq_len] != prompts.IGNORE_INDEX):
      return overlong("; cut there, no answer token is left to learn from", "raise seq_len")
    return ids[:seq_len], labels[:seq_len]

  def _preprocess(self, record_id: str, field: str, value) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`image_patches` of one image, or a RecordError naming the record, the field and the fix."""
    if isinstance(value, str):
      path = value if os.path.isabs(value) or paths.is_url(value) else paths.join(self.config.image_root, value)
      if not paths.isfile(path):
        raise MissingFileError(record_id, field, f"no image file at {path}",
                               "check the path (relative paths start at PipelineConfig.image_root), or remove the "
                               "record")
      value = paths.read_bytes(path) if paths.is_url(path) else path  # the image library opens local files only
    elif not isinstance(value, (bytes, bytearray, np.bytes_)):
      raise InvalidFieldError(record_id, field, f"is a {type(value).__name__}, not encoded image bytes or a path",
                              "store the encoded image file (as the builders do)")
    try:
      return image_patches(bytes(value) if isinstance(value, np.bytes_) else value, self.image_config,
                           self.pixel_limit)
    except PixelLimitError as error:
      raise ImageTooLargeError(record_id, field, str(error), "downscale the image (or remove the record) and "
                               "rebuild the data set, or raise max_image_pixels", size=error.pixels,
                               limit=error.limit) from None
    except ValueError as error:
      raise CorruptImageError(record_id, field, str(error), "re-encode or replace the image, or remove the "
                              "record, and rebuild the data set") from None


def ground_truth(record: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(`parsing.Question`, {GroundTruth field: this record's value}) of a task's truth record.

  `rewards.GroundTruth.from_records` and `parsing.question` themselves, so that the pipeline and the rewards
  cannot read a record differently; a record they cannot read raises its `RecordError` (the record is skipped).
  """
  from eemo_jax.rl import parsing, rewards  # eemo_jax.rl imports data_pipeline.tasks: imported here, not above
  truth = rewards.GroundTruth.from_records([record])
  return parsing.question(record), {field: np.asarray(getattr(truth, field))[0] for field in TRUTH_FIELDS}


def image_patches(image, config: ImageProcessorConfig,
                  max_image_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
  """(uint8 patches (n, C, P, P) in `pixel_values` row order, grid (1, h, w)) of one image.

  `preprocess_image` stopped before normalising: the same RGB conversion, smart_resize and PIL bicubic
  resize, and the same merge-window patch order. The batch normalises these with the same lookup table
  (`batching._vision_inputs`), which gives exactly `preprocess_image`'s pixel_values while workers hand
  over an eighth of the bytes. Adapter over image_processor's helpers: that module has no public
  "resize only" entry point. An encoded image over `max_image_pixels` raises `PixelLimitError` undecoded.
  """
  p, m = config.patch_size, config.merge_size
  rgb = _to_rgb(image, max_image_pixels)
  height, width = smart_resize(rgb.height, rgb.width, p * m, config.min_pixels, config.max_pixels)
  if (width, height) != rgb.size:
    rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
  pixels = np.asarray(rgb)  # (H, W, C) uint8
  rows, cols, channels = height // (p * m), width // (p * m), pixels.shape[-1]
  windows = pixels.reshape(rows, m, p, cols, m, p, channels)  # (rows, mh, py, cols, mw, px, C)
  windows = windows.transpose(0, 3, 1, 4, 6, 2, 5)  # (rows, cols, mh, mw, C, py, px)
  return windows.reshape(-1, channels, p, p), (1, height // p, width // p)


def record_images(features: Mapping[str, Any]) -> list[tuple[str, Any]]:
  """(field name, encoded image or path) of every image of a record, in prompt order."""
  if "images" in features:
    return [(f"images[{i}]", v) for i, v in enumerate(features["images"])]
  if "image" in features:
    return [("image", features["image"])]
  return []


def stored_image_sizes(features: Mapping[str, Any], count: int) -> list[tuple[int, int]]:
  """(height, width) of each image as the record stores it (the pixels its boxes refer to)."""
  if "heights" in features:
    return [(int(h), int(w)) for h, w in zip(features["heights"], features["widths"])]
  if "height" in features:
    return [(int(features["height"]), int(features["width"]))] * count
  return [(0, 0)] * count


@functools.lru_cache(maxsize=4096)
def _frame_slots(grid: tuple[int, int, int], patch_size: int, merge_size: int, window_size: int) -> tuple[int, ...]:
  """Vision slots of each frame of one image or video (t frames of the same size)."""
  t, h, w = grid
  one = positions.required_slots([[1, h, w]], patch_size=patch_size, spatial_merge_size=merge_size,
                                  window_size=window_size)
  return (one,) * t


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def batch_layout(config: PipelineConfig, tokenizer: TextTokenizer | None = None) -> BatchLayout:
  patch, frame = vision_budgets(config)
  return BatchLayout(batch_size=config.batch_size, seq_len=config.seq_len, patch_budget=patch, frame_budget=frame,
                     pad_id=tokenizer.special.pad if tokenizer is not None else 0, packing=config.packing,
                     pixel_dtype=config.pixel_dtype, prompt_only=config.prompt_only,
                     patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
                     merge_size=config.merge_size, window_size=config.window_size)


def load_source(config: PipelineConfig):
  """The random-access source of the configured built data set (`builders.load_records`).

  Every problem with it (no data_dir, no such data set, config or split, a damaged build) is one
  `DatasetError` naming the path or split and the fix.
  """
  if not config.data_dir:
    raise DatasetError("data.data_dir (PipelineConfig.data_dir) is empty; point it to where "
                       "data_pipeline.builders.build wrote the data set")
  from data_pipeline.builders import load_records  # TFDS import only when reading a built data set
  return load_records(config.dataset, config.data_dir, config.split, config=config.dataset_config)


def shard_of(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
  """(index, count) of this process's shard: the arguments, or JAX's process index and count."""
  if process_index is None or process_count is None:
    jax_shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    process_index = jax_shard.shard_index if process_index is None else process_index
    process_count = jax_shard.shard_count if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must lie in [0, process_count={process_count})")
  return int(process_index), int(process_count)


def make_dataset(config: PipelineConfig, *, source: Sequence | None = None, tokenizer: TextTokenizer | None = None,
                 process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
  """The host half of the pipeline: a Grain dataset of numpy batches for this process.

  `source` (any random-access sequence of feature dicts) replaces the built data set; `process_index`
  / `process_count` replace JAX's (for tests, or one data loader per host outside JAX).
  """
  source = load_source(config) if source is None else source
  if len(source) == 0:
    where = f" of {config.data_dir}" if config.data_dir else ""
    raise DatasetError(f"the {config.split} split{where} holds no records; rebuild the data set, or set data.split to "
                       "a split with records")
  tokenizer = load_tokenizer(config.tokenizer_dir) if tokenizer is None else tokenizer
  index, count = shard_of(process_index, process_count)
  ds = grain.MapDataset.source(source)
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)  # reshuffled every epoch by repeat
  if config.num_epochs != 1:
    ds = ds.repeat(config.num_epochs)
  if config.num_epochs is None:
    ds = ds[index::count]
  else:  # every process gets the same number of examples (ShardByJaxProcess drop_remainder)
    per_process = len(ds) // count
    if per_process == 0:
      raise ValueError(f"{len(ds)} examples cannot be shared by {count} processes")
    ds = ds[index:per_process * count:count]
  # Examples travel in groups: Grain's process hand-over costs about a millisecond per element.
  ds = ds.map(ExampleMaker(config, tokenizer)).batch(EXAMPLES_PER_GROUP, batch_fn=list)
  if config.worker_count:
    _absl_flags_parsed()
  threads = max(1, config.read_threads)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
  it_ds = grain.experimental.WithOptionsIterDataset(  # small arrays are cheaper pickled than in shared memory
      it_ds, grain.experimental.DatasetOptions(min_shm_size=MIN_SHARED_MEMORY_BYTES))
  it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                         per_worker_buffer_size=max(1, config.worker_buffer_size)))
  it_ds = grain.experimental.FlatMapIterDataset(it_ds, _Ungroup())
  it_ds = BatchIterDataset(it_ds, batch_layout(config, tokenizer), strict=config.strict,
                           max_unusable_at_start=config.max_unusable_at_start,
                           max_unusable_in_a_row=config.max_unusable_in_a_row)
  if config.microbatches:
    it_ds = it_ds.batch(config.microbatches, drop_remainder=True)
  if config.prefetch:
    it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=config.prefetch)
  return it_ds


def _absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside an absl app (pytest, notebooks, our CLI) nothing
  has parsed them, so take their defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class _Ungroup(grain.experimental.FlatMapTransform):
  """The examples of a group, in order; checkpoints as (group position, index in the group)."""
  max_fan_out = EXAMPLES_PER_GROUP

  def flat_map(self, group):
    return group


class PipelineIterator(grain.DatasetIterator):
  """The pipeline's iterator: batches, a checkpointable state, and the `counters` of what was not used.

  `get_state` / `set_state` (and `grain.checkpoint.CheckpointSave/Restore` with Orbax) cover the whole
  pipeline: a restored iterator yields the batches that followed the saved position. `counters` are
  those of the batches handed out so far (prefetched ones excluded), restored with the state.
  """

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  @property
  def counters(self) -> Counters:
    return find_counters(self.get_state()) or Counters()


def skip_counts(iterator: PipelineIterator) -> dict[str, int]:
  """Records the iterator has not used so far, per reason: every `batching.SKIP_REASONS` key, zeros included.

  For the training log (one column per reason, every step): what the batches handed out so far skipped,
  restored with the iterator's checkpoint. `iterator.counters` has the rest (truncated, fill fractions).
  """
  return dict(iterator.counters.reasons)


def make_iterator(config: PipelineConfig, *, mesh=None, source: Sequence | None = None,
                  tokenizer: TextTokenizer | None = None, model_config=None, process_index: int | None = None,
                  process_count: int | None = None) -> PipelineIterator:
  """The pipeline's iterator; with a `mesh`, batches arrive as global jax arrays in the batch shardings.

  With a `model_config` (eemo_jax Qwen25VLConfig), `check_compatible` runs first.
  """
  tokenizer = load_tokenizer(config.tokenizer_dir) if tokenizer is None else tokenizer
  if model_config is not None:
    check_compatible(config, model_config, tokenizer)
  ds = make_dataset(config, source=source, tokenizer=tokenizer, process_index=process_index,
                    process_count=process_count)
  if mesh is not None:
    shardings = batch_shardings(abstract_batch(config, tokenizer), mesh)
    ds = ds.map(functools.partial(_global_arrays, shardings=shardings))
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
  return PipelineIterator(ds.__iter__())


def check_compatible(config: PipelineConfig, model_config, tokenizer: TextTokenizer) -> None:
  """Raises a ValueError naming every mismatch between the pipeline, its tokenizer and the model."""
  vision = model_config.vision
  pairs = [("patch_size", vision.patch_size, config.patch_size),
           ("temporal_patch_size", vision.temporal_patch_size, config.temporal_patch_size),
           ("spatial_merge_size", vision.spatial_merge_size, config.merge_size),
           ("window_size", vision.window_size, config.window_size)]
  wrong = token_mismatches(model_config, tokenizer)
  wrong += [f"{name}: model {a}, pipeline {b}" for name, a, b in pairs if a != b]
  if wrong:
    raise ValueError("the pipeline does not match the model: " + "; ".join(wrong) + ". Use the tokenizer of the "
                     "checkpoint and copy its vision settings into PipelineConfig.")


# --------------------------------------------------------------------------------------------------
# Batches on devices
# --------------------------------------------------------------------------------------------------


# Which axis of each (unstacked) batch field runs over rows or slots: the axis processes concatenate.
_PROCESS_AXIS = {"position_ids": 1}


def abstract_batch(config: PipelineConfig, tokenizer: TextTokenizer | None = None, *,
                   process_count: int | None = None, mesh=None):
  """`jax.ShapeDtypeStruct`s of every global batch (static): for `jit_train_step`, AOT compilation, shardings.

  With several JAX processes each contributes its own rows and its own vision layout, concatenated along
  the row / slot axis; the vision inputs then say how many groups they hold (`VisionInputs.groups`).
  With `prompt_only`, the arrays that go to the device (`PROMPT_DEVICE_KEYS`, the rollout's `ModelInputs`);
  the truth, questions and ids stay on the host. With a `mesh`, each carries the sharding `make_iterator`
  places it with: a step lowered and compiled for these finds that executable in jit's cache at its first
  call with a real batch (without them it would compile again).
  """
  import jax
  processes = jax.process_count() if process_count is None else process_count
  batch = empty_batch(batch_layout(config, tokenizer))
  if config.prompt_only:
    batch = {key: batch[key] for key in PROMPT_DEVICE_KEYS}
  batch = _with_groups(batch, processes)
  lead = (config.microbatches,) if config.microbatches else ()

  def spec(path, x):
    axis = _PROCESS_AXIS.get(getattr(path[0], "key", None), 0)
    shape = tuple(n * processes if i == axis else n for i, n in enumerate(x.shape))
    return jax.ShapeDtypeStruct(lead + shape, x.dtype)

  batch = jax.tree_util.tree_map_with_path(spec, batch)
  if mesh is None:
    return batch
  placed = {key: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch[key], sharding)
            for key, sharding in batch_shardings(batch, mesh).items()}
  return {**batch, **placed}


def _with_groups(batch: dict[str, Any], groups: int) -> dict[str, Any]:
  if batch.get("vision") is not None and groups != batch["vision"].groups:
    batch = {**batch, "vision": batch["vision"].replace(groups=groups)}
  return batch


def to_train_batch(batch: Mapping[str, Any]):
  """The SFT step's `Batch` (eemo_jax.train.step) of a pipeline batch; rope_deltas are for generation."""
  from eemo_jax.train.step import Batch
  if "labels" not in batch:
    raise ValueError("this is a prompt batch (PipelineConfig.prompt_only=True), which has no labels to train on: "
                     "use to_prompt_batch for GRPO, or set prompt_only=False (data.prompt_only) for SFT")
  return Batch(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
               position_ids=batch["position_ids"], vision=batch["vision"], ces_label=batch["ces_label"],
               des_target=batch["des_target"], des_mask=batch["des_mask"])


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """A GRPO generation batch: B left-padded prompts for the rollout, and what the rewards compare with.

  inputs     `ModelInputs` of the prompts (on the mesh when the iterator has one): the rollout's input
  truth      `rewards.GroundTruth` of the B rows, host numpy arrays (-1 / NaN where a row has no such label)
  questions  each row's `parsing.Question` (its task and the options it offered), for parsing completions
  ids        each row's record id, for the completion-sample log
  A row without a prompt (`real_rows` False) has truth task -1, question None and id "": drop or mask its
  completions (its emotion rewards are NaN, but a format reward still scores every row).
  With several JAX processes, `inputs` hold every process's rows and the rest this process's only.
  """
  inputs: ModelInputs
  truth: GroundTruth
  questions: list[Question | None]
  ids: list[str]

  @property
  def real_rows(self) -> np.ndarray:
    """(B,) bool: the rows that hold a prompt."""
    return np.asarray(self.truth.task) >= 0


def to_prompt_batch(batch: Mapping[str, Any]) -> PromptBatch:
  """The `PromptBatch` of a pipeline batch made with `prompt_only=True`."""
  from eemo_jax.model.qwen25vl import ModelInputs
  from eemo_jax.rl.rewards import GroundTruth
  if "truth_task" not in batch:
    raise ValueError("this is an SFT batch: make GRPO prompt batches with PipelineConfig(prompt_only=True) "
                     "(data.prompt_only=True)")
  inputs = ModelInputs(**{key: batch[key] for key in PROMPT_DEVICE_KEYS})
  truth = GroundTruth(**{field: batch[f"truth_{field}"] for field in TRUTH_FIELDS})
  return PromptBatch(inputs=inputs, truth=truth, questions=list(batch["questions"]), ids=list(batch["ids"]))


def batch_shardings(batch: Mapping[str, Any], mesh) -> dict[str, Any]:
  """NamedShardings of the device arrays of a (possibly stacked) pipeline batch: the train step's, batch axis
  over data x fsdp. A prompt batch's arrays are sharded as the same fields of an SFT batch."""
  from jax.sharding import NamedSharding

  from eemo_jax.parallel.sharding import spec_for
  from eemo_jax.train import step
  stacked = batch["position_ids"].ndim == 4  # (microbatches, 3, batch, seq)
  fields = {f.name: batch.get(f.name) for f in dataclasses.fields(step.Batch)}  # a prompt batch has no labels
  train = step.batch_shardings(step.Batch(**fields), mesh, stacked=stacked)
  shardings = {name: getattr(train, name) for name in fields if name in batch}
  lead = (None,) if stacked else ()
  deltas = batch["rope_deltas"]
  shardings["rope_deltas"] = NamedSharding(mesh, spec_for(lead + ("act_batch", None), deltas.shape, mesh))
  return shardings


def _global_arrays(batch: dict[str, Any], shardings: dict[str, Any]) -> dict[str, Any]:
  """Process-local numpy batch -> global arrays for the keys in `shardings`; each process's images stay one
  vision group. Other keys (a prompt batch's truth, questions and ids) stay as they are, on the host."""
  import jax
  batch = _with_groups(batch, jax.process_count())
  placed = {key: jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), batch[key], sharding)
            for key, sharding in shardings.items()}
  return {**batch, **placed}
