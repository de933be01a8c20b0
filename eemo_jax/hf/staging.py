"""An export folder written beside its target and put in place whole, so no one sees half of one.

`staged_folder(target)` yields an empty folder next to `target` (`.NAME.partial-XXXX`: the same
filesystem, so the final rename is atomic). When the block ends normally the folder takes the place
of `target` in one step: a rename if `target` is absent or empty, or, with `overwrite=True`, an
atomic exchange with the old export, which is deleted only after the new one is in place. If the
block raises, the folder is removed and `target` is untouched. So a process killed at any moment
leaves `target` holding the old export or the new one, complete; what it leaves beside it (a
`.NAME.partial-*` folder) is removed by the next export to the same target (so two exports to one
target must not run at the same time).

Nothing is ever written inside `target`, so a symlink there (an HF-cache layout) is replaced with the
rest of the folder, never written through. A `target` that is itself a symlink to a folder is
followed: the export replaces the folder it points at.

The atomic exchange is Linux's `renameat2(RENAME_EXCHANGE)` (ext4, xfs, btrfs, tmpfs, overlayfs).
Where it is missing (other systems, NFS) the old export is renamed aside (`.NAME.replaced-*`) and the
new one renamed in: a kill between those two renames leaves no `target`, and the old export intact
under the `.replaced-*` name (never removed automatically).

A bucket (`gs://...`, see `eemo_jax.paths`) has no folders to rename, so there the export is written to
the same `.NAME.partial-XXXX` prefix and then copied into `target` object by object (a copy inside the
store), the weights first and `config.json` last, after the old export's `config.json` was deleted first and
the rest of it then (`adapter_config.json` likewise for a PEFT adapter). `config.json` is what makes a folder
an HF model (nothing loads one without it), so while the copy runs `target` holds no model that claims to be
complete, and a process killed then leaves `target` without a `config.json` (an export to rerun) and the
complete new export under the `.partial-*` prefix. That is the closest a bucket allows to a swap: it has no
atomic rename, only atomic single objects.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import sys
import uuid
from collections.abc import Iterator

from eemo_jax import paths

PARTIAL = ".partial-"
REPLACED = ".replaced-"
# The files whose presence makes a folder a loadable model (transformers) or adapter (PEFT).
MARKERS = ("config.json", "adapter_config.json")


class ExportError(ValueError):
  """An export that cannot be written where asked; the message names the folder and what to do."""


@contextlib.contextmanager
def staged_folder(target: str, *, overwrite: bool = False, writer: bool = True) -> Iterator[str]:
  """Yields an empty folder to write an export into; it replaces `target` when the block ends.

  Only the process with `writer=True` touches the file system; the others get the path of a folder
  that does not exist (they must not write). Refuses, before anything is written, a `target` that
  holds files unless `overwrite`.
  """
  target = resolve_target(target)
  if not writer:
    yield _partial_path(target)
    return
  if paths.is_url(target):
    with _staged_in_bucket(target, overwrite=overwrite) as tmp:
      yield tmp
    return
  check_target(target, overwrite=overwrite)
  created = _make_parents(os.path.dirname(target))
  tmp = _partial_path(target)
  try:
    _remove_leftovers(target)
    os.mkdir(tmp)
    yield tmp
    _sync_tree(tmp)
    old = _put_in_place(tmp, target)
  except BaseException as e:
    written = _tree_bytes(tmp)
    _remove_tree(tmp)
    _remove_empty_dirs(created)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise ExportError(f"no space left on the device writing {e.filename or tmp} (the export needs more than the "
                        f"{written} bytes written so far); {target} is unchanged. Free some space or export "
                        "elsewhere") from None
    raise
  _sync_dir(os.path.dirname(target))
  if old is not None:
    _remove_tree(old)


def resolve_target(target: str) -> str:
  """The absolute path that will be replaced: a symlink to a folder is followed, other links are not."""
  if paths.is_url(target):
    paths.check_usable(target)
    return str(target).rstrip("/")
  target = os.path.abspath(target)
  if os.path.islink(target) and os.path.isdir(target):
    target = os.path.realpath(target)
  return target


def check_target(target: str, *, overwrite: bool = False) -> None:
  """Raises `ExportError` unless an export may be put at `target` (absent, empty, or an export to overwrite)."""
  target = resolve_target(target)
  if paths.is_root(target):
    raise ExportError(f"cannot export to {target}, the root of the file system; choose a folder below it")
  if paths.lexists(target) and not paths.isdir(target):
    raise ExportError(f"{target} exists and is not a folder; choose a folder path for the export")
  names = _listdir(target) if paths.isdir(target) else []
  if not names:
    return
  if not overwrite:
    shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
    raise ExportError(f"{target} already holds files ({shown}); pass --overwrite (overwrite=True) to replace the "
                      "folder whole once the new export is complete, or choose a new folder")
  # Only an export may be replaced: a mistyped `--overwrite ~` must not delete a home directory.
  if not any(n == "config.json" or n.endswith(".safetensors") for n in names):
    raise ExportError(f"refusing to replace {target}: it holds no config.json or *.safetensors, so it is not an "
                      "export; delete it yourself or choose another folder")


def _put_in_place(tmp: str, target: str) -> str | None:
  """Moves `tmp` to `target`; returns where the export it replaced now is (to delete), if any."""
  if not os.path.isdir(target) or not _listdir(target):
    os.rename(tmp, target)  # rename(2) replaces an empty folder; it fails if one appeared with files in it
    return None
  if _exchange(tmp, target):
    return tmp
  aside = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}{REPLACED}{uuid.uuid4().hex[:12]}")
  os.rename(target, aside)
  try:
    os.rename(tmp, target)
  except BaseException:
    os.rename(aside, target)
    raise
  return aside


@contextlib.contextmanager
def _staged_in_bucket(target: str, *, overwrite: bool) -> Iterator[str]:
  """`staged_folder` for a bucket URL: see the module docstring for what a kill can leave."""
  check_target(target, overwrite=overwrite)
  tmp = _partial_path(target)
  try:
    _remove_leftovers(target)
    yield tmp
  except BaseException:
    paths.rmtree(tmp)
    raise
  names = paths.files_under(tmp)
  for marker in MARKERS:  # what makes a folder a model: gone first, back last
    paths.remove(paths.join(target, marker))
  paths.rmtree(target)
  for name in sorted(names, key=lambda n: (n in MARKERS, not n.endswith(".safetensors"), n)):
    paths.copy_file(paths.join(tmp, name), paths.join(target, name))
  paths.rmtree(tmp)


# --------------------------------------------------------------------------------- file-system calls
def _partial_path(target: str) -> str:
  return paths.join(paths.dirname(target), f".{paths.basename(target)}{PARTIAL}{uuid.uuid4().hex[:12]}")


def _listdir(path: str) -> list[str]:
  return paths.listdir(path)


def _make_parents(folder: str) -> list[str]:
  """Creates `folder` and its missing parents; returns those created, deepest first."""
  created = []
  while not os.path.isdir(folder):
    created.append(folder)
    folder = os.path.dirname(folder)
  for path in reversed(created):
    os.mkdir(path)
  return created


def _remove_empty_dirs(folders: list[str]) -> None:
  for folder in folders:
    with contextlib.suppress(OSError):
      os.rmdir(folder)


def _remove_leftovers(target: str) -> None:
  """Removes the temporary folders of exports to `target` that were killed."""
  parent, prefix = paths.dirname(target), f".{paths.basename(target)}{PARTIAL}"
  if paths.is_url(target):  # in a bucket a missing parent is just an empty prefix
    for name in (_listdir(parent) if paths.isdir(parent) else []):
      if name.startswith(prefix):
        paths.rmtree(paths.join(parent, name))
    return
  for name in _listdir(parent):
    if name.startswith(prefix):
      _remove_tree(os.path.join(parent, name))


def _remove_tree(path: str) -> None:
  if os.path.lexists(path):
    shutil.rmtree(path, ignore_errors=True)  # never follows symlinks; a leftover is retried next export


def _tree_bytes(path: str) -> int:
  if not os.path.isdir(path):
    return 0
  return sum(os.lstat(os.path.join(d, n)).st_size for d, _, names in os.walk(path) for n in names)


def _sync_tree(path: str) -> None:
  """Flushes every file of the new export to disk before it is put in place (a power cut may not reorder)."""
  for folder, _, names in os.walk(path):
    for name in names:
      file = os.path.join(folder, name)
      if not os.path.islink(file):
        fd = os.open(file, os.O_RDONLY)
        try:
          os.fsync(fd)
        finally:
          os.close(fd)
    _sync_dir(folder)


def _sync_dir(path: str) -> None:
  with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.cache
def _renameat2():
  if not sys.platform.startswith("linux"):
    return None
  fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
  if fn is not None:
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
  return fn


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths in one atomic step; False where the system or file system cannot."""
  fn = _renameat2()
  if fn is None:
    return False
  if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), a, None, b)
