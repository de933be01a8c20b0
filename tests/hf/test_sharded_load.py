"""Loading straight into shardings on 8 fake CPU devices (tests/conftest.py), from HF and from Orbax.

Each parameter must be created with the NamedSharding that `state_shardings` derives from its
logical axes, hold exactly the unsharded values, and give the unsharded logits. Export from a
sharded model (gathered one layer at a time) must write the same bytes as from an unsharded one.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from hf_fixtures import build_hf_model, make_batch, save_hf_model, tiny_hf_config, torch_logits  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from eemo_jax.hf.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from eemo_jax.hf.load import load_hf  # noqa: E402
from eemo_jax.hf.safetensors_io import SafetensorsFolder  # noqa: E402
from eemo_jax.hf.save import save_hf  # noqa: E402
from eemo_jax.model.qwen25vl import prepare_inputs  # noqa: E402
from eemo_jax.parallel.sharding import make_mesh, state_shardings  # noqa: E402

MESHES = {"data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp8": {"fsdp": 8}}
BATCH = make_batch([[(1, 4, 6)], [(1, 2, 2)]])


def forward(model) -> np.ndarray:
  """Logits on BATCH, jitted as one program (much faster to compile than op-by-op eager calls)."""
  inputs = prepare_inputs(model.config, BATCH["input_ids"], BATCH["attention_mask"], BATCH["pixel_values"],
                          BATCH["image_grid_thw"])
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits(state, x):
    return nnx.merge(graphdef, state)(x.input_ids, x.attention_mask, position_ids=x.position_ids,
                                      vision=x.vision).logits

  return np.asarray(jax.device_get(logits(state, inputs)))


def params(model) -> dict:
  return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def expected_shardings(model, mesh) -> dict:
  return {p: s for p, s in nnx.to_flat_state(state_shardings(nnx.state(model, nnx.Param), mesh))}


def assert_placed(model, mesh):
  """Every parameter has its `state_shardings` NamedSharding, and some are really split."""
  want = expected_shardings(model, mesh)
  got = params(model)
  assert sorted(want) == sorted(got)
  for path, array in got.items():
    sharding = want[path].value if hasattr(want[path], "value") else want[path]
    assert isinstance(array.sharding, NamedSharding) and array.sharding.mesh == mesh, path
    assert array.sharding.spec == sharding.spec, (path, array.sharding.spec, sharding.spec)
  split = [p for p, a in got.items() if not a.sharding.is_fully_replicated]
  assert split, "no parameter is sharded"
  used = {axis for a in got.values() for entry in a.sharding.spec if entry
          for axis in (entry if isinstance(entry, tuple) else (entry,))}
  assert used == {n for n, size in mesh.shape.items() if size > 1} - {"data"}  # params never use `data`


def assert_same_values(a, b):
  pa, pb = params(a), params(b)
  for path in pa:
    assert np.array_equal(np.asarray(jax.device_get(pa[path])), np.asarray(jax.device_get(pb[path]))), path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(folder, torch model, unsharded JAX model, its logits)."""
  folder = os.fspath(tmp_path_factory.mktemp("src"))
  _, ref = save_hf_model(folder, tiny_hf_config(tie=False))
  model = load_hf(folder)
  logits = forward(model)
  np.testing.assert_allclose(logits, torch_logits(ref, BATCH), atol=2e-6, rtol=0)  # parity check: measured 1.8e-7
  return folder, ref, model, logits


@pytest.fixture(scope="module", params=list(MESHES))
def sharded(request, source):
  mesh = make_mesh(MESHES[request.param])
  return mesh, load_hf(source[0], mesh=mesh)


def test_params_placed_by_state_shardings(sharded, source):
  mesh, model = sharded
  assert_placed(model, mesh)
  assert_same_values(model, source[2])


def test_sharded_logits_match_unsharded(sharded, source):
  mesh, model = sharded
  # Measured 2.4e-7 (2x2x2) and 2.1e-7 (1x8x1): the sharded matmuls sum in another order.
  np.testing.assert_allclose(forward(model), source[3], atol=2.5e-6, rtol=0)
  with jax.set_mesh(mesh):
    np.testing.assert_allclose(forward(model), source[3], atol=2.5e-6, rtol=0)


def test_load_under_set_mesh(source):
  """No mesh argument: `load_hf` uses the mesh set with `jax.set_mesh`."""
  mesh = make_mesh(MESHES["data2_fsdp2_tensor2"])
  with jax.set_mesh(mesh):
    model = load_hf(source[0])
  assert_placed(model, mesh)


def test_tied_embeddings_sharded(tmp_path):
  """Tied: no lm_head, and the embedding (also the output head) is split over vocab and embed."""
  folder = os.fspath(tmp_path / "tied")
  build_hf_model(tiny_hf_config(tie=True)).save_pretrained(folder)
  mesh = make_mesh(MESHES["data2_fsdp2_tensor2"])
  model = load_hf(folder, mesh=mesh)
  assert_placed(model, mesh)
  assert model.lm_head is None
  embedding = model.language_model.embed_tokens.embedding.get_value()
  assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
  assert_same_values(model, load_hf(folder))


def test_export_from_sharded_model_writes_same_bytes(sharded, source, tmp_path):
  _, model = sharded
  direct, from_sharded = os.fspath(tmp_path / "direct"), os.fspath(tmp_path / "sharded")
  save_hf(source[2], direct)
  save_hf(model, from_sharded)
  for name in ("model.safetensors", "config.json"):
    with open(os.path.join(direct, name), "rb") as a, open(os.path.join(from_sharded, name), "rb") as b:
      assert a.read() == b.read(), name


@pytest.fixture(scope="module")
def checkpoint(source, tmp_path_factory):
  """An Orbax checkpoint saved from the fsdp=8 model: restoring onto another mesh reshards it."""
  ckpt = os.fspath(tmp_path_factory.mktemp("ckpt") / "ckpt")
  save_checkpoint(load_hf(source[0], mesh=make_mesh(MESHES["fsdp8"])), ckpt)
  return ckpt


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_orbax_restore_on_mesh(checkpoint, source, mesh_name):
  mesh = make_mesh(MESHES[mesh_name])
  model = load_checkpoint(checkpoint, mesh=mesh)
  assert_placed(model, mesh)
  assert_same_values(model, source[2])


def test_orbax_restore_unsharded(checkpoint, source):
  model = load_checkpoint(checkpoint)
  for path, array in params(model).items():
    assert array.sharding.device_set == {jax.local_devices()[0]}, path
  assert_same_values(model, source[2])


def write_aligned(path, tensors: dict, first: str):
  """A safetensors file whose tensor `first` starts at a 64-byte aligned file offset."""
  order = [first] + [k for k in tensors if k != first]
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key in order:
    nbytes = tensors[key].nbytes
    header[key] = {"dtype": "F32", "shape": list(tensors[key].shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header).encode()
  blob += b" " * (-(8 + len(blob)) % 64)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for key in order:
      f.write(np.ascontiguousarray(tensors[key]).tobytes())


def test_sharded_params_do_not_alias_the_file(source, tmp_path):
  """On CPU, make_array_from_callback keeps a 64-byte aligned callback buffer as the device buffer.

  It must not be the file's memory map: overwriting the file in place (a re-download, or exporting
  over it) would silently change the parameter or crash the process.
  """
  folder = tmp_path / "aligned"
  folder.mkdir()
  shutil.copyfile(os.path.join(source[0], "config.json"), folder / "config.json")
  src = SafetensorsFolder(source[0])
  tensors = {k: np.array(src.get(k)) for k in src.keys()}
  path = os.fspath(folder / "model.safetensors")
  write_aligned(path, tensors, first="model.norm.weight")  # replicated, identity layout: read as a view
  model = load_hf(os.fspath(folder), mesh=make_mesh(MESHES["fsdp8"]))
  with open(path, "r+b") as f:  # overwrite the tensor data in place
    data_start = 8 + struct.unpack("<Q", f.read(8))[0]
    f.seek(data_start)
    f.write(b"\0" * (os.path.getsize(path) - data_start))
  assert_same_values(model, source[2])
