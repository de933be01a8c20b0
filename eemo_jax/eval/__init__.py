"""Evaluation: EEmo-Bench and EmoVerse scoring, batched generation over built splits, reports and plots, predict."""
