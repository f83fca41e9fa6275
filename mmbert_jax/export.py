"""Export any checkpoint as a transformers `ModernBertForMaskedLM` directory.

  python -m mmbert_jax.export --checkpoint=RUN/decay_all --out=hf/mmbert-decay-all [--tokenizer=tokenizer.model]

The config carries the checkpoint's phase values (RoPE theta, window, special ids). The SentencePiece tokenizer
(from --tokenizer, or the run's data directory) is copied and, when `tokenizers`/`transformers` are installed,
also written as a fast tokenizer so `AutoTokenizer` and sentence-transformers load the directory directly.
"""
from __future__ import annotations

import json
import os
import shutil

from absl import app, flags

from mmbert_jax import checkpoint as ckpt_lib
from mmbert_jax import hf

flags.DEFINE_string("checkpoint", None, "A workdir, its checkpoints/ dir or one checkpoints/<step> dir.")
flags.DEFINE_string("out", None, "Output directory (must not hold a model yet).")
flags.DEFINE_string("tokenizer", None, "SentencePiece model to ship (default: <data_dir>/tokenizer.model of the run).")
FLAGS = flags.FLAGS

TOKENIZER_FILE = "tokenizer.model"


def _run_tokenizer(meta: dict) -> str | None:
  try:
    data_dir = json.loads(meta.get("config", "{}"))["data"]["data_dir"]
  except (KeyError, TypeError, ValueError):
    return None
  path = os.path.join(data_dir, TOKENIZER_FILE)
  return path if data_dir and os.path.exists(path) else None


def write_tokenizer(spm_path: str, out: str, cfg) -> None:
  """Copies the SentencePiece model and writes a transformers fast tokenizer with the model's special ids."""
  shutil.copy(spm_path, os.path.join(out, TOKENIZER_FILE))
  try:
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter
  except ImportError:
    return
  sp = spm.SentencePieceProcessor(model_file=spm_path)
  piece = sp.id_to_piece

  class _Slow:  # the minimal slow-tokenizer surface SpmConverter reads
    vocab_file = spm_path
    handle_byte_fallback = True

  fast = PreTrainedTokenizerFast(
      tokenizer_object=SpmConverter(_Slow()).converted(),
      pad_token=piece(cfg.pad_id), eos_token=piece(cfg.eos_id), bos_token=piece(cfg.bos_id),
      unk_token=piece(cfg.unk_id), mask_token=piece(cfg.mask_id), cls_token=piece(cfg.eos_id),
      sep_token=piece(cfg.eos_id), model_max_length=cfg.max_position_embeddings)
  fast.save_pretrained(out)


def export(checkpoint: str, out: str, tokenizer: str | None = None) -> str:
  model, meta, source = ckpt_lib.load_model(checkpoint)
  hf.save(model, out)
  spm_path = tokenizer or _run_tokenizer(meta)
  if tokenizer and not os.path.exists(tokenizer):
    raise FileNotFoundError(f"--tokenizer {tokenizer} does not exist")
  if spm_path:
    write_tokenizer(spm_path, out, model.config)
  return source


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError("--checkpoint and --out are required")
  source = export(FLAGS.checkpoint, FLAGS.out, FLAGS.tokenizer)
  print(f"exported {source} → {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
