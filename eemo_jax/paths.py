"""Where the project's files live: local paths made absolute, bucket URLs (gs://...) left as they are.

Orbax refuses relative checkpoint paths, and a relative run directory would also mean something else
to every process that starts in another working directory; so every path a run writes goes through
`absolute` once, at the start.
"""

from __future__ import annotations

import os
import re

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
  """`gs://bucket/x`, `s3://...`, `memory://...`: a location for a filesystem library, not for `os`."""
  return bool(_URL.match(str(path)))


def absolute(path: str) -> str:
  """`path` as an absolute local path (`~` expanded), or unchanged when it is a URL or empty."""
  path = str(path)
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))
