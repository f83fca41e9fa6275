"""A real multilingual demo corpus, built at run time from the Unicode CLDR locale data that ships with babel.

CLDR holds, for ~300 languages, the names of languages, territories, scripts, currencies, months and weekdays
written in that language, plus the language's own rules for dates, numbers, currencies, units and lists ("A, B und
C"). Documents here are sentences assembled from those: localized lists of names, full dates, amounts and
measurements — genuine text in each language's script and morphology (Faroese `fo`, Tigrinya `ti`, …), needing no
download. Nothing is stored in the repository: the text is generated deterministically from (language, seed).

Languages get more documents the richer their CLDR data and the higher their tier, so the corpus is skewed like
real web data and the temperature of a mixture matters:

  demo-pretrain  12 high-resource languages                      (like mmBERT's 60-language phase 1)
  demo-mid       + 24 mid-resource languages = 36                 (phase 2)
  demo-decay     every language in the data (~280)                (phase 3, Decay-All)

  python -m data_pipeline.demo_corpus --data_dir /tmp/mmbert_demo           # text → tokenizer → shards
"""

from __future__ import annotations

import datetime
import functools
import os
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
from babel import Locale, UnknownLocaleError, dates, lists, localedata, numbers, units

from data_pipeline import cli, mixture
from data_pipeline import filesystem as fs
from data_pipeline import prepare as prepare_lib
from data_pipeline import tokenizer as tokenizer_lib

PRETRAIN, MID_ADDED = mixture.DEMO_PRETRAIN, mixture.DEMO_MID_ADDED
LANGUAGE_SETS = mixture.DEMO_LANGUAGE_SETS
TIER_DOCUMENTS = (1000, 250, 50)  # documents per language at scale 1: pretrain tier, mid tier, the rest
_UNITS = (
  "length-kilometer",
  "length-meter",
  "mass-kilogram",
  "duration-hour",
  "duration-day",
  "temperature-celsius",
  "volume-liter",
  "speed-kilometer-per-hour",
)
_CURRENCIES = ("EUR", "USD", "JPY", "INR", "BRL", "GBP", "CNY", "ZAR", "DKK", "ERN")


@functools.cache
def _vocabulary(lang: str) -> dict[str, tuple[str, ...]]:
  """The localized names CLDR has for `lang`, by category."""
  loc = Locale.parse(lang)
  cats = {
    "languages": loc.languages.values(),
    "territories": loc.territories.values(),
    "scripts": loc.scripts.values(),
    "currencies": loc.currencies.values(),
    "months": loc.months["format"]["wide"].values(),
    "days": loc.days["format"]["wide"].values(),
  }
  return {k: tuple(sorted(set(v))) for k, v in cats.items() if len(set(v)) >= 2}


@functools.cache
def available_languages() -> tuple[str, ...]:
  """Base CLDR locales (no region) with real localized month names, i.e. more than the root fallbacks."""
  out = []
  for lang in localedata.locale_identifiers():
    if "_" in lang or lang == "root":
      continue
    try:
      months = Locale.parse(lang).months["format"]["wide"]
    except (UnknownLocaleError, KeyError):
      continue
    if months and months.get(1) != "M01":
      out.append(lang)
  return tuple(sorted(out))


def _richness(lang: str) -> float:
  return min(1.0, sum(len(v) for v in _vocabulary(lang).values()) / 600)


def documents_for(lang: str, scale: float = 1.0) -> int:
  """How many documents `lang` gets: its tier's base count, scaled by how much CLDR data it has (0.5–1.5×)."""
  tier = 0 if lang in PRETRAIN else 1 if lang in MID_ADDED else 2
  return max(2, round(TIER_DOCUMENTS[tier] * scale * (0.5 + _richness(lang))))


def _sentence(loc: Locale, vocab: dict[str, tuple[str, ...]], rng: np.random.Generator) -> str:
  kind = rng.choice(4, p=[0.5, 0.2, 0.15, 0.15]) if vocab else rng.choice([1, 2, 3])
  if kind == 0:
    cat = vocab[list(vocab)[rng.integers(len(vocab))]]
    k = int(rng.integers(2, min(7, len(cat) + 1)))
    items = [cat[i] for i in rng.choice(len(cat), size=k, replace=False)]
    return lists.format_list(items, locale=loc)
  if kind == 1:
    day = datetime.date(1900, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 60_000)))
    return dates.format_date(day, format=("full", "long", "medium")[rng.integers(3)], locale=loc)
  if kind == 2:
    amount = round(float(rng.lognormal(4, 2)), 2)
    if rng.random() < 0.5:
      return numbers.format_currency(amount, _CURRENCIES[rng.integers(len(_CURRENCIES))], locale=loc)
    return numbers.format_decimal(amount, locale=loc)
  unit = _UNITS[rng.integers(len(_UNITS))]
  text = units.format_unit(int(rng.integers(1, 1000)), unit, locale=loc)
  return text if unit not in text else numbers.format_decimal(int(rng.integers(1, 10**6)), locale=loc)


def documents(lang: str, n: int, seed: int = 0) -> Iterator[str]:
  """`n` documents of 3–15 sentences in `lang`, deterministic in (lang, seed)."""
  loc, vocab = Locale.parse(lang), _vocabulary(lang)
  rng = np.random.default_rng([seed, zlib.crc32(lang.encode())])
  for _ in range(n):
    yield " ".join(_sentence(loc, vocab, rng) + "." for _ in range(int(rng.integers(3, 16))))


def resolve(languages: Sequence[str] | str | None) -> tuple[str, ...]:
  """Language codes from a list, a demo set name or None (all available)."""
  if isinstance(languages, str):
    if languages not in LANGUAGE_SETS:
      raise ValueError(f"unknown demo language set {languages!r}; known: {', '.join(LANGUAGE_SETS)}")
    languages = LANGUAGE_SETS[languages]
  avail = available_languages()
  if languages is None:
    return avail
  unknown = [l for l in languages if l not in avail]
  if unknown:
    raise ValueError(
      f"no CLDR data for demo languages {', '.join(unknown)} (babel has {len(avail)}, e.g. {', '.join(avail[:12])}, …)"
    )
  return tuple(languages)


def write_corpus(
  raw_dir: str | os.PathLike, languages: Sequence[str] | str | None = None, scale: float = 1.0, seed: int = 0
) -> dict[str, str]:
  """Writes `<raw_dir>/<lang>.txt` (a document per line; local or gs://) and returns {lang: path}; existing files
  are kept."""
  raw = fs.path(raw_dir, "data_dir")
  raw.mkdir(parents=True, exist_ok=True)
  paths = {}
  for lang in resolve(languages):
    path = raw / f"{lang}.txt"
    if not path.exists():
      fs.write_text(path, "".join(doc + "\n" for doc in documents(lang, documents_for(lang, scale), seed)))
    paths[lang] = os.fspath(path)
  return paths


def prepare_demo(
  data_dir: str,
  *,
  languages: Sequence[str] | str | None = None,
  scale: float = 1.0,
  vocab_size: int = 2000,
  max_len: int = 1024,
  eval_documents: int = 20,
  num_workers: int = 0,
  character_coverage: float = 0.99,
  seed: int = 0,
  progress: bool = True,
) -> dict:
  """End to end into `data_dir` (local or gs://): corpus text (in `_raw/`), a SentencePiece tokenizer, shards and
  stats.json."""
  out = fs.path(data_dir, "data_dir")
  paths = write_corpus(out / "_raw", languages, scale, seed)
  tok_path = out / "tokenizer.model"
  if not tok_path.exists():
    # Tokenizer text: at most 200 documents per language, so small languages still get their characters.
    sample = []
    for path in paths.values():
      with fs.path(path).open("r", encoding="utf-8") as f:
        sample += [line.rstrip("\n") for _, line in zip(range(200), f)]
    tokenizer_lib.train_sentencepiece(
      os.fspath(out / "tokenizer"),
      vocab_size=vocab_size,
      sentences=sample,
      seed=seed,
      character_coverage=character_coverage,
    )
  source = prepare_lib.Source(format="text", path=os.fspath(out / "_raw"))
  settings = prepare_lib.Settings(os.fspath(tok_path), max_len=max_len, eval_documents=eval_documents)
  return prepare_lib.prepare(source, out, settings, num_workers=num_workers, progress=progress)


def prepare_for_run(
  workdir: str, *, languages: Sequence[str] | str | None, scale: float, vocab_size: int, seq_len: int
) -> str:
  """The demo run's data in `<workdir>/data`, built on the first call and reused after; returns that directory."""
  data_dir = os.fspath(fs.path(workdir, "workdir") / "data")
  prepare_demo(
    data_dir, languages=languages, scale=scale, vocab_size=vocab_size, max_len=max(seq_len, 256), progress=False
  )
  return data_dir


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog="python -m data_pipeline.demo_corpus", description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--languages", default="demo-decay", help="a demo set name or comma-separated codes")
  parser.add_argument("--scale", type=float, default=1.0, help="multiplies the documents per language")
  parser.add_argument("--vocab_size", type=int, default=2000)
  parser.add_argument("--max_len", type=int, default=1024)
  parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
  args = parser.parse_args(argv)
  langs = args.languages if args.languages in LANGUAGE_SETS else args.languages.split(",")
  try:
    stats = prepare_demo(
      args.data_dir,
      languages=langs,
      scale=args.scale,
      vocab_size=args.vocab_size,
      max_len=args.max_len,
      num_workers=args.num_workers,
    )
  except (ValueError, FileNotFoundError) as e:
    cli.fail(cli.error_line(e))
  except OSError as e:  # a read-only or full disk
    cli.fail(cli.error_line(e), cli.EXIT_FAILED)
  t = stats["totals"]["train"]
  print(f"{len(stats['languages'])} languages, {t['documents']:,} documents, {t['tokens']:,} tokens → {args.data_dir}")


if __name__ == "__main__":
  main()
