"""The filesystem layer on local disk and on a GCS emulator (tests/conftest.py `gcs_bucket`)."""

import asyncio
import os
import time
import uuid

import numpy as np
import pytest
from helpers import free_port

from data_pipeline import filesystem as fs


@pytest.fixture
def remote(gcs_bucket):
  return fs.path(f"{gcs_bucket}/{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize(
  "value, words",
  [
    ("s3://b/x", "config.workdir=s3://b/x: the scheme s3:// is not supported"),
    ("gs:/b/x", "config.workdir=gs:/b/x is not a valid gs:// path"),
    ("gs://Bucket/x", "is not a valid gs:// path"),
    ("", "config.workdir is empty"),
  ],
)
def test_unusable_paths_name_the_key(value, words, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=words.replace("/", "/").replace(".", r"\.")) as e:
    fs.path(value, "config.workdir")
  assert "\n" not in str(e.value)
  assert not any(tmp_path.iterdir())  # no local folder named "gs:" or "s3:"


def test_local_paths_are_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(fs.path("run/x")) == os.path.join(str(tmp_path), "run", "x")
  assert not fs.is_remote(fs.path("run/x")) and fs.is_remote("gs://b/x")


def test_write_text_replaces_whole_file(tmp_path, remote):
  for base in (fs.path(str(tmp_path)), remote):
    p = base / "a.json"
    base.mkdir(parents=True, exist_ok=True)
    fs.write_text(p, "old")
    fs.write_text(p, "new")
    assert p.read_text() == "new"
    assert sorted(x.name for x in base.iterdir()) == ["a.json"]  # no temporary file left behind


def test_listing_sees_objects_written_by_another_client(remote):
  from google.cloud import storage

  (remote / "a").write_text("1")
  assert [p.name for p in remote.iterdir()] == ["a"]
  bucket, prefix = os.fspath(remote)[len("gs://") :].split("/", 1)
  storage.Client().bucket(bucket).blob(f"{prefix}/b").upload_from_string(b"2")
  assert sorted(p.name for p in remote.iterdir()) == ["a", "b"]  # no stale cached listing


def test_local_copy_is_made_once_and_refreshed(remote, tmp_path):
  src = remote / "d" / "shard.bin"
  src.parent.mkdir(parents=True, exist_ok=True)
  src.write_bytes(b"abc")
  first = fs.local_copy(src, cache=fs.path(str(tmp_path)))
  assert open(first, "rb").read() == b"abc"
  assert fs.local_copy(src, cache=fs.path(str(tmp_path))) == first
  src.write_bytes(b"abcd")  # a new object: another size
  second = fs.local_copy(src, cache=fs.path(str(tmp_path)))
  assert second != first and open(second, "rb").read() == b"abcd"
  assert fs.local_copy(fs.path(str(tmp_path / "x")), cache=None) == str(tmp_path / "x")


def test_staged_dir_uploads_on_success_only(remote):
  with fs.staged_dir(remote / "ok") as d:
    os.makedirs(os.path.join(d, "sub"))
    open(os.path.join(d, "sub", "f.txt"), "w").write("x")
  assert (remote / "ok" / "sub" / "f.txt").read_text() == "x"
  with pytest.raises(RuntimeError):
    with fs.staged_dir(remote / "failed") as d:
      open(os.path.join(d, "f.txt"), "w").write("x")
      raise RuntimeError("boom")
  assert not (remote / "failed").exists()


def test_copy_tree_between_buckets_and_disk(remote, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where a bucket path taken for a local one would land
  local = fs.path(str(tmp_path / "src"))
  (local / "a" / "b").mkdir(parents=True)
  (local / "top.txt").write_text("1")
  (local / "a" / "b" / "deep.txt").write_text("2")
  fs.copy_tree(local, remote / "up")  # disk → bucket
  fs.copy_tree(remote / "up", remote / "across")  # bucket → bucket (a folder "rename")
  fs.copy_tree(remote / "across", fs.path(str(tmp_path / "down")))  # bucket → disk
  down = tmp_path / "down"
  assert sorted(str(p.relative_to(down)) for p in down.rglob("*") if p.is_file()) == ["a/b/deep.txt", "top.txt"]
  assert (down / "a" / "b" / "deep.txt").read_text() == "2" and (remote / "up" / "top.txt").read_text() == "1"
  assert not (tmp_path / "mmbert-test").exists() and not list(tmp_path.glob("gs:*"))


def test_local_staged_dir_moves_complete_outputs_into_place(tmp_path):
  """Nothing under the destination until the block ends; a failed block leaves the destination as it was and no
  temporary folder; into an existing folder the files are added beside what it holds."""
  dest = fs.path(str(tmp_path / "out"))
  with fs.staged_dir(dest) as d:
    os.makedirs(os.path.join(d, "sub"))
    open(os.path.join(d, "sub", "f.txt"), "w").write("x")
    assert not dest.exists()
  assert (dest / "sub" / "f.txt").read_text() == "x"
  with pytest.raises(OSError, match="No space left"):
    with fs.staged_dir(dest) as d:
      open(os.path.join(d, "g.txt"), "w").write("partial")
      raise OSError(28, "No space left on device")
  assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(dest)) == ["sub"]
  with fs.staged_dir(dest) as d:
    open(os.path.join(d, "g.txt"), "w").write("y")
  assert sorted(os.listdir(dest)) == ["g.txt", "sub"] and (dest / "sub" / "f.txt").read_text() == "x"


def test_local_copy_that_fails_leaves_no_partial_file(remote, tmp_path, monkeypatch):
  """A full disk while a bucket file is copied to the cache: the error propagates and the partial copy is gone."""
  src = remote / "shard.bin"
  src.write_bytes(b"abc")
  copy = type(src).copy

  def full_disk(self, dst, overwrite=False):
    copy(self, dst, overwrite=overwrite)  # the bytes land, then the disk is full
    raise OSError(28, "No space left on device", str(dst))

  monkeypatch.setattr(type(src), "copy", full_disk)
  with pytest.raises(OSError, match="No space left"):
    fs.local_copy(src, cache=fs.path(str(tmp_path / "cache")))
  assert [f for _, _, files in os.walk(tmp_path / "cache") for f in files] == []


# ---- storage outages: retried, said once, bounded ---------------------------------------------------------------


@pytest.fixture
def limits():
  saved = fs.storage_limits()
  yield fs.set_storage_limits
  fs.set_storage_limits(warn_after_s=saved[0], timeout_s=saved[1])


def _flaky(fail_for_s, calls):
  """A gcsfs-like request that is refused (as by a stopped server) for `fail_for_s` seconds, then answers."""
  import aiohttp

  start = []

  async def request(self, method, path, *args, **kwargs):
    calls.append(time.monotonic())
    start.append(start[0] if start else time.monotonic())
    if time.monotonic() - start[0] < fail_for_s:
      raise aiohttp.ClientConnectionError("Cannot connect to host 127.0.0.1:9 [Connection refused]")
    return 200, {}, None, b"ok"

  return request


def _target(self, method, path, *args, **kwargs):
  return "bucket-x", f"{method} {path}"


def test_failing_requests_are_retried_with_one_warning_and_one_recovery_line(limits, capsys):
  limits(warn_after_s=0.5, timeout_s=60)
  calls = []
  patient = fs._patient(_flaky(2.0, calls), _target)
  assert asyncio.run(patient(None, "GET", "b/bucket-x/o/k"))[3] == b"ok"
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2, err
  assert err[0].startswith("warning: storage gs://bucket-x has not answered for ")
  assert "GET b/bucket-x/o/k: ClientConnectionError" in err[0] and "config.storage_timeout_s" in err[0]
  assert err[1].startswith("storage gs://bucket-x answers again after ")
  gaps = np.diff(calls)
  assert len(calls) >= 3 and all(b >= a for a, b in zip(gaps, gaps[1:]))  # backoff: growing delays
  # The next outage is a new one: its warning is said again.
  asyncio.run(fs._patient(_flaky(1.0, []), _target)(None, "GET", "b/bucket-x/o/k"))
  assert "warning: storage gs://bucket-x" in capsys.readouterr().err


def test_an_outage_past_the_timeout_raises_naming_the_bucket(limits):
  limits(warn_after_s=0.2, timeout_s=1.5)
  calls = []
  start = time.monotonic()
  with pytest.raises(fs.StorageUnavailableError, match=r"storage gs://bucket-x has not answered for \d+ s"):
    asyncio.run(fs._patient(_flaky(1e9, calls), _target)(None, "GET", "b/bucket-x/o/k"))
  assert 1.5 <= time.monotonic() - start < 10 and len(calls) >= 2
  fs._outages.answered("bucket-x")


def test_a_request_that_is_no_outage_is_not_retried(limits):
  limits(warn_after_s=0.2, timeout_s=60)
  calls = []

  async def missing(self, method, path, *args, **kwargs):
    calls.append(1)
    raise FileNotFoundError(path)

  with pytest.raises(FileNotFoundError):
    asyncio.run(fs._patient(missing, _target)(None, "GET", "b/bucket-x/o/k"))
  assert calls == [1]


def test_gcsfs_requests_to_a_server_that_is_down_end_at_the_timeout(limits, monkeypatch):
  """Through gcsfs itself: its own six tries (about 30 s) are replaced by the bound of `set_storage_limits`. (gcsfs's
  base class: the experimental one first asks a storage-layout API for a minute, which an emulator lacks.)"""
  import gcsfs.core

  port = free_port()  # nothing listens there: every connection is refused
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  limits(warn_after_s=0.5, timeout_s=2)
  fs.path("gs://down-bucket/x")  # the first gs:// path installs the retries
  gcs = gcsfs.core.GCSFileSystem(skip_instance_cache=True, token="anon")
  start = time.monotonic()
  with pytest.raises(fs.StorageUnavailableError, match="gs://down-bucket"):
    gcs.cat_file("down-bucket/x")
  assert 2 <= time.monotonic() - start < 12
  fs._outages.answered("down-bucket")


@pytest.fixture
def restarting(monkeypatch):
  """An emulator of its own (objects and upload sessions in memory) that a test restarts at a chosen moment of an
  upload: the server then no longer knows the session, as a real one after it expired."""
  from helpers import StoppableEmulator

  server = StoppableEmulator("lost-session")
  for key, value in server.env.items():
    monkeypatch.setenv(key, value)
  yield server
  server.stop()


def _gcs():
  import gcsfs.core

  fs.path("gs://lost-session/x")  # the first gs:// path installs the retries
  return gcsfs.core.GCSFileSystem(skip_instance_cache=True, token="anon")


def test_a_file_whose_upload_session_is_lost_before_any_byte_is_uploaded_again_whole(restarting, monkeypatch):
  """An outage between starting an upload and sending its bytes (the orbax metadata file of a checkpoint): the
  server answers 404 for the session afterwards; the file, all in the buffer, is uploaded again in a new one."""
  import gcsfs.core

  started = gcsfs.core.initiate_upload

  async def initiate_then_lose(*args, **kwargs):
    location = await started(*args, **kwargs)
    if not sessions:
      restarting.stop()
      restarting.start()
    sessions.append(location)
    return location

  sessions = []
  monkeypatch.setattr(gcsfs.core, "initiate_upload", initiate_then_lose)
  gcs, data = _gcs(), b'{"step": 8}' * 100
  with gcs.open("lost-session/run/meta/metadata", "wb") as f:
    f.write(data)
  assert len(sessions) == 2 and sessions[0] != sessions[1]
  assert gcs.cat_file("lost-session/run/meta/metadata") == data


def test_a_file_whose_upload_session_is_lost_after_a_part_was_sent_fails_with_one_line(restarting):
  gcs = _gcs()
  f = gcs.open("lost-session/big", "wb", block_size=2**18)
  f.write(os.urandom(2**18 + 1000))
  f.flush()  # the first 256 KiB are sent in the session
  assert f.offset == 2**18
  restarting.stop()
  restarting.start()
  with pytest.raises(
    OSError, match=r"^gs://lost-session/big: the storage server lost the upload session after 262144 bytes"
  ) as e:
    f.close()
  assert "\n" not in str(e.value)
  assert not gcs.exists("lost-session/big")  # nothing partial committed
