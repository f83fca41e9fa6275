"""Tokenizers: load one, check its special ids against the model config, or train a SentencePiece model.

mmBERT uses Gemma 2's SentencePiece model (256k pieces) with `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3 and
`<mask>`=4; the model config (`mmbert_jax.ModelConfig.{pad,eos,bos,unk,mask}_id`) expects exactly those ids, so
every tokenizer is checked on load. Two file kinds are read:

  *.model  a SentencePiece model (e.g. Gemma 2's `tokenizer.model`)
  *.json   a Hugging Face `tokenizer.json`, through the `tokenizers` library

Command line:

  python -m data_pipeline.tokenizer train --input corpus.txt --model_prefix out/spm --vocab_size 32000
  python -m data_pipeline.tokenizer check out/spm.model --text "Hello world"
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

import sentencepiece as spm

from data_pipeline import cli
from data_pipeline import filesystem as fs


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The special token ids a model expects (defaults: mmBERT / Gemma 2)."""

  pad: int = 0
  eos: int = 1
  bos: int = 2
  unk: int = 3
  mask: int = 4

  @classmethod
  def from_model_config(cls, cfg: Any) -> SpecialIds:
    """From anything with `pad_id, eos_id, bos_id, unk_id, mask_id` (e.g. `mmbert_jax.ModelConfig`)."""
    return cls(pad=cfg.pad_id, eos=cfg.eos_id, bos=cfg.bos_id, unk=cfg.unk_id, mask=cfg.mask_id)

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


# The piece names carrying each special id (Gemma 2 spelling).
PIECES = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>", "mask": "<mask>"}


def file_sha256(path: str | os.PathLike) -> str:
  return hashlib.sha256(fs.path(path, "tokenizer").read_bytes()).hexdigest()


class Tokenizer:
  """A SentencePiece model or HF tokenizer.json. `encode` adds no special tokens; callers add <bos>/<eos>."""

  def __init__(self, path: str | os.PathLike):
    p = fs.path(path, "tokenizer")
    if not p.is_file():
      raise FileNotFoundError(
        f"tokenizer file {path} does not exist (expected a SentencePiece .model or a "
        "tokenizer.json; train one with `python -m data_pipeline.tokenizer train`)"
      )
    self.path = os.fspath(p)
    data = p.read_bytes()  # local or gs://: both libraries load from memory
    if self.path.endswith(".json"):
      import tokenizers  # only needed for this file kind

      self.kind = "tokenizers"
      self._hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
      self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
    else:
      self.kind = "sentencepiece"
      self._sp = spm.SentencePieceProcessor()
      try:
        self._sp.LoadFromSerializedProto(data)
      except (OSError, RuntimeError) as e:
        raise ValueError(f"tokenizer file {path} is not a SentencePiece model ({str(e).splitlines()[0]})") from None
      self.vocab_size = self._sp.GetPieceSize()
    self.sha256 = hashlib.sha256(data).hexdigest()

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def special_ids(self) -> dict[str, int | None]:
    """The id of each special piece in this tokenizer, None where it has none."""
    if self.kind == "tokenizers":
      return {name: self._hf.token_to_id(piece) for name, piece in PIECES.items()}
    sp = self._sp
    found = {"pad": sp.pad_id(), "eos": sp.eos_id(), "bos": sp.bos_id(), "unk": sp.unk_id()}
    found = {k: (v if v >= 0 else None) for k, v in found.items()}  # -1 = disabled in the model
    mask = sp.PieceToId(PIECES["mask"])
    found["mask"] = mask if sp.IdToPiece(mask) == PIECES["mask"] else None
    return found

  def check(self, expected: SpecialIds = SpecialIds()) -> Tokenizer:
    """Raises a one-line ValueError naming both ids at the first special id that differs from `expected`."""
    found = self.special_ids()
    for name, want in expected.as_dict().items():
      got = found[name]
      if got is None:
        raise ValueError(
          f"tokenizer {self.path}: has no {PIECES[name]} token; the model config expects {name} id {want}"
        )
      if got != want:
        raise ValueError(
          f"tokenizer {self.path}: {name} id is {got} ({PIECES[name]}), the model config expects {name} id {want}"
        )
    return self

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    if self.kind == "tokenizers":
      return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]
    return self._sp.Encode(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    return self._hf.decode(ids) if self.kind == "tokenizers" else self._sp.Decode(ids)

  def describe(self) -> dict[str, Any]:
    """What stats.json records about the tokenizer that produced the shards."""
    return {
      "path": self.path,
      "kind": self.kind,
      "vocab_size": self.vocab_size,
      "sha256": self.sha256,
      "special_ids": self.special_ids(),
    }


def load_tokenizer(path: str, expected: SpecialIds | None = SpecialIds()) -> Tokenizer:
  """Loads `path` and checks its special ids (pass `expected=None` to skip the check)."""
  tok = Tokenizer(path)
  return tok if expected is None else tok.check(expected)


def train_sentencepiece(
  model_prefix: str,
  *,
  vocab_size: int,
  input_files: Sequence[str] = (),
  sentences: Iterable[str] | None = None,
  model_type: str = "bpe",
  character_coverage: float = 0.9995,
  byte_fallback: bool = True,
  input_sentence_size: int = 10_000_000,
  num_threads: int = os.cpu_count() or 1,
  seed: int = 0,
  **extra: Any,
) -> str:
  """Trains a SentencePiece model with mmBERT's special ids and returns the path of `<model_prefix>.model`.

  Input is text files (one sentence / document per line) or an iterable of strings. Gemma-style settings: BPE,
  byte fallback (no unknown characters), digits split, no normalization. Extra keyword arguments go to the trainer
  unchanged.
  """
  if not input_files and sentences is None:
    raise ValueError("train_sentencepiece needs input_files or sentences")
  inputs = [fs.path(f, "tokenizer training input") for f in input_files]
  for f in inputs:
    if not f.is_file():
      raise FileNotFoundError(f"tokenizer training input {f} does not exist")
  input_files = [fs.local_copy(f) for f in inputs]  # the trainer opens local files only
  path = fs.path(os.fspath(model_prefix) + ".model", "model_prefix")
  ids = SpecialIds()
  path.parent.mkdir(parents=True, exist_ok=True)
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  kwargs = dict(
    model_writer=model,
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=character_coverage,
    byte_fallback=byte_fallback,
    split_digits=True,
    input_sentence_size=input_sentence_size,
    # Gemma: text kept as is (no NFKC, whitespace preserved), so decode(encode(text)) == text.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    shuffle_input_sentence=True,
    num_threads=num_threads,
    minloglevel=2,
    pad_id=ids.pad,
    eos_id=ids.eos,
    bos_id=ids.bos,
    unk_id=ids.unk,
    pad_piece=PIECES["pad"],
    eos_piece=PIECES["eos"],
    bos_piece=PIECES["bos"],
    unk_piece=PIECES["unk"],
    user_defined_symbols=[PIECES["mask"]],
  )  # the first user-defined symbol takes the next free id: 4
  kwargs.update(extra)
  if input_files:
    spm.SentencePieceTrainer.Train(input=",".join(input_files), **kwargs)
  else:
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(sentences), **kwargs)
  if fs.is_remote(path):
    path.write_bytes(model.getvalue())  # an object is replaced whole
  else:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)  # local-only: the local branch
  load_tokenizer(path)  # the ids came out as requested
  return os.fspath(path)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog="python -m data_pipeline.tokenizer", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train a SentencePiece model with mmBERT's special ids")
  train.add_argument("--input", required=True, help="comma-separated text files, one sentence or document a line")
  train.add_argument("--model_prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
  train.add_argument("--vocab_size", type=int, required=True)
  train.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
  train.add_argument("--character_coverage", type=float, default=0.9995)
  train.add_argument("--input_sentence_size", type=int, default=10_000_000, help="lines sampled from the input")
  train.add_argument("--seed", type=int, default=0)
  check = sub.add_parser("check", help="load a tokenizer and check its special ids")
  check.add_argument("path")
  check.add_argument("--text", default=None, help="also print the pieces of this text")
  args = parser.parse_args(argv)
  try:
    _run(args)
  except (ValueError, FileNotFoundError) as e:  # bad input
    cli.fail(cli.error_line(e))
  except OSError as e:  # a read-only or full disk
    cli.fail(cli.error_line(e), cli.EXIT_FAILED)


def _run(args) -> None:
  if args.command == "train":
    path = train_sentencepiece(
      args.model_prefix,
      vocab_size=args.vocab_size,
      input_files=args.input.split(","),
      model_type=args.model_type,
      character_coverage=args.character_coverage,
      input_sentence_size=args.input_sentence_size,
      seed=args.seed,
    )
    print(f"wrote {path}")
  tok = load_tokenizer(path if args.command == "train" else args.path)
  print(f"{tok.path}: {tok.kind}, vocab {tok.vocab_size}, special ids {tok.special_ids()} (as expected)")
  if args.command == "check" and args.text is not None:
    ids = tok.encode([args.text])[0]
    print(ids, "→", repr(tok.decode(ids)))


if __name__ == "__main__":
  main()
