"""The filesystem layer on local disk and on a GCS emulator (tests/conftest.py `gcs_bucket`)."""

import os
import uuid

import pytest

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
