"""Entry point: `python -m mmbert_jax.main --config=configs/<phase>.py[:arg] --workdir=DIR [--config.a.b=v ...]`.

Kept short on purpose: the loop lives in `mmbert_jax.train.train_and_evaluate` and the curriculum in
`mmbert_jax.phases.run`, both importable from a notebook. What belongs to the process lives here: the pre-flight
checks, multi-host initialisation, the persistent compilation cache, the embedded demo corpus and the plots at
the end.
"""

import os
import sys

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from data_pipeline import demo_corpus
from data_pipeline import filesystem as fs
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import cli, phases, preflight, report, storage, train

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Run config file (ml_collections).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
  flags.mark_flags_as_required(["config"])


def compilation_cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """`config.jax_cache_dir`, local or gs://; a relative path is inside the workdir."""
  value = config.get("jax_cache_dir")
  if not value:
    return None
  if fs.is_remote(value) or value.startswith(("/", "~")):
    return str(fs.path(value, "config.jax_cache_dir"))
  return str(fs.path(workdir, "--workdir") / value)


def use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Compiled steps are reused across phases of the same shapes and across restarts (jax reads and writes the
  cache through etils.epath, so it may be in a bucket)."""
  directory = compilation_cache_dir(config, workdir)
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)


def prepare_demo_data(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`config.demo_corpus`: build the embedded corpus in `<workdir>/data` (once) and point the data there."""
  if "demo_corpus" not in config or config.data.data_dir:
    return
  d = config.demo_corpus
  data_dir = demo_corpus.prepare_for_run(
    workdir, languages=d.languages, scale=d.scale, vocab_size=d.vocab_size, seq_len=config.data.seq_len
  )
  with config.unlocked():
    config.data.data_dir = data_dir


def load_config() -> ml_collections.ConfigDict:
  """--config, or exit 2 naming the config file that does not load."""
  try:
    config = FLAGS.config
    config.keys()  # config_flags defers a missing or unreadable file's error to the first access
    return config
  except OSError as e:
    reasons = [line.strip() for line in str(e).splitlines() if "Errno" in line or "Error" in line]
    cli.fail(f"--config={FLAGS['config'].serialize().split('=', 1)[-1]}: {reasons[-1] if reasons else e}")


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
  """Runs the config in `workdir`; returns the exit code (`cli.EXIT_*`) after a one-line error if it failed. A bucket
  that does not answer for `config.storage_timeout_s` ends the process there (exit 1, `fs.set_storage_limits`)."""
  fs.set_storage_limits(warn_after_s=config.storage_warn_s, timeout_s=config.storage_timeout_s, exit_on_timeout=True)
  ckpt_lib.bound_storage_retries(config.storage_timeout_s)
  try:
    use_compilation_cache(config, workdir)
    prepare_demo_data(config, workdir)
    result = phases.run(config, workdir)
  except (ValueError, FileNotFoundError, FileExistsError) as e:  # config, checkpoint and data errors
    cli.report(e)
    return cli.EXIT_BAD_INPUT
  except (storage.WriteError, train.NonFiniteLossError) as e:
    cli.report(e)
    return cli.EXIT_FAILED
  except OSError as e:  # a full disk outside the loop's own writers (the local cache of a bucket's shards)
    if not storage.is_storage_error(e):
      raise
    cli.report(storage.failed_write(e))
    return cli.EXIT_FAILED
  return cli.EXIT_PREEMPTED if result.get("status") == "preempted" else cli.EXIT_COMPLETE


def main(argv):
  cli.start(argv)
  config = load_config()
  workdir = FLAGS.workdir or config.get("workdir") or None
  if not workdir:
    raise app.UsageError("--workdir is required (or set config.workdir)")
  try:  # local paths become absolute; a scheme other than gs:// is refused before anything is created
    workdir = str(fs.path(workdir, "--workdir" if FLAGS.workdir else "config.workdir"))
  except ValueError as e:
    raise cli.ConfigError(str(e)) from None
  # Reads only; before devices, mesh and compilation.
  preflight.check(config, workdir, config_flags.get_override_values(FLAGS["config"]))
  # Multi-host: every process runs this same command; TPU pods, SLURM and Open MPI are detected by jax itself.
  if os.environ.get("MMBERT_DISTRIBUTED", "0") == "1":
    jax.distributed.initialize()
  print(
    f"JAX: {jax.process_count()} process(es), {jax.device_count()} device(s): {jax.devices()[0].device_kind}",
    flush=True,
  )
  code = run(config, workdir)
  if code == cli.EXIT_COMPLETE and cli.preempted():  # a SIGTERM after the last boundary: the plots on the re-run
    print("SIGTERM: stopped before the plots; run the same command again to draw them", flush=True)
    code = cli.EXIT_PREEMPTED
  if code == cli.EXIT_COMPLETE and jax.process_index() == 0:
    for path in report.write_plots(workdir):
      print(f"plot: {path}", flush=True)
  if code == cli.EXIT_COMPLETE and cli.preempted():  # during the plots: they are written whole first
    code = cli.EXIT_PREEMPTED
  sys.exit(code)


if __name__ == "__main__":
  cli.handle_sigterm()  # before flags, config and devices: a preemption at start-up is exit 75 too
  cli.run(main, define_flags)
