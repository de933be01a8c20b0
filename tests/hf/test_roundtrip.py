"""HF folder -> `load_hf` -> `save_hf` -> transformers' `from_pretrained`: nothing lost, nothing changed.

Each source layout (tied and untied embeddings, the 5.x in-memory key layout on disk, a 4.x flat
Hub-style config.json) is exported once per module; the export must load in transformers 5.23 with
no missing or unexpected keys, the same tensors bit for bit, and the same logits on an image batch.
Also: sharded writes and reading them back, bf16 export, the tied-but-lm_head-present edge case
(spec §2.2), and the Orbax checkpoint round trip.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from hf_fixtures import EOS, make_batch, save_hf_model, tiny_hf_config, torch_logits  # noqa: E402

from eemo_jax.hf.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from eemo_jax.hf.load import load_hf  # noqa: E402
from eemo_jax.hf.safetensors_io import SafetensorsFolder  # noqa: E402
from eemo_jax.hf.save import save_hf  # noqa: E402

# Stand-ins for the tokenizer / processor files of a real checkpoint: export copies them verbatim.
ASSETS = {
    "tokenizer_config.json": '{"model_max_length": 512, "tokenizer_class": "Qwen2Tokenizer"}\n',
    "vocab.json": '{"a": 0, "b": 1}\n',
    "merges.txt": "#version: 0.2\na b\n",
    "preprocessor_config.json": '{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14}\n',
    "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}\n",
}
BATCH = make_batch([[(1, 4, 6)], [(1, 2, 2)]])  # two images of different sizes, left padding

# The 4.x / Hub layout: text fields at the root, legacy rope_scaling, no text_config (spec §1.1).
FLAT_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 125, "eos_token_id": EOS, "hidden_act": "silu", "hidden_size": 64,
    "image_token_id": 120, "video_token_id": 121, "vision_start_token_id": 122, "vision_end_token_id": 123,
    "vision_token_id": 121, "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 512,
    "max_window_layers": 2, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "rope_theta": 1e6,
    "sliding_window": 512, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.49.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 128,
    "vision_config": {
        "depth": 3, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
        "in_chans": 3, "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2,
        "model_type": "qwen2_5_vl"},
}

VARIANTS = ["untied", "tied", "5x_keys", "4x_flat_config"]


def load_torch(folder):
  """transformers' own loader with its loading report; the report must be empty."""
  model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      folder, attn_implementation="eager", output_loading_info=True)
  return model.eval(), info


def assert_clean_load(info):
  assert {k: sorted(v) for k, v in info.items()} == {
      "missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


def assert_same_tensors(ref, other):
  a, b = ref.state_dict(), other.state_dict()
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def write_assets(folder):
  for name, text in ASSETS.items():
    with open(os.path.join(folder, name), "w") as f:
      f.write(text)


def build_source(folder, variant):
  """An HF folder in the given layout, with tokenizer stand-ins; returns the torch model loaded from it."""
  if variant == "4x_flat_config":
    save_hf_model(folder, tiny_hf_config(tie=False))
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(FLAT_CONFIG, f, indent=2)
    os.remove(os.path.join(folder, "generation_config.json"))  # old exports may lack one
  elif variant == "5x_keys":
    save_hf_model(folder, tiny_hf_config(eos=EOS), save_original_format=False)
    keys = SafetensorsFolder(folder).keys()
    assert all(k.startswith(("model.visual.", "model.language_model.", "lm_head.")) for k in keys), keys[:3]
  else:
    save_hf_model(folder, tiny_hf_config(tie=variant == "tied"))
  write_assets(folder)
  ref, info = load_torch(folder)
  assert_clean_load(info)
  return ref


@pytest.fixture(scope="module", params=VARIANTS)
def exported(request, tmp_path_factory):
  """(variant, source folder, torch model of the source, export folder, torch model of the export, info)."""
  variant = request.param
  src = os.fspath(tmp_path_factory.mktemp(f"src_{variant}"))
  out = os.fspath(tmp_path_factory.mktemp(f"out_{variant}"))
  ref = build_source(src, variant)
  save_hf(load_hf(src), out, source_dir=src)
  back, info = load_torch(out)
  return dict(variant=variant, src=src, ref=ref, out=out, back=back, info=info)


def test_export_loads_with_no_missing_or_unexpected_keys(exported):
  assert_clean_load(exported["info"])


def test_export_tensors_identical(exported):
  assert_same_tensors(exported["ref"], exported["back"])


def test_export_logits_identical(exported):
  want = torch_logits(exported["ref"], BATCH)
  got = torch_logits(exported["back"], BATCH)
  assert np.array_equal(want, got)


def test_export_writes_on_disk_layout(exported):
  """4.x keys (what save_pretrained writes), no lm_head when tied, one file below the shard size."""
  out = exported["out"]
  assert sorted(n for n in os.listdir(out) if "safetensors" in n) == ["model.safetensors"]
  keys = set(SafetensorsFolder(out).keys())
  assert all(k.startswith(("visual.", "model.", "lm_head.")) for k in keys)
  assert not any(k.startswith(("model.visual.", "model.language_model.")) for k in keys)
  tied = exported["ref"].config.tie_word_embeddings
  assert ("lm_head.weight" in keys) == (not tied)
  if exported["variant"] in ("untied", "tied"):  # the source was written by save_pretrained itself
    src = SafetensorsFolder(exported["src"])
    assert keys == set(src.keys())
    dst = SafetensorsFolder(out)
    for k in keys:
      assert (dst.shape(k), dst.dtype(k)) == (src.shape(k), src.dtype(k)), k


def test_export_config_and_assets(exported):
  out, src, ref, back = exported["out"], exported["src"], exported["ref"], exported["back"]
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["dtype"] == "float32" and "text_config" in config
  assert back.config.tie_word_embeddings == ref.config.tie_word_embeddings
  for sub in ("text_config", "vision_config"):
    a, b = getattr(ref.config, sub).to_dict(), getattr(back.config, sub).to_dict()
    for field in ("hidden_size", "num_hidden_layers", "depth", "rms_norm_eps", "rope_parameters", "tokens_per_second",
                  "fullatt_block_indexes", "window_size", "vocab_size", "num_key_value_heads", "eos_token_id"):
      assert _semantic(a.get(field)) == _semantic(b.get(field)), (sub, field)
  for name, text in ASSETS.items():
    with open(os.path.join(out, name)) as f:
      assert f.read() == text, name
  generation = transformers.GenerationConfig.from_pretrained(out)
  if os.path.exists(os.path.join(src, "generation_config.json")):
    with open(os.path.join(src, "generation_config.json")) as a, open(os.path.join(out, "generation_config.json")) as b:
      assert a.read() == b.read()
  else:  # derived from the config: the Hub-style config's special ids
    assert (generation.bos_token_id, generation.eos_token_id) == (125, EOS)


def _semantic(value):
  """Config values as they act: the legacy `type: mrope` that 5.23 keeps beside `rope_type` is a no-op."""
  if isinstance(value, dict):
    return {k: v for k, v in value.items() if k != "type"}
  return value


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  """(source folder, its torch model, the JAX model loaded from it)."""
  src = os.fspath(tmp_path_factory.mktemp("untied"))
  ref = build_source(src, "untied")
  return src, ref, load_hf(src)


def test_sharded_export_writes_index_and_reads_back(untied, tmp_path):
  src, ref, model = untied
  out = os.fspath(tmp_path / "sharded")
  names = save_hf(model, out, source_dir=src, max_shard_bytes=64 * 2**10)
  assert len(names) >= 3 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
  assert not os.path.exists(os.path.join(out, "model.safetensors"))
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(names)
  assert set(index["weight_map"]) == set(SafetensorsFolder(src).keys())
  back, info = load_torch(out)
  assert_clean_load(info)
  assert_same_tensors(ref, back)
  assert np.array_equal(torch_logits(ref, BATCH), torch_logits(back, BATCH))
  again = load_hf(out)  # our reader on our sharded writer
  assert_same_params(model, again)


def test_export_replaces_stale_weight_files(untied, tmp_path):
  """A single-file export over a sharded one leaves no old index pointing at old shards."""
  src, ref, model = untied
  out = os.fspath(tmp_path / "out")
  save_hf(model, out, max_shard_bytes=64 * 2**10)
  assert save_hf(model, out, overwrite=True) == ["model.safetensors"]
  assert sorted(n for n in os.listdir(out) if "safetensors" in n) == ["model.safetensors"]
  back, info = load_torch(out)
  assert_clean_load(info)
  assert_same_tensors(ref, back)


def test_bfloat16_export(untied, tmp_path):
  src, ref, model = untied
  out = os.fspath(tmp_path / "bf16")
  save_hf(model, out, dtype="bfloat16")
  folder = SafetensorsFolder(out)
  assert {folder.dtype(k) for k in folder.keys()} == {np.dtype(ml_dtypes.bfloat16)}
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  back, info = load_torch(out)
  assert_clean_load(info)
  want = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
  got = back.state_dict()
  assert sorted(want) == sorted(got)
  for k in want:
    assert got[k].dtype == torch.bfloat16 and torch.equal(want[k], got[k]), k


def test_export_without_source_derives_generation_config(tmp_path):
  src = os.fspath(tmp_path / "src")
  save_hf_model(src, tiny_hf_config(eos=EOS, bos_token_id=125, pad_token_id=126))
  out = os.fspath(tmp_path / "out")
  save_hf(load_hf(src), out)
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
  want = transformers.GenerationConfig.from_pretrained(src).to_dict()
  got = transformers.GenerationConfig.from_pretrained(out).to_dict()
  assert got == want


# --------------------------------------------------------------------------------------------------
def test_tied_config_with_stored_lm_head_loads_untied(tmp_path):
  """Spec §2.2: tied in config.json but lm_head.weight on disk -> transformers keeps lm_head untied."""
  src = os.fspath(tmp_path / "src")
  save_hf_model(src, tiny_hf_config(tie=True))
  path = os.path.join(src, "model.safetensors")
  tensors = safetensors_torch.load_file(path)
  lm_head = torch.randn_like(tensors["model.embed_tokens.weight"])
  safetensors_torch.save_file({**tensors, "lm_head.weight": lm_head}, path, metadata={"format": "pt"})
  ref, info = load_torch(src)
  assert_clean_load(info)
  assert torch.equal(ref.lm_head.weight, lm_head)  # the premise: transformers keeps the stored head

  model = load_hf(src)
  assert model.config.tie_word_embeddings is False and model.lm_head is not None
  assert np.array_equal(np.asarray(model.lm_head.kernel[...]), lm_head.numpy().T)
  assert not np.array_equal(np.asarray(model.lm_head.kernel[...]),
                            np.asarray(model.language_model.embed_tokens.embedding[...]).T)

  out = os.fspath(tmp_path / "out")
  save_hf(model, out)
  assert "lm_head.weight" in SafetensorsFolder(out).keys()
  back, info = load_torch(out)
  assert_clean_load(info)
  assert_same_tensors(ref, back)
  assert np.array_equal(torch_logits(ref, BATCH), torch_logits(back, BATCH))


# --------------------------------------------------------------------------------------------------
def flat_params(model) -> dict:
  return {path: np.asarray(jax.device_get(v.get_value()))
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
  pa, pb = flat_params(a), flat_params(b)
  assert sorted(pa) == sorted(pb)
  for path in pa:
    assert pa[path].dtype == pb[path].dtype and np.array_equal(pa[path], pb[path]), path


def test_orbax_checkpoint_roundtrip(untied, tmp_path):
  src, _, model = untied
  ckpt = os.fspath(tmp_path / "ckpt")
  save_checkpoint(model, ckpt)
  with open(os.path.join(ckpt, "model_config.json")) as f:
    assert json.load(f) == model.config.to_hf()
  restored = load_checkpoint(ckpt)
  assert restored.config == model.config
  assert_same_params(model, restored)

  bf16 = load_checkpoint(ckpt, dtype="bfloat16")
  for path, value in flat_params(bf16).items():
    assert value.dtype == ml_dtypes.bfloat16, path
    assert np.array_equal(value, flat_params(model)[path].astype(ml_dtypes.bfloat16)), path


def test_orbax_checkpoint_then_export_matches_direct_export(untied, tmp_path):
  """Checkpoint -> model -> HF writes the same bytes as exporting the imported model directly."""
  src, _, model = untied
  ckpt = os.fspath(tmp_path / "ckpt")
  save_checkpoint(model, ckpt)
  direct, via = os.fspath(tmp_path / "direct"), os.fspath(tmp_path / "via")
  save_hf(model, direct)
  save_hf(load_checkpoint(ckpt), via)
  for name in ("model.safetensors", "config.json", "generation_config.json"):
    with open(os.path.join(direct, name), "rb") as a, open(os.path.join(via, name), "rb") as b:
      assert a.read() == b.read(), name
  shutil.rmtree(ckpt)
