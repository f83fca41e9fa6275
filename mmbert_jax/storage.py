"""Failures of writes to a run's directory (disk full, read-only, permissions), as one line that names the path.

Writers (metrics, checkpoints) raise `WriteError` in the training loop's thread, so a failed write stops the run
with a clear message instead of a dead background thread that the loop waits on forever.
"""

from __future__ import annotations

import errno

from data_pipeline.filesystem import StorageUnavailableError

_REASONS = {
  errno.ENOSPC: "disk full",
  errno.EDQUOT: "disk quota exceeded",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "permission denied",
}
# Messages of libraries that do not keep the OSError (tensorstore reports the C library's text).
_TEXTS = {
  "No space left on device": "disk full",
  "Disk quota exceeded": "disk quota exceeded",
  "Read-only file system": "read-only file system",
  "Permission denied": "permission denied",
}


class WriteError(RuntimeError):
  """A write to the run's directory failed; nothing already complete there was changed."""


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def unavailable(error: BaseException) -> StorageUnavailableError | None:
  """The bucket outage (`data_pipeline.filesystem.StorageUnavailableError`) that `error` was raised from, if any:
  a writer that wraps it (metrics, checkpoints) stays a storage outage."""
  return next((e for e in _chain(error) if isinstance(e, StorageUnavailableError)), None)


def is_storage_error(error: BaseException) -> bool:
  """Whether `error` (or one it was raised from) is a failed write of the kinds above."""
  return any(
    (isinstance(e, OSError) and e.errno in _REASONS) or any(t in str(e) for t in _TEXTS) for e in _chain(error)
  )


def reason(error: BaseException) -> str:
  """ "disk full", "read-only file system", ... for an error or any error it was raised from."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in _REASONS:
      return _REASONS[e.errno]
  for e in _chain(error):
    for text, why in _TEXTS.items():
      if text in str(e):
        return why
  first = str(error).strip().splitlines()
  return f"{type(error).__name__}: {first[0]}" if first else type(error).__name__


def write_error(what: str, path: str, error: BaseException) -> WriteError:
  """`WriteError("writing metrics failed: disk full at /run/metrics.jsonl")`, raised from `error`."""
  return WriteError(f"{what} failed: {reason(error)} at {path}")


def failed_write(error: BaseException) -> WriteError:
  """`WriteError("writing failed: disk full at <the file>")` for an OSError of a write outside the training loop
  (a shard copied to the local cache, an export, a merge); the path is the one the error names."""
  path = next((e.filename for e in _chain(error) if isinstance(e, OSError) and e.filename), None)
  return write_error("writing", str(path) if path is not None else "(no path given)", error)
