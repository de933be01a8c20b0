"""Prediction files: the authors' leaderboard files read as they are, malformed items named by id and field
(raised, or skipped and listed), and our written files read back to the same items."""

import json
from pathlib import Path

import pytest

from data_pipeline.errors import DatasetError, InvalidFieldError, MissingFieldError, RecordError
from eemo_jax.eval import BENCH_DATA, eemo_bench, predictions

LEADERBOARD = Path(BENCH_DATA) / "leaderboard"
GPT4O = LEADERBOARD / "EEmo-Bench(gpt-4o-pair).json"
QWEN2 = LEADERBOARD / "EEmo-Bench(qwen2-7b-pair).json"
needs_leaderboard = pytest.mark.skipif(not GPT4O.exists(), reason="the EEmo-Bench leaderboard files are not here")

CHOICE = {"id": 7, "image1_url": "1.jpg", "question": "Which emotion?", "options": "{'A': 'Joy', 'B': 'Fear'}",
          "correct_answer": "B", "question_type": "What/How", "perceptual_dimension": "Emotion perception",
          "question_concern": "Similarity perception", "response(m)": "B: Fear.", "eval_result(m)": 1}
OPEN = {"id": 8, "image1_url": "1.jpg", "image2_url": "2.jpg", "question": "Why?", "correct_answer": "Because.",
        "question_type": "Open_ended", "describing_dimension": "Valence comparison", "response(m)": "It is sad.",
        "eval_result(m)": ["2", "1", "0", "2", "2"]}
RANKING = {"id": 9, "image1_url": "1.jpg", "question": "Rank.", "options": ["anger", "joy", "fear", "sadness"],
           "correct_answer": ["joy", "fear", "anger"], "question_type": "Ranking",
           "response(m)": "<answer>Emotion ranking: joy,anger,fear</answer>"}
ASSESS = {"id": 10, "image1_url": "1.jpg", "question": "Valence?", "question_type": "Assessment",
          "assessment_dimension": "valence", "correct_answer": 0.625, "response(m)": "0.7", "level_score(m)": 0.55}
DOMINANT = {"id": 11, "image1_url": "1.jpg", "question": "Dominant?", "question_type": "Dominant",
            "dataset": "artphoto", "options": ["Anger", "Sad", "Fear", "Awe"], "correct_answer": "sad",
            "response(m)": "<answer>Dominant emotion: Sad</answer>"}


@needs_leaderboard
def test_reads_the_authors_files():
  file = predictions.read_predictions(GPT4O)
  assert file.model == "gpt-4o" and len(file.items) == 2312 and file.skipped == ()
  first = file.items[0]
  raw = json.loads(GPT4O.read_text())[0]
  assert first.options == {"A": "No.", "B": "Yes."}  # the string "{'A': 'No.', 'B': 'Yes.'}" read as a literal
  assert (first.id, first.correct_answer, first.response, first.judged) == (0, "B", raw["response(gpt-4o)"], 1)
  assert first.setting == "pair" and first.images == ("579.jpg", "100.jpg")
  assert first.extra["image1_label"] == raw["image1_label"]
  open_ended = next(p for p in file.items if p.question_type == "Open_ended")
  assert open_ended.judged == (2, 2, 2, 2, 2) and open_ended.describing_dimension == "Valence comparison"


@needs_leaderboard
def test_the_authors_malformed_item_is_named_or_skipped():
  """Item 220 of the Qwen2-VL file is a What/How question with five ratings as its verdict."""
  with pytest.raises(InvalidFieldError) as info:
    predictions.read_predictions(QWEN2)
  assert (info.value.record_id, info.value.field) == ("220", "eval_result(qwen2-7b)")
  file = predictions.read_predictions(QWEN2, strict=False)
  assert len(file.items) == 2311 and [(s.id, s.field) for s in file.skipped] == [(220, "eval_result(qwen2-7b)")]


def test_reads_every_question_type():
  file = predictions.read_predictions([CHOICE, OPEN, RANKING, ASSESS, DOMINANT])
  choice, open_ended, ranking, assess, dominant = file.items
  assert file.model == "m" and choice.options == {"A": "Joy", "B": "Fear"} and choice.setting == "single"
  assert open_ended.judged == (2, 1, 0, 2, 2) and open_ended.setting == "pair"
  assert ranking.options == ("anger", "joy", "fear", "sadness") and ranking.correct_answer == ("joy", "fear", "anger")
  assert (assess.correct_answer, assess.level_score, assess.assessment_dimension) == (0.625, 0.55, "valence")
  assert dominant.correct_answer == "Sad" and dominant.dataset == "artphoto"  # in the options' spelling


@pytest.mark.parametrize("item,field", [
    ({**CHOICE, "id": None}, "id"),
    ({**CHOICE, "question_type": "Essay"}, "question_type"),
    ({**CHOICE, "options": "{'A': 'Joy', 'B': 'Fear'"}, "options"),  # not a literal
    ({**CHOICE, "options": "__import__('os').getcwd()"}, "options"),  # never evaluated
    ({**CHOICE, "options": {"A": "Joy"}}, "options"),
    ({**CHOICE, "correct_answer": "C"}, "correct_answer"),
    ({**CHOICE, "eval_result(m)": 2}, "eval_result(m)"),
    ({**CHOICE, "response(m)": 3}, "response(m)"),
    ({k: v for k, v in CHOICE.items() if k != "response(m)"}, "response(m)"),
    ({**OPEN, "eval_result(m)": ["2", "1", "0", "2"]}, "eval_result(m)"),
    ({**OPEN, "eval_result(m)": [2, 1, 0, 2, 3]}, "eval_result(m)"),
    ({k: v for k, v in OPEN.items() if k != "describing_dimension"}, "describing_dimension"),
    ({**RANKING, "correct_answer": ["joy", "fear"]}, "correct_answer"),
    ({**RANKING, "correct_answer": ["joy", "joy", "fear"]}, "correct_answer"),
    ({**ASSESS, "correct_answer": 6.5}, "correct_answer"),  # a SAM rating, not rescaled
    ({**ASSESS, "assessment_dimension": "mood"}, "assessment_dimension"),
    ({**ASSESS, "level_score(m)": "high"}, "level_score(m)"),
    ({**DOMINANT, "correct_answer": "joy"}, "correct_answer"),
    ({k: v for k, v in DOMINANT.items() if k != "dataset"}, "dataset"),
])
def test_a_malformed_item_names_its_id_and_field(item, field):
  good = {**CHOICE, "id": 1}
  with pytest.raises(RecordError) as info:
    predictions.read_predictions([good, item])
  expected_id = "#1" if item.get("id") is None else str(item["id"])
  assert (info.value.record_id, info.value.field) == (expected_id, field)
  assert expected_id in str(info.value) and field in str(info.value)
  file = predictions.read_predictions([good, item], strict=False)
  assert [p.id for p in file.items] == [1] and [s.field for s in file.skipped] == [field]


def test_missing_response_is_a_missing_field():
  with pytest.raises(MissingFieldError):
    predictions.read_predictions([CHOICE, {k: v for k, v in CHOICE.items() if k != "response(m)"}])


@pytest.mark.parametrize("source,message", [
    ({"id": 1}, "not a list of items"),
    ([CHOICE, {**CHOICE, "response(other)": "A"}], "one model"),
    ([{k: v for k, v in CHOICE.items() if k != "response(m)"}], "no item has one"),
])
def test_a_malformed_file_says_what_to_fix(source, message):
  with pytest.raises(DatasetError, match=message):
    predictions.read_predictions(source)


def test_unreadable_file(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text("[{")
  with pytest.raises(DatasetError, match="broken.json"):
    predictions.read_predictions(path)


def test_scored_file_reads_back_to_the_same_items(tmp_path):
  file = predictions.read_predictions([CHOICE, OPEN, RANKING, ASSESS, DOMINANT, {**CHOICE, "id": 12,
                                                                                 "response(m)": "no idea"}])
  _, scored = eemo_bench.score(file, n_resamples=10)
  path = tmp_path / "scored.json"
  predictions.write_predictions(path, scored, file.model)
  written = json.loads(path.read_text())
  assert written[0]["parsed(m)"] == "B" and written[0]["correct(m)"] == 1
  assert written[2]["parsed(m)"] == ["joy", "anger", "fear"] and written[2]["correct(m)"] == 1  # top-1 hit
  assert written[3]["parsed(m)"] == 0.7 and "correct(m)" not in written[3]
  assert written[5]["parsed(m)"] is None and written[5]["correct(m)"] == 0  # unparsed: wrong
  assert "parsed(m)" not in written[1]  # open-ended: rated, not parsed
  assert predictions.read_predictions(path).items == tuple(scored)


def test_write_needs_a_model(tmp_path):
  with pytest.raises(ValueError, match="model"):
    predictions.write_predictions(tmp_path / "x.json", predictions.read_predictions([CHOICE]).items)
