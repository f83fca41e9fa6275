"""The one filesystem layer: every path the project reads or writes, local or `gs://`, goes through here.

Paths are `etils.epath.Path` objects (the layer Orbax uses itself): local paths are plain files, `gs://bucket/...`
goes through gcsfs (google-cloud-storage's JSON API; `STORAGE_EMULATOR_HOST` points it at an emulator). What a
bucket cannot do, this module does another way:

- Objects are written whole and replaced atomically, so `write_text` needs no temporary file there; locally it
  writes a temporary file and renames it, so a reader never sees half a file.
- There is no append on GCS (gcsfs silently overwrites in mode "a"): append-only logs are kept in a local file and
  copied up whole (`metrics.MetricWriter`).
- Libraries that only open local files (ArrayRecord, SentencePiece, safetensors, matplotlib) get a local copy
  (`local_copy`) or write into a local folder that is uploaded when they are done (`staged_dir`).

Outputs of several files are complete or absent: `staged_dir` writes into a temporary folder and moves the files
into place only when the block ends without an error; a failed block (a full disk, a bad input) removes its partial
files. `local_copy` does the same for one file.

`path(value, key)` is where a user-supplied string becomes a Path: an unsupported scheme, a malformed `gs:/x` or a
`gs://` path without the GCS packages is one line naming the config key, never a local folder called `gs:`.

A bucket that stops answering (an outage, a network partition) is retried, visibly and for a bounded time: every
gcsfs request that fails in a way worth retrying (connection refused, timeouts, 5xx, 429) is retried with capped
backoff; once a bucket has failed for `warn_after_s` (30 s) one `warning:` line names it, one more says when it
answers again, and after `timeout_s` (`config.storage_timeout_s`, 30 min) the request raises
`StorageUnavailableError`; a command line ends there with one line and exit status 1 (see `set_storage_limits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import fsspec
from etils import epath

Path = epath.Path
SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")

# Checkpoints are written by tensorstore and by other hosts, behind gcsfs's back: a cached directory listing would
# hide their steps. Listings are therefore always fresh.
fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False
fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False


class _BucketTypeOnce(logging.Filter):
  """gcsfs repeats its bucket-type warning at every operation when it cannot ask the storage-layout API (no
  credentials, an emulator): hundreds of lines per run. Each such message passes once; other messages all pass."""

  def __init__(self):
    super().__init__()
    self.seen: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "bucket type" not in message and "storage layout" not in message:
      return True
    if message in self.seen:
      return False
    self.seen.add(message)
    return True


logging.getLogger("gcsfs").addFilter(_BucketTypeOnce())


# ---- storage outages --------------------------------------------------------------------------------------------


class StorageUnavailableError(OSError):
  """A bucket did not answer for `timeout_s`; the request that gave up raises this, nothing partial is kept."""


class _Outages:
  """Per bucket: since when its requests have been failing (reset by any answer), and whether that was said."""

  def __init__(self):
    self.warn_after_s = 30.0
    self.timeout_s = 1800.0
    self.lock = threading.Lock()
    self.exit_on_timeout = False
    self.since: dict[str, float] = {}
    self.warned: set[str] = set()

  def failed(self, bucket: str, what: str, error: BaseException) -> float:
    """Records a failed request; warns once per outage past `warn_after_s`, raises past `timeout_s`. Returns the
    seconds the bucket has been failing."""
    now = time.monotonic()
    with self.lock:
      down = now - self.since.setdefault(bucket, now)
      warn = down >= self.warn_after_s and bucket not in self.warned
      if warn:
        self.warned.add(bucket)
    cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}".rstrip(": ")
    if down >= self.timeout_s:
      message = (
        f"storage gs://{bucket} has not answered for {down:.0f} s (config.storage_timeout_s={self.timeout_s:g}; "
        f"{what}: {cause}); stopped without saving anything partial, the last complete checkpoint is kept"
      )
      self._end_process(message)
      raise StorageUnavailableError(message) from error
    if warn:
      print(
        f"warning: storage gs://{bucket} has not answered for {down:.0f} s ({what}: {cause}); retrying for up to "
        f"{self.timeout_s:g} s (config.storage_timeout_s)",
        file=sys.stderr,
        flush=True,
      )
    return down

  def _end_process(self, message: str) -> None:
    """A command line ends at the first request that gives up, with one line: other threads (a checkpoint write,
    which tensorstore retries itself) would otherwise keep it waiting, and log each failure of their own."""
    if self.exit_on_timeout:
      sys.stdout.flush()
      print(f"error: {message}", file=sys.stderr, flush=True)
      os._exit(1)

  def answered(self, bucket: str) -> None:
    with self.lock:
      since = self.since.pop(bucket, None)
      warned = bucket in self.warned
      self.warned.discard(bucket)
    if warned:
      print(f"storage gs://{bucket} answers again after {time.monotonic() - since:.0f} s", file=sys.stderr, flush=True)


_outages = _Outages()


def set_storage_limits(*, warn_after_s: float, timeout_s: float, exit_on_timeout: bool = False) -> None:
  """How long failing bucket requests are retried before a warning line, and before they raise
  `StorageUnavailableError` (`config.storage_warn_s`, `config.storage_timeout_s`; the entry point sets them).
  Orbax's array writes go through tensorstore, whose retries `mmbert_jax.checkpoint` sets to the same bound.
  `exit_on_timeout`: the process ends with one `error:` line and exit status 1 when a request gives up (a command
  line); otherwise the request raises (a notebook)."""
  _outages.warn_after_s, _outages.timeout_s = float(warn_after_s), float(timeout_s)
  _outages.exit_on_timeout = exit_on_timeout


def storage_limits() -> tuple[float, float]:
  return _outages.warn_after_s, _outages.timeout_s


def _patient(request, bucket_of):
  """gcsfs's request `request` (undecorated: gcsfs alone gives up after six tries, about 30 s) retried for as long
  as `_outages` allows, with gcsfs's own test of which failures are worth retrying."""
  from gcsfs import retry as gcs_retry

  async def patient(self, *args, **kwargs):
    delay = 0.5
    while True:
      try:
        result = await request(self, *args, **kwargs)
      except (gcs_retry.HttpError, TimeoutError, *gcs_retry.RETRIABLE_EXCEPTIONS) as e:
        bucket, what = bucket_of(self, *args)
        if not (gcs_retry.is_retriable(e) or isinstance(e, TimeoutError)):
          _outages.answered(bucket)  # a refusal (404, 412, ...) is an answer
          raise
        _outages.failed(bucket, what, e)
        await asyncio.sleep(delay * (1 + random.random() / 2))
        delay = min(delay * 2, 8.0)
        continue
      if _outages.since:  # only while some bucket is failing: no work per request otherwise
        _outages.answered(bucket_of(self, *args)[0])
      return result

  patient.__name__ = getattr(request, "__name__", "request")
  return patient


def _request_target(self, method, path, *args, **kwargs) -> tuple[str, str]:
  url = self._format_path(path, args)
  match = re.search(r"/b/([^/?]+)", url)
  return (match[1] if match else "?"), f"{method} {url.split('?')[0]}"


def _download_target(self, rpath, *args, **kwargs) -> tuple[str, str]:
  bucket, key, _ = self.split_path(rpath)
  return bucket, f"GET gs://{bucket}/{key}"


def _restarting_lost_uploads(upload_chunk):
  """gcsfs's `GCSFile._upload_chunk` that starts the upload again when the server no longer knows its session
  (404, or 410 Gone: expired, or completed by a try whose answer was lost in an outage) and every byte of the file
  is still in the buffer; a session lost after a part was sent fails with one line (nothing partial is committed)."""
  from gcsfs.retry import HttpError

  def upload(self, final=False):
    try:
      return upload_chunk(self, final)
    except (FileNotFoundError, HttpError) as e:
      if self.location is None or (isinstance(e, HttpError) and e.code != 410):
        raise
      if self.offset:
        raise OSError(
          f"gs://{self.path}: the storage server lost the upload session after {self.offset} bytes were sent; the "
          "write failed and nothing of it was committed"
        ) from e
      self._initiate_upload()
      return upload_chunk(self, final)

  return upload


@functools.cache
def _install_patient_requests() -> None:
  """Every gcsfs request (metadata, uploads, downloads) goes through `_patient`, and a file written through gcsfs
  survives the loss of its upload session; once, at the first gs:// path."""
  import aiohttp
  import gcsfs.core

  # A request that hangs (a partition, a stopped server) is a failure to retry, not a wait without end: no
  # connection within 30 s, or no byte of the answer for 60 s (gcsfs sets no timeout of its own).
  timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
  for protocol in ("gcs", "gs"):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("requests_timeout", timeout)
  for name, target in (("_request", _request_target), ("_get_file_request", _download_target)):
    # On gcsfs's base class: its experimental subclass (zonal buckets) hands standard buckets' requests to it.
    original = getattr(gcsfs.core.GCSFileSystem, name)
    setattr(gcsfs.core.GCSFileSystem, name, _patient(original.__wrapped__, target))
  gcsfs.core.GCSFile._upload_chunk = _restarting_lost_uploads(gcsfs.core.GCSFile._upload_chunk)


def path(value: str | os.PathLike, key: str = "path") -> epath.Path:
  """`value` as a Path; `key` names the flag or config key in the error for a path that cannot be used."""
  text = os.fspath(value) if not isinstance(value, str) else value
  if not text:
    raise ValueError(f"{key} is empty; expected a local path or gs://bucket/...")
  m = _SCHEME.match(text)
  if m is None:
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  scheme = m.group(1).lower()
  if scheme not in SCHEMES:
    raise ValueError(f"{key}={text}: the scheme {scheme}:// is not supported; use a local path or gs://bucket/...")
  if not re.match(r"^gs://[a-z0-9][a-z0-9._-]*(/|$)", text):
    raise ValueError(f"{key}={text} is not a valid gs:// path; expected gs://bucket/path (a lower-case bucket name)")
  if importlib.util.find_spec("gcsfs") is None:
    raise ValueError(f"{key}={text} needs the GCS client packages (gcsfs); reinstall with `pip install -e .`")
  _install_patient_requests()
  return epath.Path(text.rstrip("/") if text.count("/") > 2 else text)


def is_remote(p: str | os.PathLike) -> bool:
  """Whether `p` lives in a bucket (no local file handle can be opened on it)."""
  return _SCHEME.match(os.fspath(p)) is not None


def local_path(p: epath.Path, what: str) -> str:
  """`p` as a local filename for a library that only opens local files; a bucket path is refused."""
  if is_remote(p):
    raise ValueError(f"{what} must be a local path, got {p}")
  return os.fspath(p)


def write_text(p: epath.Path, text: str, encoding: str = "utf-8") -> None:
  """Replaces `p` whole: a reader sees the old or the new content, never a part."""
  if is_remote(p):
    p.write_text(text, encoding=encoding)
    return
  tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
  tmp.write_text(text, encoding=encoding)
  os.replace(tmp, p)


def upload(local_file: str | os.PathLike, dest: epath.Path) -> None:
  """Copies a local file to `dest` (a bucket object or a local file), replacing it."""
  epath.Path(local_file).copy(dest, overwrite=True)


def copy_tree(src: epath.Path, dest: epath.Path) -> None:
  """Copies every file under `src` (local or a bucket) to the same relative path under `dest`."""
  root = os.fspath(src).removeprefix("gs://").rstrip("/")
  for folder, _, files in src.walk():
    # epath's walk of a bucket yields its folders without the gs:// prefix: only the relative part is used.
    relative = os.fspath(folder).removeprefix("gs://")[len(root) :].strip("/")
    for name in sorted(files):
      source = src / relative / name if relative else src / name
      target = dest / relative / name if relative else dest / name
      target.parent.mkdir(parents=True, exist_ok=True)
      source.copy(target, overwrite=True)


def move_tree(src: epath.Path, dest: epath.Path) -> None:
  """Moves the folder `src` to `dest`: a rename on local disk; in a bucket, which has no folder rename, every object
  is copied first and the originals are deleted only once the copy is complete."""
  if is_remote(src):
    copy_tree(src, dest)
    src.rmtree()
  else:
    src.rename(dest)


def cache_root() -> epath.Path:
  """Where bucket files are copied for libraries that read local files: $MMBERT_JAX_CACHE or ~/.cache/mmbert_jax."""
  return epath.Path(os.environ.get("MMBERT_JAX_CACHE") or os.path.expanduser("~/.cache/mmbert_jax"))


def cache_target(p: epath.Path, stat=None, cache: epath.Path | None = None) -> epath.Path:
  """Where `local_copy` keeps the bucket file `p` (its version, from `stat` or `p.stat()`, is part of the name)."""
  stat = stat or p.stat()
  key = hashlib.sha1(f"{p}|{stat.length}|{stat.mtime}".encode()).hexdigest()[:16]
  target = (cache or cache_root()) / "gs" / os.fspath(p)[len("gs://") :]
  return target.parent / f"{target.name}.{key}"


def free_space(folder: epath.Path) -> int:
  """Free bytes on the local disk that holds (or would hold) `folder`."""
  folder = os.path.abspath(os.fspath(folder))
  while not os.path.exists(folder):  # local-only: the cache folder may not exist yet
    folder = os.path.dirname(folder)
  return shutil.disk_usage(folder).free


def local_copy(p: epath.Path, cache: epath.Path | None = None, stat=None) -> str:
  """A local filename with the content of `p`: `p` itself when local, else a copy under the cache, made once per
  host and refreshed when the object's size or modification time changes. Concurrent processes of one host each
  copy to their own temporary name and rename, so none reads a partial file."""
  if not is_remote(p):
    return os.fspath(p)
  target = cache_target(p, stat, cache)
  if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
      p.copy(tmp, overwrite=True)
      os.replace(tmp, target)
    except BaseException as e:  # a full disk: the partial copy would keep it full
      tmp.unlink(missing_ok=True)
      if isinstance(e, OSError):
        e.filename = os.fspath(target)  # the cache file, not the temporary name
      raise
  return os.fspath(target)


@contextlib.contextmanager
def staged_dir(dest: epath.Path) -> Iterator[str]:
  """A local folder to write `dest`'s files into: a temporary one, whose files are moved (local `dest`: beside it,
  so a rename) or uploaded (a bucket) under `dest` when the block ends without an error. A failed block, a kill
  included, leaves `dest` as it was; the temporary folder is removed (after a kill, a hidden `.<name>.tmp-…`
  folder beside `dest` may remain, which nothing reads)."""
  if is_remote(dest):
    tmp = tempfile.mkdtemp(prefix="mmbert_jax-stage-")
  else:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=os.fspath(dest.parent))
  try:
    yield tmp
    if is_remote(dest):
      copy_tree(epath.Path(tmp), dest)
    elif not dest.exists():
      os.rename(tmp, dest)
    else:
      _move_files(tmp, os.fspath(dest))
  except OSError as e:  # named as the output it was for, not the temporary folder that is removed
    if isinstance(e.filename, str) and e.filename.startswith(tmp):
      e.filename = os.path.join(os.fspath(dest), os.path.relpath(e.filename, tmp))
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _move_files(src: str, dest: str) -> None:
  """Moves every file under local `src` to the same relative path under local `dest` (each a rename)."""
  for folder, _, files in os.walk(src):
    target = os.path.join(dest, os.path.relpath(folder, src))
    os.makedirs(target, exist_ok=True)
    for name in sorted(files):
      os.replace(os.path.join(folder, name), os.path.join(target, name))
