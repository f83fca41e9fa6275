"""Parity with transformers' ModernBertForMaskedLM: load, save, round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmbert_jax import hf  # noqa: E402

WINDOW_TOTAL = 16  # ±8: documents below are longer, so local layers really differ from global ones


def _hf_model(seed=0):
  torch.manual_seed(seed)
  cfg = transformers.ModernBertConfig(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    local_attention=WINDOW_TOTAL,
    global_attn_every_n_layers=3,
    global_rope_theta=160_000.0,
    local_rope_theta=10_000.0,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    cls_token_id=1,
    sep_token_id=1,
    attn_implementation="sdpa",
  )
  model = transformers.ModernBertForMaskedLM(cfg).eval()
  # Random norm scales and decoder bias, so a swapped or dropped mapping cannot hide behind ones and zeros.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name == "decoder.bias":
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf") / "modernbert")
  _hf_model().save_pretrained(path)
  return path


def _hf_logits(model, ids, attention_mask=None):
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(np.asarray(ids)),
      attention_mask=None if attention_mask is None else torch.tensor(np.asarray(attention_mask)),
    )
  return out.logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_padded_batch_matches_transformers(hf_dir, scan_layers):
  rng = np.random.default_rng(0)
  lengths = [40, 27, 9]
  ids = np.zeros((3, 40), np.int64)
  mask = np.zeros((3, 40), np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.integers(5, 1000, n)
    mask[row, :n] = 1
  want = _hf_logits(transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval(), ids, mask)
  model = hf.load(hf_dir, scan_layers=scan_layers)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model(jnp.asarray(ids, jnp.int32), segment_ids=jnp.asarray(mask, jnp.int32)))
  real = mask.astype(bool)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)


def test_packed_row_equals_each_document_alone(hf_dir):
  rng = np.random.default_rng(1)
  docs = [rng.integers(5, 1000, n) for n in (23, 11, 30)]
  row = np.concatenate(docs + [np.zeros(8, np.int64)])
  segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(8, np.int64)])
  model = hf.load(hf_dir)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model(jnp.asarray(row[None], jnp.int32), segment_ids=jnp.asarray(segments[None], jnp.int32)))[0]
  reference = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
  start = 0
  for doc in docs:
    want = _hf_logits(reference, doc[None])[0]
    np.testing.assert_allclose(got[start : start + len(doc)], want, atol=1e-5, rtol=0)
    start += len(doc)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_save_round_trip(hf_dir, tmp_path, scan_layers):
  model = hf.load(hf_dir, scan_layers=scan_layers)
  out = str(tmp_path / "export")
  hf.save(model, out)
  reloaded_hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  ids = np.random.default_rng(2).integers(5, 1000, (2, 33))
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
  np.testing.assert_allclose(_hf_logits(reloaded_hf, ids), ours, atol=1e-5, rtol=0)
  # Our params survive save → load bit for bit.
  again = hf.load(out)
  a = jax.tree.leaves(nnx.state(model, nnx.Param))
  b = jax.tree.leaves(nnx.state(again, nnx.Param))
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  # The exported directory holds exactly the keys transformers writes itself (decoder.weight stays tied).
  from safetensors.numpy import load_file

  theirs = set(load_file(os.path.join(hf_dir, "model.safetensors")))
  assert set(load_file(os.path.join(out, "model.safetensors"))) == theirs
  with pytest.raises(FileExistsError, match="exists"):
    hf.save(model, out)


@pytest.mark.slow
def test_save_of_fresh_model_loads_in_transformers(tmp_path):
  from mmbert_jax import MaskedLM, get_config

  model = MaskedLM(get_config("tiny", global_rope_theta=10_000.0, local_rope_theta=10_000.0), rngs=nnx.Rngs(3))
  hf.save(model, str(tmp_path))
  theirs = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path)).eval()
  assert theirs.config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
  ids = np.random.default_rng(4).integers(5, 1024, (1, 50))
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
  np.testing.assert_allclose(_hf_logits(theirs, ids), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
  "field,value,pattern",
  [
    ("hidden_activation", "silu", "hidden_activation"),
    ("norm_bias", True, "norm_bias"),
    ("model_type", "bert", "model_type"),
    ("num_attention_heads", 5, "num_heads"),
    ("vocab_size", None, "vocab_size"),
  ],
)
def test_bad_config_names_the_field(hf_dir, tmp_path, field, value, pattern):
  with open(os.path.join(hf_dir, "config.json")) as f:
    config = json.load(f)
  if value is None:
    del config[field]
  else:
    config[field] = value
  with pytest.raises(hf.HFConfigError, match=pattern) as err:
    hf.config_from_hf(config)
  assert "\n" not in str(err.value)


def test_weights_that_do_not_fit_name_the_key(hf_dir, tmp_path):
  bad = tmp_path / "bad"
  bad.mkdir()
  with open(os.path.join(hf_dir, "config.json")) as f:
    config = json.load(f)
  config["intermediate_size"] = 128
  (bad / "config.json").write_text(json.dumps(config))
  os.symlink(os.path.join(hf_dir, "model.safetensors"), bad / "model.safetensors")
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.Wi\.weight"):
    hf.load(str(bad))


# ---- continued pre-training from a transformers directory ---------------------------------------------------------


def _tiny_modernbert(**overrides):
  """A random ModernBertForMaskedLM of the tiny size, with the layer count and MLP width changed from the tiny
  preset (a run must take them from config.json) and random norm scales and decoder bias."""
  torch.manual_seed(1)
  fields = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    local_attention=16,
    global_attn_every_n_layers=3,
    global_rope_theta=10_000.0,
    local_rope_theta=10_000.0,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    cls_token_id=1,
    sep_token_id=1,
    attn_implementation="eager",
  )
  model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**fields | overrides)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name == "decoder.bias":
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
  return model


def _transformers_mlm_loss(model, batches) -> float:
  """The mean MLM loss of micro-batches, each packed document run alone through transformers with its positions."""
  total, count = 0.0, 0.0
  for b in batches:
    for r in range(b["input_ids"].shape[0]):
      seg = b["segment_ids"][r]
      for s in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == s)
        with torch.no_grad():
          logits = model(
            input_ids=torch.tensor(b["input_ids"][r, idx][None].astype(np.int64)),
            position_ids=torch.tensor(b["positions"][r, idx][None].astype(np.int64)),
          ).logits[0]
        logp = torch.log_softmax(logits.double(), -1).numpy()
        for p, label, w in zip(b["masked_positions"][r], b["masked_labels"][r], b["masked_weights"][r]):
          if w > 0 and seg[p] == s:
            total -= w * logp[p - idx[0], label]
            count += w
  return total / count


@pytest.mark.slow
def test_pretrain_phase_starts_from_a_transformers_directory(tmp_path, demo_data):
  from helpers import tiny_config, train_losses

  from data_pipeline import pipeline as data_lib
  from mmbert_jax import train

  model = _tiny_modernbert()
  hf_path = str(tmp_path / "modernbert")
  model.save_pretrained(hf_path)
  config = tiny_config(demo_data, init_from=hf_path, train_tokens=512, **{"model.attn_out_dropout": 0.0})
  workdir = str(tmp_path / "run")
  run = train.PhaseRun(config, workdir)
  try:
    # The architecture comes from config.json, not from the tiny preset.
    assert (run.cfg.num_layers, run.cfg.intermediate_size) == (3, 80)
    # Step 0's parameters are the transformers weights, whatever their sharding.
    params = jax.device_get(run.params)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for ours, key, _, to_hf in hf.weight_map(run.cfg):
      np.testing.assert_array_equal(np.asarray(to_hf(hf._get(params, ours))), state[key], err_msg=key)
    want = jax.tree.map(lambda x: x.sharding, train.model_graph(run.cfg, run.mesh).abstract_params)
    assert jax.tree.map(lambda x: x.sharding, run.params) == want
    # Fresh optimizer state, counters from 0, the directory in the run's history.
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(run.opt_state) if x.ndim > 0)
    assert (run.step, run.tokens, run.meta["total_tokens_before"], run.meta["tokens_per_language"]) == (0, 0, 0, {})
    assert run.meta["history"] == [{"phase": "transformers", "source": hf_path, "tokens": 0}]
    micro_rows, n_micro = run.program.rows, run.program.microbatches
    assert run.run() == "complete"
  finally:
    run.close()
  # The first step's loss is transformers' MLM loss on the same batch (the same data, drawn again).
  data = data_lib.make_train_iterator(train.pipeline_config(config, micro_rows))
  batches = [next(data) for _ in range(n_micro)]
  data.close()
  assert abs(train_losses(workdir)[1] - _transformers_mlm_loss(model, batches)) < 1e-5
