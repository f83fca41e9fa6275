"""Tokenizer loading, special-id checks and SentencePiece training."""

import os

import pytest
import sentencepiece as spm

from data_pipeline import tokenizer as tokenizer_lib

TEXTS = [f"{w} wörld {i} Привет мир {i * 7} 你好 ሰላም" for i in range(400) for w in ("hello", "hallo", "salut")]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("spm") / "tok")
  return tokenizer_lib.train_sentencepiece(prefix, vocab_size=320, sentences=TEXTS)


def test_trained_model_has_the_model_config_ids(spm_model):
  tok = tokenizer_lib.load_tokenizer(spm_model)
  # Independent read of the model file with sentencepiece itself.
  sp = spm.SentencePieceProcessor(model_file=spm_model)
  assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id(), sp.piece_to_id("<mask>")) == (0, 1, 2, 3, 4)
  assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
  assert tok.special_ids() == {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}
  assert tok.vocab_size == 320


def test_encode_adds_no_specials_and_round_trips(spm_model):
  tok = tokenizer_lib.load_tokenizer(spm_model)
  text = "hallo wörld 12  Привет  ሰላም ☃"  # double spaces and an unseen character (byte fallback)
  ids = tok.encode([text])[0]
  assert min(ids) > 4
  assert tok.decode(ids) == text


def test_model_config_ids_are_what_is_checked(spm_model):
  class Cfg:  # the fields mmbert_jax.ModelConfig has
    pad_id, eos_id, bos_id, unk_id, mask_id = 0, 1, 2, 3, 4

  tokenizer_lib.load_tokenizer(spm_model, tokenizer_lib.SpecialIds.from_model_config(Cfg))
  Cfg.mask_id = 7
  with pytest.raises(ValueError, match=r"mask id is 4 \(<mask>\), the model config expects mask id 7"):
    tokenizer_lib.load_tokenizer(spm_model, tokenizer_lib.SpecialIds.from_model_config(Cfg))


def test_sentencepiece_defaults_are_rejected_with_both_ids(tmp_path):
  # SentencePiece's own defaults: unk 0, bos 1, eos 2, no pad.
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(TEXTS),
    model_prefix=str(tmp_path / "d"),
    vocab_size=300,
    pad_id=3,
    user_defined_symbols=["<mask>"],
    minloglevel=2,
  )
  with pytest.raises(ValueError) as e:
    tokenizer_lib.load_tokenizer(str(tmp_path / "d.model"))
  msg = str(e.value)
  assert "\n" not in msg and "pad id is 3" in msg and "expects pad id 0" in msg


def test_missing_and_invalid_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tokenizer_lib.load_tokenizer(str(bad))


def _hf_tokenizer(path, specials):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
  tok.save(str(path))
  return str(path)


def test_hf_tokenizer_json(tmp_path):
  good = _hf_tokenizer(tmp_path / "tokenizer.json", ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
  tok = tokenizer_lib.load_tokenizer(good)
  assert tok.kind == "tokenizers" and tok.special_ids()["mask"] == 4
  ids = tok.encode(["hello wörld"])[0]
  assert ids and min(ids) > 4
  swapped = _hf_tokenizer(tmp_path / "swapped.json", ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"])
  with pytest.raises(ValueError, match=r"eos id is 2 \(<eos>\), the model config expects eos id 1"):
    tokenizer_lib.load_tokenizer(swapped)


def test_train_command(tmp_path, capsys):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(TEXTS), encoding="utf-8")
  tokenizer_lib.main(["train", "--input", str(corpus), "--model_prefix", str(tmp_path / "cli"), "--vocab_size", "300"])
  assert os.path.exists(tmp_path / "cli.model")
  assert "'mask': 4" in capsys.readouterr().out
  tokenizer_lib.main(["check", str(tmp_path / "cli.model"), "--text", "hello"])
  assert "hello" in capsys.readouterr().out


def test_training_is_deterministic(tmp_path, spm_model):
  again = tokenizer_lib.train_sentencepiece(str(tmp_path / "again"), vocab_size=320, sentences=TEXTS)
  with open(spm_model, "rb") as a, open(again, "rb") as b:
    assert a.read() == b.read()
