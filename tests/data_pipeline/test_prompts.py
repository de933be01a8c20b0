"""`render_chat` / `encode_chat` against transformers' `Qwen2_5_VLProcessor.apply_chat_template`: the same
string, the same ids with image pads expanded, and labels equal to transformers' own assistant mask."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest

from data_pipeline.prompts import IGNORE_INDEX, encode_chat, render_chat
from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

# The Qwen2.5-VL template with the assistant turn wrapped in {% generation %} (content, <|im_end|> and the
# "\n" after it), as TRL's Qwen2.5-VL training template marks it; transformers turns it into
# `assistant_masks`. Written here independently of data_pipeline.prompts (images and text only).
GENERATION_TEMPLATE = (
    "{% macro body(content) %}{% if content is string %}{{ content }}{% else %}{% for item in content %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ body(message['content']) }}<|im_end|>\n"
    "{% endgeneration %}{% else %}{{ body(message['content']) }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SIZES = [(60, 90), (100, 40), (150, 200), (56, 56)]  # (height, width): different grids after smart_resize


def user(*items):
  return {"role": "user", "content": [{"type": "image", "image": i} if not isinstance(i, str) else
                                      {"type": "text", "text": i} for i in items]}


def assistant(content):
  return {"role": "assistant", "content": content}


CASES = {
    "one_image": lambda im: [user(im[0], "Which emotion does this image evoke?")],
    "several_images_of_different_sizes": lambda im: [
        user("Compare these: ", im[0], " and ", im[1], im[2], "\nWhich one is scarier?")],
    "text_only": lambda im: [{"role": "user", "content": "Name an emotion.  Just one\tplease."}],
    "multi_turn": lambda im: [
        user(im[0], "What emotion?"), assistant("Awe."), {"role": "user", "content": "Why?"},
        assistant([{"type": "text", "text": "The vast sky; "}, {"type": "text", "text": "it feels small."}]),
        user(im[3], "And this one?"), assistant("<think>Calm water.</think><answer>Dominant emotion: joy</answer>")],
    "system_message_given": lambda im: [
        {"role": "system", "content": "You are an emotion analysis expert."}, user(im[1], "Rate the arousal."),
        assistant("<answer>Arousal: 0.6250</answer>")],
    "system_as_list": lambda im: [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, user(im[2], "Emotion?"),
        assistant("Fear")],
    "assistant_starts_with_newline": lambda im: [user(im[0], "Emotion?"), assistant("\n\nAwe and fear.")],
    "assistant_holds_an_image": lambda im: [user(im[0], "Show me a sad one."), assistant([
        {"type": "text", "text": "Here: "}, {"type": "image", "image": im[1]}])],
    "unicode_and_special_strings": lambda im: [
        user(im[2], "Émotion? 日本語 😀 <|im_end|> <|box_start|>"), assistant("Joie — 喜び <|endoftext|>")],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return build_offline_tokenizer(os.fspath(tmp_path_factory.mktemp("offline_tokenizer")))


@pytest.fixture(scope="module")
def tokenizer(folder):
  return load_tokenizer(folder)


@pytest.fixture(scope="module")
def processor(folder):
  """`AutoProcessor.from_pretrained(folder)`; without torchvision (which transformers 5.23 needs for the
  video sub-processor of every Qwen2.5-VL folder, and which this project must not install) the processor is
  built from its image processor and tokenizer only. Kept patched for the module, as the processor consults
  its sub-processor list on every call."""
  from transformers import Qwen2_5_VLProcessor
  from transformers.utils import is_torchvision_available
  if is_torchvision_available():
    yield transformers.AutoProcessor.from_pretrained(folder)
    return
  with mock.patch.object(Qwen2_5_VLProcessor, "get_attributes",
                         classmethod(lambda cls: ["image_processor", "tokenizer"])):
    yield transformers.AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
  from PIL import Image
  rs = np.random.RandomState(0)
  return [Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def grids_of(processor, messages) -> list[list[int]]:
  """(t, h, w) of each image in order of appearance, from the HF image processor."""
  pictures = [item["image"] for m in messages if not isinstance(m["content"], str)
              for item in m["content"] if "image" in item]
  if not pictures:
    return []
  return np.asarray(processor.image_processor(images=pictures)["image_grid_thw"]).tolist()


def hf_ids(processor, messages, **kwargs) -> np.ndarray:
  out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
  return np.asarray(out["input_ids"]).reshape(-1)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_input_ids_equal_transformers(processor, tokenizer, images, case, add_generation_prompt):
  messages = CASES[case](images)
  grids = grids_of(processor, messages)
  expected = hf_ids(processor, messages, add_generation_prompt=add_generation_prompt)
  encoded = encode_chat(messages, tokenizer, grids, add_generation_prompt=add_generation_prompt)
  assert encoded.input_ids.dtype == np.int32 and encoded.labels.dtype == np.int32
  np.testing.assert_array_equal(encoded.input_ids, expected)
  assert encoded.num_images == len(grids)
  assert render_chat(messages, add_generation_prompt=add_generation_prompt) == processor.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  assert (encoded.labels == IGNORE_INDEX).all()  # train=False: a prompt carries no loss


def test_image_pads_expand_to_the_grid_token_count(processor, tokenizer, images):
  messages = CASES["several_images_of_different_sizes"](images)
  grids = grids_of(processor, messages)
  assert len({tuple(g) for g in grids}) == 3
  ids = encode_chat(messages, tokenizer, grids).input_ids
  assert (ids == tokenizer.special.image_pad).sum() == sum(t * h * w // 4 for t, h, w in grids)


def test_vision_ids_match_transformers(processor, tokenizer, images):
  messages = CASES["multi_turn"](images)
  grids = grids_of(processor, messages)
  expected = hf_ids(processor, messages, add_generation_prompt=True, add_vision_id=True)
  encoded = encode_chat(messages, tokenizer, grids, add_generation_prompt=True, add_vision_id=True)
  np.testing.assert_array_equal(encoded.input_ids, expected)
  assert "Picture 2: <|vision_start|>" in render_chat(messages, add_vision_id=True)


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c]([None] * 4)[-1]["role"] == "assistant"))
def test_labels_equal_transformers_assistant_mask(processor, tokenizer, images, case):
  messages = CASES[case](images)
  assert processor.apply_chat_template(messages, tokenize=False, chat_template=GENERATION_TEMPLATE) == (
      processor.apply_chat_template(messages, tokenize=False))
  out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=GENERATION_TEMPLATE,
                                      return_assistant_tokens_mask=True)
  ids = np.asarray(out["input_ids"]).reshape(-1)
  mask = np.asarray(out["assistant_masks"]).reshape(-1).astype(bool)
  pads = np.isin(ids, [tokenizer.special.image_pad, tokenizer.special.video_pad])
  encoded = encode_chat(messages, tokenizer, grids_of(processor, messages), train=True)
  np.testing.assert_array_equal(encoded.input_ids, ids)
  np.testing.assert_array_equal(encoded.labels, np.where(mask & ~pads, ids, IGNORE_INDEX))
  assert mask.any() and not (encoded.labels == tokenizer.special.image_pad).any()


def test_labels_cover_answer_end_and_newline_only(tokenizer):
  """What the mask holds, spelt out: answer text, <|im_end|> and "\\n"; never the assistant cue."""
  encoded = encode_chat([{"role": "user", "content": "Emotion?"}, assistant("Awe")], tokenizer, train=True)
  kept = encoded.labels[encoded.labels != IGNORE_INDEX]
  assert tokenizer.decode(kept) == "Awe<|im_end|>\n"
  assert tokenizer.decode(encoded.input_ids[encoded.labels == IGNORE_INDEX]).endswith("<|im_start|>assistant\n")


def test_inconsistent_inputs_are_clear_errors(processor, tokenizer, images):
  messages = CASES["several_images_of_different_sizes"](images)
  grids = grids_of(processor, messages)
  with pytest.raises(ValueError, match="more images than image_grid_thw has rows"):
    encode_chat(messages, tokenizer, grids[:2])
  with pytest.raises(ValueError, match="image_grid_thw has 4 rows but the messages hold 3 images"):
    encode_chat(messages, tokenizer, grids + [[1, 2, 2]])
  with pytest.raises(ValueError, match="multiples of merge_size=2"):
    encode_chat(messages, tokenizer, [[1, 3, 4]] + grids[1:])
  with pytest.raises(ValueError, match="add_generation_prompt=False"):
    encode_chat(CASES["multi_turn"](images), tokenizer, [[1, 4, 4]] * 2, train=True, add_generation_prompt=True)
  with pytest.raises(ValueError, match="no message has role 'assistant'"):
    encode_chat(CASES["text_only"](images), tokenizer, train=True)
  with pytest.raises(ValueError, match=r"literal <\|image_pad\|>"):
    encode_chat([{"role": "user", "content": "a <|image_pad|> b"}], tokenizer)
  with pytest.raises(ValueError, match="images only"):
    encode_chat([{"role": "user", "content": [{"type": "video"}]}], tokenizer)
  with pytest.raises(TypeError, match="wrap it in a list"):
    render_chat({"role": "user", "content": "hi"})
