"""The offline tokenizer folder against transformers: it loads as Qwen2.5-VL's tokenizer and processor, and
`TextTokenizer` gives the ids transformers gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

import pytest

from data_pipeline import tasks
from data_pipeline.tokenizer import QWEN_SPECIAL_TOKENS, build_offline_tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXTS = [
    "",
    "Amusement",
    "café naïve Ångström — 日本語のテキスト, emoji 😀🎉, e\u0301 (combining accent, NFC-normalised)",
    "digits 0123456789 1,234.5678 3.14159 2026-11-22 007",
    "whitespace   runs\t\ttabs\n\n\nnewlines \r\n crlf    \n  trailing   ",
    "it's, we'll, they're, I'M, you'VE, she'd",
    "Hello<|im_end|>world<|vision_start|> special strings inside text <|endoftext|>",
    "{'emotion': 'Awe', 'bbox': [{'x1': 10, 'y1': 20, 'x2': 300, 'y2': 400}]}\n#DES",
    "<think>The image shows a calm lake.</think><answer>Valence: 0.6250</answer>",
    tasks.CES_QUESTION,
    tasks.BAS_QUESTION,
    tasks.PERCEPTION_PROMPT + tasks.RANKING_PROMPT,
    tasks.ANSWER_FORMAT.format(question=tasks.VAD_PROMPT.format(dimension="arousal"), slot="Arousal: x.xxxx"),
    "Unseen words: photosynthesis, Zürich, ПРИВЕТ, مرحبا, 🙂" * 3,
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return build_offline_tokenizer(os.fspath(tmp_path_factory.mktemp("offline_tokenizer")))


@pytest.fixture(scope="module")
def hf_tokenizer(folder):
  return transformers.AutoTokenizer.from_pretrained(folder)


def load_hf_processor(folder):
  """`AutoProcessor.from_pretrained(folder)`, offline.

  transformers 5.23's `Qwen2_5_VLProcessor` always builds a video processor, and every video processor needs
  torchvision, which this project must not install (its CUDA wheels break transformers beside CPU torch). So
  a real Qwen2.5-VL folder fails the same way here. Without torchvision the processor's sub-processor list is
  narrowed to the image processor and tokenizer; everything used for images and text is the real code.
  """
  from transformers import Qwen2_5_VLProcessor
  from transformers.utils import is_torchvision_available
  if is_torchvision_available():
    return transformers.AutoProcessor.from_pretrained(folder)
  with mock.patch.object(Qwen2_5_VLProcessor, "get_attributes",
                         classmethod(lambda cls: ["image_processor", "tokenizer"])):
    return transformers.AutoProcessor.from_pretrained(folder)


def test_autotokenizer_loads_the_folder_as_qwen2(folder, hf_tokenizer):
  assert type(hf_tokenizer).__name__ == "Qwen2Tokenizer"
  assert len(hf_tokenizer) == 512 == load_tokenizer(folder).vocab_size
  assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.pad_token == "<|endoftext|>"
  assert hf_tokenizer.bos_token is None
  assert hf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")


def test_autoprocessor_returns_qwen25vl_processor(folder):
  from transformers import Qwen2_5_VLProcessor
  from transformers.utils import is_torchvision_available
  if not is_torchvision_available():  # the one thing missing is torchvision, not anything in the folder
    with pytest.raises(ImportError, match="Torchvision"):
      transformers.AutoProcessor.from_pretrained(folder)
  processor = load_hf_processor(folder)
  assert isinstance(processor, Qwen2_5_VLProcessor)
  assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
  assert (processor.image_processor.patch_size, processor.image_processor.merge_size) == (14, 2)
  assert processor.image_token_id == load_tokenizer(folder).special.image_pad
  rendered = processor.apply_chat_template(
      [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
      tokenize=False, add_generation_prompt=True)
  assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
                      "<|im_start|>assistant\n")  # spec §5.5's rendered example


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_equals_transformers(folder, hf_tokenizer, text):
  ours = load_tokenizer(folder)
  ids = ours.encode(text)
  assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
  assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=False)
  assert ours.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_special_ids_match_transformers_and_follow_the_bpe_vocab(folder, hf_tokenizer):
  special = load_tokenizer(folder).special
  for field in ("endoftext", "im_start", "im_end", "vision_start", "vision_end", "image_pad", "video_pad"):
    assert getattr(special, field) == hf_tokenizer.convert_tokens_to_ids(f"<|{field}|>")
  # Qwen's layout: the 14 added tokens, in Qwen's order, right after the BPE vocabulary.
  assert hf_tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)) == list(range(498, 512))
  assert special.pad == special.endoftext and special.stop_ids == (special.im_end, special.endoftext)


def test_des_marker_and_paragraph_break_are_single_tokens(folder, hf_tokenizer):
  assert len(hf_tokenizer.encode(tasks.DES_SLOT_TEXT, add_special_tokens=False)) == 1
  assert len(hf_tokenizer.encode("\n\n", add_special_tokens=False)) == 1


def test_loads_a_folder_transformers_saved(folder, hf_tokenizer, tmp_path):
  """A tokenizer.json written by transformers itself (as in a real checkpoint) loads and encodes the same."""
  from transformers import Qwen2Tokenizer
  vocab = json.loads(open(os.path.join(folder, "vocab.json"), encoding="utf-8").read())
  merges = [tuple(line.split(" ")) for line in open(os.path.join(folder, "merges.txt"), encoding="utf-8")
            .read().splitlines()[1:]]
  saved = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))
  saved.save_pretrained(tmp_path)
  reloaded = load_tokenizer(os.fspath(tmp_path))
  assert reloaded.special == load_tokenizer(folder).special
  for text in TEXTS:
    assert reloaded.encode(text) == saved.encode(text, add_special_tokens=False)


def test_build_is_deterministic_and_idempotent(folder, tmp_path):
  names = sorted(os.listdir(folder))
  assert names == sorted(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
                          "preprocessor_config.json", "vocab.json", "merges.txt"])
  # Another process (another hash seed, another thread schedule) writes the same bytes.
  other = tmp_path / "other"
  code = f"from data_pipeline.tokenizer import build_offline_tokenizer; build_offline_tokenizer({str(other)!r})"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "12345"})
  for name in names:
    assert (other / name).read_bytes() == open(os.path.join(folder, name), "rb").read(), name
  # Building again over a complete folder leaves every file untouched; other files stay.
  (other / "model.safetensors").write_bytes(b"weights")
  before = {name: os.stat(other / name).st_mtime_ns for name in names}
  build_offline_tokenizer(os.fspath(other))
  assert {name: os.stat(other / name).st_mtime_ns for name in names} == before
  assert (other / "model.safetensors").read_bytes() == b"weights"


def test_vocab_size_out_of_range_says_what_fits(tmp_path):
  with pytest.raises(ValueError, match=r"vocab_size >= 270"):
    build_offline_tokenizer(os.fspath(tmp_path), vocab_size=269)
  with pytest.raises(ValueError, match=r"pass vocab_size <= \d+"):
    build_offline_tokenizer(os.fspath(tmp_path), vocab_size=100_000)
  assert load_tokenizer(build_offline_tokenizer(os.fspath(tmp_path), vocab_size=300)).vocab_size == 300


def test_missing_special_token_or_file_is_a_clear_error(folder, tmp_path):
  data = json.loads(open(os.path.join(folder, "tokenizer.json"), encoding="utf-8").read())
  data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|image_pad|>"]
  (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
  with pytest.raises(ValueError, match=r"lacks the Qwen special tokens \['<\|image_pad\|>'\]"):
    load_tokenizer(os.fspath(tmp_path))
  with pytest.raises(FileNotFoundError, match="build_offline_tokenizer"):
    load_tokenizer(os.fspath(tmp_path / "nowhere"))


def test_text_tokenizer_pickles_for_worker_processes(folder):
  import pickle
  ours = load_tokenizer(folder)
  clone = pickle.loads(pickle.dumps(ours))
  assert clone.encode(TEXTS[2]) == ours.encode(TEXTS[2]) and clone.special == ours.special
