"""Command lines: a bad flag or `--config.` override is one line naming it (tests/test_main.py runs the entry
point with them: exit status, timing, workdir)."""

import errno
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from helpers import ROOT

from mmbert_jax import cli, storage


def test_bad_overrides_are_one_line():
  """The messages for the errors absl and ml_collections raise."""
  argv = ["main", "--config=configs/demo.py", "--config.data.tua=5", "--config.train_tokenz=5"]
  unknown = AttributeError(KeyError('\'train_tokenz\'\nDid you mean "train_tokens" instead of "train_tokenz"?'))
  assert cli.flag_error(unknown, argv) == (
    "--config.train_tokenz: the config has no key 'train_tokenz' (did you mean train_tokens instead of train_tokenz?)"
  )
  assert cli.flag_error(KeyError("'tua'"), argv) == "--config.data.tua: the config has no key 'tua'"
  assert cli.flag_error(flags.UnrecognizedFlagError("config.data.budgets", "5"), argv) == (
    "--config.data.budgets: the config has no value 'budgets' to set (a section is set key by key)"
  )
  bad_value = flags.IllegalFlagValueError(
    "flag --config.batch_size=many: invalid literal for int() with base 10: 'many'"
  )
  assert cli.flag_error(bad_value, argv) == (
    "flag --config.batch_size=many: invalid literal for int() with base 10: 'many'"
  )
  bad_file = flags.IllegalFlagValueError(
    "flag --config=configs/decay.py:hot: Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
    '  File "configs/decay.py", line 30, in get_config\n    raise ValueError(...)\n'
    "ValueError: configs/decay.py: variant 'hot' is not one of ['all', 'cont', 'eng']\n"
  )
  assert cli.flag_error(bad_file, argv) == (
    "flag --config=configs/decay.py:hot: Error whilst parsing config file: ValueError: configs/decay.py: variant "
    "'hot' is not one of ['all', 'cont', 'eng']"
  )


# Every entry point: (module, [(case, args, what the one line must name)]). A command whose defaults make a whole
# run (the benchmarks) has no "no flags" case.
_W = "/nonexistent-workdir"
ENTRY_POINTS = {
  "mmbert_jax.main": [("none", [], "--config is required"), ("bad", ["--config=configs/nope.py"], "configs/nope.py")],
  "mmbert_jax.report": [("none", [], "--workdir is required"), ("bad", ["--workdir=s3://b/x"], "--workdir")],
  "mmbert_jax.finetune": [
    ("none", [], "--task, --checkpoint and --out are required"),
    ("bad", ["--task=nope", "--checkpoint=x", f"--out={_W}/o.json"], "--task must be one of"),
  ],
  "mmbert_jax.evaluate": [("none", [], "--checkpoint and --data are required"), ("bad", ["--seq_len=x"], "--seq_len")],
  "mmbert_jax.export": [
    ("none", [], "--checkpoint and --out are required"),
    ("bad", [f"--checkpoint={_W}", f"--out={_W}/hf"], _W),
  ],
  "mmbert_jax.merge": [("none", [], "--out is required"), ("bad", ["--method=mean"], "--method")],
  "mmbert_jax.aot": [("none", [], "is required"), ("bad", ["--compare=perhaps"], "--compare")],
  "mmbert_jax.benchmarks.attention": [("bad", ["--window=wide"], "--window")],
  "mmbert_jax.benchmarks.train_step": [("bad", ["--steps=many"], "--steps")],
  "mmbert_jax.benchmarks.versus_torch": [("bad", ["--threads=4096"], "--threads")],
  "data_pipeline.prepare": [("none", [], "required"), ("bad", ["--num_shards=x"], "--num_shards")],
  "data_pipeline.mixture": [("none", [], "required"), ("bad", ["--tau=x"], "--tau")],
  "data_pipeline.demo_corpus": [("none", [], "--data_dir"), ("bad", ["--data_dir=d", "--scale=big"], "--scale")],
  "data_pipeline.tokenizer": [("none", [], "required"), ("bad", ["train", "--vocab_size=x"], "--vocab_size")],
  "data_pipeline.benchmark": [("bad", ["--hosts=x"], "--hosts")],
}


@pytest.fixture(scope="module")
def entry_point_runs():
  """Every case of every entry point, run in one process (tests/cli_probe.py forks a child per case)."""
  cases = [
    (module, name, args, named)
    for module, module_cases in ENTRY_POINTS.items()
    for name, args, named in module_cases + [("unknown", ["--bogus_flag=1"], "bogus_flag"), ("help", ["--help"], "")]
  ]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, str(ROOT / "tests" / "cli_probe.py")],
    input=json.dumps([[module, args] for module, _, args, _ in cases]),
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {(module, name): (named, *result) for (module, name, _, named), result in zip(cases, json.loads(proc.stdout))}


@pytest.mark.slow
@pytest.mark.parametrize("module", list(ENTRY_POINTS))
def test_every_entry_point_refuses_bad_input_in_one_line(entry_point_runs, module):
  """No flags (where some are required), an unknown flag and a value of the wrong kind: exit status 2 and one
  `error:` line naming the flag; --help prints the usage and exits 0."""
  for (mod, case), (named, code, out, err) in entry_point_runs.items():
    if mod != module:
      continue
    if case == "help":
      assert code == 0 and "--" in out and "error:" not in err, (module, code, out[-500:], err[-500:])
      continue
    lines = err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT, (module, case, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (module, case, err[-2000:])


@pytest.mark.parametrize(
  "error,line",
  [
    (OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"), "disk full at /out/model.safetensors"),
    (
      storage.WriteError("writing the export failed: disk full at /out"),
      "writing the export failed: disk full at /out",
    ),
    (ValueError("tensorstore: [Errno 30] Read-only file system"), "read-only file system at (no path given)"),
  ],
)
def test_a_failed_write_in_any_command_is_one_line_and_exit_1(error, line, monkeypatch, capsys):
  def main(argv):
    raise error

  monkeypatch.setattr(sys, "argv", ["command"])
  with pytest.raises(SystemExit) as e:
    cli.run(main, lambda: None)
  err = capsys.readouterr().err
  assert e.value.code == cli.EXIT_FAILED and err.count("\n") == 1 and err.startswith("error: ") and line in err, err


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_bucket_that_does_not_answer_is_one_line_and_exit_1_in_any_command(wrapped, monkeypatch, capsys):
  """merge, export, evaluate, finetune, report...: the outage's own line, also when a writer wrapped it."""
  from data_pipeline import filesystem as fs

  outage = fs.StorageUnavailableError("storage gs://b has not answered for 1801 s (config.storage_timeout_s=1800)")

  def main(argv):
    if not wrapped:
      raise outage
    try:
      raise outage
    except OSError as e:
      raise storage.write_error("writing the export", "gs://b/out", e) from e

  monkeypatch.setattr(sys, "argv", ["command"])
  with pytest.raises(SystemExit) as e:
    cli.run(main, lambda: None)
  err = capsys.readouterr().err
  assert e.value.code == cli.EXIT_FAILED and err == f"error: {outage}\n", err


def test_other_errors_are_not_taken_for_failed_writes(monkeypatch):
  def main(argv):
    raise OSError(errno.EBADF, "Bad file descriptor")

  monkeypatch.setattr(sys, "argv", ["command"])
  with pytest.raises(OSError, match="Bad file descriptor"):
    cli.run(main, lambda: None)
