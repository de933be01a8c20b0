"""The text tokenizer: a fast wrapper over `tokenizer.json`, and the small Qwen2-style one the project builds.

`load_tokenizer(folder)` reads the `tokenizer.json` of a real Qwen2.5-VL folder or of the offline folder that
`build_offline_tokenizer` writes, with the `tokenizers` library alone, so data-loading workers never import
transformers. Its ids equal transformers' `AutoTokenizer(...).encode(text, add_special_tokens=False)`.

`build_offline_tokenizer(folder)` exists so the demo and the tests need no download (DESIGN decision 12):
a byte-level BPE with the Qwen2 normaliser, pre-tokenizer and decoder, trained on an embedded corpus of this
project's own text (label sets, B-A-S words, task prompts and answer formats), followed by the Qwen special
tokens in Qwen's order, exactly where Qwen2.5-VL puts them (right after the BPE vocabulary). The folder is
a normal HF folder: `transformers.AutoProcessor.from_pretrained(folder)` returns a `Qwen2_5_VLProcessor`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from data_pipeline import prompts
from eemo_jax import paths

# Qwen2's pre-tokenizer split (transformers `tokenization_qwen2.PRETOKENIZE_REGEX`, the `Split` pattern of
# every released Qwen2 / Qwen2.5 tokenizer.json).
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5-VL's added tokens 151643-151656, in id order; they follow the BPE vocabulary.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Pixel limits of the released Qwen2.5-VL preprocessor_config.json (spec §5.2) and OpenAI CLIP statistics.
_PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 12845056, "merge_size": 2,
    "min_pixels": 3136, "patch_size": 14, "processor_class": "Qwen2_5_VLProcessor", "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 12845056, "shortest_edge": 3136},
    "temporal_patch_size": 2,
}


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids of the Qwen special tokens the pipeline uses, looked up by their strings.

  `endoftext` is the padding token and the base tokenizer's end of document; chat turns end with `im_end`,
  so generation stops at either (`stop_ids`).
  """
  endoftext: int
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int
  image_pad: int
  video_pad: int

  @property
  def pad(self) -> int:
    return self.endoftext

  @property
  def stop_ids(self) -> tuple[int, int]:
    return (self.im_end, self.endoftext)


_SPECIAL_FIELDS = {
    "endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
}


class TextTokenizer:
  """`tokenizer.json` through the `tokenizers` library: no transformers, picklable for worker processes."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, source: str = "<memory>"):
    self._tokenizer = tokenizer
    self.source = source
    missing = [s for s in _SPECIAL_FIELDS.values() if tokenizer.token_to_id(s) is None]
    if missing:
      raise ValueError(f"tokenizer {source} lacks the Qwen special tokens {missing}; use the tokenizer of a "
                       "Qwen2.5-VL checkpoint, or build one with data_pipeline.tokenizer.build_offline_tokenizer")
    self.special = SpecialTokens(**{f: tokenizer.token_to_id(s) for f, s in _SPECIAL_FIELDS.items()})

  @property
  def vocab_size(self) -> int:
    """Number of token ids, added tokens included: the embedding rows a model needs at least."""
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no BOS/EOS is inserted. Special-token strings in the text map to their ids."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each token's (start, end) character span in `text` (used to place SFT labels)."""
    encoding = self._tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tokenizer.id_to_token(int(token_id))


def load_tokenizer(folder: str) -> TextTokenizer:
  """The tokenizer of an HF folder (a Qwen2.5-VL checkpoint, or one `build_offline_tokenizer` wrote)."""
  path = paths.join(folder, "tokenizer.json")
  if not paths.isfile(path):
    raise FileNotFoundError(f"no tokenizer.json in {folder}; point to a Qwen2.5-VL checkpoint folder, or build "
                            "the offline tokenizer with data_pipeline.tokenizer.build_offline_tokenizer(folder)")
  # Read through the path layer (a bucket's file too): `from_file` would need a local path.
  return TextTokenizer(tokenizers.Tokenizer.from_str(paths.read_text(path)), source=path)


def build_offline_tokenizer(folder: str, *, vocab_size: int = 512) -> str:
  """Trains the offline Qwen2-style tokenizer and writes its HF folder; returns `folder`.

  `vocab_size` counts every id, the 14 special tokens included, so it is the embedding size a model needs
  (512: 256 byte tokens + 242 merges + 14 specials). The result depends only on `vocab_size`: the same
  bytes are written on every call, and files already holding them are left untouched (idempotent, safe
  to call from several processes). Other files in `folder` (e.g. model weights) are kept.
  """
  bpe_size = vocab_size - len(QWEN_SPECIAL_TOKENS)
  alphabet = len(pre_tokenizers.ByteLevel.alphabet())
  if bpe_size < alphabet:
    raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs the {alphabet} byte tokens "
                     f"plus {len(QWEN_SPECIAL_TOKENS)} special tokens; pass vocab_size >= "
                     f"{alphabet + len(QWEN_SPECIAL_TOKENS)}")
  vocab, merges = _train_bpe(bpe_size)
  if len(vocab) != bpe_size:
    raise ValueError(f"vocab_size={vocab_size} is too large: the embedded corpus yields only "
                     f"{len(vocab) + len(QWEN_SPECIAL_TOKENS)} tokens; pass vocab_size <= "
                     f"{len(vocab) + len(QWEN_SPECIAL_TOKENS)}")
  tokenizer = _qwen2_tokenizer(vocab, merges)
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
  files = {
      "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
      "tokenizer_config.json": _json(_tokenizer_config(len(vocab))),
      "special_tokens_map.json": _json(_special_tokens_map()),
      "chat_template.json": _json({"chat_template": prompts.CHAT_TEMPLATE}),
      "preprocessor_config.json": _json(_PREPROCESSOR_CONFIG),
      "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
      "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
  }
  if paths.is_url(folder):
    raise paths.PathError(f"build_offline_tokenizer writes a local folder, not {folder}; build it locally and copy "
                          "it to the bucket")
  os.makedirs(folder, exist_ok=True)
  for name, text in files.items():
    _write_if_changed(os.path.join(folder, name), text)
  return folder


def _train_bpe(bpe_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """BPE vocabulary (token -> id) and merges learnt from the embedded corpus."""
  trainer = trainers.BpeTrainer(vocab_size=bpe_size, min_frequency=2, show_progress=False, special_tokens=[],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  scratch = _qwen2_tokenizer({}, [])
  scratch.train_from_iterator(_corpus(), trainer)
  model = json.loads(scratch.to_str())["model"]
  vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
  merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  return vocab, merges


def _corpus() -> list[str]:
  """The project's own text, in a fixed order: label sets, B-A-S words, every task's prompt and answer.

  Special-token strings are left out (they are added tokens, never BPE merges). The DES marker is repeated
  so that the offline tokenizer keeps it as one token. Editing a task prompt changes this vocabulary, so a
  model trained with the offline tokenizer must keep the tokenizer files it was trained with (the HF export
  copies them).
  """
  from data_pipeline import tasks  # imported here: tasks is only needed to build, not to load
  texts = [prompts.DEFAULT_SYSTEM_MESSAGE, tasks.EEMO_SYSTEM_MESSAGE, "system\n", "user\n", "assistant\n",
           "Picture 1: ", "Picture 2: ", " ".join("0123456789"), "0123456789"]
  label_sets = (tasks.MIKELS_8, tasks.EKMAN_7, *tasks.OPTION_SETS.values(), tasks.VAD_DIMENSIONS)
  for names in label_sets:
    texts += [", ".join(names), ", ".join(n.lower() for n in names), ", ".join(n.capitalize() for n in names)]
  texts += [f"{i / 40:.4f}" for i in range(41)] + [str(i) for i in range(0, 1200, 7)]
  for i, (emotion, (background, adjective, noun)) in enumerate(zip(tasks.MIKELS_8 * 2, _BAS_WORDS)):
    record = {"emotion": emotion, "background": background, "attribute": adjective, "subject": noun,
              "confidence": (i * 3) % 11, "bbox": [[10 * i, 20 + i, 300 + 9 * i, 400 - 5 * i]],
              "description": f"A {adjective} {noun} in the {background} evokes {emotion.lower()}."}
    sizes = {"image_hw": (480, 640), "resized_hw": (476, 644)}
    texts += _texts(tasks.ces_messages(record)) + _texts(tasks.des_messages(record, **sizes))
  texts += [tasks.DES_MARKER] * 64 + ["\n\n"] * 64  # the marker whole; "\n\n" one token, as in Qwen's vocabulary
  for record in _eemo_records():
    texts += _texts(tasks.eemo_messages(record))
  return texts


def _texts(messages: list[dict]) -> list[str]:
  """The text of each message (string content, or its text items)."""
  texts = []
  for message in messages:
    content = message["content"]
    texts += [content] if isinstance(content, str) else [item["text"] for item in content if "text" in item]
  return texts


# Background, attribute (adjective) and subject (noun) words for the corpus's B-A-S answers.
_BAS_WORDS = (
    ("beach at sunset", "smiling", "child"), ("city street", "angry", "crowd"), ("snowy mountain", "vast", "peak"),
    ("quiet garden", "peaceful", "old woman"), ("dirty kitchen", "rotten", "food"), ("stadium", "cheering", "fans"),
    ("dark forest", "shadowy", "figure"), ("hospital room", "lonely", "patient"), ("birthday party", "playful", "dog"),
    ("battlefield", "burning", "tank"), ("night sky", "glowing", "aurora"), ("lake", "calm", "swan"),
    ("alley", "crawling", "spider"), ("concert", "bright", "stage"), ("storm", "huge", "wave"),
    ("funeral", "weeping", "family"),
)


def _eemo_records() -> list[dict]:
  """One record per EEmo-Logic task, with a short thought, for the corpus."""
  from data_pipeline import tasks
  think = "The image shows a {} scene, so it evokes {}."
  records = [
      {"task": "yes_no", "question": "What do you think of surprise as one of the three main emotions you felt "
       "from this image?", "answer": "B", "think": think.format("bright", "surprise")},
      {"task": "multiple_choice", "question": "How strong is the sense of dominance?",
       "options": ["A strong sense of dominance", "Moderate control feeling", "A weaker sense of control"],
       "answer": "B", "think": think.format("calm", "contentment")},
      {"task": "emotion_ranking", "answer": ["joy", "surprise", "neutral"], "think": think.format("festive", "joy")},
      {"task": "open_ended", "question": "Why does this image evoke sadness?", "answer": "The empty chair and the "
       "grey light suggest loss.", "think": think.format("grey", "sadness")},
  ]
  for name, options in tasks.OPTION_SETS.items():
    records.append({"task": "dominant_emotion", "options": name, "answer": options[len(records) % len(options)],
                    "think": "The dominant emotion is " + options[0].lower() + "."})
  for i, dimension in enumerate(tasks.VAD_DIMENSIONS):
    records.append({"task": dimension, "answer": 0.125 + 0.3 * i, "think": think.format("tense", dimension)})
  return records


def _qwen2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
  """An empty-or-given BPE with Qwen2's pipeline, field for field as in Qwen2.5's tokenizer.json."""
  tokenizer = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                       continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                       byte_fallback=False))
  tokenizer.normalizer = normalizers.NFC()
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
  ])
  tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                             use_regex=False)
  tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  return tokenizer


def _added_token(content: str) -> dict:
  return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
          "special": True}


def _tokenizer_config(first_special_id: int) -> dict:
  """tokenizer_config.json as Qwen2.5-VL-Instruct ships it (eos `<|im_end|>`, pad `<|endoftext|>`)."""
  return {
      "add_bos_token": False,
      "add_prefix_space": False,
      "added_tokens_decoder": {str(first_special_id + i): _added_token(t) for i, t in enumerate(QWEN_SPECIAL_TOKENS)},
      "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]),
      "bos_token": None,
      "chat_template": prompts.CHAT_TEMPLATE,
      "clean_up_tokenization_spaces": False,
      "eos_token": "<|im_end|>",
      "errors": "replace",
      "model_max_length": 131072,
      "pad_token": "<|endoftext|>",
      "split_special_tokens": False,
      "tokenizer_class": "Qwen2Tokenizer",
      "unk_token": None,
  }


def _special_tokens_map() -> dict:
  token = lambda t: {k: v for k, v in _added_token(t).items() if k != "special"}  # noqa: E731
  return {"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]), "eos_token": token("<|im_end|>"),
          "pad_token": token("<|endoftext|>")}


def _json(data: dict) -> str:
  return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def _write_if_changed(path: str, text: str) -> None:
  """Writes atomically (temp file + rename), and not at all when the file already holds `text`."""
  data = text.encode("utf-8")
  if os.path.isfile(path):
    with open(path, "rb") as f:
      if f.read() == data:
        return
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the folder is shared like any HF folder
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def token_mismatches(model_config, tokenizer: TextTokenizer) -> list[str]:
  """Where a tokenizer does not fit a model: its vision token ids differ, or it has more tokens than the
  model's embedding rows ("image_token_id: model 151655, tokenizer 510"); empty when it fits."""
  special = tokenizer.special
  pairs = [("image_token_id", model_config.image_token_id, special.image_pad),
           ("video_token_id", model_config.video_token_id, special.video_pad),
           ("vision_start_token_id", model_config.vision_start_token_id, special.vision_start),
           ("vision_end_token_id", model_config.vision_end_token_id, special.vision_end)]
  wrong = [f"{name}: model {a}, tokenizer {b}" for name, a, b in pairs if a != b]
  if tokenizer.vocab_size > model_config.text.vocab_size:
    wrong.append(f"vocab_size: model {model_config.text.vocab_size} < tokenizer {tokenizer.vocab_size}")
  return wrong
