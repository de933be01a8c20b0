"""Few-row fp32 matmuls for decode steps on XLA:CPU: an XLA FFI kernel, compiled here on first use.

A decode step multiplies a handful of rows (the batch, one token each) by every weight of the decoder
once, so it runs at the speed the weights stream from memory. XLA:CPU's dot streams 4 rows through the
`small` decoder's projections at 17 GB/s on the dev VM; `row_matmul.cc` reads each weight once, front to
back, on XLA's own thread pool, at 23.5 GB/s in the same run (32 against 20 GB/s on a 1536x8960 weight), and
`small`'s greedy decode step takes 8.2 instead of 12.2 ms (`benchmarks/README.md`, every layout and form of
XLA's dot tried there first). Only the CPU decode steps use it (`generate.sampler`, inside
`in_decode_steps`); everything else, and every accelerator, uses `jnp.dot`.

The kernel is C++ against the FFI headers jaxlib ships (`jax.ffi.include_dir()`), built with the system's
C++ compiler for this CPU (`-march=native`) into a cache keyed by the source, the compiler, jaxlib and the
CPU, so it is built once per machine (a few seconds). Without a compiler, or when the build fails, a
warning says why once and decode steps use `jnp.dot` (same results, slower). `EEMO_JAX_ROW_KERNEL=0`
turns it off; `EEMO_JAX_KERNEL_CACHE` moves the cache; `CXX` names the compiler.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
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
             "out_in": ("eemo_row_matmul_transposed", "RowMatmulTransposed")}

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
  before = getattr(_scope, "on", False)
  _scope.on = enabled
  try:
    yield
  finally:
    _scope.on = before


def applies(x: jax.Array, w: jax.Array) -> bool:
  """Whether `x @ w` (or `x @ w.T`) is traced inside `in_decode_steps` with fp32 operands, 1 to
  MAX_ROWS rows, a 2-D weight, and the kernel available."""
  if not getattr(_scope, "on", False) or x.dtype != jnp.float32 or w.dtype != jnp.float32 or w.ndim != 2:
    return False
  rows = x.size // max(x.shape[-1], 1) if x.ndim else 0
  return 1 <= rows <= MAX_ROWS and available()


def row_matmul(x: jax.Array, w: jax.Array, *, layout: str = "in_out") -> jax.Array:
  """x (..., K) @ W -> (..., N) fp32, by the kernel, for W stored as `layout` says:
  "in_out": w (K, N); "out_in": w (N, K), i.e. x @ w.T (a tied embedding).

  Callers check `applies` first; this raises if the kernel is not available.
  """
  if not available():
    raise RuntimeError(f"The row-matmul kernel is not available: {_failure}")
  n = w.shape[1] if layout == "in_out" else w.shape[0]
  call = jax.ffi.ffi_call(_HANDLERS[layout][0], jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32))
  return call(x, w)


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
      tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
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
