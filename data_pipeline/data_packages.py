"""The packages that build and read the data sets (TensorFlow Datasets, Grain, ArrayRecord): the `data` extra.

Loading, running and exporting a model needs none of them, so `pip install eemo-jax` leaves them out (and
pyarrow with the rest of what TFDS brings). The modules that do need them (the builders, the Grain pipeline and its
batching) call `require()` before importing them, so a job that reads data without them stops with one line that
names the extra, not a ModuleNotFoundError from deep inside a run. `require()` only looks the packages up: Grain's
worker processes import the pipeline too, and importing TFDS there would cost every worker its start-up time.
"""

from __future__ import annotations

import importlib.util

# import name -> distribution name
PACKAGES = {"tensorflow_datasets": "tensorflow-datasets", "grain": "grain", "array_record": "array-record"}
INSTALL = "pip install 'eemo-jax[data]'"


class MissingDataPackagesError(ImportError):
  """Data packages are not installed; the message names them and the extra that installs them."""

  def __init__(self, missing: list[str]):
    self.missing = list(missing)
    super().__init__(f"reading or building data sets needs {', '.join(self.missing)}, which "
                     f"{'is' if len(self.missing) == 1 else 'are'} not installed: {INSTALL} (loading, running "
                     "and exporting a model need none of them)")

  def __reduce__(self):  # ImportError pickles its message only
    return type(self), (self.missing,)


def missing() -> list[str]:
  """The distribution names of the data packages that are not installed."""
  return [package for module, package in PACKAGES.items() if importlib.util.find_spec(module) is None]


def require() -> None:
  """Raises MissingDataPackagesError unless every data package is installed."""
  absent = missing()
  if absent:
    raise MissingDataPackagesError(absent)
