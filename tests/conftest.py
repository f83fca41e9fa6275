"""Every test runs on CPU; 8 host devices make sharding tests possible in the same process."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util
import pathlib

import pytest

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


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
  """A prepared data directory (tokenizer, shards, stats.json) built from the embedded CLDR corpus."""
  from data_pipeline import demo_corpus
  data_dir = str(tmp_path_factory.mktemp("demo_data"))
  demo_corpus.prepare_demo(data_dir, languages=TEST_LANGUAGES, scale=0.3, vocab_size=1000, max_len=256,
                           progress=False)
  return data_dir


def tiny_config(data_dir: str, **overrides):
  """A tiny single-phase run on the demo data: 4-layer model, 8 rows of 64 tokens per step, 4 devices."""
  c = load_config("base")
  c.model_preset = "tiny"
  c.model.vocab_size = 1000
  c.model.attn_out_dropout = 0.1
  c.model.attention_impl = "xla"
  c.data.data_dir = data_dir
  c.data.languages = "en,de,fr,ru,zh,sw"
  c.data.seq_len = 64
  c.batch_size = 8
  c.micro_batch_size = 4
  c.eval_batch_size = 8
  c.eval_max_batches = 1
  c.optim.peak_lr = 3e-3
  c.schedule.warmup_tokens = 2048
  c.train_tokens = 512 * 12
  c.log_every_steps = 1
  c.checkpoint_every_tokens = 512 * 4
  c.keep_checkpoints = 2
  c.num_devices = 4                   # fsdp over 4 of the 8 host devices
  c.update_from_flattened_dict(overrides)
  return c


def read_metrics(workdir: str) -> list[dict]:
  import json
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def train_losses(workdir: str) -> dict[int, float]:
  return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}
