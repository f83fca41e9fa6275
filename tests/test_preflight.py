"""Pre-flight checks: each bad start is one ConfigError line naming the key and the fix, and touches nothing."""

import dataclasses
import json
import os

import numpy as np
import pytest
from helpers import load_config, tiny_config

from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import cli, preflight
from mmbert_jax.model import get_config


@pytest.fixture
def data_dir(tmp_path):
  """A stats.json (the part the mixture reads) with FineWeb2-style names for mmBERT's mid-training languages and
  the tiny test config's languages: the recipe configs' language sets and budgets fit it."""
  from data_pipeline import mixture

  names = [f"{code}_Latn" for code in mixture.MMBERT_PRETRAIN + mixture.MMBERT_MID_ADDED]
  names += ["en", "de", "fr", "ru", "zh", "sw", "code"]
  d = tmp_path / "data"
  d.mkdir()

  def shard(name, source, tokens):
    return {"path": f"{name}/train/{source}.array_record", "source": source, "tokens": tokens, "sequences": 10}

  # Recipe-sized counts (the configs cap passes at 5 over 100B+ tokens); English also has a DCLM source.
  shards = {name: [shard(name, "fineweb2", 10**12 * (i + 1))] for i, name in enumerate(names)}
  shards["eng_Latn"].append(shard("eng_Latn", "dclm", 10**13))
  stats = {
    "languages": {
      name: {"train": {"tokens": sum(s["tokens"] for s in parts), "sequences": 10 * len(parts), "shards": parts}}
      for name, parts in shards.items()
    },
    "sources": {"fineweb2": {"languages": names}, "dclm": {"languages": ["eng_Latn"]}},
  }
  (d / "stats.json").write_text(json.dumps(stats))
  return str(d)


def _tree(path):
  return sorted((root, tuple(sorted(dirs)), tuple(sorted(files))) for root, dirs, files in os.walk(path))


def _fails(config, workdir, *needles, overrides=None):
  before = _tree(workdir) if os.path.exists(workdir) else None
  with pytest.raises(cli.ConfigError) as e:
    preflight.check(config, workdir, overrides)
  message = str(e.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, message
  assert (_tree(workdir) if os.path.exists(workdir) else None) == before
  return message


def _checkpoint(workdir, phase, preset="tiny", **model):
  cfg = get_config(preset, **model)
  ckpt_lib.save_params(
    workdir,
    4,
    {"w": np.zeros(3, np.float32)},
    {"phase": phase, "step": 4, "tokens": 1, "model_config": dataclasses.asdict(cfg)},
  )


def test_data_dir_missing_empty_or_unprepared(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  _fails(
    tiny_config(""),
    workdir,
    "config.data.data_dir is empty",
    "--config.data.data_dir=",
    "python -m data_pipeline.prepare",
  )
  _fails(tiny_config(str(tmp_path / "nowhere")), workdir, f"config.data.data_dir={tmp_path / 'nowhere'} does not exist")
  empty = tmp_path / "half_prepared"
  empty.mkdir()
  _fails(tiny_config(str(empty)), workdir, "has no stats.json", f"--output_dir {empty}")
  preflight.check(tiny_config(data_dir), workdir)
  assert not os.path.exists(workdir)


def test_languages_that_do_not_fit_the_data(tmp_path, demo_data):
  workdir = str(tmp_path / "run")
  _fails(
    tiny_config(demo_data, **{"data.languages": "en,xx"}),
    workdir,
    "config.data (languages=en,xx",
    "phase languages not in the data: xx",
  )
  _fails(tiny_config(demo_data, **{"data.eval_languages": "en,qq"}), workdir, "eval_languages=en,qq", "qq")
  c = load_config("decay", "all,small")  # budgets for "eng" and "code": the demo data has "en" and no code
  c.data.data_dir, c.init_from = demo_data, ""
  c.allow_random_init = True
  _fails(c, workdir, f"budgets={dict(c.data.budgets)}", "not in the data: code, eng")
  _fails(
    tiny_config(demo_data, **{"model.vocab_size": 512}),
    workdir,  # the demo tokenizer has 1000 pieces
    "tokenized with 1000 pieces but the model has vocab_size=512",
  )


@pytest.mark.parametrize("config", ["midtrain", "decay"])
def test_later_phases_need_init_from(tmp_path, data_dir, config):
  c = load_config(config)
  c.data.data_dir = data_dir
  previous = {"midtrain": "pretrain", "decay": "midtrain"}[config]
  workdir = str(tmp_path / "run")
  _fails(
    c,
    workdir,
    "config.init_from is empty",
    f"continues from the {previous} checkpoint",
    "--config.init_from=",
    "--config.allow_random_init=True",
  )
  c.allow_random_init = True
  preflight.check(c, workdir)
  c.allow_random_init = False
  c.init_from = str(tmp_path / "no_such_run")
  _fails(c, workdir, f"config.init_from={tmp_path / 'no_such_run'}", "does not exist")
  _checkpoint(str(tmp_path / "prev"), previous, "mmbert-base")
  c.init_from = str(tmp_path / "prev")
  preflight.check(c, workdir)
  pretrain = load_config("pretrain")
  pretrain.data.data_dir = data_dir
  preflight.check(pretrain, workdir)  # the first phase starts from random weights


def test_workdir_of_another_phase_or_model_size(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  _checkpoint(workdir, "pretrain", vocab_size=1000)
  c = tiny_config(data_dir)
  preflight.check(c, workdir)  # resuming the same phase and model is fine
  c.phase = "midtrain"  # resuming needs no init_from
  _fails(
    c,
    workdir,
    f"--workdir={workdir} holds checkpoints of phase pretrain (step 4), not midtrain",
    f"--config.init_from={workdir}",
  )
  c = tiny_config(data_dir, **{"model.num_layers": 6})
  _fails(c, workdir, "another model size", "num_layers=4", "num_layers=6", "--workdir")
  c = load_config("pretrain", "small")
  c.data.data_dir = data_dir
  _fails(c, workdir, "hidden_size=64", "hidden_size=384", "config.model_preset=mmbert-small")


def test_curricula_are_checked_phase_by_phase(tmp_path, data_dir):
  demo = load_config("demo")
  preflight.check(demo, str(tmp_path / "fresh"))  # builds its own data; init_from are its own phases
  _checkpoint(str(tmp_path / "demo" / "midtrain"), "pretrain")
  _fails(demo, str(tmp_path / "demo"), "holds checkpoints of phase pretrain", "not midtrain")
  _checkpoint(str(tmp_path / "single"), "pretrain")
  _fails(demo, str(tmp_path / "single"), "holds a single phase's checkpoints", "curriculum")
  demo.phase_overrides.midtrain.model.hidden_sise = 8
  _fails(demo, str(tmp_path / "fresh"), "config.phase_overrides.midtrain", "hidden_sise")


def test_a_merge_of_phases_the_run_does_not_train_is_refused(tmp_path):
  demo = load_config("demo")
  demo.phases = ("pretrain",)
  _fails(demo, str(tmp_path / "a"), "config.merge names midtrain, decay_eng, decay_cont, decay_all", "merge.method")
  demo.merge.method = ""  # only pretrain, no merge: passes
  preflight.check(demo, str(tmp_path / "b"))
  demo = load_config("demo")
  demo.merge.base = "decay_cont"  # the base is a phase too; "midtran" would be refused
  preflight.check(demo, str(tmp_path / "c"))
  demo.merge.base = "midtran"
  _fails(demo, str(tmp_path / "d"), "config.merge names midtran,")


def test_unknown_model_field_and_missing_wandb(tmp_path, data_dir, monkeypatch):
  c = tiny_config(data_dir)
  with c.unlocked():
    c.model.hidden_sise = 8
  _fails(c, str(tmp_path / "run"), "config.model.hidden_sise is not a model field")
  c = tiny_config(data_dir, **{"wandb.project": "mmbert"})
  monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
  _fails(c, str(tmp_path / "run"), "config.wandb.project=mmbert needs wandb", "pip install wandb")


def test_phase_overrides_are_validated_like_top_level_values(tmp_path, data_dir):
  """A value the loop would refuse fails in pre-flight, named as the key that set it."""
  _fails(tiny_config(data_dir, train_tokens=-5), str(tmp_path / "run"), "config.train_tokens must be ≥ 0; got -5")
  demo = load_config("demo")
  demo.phase_overrides.pretrain.train_tokens = -5
  _fails(demo, str(tmp_path / "a"), "config.phase_overrides.pretrain.train_tokens must be ≥ 0; got -5")
  demo = load_config("demo")
  demo.phase_overrides.decay_all.data.seq_len = 0
  _fails(demo, str(tmp_path / "b"), "config.phase_overrides.decay_all.data.seq_len must be positive; got 0")
  demo = load_config("demo")
  demo.batch_size = 0  # no phase overrides it: named as the shared key, with the first phase that fails
  _fails(demo, str(tmp_path / "c"), "phase pretrain: config.batch_size must be positive; got 0")


def test_an_override_every_phase_replaces_is_refused(tmp_path):
  """`--config.data.seq_len=0` on the demo would change nothing (every phase sets its own); a key only some phases
  set, or one set through phase_overrides, is applied."""
  demo = load_config("demo")
  with demo.unlocked():
    demo.data.seq_len = 0
  message = _fails(
    demo,
    str(tmp_path / "a"),
    "--config.data.seq_len=0",
    "pretrain: 128",
    "decay_all: 256",
    "--config.phase_overrides.<phase>.data.seq_len",
    overrides={"data.seq_len": 0},
  )
  assert message.startswith("--config.data.seq_len=0: every phase")
  _fails(load_config("demo"), str(tmp_path / "b"), "--config.train_tokens=7", overrides={"train_tokens": 7})
  demo = load_config("demo")
  del demo.phase_overrides.decay_cont["train_tokens"]  # now one phase takes the shared value
  preflight.check(demo, str(tmp_path / "c"), {"train_tokens": 7, "phase_overrides.pretrain.train_tokens": 9})
  preflight.check(load_config("demo"), str(tmp_path / "d"), {"optim.peak_lr": 1e-3})


def test_init_from_a_transformers_directory(tmp_path, demo_data):
  import shutil

  from flax import nnx

  from mmbert_jax import hf
  from mmbert_jax.model import MaskedLM

  def transformers_dir(name, **model):
    path = str(tmp_path / name)
    model = dict(global_rope_theta=10_000.0, local_rope_theta=10_000.0) | model  # as configs/base.py
    hf.save(MaskedLM(get_config("tiny", **model), rngs=nnx.Rngs(0)), path)
    return path

  fits = transformers_dir("fits", vocab_size=1000, num_layers=3)
  workdir = str(tmp_path / "run")
  preflight.check(tiny_config(demo_data, init_from=fits), workdir)
  preflight.check(tiny_config(demo_data, init_from=fits, **{"model.remat": "full"}), workdir)  # how it runs
  _fails(
    tiny_config(demo_data, init_from=fits, **{"model.hidden_size": 128}),
    workdir,
    "config.model.hidden_size=128 conflicts with",
    "config.json (hidden_size=64)",
  )
  _fails(tiny_config(demo_data, init_from=fits, init_optimizer_state=True), workdir, "holds no optimizer state")
  # Data tokenized with another vocabulary than the checkpoint's.
  bigger = transformers_dir("bigger", vocab_size=1024)
  c = tiny_config(demo_data, init_from=bigger)
  c.model.vocab_size = None
  _fails(c, workdir, "was tokenized with", "vocab_size=1000", "has vocab_size=1024")
  # A directory that ships its tokenizer: the data must have been tokenized with that very file.
  shutil.copy(os.path.join(demo_data, "tokenizer.model"), os.path.join(fits, "tokenizer.model"))
  preflight.check(tiny_config(demo_data, init_from=fits), workdir)
  with open(os.path.join(fits, "tokenizer.model"), "ab") as f:
    f.write(b"another tokenizer")
  _fails(tiny_config(demo_data, init_from=fits), workdir, "not with the tokenizer of", "tokenizer.model")
