"""Builders: ArrayRecord written by TFDS without TensorFlow, read back through `load_records`.

Synthetic builds are compared with the generator; the EmoVerse and EEmoDB builds run on folders of
released-format annotations with bad records mixed in: every good record must land, every bad one must
be counted under its id, and strict mode must stop at the first bad id.
"""

import io
import json
import os
import pickle
import subprocess
import sys

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.builders import build, load_records
from data_pipeline.builders.common import SKIPPED_FILE
from data_pipeline.errors import CorruptImageError, DatasetError, RecordError
from data_pipeline.records import DES_DIM, EEmoRecord, EmoVerseRecord, parse_eemo, parse_emoverse
from data_pipeline.synthetic import synthetic_eemo_records, synthetic_emoverse_record


def _image(path, width, height, colour):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (width, height), colour).save(path, format="JPEG")


def _by_id(source):
  return {source.record(i).id: source.record(i) for i in range(len(source))}


# ------------------------------------------------------------------------------------------- synthetic


def test_synthetic_emoverse_build_reads_back_as_generated(tmp_path):
  report = build("synthetic", tmp_path, config="emoverse", seed=5, num_train=12, num_test=4)
  assert report.config == "emoverse-seed5-train12-test4" and not report.reused
  assert report.written == {"train": 12, "test": 4} and report.num_skipped == 0
  for split, indices in (("train", range(0, 12)), ("test", range(12, 16))):
    source = load_records("synthetic", tmp_path, split, config=report.config)
    assert len(source) == len(indices)
    features = source[0]
    assert isinstance(features["id"], str) and isinstance(features["image"], bytes)
    assert features["des"].shape == (DES_DIM,) and features["boxes"].dtype == np.int32
    expected = {r.id: r for r in (synthetic_emoverse_record(5, i, split) for i in indices)}
    assert _by_id(source) == expected
    assert [f["id"] for f in source] == [source[i]["id"] for i in range(len(source))]  # plain iteration ends
    with pytest.raises(IndexError):
      source[len(source)]

  again = build("synthetic", tmp_path, config="emoverse", seed=5, num_train=12, num_test=4)
  assert again.reused and again.written == report.written
  summary = json.loads(open(os.path.join(report.dataset_dir, SKIPPED_FILE)).read())
  assert summary["splits"]["train"] == {"written": 12, "skipped": []}


def test_synthetic_eemo_build_and_grain_reads_it(tmp_path):
  report = build("synthetic", tmp_path, config="eemo", seed=2, num_train=2, num_test=1)
  assert report.written == {"train": 18, "test": 9}
  source = load_records("synthetic", tmp_path, "test", config=report.config)
  assert source.record_type is EEmoRecord
  assert _by_id(source) == {r.id: r for r in synthetic_eemo_records(2, 2, "test")}

  clone = pickle.loads(pickle.dumps(source))  # Grain worker processes receive the source pickled
  dataset = grain.MapDataset.source(clone).map(lambda f: (f["id"], f["task"], len(f["images"])))
  rows = sorted(dataset[i] for i in range(len(dataset)))
  assert [r[2] for r in rows].count(2) == 1 and {r[1] for r in rows} >= {"valence", "yes_no", "open_ended"}


# -------------------------------------------------------------------------------------------- EmoVerse


@pytest.fixture
def emoverse_root(tmp_path):
  root = tmp_path / "EmoVerse"
  for i in range(4):
    _image(root / "images" / f"good{i}.jpg", 30 + 8 * i, 40, (40 * i, 90, 200))
  (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
  _image(tmp_path / "outside" / "x.jpg", 20, 20, (0, 0, 0))
  os.symlink(tmp_path / "outside" / "x.jpg", root / "images" / "link.jpg")

  def item(record_id, image, **changes):
    fields = {"id": record_id, "image_path": image, "description": f"about {record_id}", "emotion": "Fear",
              "confidence": 5.0, "background": "dark forest", "attribute": "eerie", "subject": "figure",
              "DES": [0.25] * DES_DIM, "bbox": [{"x1": 1, "y1": 2, "x2": 10, "y2": 20}]}
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}

  train = [item("ev-0", "images/good0.jpg"),
           item("ev-bad-image", "images/corrupt.jpg"),
           item("ev-1", "images/good1.jpg", emotion="Awe", DES=None),
           item("ev-missing", "images/gone.jpg"),
           item("ev-escape", "../outside/x.jpg"),
           item("ev-link", "images/link.jpg"),
           item("ev-des", "images/good2.jpg", DES=[0.1] * 1000),
           item("ev-2", "images/good2.jpg", emotion="contentment"),
           item("ev-0", "images/good3.jpg"),  # a duplicate id: the first ev-0 is kept
           item("ev-emotion", "images/good3.jpg", emotion="joy")]
  (root / "emoverse_train.json").write_text(json.dumps(train))
  test_lines = [json.dumps(item("ev-3", "images/good3.jpg")), "{not json", "",
                json.dumps(item(None, "images/good1.jpg", emotion="anger"))]
  (root / "emoverse_test.jsonl").write_text("\n".join(test_lines) + "\n")
  good = {"train": [(train[0], "x"), (train[2], "x"), (train[7], "x")],
          "test": [(json.loads(test_lines[0]), "x"), (json.loads(test_lines[3]), "emoverse_test.jsonl#3")]}
  bad = {"train": ["ev-bad-image", "ev-missing", "ev-escape", "ev-link", "ev-des", "ev-0", "ev-emotion"],
         "test": ["emoverse_test.jsonl#1"]}
  return root, good, bad


def test_emoverse_build_keeps_good_records_and_lists_bad_ones(tmp_path, emoverse_root):
  root, good, bad = emoverse_root
  report = build("emoverse", tmp_path / "data", manual_dir=root)
  assert report.written == {split: len(items) for split, items in good.items()}
  assert {split: [s["id"] for s in skipped] for split, skipped in report.skipped.items()} == bad
  reasons = {s["id"]: s["error"] for s in report.skipped["train"]}
  assert reasons == {"ev-bad-image": "CorruptImageError", "ev-missing": "MissingFileError",
                     "ev-escape": "UnsafePathError", "ev-link": "UnsafePathError", "ev-des": "InvalidFieldError",
                     "ev-0": "DuplicateIdError", "ev-emotion": "UnknownLabelError"}
  assert report.skipped["test"][0]["where"] == "emoverse_test.jsonl#1"

  summary = json.loads(open(os.path.join(report.dataset_dir, SKIPPED_FILE)).read())
  assert summary["dataset"] == "emoverse" and summary["splits"]["train"]["written"] == 3
  assert [s["id"] for s in summary["splits"]["train"]["skipped"]] == bad["train"]

  for split, items in good.items():
    source = load_records("emoverse", tmp_path / "data", split)
    expected = {}
    for item, default_id in items:
      record = parse_emoverse(item, root, default_id=default_id, split=split)
      expected[record.id] = record
    assert _by_id(source) == expected
    assert source.record_type is EmoVerseRecord


def test_emoverse_strict_build_fails_on_the_first_bad_record(tmp_path, emoverse_root):
  root, _, _ = emoverse_root
  with pytest.raises(CorruptImageError, match="'ev-bad-image'.*images/corrupt.jpg"):
    build("emoverse", tmp_path / "data", manual_dir=root, strict=True)
  assert not (tmp_path / "data" / "emoverse" / "1.0.0").exists()  # nothing half-written is left as done


def test_emoverse_from_hf_parquet(tmp_path):
  root = tmp_path / "hf"
  (root / "data").mkdir(parents=True)
  buffers = []
  for colour in ((10, 200, 30), (250, 250, 0), (0, 0, 0)):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buffer, format="PNG")
    buffers.append(buffer.getvalue())
  rows = [{"image": {"bytes": data, "path": f"{i}.png"}, "description": f"row {i}", "emotion_category": emotion,
           "confidence_score": 7, "background": "b", "attribute": "a", "subject": "s",
           "DES_representation": [float(i)] * DES_DIM, "bounding_box": [0, 0, 16, 12], "source": "EmoSet"}
          for i, (data, emotion) in enumerate(zip(buffers, ("Excitement", "joy", "Disgust")))]
  table = pa.Table.from_pylist(rows, schema=pa.schema([
      ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("description", pa.string()),
      ("emotion_category", pa.string()), ("confidence_score", pa.int32()), ("background", pa.string()),
      ("attribute", pa.string()), ("subject", pa.string()), ("DES_representation", pa.list_(pa.float32())),
      ("bounding_box", pa.list_(pa.int32())), ("source", pa.string())]))
  pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")

  report = build("emoverse", tmp_path / "data", manual_dir=root)
  assert report.written == {"train": 2} and report.skipped_ids == ["data/train-00000-of-00001.parquet#1"]
  expected = {f"data/train-00000-of-00001.parquet#{i}": parse_emoverse(
      rows[i], None, default_id=f"data/train-00000-of-00001.parquet#{i}", split="train") for i in (0, 2)}
  assert _by_id(load_records("emoverse", tmp_path / "data", "train")) == expected


# ------------------------------------------------------------------------------------------------ EEmo


@pytest.fixture
def eemo_root(tmp_path):
  root = tmp_path / "EEmoDB"
  images = root / "images"
  for i in range(3):
    _image(images / f"{i}.jpg", 24 + 4 * i, 28, (80 * i, 10, 10))
  (images / "broken.jpg").write_bytes(b"GIF89a broken")
  _image(tmp_path / "elsewhere" / "y.jpg", 16, 16, (9, 9, 9))
  os.symlink(tmp_path / "elsewhere", images / "elsewhere")
  (root / "image_mapping.json").write_text("{}")

  def qa(record_id, image, question, answer, *more_turns):
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}, *more_turns]
    return {"id": record_id, "image": image, "conversations": turns}

  train = [
      qa("c0", "images/0.jpg", "<image>\nIs joy the strongest emotion? Choose between one of the following "
         "options: A: Yes B: No", "A"),
      qa("c-bad", "images/broken.jpg", "<image>\nRate the valence.", "Valence: 0.5000"),
      qa("c1", ["images/1.jpg", "images/2.jpg"], "<image><image>Which is sadder? A. First B. Second", "B",
         {"from": "human", "value": "Rank the emotions of the second image."},
         {"from": "gpt", "value": "<answer>Emotion ranking: sadness, fear, neutral</answer>"}),
      qa("c-abs", str(tmp_path / "elsewhere" / "y.jpg"), "<image>Describe.", "Dark."),
      qa("c-field", "images/0.jpg", "<image>Rate the valence.", "Valence: 7.5"),
      qa("c-link", "images/elsewhere/y.jpg", "<image>Describe.", "Dark."),
  ]
  test = [qa("t0", "images/2.jpg", "<image>What do you feel?", "A quiet calm.")]
  assess = [{"problem": {"question": "Please rate the level of dominance the image evokes in you."},
             "solution": {"answer": "<think>weak</think><answer>Dominance: 0.2100</answer>"},
             "video_path": "images/1.jpg"},
            {"problem": {"question": "Rate the arousal."}, "video_path": "images/1.jpg"},
            {"problem": {"question": "What is the dominant emotion? fear, joy, anger, sadness, surprise, disgust, "
                                     "neutral"}, "solution": {"answer": "Dominant emotion: surprise"},
             "video_path": "images/0.jpg"}]
  (root / "EEmoDB-QA").mkdir()
  (root / "EEmoDB-Assess").mkdir()
  (root / "EEmoDB-QA" / "QA_data(conversation_train).json").write_text(json.dumps(train))
  (root / "EEmoDB-QA" / "QA_data(conversation_test).json").write_text(json.dumps(test))
  (root / "EEmoDB-Assess" / "RL(conversation_train).json").write_text(json.dumps(assess))
  return root, train, test, assess


def test_eemo_qa_build_keeps_good_records_and_lists_bad_ones(tmp_path, eemo_root):
  root, train, test, _ = eemo_root
  report = build("eemo", tmp_path / "data", manual_dir=root, config="qa")
  assert report.written == {"train": 3, "test": 1}
  assert report.skipped_ids == ["c-bad", "c-abs", "c-field", "c-link"]
  assert [s["error"] for s in report.skipped["train"]] == ["CorruptImageError", "UnsafePathError",
                                                             "InvalidFieldError", "UnsafePathError"]
  source = load_records("eemo", tmp_path / "data", "train", config="qa")
  expected = {r.id: r for item in (train[0], train[2]) for r in parse_eemo(item, root, default_id="x",
                                                                           split="train")}
  assert set(expected) == {"c0", "c1#0", "c1#1"}
  assert _by_id(source) == expected
  assert _by_id(source)["c1#1"].ranking == ("sadness", "fear", "neutral")
  test_source = load_records("eemo", tmp_path / "data", "test", config="qa")
  assert [test_source.record(0).id, test_source.record(0).task] == ["t0", "open_ended"]


def test_eemo_assess_build_reads_stage2_items(tmp_path, eemo_root):
  root, _, _, assess = eemo_root
  report = build("eemo", tmp_path / "data", manual_dir=root, config="assess")
  where = "EEmoDB-Assess/RL(conversation_train).json"
  assert report.written == {"train": 2} and report.skipped_ids == [f"{where}#1"]
  assert report.skipped["train"][0]["field"] == "solution.answer"
  records = _by_id(load_records("eemo", tmp_path / "data", "train", config="assess"))
  assert records[f"{where}#0"] == parse_eemo(assess[0], root, default_id=f"{where}#0", split="train")[0]
  assert records[f"{where}#2"].emotion == "surprise" and records[f"{where}#2"].option_set.endswith("neutral")


def test_eemo_strict_build_fails_on_the_first_bad_record(tmp_path, eemo_root):
  root = eemo_root[0]
  with pytest.raises(RecordError, match="'c-bad'.*images/broken.jpg"):
    build("eemo", tmp_path / "data", manual_dir=root, config="qa", strict=True)


# ------------------------------------------------------------------------------------------- user errors


def test_clear_errors_for_bad_calls(tmp_path, emoverse_root):
  root = emoverse_root[0]
  with pytest.raises(DatasetError, match="manual_dir"):
    build("emoverse", tmp_path / "data")
  with pytest.raises(DatasetError, match=f"manual_dir {tmp_path / 'absent'} does not exist or is empty"):
    build("emoverse", tmp_path / "data", manual_dir=tmp_path / "absent")
  with pytest.raises(DatasetError, match=r"eemo has no config 'stage1'; use one of \['qa', 'assess'\]"):
    build("eemo", tmp_path / "data", manual_dir=root, config="stage1")
  with pytest.raises(DatasetError, match="emoverse has no config 'qa'; leave it out"):
    build("emoverse", tmp_path / "data", manual_dir=root, config="qa")
  with pytest.raises(DatasetError, match="unknown data set 'emoverze'"):
    build("emoverze", tmp_path / "data", manual_dir=root)
  with pytest.raises(DatasetError, match="annotations="):
    build("emoverse", tmp_path / "data", manual_dir=root / "images")  # a folder without annotation files
  with pytest.raises(DatasetError, match="not found"):
    build("emoverse", tmp_path / "data", manual_dir=root, annotations={"train": "nope.json"})
  with pytest.raises(DatasetError, match="build it first"):
    load_records("eemo", tmp_path / "data", "train")
  build("synthetic", tmp_path / "data", config="emoverse", num_train=1, num_test=1)
  with pytest.raises(DatasetError, match="no split 'validation'"):
    load_records("synthetic", tmp_path / "data", "validation", config="emoverse-seed0-train1-test1")


def test_an_unexpected_parse_failure_costs_only_its_record(tmp_path, emoverse_root, monkeypatch):
  import data_pipeline.builders.emoverse as emoverse_builder

  root, good, _ = emoverse_root
  real_parse = emoverse_builder.parse_emoverse

  def flaky_parse(item, *args, **kwargs):
    if item.get("id") == "ev-1":
      raise TypeError("a parser bug")
    return real_parse(item, *args, **kwargs)

  monkeypatch.setattr(emoverse_builder, "parse_emoverse", flaky_parse)
  report = build("emoverse", tmp_path / "data", manual_dir=root, annotations={"train": "emoverse_train.json"})
  assert report.written == {"train": len(good["train"]) - 1}
  [bug] = [s for s in report.skipped["train"] if "TypeError" in s["message"]]
  assert bug["where"] == "emoverse_train.json#2" and "a parser bug" in bug["message"]


# ------------------------------------------------------------------------- unusable splits and images


def _emoverse_item(record_id, image):
  return {"id": record_id, "image_path": image, "description": "d", "emotion": "awe", "background": "b",
          "attribute": "a", "subject": "s"}


def test_a_split_with_no_good_record_fails_pointing_at_the_skipped_records(tmp_path):
  root = tmp_path / "EmoVerse"
  _image(root / "images" / "good.jpg", 32, 24, (200, 10, 10))
  (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
  (root / "emoverse_train.json").write_text(json.dumps([_emoverse_item("bad-0", "images/corrupt.jpg"),
                                                        _emoverse_item("bad-1", "images/gone.jpg")]))
  (root / "emoverse_test.json").write_text(json.dumps([_emoverse_item("t-0", "images/good.jpg")]))
  listing = tmp_path / "data" / "emoverse" / SKIPPED_FILE  # beside the version folder, which is not created
  with pytest.raises(DatasetError) as caught:
    build("emoverse", tmp_path / "data", manual_dir=root)
  assert str(caught.value) == (
      f"every record of the train split of emoverse is bad: 2 skipped (CorruptImageError, MissingFileError), none "
      f"written. The skipped records and why: {listing}; fix them, or leave the split out (annotations=...)")
  summary = json.loads(listing.read_text())
  assert [s["id"] for s in summary["splits"]["train"]["skipped"]] == ["bad-0", "bad-1"]
  assert summary["failed"].startswith("every record of the train split") and summary["splits"]["train"]["written"] == 0
  assert not (tmp_path / "data" / "emoverse" / "1.0.0").exists()

  # Fixed, the build succeeds, lists its (no) skipped records in the version folder, and the failure's list goes.
  (root / "emoverse_train.json").write_text(json.dumps([_emoverse_item("good-0", "images/good.jpg")]))
  report = build("emoverse", tmp_path / "data", manual_dir=root)
  assert report.written == {"train": 1, "test": 1} and not listing.exists()
  assert json.loads((tmp_path / "data" / "emoverse" / "1.0.0" / SKIPPED_FILE).read_text())["splits"]["train"] == {
      "written": 1, "skipped": []}


def test_a_split_without_records_fails_naming_it(tmp_path):
  root = tmp_path / "EmoVerse"
  root.mkdir()
  (root / "emoverse_train.json").write_text("[]")
  with pytest.raises(DatasetError, match=r"^the train split of emoverse has no records: its annotations hold no "
                     r"items; check the annotation files of that split"):
    build("emoverse", tmp_path / "data", manual_dir=root)
  assert not (tmp_path / "data" / "emoverse" / SKIPPED_FILE).exists()


def test_images_over_the_pixel_limit_are_skipped_from_their_header(tmp_path):
  root = tmp_path / "EmoVerse"
  _image(root / "images" / "small.jpg", 40, 30, (0, 90, 0))  # 1,200 pixels
  _image(root / "images" / "large.jpg", 60, 50, (0, 0, 90))  # 3,000 pixels
  (root / "emoverse_train.json").write_text(json.dumps([_emoverse_item("small", "images/small.jpg"),
                                                        _emoverse_item("large", "images/large.jpg")]))
  report = build("emoverse", tmp_path / "limited", manual_dir=root, max_image_pixels=2000)
  assert report.written == {"train": 1} and report.skipped_ids == ["large"]
  [skipped] = report.skipped["train"]
  assert skipped["error"] == "ImageTooLargeError" and skipped["field"] == "image_path"
  assert "large.jpg is 60x50 = 3,000 pixels, more than max_image_pixels=2,000" in skipped["message"]
  assert build("emoverse", tmp_path / "default", manual_dir=root).written == {"train": 2}


def test_a_huge_image_is_refused_by_a_build_in_little_memory(tmp_path):
  probe = os.path.join(os.path.dirname(__file__), "huge_image_probe.py")
  run = subprocess.run([sys.executable, probe, "build", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       cwd=os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.splitlines()[-1])
  [skipped] = result["outcome"]["train"]
  assert (skipped["id"], skipped["error"]) == ("huge", "ImageTooLargeError")
  assert "12000x12000 = 144,000,000 pixels, more than max_image_pixels=89,478,485" in skipped["message"]
  assert result["extra_mb"] < 64  # decoding it took 142 MB before the limit


def test_damaged_or_mismatched_builds_are_one_data_set_error(tmp_path):
  report = build("synthetic", tmp_path / "data", config="emoverse", num_train=2, num_test=1)
  with pytest.raises(DatasetError, match=r"has no config 'emoverse' \(data.dataset_config\); it holds "
                     r"\['emoverse-seed0-train2-test1'\]"):
    load_records("synthetic", tmp_path / "data", "train", config="emoverse")
  with pytest.raises(DatasetError, match=r"no split 'validation'; it has \['test', 'train'\]: set data.split"):
    load_records("synthetic", tmp_path / "data", "validation", config=report.config)
  for name in os.listdir(report.dataset_dir):
    if name.startswith("synthetic-train.array_record"):
      os.remove(os.path.join(report.dataset_dir, name))
  with pytest.raises(DatasetError, match=r"the train split of .* cannot be opened \(RuntimeError: .*No such file"
                     r".*\); rebuild it with data_pipeline.builders.build\(..., overwrite=True\)"):
    load_records("synthetic", tmp_path / "data", "train", config=report.config)
  os.remove(os.path.join(report.dataset_dir, "dataset_info.json"))
  with pytest.raises(DatasetError, match=r"is not a complete built data set \(.*dataset_info.json\); rebuild it"):
    load_records("synthetic", tmp_path / "data", "test", config=report.config)
