"""Language mixtures per training phase: p_l ∝ n_l^tau, with fixed source budgets and a cap on passes.

mmBERT's cascading annealed language learning (docs/RECIPE.md §6.2) samples language l with probability proportional
to n_l^tau, n_l = available tokens of l, tau = 0.7 → 0.5 → 0.3 over the three phases, while some sources get a
fixed share of the phase (§6.1). A phase here is a `PhaseSpec`:

  languages    names in the data, a named set (`LANGUAGE_SETS`, e.g. "mmbert-pretrain", "demo-mid"), or None = all
  tau          temperature exponent
  budgets      {name: token share} fixed shares taken off the top; the rest is tau-mixed. A name is a language
               (e.g. {"eng": 0.3}) or a prepare `--source` id (e.g. {"dclm": 0.302, "starcoder": 0.051}): a
               source's shards then form a component of their own, whatever their language, and leave the
               languages they were prepared under
  max_passes   with total_tokens (the phase length), cap every language at max_passes × n_l tokens and hand the
               excess to the uncapped languages (repeated until nothing exceeds its cap). The cap is per
               language, the recipe's "not more than about 5 epochs" of a language's data (docs/RECIPE.md §6.2);
               the training pipeline reads each language in whole passes, so its documents are read equally
               often, to one read (a 40-document language at a cap of 5: every document 5 times, or 6 for the 8
               documents of one visit; tests/test_pipeline.py::test_pass_cap_holds_per_document)

Weights are token shares p_l. Grain mixes documents, so `Mixture.doc_weights` divides by each language's mean
stored sequence length: sampling documents with those weights yields tokens in the proportions p_l.

  python -m data_pipeline.mixture --data_dir data/ --languages demo-mid --tau 0.5
  python -m data_pipeline.mixture --counts_csv language_counts.csv --column ext --tau 0.3 --languages mmbert-mid
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipeline import cli
from data_pipeline import filesystem as fs

_CODE_SCRIPT = re.compile(r"^([a-z]{2,3})_([A-Z][a-z]{3})$")  # FineWeb2's <ISO 639-3>_<ISO 15924>

# mmBERT's language sets (ISO 639-3; docs/RECIPE.md §6.2). `resolve_languages` maps a bare code to
# the data's `<code>_<Script>` name when the data holds exactly one script of it (FineWeb2 naming; other names
# such as `fao_Latn_removed` never match a bare code).
MMBERT_PRETRAIN = tuple(
  "afr arb azj ben bul ces cmn dan deu ekk ell eng fas fil fin fra gle glg guj heb hin hrv hun ind ita jpn kat "
  "kaz khk khm kor lit lvs mal mar mkd mya nld nob npi pbt pol por ron rus sin slk slv spa swe swh tam tel tha "
  "tur ukr urd vie xho zsm".split()
)
MMBERT_MID_ADDED = tuple(
  "als amh anp ars ary arz bel bew bod bos cat ceb ckb cym epo eus fry gla gmh gsw hat hif hye isl jav kan kir "
  "kmr lao lat ltz mlt mri mww nap nno nrm ory pan pcm plt rmy snd som srp tat tgk uzn yue".split()
)

LANGUAGE_SETS: dict[str, tuple[str, ...] | None] = {
  "mmbert-pretrain": MMBERT_PRETRAIN,
  "mmbert-mid": MMBERT_PRETRAIN + MMBERT_MID_ADDED,
  "all": None,
}

# The embedded demo corpus's sets (CLDR codes; `demo_corpus` writes their text).
DEMO_PRETRAIN = ("en", "de", "fr", "es", "it", "pt", "ru", "zh", "ja", "ar", "hi", "ko")
DEMO_MID_ADDED = (
  "nl",
  "pl",
  "tr",
  "vi",
  "id",
  "sv",
  "cs",
  "fa",
  "uk",
  "el",
  "he",
  "ro",
  "hu",
  "da",
  "fi",
  "th",
  "bn",
  "ta",
  "sw",
  "nb",
  "bg",
  "hr",
  "sk",
  "lt",
)
DEMO_LANGUAGE_SETS: dict[str, tuple[str, ...] | None] = {
  "demo-pretrain": DEMO_PRETRAIN,
  "demo-mid": DEMO_PRETRAIN + DEMO_MID_ADDED,
  "demo-decay": None,  # all languages in the data
}


def language_set(name: str) -> tuple[str, ...] | None:
  """A named language set; None means every language in the data."""
  sets = DEMO_LANGUAGE_SETS if name.startswith("demo-") else LANGUAGE_SETS
  if name not in sets:
    known = sorted(LANGUAGE_SETS) + list(DEMO_LANGUAGE_SETS)
    raise ValueError(f"unknown language set {name!r}; known sets: {', '.join(known)}")
  return sets[name]


def resolve_languages(
  requested: Sequence[str] | str | None,
  available: Sequence[str],
  what: str = "phase languages",
  where: str = "the data",
) -> tuple[str, ...]:
  """Maps the phase's languages onto the data's names, keeping the phase's order (sorted for None)."""
  if isinstance(requested, str):  # a set name, else comma-separated names
    is_set = requested in LANGUAGE_SETS or requested.startswith("demo-")
    requested = language_set(requested) if is_set else requested.split(",")
  if requested is None:
    return tuple(sorted(available))
  available = set(available)
  by_code: dict[str, list[str]] = {}
  for name in available:
    m = _CODE_SCRIPT.match(name)
    if m:
      by_code.setdefault(m.group(1), []).append(name)
  out, missing = [], []
  for lang in requested:
    if lang in available:
      out.append(lang)
    elif len(by_code.get(lang, ())) == 1:
      out.append(by_code[lang][0])
    elif len(by_code.get(lang, ())) > 1:
      raise ValueError(
        f"language {lang!r} is ambiguous in the data ({', '.join(sorted(by_code[lang]))}); name the script variant"
      )
    else:
      missing.append(lang)
  if missing:
    raise ValueError(
      f"{what} not in {where}: {', '.join(missing)} (the data has "
      f"{len(available)} languages: {', '.join(sorted(available)[:20])}"
      f"{', …' if len(available) > 20 else ''})"
    )
  if len(set(out)) != len(out):
    raise ValueError(f"phase lists a language twice: {out}")
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
  """Which languages a phase trains on and how they are weighted (see the module docstring)."""

  languages: tuple[str, ...] | str | None = None
  tau: float = 0.7
  budgets: Mapping[str, float] = dataclasses.field(default_factory=dict)
  max_passes: float | None = None
  total_tokens: float | None = None

  def __post_init__(self):
    if not 0.0 <= self.tau <= 1.0:
      raise ValueError(f"tau must be in [0, 1], got {self.tau}")
    if any(not 0.0 < v < 1.0 for v in self.budgets.values()):
      raise ValueError(f"budgets must be token shares in (0, 1), got {dict(self.budgets)}")
    if sum(self.budgets.values()) > 1.0 + 1e-9:
      raise ValueError(f"budgets add up to {sum(self.budgets.values()):.3f} > 1: {dict(self.budgets)}")
    if self.max_passes is not None and not self.total_tokens:
      raise ValueError(
        "max_passes needs total_tokens (the phase length in tokens) to know how often a language would be repeated"
      )
    if self.max_passes is not None and self.max_passes <= 0:
      raise ValueError(f"max_passes must be positive, got {self.max_passes}")


def temperature_weights(counts: Sequence[float], tau: float) -> np.ndarray:
  """p_l = n_l^tau / Σ n^tau (tau=1: proportional to the data, tau=0: uniform)."""
  n = np.asarray(counts, np.float64)
  if np.any(n <= 0):
    raise ValueError(f"every language needs a positive token count, got {n.tolist()}")
  w = np.exp(tau * (np.log(n) - np.log(n).max()))  # in log space: 1e12^0.7 is fine, but stay safe for any tau
  return w / w.sum()


@dataclasses.dataclass(frozen=True)
class Mixture:
  """A phase's weights per language, in `languages` order."""

  languages: tuple[str, ...]
  tokens: np.ndarray  # n_l: training tokens available
  sequences: np.ndarray  # stored sequences (documents after splitting at the prepare max length)
  weights: np.ndarray  # p_l: token share of the phase
  budgeted: tuple[str, ...]  # languages with a fixed share
  total_tokens: float | None = None

  @property
  def doc_weights(self) -> np.ndarray:
    """Per-sequence sampling weights that give token shares `weights` (p_l / mean sequence length)."""
    w = self.weights / (self.tokens / self.sequences)
    return w / w.sum()

  @property
  def passes(self) -> np.ndarray | None:
    """How many times the phase reads each language's data (needs total_tokens)."""
    return None if self.total_tokens is None else self.weights * self.total_tokens / self.tokens

  def table(self) -> str:
    share = self.tokens / self.tokens.sum()
    head = f"{'language':<14}{'tokens':>16}{'data share':>12}{'weight p_l':>12}{'× data':>9}"
    head += f"{'passes':>9}" if self.total_tokens else ""
    lines = [head, "-" * len(head)]
    for i in np.argsort(-self.weights, kind="stable"):
      line = (
        f"{self.languages[i] + ('*' if self.languages[i] in self.budgeted else ''):<14}"
        f"{int(self.tokens[i]):>16,}{share[i]:>12.5f}{self.weights[i]:>12.5f}{self.weights[i] / share[i]:>9.2f}"
      )
      if self.total_tokens:
        line += f"{self.passes[i]:>9.2f}"
      lines.append(line)
    lines.append(
      f"{len(self.languages)} languages, {int(self.tokens.sum()):,} tokens"
      + ("; * = fixed budget" if self.budgeted else "")
      + (f"; phase length {self.total_tokens:,.0f} tokens" if self.total_tokens else "")
    )
    return "\n".join(lines)


def compute_mixture(counts: Mapping[str, tuple[float, float] | float], spec: PhaseSpec) -> Mixture:
  """Weights for `spec` from {language: tokens} or {language: (tokens, sequences)} (see `counts_from_stats`)."""
  langs = list(resolve_languages(spec.languages, list(counts)))
  budgeted = resolve_languages(list(spec.budgets), list(counts)) if spec.budgets else ()
  budget_of = dict(zip(budgeted, spec.budgets.values()))
  langs += [b for b in budgeted if b not in langs]  # a budgeted source is part of the phase
  if not langs:
    raise ValueError("the phase has no languages")
  pairs = [counts[l] if isinstance(counts[l], (tuple, list)) else (counts[l], 1.0) for l in langs]
  tokens = np.array([p[0] for p in pairs], np.float64)
  sequences = np.array([p[1] for p in pairs], np.float64)
  empty = [l for l, n in zip(langs, tokens) if n <= 0]
  if empty:
    raise ValueError(f"phase languages without training tokens in the data: {', '.join(empty)}")

  fixed = np.array([l in budget_of for l in langs])
  p = np.array([budget_of.get(l, 0.0) for l in langs])
  free_mass = 1.0 - p.sum()
  if not (~fixed).any() and free_mass > 1e-9:
    raise ValueError(f"budgets cover every language but add up to {1 - free_mass:.3f}, not 1")
  cap = np.full(len(langs), np.inf) if spec.max_passes is None else spec.max_passes * tokens / spec.total_tokens
  over_budget = fixed & (p > cap * (1 + 1e-9))
  if over_budget.any():
    i = int(np.argmax(over_budget))
    raise ValueError(
      f"budget {p[i]} for {langs[i]} reads its data {p[i] * spec.total_tokens / tokens[i]:.2f} times, "
      f"more than max_passes={spec.max_passes}"
    )
  # Water-filling: tau-mix the free mass over uncapped languages; pin those above their cap; repeat.
  capped = fixed.copy()
  while (~capped).any():
    free = ~capped
    mass = 1.0 - p[capped].sum()
    p[free] = mass * temperature_weights(tokens[free], spec.tau)
    over = free & (p > cap)
    if not over.any():
      break
    p[over] = cap[over]
    capped |= over
  if abs(p.sum() - 1.0) > 1e-6:
    raise ValueError(
      f"max_passes={spec.max_passes} allows only {p.sum() * spec.total_tokens:,.0f} of the phase's "
      f"{spec.total_tokens:,.0f} tokens from these languages; raise max_passes or add data"
    )
  return Mixture(tuple(langs), tokens, sequences, p, tuple(budgeted), spec.total_tokens)


def components(stats: dict, budget_names: Sequence[str] = (), split: str = "train") -> dict[str, list[dict]]:
  """The mixture's components and their shards (stats.json entries): one per language, except that a budget name
  which is a prepare source (and no language) takes that source's shards out of their languages."""
  sources = {b for b in budget_names if b in stats.get("sources", {}) and b not in stats["languages"]}
  out: dict[str, list[dict]] = {}
  for lang, entry in stats["languages"].items():
    for shard in entry[split]["shards"]:
      source = shard.get("source")
      out.setdefault(source if source in sources else lang, []).append(shard)
  for name in sources:
    out.setdefault(name, [])
  return out


def counts_of(components: Mapping[str, Sequence[dict]]) -> dict[str, tuple[int, int]]:
  """{component: (tokens, sequences)} for components with tokens."""
  counts = {
    name: (sum(s["tokens"] for s in shards), sum(s["sequences"] for s in shards)) for name, shards in components.items()
  }
  return {name: c for name, c in counts.items() if c[0] > 0}


def load_stats(data_dir: str | os.PathLike) -> dict:
  """The stats.json of a prepared data directory (local or gs://)."""
  path = fs.path(data_dir, "data_dir") / "stats.json"
  if not path.exists():
    raise FileNotFoundError(
      f"{path} does not exist: run `python -m data_pipeline.prepare --output_dir {data_dir} "
      "...` first (a prepare run that did not finish writes no stats.json)"
    )
  return json.loads(path.read_text())


def counts_from_stats(stats: dict, budget_names: Sequence[str] = ()) -> dict[str, tuple[int, int]]:
  """{component: (train tokens, train sequences)} for components with training data (see `components`)."""
  return counts_of(components(stats, budget_names))


def counts_from_csv(path: str, column: str) -> dict[str, int]:
  """{language: tokens} from a CSV of token counts per language (mmBERT's published statistics), rows with 0 dropped."""
  rows = list(csv.DictReader(io.StringIO(fs.path(path, "--counts_csv").read_text(), newline="")))
  if not rows or column not in rows[0]:
    raise ValueError(f"{path} has no column {column!r}; columns: {list(rows[0]) if rows else []}")
  key = next(iter(rows[0]))
  return {r[key]: int(float(r[column])) for r in rows if float(r[column]) > 0}


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog="python -m data_pipeline.mixture", description=__doc__.split("\n")[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--data_dir", help="a prepared data directory (reads stats.json)")
  src.add_argument("--counts_csv", help="a CSV with a language column and token-count columns")
  parser.add_argument("--column", default="pretrain", help="token-count column of --counts_csv")
  parser.add_argument("--languages", default=None, help="comma-separated names or a named set; default: all")
  parser.add_argument("--tau", type=float, required=True)
  parser.add_argument("--budget", action="append", default=[], metavar="SOURCE=SHARE", help="fixed token share")
  parser.add_argument("--max_passes", type=float, default=None)
  parser.add_argument("--total_tokens", type=float, default=None, help="phase length in tokens")
  args = parser.parse_args(argv)
  try:
    budgets = {}
    for item in args.budget:
      name, _, share = item.partition("=")
      budgets[name] = float(share)
    counts = (
      counts_from_stats(load_stats(args.data_dir), list(budgets))
      if args.data_dir
      else counts_from_csv(args.counts_csv, args.column)
    )
    spec = PhaseSpec(args.languages, args.tau, budgets, args.max_passes, args.total_tokens)
    print(compute_mixture(counts, spec).table())
  except (ValueError, FileNotFoundError) as e:
    cli.fail(cli.error_line(e))


if __name__ == "__main__":
  main()
