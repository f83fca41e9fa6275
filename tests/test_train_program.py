"""One train state: the optimizer state the loop holds is laid out like its parameters (every moment sharded like
its parameter) after init, resume, hand-off and in fine-tuning; the ahead-of-time step compiles exactly the
loop's inputs; the compiled step updates moments on shards."""

import re

import jax
import numpy as np
import pytest
from helpers import load_config, tiny_config, train_losses

from mmbert_jax import sharding, train
from mmbert_jax.model import get_config

MESHES = {"fsdp8": dict(data=1, fsdp=8, tensor=1), "data2_fsdp4": dict(data=2, fsdp=4, tensor=1)}


def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in key_path)


def _mirrors(params, opt_state) -> list[tuple[str, jax.Array, jax.Array]]:
  """(path, optimizer leaf, parameter) for every optimizer leaf whose key path ends with a parameter's path and
  has its shape (Adam's mu and nu): found from the trees' paths, not through optax's own parameter mapping."""
  by_path = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  out = []
  for p, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    path = _path(p)
    match = [k for k in by_path if path.endswith("/" + k) and by_path[k].shape == leaf.shape]
    if match:
      out.append((path, leaf, by_path[max(match, key=len)]))
  return out


def _device0_bytes(tree) -> int:
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def assert_layout(params, opt_state, mesh):
  """Every moment has its parameter's sharding, and device 0 holds (params + moments) ÷ shards of each sharded
  parameter plus the replicated leaves in full, within 5%."""
  mirrors = _mirrors(params, opt_state)
  assert len(mirrors) >= 2 * len(jax.tree.leaves(params)), "expected Adam's two moments per parameter"
  for path, leaf, param in mirrors:
    assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (path, leaf.sharding, param.sharding)
  expected = 0
  mirrored = {id(leaf) for _, leaf, _ in mirrors}
  for x in jax.tree.leaves(params):
    copies = 1 + sum(1 for _, leaf, p in mirrors if p is x)  # the parameter and its moments
    shards = x.size // x.addressable_shards[0].data.size
    expected += copies * x.nbytes / shards
  expected += sum(x.nbytes for x in jax.tree.leaves(opt_state) if id(x) not in mirrored)  # counts, scalars
  measured = _device0_bytes((params, opt_state))
  assert abs(measured - expected) <= 0.05 * expected, (measured, expected)
  # The layout is not replication: the whole state is far less than a full copy per device.
  full = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))
  assert measured < 0.5 * full, (measured, full)


def _config(data_dir, mesh_name, **overrides):
  overrides = {"batch_size": 16, "micro_batch_size": 8, **overrides}
  return tiny_config(data_dir, num_devices=8, **{f"mesh.{k}": v for k, v in MESHES[mesh_name].items()}, **overrides)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", MESHES)
def test_fresh_state_is_laid_out_like_the_parameters(demo_data, tmp_path, mesh_name):
  run = train.PhaseRun(_config(demo_data, mesh_name), str(tmp_path))
  try:
    assert_layout(run.params, run.opt_state, run.mesh)
  finally:
    run.close(wait=False)


@pytest.mark.slow
def test_resume_and_old_replicated_checkpoints_restore_sharded(demo_data, tmp_path):
  """A checkpoint whose moments were saved replicated (as before the layout was fixed) restores sharded, with the
  same values, and the run goes on to the same losses as an uninterrupted one."""
  config = _config(demo_data, "fsdp8", train_tokens=512 * 4, checkpoint_every_tokens=512 * 2)
  run = train.PhaseRun(config, str(tmp_path / "old"))
  try:
    with jax.set_mesh(run.mesh):
      for _ in range(2):
        run.record(run.dispatch_step())
      replicated = jax.device_put(run.opt_state, sharding.replicated(run.mesh))
      saved = jax.tree.map(np.asarray, replicated)
      run.opt_state = replicated
      run.save()
  finally:
    run.close()
  resumed = train.PhaseRun(config, str(tmp_path / "old"))
  try:
    assert resumed.step == 2
    assert_layout(resumed.params, resumed.opt_state, resumed.mesh)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(resumed.opt_state)):
      np.testing.assert_array_equal(a, np.asarray(b))
    assert resumed.run() == "complete"
  finally:
    resumed.close()
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert straight["status"] == "complete"
  assert train_losses(str(tmp_path / "old")) == train_losses(str(tmp_path / "straight"))


@pytest.mark.slow
@pytest.mark.parametrize("init_optimizer_state", [False, True])
def test_handoff_state_is_laid_out_like_the_parameters(demo_data, tmp_path, init_optimizer_state):
  source = _config(demo_data, "data2_fsdp4", train_tokens=512 * 2)
  assert train.train_and_evaluate(source, str(tmp_path / "source"))["status"] == "complete"
  config = _config(demo_data, "fsdp8", init_from=str(tmp_path / "source"), init_optimizer_state=init_optimizer_state)
  run = train.PhaseRun(config, str(tmp_path / "next"))
  try:
    assert_layout(run.params, run.opt_state, run.mesh)
    if init_optimizer_state:  # the moments came from the source, not from a fresh init
      assert any(float(np.abs(np.asarray(leaf)).max()) > 0 for _, leaf, _ in _mirrors(run.params, run.opt_state))
  finally:
    run.close(wait=False)


def test_finetuning_state_is_laid_out_like_the_parameters():
  from mmbert_jax import finetune

  cfg = get_config("tiny", vocab_size=1000)
  settings = finetune.Settings(mesh=(("data", 1), ("fsdp", 8), ("tensor", 1)), num_devices=8).for_model(cfg)
  program = finetune._program(cfg, "classification", 3, settings)
  with jax.set_mesh(program.mesh):
    _, encoder = train.init_model(cfg, program.mesh, 0)
    params = program.init(encoder)
    opt_state = program.init_opt(params)
  assert_layout(params, opt_state, program.mesh)


# ---------------------------------------------------------------------------------------------------------------
# Ahead of time: the loop's own inputs
# ---------------------------------------------------------------------------------------------------------------


def _phase_config(name: str, arg: str, data_dir: str):
  c = load_config(name, arg)
  c.update_from_flattened_dict(
    {
      "model_preset": "tiny",
      "model.vocab_size": 1000,
      "model.attention_impl": "xla",
      "data.data_dir": data_dir,
      "data.languages": "en,de,fr,ru,zh,sw",
      "data.num_streams": 0,
      "data.max_passes": 0,
      "batch_size": 16,
      "micro_batch_size": 8,
      "batch_warmup_tokens": 0,
      "num_devices": 8,
      "mesh.data": 1,
      "mesh.fsdp": -1,
      "mesh.tensor": 1,
    }
  )
  with c.unlocked():
    c.data.budgets = {}
  return c


def _spec(x) -> tuple:
  """The mesh axes each dimension is split over (axes of size 1 split nothing), however the spec is spelt."""
  sizes = x.sharding.mesh.shape
  spec = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
  axes = lambda e: tuple(a for a in ((e,) if isinstance(e, str) else e or ()) if sizes[a] > 1)
  return tuple(axes(e) for e in spec)


def _avals(tree) -> dict[str, tuple]:
  return {_path(p): (x.shape, np.dtype(x.dtype), _spec(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.aot
@pytest.mark.slow
@pytest.mark.parametrize("name,arg", [("pretrain", "small"), ("midtrain", "small"), ("decay", "all,small")])
def test_aot_compiles_the_loops_inputs(demo_data, tmp_path, name, arg):
  """Parameters, optimizer state and batch of the loop (live arrays after its first batch) equal the AOT step's
  inputs for a v5e-8 slice in shape, dtype and partitioning; and that step compiles (pretrain)."""
  pytest.importorskip("libtpu")
  from mmbert_jax import aot

  config = _phase_config(name, arg, demo_data)
  run = train.PhaseRun(config, str(tmp_path))
  try:
    _, batch = run.next_batch(run.program.microbatches)
    loop = _avals((run.params, run.opt_state, batch))
  finally:
    run.close(wait=False)
  program, info = aot.lower_train_step(config, "v5e-8")
  ahead = _avals((program.abstract_params, program.abstract_opt_state, program.abstract_batch()))
  assert loop.keys() == ahead.keys()
  assert {k: v for k, v in loop.items() if v != ahead[k]} == {}, {k: ahead[k] for k in loop if loop[k] != ahead[k]}
  assert info["masked"] == batch["masked_positions"].shape[-1]
  if name == "pretrain":  # one phase compiled end to end is enough; the others differ only in these shapes
    program.lower().compile()


# ---------------------------------------------------------------------------------------------------------------
# The compiled step updates on shards
# ---------------------------------------------------------------------------------------------------------------


def _compiled_hlo(mesh_sizes) -> tuple[str, train.TrainProgram]:
  config = tiny_config("", batch_size=16, micro_batch_size=16, num_devices=8)
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:8])
  program = train.build_program(config, mesh, num_languages=4, cfg=get_config("tiny", vocab_size=1024))
  return program.lower().compile().as_text(), program


@pytest.mark.slow
def test_compiled_step_updates_moments_on_shards():
  """In the 8-device fsdp step the optimizer's arithmetic (Adam's sqrt of the second moment) runs on each device's
  shard, and nothing gathers a whole parameter-shaped float32 array except the forward and backward passes'
  all-gathers of the parameters themselves (counted against the gradient alone, compiled the same way)."""
  hlo, program = _compiled_hlo(dict(fsdp=8))
  full = {
    (x.shape, "f32")
    for x in jax.tree.leaves(program.abstract_params)
    if x.ndim == 2 and not x.sharding.is_fully_replicated
  }
  sqrt_shapes = {tuple(int(d) for d in m.split(",")) for m in re.findall(r"f32\[([\d,]+)\]\{[^}]*\} sqrt\(", hlo)}
  assert sqrt_shapes, "no sqrt found: the pattern no longer matches the compiled HLO"
  assert not {(s, "f32") for s in sqrt_shapes} & full, sqrt_shapes

  def gathers(text):
    found = re.findall(r"f32\[([\d,]+)\]\{[^}]*\} all-gather\(", text)
    return sorted(
      tuple(int(d) for d in m.split(",")) for m in found if (tuple(int(d) for d in m.split(",")), "f32") in full
    )

  def grad_only(params, batch):
    return jax.grad(lambda p: train._forward(program.model.bind(p), jax.tree.map(lambda x: x[0], batch))[0].sum())(
      params
    )

  with jax.set_mesh(program.mesh):
    grad_hlo = (
      jax.jit(grad_only, in_shardings=(program.param_shardings, None), out_shardings=program.param_shardings)
      .lower(program.abstract_params, program.abstract_batch())
      .compile()
      .as_text()
    )
  assert gathers(hlo) == gathers(grad_hlo)
