"""Evaluation: EEmo-Bench and EmoVerse scoring, batched generation over built splits, reports and plots, predict."""

import os

# The EEmo-Bench annotations, cross-domain test sets and two leaderboard evaluation files (data/eemo_bench/README.md).
BENCH_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "eemo_bench")
