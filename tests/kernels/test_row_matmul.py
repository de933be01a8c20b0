"""`eemo_jax.kernels.row_matmul` against float64 NumPy, and how it is built, switched off and left out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eemo_jax.kernels import row_matmul

pytestmark = pytest.mark.skipif(not row_matmul.available(), reason="no C++ compiler: the kernel cannot be built here")


def _operands(rows, k, n, seed=0, lead=()):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(lead + (rows, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32))


def _assert_matches_float64(y, x, w):
  """Within fp32 accumulation error of the exact product: 1e-6 of the summed |terms| (K <= 2048 here)."""
  x64, w64 = x.reshape(-1, x.shape[-1]).astype(np.float64), w.astype(np.float64)
  exact, magnitude = x64 @ w64, np.abs(x64) @ np.abs(w64)
  err = np.abs(np.asarray(y, np.float64).reshape(exact.shape) - exact)
  assert np.all(err <= 1e-6 * magnitude + 1e-30), float((err / np.maximum(magnitude, 1e-30)).max())


# Rows 1..16 (each its own compiled kernel), K not a multiple of the 8-row passes or of two threads' parts, N
# below, at and off the 16-lane vectors, and the decoder's own shapes.
SHAPES = [(1, 1, 1), (1, 7, 5), (2, 9, 16), (3, 64, 17), (4, 512, 512), (4, 512, 256), (4, 1536, 512),
          (5, 37, 1000), (7, 130, 33), (8, 8, 8), (11, 257, 48), (16, 100, 31), (16, 2048, 96), (4, 512, 32000)]


@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_weight_stored_in_out(rows, k, n):
  x, w = _operands(rows, k, n)
  _assert_matches_float64(jax.jit(row_matmul.row_matmul)(x, w), x, w)


@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_weight_stored_out_in(rows, k, n):
  """layout "out_in": x @ w.T for w (N, K), as a tied embedding is stored."""
  x, w = _operands(rows, k, n, seed=1)
  y = jax.jit(lambda x, wt: row_matmul.row_matmul(x, wt, layout="out_in"))(x, np.ascontiguousarray(w.T))
  _assert_matches_float64(y, x, w)


def test_leading_axes_are_rows():
  """Decode steps pass (batch, 1, hidden): the leading axes are the rows, and come back as they went in."""
  x, w = _operands(1, 96, 40, lead=(4,))  # (4, 1, 96)
  y = jax.jit(row_matmul.row_matmul)(x, w)
  assert y.shape == (4, 1, 40) and y.dtype == jnp.float32
  _assert_matches_float64(y, x, w)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("batch,rows,k,n", [((16,), 2, 64, 162), ((4, 4), 2, 162, 64), ((3,), 5, 7, 9),
                                            ((2, 1), 16, 300, 40), ((64,), 1, 64, 500)])
def test_batched_weights(layout, batch, rows, k, n):
  """Leading weight axes are batch axes (decode attention: (batch, kv_heads) entries of (groups, head_dim)
  queries against (kv_len, head_dim) keys, and probabilities against values): each entry its own product."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal(batch + (rows, k), dtype=np.float32)
  w = rng.standard_normal(batch + (k, n), dtype=np.float32)
  stored = w if layout == "in_out" else np.ascontiguousarray(np.swapaxes(w, -1, -2))
  y = np.asarray(jax.jit(lambda x, w: row_matmul.row_matmul(x, w, layout=layout))(x, stored))
  assert y.shape == batch + (rows, n)
  for index in np.ndindex(*batch):
    _assert_matches_float64(y[index], x[index], w[index])


# Rows across the kernel's passes of 4 (1-16), K off the vector width, tiles 1 to 500.
@pytest.mark.parametrize("rows,k,n", [(1, 1, 64), (3, 7, 128), (4, 512, 512), (5, 130, 192), (8, 1536, 512),
                                      (13, 33, 64), (16, 256, 1536), (4, 512, 32000)])
def test_packed_weights(rows, k, n):
  x, w = _operands(rows, k, n, seed=6)
  packed = jax.jit(row_matmul.pack_tiles)(w)
  np.testing.assert_array_equal(np.asarray(packed), w.reshape(k, n // 64, 64).transpose(1, 0, 2))
  _assert_matches_float64(jax.jit(row_matmul.row_matmul_packed)(x, packed), x, w)


def test_packing_needs_whole_tiles():
  with pytest.raises(ValueError, match="multiple of 64"):
    row_matmul.pack_tiles(jnp.zeros((8, 96), jnp.float32))
  with pytest.raises(ValueError, match="pack it with pack_tiles"):
    row_matmul.row_matmul_packed(jnp.zeros((2, 8), jnp.float32), jnp.zeros((8, 64), jnp.float32))


def _targets(f, *args):
  """The custom calls of f traced now (a new function each time: jit would reuse an earlier trace)."""
  return re.findall(r"stablehlo\.custom_call @(\w+)", jax.jit(lambda *a: f(*a)).lower(*args).as_text())


def test_weights_are_packed_only_inside_decode_steps_and_within_the_budget(monkeypatch):
  """Packing pays only when a loop reuses the packed copy (the decode steps); each decode program packs at most
  EEMO_JAX_PACK_BUDGET_MB of weights, the rest stream unpacked."""
  x = np.ones((4, 256), np.float32)
  ws = [np.ones((256, 512), np.float32)] * 3  # 512 KB each
  chain = lambda x, ws: [row_matmul.row_matmul(x, w) for w in ws]
  assert _targets(chain, x, ws) == ["eemo_row_matmul"] * 3
  with row_matmul.in_decode_steps():
    assert _targets(chain, x, ws) == ["eemo_row_matmul_pack_tiles", "eemo_row_matmul_tiles"] * 3
    assert _targets(chain, x, [np.ones((256, 96), np.float32)]) == ["eemo_row_matmul"]  # not whole tiles
  monkeypatch.setenv("EEMO_JAX_PACK_BUDGET_MB", "1.2")
  with row_matmul.in_decode_steps():  # each decode step's trace has its own budget
    for _ in range(2):
      with row_matmul.in_decode_steps():
        assert _targets(chain, x, ws) == ["eemo_row_matmul_pack_tiles", "eemo_row_matmul_tiles"] * 2 + [
            "eemo_row_matmul"]
  monkeypatch.setenv("EEMO_JAX_PACK_BUDGET_MB", "lots")
  with row_matmul.in_decode_steps(), pytest.raises(ValueError, match="EEMO_JAX_PACK_BUDGET_MB must be a number"):
    chain(x, ws)


def test_same_bits_every_call():
  """Parts are claimed by whichever thread is free, but each part's sum and the order of the parts are fixed."""
  x, w = _operands(4, 1536, 8960, seed=3)
  f = jax.jit(row_matmul.row_matmul)
  first = np.asarray(f(x, w))
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(f(x, w)), first)


def test_concurrent_calls_in_one_program():
  """Independent kernels that XLA runs at once on its pool (q/k/v of a layer) each finish, and are right."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((4, 256), dtype=np.float32)
  ws = [rng.standard_normal((256, 300 + 16 * i), dtype=np.float32) for i in range(6)]
  ys = jax.jit(lambda x, ws: [row_matmul.row_matmul(x, w) for w in ws])(x, ws)
  for y, w in zip(ys, ws):
    _assert_matches_float64(y, x, w)


def test_applies_only_to_few_fp32_rows_inside_decode_steps():
  w = jnp.zeros((32, 8), jnp.float32)
  few, many = jnp.zeros((4, 1, 32), jnp.float32), jnp.zeros((17, 32), jnp.float32)
  assert not row_matmul.applies(few, w)  # outside the decode steps' scope
  with row_matmul.in_decode_steps():
    assert row_matmul.applies(few, w)
    assert row_matmul.applies(jnp.zeros((16, 32), jnp.float32), w)
    assert not row_matmul.applies(many, w)
    assert not row_matmul.applies(few.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert not row_matmul.applies(few, jnp.zeros((2, 32, 8), jnp.float32))  # batch axes that are not x's
    assert row_matmul.applies(few, jnp.zeros((4, 32, 8), jnp.float32))  # 4 entries of 1 row
    assert row_matmul.applies(jnp.zeros((4, 2, 16, 32), jnp.float32), jnp.zeros((4, 2, 32, 8), jnp.float32))
    assert not row_matmul.applies(jnp.zeros((4, 2, 17, 32), jnp.float32), jnp.zeros((4, 2, 32, 8), jnp.float32))
    with row_matmul.in_decode_steps(False):
      assert not row_matmul.applies(few, w)
    assert row_matmul.applies(few, w)
  assert not row_matmul.applies(few, w)


_PROBE = textwrap.dedent("""
    import json, logging, sys
    import numpy as np
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    import jax
    from eemo_jax.kernels import row_matmul
    from eemo_jax.model.layers import matmul
    ok = row_matmul.available()
    x, w = np.ones((4, 8), np.float32), np.ones((8, 3), np.float32)
    with row_matmul.in_decode_steps():
      y = jax.jit(matmul)(x, w)
      text = jax.jit(matmul).lower(x, w).as_text()
    print(json.dumps({"available": ok, "reason": row_matmul.unavailable_reason(),
                      "kernel_in_program": "eemo_row_matmul" in text, "y": np.asarray(y).tolist()}))
""")


def _probe(tmp_path, **env_changes):
  env = {k: v for k, v in os.environ.items() if k != "CXX"}
  env.update({"EEMO_JAX_KERNEL_CACHE": str(tmp_path / "kernels"), "JAX_PLATFORMS": "cpu"}, **env_changes)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_built_into_its_cache_once(tmp_path):
  first, _ = _probe(tmp_path)
  assert first["available"] and first["kernel_in_program"] and first["y"] == [[8.0] * 3] * 4
  built = sorted(p.name for p in (tmp_path / "kernels").iterdir())
  assert len(built) == 1 and built[0].startswith("row_matmul-") and built[0].endswith(".so")  # no temp file left
  mtime = (tmp_path / "kernels" / built[0]).stat().st_mtime_ns
  again, _ = _probe(tmp_path)
  assert again["available"] and (tmp_path / "kernels" / built[0]).stat().st_mtime_ns == mtime  # read, not rebuilt


def test_switched_off_by_the_environment(tmp_path):
  result, _ = _probe(tmp_path, EEMO_JAX_ROW_KERNEL="0")
  assert not result["available"] and "EEMO_JAX_ROW_KERNEL" in result["reason"]
  assert not result["kernel_in_program"] and result["y"] == [[8.0] * 3] * 4  # jnp.dot, same result


def test_a_failed_build_falls_back_with_one_warning(tmp_path):
  broken = tmp_path / "broken-c++"
  broken.write_text("#!/bin/sh\necho 'fatal error: no headers here' >&2\nexit 1\n")
  broken.chmod(0o755)
  result, stderr = _probe(tmp_path, CXX=str(broken))
  assert not result["available"] and "no headers here" in result["reason"] and str(broken) in result["reason"]
  assert not result["kernel_in_program"] and result["y"] == [[8.0] * 3] * 4
  assert stderr.count("decode steps use jnp.dot") == 1
  assert not list((tmp_path / "kernels").glob("*.tmp"))  # the failed build's file is removed


def test_no_compiler_falls_back(tmp_path):
  result, _ = _probe(tmp_path, PATH=str(tmp_path / "empty"))
  assert not result["available"] and "no C++ compiler" in result["reason"] and "CXX" in result["reason"]
  assert result["y"] == [[8.0] * 3] * 4
