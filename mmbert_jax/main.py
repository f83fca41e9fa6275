"""Entry point: `python -m mmbert_jax.main --config=configs/<phase>.py[:arg] --workdir=DIR [--config.a.b=v ...]`.

Kept short on purpose: the loop lives in `mmbert_jax.train.train_and_evaluate`, importable from a notebook.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (ml_collections).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  workdir = _WORKDIR.value or config.get("workdir") or None
  if not workdir:
    raise app.UsageError("--workdir is required (or set config.workdir)")
  from mmbert_jax import preflight
  try:
    preflight.check(config, workdir)  # before devices, mesh and compilation; reads only
  except preflight.ConfigError as e:
    preflight.fail(str(e))
  import jax
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save and restore at INFO
  # Multi-host: every process runs this same command; TPU pods, SLURM and Open MPI are detected by jax itself.
  if os.environ.get("MMBERT_DISTRIBUTED", "0") == "1":
    jax.distributed.initialize()
  print(f"JAX: {jax.process_count()} process(es), {jax.device_count()} device(s): {jax.devices()[0].device_kind}",
        flush=True)
  from mmbert_jax import phases
  result = phases.run(config, workdir)
  if result.get("status") == "preempted":
    sys.exit(0)
  if jax.process_index() == 0:
    from mmbert_jax import report
    for path in report.write_plots(workdir):
      print(f"plot: {path}", flush=True)


if __name__ == "__main__":
  from mmbert_jax import preflight
  app.run(main, flags_parser=preflight.parse_flags)
