"""Downstream fine-tuning and scoring of any checkpoint: classification heads and contrastive sentence embeddings
on top of `MaskedLM.encode`.

  python -m mmbert_jax.finetune --task=cldr_order --checkpoint=RUN/pretrain,RUN/decay_all,RUN/merged \
      --out=order.json
  python -m mmbert_jax.finetune --task=classification --train=xnli_en.jsonl --test=xnli_test.tsv \
      --text_key=premise --pair_key=hypothesis --label_key=label --lang_key=language --train_languages=en \
      --checkpoint=RUN/merged,hf/mmbert-small --out=xnli.json
  python -m mmbert_jax.finetune --task=retrieval --train=pairs.parquet --test=tfds:my_pairs:test \
      --text_key=query --pair_key=positive --checkpoint=... --out=retrieval.json
  python -m mmbert_jax.finetune --task=retrieval --mteb=scifact --lrs=1e-5,3e-5,5e-5 --seeds=0,1,2 \
      --checkpoint=... --out=scifact.json

Tasks (`data_pipeline.tasks`): the embedded `cldr_order` and `cldr_order_en` (word order, in-language and
cross-lingual zero-shot: what pretraining teaches; no download), or
`classification` / `retrieval` from JSONL, parquet, TSV or a TFDS dataset on disk (sentence pairs as in XNLI,
PAWS-X or GLUE with `--pair_key` and `--label_names`), or an MTEB / BEIR retrieval directory (`--mteb`). A
checkpoint is a workdir, its checkpoints/ or one checkpoints/<step> directory, or a transformers ModernBERT
directory; the tokenizer is the run's (`<data_dir>/tokenizer.model`), the directory's, or `--tokenizer`.

Heads:
  classification  pool (the mean over the text, as the exported config's `classifier_pooling`, or CLS = the <bos>
                  position) → dropout → dense → softmax cross-entropy; scored by accuracy and macro-F1
  retrieval       pooled, L2-normalized embeddings trained with the symmetric in-batch InfoNCE loss at a fixed
                  temperature; test queries rank every candidate by cosine: nDCG@10, recall@1 and MRR@10
                  (graded, several relevant candidates per query with MTEB qrels)

Every table is read against two rows: `chance` and `random init` (the first checkpoint's architecture with fresh
weights, same settings; `--norandom_init` drops it). With several `--lrs` or `--seeds`, the mmBERT paper's protocol
(`protocol`): the learning rate best on the dev split (averaged over seeds) is reported on test, averaged over
seeds.

Training runs on the pretraining mesh with its logical sharding rules (`mmbert_jax.sharding`) and optimizer
module (`mmbert_jax.optim`): a few epochs, linear warmup and linear decay to zero. Every checkpoint gets the same
head initialisation, example order and dropout masks (all from `seed`), so rows of the table compare directly.
Results are reported over the whole test set and per language (train on one language with `--train_languages`
to measure cross-lingual transfer).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from data_pipeline import filesystem as fs
from data_pipeline import tasks as tasks_lib
from data_pipeline import tokenizer as tokenizer_lib
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import cli, export, hf, optim, schedules, sharding
from mmbert_jax import flops as flops_lib
from mmbert_jax import train as train_lib
from mmbert_jax.model import MaskedLM, ModelConfig

METRICS = {"classification": ("accuracy", "macro_f1"), "retrieval": ("ndcg@10", "recall@1", "mrr@10")}
POOLING = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Fine-tuning hyperparameters, shared by every checkpoint scored."""

  epochs: int = 0  # 0: by model size (`for_model`)
  batch_size: int = 32  # training rows (pairs for retrieval) per step
  eval_batch_size: int = 64
  max_len: int = 64  # tokens per text, <bos> and <eos> included
  peak_lr: float = 0.0  # 0: by model size (`for_model`)
  warmup_fraction: float = 0.1  # of all steps; then linear decay to 0
  optimizer: str = "adamw"  # any of mmbert_jax.optim.OPTIMIZERS
  weight_decay: float = 0.0  # decay per step at peak LR (mmbert_jax.optim's meaning)
  pooling: str = "mean"  # mean | cls (the <bos> position)
  dropout: float = 0.1  # before the classification layer
  temperature: float = 0.05  # InfoNCE
  seed: int = 0
  mesh: tuple[tuple[str, int], ...] = (("data", 1), ("fsdp", -1), ("tensor", 1))
  num_devices: int = 0  # use only the first N devices (0 = all)

  def for_model(self, cfg: ModelConfig) -> Settings:
    """Learning rate and epochs left at 0, filled in by the encoder's size: encoders of mmBERT-small's width and up
    take the rates of the published fine-tuning sweeps (5e-5 base, 8e-5 small) for 3 epochs; the tiny demo-size
    models (hidden < 256) 3e-4 for 10 epochs: with those, the demo's pretrain checkpoint scores 0.69 on cldr_order
    (chance 0.5) and its random-init twin 0.52; at 1e-3 the random-init encoder learns more word order from the
    task itself and the margin shrinks."""
    lr, epochs = (5e-5, 3) if cfg.hidden_size >= 768 else (8e-5, 3) if cfg.hidden_size >= 256 else (3e-4, 10)
    return dataclasses.replace(self, peak_lr=self.peak_lr or lr, epochs=self.epochs or epochs)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | dict, ignore: Sequence[str] = ()) -> Settings:
    """From a config section holding any of these fields (and the keys named in `ignore`)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields - set(ignore))
    if unknown:
      raise ValueError(f"downstream settings: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    values = {k: config[k] for k in fields if k in config}
    if "mesh" in values:
      values["mesh"] = tuple(dict(values["mesh"]).items())
    return cls(**values)


# --------------------------------------------------------------------------------------------------------------
# Encoders: any checkpoint this project writes, or a transformers directory
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoder:
  cfg: ModelConfig
  params: Any  # MaskedLM parameters as a pure dict
  tokenizer: str | None  # path of its tokenizer, if one was found
  source: str

  def model(self) -> MaskedLM:
    graph, state = nnx.split(nnx.eval_shape(lambda: MaskedLM(self.cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, self.params)
    return nnx.merge(graph, state)


def load_encoder(path: str, tokenizer: str | None = None) -> Encoder:
  """A workdir, checkpoints/ or checkpoints/<step> directory, or a transformers ModernBERT directory (local or
  gs://)."""
  fs.path(path, "--checkpoint")  # a scheme other than gs:// is one line naming the flag
  if hf.is_model_dir(path):
    model = hf.load(path, attention_impl="auto")
    params, cfg, source = nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config, str(fs.path(path))
    found = [fs.path(path) / n for n in (export.TOKENIZER_FILE, "tokenizer.json")]
    run_tokenizer = next((str(p) for p in found if p.exists()), None)
  else:
    params, meta, source = ckpt_lib.load_params(path)
    cfg = ckpt_lib.model_config_of(meta).replace(attention_impl="auto")  # the run's kernel may not run here
    run_tokenizer = export._run_tokenizer(meta)
  return Encoder(cfg, params, tokenizer or run_tokenizer, source)


RANDOM_INIT, CHANCE = "random init", "chance"


def random_encoder(like: Encoder, seed: int = 0) -> Encoder:
  """An encoder of `like`'s size and tokenizer with freshly initialised weights: the row every table is read
  against (fine-tuning a trained checkpoint should beat it)."""
  params = nnx.to_pure_dict(nnx.state(MaskedLM(like.cfg, rngs=nnx.Rngs(seed)), nnx.Param))
  return Encoder(like.cfg, params, like.tokenizer, f"{RANDOM_INIT} (seed {seed})")


# --------------------------------------------------------------------------------------------------------------
# Heads and losses
# --------------------------------------------------------------------------------------------------------------


def pool(hidden: jax.Array, segment_ids: jax.Array, how: str) -> jax.Array:
  """[B, S, H] → float32 [B, H]: the first (<bos>) position, or the mean over the non-padding positions."""
  hidden = hidden.astype(jnp.float32)
  if how == "cls":
    return hidden[:, 0]
  mask = (segment_ids > 0)[..., None].astype(jnp.float32)
  return (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


class Classifier(nnx.Module):
  """Sequence classification: encoder → pool → dropout → dense → float32 logits [B, num_classes]."""

  def __init__(
    self, cfg: ModelConfig, num_classes: int, *, pooling: str = "mean", dropout: float = 0.1, rngs: nnx.Rngs
  ):
    self.encoder = MaskedLM(cfg, rngs=rngs)
    self.pooling = pooling
    self.dropout = nnx.Dropout(dropout)
    eager = not jax.sharding.get_abstract_mesh().empty
    kernel = cfg.initializer_range * jax.random.truncated_normal(
      rngs.params(), -2.0, 2.0, (cfg.hidden_size, num_classes), jnp.float32
    )
    self.kernel = nnx.Param(kernel, out_sharding=("embed", None), eager_sharding=eager)
    self.bias = nnx.Param(jnp.zeros((num_classes,), jnp.float32), out_sharding=(None,), eager_sharding=eager)

  def __call__(self, input_ids, segment_ids, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = pool(self.encoder.encode(input_ids, segment_ids, rngs=rngs), segment_ids, self.pooling)
    if rngs is not None:
      x = self.dropout(x, deterministic=False, rngs=rngs)
    return x @ self.kernel[...] + self.bias[...]


class Embedder(nnx.Module):
  """Sentence embeddings: encoder → pool → L2 normalisation, float32 [B, H]."""

  def __init__(self, cfg: ModelConfig, *, pooling: str = "mean", rngs: nnx.Rngs):
    self.encoder = MaskedLM(cfg, rngs=rngs)
    self.pooling = pooling

  def __call__(self, input_ids, segment_ids, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = pool(self.encoder.encode(input_ids, segment_ids, rngs=rngs), segment_ids, self.pooling)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


def classification_loss(model: Classifier, batch: dict[str, jax.Array], rngs: nnx.Rngs | None = None):
  """Mean softmax cross-entropy of the labels."""
  logits = model(batch["input_ids"], batch["segment_ids"], rngs=rngs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def info_nce(queries: jax.Array, documents: jax.Array, temperature: float) -> jax.Array:
  """Symmetric in-batch InfoNCE: row i of each side is the positive of row i of the other, every other row a
  negative; the mean of the query→document and document→query cross-entropies."""
  logits = (queries @ documents.T) / temperature
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (
    optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  )


def contrastive_loss(model: Embedder, batch: dict[str, jax.Array], temperature: float, rngs: nnx.Rngs | None = None):
  queries = model(batch["input_ids"], batch["segment_ids"], rngs=rngs)
  documents = model(batch["pair_input_ids"], batch["pair_segment_ids"], rngs=rngs)
  return info_nce(queries, documents, temperature)


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


def classification_metrics(predicted: np.ndarray, gold: np.ndarray) -> dict[str, float]:
  """Accuracy, and macro-F1 over every class that occurs in the gold labels or the predictions."""
  predicted, gold = np.asarray(predicted), np.asarray(gold)
  f1 = []
  for c in np.union1d(predicted, gold):
    tp = np.sum((predicted == c) & (gold == c))
    denominator = np.sum(predicted == c) + np.sum(gold == c)
    f1.append(2 * tp / denominator)
  return {"accuracy": float(np.mean(predicted == gold)), "macro_f1": float(np.mean(f1)), "examples": len(gold)}


def ranks(scores: np.ndarray, answers: np.ndarray) -> np.ndarray:
  """1-based rank of each query's answer among its candidates; ties count against the answer."""
  scores = np.asarray(scores)
  answer_scores = scores[np.arange(len(answers)), answers]
  return np.sum(scores >= answer_scores[:, None], axis=1)


def retrieval_metrics(rank: np.ndarray, k: int = 10) -> dict[str, float]:
  """One answer per query at 1-based `rank`: nDCG@k (1 / log2(rank + 1) within the top k), recall@1, MRR@k."""
  rank = np.asarray(rank)
  return {
    f"ndcg@{k}": float(np.mean(np.where(rank <= k, 1.0 / np.log2(rank + 1.0), 0.0))),
    "recall@1": float(np.mean(rank == 1)),
    f"mrr@{k}": float(np.mean(np.where(rank <= k, 1.0 / rank, 0.0))),
    "examples": len(rank),
  }


def graded_retrieval_metrics(scores: np.ndarray, relevance: Sequence[dict[int, float]], k: int = 10) -> dict:
  """Queries with any number of relevant candidates, graded (MTEB / BEIR qrels): candidates ranked by score (ties
  by index); nDCG@k with linear gain, recall@1 = the share of a query's relevant candidates ranked first, MRR@k of
  the first relevant one. Per-query values, averaged over queries."""
  order = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :k]
  discount = 1.0 / np.log2(np.arange(2, k + 2))
  ndcg, recall, mrr = [], [], []
  for top, rel in zip(order, relevance):
    gains = np.array([rel.get(int(c), 0.0) for c in top])
    ideal = np.sort(np.array(list(rel.values()), float))[::-1][:k]
    ndcg.append(float(gains @ discount[: len(gains)]) / float(ideal @ discount[: len(ideal)]))
    recall.append(float(gains[0] > 0) / sum(v > 0 for v in rel.values()))
    hits = np.flatnonzero(gains > 0)
    mrr.append(1.0 / (hits[0] + 1) if len(hits) else 0.0)
  return {
    f"ndcg@{k}": float(np.mean(ndcg)),
    "recall@1": float(np.mean(recall)),
    f"mrr@{k}": float(np.mean(mrr)),
    "examples": len(ndcg),
  }


def chance(task: tasks_lib.Task) -> dict[str, float]:
  """The expected scores of guessing uniformly at random: a class out of `label_names` (accuracy 1/K; macro-F1
  the mean over classes of 2·p·(1/K) / (p + 1/K), p the class's share of the test set), or a random ranking of
  the candidates with one answer (recall@1 = 1/N, MRR@10 = (1 + 1/2 + … + 1/10) / N, nDCG@10 likewise)."""
  if task.kind == "classification":
    k = len(task.label_names)
    share = np.bincount(np.asarray(task.test.labels), minlength=k) / len(task.test)
    return {"accuracy": 1 / k, "macro_f1": float(np.mean(2 * share / k / (share + 1 / k)))}
  n, top = len(task.candidates), np.arange(1, min(len(task.candidates), 10) + 1)
  return {
    "ndcg@10": float(np.sum(1 / np.log2(top + 1)) / n),
    "recall@1": 1 / n,
    "mrr@10": float(np.sum(1 / top) / n),
  }


def _per_language(langs: Sequence[str], fn: Callable[[np.ndarray], dict]) -> tuple[dict, dict]:
  """fn(selection) over all examples, and per language."""
  langs = np.array(langs, dtype=object)
  return fn(np.ones(len(langs), bool)), {lang: fn(langs == lang) for lang in sorted(set(langs))}


# --------------------------------------------------------------------------------------------------------------
# Tokenized data
# --------------------------------------------------------------------------------------------------------------


def tokenize(
  tokenizer, texts: Sequence[str], pairs: Sequence[str] | None, max_len: int, cfg: ModelConfig
) -> list[list[int]]:
  """`<bos> text <eos>`, or `<bos> text <eos> pair <eos>` with both halves cut to fit `max_len`."""
  first = tokenizer.encode(texts)
  if pairs is None:
    return [[cfg.bos_id] + ids[: max_len - 2] + [cfg.eos_id] for ids in first]
  out = []
  for a, b in zip(first, tokenizer.encode(pairs)):
    budget = max_len - 3
    keep_b = min(len(b), max(budget // 2, budget - len(a)))
    a = a[: budget - keep_b]
    out.append([cfg.bos_id] + a + [cfg.eos_id] + b[:keep_b] + [cfg.eos_id])
  return out


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> dict[str, np.ndarray]:
  ids = np.full((len(rows), length), pad_id, np.int32)
  segments = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    ids[i, : len(row)] = row
    segments[i, : len(row)] = 1
  return {"input_ids": ids, "segment_ids": segments}


def _task_arrays(task: tasks_lib.Task, tokenizer, max_len: int, cfg: ModelConfig) -> dict[str, dict]:
  """Every text of the task as padded rows of one length: the longest text, rounded up to 8 (one compiled
  shape per task)."""
  groups = {
    "train": tokenize(
      tokenizer, task.train.texts, task.train.pairs if task.kind == "classification" else None, max_len, cfg
    ),
    "test": tokenize(tokenizer, task.test.texts, task.test.pairs, max_len, cfg),
  }
  if task.dev is not None:
    groups["dev"] = tokenize(tokenizer, task.dev.texts, task.dev.pairs, max_len, cfg)
  if task.kind == "retrieval":
    groups["train_pairs"] = tokenize(tokenizer, task.train.pairs, None, max_len, cfg)
    groups["candidates"] = tokenize(tokenizer, list(task.candidates), None, max_len, cfg)
  longest = max(len(r) for rows in groups.values() for r in rows)
  too_big = max(max(r) for rows in groups.values() for r in rows)
  if too_big >= cfg.vocab_size:
    raise ValueError(
      f"the tokenizer produces id {too_big}, but the model's vocabulary has {cfg.vocab_size} "
      "entries: pass the tokenizer the checkpoint was trained with (--tokenizer)"
    )
  length = min(max_len, 8 * math.ceil(longest / 8))
  return {name: pad_rows(rows, length, cfg.pad_id) for name, rows in groups.items()}


# --------------------------------------------------------------------------------------------------------------
# Compiled programs, one per (model config, task shape, settings), shared by every checkpoint of that model
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
  mesh: Any
  init: Callable  # encoder params → full params (head initialised from the seed), sharded
  init_opt: Callable
  train_step: Callable  # (params, opt_state, batch, lr, step) → (params, opt_state, loss)
  apply: Callable  # (params, input_ids, segment_ids) → logits or embeddings, replicated
  put: Callable  # host batch → global arrays sharded over (data, fsdp)
  rows_divisor: int


@functools.lru_cache(maxsize=8)
def _program(cfg: ModelConfig, kind: str, num_classes: int, settings: Settings) -> Program:
  devices = jax.devices()[: settings.num_devices] if settings.num_devices else jax.devices()
  mesh = sharding.make_mesh(dict(settings.mesh), devices)
  if settings.pooling not in POOLING:
    raise ValueError(f"pooling {settings.pooling!r} is not one of {POOLING}")

  def make():
    rngs = nnx.Rngs(settings.seed)
    if kind == "classification":
      return Classifier(cfg, num_classes, pooling=settings.pooling, dropout=settings.dropout, rngs=rngs)
    return Embedder(cfg, pooling=settings.pooling, rngs=rngs)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    graph, abstract = nnx.split(nnx.eval_shape(make))
    param_shardings = nnx.to_pure_dict(nnx.get_named_sharding(abstract, mesh))
  abstract_params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(abstract), param_shardings
  )
  head_shardings = {k: v for k, v in param_shardings.items() if k != "encoder"}

  def head_params():  # the encoder's random initialisation is not an output: XLA drops it
    params = nnx.to_pure_dict(nnx.state(make()))
    return {k: v for k, v in params.items() if k != "encoder"}

  fresh_head = jax.jit(head_params, out_shardings=head_shardings)

  def init(encoder_params):
    # A copy: the train step donates its parameters, and the encoder's serve the next task too.
    encoder = jax.device_put(jax.tree.map(jnp.copy, encoder_params), param_shardings["encoder"])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      return fresh_head() | {"encoder": encoder}

  tx = optim.build(settings.optimizer, learning_rate=0.0, peak_lr=settings.peak_lr, weight_decay=settings.weight_decay)
  opt_shardings = train_lib.shardings_of(train_lib.optimizer_state_layout(tx, abstract_params, mesh))
  init_opt = jax.jit(tx.init, out_shardings=opt_shardings)  # moments sharded like their parameters

  def loss_fn(params, batch, key):
    model = nnx.merge(graph, params, copy=True)
    rngs = nnx.Rngs(dropout=key)
    if kind == "classification":
      return classification_loss(model, batch, rngs)
    return contrastive_loss(model, batch, settings.temperature, rngs)

  def step(params, opt_state, batch, lr, step_index):
    key = jax.random.fold_in(jax.random.key(settings.seed), step_index)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
    updates, opt_state = tx.update(grads, optim.with_learning_rate(opt_state, lr), params)
    return optax.apply_updates(params, updates), opt_state, loss

  train_step = train_lib.jit_update_step(step, param_shardings, opt_shardings, mesh)
  apply = jax.jit(
    lambda params, ids, segments: nnx.merge(graph, params, copy=True)(ids, segments),
    in_shardings=(param_shardings, None, None),
    out_shardings=sharding.replicated(mesh),
  )

  def put(batch):  # every process holds the whole task, so the whole batch
    return {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}

  return Program(mesh, init, init_opt, train_step, apply, put, sharding.batch_divisor(mesh))


def _apply_all(program: Program, params, rows: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
  """The head's outputs for every row, in batches padded with empty rows."""
  n = len(rows["input_ids"])
  batch_size = program.rows_divisor * math.ceil(batch_size / program.rows_divisor)
  out = []
  with jax.set_mesh(program.mesh):
    for start in range(0, n, batch_size):
      chunk = {k: v[start : start + batch_size] for k, v in rows.items()}
      pad = batch_size - len(chunk["input_ids"])
      chunk = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in chunk.items()}
      batch = program.put(chunk)
      out.append(np.asarray(jax.device_get(program.apply(params, batch["input_ids"], batch["segment_ids"]))))
  return np.concatenate(out)[:n]


# --------------------------------------------------------------------------------------------------------------
# Fine-tune and score
# --------------------------------------------------------------------------------------------------------------


def lr_schedule(settings: Settings, total_steps: int):
  """Learning rate of step s (0-based), evaluated at s + 1: linear warmup to the peak, then linear decay
  that reaches 0 one step after the last."""
  warmup = min(total_steps - 1, math.ceil(settings.warmup_fraction * total_steps))
  return schedules.wsd_schedule(
    settings.peak_lr,
    warmup_tokens=warmup,
    decay_start_tokens=warmup,
    decay_tokens=total_steps - warmup + 1,
    final_fraction=0.0,
    decay_shape="linear",
  )


def epoch_steps(task: tasks_lib.Task, settings: Settings) -> int:
  """Training steps per epoch: full batches only."""
  steps = len(task.train) // settings.batch_size
  if steps == 0:
    raise ValueError(
      f"task {task.name}: {len(task.train)} training examples, fewer than one batch of {settings.batch_size}"
    )
  return steps


@dataclasses.dataclass(frozen=True)
class Workload:
  """What `finetune` runs for one encoder on one task: `steps` training steps of `rows` encoder rows each (a
  retrieval pair is two rows), then `eval_rows` rows encoded to score the held-out splits (their queries and,
  for retrieval, the candidates once per split; in padded batches); every row `length` tokens."""

  steps: int
  rows: int
  eval_rows: int
  length: int

  def flops(self, cfg: ModelConfig) -> float:
    """Matmul FLOPs of the encoder over these rows (`flops.flops_per_token` of a full row without the MLM head; the
    classification layer is negligible): training counts forward and backward (3 × forward), scoring forward only."""
    per_token = flops_lib.flops_per_token(cfg, self.length, 0.0).total
    return per_token * self.length * (self.steps * self.rows + self.eval_rows / 3)


def workload(task: tasks_lib.Task, settings: Settings, cfg: ModelConfig, tokenizer=None) -> Workload:
  """`finetune`'s work for an encoder of `cfg` on `task`: steps from the task's size and the epochs (by model size
  where 0), the row length of the tokenized task (`tokenizer`), or `settings.max_len` without one."""
  settings = settings.for_model(cfg)
  if tokenizer is not None:
    length = _task_arrays(task, tokenizer, settings.max_len, cfg)["train"]["input_ids"].shape[1]
  else:
    length = settings.max_len
  batches = lambda n: settings.eval_batch_size * math.ceil(n / settings.eval_batch_size)
  held_out = [task.test] + ([task.dev] if task.dev is not None else [])
  candidates = batches(len(task.candidates)) if task.kind == "retrieval" else 0
  return Workload(
    steps=settings.epochs * epoch_steps(task, settings),
    rows=settings.batch_size * (2 if task.kind == "retrieval" else 1),
    eval_rows=sum(batches(len(split)) + candidates for split in held_out),
    length=length,
  )


def finetune(
  encoder: Encoder, task: tasks_lib.Task, settings: Settings = Settings(), arrays: dict[str, dict] | None = None
) -> dict[str, Any]:
  """Fine-tune a fresh head (and the encoder) on `task.train`, score `task.test`:
  {"kind", "metrics": {...}, "per_language": {lang: {...}}, "train_loss": [per step], "steps", "seconds"}."""
  t0 = time.time()
  settings = settings.for_model(encoder.cfg)
  if arrays is None:
    if not encoder.tokenizer:
      raise ValueError(f"{encoder.source}: no tokenizer found with this checkpoint; pass one (--tokenizer)")
    tokenizer = tokenizer_lib.load_tokenizer(encoder.tokenizer, tokenizer_lib.SpecialIds.from_model_config(encoder.cfg))
    arrays = _task_arrays(task, tokenizer, settings.max_len, encoder.cfg)
  program = _program(encoder.cfg, task.kind, len(task.label_names), settings)
  if settings.batch_size % program.rows_divisor:
    raise ValueError(f"batch_size {settings.batch_size} is not divisible by data×fsdp = {program.rows_divisor} devices")
  n = len(task.train)
  steps_per_epoch = epoch_steps(task, settings)
  total = settings.epochs * steps_per_epoch
  lrs = np.asarray(jax.vmap(lr_schedule(settings, total))(jnp.arange(1, total + 1)), np.float32)
  train = dict(arrays["train"])
  if task.kind == "classification":
    train["labels"] = np.asarray(task.train.labels, np.int32)
  else:
    train |= {f"pair_{k}": v for k, v in arrays["train_pairs"].items()}

  params = program.init(encoder.params)
  with jax.set_mesh(program.mesh):
    opt_state = program.init_opt(params)
  order = np.random.default_rng(settings.seed)
  losses = []
  with jax.set_mesh(program.mesh):
    for epoch in range(settings.epochs):
      perm = order.permutation(n)
      for i in range(steps_per_epoch):
        step = epoch * steps_per_epoch + i
        idx = perm[i * settings.batch_size : (i + 1) * settings.batch_size]
        batch = program.put({k: v[idx] for k, v in train.items()})
        params, opt_state, loss = program.train_step(params, opt_state, batch, lrs[step], np.int32(step))
        losses.append(loss)
  losses = [float(x) for x in jax.device_get(losses)]
  if not np.isfinite(losses).all():
    raise FloatingPointError(
      f"task {task.name}, {encoder.source}: non-finite fine-tuning loss "
      f"(first at step {int(np.argmin(np.isfinite(losses)))}); lower the learning rate"
    )

  overall, per_lang = _evaluate(program, params, task, task.test, arrays["test"], arrays, settings)
  dev = {}
  if task.dev is not None:
    dev = {"dev_metrics": _evaluate(program, params, task, task.dev, arrays["dev"], arrays, settings)[0]}
  return {
    "kind": task.kind,
    "metrics": overall,
    "per_language": per_lang,
    "train_loss": losses,
    "steps": total,
    "peak_lr": settings.peak_lr,
    "epochs": settings.epochs,
    "seconds": time.time() - t0,
  } | dev


def _evaluate(program: Program, params, task: tasks_lib.Task, split: tasks_lib.Split, rows, arrays, settings):
  """(metrics, per-language metrics) of one held-out split."""
  if task.kind == "classification":
    predicted = _apply_all(program, params, rows, settings.eval_batch_size).argmax(-1)
    gold = np.asarray(split.labels)
    return _per_language(split.langs, lambda m: classification_metrics(predicted[m], gold[m]))
  queries = _apply_all(program, params, rows, settings.eval_batch_size)
  candidates = _apply_all(program, params, arrays["candidates"], settings.eval_batch_size)
  scores = queries.astype(np.float64) @ candidates.astype(np.float64).T
  if split.relevance is not None:  # qrels: several, graded relevant candidates per query
    metric = lambda m: graded_retrieval_metrics(scores[m], [r for r, keep in zip(split.relevance, m) if keep])
  else:
    rank = ranks(scores, np.asarray(split.labels))
    metric = lambda m: retrieval_metrics(rank[m])
  return _per_language(split.langs, metric)


def protocol(
  encoder: Encoder,
  task: tasks_lib.Task,
  settings: Settings,
  lrs: Sequence[float],
  seeds: Sequence[int],
  log: Callable[[str], None] | None = None,
  arrays: dict[str, dict] | None = None,
) -> dict[str, Any]:
  """The mmBERT paper's protocol: fine-tune at each learning rate with each seed, pick the learning rate whose
  main metric (the first of `METRICS`) averaged over seeds is best on `task.dev`, and report that learning rate's
  test metrics averaged over the seeds (with their standard deviation)."""
  if task.dev is None:
    raise ValueError(f"task {task.name}: a learning-rate sweep needs a dev split (--dev, or the MTEB dev qrels)")
  main = METRICS[task.kind][0]
  runs = {}
  for lr in lrs:
    runs[lr] = [finetune(encoder, task, dataclasses.replace(settings, peak_lr=lr, seed=s), arrays) for s in seeds]
    if log:
      log(
        f"{task.name} {encoder.source} lr {lr:g}: dev {main} {np.mean([r['dev_metrics'][main] for r in runs[lr]]):.3f}"
      )
  dev = {lr: float(np.mean([r["dev_metrics"][main] for r in rs])) for lr, rs in runs.items()}
  best = max(lrs, key=lambda lr: dev[lr])
  chosen = runs[best]
  mean = lambda dicts: {m: float(np.mean([d[m] for d in dicts])) for m in METRICS[task.kind]}
  languages = chosen[0]["per_language"]
  return {
    "kind": task.kind,
    "metrics": mean([r["metrics"] for r in chosen]) | {"examples": chosen[0]["metrics"]["examples"]},
    "std": {m: float(np.std([r["metrics"][m] for r in chosen])) for m in METRICS[task.kind]},
    "per_language": {lang: mean([r["per_language"][lang] for r in chosen]) for lang in languages},
    "lr": best,
    "dev": {str(lr): v for lr, v in dev.items()},
    "seeds": list(seeds),
    "train_loss": chosen[0]["train_loss"],
    "seconds": sum(r["seconds"] for rs in runs.values() for r in rs),
  }


def score(
  checkpoints: Sequence[str],
  tasks: Sequence[tasks_lib.Task],
  settings: Settings = Settings(),
  tokenizer: str | None = None,
  names: Sequence[str] | None = None,
  log: Callable[[str], None] | None = None,
  random_init: bool = True,
  lrs: Sequence[float] = (),
  seeds: Sequence[int] = (),
) -> dict[str, dict[str, dict]]:
  """{task: {checkpoint name (default: the path as given): finetune(...)}}, the same settings and seeds for every
  checkpoint. With `random_init`, the first checkpoint's architecture with random weights (`random_encoder`) is
  scored first, as the row "random init"; every task also gets a "chance" row (`chance`). With several `lrs` or
  `seeds`, each checkpoint is scored by `protocol` (best learning rate on dev, test averaged over seeds)."""
  names = list(names) if names else list(checkpoints)
  results: dict[str, dict[str, dict]] = {t.name: {CHANCE: {"kind": t.kind, "metrics": chance(t)}} for t in tasks}
  encoders = ((name, load_encoder(path, tokenizer)) for name, path in zip(names, checkpoints))
  if random_init and checkpoints:
    first = load_encoder(checkpoints[0], tokenizer)
    encoders = itertools.chain([(RANDOM_INIT, random_encoder(first, settings.seed))], encoders)
  for name, encoder in encoders:
    for task in tasks:
      if len(lrs) > 1 or len(seeds) > 1:
        sweep = (list(lrs) or [settings.peak_lr], list(seeds) or [settings.seed])
        results[task.name][name] = protocol(encoder, task, settings, *sweep, log=log)
      else:
        results[task.name][name] = finetune(encoder, task, settings)
      if log:
        m = results[task.name][name]["metrics"]
        log(
          f"{task.name} {name}: "
          + ", ".join(f"{k} {m[k]:.3f}" for k in METRICS[task.kind])
          + f" ({results[task.name][name]['seconds']:.1f}s)"
        )
  return results


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def format_table(results: dict[str, dict[str, dict]]) -> str:
  """Rows: checkpoints; columns: each task's metrics."""
  kinds = {task: next(iter(r.values()))["kind"] for task, r in results.items() if r}
  columns = [(task, metric) for task in kinds for metric in METRICS[kinds[task]]]
  rows = list(dict.fromkeys(name for r in results.values() for name in r))
  headers = [f"{task} {metric}" for task, metric in columns]
  first = max([len(r) for r in rows] + [len("checkpoint")])
  widths = [max(len(h), 6) for h in headers]
  lines = [
    "downstream (fine-tuned per checkpoint; held-out test sets)".center(first + sum(w + 2 for w in widths)),
    "checkpoint".ljust(first) + "".join(h.rjust(w + 2) for h, w in zip(headers, widths)),
  ]
  for row in rows:
    cells = [f"{results[t][row]['metrics'][m]:.3f}" if row in results[t] else "—" for t, m in columns]
    lines.append(row.ljust(first) + "".join(c.rjust(w + 2) for c, w in zip(cells, widths)))
  return "\n".join(lines)


def format_language_table(task_results: dict[str, dict], metric: str) -> str:
  """Rows: test languages; columns: checkpoints (cross-lingual transfer)."""
  columns = [c for c in task_results if "per_language" in task_results[c]]
  languages = sorted({lang for c in columns for lang in task_results[c]["per_language"]})
  width = max([len(c) for c in columns] + [8])
  lines = [
    f"{metric} per test language".center(10 + (width + 2) * len(columns)),
    "language  " + "  ".join(c.rjust(width) for c in columns),
  ]
  for lang in languages:
    cells = [
      f"{task_results[c]['per_language'][lang][metric]:.3f}" if lang in task_results[c]["per_language"] else "—"
      for c in columns
    ]
    lines.append(f"{lang:<10}" + "  ".join(cell.rjust(width) for cell in cells))
  return "\n".join(lines)


def _progress(line: str) -> None:
  print(line, file=sys.stderr, flush=True)  # stdout holds only the tables


def write_json(path: str, results: dict, settings: Settings, sources: dict[str, str] | None = None) -> None:
  """The results file (local or gs://), replaced whole."""
  fs.write_text(
    fs.path(path, "--out"),
    json.dumps({"settings": dataclasses.asdict(settings), "checkpoints": sources or {}, "tasks": results}, indent=1),
  )


# --------------------------------------------------------------------------------------------------------------
# The demo curriculum's last step
# --------------------------------------------------------------------------------------------------------------


def curriculum_checkpoints(config: ml_collections.ConfigDict) -> list[str]:
  """The checkpoints `score_curriculum` fine-tunes, by their folder in the workdir: each phase, then the merge."""
  return list(config.phases) + (["merged"] if "merge" in config and config.merge.method else [])


def curriculum_settings(config: ml_collections.ConfigDict) -> Settings:
  """`config.downstream`'s fine-tuning settings, on the run's devices."""
  settings = Settings.from_config(config.downstream, ignore=("tasks", "random_init"))
  return dataclasses.replace(settings, num_devices=config.num_devices)


def score_curriculum(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, dict]]:
  """`config.downstream`: fine-tune every phase's final checkpoint and the merge on the embedded tasks, print the
  table and keep it in `<workdir>/downstream.json` (a finished table is printed again, not recomputed)."""
  d = config.downstream
  root = fs.path(workdir, "workdir")
  out = root / "downstream.json"
  if out.exists():
    results = json.loads(out.read_text())["tasks"]
  else:
    names = curriculum_checkpoints(config)
    settings = curriculum_settings(config)
    t0 = time.time()
    tokenizer = str(fs.path(config.data.data_dir, "config.data.data_dir") / "tokenizer.model")
    results = score(
      [str(root / n) for n in names],
      [tasks_lib.embedded(t) for t in d.tasks],
      settings,
      tokenizer=tokenizer,
      names=names,
      log=_progress,
      random_init=d.get("random_init", True),
    )
    _progress(f"downstream: {len(names)} checkpoints × {len(d.tasks)} tasks in {time.time() - t0:.0f}s")
    write_json(str(out), results, settings, {n: str(root / n) for n in names})
  print(format_table(results), flush=True)
  return results


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  # Defined only when run as a program: the demo imports this module next to main's own flags.
  flags.DEFINE_string("task", None, f"{' | '.join(tasks_lib.EMBEDDED)} | classification | retrieval")
  flags.DEFINE_list("checkpoint", [], "Workdirs, checkpoints/ or checkpoints/<step> dirs, or transformers dirs.")
  flags.DEFINE_string("out", None, "JSON file for the results (must not exist).")
  flags.DEFINE_string(
    "train", None, "classification/retrieval: training file (.jsonl, .parquet, .tsv or tfds:NAME:SPLIT)."
  )
  flags.DEFINE_string("test", None, "classification/retrieval: test file, same formats.")
  flags.DEFINE_string("text_key", "text", "Column of the text (retrieval: the query).")
  flags.DEFINE_string("pair_key", "", "Column of the second text (classification) or of the positive (retrieval).")
  flags.DEFINE_string("label_key", "label", "classification: column of the label.")
  flags.DEFINE_list(
    "label_names", [], "classification: the classes in order; integer labels i name the i-th (e.g. XNLI's 0, 1, 2)."
  )
  flags.DEFINE_string("lang_key", "", "Column of the language, for per-language results.")
  flags.DEFINE_string("lang", "und", "The language of every row when there is no --lang_key.")
  flags.DEFINE_string("tfds_data_dir", None, "data_dir of TFDS datasets already prepared on disk.")
  flags.DEFINE_string("dev", None, "classification: dev file (same formats), for the learning-rate sweep.")
  flags.DEFINE_string(
    "mteb", None, "retrieval: an MTEB / BEIR directory (corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv)."
  )
  flags.DEFINE_list("lrs", [], "Learning rates to sweep (best on dev, reported on test); default: --lr alone.")
  flags.DEFINE_list("seeds", [], "Seeds to average over; default: --seed alone.")
  flags.DEFINE_list("train_languages", [], "Train only on these languages (cross-lingual transfer).")
  flags.DEFINE_string("tokenizer", None, "Tokenizer for every checkpoint (default: each checkpoint's own).")
  flags.DEFINE_integer("epochs", Settings.epochs, "Passes over the training data (0: by model size).")
  flags.DEFINE_integer("batch_size", Settings.batch_size, "Training rows per step.")
  flags.DEFINE_integer("max_len", Settings.max_len, "Tokens per text.")
  flags.DEFINE_float("lr", Settings.peak_lr, "Peak learning rate (0: by model size, Settings.for_model).")
  flags.DEFINE_float("weight_decay", Settings.weight_decay, "Decoupled weight decay per step at peak LR.")
  flags.DEFINE_string("optimizer", Settings.optimizer, "adamw | stable_adamw.")
  flags.DEFINE_string("pooling", Settings.pooling, "mean | cls.")
  flags.DEFINE_float("dropout", Settings.dropout, "Dropout before the classification layer.")
  flags.DEFINE_float("temperature", Settings.temperature, "InfoNCE temperature.")
  flags.DEFINE_integer("seed", Settings.seed, "Seed of the head, the example order and dropout.")
  flags.DEFINE_bool(
    "random_init", True, "Also score the first checkpoint's architecture with random weights (row 'random init')."
  )


def _task_from_flags() -> tasks_lib.Task:
  if FLAGS.task in tasks_lib.EMBEDDED:
    return tasks_lib.embedded(FLAGS.task)
  if FLAGS.task not in tasks_lib.KINDS:
    raise app.UsageError(f"--task must be one of {', '.join(tasks_lib.EMBEDDED + tasks_lib.KINDS)}")
  if FLAGS.mteb:
    if FLAGS.task != "retrieval":
      raise app.UsageError("--mteb is a retrieval dataset: use it with --task=retrieval")
    return tasks_lib.from_mteb(FLAGS.mteb)
  if not FLAGS.train or not FLAGS.test:
    raise app.UsageError(f"--task={FLAGS.task} needs --train and --test (or --mteb=DIR)")
  columns = tasks_lib.Columns(
    text=FLAGS.text_key,
    pair=FLAGS.pair_key,
    label=FLAGS.label_key,
    lang=FLAGS.lang_key,
    default_lang=FLAGS.lang,
    label_names=tuple(FLAGS.label_names),
  )
  return tasks_lib.from_files(
    FLAGS.task, FLAGS.train, FLAGS.test, columns, tfds_data_dir=FLAGS.tfds_data_dir, dev=FLAGS.dev
  )


def main(argv):
  cli.start(argv)
  if not FLAGS.task or not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError("--task, --checkpoint and --out are required")
  try:
    out = fs.path(FLAGS.out, "--out")
  except ValueError as e:
    raise cli.ConfigError(str(e)) from None
  if out.exists():
    raise cli.ConfigError(f"--out={FLAGS.out} exists; choose a new --out")
  settings = Settings(
    epochs=FLAGS.epochs,
    batch_size=FLAGS.batch_size,
    max_len=FLAGS.max_len,
    peak_lr=FLAGS.lr,
    weight_decay=FLAGS.weight_decay,
    optimizer=FLAGS.optimizer,
    pooling=FLAGS.pooling,
    dropout=FLAGS.dropout,
    temperature=FLAGS.temperature,
    seed=FLAGS.seed,
  )
  try:
    task = _task_from_flags().train_on(FLAGS.train_languages)
    try:
      lrs, seeds = [float(x) for x in FLAGS.lrs], [int(x) for x in FLAGS.seeds]
    except ValueError:
      raise ValueError(f"--lrs={','.join(FLAGS.lrs)} / --seeds={','.join(FLAGS.seeds)}: expected numbers") from None
    results = score(
      FLAGS.checkpoint,
      [task],
      settings,
      FLAGS.tokenizer,
      log=_progress,
      random_init=FLAGS.random_init,
      lrs=lrs,
      seeds=seeds,
    )
  except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
    cli.fail(e)
  write_json(FLAGS.out, results, settings, dict(zip(FLAGS.checkpoint, FLAGS.checkpoint)))
  print(format_table(results))
  if len(task.languages) > 1:
    print(format_language_table(results[task.name], METRICS[task.kind][0]))
  print(f"results: {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main, define_flags)
