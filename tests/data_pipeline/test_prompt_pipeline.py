"""GRPO's prompt-only pipeline (`PipelineConfig(prompt_only=True)`): left-padded generation prompts with their truth.

The data are the built synthetic EEmo and EmoVerse sets (`builders.build("synthetic", ...)`, read back with
`load_records`). The references are built here from each record on its own, never from the pipeline:
  prompts    `tasks.eemo_messages(record, with_answer=False, system=EEMO_SYSTEM_MESSAGE)` (the Stage-2 GRPO
             prompt) or `tasks.ces_messages(record, with_answer=False)`, tokenised by `encode_chat(...,
             add_generation_prompt=True)` with each image's grid from `preprocess_image` (the HF-exact processor);
  inputs     `eemo_jax.model.prepare_inputs` on those rows LEFT-padded to seq_len, with the images' HF
             `pixel_values` in row order (positions, deltas and the vision slot layout);
  truth      `rewards.GroundTruth.from_records` and `parsing.question` of the stored feature dicts;
  generation `eemo_jax.generate` on the batch's own token rows and the reference images.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from data_pipeline import batching, pipeline, tasks
from data_pipeline.builders import build, load_records
from data_pipeline.errors import NoUsableRecordError, OverlongRecordError
from data_pipeline.image_processor import preprocess_image
from data_pipeline.prompts import encode_chat
from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer
from eemo_jax.generate import generate
from eemo_jax.model import config as cfglib
from eemo_jax.model.qwen25vl import ModelInputs, Qwen25VL, prepare_inputs
from eemo_jax.parallel.sharding import make_mesh
from eemo_jax.rl import parsing, rewards
from eemo_jax.rl.rollout import rollout

SEQ_LEN = 448  # longer than every synthetic prompt (at most ~380 tokens with two images)
TASK_OF = {"eemo": "eemo_tasks", "emoverse": "emoverse_ces"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return build_offline_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """{kind: the built train split}: 2 samples x 9 EEmo questions (one with an image pair); 6 EmoVerse images."""
  folder = tmp_path_factory.mktemp("synthetic")
  out = {}
  for kind, count in (("eemo", 2), ("emoverse", 6)):
    report = build("synthetic", folder, config=kind, seed=3, num_train=count, num_test=1)
    out[kind] = load_records("synthetic", folder, "train", config=report.config)
  return out


def config_for(tokenizer_dir, kind, **changes) -> pipeline.PipelineConfig:
  """Four prompts per batch; 512 vision slots hold two to four images, so image budgets end some batches early."""
  base = dict(tokenizer_dir=tokenizer_dir, task=TASK_OF[kind], seq_len=SEQ_LEN, batch_size=4, frame_budget=256,
              patch_budget=512, shuffle=False, num_epochs=1, prefetch=0, pixel_dtype="float32", prompt_only=True)
  return pipeline.PipelineConfig(**{**base, **changes})


def take(config, source, tokenizer, n=None, **kwargs):
  it = pipeline.make_iterator(config, source=source, tokenizer=tokenizer, **kwargs)
  try:
    return ([b for _, b in zip(range(n), it)] if n is not None else list(it)), it.counters
  finally:
    it.close()


@pytest.fixture(scope="module")
def batches(tokenizer_dir, tokenizer, sources):
  """{kind: (every batch of one epoch, counters)}."""
  return {kind: take(config_for(tokenizer_dir, kind), sources[kind], tokenizer) for kind in TASK_OF}


def by_id(source):
  return {record["id"]: record for record in (source[i] for i in range(len(source)))}


def reference_messages(kind, record):
  if kind == "eemo":
    return tasks.eemo_messages(record, with_answer=False, system=tasks.EEMO_SYSTEM_MESSAGE)
  return tasks.ces_messages(record, with_answer=False)


def reference_images(record, config):
  """HF pixel_values (patches, patch_dim) and grids (images, 3) of a record's images, in prompt order."""
  processed = [preprocess_image(bytes(value), min_pixels=config.min_pixels, max_pixels=config.max_pixels)
               for _, value in pipeline.record_images(record)]
  return ([p["pixel_values"] for p in processed],
          np.concatenate([p["image_grid_thw"] for p in processed]).reshape(-1, 3))


def reference_prompt(kind, record, tokenizer, config) -> np.ndarray:
  _, grids = reference_images(record, config)
  return encode_chat(reference_messages(kind, record), tokenizer, grids, merge_size=config.merge_size,
                     add_generation_prompt=True).input_ids


def reference_rows(kind, batch, records, tokenizer, config):
  """The batch's prompts rebuilt from their records: left-padded (ids, mask), pixel_values and grids.

  A row without a prompt is one pad token in the last column (the documented padding row)."""
  rows, length = config.batch_size, config.seq_len
  ids = np.full((rows, length), tokenizer.special.pad, np.int32)
  mask = np.zeros((rows, length), np.int32)
  mask[:, -1] = 1
  pixels, grids = [], []
  for r, record_id in enumerate(batch["ids"]):
    if not record_id:
      continue
    record = records[record_id]
    prompt = reference_prompt(kind, record, tokenizer, config)
    ids[r, length - len(prompt):] = prompt
    mask[r, length - len(prompt):] = 1
    values, grid = reference_images(record, config)
    pixels += values
    grids.append(grid)
  return ids, mask, np.concatenate(pixels), np.concatenate(grids)


def model_config(tokenizer):
  special, tiny = tokenizer.special, cfglib.tiny()
  return tiny.replace(text=dataclasses.replace(tiny.text, vocab_size=tokenizer.vocab_size),
                      image_token_id=special.image_pad, video_token_id=special.video_pad,
                      vision_start_token_id=special.vision_start, vision_end_token_id=special.vision_end)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys() and a["questions"] == b["questions"] and a["ids"] == b["ids"]
  device = [k for k in a if k not in ("questions", "ids")]
  assert jax.tree.structure([a[k] for k in device]) == jax.tree.structure([b[k] for k in device])
  for x, y in zip(jax.tree.leaves([a[k] for k in device]), jax.tree.leaves([b[k] for k in device])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["eemo", "emoverse"])
def test_prompt_batches_are_left_padded_generation_prompts(batches, sources, tokenizer, tokenizer_dir, kind):
  config = config_for(tokenizer_dir, kind)
  records = by_id(sources[kind])
  found, counters = batches[kind]
  seen = [i for b in found for i in b["ids"] if i]
  assert sorted(seen) == sorted(records) and counters.examples == len(records)  # every record once, none skipped
  assert counters.truncated == 0 and sum(counters.reasons.values()) == 0
  assert any(not all(b["ids"]) for b in found)  # padding rows
  cue = [tokenizer.special.im_start] + tokenizer.encode("assistant\n")
  for batch in found:
    assert batch["input_ids"].shape == (config.batch_size, SEQ_LEN) and "labels" not in batch
    for r, record_id in enumerate(batch["ids"]):
      ids, mask = batch["input_ids"][r], batch["attention_mask"][r]
      if not record_id:  # padding row: one pad token, real, in the last column
        assert (ids == tokenizer.special.pad).all() and mask.sum() == 1 and mask[-1] == 1
        continue
      expected = reference_prompt(kind, records[record_id], tokenizer, config)
      pad = SEQ_LEN - len(expected)
      np.testing.assert_array_equal(mask, [0] * pad + [1] * len(expected))
      np.testing.assert_array_equal(ids[pad:], expected)
      assert (ids[:pad] == tokenizer.special.pad).all()
      np.testing.assert_array_equal(ids[-len(cue):], cue)
  if kind == "eemo":
    assert any(not all(b["ids"]) for b in found[:-1])  # the vision budget ended a batch early: padding mid-stream
    assert any(len(records[i]["images"]) == 2 for b in found for i in b["ids"] if i)  # an image pair was batched
    text = tokenizer.decode(found[0]["input_ids"][0][found[0]["attention_mask"][0] == 1])
    assert text.startswith(f"<|im_start|>system\n{tasks.EEMO_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n")


def test_one_prompt_per_batch_with_the_default_budgets_still_takes_an_image_pair(tokenizer_dir, tokenizer, sources):
  """GRPO recipes roll out one prompt per micro-batch (eemo_7b_grpo: 32 completions, G 8, 4 micro-batches); the
  default vision budgets must hold a pair question's two images, not drop every pair as over budget."""
  config = config_for(tokenizer_dir, "eemo", batch_size=1, patch_budget=None, frame_budget=None,
                      max_pixels=112 * 112)
  found, counters = take(config, sources["eemo"], tokenizer)
  records = by_id(sources["eemo"])
  assert sorted(b["ids"][0] for b in found) == sorted(records)  # every record once
  assert sum(counters.reasons.values()) == 0, counters.reasons
  assert any(len(records[b["ids"][0]]["images"]) == 2 for b in found)


@pytest.mark.parametrize("kind", ["eemo", "emoverse"])
def test_prompt_inputs_equal_prepare_inputs_on_the_left_padded_rows(batches, sources, tokenizer, tokenizer_dir, kind):
  config = config_for(tokenizer_dir, kind)
  layout = pipeline.batch_layout(config, tokenizer)
  records = by_id(sources[kind])
  for batch in batches[kind][0]:
    ids, mask, pixels, grids = reference_rows(kind, batch, records, tokenizer, config)
    expected = prepare_inputs(model_config(tokenizer), ids, mask, pixels, grids, patch_budget=layout.patch_budget,
                              frame_budget=layout.frame_budget)
    inputs = pipeline.to_prompt_batch(batch).inputs
    assert jax.tree.structure(inputs) == jax.tree.structure(expected)
    for ours, reference in zip(jax.tree.leaves(inputs), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(ours, reference)
    assert inputs.position_ids.dtype == inputs.rope_deltas.dtype == np.int32


@pytest.mark.parametrize("kind", ["eemo", "emoverse"])
def test_prompt_truth_and_questions_are_those_of_the_records(batches, sources, tokenizer, kind):
  records = by_id(sources[kind])
  tasks_seen = set()
  for batch in batches[kind][0]:
    prompts = pipeline.to_prompt_batch(batch)
    real = np.array([bool(i) for i in batch["ids"]])
    np.testing.assert_array_equal(prompts.real_rows, real)
    rows = [records[i] for i in batch["ids"] if i]
    expected = rewards.GroundTruth.from_records(rows)
    for field in dataclasses.fields(rewards.GroundTruth):
      ours = np.asarray(getattr(prompts.truth, field.name))
      assert ours.dtype == getattr(expected, field.name).dtype, field.name
      np.testing.assert_array_equal(ours[real], getattr(expected, field.name), err_msg=field.name)
      absent = np.nan if field.name == "score" else -1
      np.testing.assert_array_equal(ours[~real], np.full_like(ours[~real], absent), err_msg=field.name)
    assert [q for q, r in zip(prompts.questions, real) if r] == [parsing.question(r) for r in rows]
    assert all(q is None for q, r in zip(prompts.questions, real) if not r)
    assert prompts.ids == list(batch["ids"])
    for r, question in enumerate(prompts.questions):  # the rewards' options are the ones the prompt shows
      if question is not None and question.task in ("yes_no", "multiple_choice"):
        listed = " ".join(f"{letter}: {text}" for letter, text in question.options.items())
        shown = tokenizer.decode(batch["input_ids"][r][batch["attention_mask"][r] == 1])
        assert f'Choose between one of the following options: {listed}" according to the content' in shown
    tasks_seen.update(rewards.TASKS[t] for t in prompts.truth.task[real])
  if kind == "eemo":
    assert tasks_seen == set(rewards.TASKS) - {parsing.CES}  # every EEmo task type, open_ended included
  else:
    assert tasks_seen == {parsing.CES}


def test_bas_and_des_prompts_are_kept_with_an_unscorable_truth(sources, tokenizer, tokenizer_dir):
  """B-A-S / DES answers have no reward: the rows stay, as open-ended questions (task id, -1 / NaN labels)."""
  records = by_id(sources["emoverse"])
  for task in ("emoverse_bas", "emoverse_des"):
    config = config_for(tokenizer_dir, "emoverse", task=task)
    found, counters = take(config, sources["emoverse"], tokenizer)
    assert counters.examples == len(records)
    batch = found[0]
    record = records[batch["ids"][0]]
    _, grids = reference_images(record, config)
    resized = [(int(h) * config.patch_size, int(w) * config.patch_size) for _, h, w in grids]
    messages = tasks.bas_messages(record, resized_hw=resized[0], with_answer=False)
    expected = encode_chat(messages, tokenizer, grids, add_generation_prompt=True).input_ids
    np.testing.assert_array_equal(batch["input_ids"][0][-len(expected):], expected)
    prompts = pipeline.to_prompt_batch(batch)
    real = prompts.real_rows
    assert real.any() and (prompts.truth.task[real] == rewards.TASK_ID["open_ended"]).all()
    for field in ("choice", "option_set", "emotion", "ranking"):
      assert (getattr(prompts.truth, field)[real] == -1).all()
    assert np.isnan(prompts.truth.score).all()
    assert all(q == parsing.Question("open_ended") for q, r in zip(prompts.questions, real) if r)


@pytest.fixture(scope="module")
def lengths(sources, tokenizer, tokenizer_dir):
  """{record id: tokens of its EEmo generation prompt}."""
  config = config_for(tokenizer_dir, "eemo")
  return {i: len(reference_prompt("eemo", r, tokenizer, config)) for i, r in by_id(sources["eemo"]).items()}


def median(lengths) -> int:
  return sorted(lengths.values())[len(lengths) // 2]


def test_eemo_qa_prompts_are_the_released_questions_with_the_records_truth(sources, tokenizer, tokenizer_dir):
  """eemo_qa as GRPO prompts: the stored question verbatim behind the images, under the Stage-2 system message."""
  records = by_id(sources["eemo"])
  config = config_for(tokenizer_dir, "eemo", task="eemo_qa")
  found, counters = take(config, sources["eemo"], tokenizer)
  assert counters.examples == len(records)
  for batch in found:
    prompts = pipeline.to_prompt_batch(batch)
    for r, record_id in enumerate(prompts.ids):
      if not record_id:
        continue
      record = records[record_id]
      user = [{"type": "image"} for _ in record["images"]] + [{"type": "text", "text": record["question"]}]
      messages = [{"role": "system", "content": tasks.EEMO_SYSTEM_MESSAGE}, {"role": "user", "content": user}]
      expected = encode_chat(messages, tokenizer, reference_images(record, config)[1], add_generation_prompt=True)
      np.testing.assert_array_equal(batch["input_ids"][r][-len(expected.input_ids):], expected.input_ids)
      truth = rewards.GroundTruth.from_records([record])
      for field in dataclasses.fields(rewards.GroundTruth):
        np.testing.assert_array_equal(getattr(prompts.truth, field.name)[r], getattr(truth, field.name)[0])
      assert prompts.questions[r] == parsing.question(record)


def test_an_overlong_prompt_is_dropped_never_cut(sources, tokenizer, tokenizer_dir, lengths):
  config = config_for(tokenizer_dir, "eemo")
  records = by_id(sources["eemo"])
  seq_len = median(lengths)  # about half the prompts are longer
  longer = {i for i, n in lengths.items() if n > seq_len}
  assert 0 < len(longer) < len(records)
  short = dataclasses.replace(config, seq_len=seq_len)
  assert short.overlong == "truncate"  # SFT's setting, which prompts ignore
  it = pipeline.make_iterator(short, source=sources["eemo"], tokenizer=tokenizer)
  found, counters, skips = list(it), it.counters, pipeline.skip_counts(it)
  it.close()
  kept = [i for b in found for i in b["ids"] if i]
  assert sorted(kept) == sorted(set(records) - longer)
  assert counters.truncated == 0 and counters.dropped_overlong == skips["overlong"] == len(longer)
  assert sum(skips.values()) == len(longer)
  assert any("data.seq_len" in m and "never cut" in m for m in counters.last_messages)
  for batch in found:  # the prompts that fit are whole
    for r, record_id in enumerate(batch["ids"]):
      if record_id:
        assert batch["attention_mask"][r].sum() == lengths[record_id]

  with pytest.raises(OverlongRecordError, match=r"data\.seq_len=\d+ \(the prompt bucket\); prompts are never cut"):
    take(dataclasses.replace(short, strict=True), sources["eemo"], tokenizer)
  tiny = dataclasses.replace(config, seq_len=min(lengths.values()) - 1)
  with pytest.raises(NoUsableRecordError, match=r"longer than data\.seq_len=.*raise data\.seq_len to at least"):
    take(tiny, sources["eemo"], tokenizer)


def test_a_resumed_prompt_iterator_gives_the_same_next_batches(sources, tokenizer, tokenizer_dir, lengths):
  """Mid-epoch and across the epoch boundary, with overlong prompts skipped and counted before the save."""
  config = config_for(tokenizer_dir, "eemo", num_epochs=None, shuffle=True, prefetch=2, seq_len=median(lengths))
  it = pipeline.make_iterator(config, source=sources["eemo"], tokenizer=tokenizer)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint writes
  skips = pipeline.skip_counts(it)
  following = [next(it) for _ in range(4)]
  assert skips["overlong"] > 0 and pipeline.skip_counts(it)["overlong"] > skips["overlong"]  # into the next epoch
  it.close()
  restored = pipeline.make_iterator(config, source=sources["eemo"], tokenizer=tokenizer)
  restored.set_state(state)
  assert pipeline.skip_counts(restored) == skips
  for expected in following:
    assert_batches_equal(next(restored), expected)
  restored.close()


def test_prompt_only_refuses_packing_and_microbatches(tokenizer_dir):
  with pytest.raises(ValueError, match="cannot pack them: set packing=False"):
    config_for(tokenizer_dir, "eemo", packing=True)
  with pytest.raises(ValueError, match="set microbatches=0"):
    config_for(tokenizer_dir, "eemo", microbatches=2)


def test_abstract_batch_and_the_mesh_carry_only_the_model_inputs(batches, sources, tokenizer, tokenizer_dir):
  config = config_for(tokenizer_dir, "eemo", batch_size=8, patch_budget=2048)
  abstract = pipeline.abstract_batch(config, tokenizer)
  assert set(abstract) == set(batching.PROMPT_DEVICE_KEYS)
  mesh = make_mesh({"data": 2, "fsdp": 4})
  (host,), _ = take(config, sources["eemo"], tokenizer, n=1)
  (device,), _ = take(config, sources["eemo"], tokenizer, n=1, mesh=mesh)
  expected = pipeline.batch_shardings(abstract, mesh)
  for key in batching.PROMPT_DEVICE_KEYS:
    assert jax.tree.structure(abstract[key]) == jax.tree.structure(host[key])
    for spec, array, value, sharding in zip(jax.tree.leaves(abstract[key]), jax.tree.leaves(device[key]),
                                            jax.tree.leaves(host[key]), jax.tree.leaves(expected[key])):
      assert (spec.shape, spec.dtype) == (value.shape, value.dtype)
      assert isinstance(array, jax.Array) and array.sharding == sharding
      np.testing.assert_array_equal(np.asarray(array), value)
  assert device["input_ids"].sharding.spec == P(("data", "fsdp"), None)
  for key in host.keys() - set(batching.PROMPT_DEVICE_KEYS):  # truth, questions, ids: on the host, unchanged
    assert not isinstance(device[key], jax.Array)
  assert_batches_equal(jax.tree.map(np.asarray, device), host)


def test_generate_and_the_rollout_take_a_prompt_batch_as_is(batches, sources, tokenizer, tokenizer_dir):
  """The batch's rows go to `eemo_jax.generate` unchanged (its left-padding check passes, padding row included),
  and the rollout on the batch's own positions and vision slots decodes the same greedy tokens."""
  config = config_for(tokenizer_dir, "emoverse")
  layout = pipeline.batch_layout(config, tokenizer)
  batch = next(b for b in batches["emoverse"][0] if not all(b["ids"]))  # a batch with a padding row
  _, _, pixels, grids = reference_rows("emoverse", batch, by_id(sources["emoverse"]), tokenizer, config)
  arch = model_config(tokenizer)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen25VL(arch, rngs=nnx.Rngs(0))))
  rs = np.random.RandomState(0)
  state = jax.tree.map(lambda x: jnp.asarray(1 + 0.1 * rs.randn(*x.shape) if len(x.shape) == 1
                                             else 0.2 * rs.randn(*x.shape), x.dtype), state)
  model = nnx.merge(graphdef, state)
  stop = tokenizer.special.stop_ids
  tokens = generate(model, batch["input_ids"], batch["attention_mask"], pixels, grids, max_new_tokens=4,
                    eos_token_id=stop, pad_token_id=tokenizer.special.pad, patch_budget=layout.patch_budget,
                    frame_budget=layout.frame_budget)
  inputs = pipeline.to_prompt_batch(batch).inputs
  assert isinstance(inputs, ModelInputs)
  out = rollout(model, inputs, group_size=1, max_completion_length=4, temperature=0.0, rng=jax.random.key(0),
                eos_ids=stop, pad_id=tokenizer.special.pad)
  np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
