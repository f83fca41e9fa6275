"""`python -m gcp_storage_emulator start ...` for the tests (tests/conftest.py `gcs_bucket`), with what the emulator
leaves out:

- the `x-goog-generation` header on object downloads. Tensorstore (Orbax's array writer) reads it to update an OCDBT
  manifest in place; without it a checkpoint whose arrays are committed in more than one batch fails with
  "Malformed StorageGeneration".
- durable writes: an emulator that keeps objects on disk and is killed (the storage outage tests) must start again
  with what it had, as a real bucket would; it rewrites its object index in place, and a kill in the middle left a
  truncated index that the next start cannot read. Files are written to a temporary name and renamed.
"""

import os
import sys

from gcp_storage_emulator import storage as emulator_storage
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _write_bytes_whole(self, rel: str, content: bytes) -> None:
  if self._use_memory:
    return _write_bytes(self, rel, content)
  path = self._disk_path(self._norm(rel))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(content)
  os.replace(tmp, path)


_write_bytes = emulator_storage._FileStore.write_bytes
emulator_storage._FileStore.write_bytes = _write_bytes_whole

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
  except NotFound:
    pass  # the handler answers 404
  return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routing table from it

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
  main(sys.argv[1:])
