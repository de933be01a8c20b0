"""`eemo-jax eval`: score a benchmark predictions file, or run a model over a built split and score it.

    eemo-jax eval --predictions "EEmo-Bench(gpt-4o-pair).json" --out runs/eval/gpt4o
    eemo-jax eval --config configs/eemo_bench_eval.py --hf-dir /models/eemo-logic-7b --out runs/eval/single \\
        --config.data.data_dir=/data --config.data.dataset_config=single
    eemo-jax eval --config configs/tiny_demo.py --hf-dir runs/demo/export --out runs/demo/eval

With `--config`, the model is `--hf-dir` or `--checkpoint` (an `import-hf` checkpoint, a run directory for its
newest step, or RUN_DIR/checkpoints/N) when given, else the config's export (`train.export_dir`), else the newest
checkpoint of its run (`train.run_dir`: a run stopped before its export), else `model.hf_dir`; the records are the
config's data set, split `eval.split`.
`--out` receives metrics.json (flat dotted names), report.md, the plots and predictions.json (the
leaderboard format, every item scored). Exit 0 done, 2 something to fix (one line on stderr).
"""

from __future__ import annotations

import sys


def add_arguments(parser, name):
  del name
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--predictions", metavar="FILE", help="a predictions file in the benchmark's leaderboard format")
  source.add_argument("--config", metavar="FILE[:ARG]", help="an experiment config: its data set and split")
  parser.add_argument("--out", required=True, metavar="DIR", help="where metrics.json, report.md and plots go")
  parser.add_argument("--hf-dir", metavar="DIR", help="the model as an HF folder (with the head files if any)")
  parser.add_argument("--checkpoint", metavar="DIR", help="the model as an `eemo-jax import-hf` checkpoint, or a "
                      "training run: RUN_DIR (its newest checkpoint) or RUN_DIR/checkpoints/N")
  parser.add_argument("--tokenizer-dir", metavar="DIR", help="tokenizer.json folder (default: the model's)")
  parser.add_argument("--max-new-tokens", type=int, default=512, help="generation length per answer (512)")
  parser.add_argument("--batch-size", type=int, default=0, help="prompts per generation batch (train.global_batch_size)")
  parser.add_argument("--limit", type=int, default=0, help="evaluate the first N records only")
  parser.add_argument("--no-level-scores", action="store_true", help="skip the V/A/D level-probability forward")
  parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
  parser.add_argument("--run-dir", metavar="DIR", help="a training run directory: plot its metrics.jsonl curves")
  parser.add_argument("--strict", action="store_true", help="a malformed item in --predictions stops the run")
  parser.add_argument("--judge-hf-dir", metavar="DIR", help="a local model (HF folder) that rates open-ended answers "
                      "without ratings, five times each, with the benchmark's judge prompt (eemo_jax/eval/judge.py)")
  parser.epilog = "With --config, override any config field with --config.section.key=value."


def run(args) -> int:
  from eemo_jax import status
  from eemo_jax.commands.train import user_errors
  from eemo_jax.eval.loading import ModelSourceError
  try:
    with status.printed():  # the weights read, one line per file
      summary = _from_file(args) if args.predictions else _from_model(args)
  except (ModelSourceError, *user_errors()) as error:
    print(f"eemo-jax eval: {error}", file=sys.stderr)
    return 2
  if summary is None:
    return 2
  print(summary)
  return 0


def _from_file(args) -> str:
  from eemo_jax.eval.output import headline, write_outputs
  from eemo_jax.eval.run import read_items, score_items
  items, model = read_items(args.predictions)
  metrics, scored, skipped = score_items(items, model, n_resamples=args.bootstrap, strict=args.strict,
                                         judge=_judge(args))
  paths = write_outputs(args.out, scored, metrics, model=model, extra={"skipped_items": len(skipped)},
                        run_dir=args.run_dir)
  for s in skipped:
    print(f"eemo-jax eval: skipped item {s.id}: {s.message}", file=sys.stderr)
  return f"scored {len(scored)} items of {model}\n{headline(metrics)}\nreport: {paths['report']}"


def _default_model(config) -> tuple[str | None, str | None]:
  """(hf_dir, checkpoint) of the config's own model: its export when written, else its run's newest checkpoint
  (a run stopped before its end), else `model.hf_dir`; a `ConfigError` saying what to pass when none exists."""
  from eemo_jax import paths
  from eemo_jax.config import ConfigError
  from eemo_jax.train.saved_run import is_run_dir
  export, run_dir = config.train.export_dir, config.train.run_dir
  if export and paths.exists(paths.join(export, "config.json")):
    return export, None
  if run_dir and paths.isdir(run_dir) and is_run_dir(run_dir):
    return None, run_dir
  if config.model.hf_dir:
    return config.model.hf_dir, None
  raise ConfigError("no model to evaluate: pass --hf-dir or --checkpoint (the config names no export that exists, "
                    "no run directory with checkpoints, and no model.hf_dir)")


def _from_model(args) -> str | None:
  import dataclasses

  from eemo_jax import paths
  from eemo_jax.config import config_from_args
  from eemo_jax.eval.loading import load_eval_model
  from eemo_jax.eval.output import headline
  from eemo_jax.eval.run import EvalSettings, evaluate_model
  from eemo_jax.parallel.sharding import make_mesh
  from eemo_jax.train import run as runlib
  from eemo_jax.host_memory import use_host_memory_for_cpu_steps
  config = config_from_args(args, "eval")
  if config is None:
    return None
  use_host_memory_for_cpu_steps()  # before the backend starts, as train and grpo
  hf_dir, checkpoint = args.hf_dir, args.checkpoint
  if hf_dir is None and checkpoint is None:
    hf_dir, checkpoint = _default_model(config)
  from data_pipeline.pipeline import PipelineConfig, load_source
  d = config.data  # the records are opened before minutes of weight loading, to fail first if they are not there
  load_source(PipelineConfig(dataset=d.dataset, data_dir=d.data_dir, split=config.eval.split,
                             dataset_config=d.dataset_config))
  mesh = make_mesh(dict(config.mesh.items()))
  model = load_eval_model(hf_dir=hf_dir, checkpoint=checkpoint,
                          tokenizer_dir=args.tokenizer_dir or config.data.tokenizer_dir or None,
                          dtype=config.model.dtype, mesh=mesh)
  pcfg = runlib.pipeline_config(config, model.backbone.config, split=config.eval.split, eval_mode=True)
  pcfg = dataclasses.replace(pcfg, tokenizer_dir=model.tokenizer_dir, batch_size=args.batch_size or pcfg.batch_size)
  settings = EvalSettings(max_new_tokens=args.max_new_tokens, limit=args.limit,
                          level_scores=not args.no_level_scores, n_resamples=args.bootstrap,
                          dataset=str(config.data.dataset_config or config.data.dataset))
  import jax
  with jax.set_mesh(mesh):
    result = evaluate_model(model, pcfg, settings, out_dir=args.out, mesh=mesh, run_dir=args.run_dir,
                            judge=_judge(args))
  return (f"evaluated {result.examples} records of {config.data.dataset}/{pcfg.split} with {model.name} in "
          f"{result.seconds:.1f} s ({result.examples_per_second:.2f}/s)\n{headline(result.metrics)}\n"
          f"report: {paths.join(paths.absolute(args.out), 'report.md')}")


def _judge(args):
  if not args.judge_hf_dir:
    return None
  from eemo_jax.eval.judge import ModelJudge
  from eemo_jax.eval.loading import load_eval_model
  return ModelJudge(load_eval_model(hf_dir=args.judge_hf_dir))
