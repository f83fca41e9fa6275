"""The training loop: sharded steps equal single-device steps, real text trains, metrics and errors."""

import json
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import read_metrics, run_two_processes, tiny_config, train_losses

from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import sharding, train
from mmbert_jax.model import get_config


def _synthetic_batch(rng, rows, seq, k, vocab, languages):
  ids = rng.integers(5, vocab, (rows, seq)).astype(np.int32)
  seg = np.ones((rows, seq), np.int32)
  seg[:, seq // 2 :] = 2
  seg[0, -5:] = 0
  pos = np.concatenate([np.arange(seq // 2)] * 2)[None].repeat(rows, 0).astype(np.int32)
  mp = np.stack([rng.choice(seq, k, replace=False) for _ in range(rows)]).astype(np.int32)
  inputs = ids.copy()
  np.put_along_axis(inputs, mp, 4, 1)
  return dict(
    input_ids=inputs,
    segment_ids=seg,
    positions=pos,
    masked_positions=mp,
    masked_labels=np.take_along_axis(ids, mp, 1),
    masked_weights=(np.take_along_axis(seg, mp, 1) > 0).astype(np.float32),
    lang_ids=np.where(seg > 0, seg % languages, -1).astype(np.int32),
  )


def _three_steps(mesh_sizes, devices, with_details=False, **model_overrides):
  config = tiny_config("", **{"optim.peak_lr": 1e-3})
  cfg = get_config("tiny", attn_out_dropout=0.1, **model_overrides)
  mesh = sharding.make_mesh(mesh_sizes, devices)
  program = train.build_program(config, mesh, num_languages=3, cfg=cfg)
  params, opt = program.init()
  step = program.step
  put = train.make_put(mesh, leading=1)
  rng = np.random.default_rng(0)
  losses, norms, clipped = [], [], []
  with jax.set_mesh(mesh):
    for i in range(3):
      batch = train.stack_microbatches([_synthetic_batch(rng, 8, 64, 12, 1024, 3) for _ in range(2)])
      params, opt, metrics = step(params, opt, put(batch), jnp.float32(1e-3), jnp.int32(i))
      losses.append(float(metrics["loss"]))
      norms.append(float(metrics["grad_norm"]))
      clipped.append(float(metrics["clipped_fraction"]))
  if with_details:
    return losses, jax.tree.map(np.asarray, params), norms, clipped, jax.tree.map(np.asarray, opt)
  return losses, jax.tree.map(np.asarray, params)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers,loss_impl", [(False, "chunked"), (True, "dense")])
def test_sharded_steps_equal_single_device(scan_layers, loss_impl):
  assert jax.device_count() == 8
  model = dict(scan_layers=scan_layers, loss_impl=loss_impl, loss_chunk_size=256)  # vocabulary split in 4
  single, p1 = _three_steps(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], **model)
  sharded, p8 = _three_steps(dict(data=2, fsdp=2, tensor=2), jax.devices(), **model)  # every axis in use
  np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_scanned_train_step_equals_unrolled():
  """Three steps of two micro-batches with dropout: with the layers scanned, the step stacks their parameters once
  and the optimizer updates them vmapped over the groups (StableAdamW clips each layer's update on its own, and
  counts each layer's tensors in `clipped_fraction`); the losses, gradient norms, clipped fractions, parameters and
  Adam moments equal the unrolled run's, and the state keeps its per-layer layout."""
  one = (dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  (unrolled, p_u, norms_u, clip_u, opt_u), (scanned, p_s, norms_s, clip_s, opt_s) = [
    _three_steps(*one, scan_layers=scan, num_layers=7, with_details=True) for scan in (False, True)
  ]
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-6)
  np.testing.assert_allclose(norms_s, norms_u, rtol=1e-5)
  assert clip_s == clip_u and any(0 < c < 1 for c in clip_u), (clip_s, clip_u)  # some tensors clipped, not all
  assert jax.tree.structure(p_s) == jax.tree.structure(p_u)
  for a, b in zip(jax.tree.leaves(p_u), jax.tree.leaves(p_s)):
    np.testing.assert_allclose(b, a, atol=1e-5)
  assert jax.tree.structure(opt_s) == jax.tree.structure(opt_u)
  for a, b in zip(jax.tree.leaves(opt_u), jax.tree.leaves(opt_s)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())  # summation order: up to 4e-6 of the max


@pytest.mark.parametrize("loss_impl", ["dense", "chunked"])
def test_cpu_step_runs_its_products_in_ynnpack_and_keeps_reductions_whole(loss_impl):
  """XLA:CPU runs a product in YNNPACK (its fast path) only when both operands are row-major in their contraction,
  else on Eigen, slower and beside the next product on the same cores. The compiled CPU train step (four layers,
  either loss) keeps no product out of YNNPACK fusions: the weight gradients of every dense layer and of the tied
  decoder (whole or per vocabulary chunk) take their written-out transposes (`model.dense`, `mlm_loss`), which a
  plain `x.T @ dy` would not (XLA folds the transpose back into the product), and the decoder bias gradient rides
  on the decoder weight gradient's product (alone it is a matrix-vector product, on Eigen). And no reduction is
  split into a reduce-window and a reduce, each a kernel outside any fusion (`CPU_COMPILER_OPTIONS`)."""
  cfg = get_config(
    "tiny",
    num_layers=4,
    vocab_size=2048,
    dtype="float32",
    attention_impl="xla",
    loss_impl=loss_impl,
    loss_chunk_size=512,
  )
  config = tiny_config("", batch_size=4, micro_batch_size=4)
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  text = train.build_program(config, mesh, num_languages=2, cfg=cfg).lower().compile().as_text()
  ynn = text.count('"kind":"__ynn_fusion"')
  fused_dots = text.count(" dot(")  # every dot: inside YNNPACK fusions and outside them
  outside = re.findall(r"^\s*(?:ROOT )?%[\w.\-]+ = f32\[([\d,]*)\]\S* dot\(", _outside_fusions(text), re.M)
  assert ynn >= 4 * 7 * 2, (ynn, fused_dots)  # each layer's 7 products forward and backward, at the least
  assert not outside, outside
  assert "reduce-window(" not in text


def _outside_fusions(hlo_text: str) -> str:
  """The compiled HLO's non-fused computations (entry, loop bodies): every `%fused_computation…` block removed."""
  return re.sub(r"^%fused_computation[^\n]*\{\n.*?^\}\n", "", hlo_text, flags=re.M | re.S)


@pytest.mark.parametrize("compare", [False, True], ids=["segment_sum", "compare"])
def test_per_language_sums_equal_a_weighted_bincount(compare):
  """Both forms of the per-language metric sums (a segment sum; on a TPU a comparison reduced over the slots),
  against numpy, with languages that never occur and ids up to the last one."""
  rng = np.random.default_rng(0)
  languages = rng.integers(0, 7, (4, 30))
  languages[0, 0] = 8
  values = rng.normal(size=(4, 30)).astype(np.float32)
  got = train.per_language_sums(jnp.asarray(values), jnp.asarray(languages), 9, compare=compare)
  assert got.shape == (9,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.bincount(languages.ravel(), values.ravel(), minlength=9), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_parameters_are_sharded_by_the_logical_rules():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  _, params = train.init_model(get_config("tiny"), mesh, 0)
  P = jax.sharding.PartitionSpec
  assert params["embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["layers"][1]["attn"]["wqkv"].sharding.spec == P("fsdp", None, "tensor")
  assert params["layers"][1]["mlp"]["wo"].sharding.spec == P("tensor", "fsdp")
  assert params["final_norm"]["scale"].sharding.is_fully_replicated


@pytest.mark.slow
def test_activations_hold_only_each_devices_rows():
  """In the compiled fsdp step every [rows, seq, ...] activation has the rows of one device: left to sharding
  propagation from the fsdp-sharded weights, XLA kept all 16 global rows on each of the 8 devices (and split the
  hidden dimension instead), so per-device memory grew with the slice rather than with the rows per device."""
  import re

  cfg = get_config("tiny").replace(vocab_size=1024, attention_impl="xla")
  mesh = sharding.make_mesh({"fsdp": 8}, jax.devices()[:8])
  seq = 128
  config = tiny_config("", batch_size=16, micro_batch_size=16, **{"data.seq_len": seq})
  hlo = train.build_program(config, mesh, num_languages=4, cfg=cfg).lower().compile().as_text()
  rows = {int(n) for n in re.findall(rf"\b(?:f32|bf16)\[(\d+),{seq},", hlo)}
  assert rows == {2}, rows


def test_mesh_shape_resolves_and_rejects():
  assert sharding.mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape(dict(data=3, fsdp=-1), 8)
  with pytest.raises(ValueError, match="≠ 8 devices"):
    sharding.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)


@pytest.mark.slow
def test_loss_decreases_on_real_text_with_metrics_and_tensorboard(demo_data, tmp_path, capfd):
  workdir = str(tmp_path / "run")
  config = tiny_config(
    demo_data,
    train_tokens=512 * 40,
    batch_warmup_tokens=512 * 8,
    peak_flops_per_device=1e10,
    checkpoint_every_tokens=10**9,
    profile_steps=3,
    profile_start_step=5,
    log_languages=2,
  )
  result = train.train_and_evaluate(config, workdir, later_tokens=512 * 40)
  assert result["status"] == "complete" and result["step"] > 20
  losses = train_losses(workdir)
  first, last = np.mean(list(losses.values())[:5]), np.mean(list(losses.values())[-5:])
  assert last < first - 0.5, (first, last)
  metrics = read_metrics(workdir)
  logged = set().union(*metrics)
  for key in (
    "train/tokens_per_s",
    "train/mfu",
    "train/model_flops_per_s",
    "train/lr",
    "train/grad_norm",
    "train/clipped_fraction",
    "train/accuracy",
    "train_lang/en/loss",
    "eval/loss",
    "eval/en/loss",
  ):
    assert key in logged, key
  # Batch-size warmup: fewer micro-batches first, the full two after batch_warmup_tokens.
  micro = [m["train/microbatches"] for m in metrics if "train/microbatches" in m]
  assert micro[0] == 1 and micro[-1] == 2 and sorted(micro) == micro
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tb")))
  assert set(result["eval"]) >= {"en", "de", "all"}
  assert 0 < result["eval"]["all"]["loss"] < 10
  # The run's record: its config, its mixture and every evaluation with all languages.
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())
  with open(os.path.join(workdir, "mixture.json")) as f:
    mix = json.load(f)
  assert sorted(mix["languages"]) == sorted(["en", "de", "fr", "ru", "zh", "sw"])
  assert sum(mix["weights"]) == pytest.approx(1.0) and min(mix["tokens"]) > 0
  with open(os.path.join(workdir, "eval.jsonl")) as f:
    assert json.loads(f.readlines()[-1])["results"] == result["eval"]
  # Six languages, log_languages=2: the two largest and two smallest by n_l get tags, plus three groups.
  by_size = [l for _, l in sorted(zip(mix["tokens"], mix["languages"]), reverse=True)]
  lang_tags = {k.split("/")[1] for k in logged if k.startswith("train_lang/")}
  assert lang_tags == {*by_size[:2], *by_size[-2:]}
  for prefix in ("train_group", "eval_group"):
    assert {k for k in logged if k.startswith(prefix)} == {f"{prefix}/{g}/loss" for g in ("high", "mid", "low")}
  assert all(m["train/total_tokens"] == m["train/tokens"] for m in metrics if "train/tokens" in m)
  split = [m for m in metrics if "time/step_s" in m][-1]
  assert split["time/step_s"] == pytest.approx(split["time/data_s"] + split["time/device_s"] + split["time/host_s"])
  # A profile of steps 5..7 for TensorBoard's profile plugin.
  traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces
  # The progress line of the last step: budget reached, the curriculum's ETA beyond the phase's.
  err = capfd.readouterr().err
  last = [l for l in err.splitlines() if l.startswith(f"pretrain step {result['step']} |")][-1]
  assert "20.48k/20.48k tok (100.0%)" in last and "ETA 0s, curriculum " in last and "s/step: data" in last


def test_bad_batch_configuration_is_named(demo_data, tmp_path):
  with pytest.raises(ValueError, match="micro_batch_size"):
    train.train_and_evaluate(tiny_config(demo_data, micro_batch_size=3), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="not divisible by data×fsdp"):
    train.train_and_evaluate(
      tiny_config(demo_data, batch_size=4, micro_batch_size=4, num_devices=8), str(tmp_path / "b")
    )


_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path[:0] = [{root!r}, {tests!r}]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize("localhost:{port}", num_processes=2, process_id={pid})
from helpers import tiny_config
from mmbert_jax import train
result = train.train_and_evaluate(tiny_config({data!r}, num_devices=0), {workdir!r})
print("RESULT", result["status"], result["step"], jax.device_count())
"""


STEPS = 12  # tiny_config's run: 512 tokens a step


@pytest.fixture(scope="module")
def one_process_losses(demo_data, tmp_path_factory):
  """The per-step losses of tiny_config's run in one process of 4 devices, what 2-process runs must reproduce."""
  workdir = str(tmp_path_factory.mktemp("one"))
  train.train_and_evaluate(tiny_config(demo_data, num_devices=4), workdir)
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return [losses[s] for s in range(1, STEPS + 1)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_like_one(demo_data, tmp_path, one_process_losses):
  """A real 2-process run (jax.distributed, gloo collectives, 2 CPU devices each) equals one 4-device process."""
  workdir = str(tmp_path / "two")
  for returncode, out, err in run_two_processes(_WORKER, data=demo_data, workdir=workdir):
    assert returncode == 0 and f"RESULT complete {STEPS} 4" in out, (out + err)[-3000:]
  two_losses = train_losses(workdir)
  assert sorted(two_losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two_losses[s] for s in range(1, STEPS + 1)], one_process_losses, rtol=0, atol=1e-5)


_PREEMPTIBLE = """
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path[:0] = [{root!r}, {tests!r}]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize("localhost:{port}", num_processes=2, process_id={pid})
from helpers import tiny_config
from mmbert_jax import main, train
save, record = train.PhaseRun.save, train.PhaseRun.record
def save_and_say(self, final=False):
  print("SAVED", self.step, flush=True)
  save(self, final)
train.PhaseRun.save = save_and_say
if {slow}:   # at least 0.2 s a step: the stop lands well before the end of the run
  train.PhaseRun.record = lambda self, done: (time.sleep(0.2), record(self, done))[1]
# No periodic checkpoint: the rerun resumes from the one the stop saved.
sys.exit(main.run(tiny_config({data!r}, num_devices=0, checkpoint_every_tokens=10 ** 9), {workdir!r}))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_one_process_stops_both_at_the_same_step(demo_data, tmp_path, one_process_losses):
  """SIGTERM to process 1 of 2 mid-run: JAX's preemption sync point stops both after the same step, both save it
  and exit 75 (preempted); the rerun resumes on both and the per-step losses are those of an uninterrupted run."""
  workdir = str(tmp_path / "two")
  jsonl = os.path.join(workdir, "metrics.jsonl")

  def sigterm_process_1_after_step_2(procs):
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if os.path.exists(jsonl) and '"step": 2,' in open(jsonl).read():  # process 0 has logged step 2
        procs[1].send_signal(signal.SIGTERM)
        return
      time.sleep(0.05)

  first = run_two_processes(
    _PREEMPTIBLE, timeout=300, during=sigterm_process_1_after_step_2, data=demo_data, workdir=workdir, slow=True
  )
  saved = []
  for returncode, out, err in first:
    assert returncode == 75, (out + err)[-3000:]
    saved.append([int(line.split()[1]) for line in out.splitlines() if line.startswith("SAVED")])
  [[step], [other]] = saved  # one save each: the stop's
  assert step == other and 2 < step < STEPS, saved
  assert ckpt_lib.steps(ckpt_lib.checkpoint_dir(workdir)) == [step]
  assert "SIGTERM caught" in first[1][2] and "SIGTERM caught" not in first[0][2]  # only process 1 got it

  second = run_two_processes(_PREEMPTIBLE, timeout=300, data=demo_data, workdir=workdir, slow=False)
  for returncode, out, err in second:
    assert returncode == 0, (out + err)[-3000:]
  assert f"resumed {workdir} at step {step}" in second[0][1] + second[0][2]
  two_losses = train_losses(workdir)
  assert sorted(two_losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two_losses[s] for s in range(1, STEPS + 1)], one_process_losses, rtol=0, atol=1e-5)
