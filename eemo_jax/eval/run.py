"""`eemo-jax eval` from a model: batched greedy generation over a built split, written as a predictions file in
the benchmark's leaderboard format, then scored exactly as an external model's file would be.

    model = load_eval_model(hf_dir="runs/demo/export")
    result = evaluate_model(model, pcfg, EvalSettings(max_new_tokens=32), out_dir="runs/demo/eval")

The prompts are the data pipeline's generation prompts (`prompt_only`: left-padded, in bucketed shapes, the
task's own template), decoded by the rollout loop with one greedy completion per prompt, so evaluation and
GRPO see the same prompts and the same decode. EEmo-Bench questions become leaderboard items
(`eemo_jax.eval.predictions`) scored by `eemo_jax.eval.eemo_bench`; EmoVerse records are scored by
`eemo_jax.eval.emoverse` (CES from the head's distribution and from the generated word, DES, B-A-S, boxes).
Assessment items also get a level-probability score (`level_scores`) when `settings.level_scores`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline.tasks import VAD_DIMENSIONS
from eemo_jax.eval.loading import EvalModel
from eemo_jax.eval.predictions import ASSESSMENT, DOMINANT, OPEN_ENDED, RANKING, WHAT_HOW, YES_NO

# The leaderboard question type of each EEmo task (`eval.predictions`' names)
QUESTION_TYPES = {"yes_no": YES_NO, "multiple_choice": WHAT_HOW, "open_ended": OPEN_ENDED, "emotion_ranking": RANKING,
                  "dominant_emotion": DOMINANT, "valence": ASSESSMENT, "arousal": ASSESSMENT, "dominance": ASSESSMENT}
CES_TYPE = "CES"  # EmoVerse category items (scored by eval.emoverse, not by the benchmark scorer)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  max_new_tokens: int = 512
  limit: int = 0  # score the first `limit` records only (0: the whole split)
  level_scores: bool = True  # assessment items: also the level-word probability score (one forward each)
  n_resamples: int = 1000  # bootstrap resamples for the 95% intervals
  dataset: str = ""  # what dominant-emotion items call their set (artemis, artphoto, ...)


@dataclasses.dataclass
class EvalResult:
  items: list[dict]  # the scored predictions
  metrics: dict[str, float]
  seconds: float  # generation (and level scoring) time
  examples: int

  @property
  def examples_per_second(self) -> float:
    return self.examples / self.seconds if self.seconds else float("nan")


def generate_predictions(model: EvalModel, pcfg, settings: EvalSettings, *, source=None, mesh=None,
                         progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], float]:
  """Leaderboard items (with `response(model.name)`) for the records of `pcfg`'s split, and the seconds the
  generation took. `source` replaces the built data set (tests)."""
  from data_pipeline.pipeline import load_source, make_iterator, task_record, to_prompt_batch
  from eemo_jax.rl.rollout import make_rollout_fn
  source = load_source(pcfg) if source is None else source
  count = min(len(source), settings.limit) if settings.limit else len(source)
  records = {}
  for index in range(count):
    features = source[index]
    record = task_record(features, pcfg.task)
    records[features["id"]] = (record, _kept_fields(features, record))
  pcfg = dataclasses.replace(pcfg, prompt_only=True, shuffle=False, num_epochs=1, microbatches=0, packing=False)
  graphdef, state = nnx.split(model.backbone)
  rollout = make_rollout_fn(graphdef, mesh, group_size=1, max_completion_length=settings.max_new_tokens,
                            temperature=0.0)
  special = model.tokenizer.special
  pad = model.backbone.config.pad_token_id
  pad_id = int(pad if pad is not None else special.pad)
  eos = tuple(special.stop_ids)
  heads = head_fn(model) if model.head is not None else None
  items, done, started = [], 0, time.time()
  iterator = make_iterator(pcfg, tokenizer=model.tokenizer, model_config=model.backbone.config,
                           source=_Prefix(source, count), mesh=mesh)
  try:
    for batch in iterator:
      prompts = to_prompt_batch(batch)
      out = rollout(state, prompts.inputs, jax.random.key(0), eos_ids=eos, pad_id=pad_id)
      tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
      head = heads(prompts.inputs) if heads is not None else None
      for row, record_id in enumerate(prompts.ids):
        if not record_id:
          continue  # a padding row of the last batch
        text = model.tokenizer.decode([int(t) for t in tokens[row][mask[row].astype(bool)]],
                                      skip_special_tokens=True)
        record, features = records[record_id]
        item = prediction_item(record, features, pcfg.task, model.name, text, dataset=settings.dataset,
                               resized_hw=_resized_hw(features, pcfg))
        if head is not None:
          item["head_probs"] = [float(p) for p in head[0][row]]
          item["des"] = [float(x) for x in head[1][row]]
        item["truncated(" + model.name + ")"] = bool(np.asarray(out.truncated)[row])
        items.append(item)
      done += sum(1 for i in prompts.ids if i)
      if progress is not None:
        progress(done, count)
  finally:
    iterator.close()
  if settings.level_scores and any(i["question_type"] == ASSESSMENT for i in items):
    _add_level_scores(model, pcfg, items, records)
  return items, time.time() - started


def _resized_hw(features, pcfg) -> tuple[int, int] | None:
  """The (height, width) the processor resized an EmoVerse record's image to: the pixels its answer's boxes are in."""
  if "width" not in features:
    return None
  from data_pipeline.image_processor import smart_resize
  return smart_resize(int(features["height"]), int(features["width"]), factor=pcfg.patch_size * pcfg.merge_size,
                      min_pixels=pcfg.min_pixels, max_pixels=pcfg.max_pixels)


def prediction_item(record: dict, features, task: str, model_name: str, response: str, *, dataset: str = "",
                    resized_hw: tuple[int, int] | None = None) -> dict:
  """One record and the model's answer as a leaderboard item (`eemo_jax.eval.predictions`). EmoVerse boxes are
  given in pixels of the resized image (`resized_hw`), as the model answers them."""
  images = int(features["num_images"]) if "num_images" in features else len(features.get("images", [None]))
  base = {"id": record["id"], "image1_url": f"{record['id']}#1", f"response({model_name})": response}
  if images > 1:
    base["image2_url"] = f"{record['id']}#2"
  if task.startswith("emoverse"):
    from data_pipeline.tasks import scale_box
    boxes = record.get("bbox") or []
    box = None
    if boxes and resized_hw is not None:
      box = list(scale_box(boxes[0], (int(features["height"]), int(features["width"])), resized_hw))
    return {**base, "question_type": CES_TYPE, "question": "", "correct_answer": record["emotion"],
            "task": task, "correct_box": box,
            "correct_des": [float(x) for x in np.asarray(features["des"]).ravel()] if _has_des(features) else None}
  kind = record["task"]
  item = {**base, "question": record.get("question", ""), "question_type": QUESTION_TYPES[kind], "task": kind}
  answer = record.get("answer")
  if kind in ("yes_no", "multiple_choice"):
    from data_pipeline.tasks import answer_options
    item.update(options=answer_options(record), correct_answer=answer)
  elif kind == "emotion_ranking":
    from data_pipeline.tasks import answer_options
    item.update(options=list(answer_options(record)), correct_answer=list(answer))
  elif kind == "dominant_emotion":
    from data_pipeline.tasks import answer_options
    item.update(options=list(answer_options(record)), correct_answer=answer, dataset=dataset or "dominant")
  elif kind in VAD_DIMENSIONS:
    item.update(assessment_dimension=kind, correct_answer=float(answer))
  else:
    item.update(correct_answer=str(answer or ""), describing_dimension=record.get("dimension", "description"))
  return item


def _kept_fields(features, record: dict) -> dict:
  """A record's fields without its encoded images, which only the level-word scores of V/A/D questions read again:
  a benchmark split holds each image once per question (7 copies per EEmo-Bench image), so keeping every
  record's bytes for the whole run would hold the images seven times over."""
  kept = {k: v for k, v in features.items() if k not in ("image", "images")}
  if "images" in features:
    kept["num_images"] = len(features["images"])
    if record.get("task") in VAD_DIMENSIONS:
      kept["images"] = features["images"]
  return kept


def _has_des(features) -> bool:
  return "des" in features and np.asarray(features["des"]).size > 0 and np.all(np.isfinite(features["des"]))


def head_fn(model: EvalModel):
  """A jitted prompt forward returning the head's class probabilities and DES per row."""
  graphdef, state = nnx.split((model.backbone, model.head))
  needed = model.head.config.hidden_states_needed

  @jax.jit
  def forward(state, inputs):
    backbone, head = nnx.merge(graphdef, state)
    out = backbone(inputs.input_ids, inputs.attention_mask, position_ids=inputs.position_ids, vision=inputs.vision,
                   logits_for="last", hf_hidden_states=needed)
    result = head(out.hidden_states, inputs.attention_mask, inputs.input_ids, deterministic=True)
    return jax.nn.softmax(result.ces_logits.astype(jnp.float32), axis=-1), result.des.astype(jnp.float32)

  return lambda inputs: tuple(np.asarray(x) for x in forward(state, inputs))


def _add_level_scores(model: EvalModel, pcfg, items: list[dict], records: dict) -> None:
  from eemo_jax.eval.level_scores import LevelScorer
  scorer = LevelScorer(model.backbone, model.tokenizer, batch_size=max(1, pcfg.batch_size), min_pixels=pcfg.min_pixels,
                       max_pixels=pcfg.max_pixels)
  chosen = [i for i in items if i["question_type"] == ASSESSMENT]
  images = [list(records[i["id"]][1]["images"]) for i in chosen]
  scores = scorer(images, [i["assessment_dimension"] for i in chosen])
  for item, score in zip(chosen, scores):
    item[f"level_score({model.name})"] = float(score)


class _Prefix:
  """The first `count` records of a random-access source."""

  def __init__(self, source, count: int):
    self.source, self.count = source, count

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, index):
    if not 0 <= index < self.count:
      raise IndexError(index)
    return self.source[index]


def score_items(items: list[dict], model_name: str, *, n_resamples: int = 1000, judge=None,
                strict: bool = True) -> tuple[dict, list[dict], list]:
  """(metrics, scored items as dicts, skipped items) of a mixed list of raw items: EmoVerse (CES) items by
  `eval.emoverse`, the rest read by `eval.predictions` and scored by `eval.eemo_bench`."""
  ces = [i for i in items if i.get("question_type") == CES_TYPE]
  bench = [i for i in items if i.get("question_type") != CES_TYPE]
  metrics, scored, skipped = {}, [], []
  if bench:
    from eemo_jax.eval import eemo_bench, predictions
    loaded = predictions.read_predictions(bench, strict=strict)
    m, s = eemo_bench.score(loaded.items, n_resamples=n_resamples, judge=judge)
    metrics.update(m)
    scored += [predictions.to_item(p, model_name) for p in s]
    skipped += list(loaded.skipped)
  if ces:
    from eemo_jax.eval import emoverse
    m, s = emoverse.score(ces, model_name, n_resamples=n_resamples)
    metrics.update(m)
    scored += s
  return metrics, scored, skipped


def read_items(path: str) -> tuple[list[dict], str]:
  """A predictions file's raw items and its model (from the `response(MODEL)` keys)."""
  from eemo_jax.eval.predictions import load_items, model_of
  items = load_items(path)
  return items, model_of(items, str(path))


def evaluate_model(model: EvalModel, pcfg, settings: EvalSettings, *, out_dir: str, source=None, mesh=None,
                   progress_stream=None, judge=None, run_dir: str | None = None) -> EvalResult:
  """Generates, scores and writes `out_dir` (predictions.json, metrics.json, report.md, plots)."""
  stream = progress_stream if progress_stream is not None else sys.stderr
  bar = functools.partial(_progress, stream=stream, started=time.time())
  items, seconds = generate_predictions(model, pcfg, settings, source=source, mesh=mesh, progress=bar)
  stream.write("\n")
  metrics, scored, _ = score_items(items, model.name, n_resamples=settings.n_resamples, judge=judge)
  from eemo_jax.eval.output import write_outputs
  write_outputs(out_dir, scored, metrics, model=model.name,
                extra={"examples": len(items), "generation_seconds": seconds,
                       "examples_per_second": len(items) / seconds if seconds else float("nan")}, run_dir=run_dir)
  return EvalResult(items=scored, metrics=metrics, seconds=seconds, examples=len(items))


def _progress(done: int, total: int, *, stream, started: float) -> None:
  elapsed = time.time() - started
  rate = done / elapsed if elapsed else 0.0
  stream.write(f"\r  evaluated {done}/{total} ({rate:.1f}/s)")
  stream.flush()

