"""The local open-ended judge: the benchmark's prompt, five sampled replies per answer, ratings read from them,
and description scores computed from the ratings it gives."""

from __future__ import annotations

import numpy as np
import pytest

from eemo_jax.eval import eemo_bench, judge, predictions
from eval_fixtures import export_tiny_model


@pytest.mark.parametrize("reply,rating", [
    ("Score: 2", 2), ("Score:1", 1), ("score: 0", 0), ("2", 2), ("The response partly matches. Score: 1", 1),
    ("Score: 3", 0), ("I cannot judge this.", 0), ("", 0), ("Score: 2\nScore: 1", 1),
])
def test_a_reply_gives_its_rating_or_zero(reply, rating):
  assert judge.parse_rating(reply) == rating


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  from eemo_jax.eval.loading import load_eval_model
  return load_eval_model(hf_dir=export_tiny_model(str(tmp_path_factory.mktemp("judge") / "export"), with_head=False))


def test_a_local_model_rates_five_times_with_the_benchmarks_prompt(model, monkeypatch):
  seen = []
  real = judge.prompting.encode_prompt

  def spy(messages, *args, **kwargs):
    seen.append(messages)
    return real(messages, *args, **kwargs)

  monkeypatch.setattr(judge.prompting, "encode_prompt", spy)
  rater = judge.ModelJudge(model, max_new_tokens=4)
  replies = rater.replies("Why is it sad?", "The rain.", "Because of the rain.")
  assert len(replies) == 5 and all(isinstance(r, str) for r in replies)
  assert len(set(replies)) > 1  # five samples, not one reply five times
  ratings = rater("Why is it sad?", "The rain.", "Because of the rain.")
  assert len(ratings) == 5 and set(ratings) <= {0, 1, 2}
  (system, user) = seen[0]
  assert system["content"] == judge.JUDGE_SYSTEM
  assert user["content"].startswith("Given the question [Why is it sad?], evaluate whether the response "
                                    "[Because of the rain.] completely matches the correct answer [The rain.].")
  assert user["content"].endswith("Please only provide the result in the following format: Score:")


def test_description_scores_come_from_the_judges_ratings():
  items = [{"id": k, "question": f"q{k}", "correct_answer": f"a{k}", "question_type": "Open_ended",
            "describing_dimension": "Detailed comparison", "image1_url": "1.jpg", "image2_url": "2.jpg",
            "response(m)": f"r{k}"} for k in range(3)]
  ratings = {"r0": (2, 2, 2, 2, 2), "r1": (1, 0, 1, 0, 1), "r2": (0, 0, 0, 0, 1)}
  loaded = predictions.read_predictions(items)
  metrics, scored = eemo_bench.score(loaded.items, judge=lambda q, ref, resp: ratings[resp], n_resamples=20)
  expected = np.mean([10 / 10, 3 / 10, 1 / 10])
  assert metrics["description.pair.detailed_comparison.score"] == pytest.approx(expected)
  assert metrics["description.pair.overall.score"] == pytest.approx(expected)
  assert [p.judged for p in scored] == [ratings["r0"], ratings["r1"], ratings["r2"]]


def test_an_item_without_a_reference_answer_is_left_unjudged():
  from data_pipeline.bench_records import NO_REFERENCE_ANSWER
  item = {"id": 1, "question": "q", "correct_answer": NO_REFERENCE_ANSWER, "question_type": "Open_ended",
          "describing_dimension": "Detailed description", "image1_url": "1.jpg", "response(m)": "r"}
  calls = []
  metrics, _ = eemo_bench.score(predictions.read_predictions([item]).items, n_resamples=10,
                                judge=lambda *a: calls.append(a) or (2, 2, 2, 2, 2))
  assert not calls and metrics["description.single.unjudged"] == 1 and metrics["description.single.n"] == 0
