"""What the tests share: the CPU platform with 8 host devices (set before JAX loads, also in the subprocesses that
import this module), the repository root, config loaders, the tiny run config, multi-process runs and Cloud Storage
emulators."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A small slice of the embedded demo corpus: the 12 demo pre-training languages, a few mid-training ones and two
# languages that only the demo's decay phase adds.
TEST_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "ru", "zh", "ja", "ar", "hi", "ko", "nl", "pl", "sw", "fo", "ti")


def load_config(name: str, arg: str | None = None):
  """A config file of configs/, as `--config=configs/<name>.py[:arg]` would load it."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def tiny_config(data_dir: str, **overrides):
  """A tiny single-phase run on the demo data: 4-layer model, 8 rows of 64 tokens per step, 4 devices."""
  c = load_config("base")
  c.update_from_flattened_dict(
    {
      "model_preset": "tiny",
      "model.vocab_size": 1000,
      "model.attn_out_dropout": 0.1,
      "model.attention_impl": "xla",
      "data.data_dir": data_dir,
      "data.languages": "en,de,fr,ru,zh,sw",
      "data.seq_len": 64,
      "batch_size": 8,
      "micro_batch_size": 4,
      "eval_batch_size": 8,
      "eval_max_batches": 1,
      "optim.peak_lr": 3e-3,
      "schedule.warmup_tokens": 2048,
      "train_tokens": 512 * 12,
      "log_every_steps": 1,
      "checkpoint_every_tokens": 512 * 4,
      "keep_checkpoints": 2,
      "num_devices": 4,  # fsdp over 4 of the 8 host devices
    }
  )
  c.update_from_flattened_dict(overrides)
  return c


def read_metrics(workdir: str) -> list[dict]:
  import json

  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def train_losses(workdir: str) -> dict[int, float]:
  return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def run_two_processes(worker: str, timeout: int = 600, during=None, **fields) -> list[tuple[int, str, str]]:
  """Runs `worker` as processes 0 and 1 of a jax.distributed job on localhost: a Python source whose `{root}`,
  `{tests}`, `{port}`, `{pid}` and `fields` are filled in. `during(processes)`, if given, is called once both have
  started (e.g. to signal one); their output is read only after it returns, so it must not wait long. Returns
  (return code, stdout, stderr) of each."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each worker sets its own device count
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", worker.format(root=str(ROOT), tests=str(ROOT / "tests"), port=port, pid=i, **fields)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  try:
    if during is not None:
      during(procs)
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_gcs_emulator(port: int, bucket: str, store: str | None = None) -> subprocess.Popen:
  """A Cloud Storage emulator (gcp-storage-emulator through tests/gcs_emulator.py) on 127.0.0.1:`port` with
  `bucket`, serving once this returns. `store`: a folder that keeps the objects on disk, so that an emulator
  stopped and started again on it serves them again; None keeps them in memory."""
  import time
  import urllib.request

  args = [sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), "start", "--host=127.0.0.1", f"--port={port}"]
  args += [f"--default-bucket={bucket}"] + (["--no-store-on-disk"] if store is None else [])
  proc = subprocess.Popen(args, cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  for _ in range(200):
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b/{bucket}", timeout=1)
      return proc
    except OSError:
      if proc.poll() is not None:
        break
      time.sleep(0.1)
  proc.kill()
  raise RuntimeError(f"the GCS emulator did not start on port {port}")


class StoppableEmulator:
  """A Cloud Storage emulator of its own on a free port, which a test stops (killed: every request is refused) and
  starts again on the same port. With `store`, a folder that keeps its objects, it serves them again after a start;
  without one, a start forgets every object and upload session, as a server that lost them."""

  def __init__(self, bucket: str, store: pathlib.Path | None = None):
    self.bucket, self.store, self.port = bucket, store, free_port()
    if store is not None:
      store.mkdir()
    self.start()
    url = f"http://127.0.0.1:{self.port}"
    # gcsfs's base class: its experimental one first asks a storage-layout API, which the emulator lacks, for a
    # minute per request while the server is down.
    self.env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")

  def start(self):
    self.proc = start_gcs_emulator(self.port, self.bucket, None if self.store is None else str(self.store))

  def stop(self):
    self.proc.kill()
    self.proc.wait()
