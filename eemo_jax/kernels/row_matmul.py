"""Few-row fp32 matmuls for decode steps on XLA:CPU: an XLA FFI kernel, compiled here on first use.

A decode step multiplies a handful of rows (the batch, one token each) by every weight of the decoder
once, so it runs at the speed the weights stream from memory. On the dev VM XLA:CPU's dot streams 4 rows
through the `small` decoder's projections at 18 GB/s; `row_matmul.cc` reads each weight once on XLA's own
thread pool, at 26 GB/s as stored and at 43 GB/s packed into 64-column tiles (each tile one sequential
stream). Inside `in_decode_steps` the weights are packed once per decode call (`pack_tiles`, a custom
call XLA hoists out of the loop; up to `pack_budget_bytes`), and attention reads the KV cache through the
batched form (one product per row and KV head). `small`'s greedy decode step: 10.0-11.4 ms with XLA's
dot, 5.2-6.0 ms with these kernels (three runs, `benchmarks/README.md`). Only the CPU decode steps use it (`generate.sampler`);
everything else, and every accelerator, uses `jnp.dot`.

The kernel is C++ against the FFI headers jaxlib ships (`jax.ffi.include_dir()`), built with the system's
C++ compiler for this CPU (`-march=native`) into a cache keyed by the source, the compiler, jaxlib and the
CPU, so it is built once per machine (a few seconds). Without a compiler, or when the build fails, a
warning says why once and decode steps use `jnp.dot` (same results, slower). `EEMO_JAX_ROW_KERNEL=0`
turns it off; `EEMO_JAX_KERNEL_CACHE` moves the cache; `CXX` names the compiler;
`EEMO_JAX_PACK_BUDGET_MB` bounds the packed copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("row_matmul.cc")
MAX_ROWS = 16  # the kernel's limit (kMaxRows); more rows are a matmul XLA's own kernels do well
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
# layout -> (XLA custom-call target, handler symbol): the weight stored (K, N) or (N, K).
_HANDLERS = {"in_out": ("eemo_row_matmul", "RowMatmul"),
             "out_in": ("eemo_row_matmul_transposed", "RowMatmulTransposed"),
             "tiles": ("eemo_row_matmul_tiles", "RowMatmulTiles"),
             "pack": ("eemo_row_matmul_pack_tiles", "RowMatmulPackTiles")}
TILE = 64  # columns per tile of a packed weight (kTile)

_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_failure: str | None = None
_scope = threading.local()


def available() -> bool:
  """Whether the kernel is built and registered with XLA (building it on the first call)."""
  global _loaded, _failure
  if _loaded is not None:
    return True
  if _failure is not None:
    return False
  with _lock:
    if _loaded is None and _failure is None:
      try:
        _loaded = _load(_build())
      except _Unavailable as e:
        _failure = str(e)
        log.warning("decode steps use jnp.dot: %s", _failure)
  return _loaded is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True or was not asked yet)."""
  return _failure


@contextlib.contextmanager
def in_decode_steps(enabled: bool = True):
  """While tracing inside this block, `applies` may route few-row fp32 matmuls to the kernel.

  A trace-time switch: it changes which operations a traced function contains, nothing at run time. The
  decode loop turns it on around the layers of one step; training, prefill and sharded rollouts never do
  (the kernel has no gradient and no sharding rule).
  """
  before = getattr(_scope, "on", False), getattr(_scope, "packed", 0)
  _scope.on, _scope.packed = enabled, 0
  try:
    yield
  finally:
    _scope.on, _scope.packed = before


def applies(x: jax.Array, w: jax.Array) -> bool:
  """Whether `x @ w` (or `x @ w.T`) is traced inside `in_decode_steps` with fp32 operands, 1 to
  MAX_ROWS rows (per batch entry), a 2-D weight or a batch of them (w's leading axes are x's), and the
  kernel available."""
  if not getattr(_scope, "on", False) or x.dtype != jnp.float32 or w.dtype != jnp.float32 or w.ndim < 2:
    return False
  batch_axes = w.shape[:-2]
  if x.ndim <= len(batch_axes) or x.shape[:len(batch_axes)] != batch_axes:
    return False
  rows = x.size // max(x.shape[-1] * math.prod(batch_axes), 1)
  return 1 <= rows <= MAX_ROWS and jax.default_backend() == "cpu" and available()


def row_matmul(x: jax.Array, w: jax.Array, *, layout: str = "in_out") -> jax.Array:
  """x (..., K) @ W -> (..., N) fp32, by the kernel, for W stored as `layout` says:
  "in_out": w (K, N); "out_in": w (N, K), i.e. x @ w.T (a tied embedding).
  Leading axes of w are batch axes, (*batch, K, N) or (*batch, N, K), and x (*batch, ..., K): each batch
  entry its own product (a decode step's attention against its KV cache).

  Callers check `applies` first; this raises if the kernel is not available.
  """
  _require_available()
  n = w.shape[-1] if layout == "in_out" else w.shape[-2]
  # Inside a decode step (a loop), weights are packed into column tiles, once per decode call (`pack_tiles`).
  in_loop = getattr(_scope, "on", False)
  if in_loop and layout == "in_out" and w.ndim == 2 and n % TILE == 0 and _take_pack_budget(w.size * 4):
    return row_matmul_packed(x, pack_tiles(w))
  return jax.ffi.ffi_call(_HANDLERS[layout][0], jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32))(x, w)


def row_matmul_packed(x: jax.Array, packed: jax.Array) -> jax.Array:
  """x (..., K) @ W for W packed by `pack_tiles` (tiles, K, TILE) -> (..., tiles * TILE), fp32.

  Each tile is one sequential stream and its partial rows stay in registers: on the dev VM the `small`
  decoder's weights stream at ~50 GB/s this way against ~25-30 unpacked (benchmarks/README.md).
  """
  _require_available()
  if packed.ndim != 3 or packed.shape[2] != TILE or x.shape[-1] != packed.shape[1]:
    raise ValueError(f"row_matmul_packed: a (tiles, K, {TILE}) weight with K = x's last axis ({x.shape[-1]}), "
                     f"got {packed.shape}; pack it with pack_tiles")
  out = jax.ShapeDtypeStruct(x.shape[:-1] + (packed.shape[0] * TILE,), jnp.float32)
  return jax.ffi.ffi_call(_HANDLERS["tiles"][0], out)(x, packed)


def _require_available() -> None:
  if not available():
    raise RuntimeError(f"The row-matmul kernel is not available: {_failure}")


def pack_budget_bytes() -> int:
  """How many bytes of weights one decode program may pack (`EEMO_JAX_PACK_BUDGET_MB`, default 2048).

  The packed copies live in the decode call's temporary memory beside the weights themselves; past the
  budget, weights stream unpacked (`RowMatmul`, about half the speed). 0 packs nothing.
  """
  raw = os.environ.get("EEMO_JAX_PACK_BUDGET_MB", "2048")
  try:
    megabytes = float(raw)
  except ValueError:
    raise ValueError(f"EEMO_JAX_PACK_BUDGET_MB must be a number of megabytes, got {raw!r}") from None
  return int(megabytes * 2**20)


def _take_pack_budget(nbytes: int) -> bool:
  """Counts `nbytes` against the budget of the decode step being traced; False if it does not fit."""
  packed = getattr(_scope, "packed", 0)
  if packed + nbytes > pack_budget_bytes():
    return False
  _scope.packed = packed + nbytes
  return True


def pack_tiles(w: jax.Array) -> jax.Array:
  """(K, N) -> (N / TILE, K, TILE): column tiles, each stored contiguously, by the kernel's own copy.

  Inside a decode loop the weights do not change, and XLA hoists this call out of the loop (it does not
  hoist a plain transpose): the weights are packed once per decode call, into its temporary memory, and
  every step streams the packed copy.
  """
  k, n = w.shape
  if n % TILE:
    raise ValueError(f"pack_tiles: the weight's {n} columns are not a multiple of {TILE}")
  return jax.ffi.ffi_call(_HANDLERS["pack"][0], jax.ShapeDtypeStruct((n // TILE, k, TILE), jnp.float32))(w)


# --------------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------------


class _Unavailable(Exception):
  pass


def _build() -> Path:
  """The kernel's shared library for this machine: from the cache, or compiled into it."""
  if os.environ.get("EEMO_JAX_ROW_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
    raise _Unavailable("turned off by EEMO_JAX_ROW_KERNEL")
  compiler = _compiler()
  source = SOURCE.read_bytes()
  key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), jax.__version__.encode(),
                                   _cpu_signature().encode()])).hexdigest()[:20]
  cache = Path(os.environ.get("EEMO_JAX_KERNEL_CACHE") or _default_cache())
  library = cache / f"row_matmul-{key}.so"
  if library.exists():
    return library
  try:
    cache.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise _Unavailable(f"cannot create the kernel cache {cache} ({e}); set EEMO_JAX_KERNEL_CACHE to a writable "
                       "folder") from None
  # Compiled beside its final name, then renamed: processes building at once each finish their own file.
  with tempfile.NamedTemporaryFile(dir=cache, suffix=".so.tmp", delete=False) as tmp:
    partial = Path(tmp.name)
  command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
      lines = (result.stderr or result.stdout).strip().splitlines()
      errors = [line for line in lines if "error" in line.lower()]  # not the warnings after them
      tail = errors[:5] or lines[-5:]
      raise _Unavailable(f"compiling {SOURCE.name} with {compiler} failed: " + " | ".join(tail))
    os.replace(partial, library)
  except (OSError, subprocess.SubprocessError) as e:
    raise _Unavailable(f"compiling {SOURCE.name} with {compiler} failed: {e}") from None
  finally:
    partial.unlink(missing_ok=True)
  return library


def _load(library: Path) -> ctypes.CDLL:
  try:
    lib = ctypes.cdll.LoadLibrary(str(library))
    for target, symbol in _HANDLERS.values():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except (OSError, AttributeError, ValueError) as e:
    raise _Unavailable(f"loading {library} failed ({e}); delete it to rebuild") from None
  return lib


def _compiler() -> str:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  raise _Unavailable("no C++ compiler found (set CXX, or install g++ or clang++)")


def _default_cache() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "eemo_jax" / "kernels"


def _cpu_signature() -> str:
  """What `-march=native` depends on: the CPU's model and feature flags where Linux lists them."""
  try:
    info = Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.machine() + platform.processor()
  fields = [line for line in info.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
  return platform.machine() + "\n" + "\n".join(sorted(set(fields)))
