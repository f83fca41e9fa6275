"""Fixtures shared by every test module; plain helpers live in helpers.py."""

import os

import pytest

# First: helpers sets the CPU platform and device count before JAX loads.
from helpers import TEST_LANGUAGES, free_port, start_gcs_emulator


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session, keeping every compile (JAX's default skips those under a
  second: most of a tiny model's): the same tiny steps are compiled by many tests, runs, resumes and workers. The
  runs the tests start as subprocesses read the settings from the environment; this process has read its JAX config
  already, so it gets them there too (before its first compile: JAX opens the cache then). The xdist workers of one
  session share the cache (their base temp folders share a parent)."""
  import jax

  base = tmp_path_factory.getbasetemp()
  path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
  path.mkdir(exist_ok=True)
  settings = {"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": 0.0}
  saved = {name: getattr(jax.config, name) for name in settings}
  with pytest.MonkeyPatch.context() as env:
    for name, value in settings.items():
      env.setenv(name.upper(), str(value))
      jax.config.update(name, value)
    yield path
  for name, value in saved.items():
    jax.config.update(name, value)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
  """A prepared data directory (tokenizer, shards, stats.json) built from the embedded CLDR corpus."""
  from data_pipeline import demo_corpus

  data_dir = str(tmp_path_factory.mktemp("demo_data"))
  demo_corpus.prepare_demo(data_dir, languages=TEST_LANGUAGES, scale=0.3, vocab_size=1000, max_len=256, progress=False)
  return data_dir


@pytest.fixture(scope="session")
def gcs_bucket():
  """A Cloud Storage emulator on localhost (gcp-storage-emulator, the GCS JSON API, started by tests/gcs_emulator.py)
  with one bucket, for the whole session. The standard variables point every client at it: google-cloud-storage
  and gcsfs read STORAGE_EMULATOR_HOST, tensorstore (Orbax's array writer) TENSORSTORE_GCS_HTTP_URL; subprocesses
  inherit them. Tests write under their own prefix of the returned `gs://bucket`."""
  port = free_port()
  bucket = "mmbert-test"
  try:
    proc = start_gcs_emulator(port, bucket)
  except RuntimeError as e:
    pytest.fail(str(e))
  url = f"http://127.0.0.1:{port}"
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  os.environ["STORAGE_EMULATOR_HOST"] = url
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
  yield f"gs://{bucket}"
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.kill()
  proc.wait()


def pytest_collection_modifyitems(items):
  """A test that takes the emulator's bucket is a `gcs` test (`-m gcs` selects them, `-m "not gcs"` leaves them out).
  Slow tests run first (a stable sort: files keep their order), so that xdist's workers share the minutes-long ones
  and end on the quick ones instead of one worker finishing a long test alone."""
  for item in items:
    if "gcs_bucket" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.gcs)
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
