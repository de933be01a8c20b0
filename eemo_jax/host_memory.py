"""Keep a step's host memory mapped between steps when XLA computes on the CPU.

XLA's CPU backend allocates each call's temporaries (984 MB for the train step of the benchmark's
`small` model) with malloc. glibc serves a block that large with a fresh `mmap` and gives it back with
`munmap` on free, so every step the kernel maps and zero-fills the same gigabyte page by page: on the
2-core benchmark machine, 1.05 GB page-faulted and ~0.5 s of kernel time per 1.14 s train step.

Two settings keep those pages for the next step:
* glibc's malloc serves big blocks from the heap instead of mmap, and never trims the heap
  (`reuse_freed_host_memory`, the `mallopt` equivalent of MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...);
* JAX runs single-device CPU computations inline on the calling thread (`jax_cpu_enable_async_dispatch`
  off). Otherwise they run on a worker thread whose malloc arena, glibc's per-thread heap, falls back to
  mmap for blocks over 64 MB whatever the settings say. Limiting glibc to one arena
  (MALLOC_ARENA_MAX=1) also worked for `small` but made the `tiny` step 1.5x slower (lock contention).

Measured, `small` train step: 1139 -> 870 ms, 1051 -> 65 MB page-faulted; `tiny`: 15.5 -> 16.2 ms.
The cost is a heap that does not shrink below its high-water mark, which a training process reaches
in its first step anyway. On GPU and TPU the device allocator holds the step's buffers and none of this
applies, so `use_host_memory_for_cpu_steps` changes malloc only when JAX's backend is the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc <malloc.h> parameter numbers for mallopt.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB lie free at the top of the heap


@functools.cache
def reuse_freed_host_memory() -> bool:
  """Sets glibc's malloc to serve big blocks from the heap and keep them; True if it took effect.

  A no-op (False) where the C library is not glibc. Affects the whole process, JAX or not (the
  benchmarks apply it to their torch process too, so both sides run on the same malloc).
  """
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  return all(mallopt(param, value) == 1 for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))


def use_host_memory_for_cpu_steps() -> bool:
  """Both settings of the module docstring when JAX computes on the CPU; True if malloc was changed.

  Call it before JAX's first computation or device query: JAX reads the dispatch setting when it
  creates its CPU client (the setting concerns only that client). `eemo_jax.train.train` calls it first.
  """
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if jax.default_backend() != "cpu":
    return False
  return reuse_freed_host_memory()
