"""`python -m gcp_storage_emulator start ...` for the tests (tests/conftest.py `gcs_bucket`), with the one header the
emulator leaves out: `x-goog-generation` on object downloads. Tensorstore (Orbax's array writer) reads it to update
an OCDBT manifest in place; without it a checkpoint whose arrays are committed in more than one batch fails with
"Malformed StorageGeneration"."""

import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

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
