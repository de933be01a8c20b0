#!/usr/bin/env python
"""Issue 14: GRPO rewards for a mixed batch, parsed once and scored by jitted `jnp` rewards, against plain
Python loops that compute the same rewards one completion at a time.

    python benchmarks/reward_throughput.py [--rows 8192] [--group 8] [--repeats 7] [--json out.json]

The batch: rows / group prompts of EEmo-Logic's five task types in turn (yes/no, multiple choice, dominant
emotion over all five option sets, emotion ranking over EEmo-Bench's 7 emotions and Mikels-8, and V/A/D
scores, three dimensions), `group` completions each, drawn with a fixed seed: a think of 40-120 words, then
right answers, wrong ones, other spellings (synonyms, plurals, option texts) and malformed ones (no tags, two
answers, "0.7.5", the "response" format, trailing text, 2,000 characters of noise). The config is the
authors' pair of summed rewards: `format` and the task reward (`eemo_task`, threshold score reward).

Contestants, all giving the same (N, 2) reward matrix (checked before timing):
  jax        `parsing.parse_completions` once, then `rewards.compute_rewards` (one jitted call, with metrics);
             `prepare` (each prompt's `Question` and `GroundTruth`, once per prompt, then repeated per group)
             is timed apart and included in the whole path; each loop likewise builds its rows' truth (the
             prompt's `Question` and answer) inside its timed call.
  authors    the authors' structure (EEmo-Logic grpo_emotion.py under TRL): one Python function per reward,
             each looping over the completions and parsing each one itself; the dominant-emotion reward loads
             the reward-matrix JSON for every completion (their `get_reward` opens `reward_matrix_1.json`
             per call; here the same five matrices, written to a temporary file), and the ranking reward
             calls `scipy.stats.kendalltau` per completion (their `thinking_consistancy.py`, on positions).
  lean       the fastest plain loop we could write: one pass, each completion parsed once, matrices loaded
             once, Kendall's tau by hand.
Every loop uses the project's one parser (`data_pipeline.tasks`), so the values agree exactly.

Timing: interleaved rounds (model_throughput.race: rotating order, rounds disturbed by other processes
redone), medians, and the paired per-round ratio with a bootstrap 90% interval. The jitted rewards alone are
timed with the inputs already on the device (median of many calls).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import model_throughput as mt  # noqa: E402
from data_pipeline import tasks  # noqa: E402

TARGETS = {"whole_path_vs_authors_loop": 10.0, "jitted_ms_per_8192_rows": 1.0}
TASK_CYCLE = ("yes_no", "multiple_choice", "dominant_emotion", "emotion_ranking", "valence", "arousal", "dominance")
SPECS = ("format", "eemo_task")
WORDS = ("the sky is grey and the street is empty while a figure waits under a dim lamp light colours shapes "
         "mood evoke calm tension warmth distance storm meadow child laughter shadow").split()

# ------------------------------------------------------------------------------------------ the batch


def make_prompts(count: int, rng: np.random.Generator) -> list[dict]:
  """Feature-style EEmo records (what `data_pipeline.records` stores), the five task types in turn."""
  sets = list(tasks.OPTION_SETS)
  records = []
  for i in range(count):
    task = TASK_CYCLE[i % len(TASK_CYCLE)]
    record = {"id": f"p{i}", "task": task, "question": "How does the image feel?", "options": (), "choice": "",
              "emotion": "", "ranking": (), "option_set": "", "scores": np.full(3, np.nan, np.float32)}
    if task == "yes_no":
      record.update(options=("No", "Yes") if rng.random() < 0.5 else ("Yes", "No"), choice="AB"[rng.integers(2)])
    elif task == "multiple_choice":
      k = int(rng.integers(3, 5))
      record.update(options=tuple(rng.choice(tasks.EKMAN_7, k, replace=False)), choice="ABCD"[rng.integers(k)])
    elif task == "dominant_emotion":
      name = sets[(i // len(TASK_CYCLE)) % len(sets)]
      record.update(option_set=", ".join(tasks.OPTION_SETS[name]),
                    emotion=str(rng.choice(tasks.OPTION_SETS[name])).lower())
    elif task == "emotion_ranking":
      words = tasks.EKMAN_7 if rng.random() < 0.5 else tasks.MIKELS_8_FI
      record.update(option_set="" if words is tasks.EKMAN_7 else ", ".join(words),
                    ranking=tuple(rng.choice(words, 3, replace=False)))
    else:
      record["scores"][tasks.VAD_DIMENSIONS.index(task)] = round(float(rng.random()), 4)
    records.append(record)
  return records


def make_completion(record: dict, rng: np.random.Generator) -> str:
  think = " ".join(rng.choice(WORDS, int(rng.integers(40, 121))))
  kind = rng.random()
  if kind < 0.02:
    return "".join(rng.choice(list("abc <>/:,.0123456789\n"), 2000))
  value = answer_value(record, rng)
  body = f"{tasks.ANSWER_KEYS[record['task']]}: {value}"
  if kind < 0.05:
    return f"{think} {body}"  # no tags
  if kind < 0.08:
    return f"<think>{think}</think><answer>{body}</answer><answer>{answer_value(record, rng)}</answer>"
  if kind < 0.10:
    return f"<think>{think}</think> response {rng.choice(tasks.EKMAN_7)}"
  if kind < 0.12:
    return f"<think>{think}</think><answer>{body}</answer> I hope this helps."
  return f"<think>{think}</think><answer>{body}</answer>"


def answer_value(record: dict, rng: np.random.Generator) -> str:
  task, right = record["task"], rng.random() < 0.45
  if task in ("yes_no", "multiple_choice"):
    letters = "ABCD"[:len(record["options"])]
    letter = record["choice"] if right else str(rng.choice(list(letters)))
    return record["options"][letters.index(letter)] if rng.random() < 0.2 else letter
  if task == "dominant_emotion":
    words = record["option_set"].split(", ")
    word = record["emotion"] if right else str(rng.choice(words))
    return rng.choice([word, word.upper(), word + "s", word.capitalize() + ".", "Neutrality", "Shock", "calm"],
                      p=[0.55, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05])
  if task == "emotion_ranking":
    words = record["option_set"].split(", ") if record["option_set"] else list(tasks.EKMAN_7)
    ranking = list(record["ranking"]) if right else list(rng.choice(words, 3, replace=False))
    if rng.random() < 0.3:
      ranking = list(rng.permutation(ranking))
    if rng.random() < 0.1:
      ranking[2] = ranking[0]  # a repeat
    return ", ".join(ranking)
  true = float(np.nanmax(record["scores"]))
  score = min(max(true + float(rng.normal(0, 0.15)), 0.0), 1.0)
  return rng.choice([f"{score:.4f}", "0.7.5", "1.2", f"{score:.2f}"], p=[0.85, 0.05, 0.05, 0.05])


# ------------------------------------------------------------------------------------------ the loops


def loop_truth(records: list[dict], group: int):
  """Per completion: its Question and the truth as Python values (what a reward function gets in kwargs)."""
  from eemo_jax.rl import parsing
  rows = []
  for record in records:
    q = parsing.question(record)
    answer = tasks.eemo_answer(record)
    rows += [(q, answer)] * group
  return rows


def authors_format_reward(completions: list[str]) -> list[float]:
  return [1.0 if tasks.is_well_formed(text) else 0.0 for text in completions]


def authors_task_reward(completions: list[str], truth: list, matrix_path: str) -> list[float]:
  """One completion at a time, as the authors' reward functions are written (see the module docstring)."""
  from scipy.stats import kendalltau
  out = []
  for text, (q, answer) in zip(completions, truth):
    task = q.task
    if task in ("yes_no", "multiple_choice"):
      out.append(float(tasks.parse_answer(text, task, options=q.options) == answer))
    elif task == "dominant_emotion":
      with open(matrix_path, encoding="utf-8") as f:  # get_reward: json.load(open(reward_database_path))
        database = json.load(f)
      predicted = tasks.parse_answer(text, task, options=q.options)
      matrix = database[", ".join(q.options)]
      out.append(0.0 if predicted is None else matrix[q.options.index(tasks.match_emotion(answer, q.options))][
          q.options.index(predicted)])
    elif task == "emotion_ranking":
      predicted = tasks.parse_answer(text, task, options=q.options, partial=True) or ()
      truth_names = [tasks.match_emotion(a, q.options) for a in answer]
      hit = sum((25, 15, 10)[i] for i, e in enumerate(truth_names) if e in predicted)
      shared = [e for e in truth_names if e in predicted]
      kendall = 0.0
      if len(shared) > 1:
        tau = kendalltau([truth_names.index(e) for e in shared], [predicted.index(e) for e in shared]).statistic
        kendall = 25 * (tau + 1) * (1.0 if len(shared) == 3 else 2 / 3)
      out.append(((hit + kendall) / 100) ** 2)
    else:
      predicted = tasks.parse_answer(text, task)
      out.append(0.0 if predicted is None else float(abs(np.float32(predicted) - np.float32(answer))
                                                      < np.float32(0.0875)))
  return out


def lean_loop(completions: list[str], truth: list, matrices: dict) -> list[tuple[float, float]]:
  out = []
  for text, (q, answer) in zip(completions, truth):
    task = q.task
    fmt = 1.0 if tasks.is_well_formed(text) else 0.0
    if task in ("yes_no", "multiple_choice"):
      value = float(tasks.parse_answer(text, task, options=q.options) == answer)
    elif task == "dominant_emotion":
      predicted = tasks.parse_answer(text, task, options=q.options)
      value = 0.0 if predicted is None else float(matrices[q.options][
          q.options.index(tasks.match_emotion(answer, q.options)), q.options.index(predicted)])
    elif task == "emotion_ranking":
      predicted = tasks.parse_answer(text, task, options=q.options, partial=True) or ()
      truth_names = [tasks.match_emotion(a, q.options) for a in answer]
      hit = sum((25, 15, 10)[i] for i, e in enumerate(truth_names) if e in predicted)
      shared = [e for e in truth_names if e in predicted]
      kendall = 0.0
      if len(shared) > 1:
        pairs = [(a, b) for k, a in enumerate(shared) for b in shared[k + 1:]]
        concordant = sum(predicted.index(a) < predicted.index(b) for a, b in pairs)
        kendall = 25 * ((2 * concordant - len(pairs)) / len(pairs) + 1) * (1.0 if len(shared) == 3 else 2 / 3)
      value = ((hit + kendall) / 100) ** 2
    else:
      predicted = tasks.parse_answer(text, task)
      value = 0.0 if predicted is None else float(abs(np.float32(predicted) - np.float32(answer)) < np.float32(0.0875))
    out.append((fmt, value))
  return out


# ------------------------------------------------------------------------------------------ main


def summary(seconds: list[float]) -> dict:
  """Median, spread and, for the long contestants' few rounds, every time."""
  out = {"median": statistics.median(seconds), "min": min(seconds), "p10": float(np.quantile(seconds, 0.1)),
         "p90": float(np.quantile(seconds, 0.9)), "rounds": len(seconds)}
  return {**out, "all": seconds} if len(seconds) <= 100 else out


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} CPUs, " \
           f"{fields.get('Vendor ID', '?').strip()} family {fields.get('CPU family', '?').strip()} " \
           f"model {fields.get('Model', '?').strip()})"
  except OSError:
    return platform.processor() or "?"


def provenance() -> dict:
  h = hashlib.sha256()
  for path in ("eemo_jax/rl/parsing.py", "eemo_jax/rl/rewards.py", "data_pipeline/tasks.py"):
    with open(os.path.join(ROOT, path), "rb") as f:
      h.update(path.encode() + b"\0" + f.read())
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
  return {"git_head": head, "sources_sha256": h.hexdigest()[:16]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", type=int, default=8192)
  p.add_argument("--group", type=int, default=8)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--jit-seconds", type=float, default=3.0, help="time spent timing the jitted rewards alone")
  p.add_argument("--jit-repeats", type=int, default=50, help="rounds of the jitted rewards alone, at least")
  p.add_argument("--wait-idle", type=float, default=0.0)
  p.add_argument("--max-foreign", type=float, default=mt.MAX_FOREIGN)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  mt.WAIT_IDLE_S, mt.MAX_FOREIGN = args.wait_idle, args.max_foreign
  sources = provenance()  # of the code that runs, read before anything is timed

  import jax
  from eemo_jax.rl import parsing, rewards

  rng = np.random.default_rng(args.seed)
  prompts = make_prompts(args.rows // args.group, rng)
  rows = len(prompts) * args.group
  texts = [make_completion(record, rng) for record in prompts for _ in range(args.group)]
  specs = rewards.reward_specs(list(SPECS))
  matrices = {tasks.OPTION_SETS[n]: rewards.dominant_reward_matrix(tasks.OPTION_SETS[n]) for n in tasks.OPTION_SETS}
  folder = tempfile.mkdtemp(prefix="reward_bench_")
  matrix_path = os.path.join(folder, "reward_matrix_1.json")
  with open(matrix_path, "w", encoding="utf-8") as f:
    json.dump({", ".join(words): m.tolist() for words, m in matrices.items()}, f, indent=4)

  def prepare():
    questions = [q for q in parsing.questions(prompts) for _ in range(args.group)]
    return questions, rewards.GroundTruth.from_records(prompts).repeat(args.group)

  questions, truth = prepare()
  parsed = parsing.parse_completions(texts, questions)

  def jax_path():
    qs, gt = prepare()
    matrix, metrics = rewards.compute_rewards(parsing.parse_completions(texts, qs), gt, specs)
    return jax.block_until_ready((matrix, metrics))

  def authors():  # each loop builds its rows' truth from the prompts, as `prepare` does for the jitted path
    rows_truth = loop_truth(prompts, args.group)
    return np.array([authors_format_reward(texts), authors_task_reward(texts, rows_truth, matrix_path)]).T

  def lean():
    return np.array(lean_loop(texts, loop_truth(prompts, args.group), matrices))

  # The three give the same matrix.
  ours = np.asarray(jax_path()[0], np.float64)
  assert not np.isnan(ours).any()  # every row here has a task reward
  for name, fn in (("authors", authors), ("lean", lean)):
    np.testing.assert_allclose(ours, fn(), rtol=1e-6, atol=1e-7, err_msg=name)
  print(f"{rows} rows: the jitted rewards equal both Python loops (rtol 1e-6)", flush=True)

  tasks_count = {t: int(np.sum(truth.task == i)) for i, t in enumerate(rewards.TASKS) if np.any(truth.task == i)}
  parsed_device = jax.device_put(parsed)
  truth_device = jax.device_put(truth)

  def jitted():
    return jax.block_until_ready(rewards.compute_rewards(parsed_device, truth_device, specs))

  def jitted_from_host():
    return jax.block_until_ready(rewards.compute_rewards(parsed, truth, specs))

  jitted_from_host()  # compiled in the check above
  t0 = time.perf_counter()
  jitted()  # device-resident inputs are another jit cache entry (committed arrays): compiled here, untimed
  print(f"first call with inputs on the device (compiles): {1e3 * (time.perf_counter() - t0):.1f} ms", flush=True)
  compiled_before = rewards.compiled_variants()
  # Sub-millisecond calls: many rounds, disturbed ones redone without waiting for an idle machine each time.
  mt.WAIT_IDLE_S = 0.0
  small = mt.race({"jitted": jitted, "jitted_from_host": jitted_from_host}, repeats=args.jit_repeats, warmup=3,
                  min_seconds=args.jit_seconds)
  mt.WAIT_IDLE_S = args.wait_idle
  big = mt.race({"prepare": prepare, "parse": lambda: parsing.parse_completions(texts, questions),
                 "jax_path": jax_path, "authors_loop": authors, "lean_loop": lean}, repeats=args.repeats)
  assert rewards.compiled_variants() == compiled_before, "the timed calls recompiled"

  med = {name: statistics.median(xs) for name, xs in {**small, **big}.items()}
  result = {
      "issue": 14, "rows": rows, "group": args.group, "prompts": len(prompts), "rewards": list(SPECS),
      "tasks": tasks_count, "machine": cpu_model(), "python": platform.python_version(), "jax": jax.__version__,
      "backend": jax.default_backend(), **sources,
      "seconds": {name: summary(xs) for name, xs in {**small, **big}.items()},
      "parse_us_per_completion": 1e6 * med["parse"] / rows,
      "prepare_us_per_prompt": 1e6 * med["prepare"] / len(prompts),
      "jitted_ms": 1e3 * med["jitted"], "jitted_from_host_ms": 1e3 * med["jitted_from_host"],
      "jitted_ms_per_8192_rows": 1e3 * med["jitted"] * 8192 / rows,
      "authors_loop_us_per_completion": 1e6 * med["authors_loop"] / rows,
      "lean_loop_us_per_completion": 1e6 * med["lean_loop"] / rows,
      "ratio_vs_authors_loop": med["authors_loop"] / med["jax_path"],
      "ratio_vs_lean_loop": med["lean_loop"] / med["jax_path"],
      "paired_ratio_vs_authors_loop": mt.paired_ratio(big["authors_loop"], big["jax_path"]),
      "paired_ratio_vs_lean_loop": mt.paired_ratio(big["lean_loop"], big["jax_path"]),
      "foreign_cpu": mt.FOREIGN_CPU,
      "targets": TARGETS,
  }
  result["ok"] = {"whole_path_vs_authors_loop": result["paired_ratio_vs_authors_loop"]["low"]
                  >= TARGETS["whole_path_vs_authors_loop"],
                  "jitted_ms_per_8192_rows": result["jitted_ms_per_8192_rows"] <= TARGETS["jitted_ms_per_8192_rows"]}
  print(f"\nmachine: {result['machine']}; jax {jax.__version__} on {jax.default_backend()}")
  print(f"batch: {rows} completions ({len(prompts)} prompts x {args.group}), tasks {tasks_count}")
  print(f"{'contestant':<22}{'median ms':>12}{'min ms':>10}{'us/completion':>16}")
  for name in ("prepare", "parse", "jitted", "jitted_from_host", "jax_path", "authors_loop", "lean_loop"):
    xs = {**small, **big}[name]
    print(f"{name:<22}{1e3 * med[name]:>12.3f}{1e3 * min(xs):>10.3f}{1e6 * med[name] / rows:>16.2f}")
  for loop in ("authors", "lean"):
    paired = result[f"paired_ratio_vs_{loop}_loop"]
    print(f"whole path vs {loop} loop: {result[f'ratio_vs_{loop}_loop']:.1f}x (paired {paired['median']:.1f}x, "
          f"90% [{paired['low']:.1f}, {paired['high']:.1f}])")
  print(f"jitted rewards: {result['jitted_ms_per_8192_rows']:.3f} ms per 8192 rows (target <= 1 ms); "
        f"targets met: {result['ok']}; foreign CPU {mt.FOREIGN_CPU}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x))
  return 0


if __name__ == "__main__":
  sys.exit(main())
