"""Export any checkpoint as a transformers `ModernBertForMaskedLM` directory.

  python -m mmbert_jax.export --checkpoint=RUN/decay_all --out=hf/mmbert-decay-all [--tokenizer=tokenizer.model]

The config carries the checkpoint's phase values (RoPE theta, window, special ids). The SentencePiece tokenizer
(from --tokenizer, or the run's data directory) is copied and, when `transformers` is installed, also written as a
fast tokenizer (same ids, `<bos> text <eos>` as in training) so `AutoTokenizer` and sentence-transformers load the
directory directly. An output directory that already holds any of these files is refused. Checkpoint, tokenizer and
output may be local or `gs://` (a bucket output is written locally and uploaded when complete).
"""

from __future__ import annotations

import json

from absl import app, flags
from etils import epath

from data_pipeline import filesystem as fs
from data_pipeline import tokenizer as tokenizer_lib
from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import cli, hf, storage

FLAGS = flags.FLAGS

TOKENIZER_FILE = "tokenizer.model"
# Files a finished export holds: an output directory with any of them is refused rather than overwritten.
OUTPUT_FILES = (
  hf.CONFIG_FILE,
  hf.WEIGHTS_FILE,
  hf.WEIGHTS_INDEX_FILE,
  TOKENIZER_FILE,
  "tokenizer.json",
  "tokenizer_config.json",
)


def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "A workdir, its checkpoints/ dir or one checkpoints/<step> dir.")
  flags.DEFINE_string("out", None, "Output directory (must not hold a model yet).")
  flags.DEFINE_string(
    "tokenizer", None, "SentencePiece model to ship (default: <data_dir>/tokenizer.model of the run)."
  )


def check_new_output(out: str | epath.Path, key: str = "--out") -> None:
  """Raises FileExistsError if `out` already holds (part of) an exported model (ValueError: not a usable path)."""
  out = fs.path(out, key)
  for name in OUTPUT_FILES:
    if (out / name).exists():
      raise FileExistsError(f"{out / name} exists; choose a new output directory")


def _run_tokenizer(meta: dict) -> str | None:
  """The run's `<data_dir>/tokenizer.model` (local or gs://), if it is there."""
  try:
    data_dir = json.loads(meta.get("config", "{}"))["data"]["data_dir"]
    path = fs.path(data_dir, "config.data.data_dir") / TOKENIZER_FILE if data_dir else None
  except (KeyError, TypeError, ValueError):
    return None
  return str(path) if path is not None and path.exists() else None


def fast_tokenizer(spm_path: str, cfg):
  """The (local) SentencePiece model as a transformers fast tokenizer that frames text as `<bos> text <eos>`, like the
  training sequences; None without `transformers`. Vocabulary, merges (BPE) or scores (unigram), byte fallback and
  normalization come from the model file, as when transformers converts a bare `tokenizer.model`."""
  try:  # transformers and tokenizers: heavy, and only in the `test` extra
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter
  except ImportError:
    return None
  tokenizer_lib.load_tokenizer(spm_path, tokenizer_lib.SpecialIds.from_model_config(cfg))  # ids as the model's
  extractor = SentencePieceExtractor(spm_path)
  pieces = extractor.extract(None)  # None: the model type (BPE or unigram) recorded in the file
  backend = SpmConverter.build_tokenizer_from_spm_proto(extractor.proto, pieces["vocab"], pieces.get("merges"))
  names = [p.piece for p in extractor.proto.pieces]
  bos, eos = names[cfg.bos_id], names[cfg.eos_id]
  backend.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}", special_tokens=[(bos, cfg.bos_id), (eos, cfg.eos_id)]
  )
  return PreTrainedTokenizerFast(
    tokenizer_object=backend,
    pad_token=names[cfg.pad_id],
    eos_token=eos,
    bos_token=bos,
    unk_token=names[cfg.unk_id],
    mask_token=names[cfg.mask_id],
    cls_token=bos,
    sep_token=eos,
    model_max_length=cfg.max_position_embeddings,
  )


def export(checkpoint: str, out: str, tokenizer: str | None = None) -> str:
  """Writes `checkpoint` to `out` as a ModernBertForMaskedLM directory with its tokenizer; returns 'dir/step'."""
  check_new_output(out)
  out = fs.path(out, "--out")
  if tokenizer and not fs.path(tokenizer, "--tokenizer").exists():
    raise FileNotFoundError(f"--tokenizer {tokenizer} does not exist")
  model, meta, source = ckpt_lib.load_model(checkpoint)
  spm = tokenizer or _run_tokenizer(meta)
  spm_path = fs.local_copy(fs.path(spm, "--tokenizer")) if spm else None
  # Converted before anything is written: a tokenizer that cannot be converted leaves no half-written directory.
  fast = fast_tokenizer(spm_path, model.config) if spm_path else None
  try:
    with fs.staged_dir(out) as local:  # the files appear once all are written; a failure removes them
      hf.write_local(model, local)
      if spm_path:
        epath.Path(spm_path).copy(epath.Path(local) / TOKENIZER_FILE, overwrite=True)
      if fast is not None:
        fast.save_pretrained(local)
  except Exception as e:  # safetensors reports a full disk in its own error type
    if storage.is_storage_error(e):
      raise storage.write_error("writing the export", str(out), e) from e
    raise
  return source


def main(argv):
  cli.start(argv)
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError("--checkpoint and --out are required")
  try:
    source = export(FLAGS.checkpoint, FLAGS.out, FLAGS.tokenizer)
  except (ckpt_lib.CheckpointError, ValueError, FileExistsError, FileNotFoundError) as e:  # bad input: one line
    cli.fail(e)
  print(f"exported {source} → {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main, define_flags)
