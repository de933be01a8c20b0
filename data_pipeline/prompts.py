"""Qwen2.5-VL chat prompts as token ids, without transformers (spec §5.4-5.5, §7.1).

`render_chat` produces exactly the string the Qwen2.5-VL chat template renders. `encode_chat` turns the same
messages into `input_ids` and SFT `labels`: special tokens are emitted by id, the text between two special
tokens is encoded in one piece (so BPE never merges across a special token, and merges inside the text are
those of the whole rendered string, as transformers tokenises it), and each `<|image_pad|>` is expanded to
its image's token count. The result equals `processor.apply_chat_template(messages, tokenize=True)`.

Messages use the HF format: `{"role": ..., "content": str | [items]}` with items `{"type": "image"}`
(or any dict holding an "image" / "image_url" key, as the template tests), `{"type": "text", "text": ...}`.

No transformers, jax or torch import: this runs in data-loading workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from data_pipeline.image_processor import num_image_tokens

IGNORE_INDEX = -100  # labels at positions that carry no loss (transformers' CrossEntropy ignore_index)
DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"

# The chat template of Qwen2-VL / Qwen2.5-VL (chat_template.json of the released checkpoints; the
# transformers Qwen2-VL processor tests use the same string). `render_chat` below is its Python transcription.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class _Piece:
  """One span of the rendered chat: a special token or plain text, and whether it is an SFT target."""
  text: str
  special: bool
  target: bool


@dataclasses.dataclass(frozen=True)
class EncodedChat:
  """One tokenised conversation.

  input_ids: (seq,) int32, image pads expanded.
  labels: (seq,) int32, `input_ids` at the positions that carry loss, IGNORE_INDEX elsewhere; not shifted
    (the loss shifts them, as transformers' `ForCausalLMLoss` does).
  num_images: images in the conversation, i.e. rows of the `image_grid_thw` that was expanded.
  """
  input_ids: np.ndarray
  labels: np.ndarray
  num_images: int


def render_chat(messages: Sequence[Mapping], *, add_generation_prompt: bool = False,
                add_vision_id: bool = False) -> str:
  """The Qwen2.5-VL chat template's output for `messages`, character for character."""
  return "".join(p.text for p in _pieces(messages, add_generation_prompt, add_vision_id))


def encode_chat(messages: Sequence[Mapping], tokenizer, image_grid_thw: Sequence[Sequence[int]] = (), *,
                merge_size: int = 2, add_generation_prompt: bool = False, train: bool = False,
                add_vision_id: bool = False) -> EncodedChat:
  """Token ids of the rendered chat, with image pads expanded and (when `train`) SFT labels.

  `tokenizer` is a `data_pipeline.tokenizer.TextTokenizer`. `image_grid_thw[i]` is the (t, h, w) patch grid
  of the i-th image in order of appearance; its `<|image_pad|>` becomes t*h*w // merge_size**2 pads.

  Labels (`train=True`) follow TRL's `assistant_only_loss`, i.e. the `{% generation %}` span of TRL's
  Qwen2.5-VL training template: every assistant turn's content, its closing `<|im_end|>` **and the "\\n"
  after it** carry loss; the `<|im_start|>assistant\\n` cue, system and user turns do not. A token that
  straddles the span's edge (e.g. "\\n\\n" when the content starts with a newline) counts as inside, as in
  transformers' assistant mask. One deliberate difference from TRL's collator: image and video pads never
  carry loss, even inside an assistant turn, since the model cannot predict visual features. With
  `train=False` every label is IGNORE_INDEX (a prompt for generation or scoring).
  """
  if train and add_generation_prompt:
    raise ValueError("train=True needs the assistant answer in `messages`; add_generation_prompt=True "
                     "would append an empty assistant turn after it. Pass add_generation_prompt=False.")
  if train and not any(m.get("role") == "assistant" for m in messages):
    raise ValueError("train=True but no message has role 'assistant': there is nothing to learn. "
                     "Append the answer as {'role': 'assistant', 'content': ...}.")
  if merge_size < 1:
    raise ValueError(f"merge_size must be >= 1, got {merge_size}")
  special = tokenizer.special
  pad_ids = {special.image_pad, special.video_pad}
  image_tokens = [_image_tokens(g, merge_size, i) for i, g in enumerate(image_grid_thw)]

  ids: list[int] = []
  targets: list[bool] = []
  num_images = 0
  for run in _runs(_pieces(messages, add_generation_prompt, add_vision_id)):
    if run[0].special:
      piece = run[0]
      token = _special_id(tokenizer, piece.text)
      if token == special.image_pad:
        if num_images >= len(image_tokens):
          raise ValueError(f"the messages hold more images than image_grid_thw has rows ({len(image_tokens)}); "
                           "pass one (t, h, w) grid per image, in order of appearance")
        count = image_tokens[num_images]
        num_images += 1
      elif token == special.video_pad:
        raise ValueError("encode_chat supports images only; EEmo-JAX does not train on videos. Pass the "
                         "frames as images, or use the HF processor for video.")
      else:
        count = 1
      ids.extend([token] * count)
      targets.extend([piece.target] * count)
      continue
    text_ids, text_targets = _encode_run(run, tokenizer)
    if pad_ids.intersection(text_ids):
      raise ValueError("message text contains a literal <|image_pad|> or <|video_pad|>; put images in the "
                       "content list as {'type': 'image'} instead of writing their placeholder tokens")
    ids.extend(text_ids)
    targets.extend(text_targets)
  if num_images != len(image_tokens):
    raise ValueError(f"image_grid_thw has {len(image_tokens)} rows but the messages hold {num_images} images; "
                     "pass one (t, h, w) grid per {'type': 'image'} item")

  input_ids = np.asarray(ids, np.int32)  # (seq,)
  keep = np.asarray(targets, bool) & ~np.isin(input_ids, list(pad_ids)) if train else np.zeros(len(ids), bool)
  labels = np.where(keep, input_ids, IGNORE_INDEX).astype(np.int32)  # (seq,)
  return EncodedChat(input_ids=input_ids, labels=labels, num_images=num_images)


def _pieces(messages: Sequence[Mapping], add_generation_prompt: bool, add_vision_id: bool) -> Iterator[_Piece]:
  """The template, as pieces; assistant turns' content, `<|im_end|>` and "\\n" are marked as targets."""
  if isinstance(messages, Mapping) or isinstance(messages, str):
    raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts, got a single "
                    f"{type(messages).__name__}; wrap it in a list")
  images = videos = 0
  for n, message in enumerate(messages):
    role = message.get("role")
    content = message.get("content")
    if role is None:
      raise ValueError(f"message {n} has no 'role'; give each message a role (system, user or assistant)")
    if n == 0 and role != "system":
      yield from (_Piece(IM_START, True, False), _Piece(f"system\n{DEFAULT_SYSTEM_MESSAGE}", False, False),
                  _Piece(IM_END, True, False), _Piece("\n", False, False))
    target = role == "assistant"
    yield _Piece(IM_START, True, False)
    yield _Piece(f"{role}\n", False, False)
    if isinstance(content, str):
      yield _Piece(content, False, target)
    elif isinstance(content, Sequence):
      for item in content:
        if not isinstance(item, Mapping):
          raise TypeError(f"message {n}: content items must be dicts like {{'type': 'text', 'text': ...}}, "
                          f"got {type(item).__name__}")
        kind = item.get("type")
        if kind == "image" or "image" in item or "image_url" in item:
          images += 1
          if add_vision_id:
            yield _Piece(f"Picture {images}: ", False, target)
          yield from (_Piece(VISION_START, True, target), _Piece(IMAGE_PAD, True, target),
                      _Piece(VISION_END, True, target))
        elif kind == "video" or "video" in item:
          videos += 1
          if add_vision_id:
            yield _Piece(f"Video {videos}: ", False, target)
          yield from (_Piece(VISION_START, True, target), _Piece(VIDEO_PAD, True, target),
                      _Piece(VISION_END, True, target))
        elif "text" in item:
          yield _Piece(str(item["text"]), False, target)
    else:
      raise TypeError(f"message {n}: content must be a string or a list of items, got {type(content).__name__}")
    yield _Piece(IM_END, True, target)
    yield _Piece("\n", False, target)
  if add_generation_prompt:
    yield _Piece(IM_START, True, False)
    yield _Piece("assistant\n", False, False)


def _runs(pieces: Iterator[_Piece]) -> Iterator[list[_Piece]]:
  """Each special token alone, and each maximal run of text pieces between special tokens."""
  text: list[_Piece] = []
  for piece in pieces:
    if piece.special:
      if text:
        yield text
        text = []
      yield [piece]
    elif piece.text:
      text.append(piece)
  if text:
    yield text


def _encode_run(run: list[_Piece], tokenizer) -> tuple[list[int], list[bool]]:
  """Encodes the concatenated text of a run; a token is a target when it overlaps a target piece."""
  text = "".join(p.text for p in run)
  ids, offsets = tokenizer.encode_with_offsets(text)
  spans, start = [], 0
  for p in run:
    if p.target:
      spans.append((start, start + len(p.text)))
    start += len(p.text)
  targets = [any(a < end and b > begin for begin, end in spans) for a, b in offsets]
  return ids, targets


def _special_id(tokenizer, token: str) -> int:
  special = tokenizer.special
  return {IM_START: special.im_start, IM_END: special.im_end, VISION_START: special.vision_start,
          VISION_END: special.vision_end, IMAGE_PAD: special.image_pad, VIDEO_PAD: special.video_pad}[token]


def _image_tokens(grid: Sequence[int], merge_size: int, index: int) -> int:
  """LLM tokens of one image (`num_image_tokens`), once the grid is checked to be whole merge blocks."""
  grid = [int(x) for x in np.asarray(grid).reshape(-1)]
  if len(grid) != 3 or min(grid) < 1:
    raise ValueError(f"image_grid_thw[{index}] = {grid}: expected three positive integers (t, h, w)")
  if grid[1] % merge_size or grid[2] % merge_size:
    raise ValueError(f"image_grid_thw[{index}] = {grid}: h and w must be multiples of merge_size={merge_size}; "
                     "take the grid from the image processor, whose resize makes them so")
  return num_image_tokens(grid, merge_size)
