"""The Grain pipeline's behaviour: determinism, checkpoint/restore, per-process shards, static shapes,
overlong and bad records, workers, device placement, and packing (checked against unpacked examples).

Sources are lists of SYNTHETIC EmoVerse feature dicts (what `load_records` returns), so bad records can
be injected; rows are traced back to their records by their DES targets, which are unique per record.
"""

import dataclasses
import io
import json
import logging
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from PIL import Image

from data_pipeline import batching, pipeline
from data_pipeline.errors import (CorruptImageError, DatasetError, ImagesOverBudgetError, ImageTooLargeError,
                                  NoUsableRecordError, OverlongRecordError)
from data_pipeline.prompts import IGNORE_INDEX
from data_pipeline.synthetic import synthetic_emoverse_record
from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer
from eemo_jax.model import config as cfglib
from eemo_jax.model.attention import causal_mask
from eemo_jax.model.qwen25vl import Qwen25VL
from eemo_jax.parallel.sharding import make_mesh

NUM_RECORDS = 12


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return build_offline_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def records():
  return [synthetic_emoverse_record(7, i).to_features() for i in range(NUM_RECORDS)]


def config_for(tokenizer_dir, **changes) -> pipeline.PipelineConfig:
  """Small batches of tiny images: frames of at most 256 slots, room for 2-4 of them per batch."""
  base = dict(tokenizer_dir=tokenizer_dir, task="emoverse_ces", seq_len=192, batch_size=4, frame_budget=256,
              patch_budget=768, seed=0, num_epochs=1, prefetch=0)
  return pipeline.PipelineConfig(**{**base, **changes})


def take(config, source, tokenizer, n=None, **kwargs):
  """Batches of a fresh iterator (all of them, or the first n) and the iterator's counters."""
  it = pipeline.make_iterator(config, source=source, tokenizer=tokenizer, **kwargs)
  try:
    batches = [b for _, b in zip(range(n), it)] if n is not None else list(it)
    return batches, it.counters
  finally:
    it.close()


def rows_of(batch, records):
  """Record index of every used row (each record's DES target is its own; empty rows are skipped)."""
  des = np.stack([r["des"] for r in records])  # (records, 1024)
  found = []
  for row in np.flatnonzero(batch["attention_mask"].any(axis=1)):
    (index,) = np.flatnonzero((des == batch["des_target"][row]).all(axis=1))
    found.append(int(index))
  return found


def assert_batches_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_batches_are_deterministic_given_the_seed(tokenizer_dir, tokenizer, records):
  config = config_for(tokenizer_dir, num_epochs=2)
  first, _ = take(config, records, tokenizer)
  again, _ = take(config, records, tokenizer)
  for a, b in zip(first, again, strict=True):
    assert_batches_equal(a, b)
  order = [i for b in first for i in rows_of(b, records)]
  assert sorted(order) == sorted(list(range(NUM_RECORDS)) * 2)
  assert order[:NUM_RECORDS] != order[NUM_RECORDS:]  # each epoch is reshuffled
  other, _ = take(dataclasses.replace(config, seed=1), records, tokenizer)
  assert [i for b in other for i in rows_of(b, records)] != order


def test_restored_state_gives_the_same_following_batches(tokenizer_dir, tokenizer, records, tmp_path):
  """Mid-epoch, with an example carried over to the next batch, across the epoch boundary, via JSON."""
  config = config_for(tokenizer_dir, num_epochs=None, prefetch=2)
  it = pipeline.make_iterator(config, source=records, tokenizer=tokenizer)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what grain.checkpoint writes
  counters = it.counters
  following = [next(it) for _ in range(6)]
  it.close()
  rows = [int(b["attention_mask"].any(axis=1).sum()) for b in following]
  assert min(rows) < config.batch_size  # the image budget ended batches early: examples were carried
  assert counters.examples > NUM_RECORDS // 2 and sum(rows) + counters.examples > NUM_RECORDS  # crosses an epoch

  restored = pipeline.make_iterator(config, source=records, tokenizer=tokenizer)
  restored.set_state(state)
  assert restored.counters == counters
  for expected in following:
    assert_batches_equal(next(restored), expected)
  restored.close()

  # The same through Orbax and grain.checkpoint, as the trainer saves it.
  it = pipeline.make_iterator(config, source=records, tokenizer=tokenizer)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    fresh = pipeline.make_iterator(config, source=records, tokenizer=tokenizer)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for expected in following[:2]:
    assert_batches_equal(next(fresh), expected)
  it.close()
  fresh.close()


def test_processes_see_disjoint_shards_covering_the_data(tokenizer_dir, tokenizer, records):
  config = config_for(tokenizer_dir)
  seen = []
  for index in (0, 1):
    batches, counters = take(config, records, tokenizer, process_index=index, process_count=2)
    seen.append([i for b in batches for i in rows_of(b, records)])
    assert counters.examples == NUM_RECORDS // 2
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(NUM_RECORDS))
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_dataset(config, source=records, tokenizer=tokenizer, process_index=2, process_count=2)


@pytest.mark.parametrize("packing", [False, True])
def test_every_batch_has_the_same_static_shapes(tokenizer_dir, tokenizer, records, packing):
  config = config_for(tokenizer_dir, packing=packing, microbatches=2, num_epochs=2)
  batches, counters = take(config, records, tokenizer)
  expected = pipeline.abstract_batch(config, tokenizer)
  assert len(batches) >= 3 and counters.examples == 2 * NUM_RECORDS
  for batch in batches:
    assert jax.tree.structure(batch) == jax.tree.structure(expected)
    for leaf, spec in zip(jax.tree.leaves(batch), jax.tree.leaves(expected)):
      assert (leaf.shape, leaf.dtype) == (spec.shape, spec.dtype)
  assert batches[0]["position_ids"].shape == (2, 3, config.batch_size, config.seq_len)


def test_bfloat16_pixels_are_the_float32_pixels_rounded(tokenizer_dir, tokenizer, records):
  config = config_for(tokenizer_dir, batch_size=3, patch_budget=1024)
  (wide,), _ = take(config, records, tokenizer, n=1)
  (narrow,), _ = take(dataclasses.replace(config, pixel_dtype="bfloat16"), records, tokenizer, n=1)
  assert narrow["vision"].pixel_values.dtype == jnp.bfloat16
  np.testing.assert_array_equal(narrow["vision"].pixel_values, wide["vision"].pixel_values.astype(jnp.bfloat16))


def test_uint8_pixels_are_normalised_on_the_device_to_the_float32_pixels(tokenizer_dir, tokenizer, records):
  config = config_for(tokenizer_dir, batch_size=3, patch_budget=1024)
  (wide,), _ = take(config, records, tokenizer, n=1)
  (levels,), _ = take(dataclasses.replace(config, pixel_dtype="uint8"), records, tokenizer, n=1)
  vision = levels["vision"]
  assert vision.pixel_values.dtype == np.uint8 and np.shape(vision.pixel_levels) == (3, 256)
  np.testing.assert_array_equal(jax.jit(lambda v: v.float_pixels())(vision), wide["vision"].pixel_values)
  tower = Qwen25VL(cfglib.tiny(), rngs=nnx.Rngs(0)).visual
  np.testing.assert_array_equal(tower(vision), tower(wide["vision"]))
  with pytest.raises(ValueError, match="pixel_levels"):
    vision.replace(pixel_levels=None).float_pixels()


def test_overlong_examples_are_truncated_or_dropped_and_counted(tokenizer_dir, tokenizer, records, caplog):
  maker = pipeline.ExampleMaker(config_for(tokenizer_dir, seq_len=4096, task="emoverse_bas"), tokenizer)
  lengths = np.array([len(maker.map(r)["input_ids"]) for r in records])
  seq_len = int(np.median(lengths))
  longer = int((lengths > seq_len).sum())
  assert 0 < longer < NUM_RECORDS

  config = config_for(tokenizer_dir, task="emoverse_bas", seq_len=seq_len, batch_size=2, patch_budget=512)
  batches, counters = take(config, records, tokenizer)
  assert (counters.examples, counters.truncated, counters.dropped_overlong) == (NUM_RECORDS, longer, 0)
  full = [b["attention_mask"][r].all() for b in batches for r in range(2) if b["attention_mask"][r].any()]
  assert sum(full) == longer + int((lengths == seq_len).sum())  # truncated rows fill seq_len exactly

  batches, counters = take(dataclasses.replace(config, overlong="drop"), records, tokenizer)
  assert (counters.examples, counters.truncated, counters.dropped_overlong) == (NUM_RECORDS - longer, 0, longer)
  assert "seq_len" in counters.last_messages[-1] and "synthetic" in counters.last_messages[-1]

  # A cut inside the image placeholders drops the example even when truncating; with nothing usable left,
  # the stream ends saying so.
  shortest = int(lengths[:2].min())
  with caplog.at_level(logging.WARNING, logger="data_pipeline.pipeline"):
    with pytest.raises(NoUsableRecordError, match=rf"ended after 2 records without a usable one: every record is "
                       rf"longer than data.seq_len=24 \(shortest: {shortest} tokens\)"):
      take(dataclasses.replace(config, seq_len=24), records[:2], tokenizer)
  assert caplog.text.count("split its image") == 2


def test_bad_records_are_skipped_with_their_id_and_strict_stops(tokenizer_dir, tokenizer, records, tmp_path, caplog):
  corrupt = {**records[0], "id": "corrupt-image", "image": b"\xff\xd8 not a jpeg"}
  missing = {**records[1], "id": "missing-file", "image": "photos/absent.jpg"}
  source = records[:3] + [corrupt] + records[3:6] + [missing] + records[6:]
  config = config_for(tokenizer_dir, image_root=str(tmp_path), shuffle=False)
  with caplog.at_level(logging.WARNING, logger="data_pipeline.pipeline"):
    batches, counters = take(config, source, tokenizer)
  assert counters.skipped == 2 and counters.examples == NUM_RECORDS
  assert sorted(i for b in batches for i in rows_of(b, records)) == list(range(NUM_RECORDS))  # no other loss
  assert "'corrupt-image'" in counters.last_messages[0] and "'image'" in counters.last_messages[0]
  assert "'missing-file'" in counters.last_messages[1] and "absent.jpg" in counters.last_messages[1]
  assert "corrupt-image" in caplog.text and "missing-file" in caplog.text

  with pytest.raises(CorruptImageError, match="corrupt-image"):
    take(dataclasses.replace(config, strict=True), source, tokenizer)


def test_two_workers_give_the_same_batches_as_none(tokenizer_dir, tokenizer, records):
  config = config_for(tokenizer_dir, batch_size=3, patch_budget=1024)
  single, single_counters = take(config, records[:10], tokenizer)
  workers = dataclasses.replace(config, worker_count=2)
  it = pipeline.make_iterator(workers, source=records[:10], tokenizer=tokenizer)
  first = next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  it.close()
  assert len(single) == 1 + len(rest) >= 3
  for a, b in zip(single, [first] + rest):
    assert_batches_equal(a, b)
  assert it.counters == single_counters

  restored = pipeline.make_iterator(workers, source=records[:10], tokenizer=tokenizer)  # a worker state
  restored.set_state(state)
  for expected in rest:
    assert_batches_equal(next(restored), expected)
  restored.close()


@pytest.mark.parametrize("microbatches", [0, 2])
def test_device_prefetch_shards_batches_over_the_mesh(tokenizer_dir, tokenizer, records, microbatches):
  mesh = make_mesh({"data": 2, "fsdp": 4})
  config = config_for(tokenizer_dir, batch_size=8, patch_budget=2048, microbatches=microbatches)
  host, _ = take(config, records, tokenizer, n=1)
  device, _ = take(config, records, tokenizer, n=1, mesh=mesh)
  expected = pipeline.batch_shardings(pipeline.abstract_batch(config, tokenizer), mesh)
  for array, sharding, value in zip(jax.tree.leaves(device[0]), jax.tree.leaves(expected), jax.tree.leaves(host[0])):
    assert isinstance(array, jax.Array) and array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), value)
  lead = (None,) * bool(microbatches)
  assert device[0]["input_ids"].sharding.spec == P(*lead, ("data", "fsdp"), None)
  assert device[0]["position_ids"].sharding.spec == P(*lead, None, ("data", "fsdp"), None)
  assert device[0]["vision"].pixel_values.sharding.spec == P(*lead, ("data", "fsdp"), None)


def random_tiny_model(tokenizer):
  """The tiny architecture with the tokenizer's vocabulary and ids; random weights, made on the host (fast)."""
  special, tiny = tokenizer.special, cfglib.tiny()
  config = tiny.replace(text=dataclasses.replace(tiny.text, vocab_size=tokenizer.vocab_size),
                        image_token_id=special.image_pad, video_token_id=special.video_pad,
                        vision_start_token_id=special.vision_start, vision_end_token_id=special.vision_end)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0))))
  rs = np.random.RandomState(0)
  state = jax.tree.map(lambda x: jnp.asarray(1 + 0.1 * rs.randn(*x.shape) if len(x.shape) == 1
                                             else 0.2 * rs.randn(*x.shape), x.dtype), state)
  return nnx.merge(graphdef, state), config


def test_packed_rows_give_the_same_logits_as_examples_run_alone(tokenizer_dir, tokenizer, records):
  model, model_config = random_tiny_model(tokenizer)
  forward = nnx.jit(lambda m, b: m(b["input_ids"], b["attention_mask"], position_ids=b["position_ids"],
                                   vision=b["vision"]).logits)
  config = config_for(tokenizer_dir, shuffle=False, batch_size=2, seq_len=352, patch_budget=1536, packing=True)
  (packed,), counters = take(config, records[:6], tokenizer, n=1, model_config=model_config)
  alone, _ = take(dataclasses.replace(config, packing=False), records[:6], tokenizer)  # same shapes, one compile
  assert packed["attention_mask"].max() >= 3 and counters.examples == 6  # several examples per row

  packed_logits = np.asarray(forward(model, packed))
  alone_rows = [(b, r, np.asarray(logits)) for b in alone for logits in [forward(model, b)] for r in range(2)]
  matched = 0
  for row in range(config.batch_size):
    segments = packed["attention_mask"][row]
    for segment in range(1, segments.max() + 1):
      span = segments == segment
      ids = packed["input_ids"][row][span]
      batch, r, logits = next((b, r, lg) for b, r, lg in alone_rows
                              if np.array_equal(b["input_ids"][r][b["attention_mask"][r] > 0], ids))
      n = len(ids)
      np.testing.assert_array_equal(packed["position_ids"][:, row][:, span], batch["position_ids"][:, r, :n])
      np.testing.assert_array_equal(packed["labels"][row][span], batch["labels"][r, :n])
      np.testing.assert_allclose(packed_logits[row][span], logits[r, :n], atol=1e-5, rtol=0)
      matched += 1
  assert matched == 6
  assert (packed["ces_label"] == IGNORE_INDEX).all()  # rows of several examples carry no head targets

  # With 0/1 masks the segment-aware causal mask is the plain causal + padding mask.
  mask = jnp.asarray(np.random.RandomState(0).randint(0, 2, (3, 9)))
  plain = (jnp.arange(9)[None, :] <= jnp.arange(9)[:, None])[None, None] & mask[:, None, None, :].astype(bool)
  np.testing.assert_array_equal(causal_mask(mask, jnp.arange(9), 9), plain)


def test_settings_that_cannot_work_fail_with_the_fix(tokenizer_dir, tokenizer, records):
  with pytest.raises(ValueError, match="task"):
    pipeline.PipelineConfig(task="ces")
  with pytest.raises(ValueError, match="multiple of 64"):
    pipeline.PipelineConfig(frame_budget=100)
  with pytest.raises(ValueError, match="multiple of frame_budget"):
    pipeline.PipelineConfig(frame_budget=256, patch_budget=640)
  with pytest.raises(ValueError, match="overlong"):
    pipeline.PipelineConfig(overlong="wrap")
  with pytest.raises(NoUsableRecordError, match=r"every record has images needing more vision slots than "
                     r"data.frame_budget=64 / data.patch_budget=128 hold .*raise data.frame_budget and "
                     r"data.patch_budget"):
    take(config_for(tokenizer_dir, frame_budget=64, patch_budget=128, min_pixels=112 * 112), records[:2], tokenizer)
  with pytest.raises(ValueError, match="image_token_id"):
    pipeline.make_iterator(config_for(tokenizer_dir), source=records, tokenizer=tokenizer, model_config=cfglib.tiny())


def test_abstract_batch_of_two_processes_holds_two_vision_groups(tokenizer_dir, tokenizer):
  """Each process lays out its own rows' images; the global batch concatenates them as vision groups."""
  config = config_for(tokenizer_dir, microbatches=2)
  one = pipeline.abstract_batch(config, tokenizer, process_count=1)
  two = pipeline.abstract_batch(config, tokenizer, process_count=2)
  assert (one["vision"].groups, two["vision"].groups) == (1, 2)
  assert two["input_ids"].shape == (2, 2 * one["input_ids"].shape[1], one["input_ids"].shape[2])
  assert two["position_ids"].shape[2] == 2 * one["position_ids"].shape[2]
  assert two["vision"].pixel_values.shape[1] == 2 * one["vision"].pixel_values.shape[1]


# --------------------------------------------------------------------------------------------------
# Records that yield no row: giving up, strict, per-reason counts, the pixel limit, data set errors
# --------------------------------------------------------------------------------------------------

# A repeating stream in which no record fits seq_len=16, read in a fresh process: before the give-up rule it
# never returned (and logged each record); `strict` must stop at the first record.
_UNUSABLE_RUN = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from data_pipeline import pipeline
from data_pipeline.synthetic import synthetic_emoverse_record
from data_pipeline.tokenizer import load_tokenizer
records = [synthetic_emoverse_record(7, i).to_features() for i in range(6)]
for strict in (False, True):
  config = pipeline.PipelineConfig(tokenizer_dir=sys.argv[1], seq_len=16, batch_size=2, frame_budget=256,
                                   patch_budget=512, num_epochs=None, prefetch=2, strict=strict)
  it = pipeline.make_iterator(config, source=records, tokenizer=load_tokenizer(sys.argv[1]))
  try:
    next(it)
    print("a batch")
  except Exception as error:
    print(f"{type(error).__name__}: {str(error).splitlines()[0]}")
  it.close()
"""


def test_a_data_set_with_no_usable_record_stops_with_one_message(tokenizer_dir, tokenizer, records):
  maker = pipeline.ExampleMaker(config_for(tokenizer_dir, seq_len=4096), tokenizer)
  lengths = [len(maker.map(r)["input_ids"]) for r in records[:6]]
  root = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
  try:
    run = subprocess.run([sys.executable, "-c", _UNUSABLE_RUN, tokenizer_dir], cwd=root, capture_output=True,
                         text=True, timeout=300)
  except subprocess.TimeoutExpired as timeout:
    warnings = (timeout.stderr or b"").decode(errors="replace").count("dropping record")
    pytest.fail(f"the pipeline was still reading after 300 s ({warnings} records logged as dropped)")
  assert run.returncode == 0, run.stderr[-3000:]
  lax, strict = run.stdout.splitlines()
  assert lax == (f"NoUsableRecordError: none of the first 1000 records read is usable (data.max_unusable_at_start="
                 f"1000): every record is longer than data.seq_len=16 (shortest: {min(lengths)} tokens). To fix: "
                 f"raise data.seq_len to at least {min(lengths)}, or lower data.max_pixels (fewer image tokens).")
  assert strict.startswith("OverlongRecordError: record 'synthetic-s7-") and "more than seq_len=16" in strict
  dropped = [line for line in run.stderr.splitlines() if line.startswith("dropping record")]
  assert len(dropped) == batching.WARN_IN_FULL  # then one count line, not a line per record
  assert "1000 unusable records so far (overlong 1000)" in run.stderr


def _png(width, height) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), (30, 160, 90)).save(buffer, format="PNG")
  return buffer.getvalue()


def test_skipped_records_are_counted_per_reason_for_the_log(tokenizer_dir, tokenizer, records, tmp_path):
  large = {**records[2], "id": "large-image", "image": _png(200, 200)}  # 40,000 pixels; synthetic ones <= 25,600
  source = records[:4] + [{**records[0], "id": "corrupt", "image": b"GIF89a?"}, large,
                          {**records[1], "id": "missing", "image": "absent.jpg"}] + records[4:8]
  config = config_for(tokenizer_dir, image_root=str(tmp_path), shuffle=False, max_image_pixels=30_000, batch_size=2,
                      patch_budget=512)
  assert config.pixel_limit == 30_000
  it = pipeline.make_iterator(config, source=source, tokenizer=tokenizer)
  assert pipeline.skip_counts(it) == dict.fromkeys(batching.SKIP_REASONS, 0)
  next(it), next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  expected = {**dict.fromkeys(batching.SKIP_REASONS, 0), "corrupt_image": 1, "image_too_large": 1, "missing_file": 1}
  assert pipeline.skip_counts(it) == expected and len(rest) == 2
  assert any("'large-image', field 'image': The image <" in m and "has 200x200 = 40,000 pixels, more than the limit "
             "of 30,000" in m for m in it.counters.last_messages)
  it.close()
  restored = pipeline.make_iterator(config, source=source, tokenizer=tokenizer)
  restored.set_state(state)
  assert pipeline.skip_counts(restored) == expected  # all three lie before the third batch
  restored.close()


def test_the_default_pixel_limit_follows_max_pixels_with_a_cap(tokenizer_dir):
  assert config_for(tokenizer_dir).pixel_limit == 256 * 200704 == 51_380_224  # EmoVerse's max_pixels
  assert config_for(tokenizer_dir, max_pixels=12845056).pixel_limit == Image.MAX_IMAGE_PIXELS == 89_478_485
  with pytest.raises(ValueError, match="max_image_pixels"):
    config_for(tokenizer_dir, max_image_pixels=0)


@pytest.mark.parametrize("case", ["overlong", "images_over_budget", "image_too_large", "overlong_on_a_mesh"])
def test_strict_stops_at_records_too_long_or_too_large(tokenizer_dir, tokenizer, records, case):
  changes, error, message = {
      "overlong": (dict(seq_len=24), OverlongRecordError, "more than seq_len=24, and a cut there would split"),
      "overlong_on_a_mesh": (dict(seq_len=24, batch_size=8, patch_budget=2048), OverlongRecordError, "seq_len=24"),
      "images_over_budget": (dict(frame_budget=64, patch_budget=128, min_pixels=112 * 112), ImagesOverBudgetError,
                             "more than frame_budget=64 / patch_budget=128 hold"),
      "image_too_large": (dict(max_image_pixels=1000), ImageTooLargeError, "more than the limit of 1,000"),
  }[case]
  mesh = make_mesh({"data": 2, "fsdp": 4}) if case.endswith("mesh") else None
  config = config_for(tokenizer_dir, strict=True, shuffle=False, prefetch=2, **changes)
  with pytest.raises(error, match=rf"^record 'synthetic-s7-000000', field .*{message}"):
    take(config, records, tokenizer, mesh=mesh)


def test_a_huge_image_is_skipped_from_its_header_in_little_memory(tokenizer_dir, tmp_path):
  probe = os.path.join(os.path.dirname(__file__), "huge_image_probe.py")
  run = subprocess.run([sys.executable, probe, "pipeline", str(tmp_path), tokenizer_dir], capture_output=True,
                       text=True, timeout=600, cwd=os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.splitlines()[-1])
  assert result["outcome"] == {"outcome": "skipped", "reason": "image_too_large"}
  assert result["extra_mb"] < 64  # decoding it would take 144 MB, its RGB conversion 432 MB more (measured 824)


def test_a_missing_data_dir_or_empty_split_is_one_data_set_error(tokenizer_dir, tokenizer, tmp_path):
  with pytest.raises(DatasetError, match=r"data.data_dir \(PipelineConfig.data_dir\) is empty"):
    pipeline.make_iterator(config_for(tokenizer_dir), tokenizer=tokenizer)
  nowhere = tmp_path / "nowhere"
  with pytest.raises(DatasetError, match=f"the data directory {nowhere} does not exist .*build it first"):
    pipeline.load_source(config_for(tokenizer_dir, data_dir=str(nowhere)))
  (tmp_path / "data").mkdir()
  with pytest.raises(DatasetError, match=f"no data set 'synthetic' under {tmp_path / 'data'}"):
    pipeline.make_iterator(config_for(tokenizer_dir, data_dir=str(tmp_path / "data")), tokenizer=tokenizer)
  with pytest.raises(DatasetError, match="the validation split holds no records; .*data.split"):
    pipeline.make_iterator(config_for(tokenizer_dir, split="validation"), source=[], tokenizer=tokenizer)
