"""`python -m mmbert_jax.merge` on the checkpoints of a real tiny run: TIES, averages and EMA give checkpoints that
load, continue training (init_from) and export; merging a model with itself is the identity; checkpoints of
different models and existing outputs are refused with one-line errors."""

import functools
import math
import os
import shutil
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx
from helpers import ROOT, tiny_config
from tiny_run import MODEL, STEPS, run_module, step_dir, trained_run

from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import merge, phases, train
from mmbert_jax.model import MaskedLM

DENSITY, WEIGHTS = 0.3, (1.0, 3.0)


@pytest.fixture(scope="module")
def run(demo_data, tmp_path_factory):
  return trained_run(demo_data, tmp_path_factory)


@pytest.fixture(scope="module")
def ties_cli(run, tmp_path_factory):
  """TIES of the step-8 and step-12 checkpoints against step 4, through the command line, with --hf_out."""
  out = str(tmp_path_factory.mktemp("merged_ties"))
  hf_out = os.path.join(out, "hf")
  proc = run_module(
    "mmbert_jax.merge",
    "--method=ties",
    f"--base={step_dir(run, 4)}",
    f"--models={step_dir(run, 8)},{run}",
    f"--density={DENSITY}",
    f"--weights={','.join(map(str, WEIGHTS))}",
    f"--out={out}",
    f"--hf_out={hf_out}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, hf_out, proc.stdout


@functools.cache
def _params(path):
  return ckpt_lib.load_params(path)[0]


def _assert_same(got, want, atol=0.0):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def _ties_numpy(base, models, density, weights):
  """TIES per tensor in numpy (Yadav et al. 2023): keep each task vector's k largest magnitudes, elect the sign of
  the weighted mass, weighted mean over the entries that agree with it."""

  def one(b, *thetas):
    taus = [np.asarray(t, np.float32) - np.asarray(b, np.float32) for t in thetas]  # the stored float32 differences
    k = max(1, min(b.size, math.floor(density * b.size + 0.5)))
    trimmed = []
    for tau in taus:
      threshold = np.sort(np.abs(tau), axis=None)[-k]
      trimmed.append(np.where(np.abs(tau) >= threshold, tau, 0.0).astype(np.float64))
    sign = np.sign(sum(w * t for w, t in zip(weights, trimmed)))
    agree = [(np.sign(t) == sign) & (t != 0) for t in trimmed]
    num = sum(np.where(a, w * t, 0.0) for w, t, a in zip(weights, trimmed, agree))
    den = sum(np.where(a, w, 0.0) for w, a in zip(weights, agree))
    return np.asarray(b, np.float64) + np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)

  return jax.tree.map(one, base, *models)


def _merge_main(*args):
  """merge.main as the command line calls it, in this process (for its checks that run before any merging)."""
  if "out" not in flags.FLAGS:  # importing merge defines no flags; its command line defines them
    merge.define_flags()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["merge", *args])
  try:
    merge.main(["merge"])
  finally:
    flags.FLAGS.unparse_flags()


def _save_variant(run, out, fresh=False, **model_changes):
  """A params-only checkpoint whose metadata records the run's model config changed by `model_changes`, with the
  run's final parameters or (`fresh`) constant ones of the changed config's shapes."""
  params, meta, _ = ckpt_lib.load_params(run)
  meta = dict(meta, model_config=dict(meta["model_config"], **model_changes))
  if fresh:
    cfg = ckpt_lib.model_config_of(meta).replace(attention_impl="xla")
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: MaskedLM(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    params = jax.tree.map(lambda x: np.full(x.shape, 0.01, x.dtype), abstract)
  return ckpt_lib.save_params(out, meta["step"], params, meta)


@pytest.mark.slow
def test_ties_cli_writes_the_ties_merge_and_a_transformers_directory(run, ties_cli):
  out, hf_out, stdout = ties_cli
  merged, meta, source = ckpt_lib.load_params(out)
  assert source == f"{ckpt_lib.checkpoint_dir(out)}/{STEPS[-1]}" and source in stdout
  want = _ties_numpy(_params(step_dir(run, 4)), [_params(step_dir(run, 8)), _params(run)], DENSITY, WEIGHTS)
  _assert_same(merged, want, atol=2e-6)
  assert meta["phase"] == "merged_ties" and meta["merge"]["density"] == DENSITY
  assert meta["merge"]["models"] == [step_dir(run, 8), step_dir(run, 12)]
  # The merge moved the parameters: it is neither the base nor one of the models.
  for other in (step_dir(run, 4), step_dir(run, 8), run):
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(_params(other))))

  # --hf_out: the merged parameters, as transformers reads them.
  transformers = pytest.importorskip("transformers")
  reference = transformers.AutoModelForMaskedLM.from_pretrained(hf_out)
  np.testing.assert_array_equal(reference.model.embeddings.tok_embeddings.weight.detach().numpy(), merged["embedding"])
  np.testing.assert_array_equal(
    reference.model.layers[1].mlp.Wo.weight.detach().numpy(), merged["layers"][1]["mlp"]["wo"].T
  )
  assert os.path.exists(os.path.join(hf_out, "tokenizer.json"))


@pytest.mark.slow
def test_merging_a_checkpoint_with_itself_is_the_identity(run):
  final = _params(run)
  # Exactly: two halves of the same float32, and TIES with nothing to add (every task vector is zero).
  _assert_same(merge.merge_checkpoints("average", models=[run, step_dir(run, 12)])[0], final)
  _assert_same(merge.merge_checkpoints("ties", base=run, models=[run, run], density=0.5)[0], final)


def test_ema_and_average_give_loadable_checkpoints(run, tmp_path):
  decay = 0.5
  merged, meta = merge.merge_checkpoints("ema", run=run, decay=decay)
  w = decay ** np.arange(len(STEPS) - 1, -1, -1.0)
  w /= w.sum()  # oldest → newest: 1/7, 2/7, 4/7
  steps = [_params(step_dir(run, s)) for s in STEPS]
  _assert_same(merged, jax.tree.map(lambda *xs: sum(wi * np.float64(x) for wi, x in zip(w, xs)), *steps), atol=1e-6)
  assert meta["merge"]["models"] == [step_dir(run, s) for s in STEPS]
  where = ckpt_lib.save_params(str(tmp_path / "ema"), meta["step"], merged, meta)
  model, loaded_meta, _ = ckpt_lib.load_model(str(tmp_path / "ema"))
  assert where.endswith(f"/{STEPS[-1]}") and loaded_meta["phase"] == "merged_ema"
  _assert_same(nnx.to_pure_dict(nnx.state(model, nnx.Param)), merged)

  average, _ = merge.merge_checkpoints("average", models=[step_dir(run, 8), run], weights=[1, 3])
  _assert_same(
    average, jax.tree.map(lambda a, b: 0.25 * np.float64(a) + 0.75 * np.float64(b), steps[1], steps[2]), atol=1e-6
  )


def test_different_models_are_refused_naming_the_field(run, tmp_path, capsys):
  wider = str(tmp_path / "wider")
  _save_variant(run, wider, fresh=True, intermediate_size=32)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"model config differs .*\(intermediate_size=32 vs 96\)"):
    merge.merge_checkpoints("ties", base=run, models=[step_dir(run, 8), wider])
  # Same shapes, different RoPE: the parameters would merge, but they belong to different models.
  theta = str(tmp_path / "theta")
  _save_variant(run, theta, global_rope_theta=160_000.0)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"\(global_rope_theta=160000.0 vs 40000.0\)"):
    merge.merge_checkpoints("average", models=[run, theta])
  # The command line says it in one line.
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    _merge_main("--method=average", f"--models={run},{wider}", f"--out={tmp_path / 'never'}")
  message = capsys.readouterr().err
  assert e.value.code == 2 and message.startswith("error: ") and "intermediate_size=32 vs 96" in message
  assert message.count("\n") == 1
  assert not os.path.exists(tmp_path / "never" / "checkpoints")
  # How a model ran (compute dtype, attention kernel) does not make it another model.
  runtime = str(tmp_path / "runtime")
  _save_variant(run, runtime, dtype="bfloat16", attention_impl="splash", attn_out_dropout=0.0)
  _assert_same(merge.merge_checkpoints("average", models=[run, runtime])[0], _params(run))


def test_existing_outputs_are_not_overwritten(run, ties_cli, tmp_path, capsys):
  out, hf_out, _ = ties_cli
  before = _params(out)
  listing = sorted(os.listdir(ckpt_lib.checkpoint_dir(out)))
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    _merge_main("--method=average", f"--models={step_dir(run, 4)},{run}", f"--out={out}")
  assert e.value.code == 2 and "already holds checkpoints" in capsys.readouterr().err
  _assert_same(ckpt_lib.load_params(out)[0], before)
  assert sorted(os.listdir(ckpt_lib.checkpoint_dir(out))) == listing
  # An existing --hf_out is found before anything is merged or written.
  new = tmp_path / "new"
  with pytest.raises(SystemExit) as e:
    _merge_main("--method=average", f"--models={step_dir(run, 4)},{run}", f"--out={new}", f"--hf_out={hf_out}")
  assert e.value.code == 2 and "config.json exists" in capsys.readouterr().err
  assert not new.exists()
  with pytest.raises(ckpt_lib.CheckpointError, match="already holds checkpoints"):
    ckpt_lib.save_params(out, 1, before, {"step": 1})


@pytest.mark.slow
def test_merged_checkpoint_starts_a_further_phase(demo_data, ties_cli, tmp_path):
  out, _, _ = ties_cli
  merged, merged_meta, source = ckpt_lib.load_params(out)
  # A vanishing learning rate: the further phase must hold exactly the merged parameters after its step.
  config = tiny_config(
    demo_data,
    init_from=out,
    train_tokens=512,
    num_devices=1,
    **MODEL,
    **{"optim.peak_lr": 1e-30, "optim.weight_decay": 0.0, "schedule.warmup_tokens": 0},
  )
  config.phase = "after_merge"
  workdir = str(tmp_path / "after_merge")
  result = train.train_and_evaluate(config, workdir)
  assert result["status"] == "complete" and result["step"] == 1 and np.isfinite(result["eval"]["all"]["loss"])
  after, meta, _ = ckpt_lib.load_params(workdir)
  _assert_same(after, merged, atol=1e-20)
  assert meta["history"][-1] == {"phase": "merged_ties", "source": source, "tokens": merged_meta["tokens"]}
  assert meta["total_tokens_before"] == merged_meta["tokens"] == 512 * STEPS[-1]


_KILL_BEFORE_RENAME = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
async def killed(self):  # every file of the step is written; the rename that completes it never happens
  os.kill(os.getpid(), signal.SIGKILL)
atomicity.AtomicRenameTemporaryPath.finalize = killed
from mmbert_jax import cli, merge
sys.argv = ["merge", *{args!r}]
cli.run(merge.main, merge.define_flags)
"""


def _curriculum(run, demo_data, workdir):
  """A two-phase curriculum config whose phases `a` (the run's step 4) and `b` (its step 12) are done: `a`'s and
  `b`'s checkpoints are links to the run's steps."""
  for phase, step in (("a", 4), ("b", 12)):
    os.makedirs(os.path.join(workdir, phase, "checkpoints"))
    os.symlink(step_dir(run, step), os.path.join(workdir, phase, "checkpoints", str(step)))
  config = tiny_config(demo_data, **MODEL)
  with config.unlocked():
    config.phases = ("a", "b")
    config.phase_overrides = ml_collections.ConfigDict({"a": {}, "b": {}})
    config.merge = ml_collections.ConfigDict(dict(method="ties", base="a", models=("b",), density=0.5, lam=1.0))
  return config


@pytest.mark.slow
def test_merge_killed_while_saving_is_redone_by_a_rerun(run, demo_data, tmp_path, capsys):
  """kill -9 while the merged checkpoint is written leaves Orbax's temporary step directory; the same command
  again redoes the merge (exit 0) and gives the parameters of an uninterrupted merge. In a curriculum the same
  leftover under `<workdir>/merged` is merged again, not taken for a finished merge."""
  out = str(tmp_path / "merged")
  args = ["--method=ties", f"--base={step_dir(run, 4)}", f"--models={run}", f"--out={out}"]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  script = _KILL_BEFORE_RENAME.format(args=args)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  left = os.listdir(ckpt_lib.checkpoint_dir(out))
  assert any(".orbax-checkpoint-tmp" in name for name in left) and ckpt_lib.steps(ckpt_lib.checkpoint_dir(out)) == []
  killed = tmp_path / "curriculum" / "merged"
  shutil.copytree(out, killed)  # the leftover, as a curriculum's merge would leave it
  _merge_main(*args)  # the same command, in this process
  assert os.listdir(ckpt_lib.checkpoint_dir(out)) == [str(STEPS[-1])]  # the leftover is gone
  want = merge.merge_checkpoints("ties", base=step_dir(run, 4), models=[run])[0]
  _assert_same(ckpt_lib.load_params(out)[0], want)

  reference = str(tmp_path / "reference")
  evals = phases.merge_phases(_curriculum(run, demo_data, reference), reference)
  again = str(tmp_path / "curriculum")
  assert phases.merge_phases(_curriculum(run, demo_data, again), again) == evals
  assert os.listdir(ckpt_lib.checkpoint_dir(killed)) == [str(STEPS[-1])]
  _assert_same(ckpt_lib.load_params(again + "/merged")[0], ckpt_lib.load_params(reference + "/merged")[0])
  _assert_same(ckpt_lib.load_params(again + "/merged")[0], want)
