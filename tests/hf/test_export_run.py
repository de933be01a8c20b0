"""`eemo-jax export-hf RUN_DIR [--step N] OUT_DIR`: any saved step of a run, for transformers and for peft.

The runs are tests/chain_fixtures.py's: stage 1 (preset base weights, LoRA and the pooled head, a checkpoint
after each of its 3 steps) and stage 2 (started from stage 1, new LoRA on frozen base weights). The
reference for a step is the run's own resume path (`chain_fixtures.restore_step`), whose logits the
export must give in transformers; an adapter export must give them in `PeftModel` on stage 1's export.
"""

from __future__ import annotations

import filecmp
import json
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from chain_fixtures import STAGE1_STEPS, backbone_weights, chain_runs, jax_logits, restore_step  # noqa: E402
from hf_fixtures import make_batch, torch_logits  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from eemo_jax.cli import main  # noqa: E402
from eemo_jax.hf.heads_io import load_head  # noqa: E402
from eemo_jax.hf.load import read_config_file  # noqa: E402
from eemo_jax.model.lora import merge_lora  # noqa: E402

TOL = 1e-4  # ours vs torch, fp32 (the parity bar of the model and PEFT tests)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  return chain_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def batch(chain):
  """Two rows with an image each, in the tiny model's vocabulary (its vision token ids)."""
  arch = read_config_file(os.path.join(chain.stage1, "model_config.json"))
  return make_batch([[(1, 4, 6)], [(1, 2, 2)]],
                    vision_ids=(arch.image_token_id, arch.vision_start_token_id, arch.vision_end_token_id))


def load_torch(folder):
  model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      folder, attn_implementation="eager", output_loading_info=True)
  assert not any(info.values()), info
  return model.eval()


def valid_diff(a, b, batch):
  return float(np.abs(a - b)[batch["attention_mask"].astype(bool)].max())


@pytest.fixture(scope="module")
def step2_export(chain, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export_run") / "step2")
  assert main(["export-hf", chain.stage1, "--step", "2", out]) == 0
  return out


def test_a_non_final_step_exports_with_its_own_logits(chain, step2_export, batch):
  """Step 2 of 3, LoRA merged: transformers gives the step's logits (not the final step's), the head's
  safetensors are that step's, the tokenizer files are the run's."""
  reference = restore_step(chain.stage1, 2, chain.tokenizer_dir)
  want = jax_logits(merge_lora(reference.backbone), batch)
  got = torch_logits(load_torch(step2_export), batch)
  diff = valid_diff(got, want, batch)
  print(f"step 2: max |transformers - ours| = {diff:.2e}")
  assert diff < TOL
  final = jax_logits(merge_lora(restore_step(chain.stage1, STAGE1_STEPS, chain.tokenizer_dir).backbone), batch)
  assert valid_diff(got, final, batch) > 100 * TOL  # the step matters: step 3's weights give other logits

  head, want_head = backbone_weights(load_head(step2_export)), backbone_weights(reference.head)
  assert head.keys() == want_head.keys()
  for path, value in want_head.items():
    np.testing.assert_array_equal(head[path], value, err_msg=path)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert filecmp.cmp(os.path.join(chain.tokenizer_dir, name), os.path.join(step2_export, name), shallow=False)


def test_the_final_step_exports_what_the_run_exported(chain, tmp_path):
  """`export-hf RUN_DIR` (the newest step) writes the run's own end-of-run export again, tensor for tensor."""
  out = str(tmp_path / "final")
  assert main(["export-hf", chain.stage1, out]) == 0
  for name in ("model.safetensors", "emotion_head.safetensors"):
    got, want = load_file(os.path.join(out, name)), load_file(os.path.join(chain.stage1_export, name))
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")


def test_bfloat16_export(chain, step2_export, tmp_path):
  out = str(tmp_path / "bf16")
  assert main(["export-hf", chain.stage1, "--step", "2", "--dtype", "bfloat16", out]) == 0
  model = load_torch(out)
  assert model.dtype == torch.bfloat16
  reference = load_torch(step2_export).state_dict()
  for key, value in model.state_dict().items():
    assert torch.equal(value, reference[key].to(torch.bfloat16)), key


def test_adapter_export_gives_the_runs_logits_in_peft(chain, batch, tmp_path):
  """Stage 2's adapters, on the model it started from (stage 1's export): `PeftModel` computes what stage 2's
  last step computes, so the adapters are right and stage 2's base is stage 1's final weights."""
  out = str(tmp_path / "adapter")
  assert main(["export-hf", chain.stage2, "--adapter", out]) == 0
  with open(os.path.join(out, "adapter_config.json")) as f:
    adapter_config = json.load(f)
  assert adapter_config["base_model_name_or_path"] == chain.stage1 and adapter_config["r"] == 4
  assert {"emotion_head.safetensors", "tokenizer.json"} <= set(os.listdir(out))

  base = load_torch(chain.stage1_export)
  without = torch_logits(base, batch)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = peft.PeftModel.from_pretrained(base, out).eval()
  assert not [str(w.message) for w in caught if "adapter keys" in str(w.message)]
  got = torch_logits(model, batch)
  want = jax_logits(merge_lora(restore_step(chain.stage2, 2, chain.tokenizer_dir).backbone), batch)
  diff = valid_diff(got, want, batch)
  print(f"stage 2 adapter: max |PeftModel - ours| = {diff:.2e}")
  assert diff < TOL
  assert valid_diff(without, want, batch) > 100 * TOL  # the adapters change the logits


def one_line_error(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "Traceback" not in err, err
  return err


def test_what_cannot_be_exported_exits_2(chain, tmp_path, capsys):
  out = str(tmp_path / "out")
  assert main(["export-hf", chain.stage1, "--step", "7", out]) == 2
  assert f"{chain.stage1} has no checkpoint 7; its saved steps are 1, 2, 3" in one_line_error(capsys)
  assert main(["export-hf", chain.stage1, "--adapter", out]) == 2  # its base weights are a random preset
  assert "started from a randomly initialised model.preset" in one_line_error(capsys)
  assert main(["export-hf", chain.stage1, os.path.join(chain.stage1, "checkpoints")]) == 2
  assert "would replace the run" in one_line_error(capsys)
  ckpt = str(tmp_path / "ckpt")
  assert main(["import-hf", chain.stage1_export, ckpt]) == 0
  capsys.readouterr()
  assert main(["export-hf", ckpt, "--step", "1", out]) == 2
  assert "--step and --adapter take a run directory" in one_line_error(capsys)
  assert not os.path.exists(out)
