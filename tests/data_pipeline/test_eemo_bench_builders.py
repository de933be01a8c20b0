"""The `eemo_bench` builder on the real EEmo-Bench / cross-domain annotation files, with tiny generated images.

Every image the files name is written as a small JPEG of its own size, so a record's image sizes say which
files it holds. Counts, labels and options are checked against the json files themselves, and a few items
against values read off the files by hand; bad items are built from copies of real ones with one field broken.
"""

import copy
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import bench_records, tasks
from data_pipeline.builders import build, load_records
from data_pipeline.errors import DatasetError, MissingFieldError
from data_pipeline.records import OPTION_SETS
from eemo_jax.eval import BENCH_DATA
from eemo_jax.rl import parsing

DATA = Path(BENCH_DATA)  # the annotations the package carries
FILES = {"single": "Ebench_single.json", "pair": "Ebench_pair.json", "artemis": "cross_domain_ArtEmis.json",
         "artphoto": "cross_domain_ArtPhoto.json"}


def _items(config):
  return json.loads((DATA / FILES[config]).read_text(encoding="utf-8"))


def _image_names(config, item):
  if config == "single":
    return [item["image_name"]]
  if config == "pair":
    return [item["image1_url"], item["image2_url"]]
  if config == "artemis":
    return [item["img_path"].replace("\\", "/")]  # "./test_dominant_images\\00000.jpg"
  return [item["image_path"]]


def _write_images(folder, names):
  """A JPEG per name, each of its own (width, height), so that sizes identify files."""
  sizes = {}
  for n, name in enumerate(sorted(names)):
    size = (8 + n % 90, 8 + n // 90 % 90)
    buffer = io.BytesIO()
    Image.new("RGB", size, (n % 256, 80, 160)).save(buffer, format="JPEG")
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    sizes[str(Path(name))] = size
  return sizes


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """All four configs built from the real files: config -> (report, {id: stored features}), image sizes."""
  root = tmp_path_factory.mktemp("bench")
  names = {name for config in FILES for item in _items(config) for name in _image_names(config, item)}
  sizes = _write_images(root / "images", names)
  built = {}
  for config in FILES:
    report = build("eemo_bench", root / "data", manual_dir=DATA, config=config, image_root=root / "images")
    source = load_records("eemo_bench", root / "data", "test", config=config)
    built[config] = (report, {f["id"]: f for f in source})
  return built, sizes


def _count(records):
  return Counter(f["task"] for f in records.values())


def test_counts_per_task_match_the_files(bench):
  built, _ = bench
  single, pair = _items("single"), _items("pair")
  open_single = sum(isinstance(i.get("open_ended_Q"), str) and bool(i["open_ended_Q"].strip()) for i in single)
  open_pair = sum(isinstance(i.get("open_ended_question"), str) and bool(i["open_ended_question"].strip())
                  for i in pair)
  labelled = sum(i["dominant_emotion"] != "something else" for i in _items("artemis"))
  assert (len(single), open_single, len(pair), open_pair, labelled) == (1960, 501, 1006, 300, 1920)  # README
  assert _count(built["single"][1]) == {"yes_no": 1960, "multiple_choice": 1960, "emotion_ranking": 1960,
                                         "valence": 1960, "arousal": 1960, "dominance": 1960, "open_ended": 501}
  assert _count(built["pair"][1]) == {"yes_no": 1006, "multiple_choice": 1006, "open_ended": 300}
  assert _count(built["artemis"][1]) == {"dominant_emotion": 1920}
  assert _count(built["artphoto"][1]) == {"dominant_emotion": 806}
  for config, (report, records) in built.items():
    assert report.written == {"test": len(records)} and report.num_skipped == 0, config


def test_every_record_holds_its_items_labels_and_images(bench):
  """Each item of each file against its records: options in the file's letters, answers, scores, images."""
  built, sizes = bench
  choice_fields = {"single": {"yes_no": ("judge_Q", "judge_A", "judge_answer"),
                              "multiple_choice": ("choose_Q", "choose_A", "choose_answer")},
                   "pair": {"yes_no": ("judge_question", "judge_options", "judge_answer"),
                            "multiple_choice": ("choose_question", "choose_options", "choose_answer")}}
  for config in FILES:
    by_item = {}
    for f in built[config][1].values():
      by_item.setdefault(f["id"].rsplit("/", 1)[0], {})[f["task"]] = f
    for index, item in enumerate(_items(config)):
      images = [sizes[str(Path(n))] for n in _image_names(config, item)]
      mine = by_item[f"{config}/{index}"]
      for task, f in mine.items():
        assert f["id"] == f"{config}/{index}/{task}" and f["source"] == f"{FILES[config]}#{index}"
        assert list(zip(f["widths"].tolist(), f["heights"].tolist())) == images and f["split"] == "test"
      for task, (question, options, answer) in choice_fields.get(config, {}).items():
        f = mine[task]
        assert f["question"] == item[question].strip() and f["choice"] == item[answer]
        assert dict(zip("ABCD", f["options"])) == {k: v.strip() for k, v in item[options].items()}
      if config == "single":
        assert tuple(mine["emotion_ranking"]["ranking"]) == tuple(e for e, _ in item["emotion_list"])
        for dim, key in (("valence", "Valence"), ("arousal", "Arousal"), ("dominance", "Dominance")):
          scores = mine[dim]["scores"]  # (3,) only this dimension's score is given
          assert scores[tasks.VAD_DIMENSIONS.index(dim)] == np.float32((item[key][0] - 1) / 8)
          assert np.isnan(scores).sum() == 2
      if config in ("artemis", "artphoto"):
        label = item["dominant_emotion" if config == "artemis" else "emotion"]
        assert tasks.match_emotion(mine["dominant_emotion"]["emotion"], (label,)) == label


def test_sampled_items_read_by_hand(bench):
  built, sizes = bench
  single, pair = built["single"][1], built["pair"][1]
  artemis, artphoto = built["artemis"][1], built["artphoto"][1]
  # Ebench_single.json item 7 (8.jpg): judge_A {"A": "Yes", "B": "No"}, judge_answer "A".
  f = single["single/7/yes_no"]
  text = _prompt(f)
  assert ("The question is as follows: Do you think fear is the strongest emotion you felt from this picture? "
          "Choose between one of the following options: A: Yes B: No\"") in text
  assert parsing.question(f) == parsing.Question("yes_no", {"A": "Yes", "B": "No"})
  assert tasks.eemo_answer(f) == "A" and single["single/0/yes_no"]["choice"] == "B"
  assert parsing.question(single["single/0/yes_no"]).options == {"A": "No", "B": "Yes"}
  # The same answer text means another letter when the file lists the options the other way round.
  said_yes = ["<think>.</think><answer>Answer: Yes</answer>"] * 2
  parsed = parsing.parse_completions(said_yes, [f, single["single/0/yes_no"]])
  assert parsed.choice.tolist() == [0, 1] and parsed.well_formed.all()
  assert parsing.question(single["single/7/multiple_choice"]).options == {"A": "Negative", "B": "Neutral",
                                                                          "C": "Positive"}
  assert tuple(single["single/7/emotion_ranking"]["ranking"]) == ("fear", "disgust", "anger")
  assert "include: anger, disgust, fear, joy, neutral, sadness, and surprise." in _prompt(
      single["single/7/emotion_ranking"])
  for rid, value in (("single/7/valence", 0.2222222), ("single/7/arousal", 0.7916667),
                     ("single/7/dominance", 0.2638889), ("single/0/valence", 0.625), ("single/0/arousal", 0.4027778)):
    assert tasks.eemo_answer(single[rid]) == pytest.approx(value, abs=1e-6)
  assert _prompt(single["single/7/open_ended"]).startswith(
      'Answer the question: "Please describe the content of the image and express the three main emotions')
  # Ebench_pair.json item 0: 579.jpg then 100.jpg; yes/no "A: No. B: Yes." answer B; what/how answer D (Joy).
  f = pair["pair/0/yes_no"]
  assert list(zip(f["widths"], f["heights"])) == [sizes["579.jpg"], sizes["100.jpg"]]
  assert len(tasks.eemo_messages(f, with_answer=False)[0]["content"]) == 3  # two images, then the text
  assert "A: No. B: Yes." in _prompt(f) and tasks.eemo_answer(f) == "B"
  assert tasks.eemo_answer(pair["pair/0/multiple_choice"]) == "D" and "pair/0/open_ended" not in pair
  # Item 356: the released right option B of the what/how question is empty text; the benchmark scores it.
  f = pair["pair/356/multiple_choice"]
  assert list(f["options"]) == ["Both are unavailable.", "", "Figure 1 and Figure 2", "Figure 1"]
  assert tasks.eemo_answer(f) == "B"
  assert pair["pair/356/open_ended"]["question"] == ("Please analyze how Picture 2 conveys emotions through its "
                                                     "color palette and subject matter.")
  # Cross-domain: ArtEmis item 0 "amusement" (./test_dominant_images\00000.jpg); ArtPhoto 356 "sad", 7 "excitement".
  f = artemis["artemis/0/dominant_emotion"]
  assert list(zip(f["widths"], f["heights"])) == [sizes["test_dominant_images/00000.jpg"]]
  assert tasks.eemo_answer(f) == "amusement"
  assert parsing.question(f) == parsing.Question("dominant_emotion", tasks.MIKELS_8_FI)
  assert "[disgust, contentment, sadness, awe, anger, excitement, amusement, fear]" in _prompt(f)
  assert tasks.eemo_answer(artphoto["artphoto/356/dominant_emotion"]) == "Sad"
  assert tasks.eemo_answer(artphoto["artphoto/7/dominant_emotion"]) == "Excitement"
  assert "[Anger, Sad, Fear, Disgust, Amusement, Excitement, Awe, Content]" in _prompt(
      artphoto["artphoto/7/dominant_emotion"])
  # Option sets are named as the training data names them, so the rewards' similarity matrices apply.
  assert {f["option_set"] for f in (artemis["artemis/0/dominant_emotion"], artphoto["artphoto/7/dominant_emotion"],
                                    single["single/7/emotion_ranking"])} <= set(OPTION_SETS)


def test_every_prompt_is_well_formed_and_its_answer_reads_back(bench):
  """The generation prompt of every record, and its SFT answer read by the parser against its options."""
  built, _ = bench
  for config, (_, records) in built.items():
    features = list(records.values())
    answers = []
    for f in features:
      messages = tasks.eemo_messages(f, with_answer=False)
      assert [m["role"] for m in messages] == ["user"]
      content = messages[0]["content"]
      assert [c["type"] for c in content] == ["image"] * len(f["images"]) + ["text"]
      slot = tasks.ANSWER_KEYS[f["task"]]
      assert content[-1]["text"].startswith('Answer the question: "')
      assert content[-1]["text"].endswith(f"<answer>{slot}: {'x.xxxx' if f['task'] in tasks.VAD_DIMENSIONS else ''}"
                                          "</answer>")
      if f["task"] in ("yes_no", "multiple_choice"):
        listed = " ".join(f"{letter}: {text}" for letter, text in zip("ABCD", f["options"]))
        assert f"{f['question']} Choose between one of the following options: {listed}\"" in content[-1]["text"]
      answers.append(tasks.eemo_messages(f)[-1]["content"])
    parsed = parsing.parse_completions(answers, features)
    assert parsed.well_formed.all() and parsed.parse_ok.all(), config
    for row, f in enumerate(features):
      task = f["task"]
      if task in ("yes_no", "multiple_choice"):
        assert parsed.choice[row] == "ABCD".index(f["choice"])
      elif task == "dominant_emotion":
        options = parsing.question(f).options
        assert options[parsed.emotion[row]].lower() == f["emotion"]
      elif task == "emotion_ranking":
        options = parsing.question(f).options
        assert tuple(options[i] for i in parsed.ranking[row]) == tuple(f["ranking"])
      elif task in tasks.VAD_DIMENSIONS:
        assert parsed.score[row] == pytest.approx(f["scores"][tasks.VAD_DIMENSIONS.index(task)], abs=5e-5)


def _prompt(features) -> str:
  return tasks.eemo_messages(features, with_answer=False)[0]["content"][-1]["text"]


# --------------------------------------------------------------------------------------------- bad items


@pytest.fixture
def bad_root(tmp_path):
  """Copies of real items with one field broken each, and their images (one missing, one outside)."""
  single, artemis = _items("single")[:8], _items("artemis")[:3]
  del single[1]["judge_answer"]
  single[2]["choose_answer"] = "D"  # options A-C
  single[3]["Valence"] = [9.5, 0.5, 1.0]
  single[4]["emotion_list"][1] = ["happiness", 30]
  single[5]["image_name"] = "gone.jpg"
  single[6]["image_name"] = "../outside.jpg"
  single[7]["judge_A"] = {"A": "Yes", "B": "Maybe"}
  artemis[1]["dominant_emotion"] = "something else"
  root = tmp_path / "bench"
  root.mkdir()
  (root / "bad_single.json").write_text(json.dumps(single))
  (root / "bad_artemis.json").write_text(json.dumps(artemis))
  names = [i["image_name"] for i in single if i["image_name"] not in ("gone.jpg", "../outside.jpg")]
  _write_images(root / "images", names + [_image_names("artemis", i)[0] for i in artemis])
  _write_images(root, ["outside.jpg"])
  return root, single


def test_bad_items_are_skipped_and_listed_by_id(tmp_path, bad_root):
  root, single = bad_root
  report = build("eemo_bench", tmp_path / "data", manual_dir=root, config="single", annotations="bad_single.json",
                 image_root="images")
  reasons = {s["id"]: (s["field"], s["error"]) for s in report.skipped["test"]}
  all_tasks = ("yes_no", "multiple_choice", "emotion_ranking", "valence", "arousal", "dominance", "open_ended")
  expected = {"single/1/yes_no": ("judge_answer", "MissingFieldError"),
              "single/2/multiple_choice": ("choose_answer", "InvalidFieldError"),
              "single/3/valence": ("Valence", "InvalidFieldError"),
              "single/4/emotion_ranking": ("emotion_list", "UnknownLabelError"),
              "single/7/yes_no": ("judge_A", "InvalidFieldError")}
  expected.update({f"single/5/{t}": ("image_name", "MissingFileError") for t in all_tasks
                   if t != "open_ended" or single[5].get("open_ended_Q")})
  expected.update({f"single/6/{t}": ("image_name", "UnsafePathError") for t in all_tasks
                   if t != "open_ended" or single[6].get("open_ended_Q")})
  assert reasons == expected
  missing = next(s for s in report.skipped["test"] if s["id"] == "single/5/yes_no")
  assert "gone.jpg" in missing["message"] and missing["where"] == "bad_single.json#5"
  asked = sum(6 + bool(i.get("open_ended_Q")) for i in single)
  assert report.written == {"test": asked - len(expected)}
  summary = json.loads((Path(report.dataset_dir) / "skipped_records.json").read_text())
  assert [s["id"] for s in summary["splits"]["test"]["skipped"]] == [s["id"] for s in report.skipped["test"]]
  kept = {f["id"] for f in load_records("eemo_bench", tmp_path / "data", "test", config="single")}
  assert {"single/1/multiple_choice", "single/3/arousal", "single/4/valence"} <= kept  # the rest of the item stays

  report = build("eemo_bench", tmp_path / "data2", manual_dir=root, config="artemis",
                 annotations="bad_artemis.json", image_root="images")
  assert [(s["id"], s["error"]) for s in report.skipped["test"]] == [("artemis/1/dominant_emotion",
                                                                      "UnknownLabelError")]
  assert report.written == {"test": 2}


def test_strict_build_stops_at_the_first_bad_record(tmp_path, bad_root):
  root, _ = bad_root
  with pytest.raises(MissingFieldError, match=r"'single/1/yes_no', field 'judge_answer'"):
    build("eemo_bench", tmp_path / "data", manual_dir=root, config="single", annotations="bad_single.json",
          image_root="images", strict=True)


def test_annotation_files_are_found_by_the_release_names(tmp_path):
  release = tmp_path / "EEmo-Logic" / "test_data"
  release.mkdir(parents=True)
  pairs = copy.deepcopy(_items("pair")[:3])
  pairs[0].update(open_ended_question="Which image is calmer?", open_ended_answer="The second one. ")
  pairs[1].update(open_ended_question="Which image is brighter?")
  (release / "Ebench_imgpir(en).json").write_text(json.dumps(pairs))
  _write_images(tmp_path / "images", {n for i in pairs for n in _image_names("pair", i)})
  report = build("eemo_bench", tmp_path / "data", manual_dir=tmp_path / "EEmo-Logic", config="pair",
                 image_root=tmp_path / "images")
  assert report.written == {"test": 6 + sum(bool(i["open_ended_question"]) for i in pairs)}
  records = {f["id"]: f for f in load_records("eemo_bench", tmp_path / "data", "test", config="pair")}
  assert tasks.eemo_answer(records["pair/0/open_ended"]) == "The second one."  # the file's reference answer
  assert records["pair/1/open_ended"]["answer"] == bench_records.NO_REFERENCE_ANSWER
  with pytest.raises(DatasetError, match=r"no single annotation file .*Ebench_1_data\(jac_en_check\)\.json"):
    build("eemo_bench", tmp_path / "data", manual_dir=tmp_path / "EEmo-Logic", config="single",
          image_root=tmp_path / "images")
  with pytest.raises(DatasetError, match="image_root .* is not a folder"):
    build("eemo_bench", tmp_path / "data", manual_dir=DATA, config="artphoto", image_root=tmp_path / "none")
