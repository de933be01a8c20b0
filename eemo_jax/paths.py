"""Where the project's files live, and the one layer every read and write of them goes through.

A path is a local path or a bucket URL (`gs://bucket/x`, `s3://...`). Local paths are handled by `os` as they
always were; URLs by `etils.epath`, the layer Orbax, Grain and TFDS use for their own files, so a run's
config, metrics, TensorBoard events, checkpoints, data set, tokenizer and export can all live in one bucket.
`gs://` needs `gcsfs` (`pip install 'eemo-jax[gcs]'`); a URL whose file system is missing is refused with one
line (`check_usable`), never turned into a local folder named `gs:`.

Orbax refuses relative checkpoint paths, and a relative run directory would also mean something else
to every process that starts in another working directory; so every path a run writes goes through
`absolute` once, at the start.

What a bucket cannot do, and what is done instead:
* append to an object: `AppendedFile` keeps the (small) file's content and uploads it whole, which replaces
  the object in one step;
* replace a file by a rename: `replace_file` uploads the new content as one object, which readers see only
  once the upload is complete (the old object until then);
* rename a folder: an export is copied into place with its `config.json` last (`eemo_jax.hf.staging`);
* memory-map a file: `download` makes a local copy (safetensors weights read from a bucket).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import posixpath
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

from eemo_jax.config import ConfigError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MISSING_SLASH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)")  # gs:/bucket: a URL that lost a slash
# Schemes etils.epath routes to a file-system library (fsspec's), and the package that provides each.
_SCHEMES = {"gs": "gcsfs (pip install 'eemo-jax[gcs]')", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_COPY_CHUNK = 16 * 2**20


class PathError(ConfigError):
  """A path the project cannot use as given; the message names it and says what to do."""


def _configure_fsspec() -> None:
  """Files in a run's bucket folder are also written by other processes and by tensorstore (Orbax's arrays),
  which fsspec's listing cache would not see: a cached listing would hide a checkpoint another host just
  wrote. So bucket listings are always asked of the bucket."""
  try:
    import fsspec
  except ImportError:  # etils' epath extra brings fsspec; without it no URL works, as check_usable says
    return
  for protocol in ("gs", "gcs", "s3", "az"):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_configure_fsspec()


def is_url(path) -> bool:
  """`gs://bucket/x`, `s3://...`, `memory://...`: a location for a filesystem library, not for `os`."""
  return bool(_URL.match(str(path)))


def absolute(path) -> str:
  """`path` as an absolute local path (`~` expanded), or unchanged when it is a URL or empty."""
  path = str(path)
  if not path or is_url(path):
    return path
  missing = _MISSING_SLASH.match(path)
  if missing and missing.group(1).lower() in _SCHEMES:
    raise PathError(f"{path} looks like a bucket URL with one slash too few; write {missing.group(1)}://"
                    f"{path[missing.end():]}")
  return os.path.abspath(os.path.expanduser(path))


def check_usable(path, setting: str = "") -> None:
  """Raises `PathError` (one line naming `setting`) for a URL no installed file system can reach; local paths pass."""
  path = str(path)
  if not is_url(path):
    return
  scheme = path.split("://", 1)[0].lower()
  where = f"{setting} = {path}" if setting else path
  if scheme not in _SCHEMES:
    raise PathError(f"{where}: {scheme}:// is not a file system EEmo-JAX can use; use a local path or a "
                    f"{', '.join(s + '://' for s in _SCHEMES)} URL")
  import fsspec
  try:
    fsspec.get_filesystem_class("gcs" if scheme == "gs" else scheme)
  except ImportError:
    raise PathError(f"{where}: {scheme}:// paths need {_SCHEMES[scheme]}") from None
  if not path.split("://", 1)[1].strip("/"):
    raise PathError(f"{where} names no bucket; write {scheme}://BUCKET/folder")


def check_all(config, *settings: str) -> None:
  """`check_usable` for each dotted config key (`train.run_dir`, ...): before a run writes or loads anything."""
  for setting in settings:
    value = config
    for key in setting.split("."):
      value = value[key]
    check_usable(value or "", setting)


def _epath(path):
  from etils import epath
  check_usable(path)
  return epath.Path(path)


def _filesystem(path):
  """(fsspec file system, path without its scheme), for what epath does not offer."""
  import fsspec
  check_usable(path)
  fs, stripped = fsspec.core.url_to_fs(str(path))
  return fs, stripped.rstrip("/")


# --------------------------------------------------------------------------------------------- names
def join(base, *names: str) -> str:
  """`base/name/...`; a URL keeps its `scheme://`."""
  base = str(base)
  return posixpath.join(base, *names) if is_url(base) else os.path.join(base, *names)


def dirname(path) -> str:
  """The folder holding `path`; a bucket URL's root (`gs://bucket`) is its own folder."""
  path = str(path)
  if not is_url(path):
    return os.path.dirname(path)
  scheme, rest = path.split("://", 1)
  rest = rest.rstrip("/")
  return f"{scheme}://{posixpath.dirname(rest) if '/' in rest else rest}"


def basename(path) -> str:
  path = str(path)
  return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def is_root(path) -> bool:
  """The root of a file system or of a bucket, which no export may replace."""
  return dirname(path) == str(path).rstrip("/") if is_url(path) else os.path.dirname(path) == path


def inside(path, folder) -> bool:
  """Whether `path` is `folder` or lies below it (local paths with symlinks resolved)."""
  path, folder = str(path), str(folder)
  if is_url(path) or is_url(folder):
    path, folder = path.rstrip("/"), folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


# --------------------------------------------------------------------------------------------- asking
def exists(path) -> bool:
  return _epath(path).exists() if is_url(path) else os.path.exists(path)


def lexists(path) -> bool:
  """Whether anything is at `path`, a broken local symlink included."""
  return _epath(path).exists() if is_url(path) else os.path.lexists(path)


def isdir(path) -> bool:
  """A folder; in a bucket, a prefix some object lies under."""
  return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
  if is_url(path):
    p = _epath(path)
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def listdir(path) -> list[str]:
  """The names in a folder (`os.listdir`'s order locally)."""
  if is_url(path):  # a folder placeholder object (the console makes them) is the folder itself, not an entry
    fs, root = _filesystem(path)
    return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False) if n.rstrip("/") != root})
  return os.listdir(path)


def size(path) -> int:
  return _epath(path).stat().length if is_url(path) else os.path.getsize(path)


def files_under(folder) -> list[str]:
  """Every file below `folder`, as paths relative to it (`/`-separated), sorted."""
  out = []
  if is_url(folder):
    fs, root = _filesystem(folder)  # epath's walk drops the scheme from the folders it yields
    out = [name[len(root) + 1:] for name in fs.find(root) if name.startswith(root + "/") and not name.endswith("/")]
  else:
    for root, _, names in os.walk(folder):
      rel = os.path.relpath(root, folder)
      out += [n if rel == "." else os.path.join(rel, n).replace(os.sep, "/") for n in names]
  return sorted(out)


# --------------------------------------------------------------------------------------------- reading and writing
def open_file(path, mode: str = "r", **kwargs):
  """A file object, as `open` gives; on a URL only whole-file modes (r, rb, w, wb): no append, no seek on write."""
  if not is_url(path):
    return builtins.open(path, mode, **kwargs)
  if "a" in mode or "+" in mode:
    raise ValueError(f"{path}: a bucket object cannot be opened with mode {mode!r}; use AppendedFile")
  return _epath(path).open(mode, **kwargs)


def read_text(path, encoding: str = "utf-8") -> str:
  with open_file(path, "r", encoding=encoding) as f:
    return f.read()


def read_bytes(path) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def write_text(path, text: str, encoding: str = "utf-8") -> None:
  with open_file(path, "w", encoding=encoding) as f:
    f.write(text)


def write_bytes(path, data: bytes) -> None:
  with open_file(path, "wb") as f:
    f.write(data)


def replace_file(path, text: str) -> None:
  """Replaces a (small) file so that a reader sees the old content or the new, never half of it.

  Local: a temporary file beside it, then `os.replace` (a kill while writing leaves the previous file). In a
  bucket an upload becomes visible only once complete and then replaces the object whole, which is the
  same guarantee without the temporary object.
  """
  path = str(path)
  if is_url(path):
    write_text(path, text)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with builtins.open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def makedirs(path) -> None:
  """Creates a local folder and its parents. A bucket has no folders (an object's name makes its prefix), so
  for a URL there is nothing to create; fsspec's `makedirs` would even create a missing *bucket*."""
  if is_url(path):
    check_usable(path)
    return
  os.makedirs(path, exist_ok=True)


def remove(path) -> None:
  """Removes a file (missing is fine)."""
  if is_url(path):
    _epath(path).unlink(missing_ok=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def rmtree(path) -> None:
  """Removes a folder and everything under it (missing is fine); never follows a local symlink."""
  if is_url(path):
    p = _epath(path)
    if p.exists():
      p.rmtree(missing_ok=True)
  elif os.path.lexists(path):
    shutil.rmtree(path, ignore_errors=True)


def copy_file(src, dst) -> None:
  """Copies one file between any two places (local or bucket), streaming, never holding it whole; within one
  bucket file system the store copies it itself (GCS: a rewrite), so the bytes never pass through this host."""
  if not is_url(src) and not is_url(dst):
    shutil.copyfile(src, dst)
    return
  if is_url(src) and is_url(dst) and str(src).split("://", 1)[0] == str(dst).split("://", 1)[0]:
    fs, source = _filesystem(src)
    fs.copy(source, _filesystem(dst)[1])
    return
  with open_file(src, "rb") as reader, open_file(dst, "wb") as writer:
    while chunk := reader.read(_COPY_CHUNK):
      writer.write(chunk)


def move(src, dst) -> None:
  """Moves a file or folder. In a bucket this is a copy of every object and then a delete: not atomic."""
  if is_url(src) or is_url(dst):
    if not (is_url(src) and is_url(dst)):
      raise ValueError(f"cannot move {src} to {dst}: both must be in the same bucket file system")
    _epath(src).rename(_epath(dst))
  else:
    shutil.move(src, dst)


def download(src, local_dir: str, names: list[str] | None = None) -> list[str]:
  """Copies `names` (default: every file) of the folder `src` into `local_dir`; returns their local paths."""
  names = files_under(src) if names is None else names
  out = []
  for name in names:
    target = os.path.join(local_dir, *name.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    copy_file(join(src, name), target)
    out.append(target)
  return out


@contextlib.contextmanager
def local_folder(path) -> Iterator[str]:
  """A local folder to write files into for a library that needs a real path (e.g. matplotlib's savefig): `path`
  itself when local; for a URL a temporary folder whose files are uploaded to `path` when the block ends
  (and dropped if it raises)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    yield path
    return
  check_usable(path)
  with tempfile.TemporaryDirectory(prefix="eemo-jax-upload-") as tmp:
    yield tmp
    for name in files_under(tmp):
      copy_file(os.path.join(tmp, *name.split("/")), join(path, name))


class AppendedFile:
  """A file that grows by appends (metrics.jsonl, a TensorBoard event file, GRPO samples); resuming continues it.

  Local: opened in append mode and flushed after every append, so a kill loses nothing written.
  In a bucket an object cannot be appended to, only replaced: the file's content (the existing object's, then
  each append) is kept in memory and uploaded whole, at most every `upload_every_s` seconds, on `flush`, and
  on `close`. Each upload replaces the object in one step, so a reader sees a complete earlier version. These
  files are small (a metrics row per step: a few MB over a long run), and a kill loses at most the appends
  of the last `upload_every_s` seconds (rows of steps a resume runs again from its checkpoint anyway).
  """

  def __init__(self, path, *, binary: bool = False, upload_every_s: float = 30.0):
    self.path = str(path)
    self.binary = binary
    self._local = not is_url(self.path)
    if self._local:
      self._file = builtins.open(self.path, "ab" if binary else "a")
      return
    self.upload_every_s = upload_every_s
    # a bytearray, so an append extends it in place (bytes += would copy the whole content every step)
    self._content = bytearray(read_bytes(self.path) if isfile(self.path) else b"")
    self._dirty = False
    self._uploaded = time.monotonic()

  def write(self, data) -> None:
    if self._local:
      self._file.write(data)
      self._file.flush()
      return
    self._content += data if self.binary else data.encode("utf-8")
    self._dirty = True
    if time.monotonic() - self._uploaded >= self.upload_every_s:
      self.flush()

  def flush(self) -> None:
    if self._local:
      self._file.flush()
    elif self._dirty:
      write_bytes(self.path, bytes(self._content))
      self._dirty, self._uploaded = False, time.monotonic()

  def close(self) -> None:
    if self._local:
      self._file.close()
    else:
      self.flush()
