"""Text generation with a KV cache: `generate(model, input_ids, ...)` (prefill with images, then decode).

DESIGN's public call is `eemo_jax.generate(model, ...)`, and `eemo_jax.generate` is also this
package. Importing a submodule binds the package over any function of that name on the parent, so
instead the package itself is made callable: `eemo_jax.generate(...)` and
`from eemo_jax.generate import generate` both work, whatever was imported first.
"""

import sys
import types

from eemo_jax.generate.sampler import SamplingConfig, generate, sample_logits

__all__ = ["SamplingConfig", "generate", "sample_logits"]


class _CallablePackage(types.ModuleType):
  def __call__(self, *args, **kwargs):
    return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
