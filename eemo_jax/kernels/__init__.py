"""Hand-written kernels for what XLA's own do slowly on some backend, each behind a check that falls back
to plain `jax.numpy` (same results, slower) where the kernel is not available."""
