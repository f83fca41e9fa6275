"""Phase mixtures: p_l ∝ n_l^tau, budgets, pass caps, language resolution."""

import dataclasses

import numpy as np
import pytest
from helpers import load_config

from data_pipeline import mixture
from mmbert_jax import train

# Token counts from mmBERT's published token counts per language (JHU-CLSP/mmBERT statistics): phase 1
# ("pretrain", tau 0.7) and phase 2 ("ext", tau 0.5) budgets of languages present in both.
PRETRAIN = {
  "rus": 115435806777,
  "deu": 87337285702,
  "spa": 89770162637,
  "jpn": 58625517493,
  "pol": 36514762641,
  "tur": 24911024070,
  "hin": 9995437569,
  "tel": 2085498015,
  "mya": 1836717720,
  "swh": 1278170699,
  "gle": 979857982,
  "xho": 189777311,
}
EXT = {
  "rus": 30190326374,
  "deu": 24675202916,
  "spa": 25154848362,
  "jpn": 18619210075,
  "pol": 13208941209,
  "tur": 10099775897,
  "hin": 5277666299,
  "tel": 1723380623,
  "mya": 1557739067,
  "swh": 1222882772,
  "gle": 1018631715,
  "xho": 375091632,
}
LANGS = sorted(PRETRAIN)


def _slope(x, y):
  return np.polyfit(np.log(x), np.log(y), 1)[0]


def test_formula_matches_numpy():
  n = np.array([1e3, 5e4, 2e6, 7e9])
  for tau in (0.0, 0.3, 0.5, 0.7, 1.0):
    expected = n**tau / np.sum(n**tau)
    np.testing.assert_allclose(mixture.temperature_weights(n, tau), expected, rtol=1e-12)
  m = mixture.compute_mixture({"a": 1e3, "b": 5e4, "c": 2e6}, mixture.PhaseSpec(None, tau=0.3))
  np.testing.assert_allclose(m.weights, np.array([1e3, 5e4, 2e6]) ** 0.3 / np.sum(np.array([1e3, 5e4, 2e6]) ** 0.3))


def test_log_log_slope_between_phases_is_the_tau_ratio_on_real_counts():
  counts = {l: EXT[l] for l in LANGS}
  p07 = mixture.compute_mixture(counts, mixture.PhaseSpec(LANGS, tau=0.7)).weights
  p05 = mixture.compute_mixture(counts, mixture.PhaseSpec(LANGS, tau=0.5)).weights
  p03 = mixture.compute_mixture(counts, mixture.PhaseSpec(LANGS, tau=0.3)).weights
  assert _slope(p05, p07) == pytest.approx(0.7 / 0.5, abs=1e-9)
  assert _slope(p05, p03) == pytest.approx(0.3 / 0.5, abs=1e-9)
  # The real phases show the same relation (docs/RECIPE.md §6.2: fitted 1.413 on all 59 languages).
  assert _slope([EXT[l] for l in LANGS], [PRETRAIN[l] for l in LANGS]) == pytest.approx(1.4, abs=0.05)


def test_reproduces_the_real_phase_1_mix_from_phase_2_counts():
  # Phase 2 sampled ∝ N^0.5, so N ∝ ext^2 (up to a constant); sampling N at tau 0.7 should give phase 1's budgets.
  source = {l: float(EXT[l]) ** 2 / 1e18 for l in LANGS}
  p = mixture.compute_mixture(source, mixture.PhaseSpec(LANGS, tau=0.7)).weights
  real = np.array([PRETRAIN[l] for l in LANGS], float)
  real /= real.sum()
  assert _slope(p, real) == pytest.approx(1.0, abs=0.03)
  assert np.corrcoef(np.log(p), np.log(real))[0, 1] ** 2 > 0.995


def test_budgets_are_fixed_and_the_rest_is_tau_mixed():
  counts = {"eng": 1e12, "code": 1e11, "deu": 4e10, "fao": 3e8, "tir": 1e8}
  m = mixture.compute_mixture(
    counts, mixture.PhaseSpec(("deu", "fao", "tir"), tau=0.5, budgets={"eng": 0.3, "code": 0.05})
  )
  w = dict(zip(m.languages, m.weights))
  assert set(m.languages) == set(counts) and w["eng"] == pytest.approx(0.3) and w["code"] == pytest.approx(0.05)
  rest = np.array([counts[l] for l in ("deu", "fao", "tir")]) ** 0.5
  np.testing.assert_allclose([w[l] for l in ("deu", "fao", "tir")], 0.65 * rest / rest.sum())
  assert sum(w.values()) == pytest.approx(1.0)


def test_pass_cap_water_filling():
  counts = {"big": 1e9, "mid": 1e8, "small": 1e6, "tiny": 1e5}
  total = 5e8
  m = mixture.compute_mixture(counts, mixture.PhaseSpec(None, tau=0.3, max_passes=3.0, total_tokens=total))
  n = m.tokens
  cap = 3.0 * n / total
  assert m.weights.sum() == pytest.approx(1.0)
  assert np.all(m.weights <= cap * (1 + 1e-9))
  capped = np.isclose(m.weights, cap)
  assert capped.any() and not capped.all()
  # Uncapped languages share one constant c = p / n^tau; a capped one would have wanted more than its cap.
  c = m.weights[~capped] / n[~capped] ** 0.3
  np.testing.assert_allclose(c, c[0])
  assert np.all(c[0] * n[capped] ** 0.3 >= cap[capped])
  assert np.all(m.passes <= 3.0 + 1e-9)


def test_pass_cap_that_cannot_be_met_is_an_error():
  with pytest.raises(ValueError, match="max_passes=1.0 allows only"):
    mixture.compute_mixture(
      {"a": 10.0, "b": 20.0}, mixture.PhaseSpec(None, tau=0.5, max_passes=1.0, total_tokens=100.0)
    )
  with pytest.raises(ValueError, match="needs total_tokens"):
    mixture.PhaseSpec(None, tau=0.5, max_passes=2.0)


def test_doc_weights_give_the_token_shares():
  m = mixture.compute_mixture({"a": (1000, 100), "b": (1000, 10), "c": (500, 50)}, mixture.PhaseSpec(None, 0.7))
  mean_len = m.tokens / m.sequences
  tokens_drawn = m.doc_weights * mean_len  # expected tokens per document drawn
  np.testing.assert_allclose(tokens_drawn / tokens_drawn.sum(), m.weights)


def test_language_resolution():
  data = ["rus_Cyrl", "deu_Latn", "srp_Cyrl", "srp_Latn", "fao_Latn"]
  assert mixture.resolve_languages(["rus", "deu_Latn"], data) == ("rus_Cyrl", "deu_Latn")
  assert mixture.resolve_languages(None, data) == tuple(sorted(data))
  with pytest.raises(ValueError, match="'srp' is ambiguous"):
    mixture.resolve_languages(["srp"], data)
  with pytest.raises(ValueError, match="phase languages not in the data: tir"):
    mixture.resolve_languages(["tir"], data)
  # A bare code means <code>_<Script> only: FineWeb2's *_removed subsets and other names never match it.
  assert mixture.resolve_languages(["fao"], data + ["fao_Latn_removed", "fao_web"]) == ("fao_Latn",)
  with pytest.raises(ValueError, match="phase languages not in the data: tir"):
    mixture.resolve_languages(["tir"], data + ["tir_Ethi_removed"])
  assert mixture.resolve_languages("fao,rus", data) == ("fao_Latn", "rus_Cyrl")
  with pytest.raises(ValueError, match="unknown language set 'demo-phase9'"):
    mixture.resolve_languages("demo-phase9", data)
  assert len(mixture.language_set("mmbert-pretrain")) == 60
  assert len(mixture.language_set("mmbert-mid")) == 109
  assert mixture.language_set("demo-pretrain")[0] == "en"


def test_command_prints_the_table(tmp_path, capsys):
  csv = tmp_path / "counts.csv"
  csv.write_text("language,pretrain,ext\n" + "".join(f"{l},{PRETRAIN[l]},{EXT[l]}\n" for l in LANGS) + "eng,5,0\n")
  mixture.main(["--counts_csv", str(csv), "--column", "ext", "--tau", "0.5", "--languages", "rus,xho"])
  out = capsys.readouterr().out
  p = np.sqrt([EXT["rus"], EXT["xho"]])
  p /= p.sum()
  assert f"{p[0]:.5f}" in out and f"{p[1]:.5f}" in out and "2 languages" in out
  with pytest.raises(SystemExit) as e:
    mixture.main(["--counts_csv", str(csv), "--column", "ext", "--tau", "0.5", "--languages", "fao"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith("error: phase languages not in the data: fao") and err.count("\n") == 1


def _csv_sized(seed=0):
  """Available tokens shaped like mmBERT's decay-all token counts: 1,832 languages from a few hundred
  tokens to 10^11 (log-uniform), plus English and code."""
  rng = np.random.default_rng(seed)
  names = sorted({"".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 3)) for _ in range(4000)} - {"eng"})
  counts = {f"{c}_Latn": float(n) for c, n in zip(names[:1832], np.exp(rng.uniform(np.log(200), np.log(1e11), 1832)))}
  return counts | {"eng_Latn": 1.5e12, "code": 3e11}


@pytest.mark.parametrize("variant", ["all", "cont"])
def test_decay_configs_cap_passes_on_csv_sized_inputs(variant):
  c = load_config("decay", f"{variant},base")
  counts = _csv_sized()
  if variant == "cont":  # the 110-language variant over the mid-training set: name 108 of the languages so
    counts = dict(list(counts.items())[:108]) | {"eng_Latn": 1.5e12, "code": 3e11}
  cfg = train.pipeline_config(c, 32)
  assert cfg.max_passes == 5.0 and cfg.total_tokens == 100e9 and cfg.num_streams == 32
  spec = dataclasses.replace(cfg.phase, languages=None)
  m = mixture.compute_mixture(counts, spec)
  w = dict(zip(m.languages, m.weights))
  assert len(m.languages) == len(counts) and m.weights.sum() == pytest.approx(1.0)
  assert w["eng_Latn"] == pytest.approx(c.data.budgets["eng"]) and w["code"] == pytest.approx(c.data.budgets["code"])
  assert m.passes.max() <= 5.0 * (1 + 1e-9)
  free = np.array([l not in ("eng_Latn", "code") for l in m.languages])
  capped = free & np.isclose(m.passes, 5.0)
  # The cap binds (without it small languages are read hundreds of times) ...
  uncapped = mixture.compute_mixture(counts, dataclasses.replace(spec, max_passes=None))
  assert uncapped.passes.max() > 100 and capped.sum() > 0
  # ... and the uncapped languages keep p ∝ n^0.3 among themselves, each wanting less than its cap.
  rest = free & ~capped
  k = m.weights[rest] / m.tokens[rest] ** 0.3
  np.testing.assert_allclose(k, k[0], rtol=1e-9)
  assert np.all(k[0] * m.tokens[capped] ** 0.3 >= 5.0 * m.tokens[capped] / 100e9 * (1 - 1e-9))


@pytest.mark.parametrize("phase", ["pretrain", "midtrain"])
def test_english_by_source_and_code_budgets(phase):
  """The configs' budgets on a stats.json with the recipe's sources: DCLM English as a source of its own, other
  English, code, and the phase's FineWeb2 languages (each of the 60 / 109 with a csv-sized count)."""
  c = load_config(phase, "base")
  codes = mixture.language_set(c.data.languages)
  rng = np.random.default_rng(1)

  def entry(shards):
    train = {
      "documents": 0,
      "sequences": sum(s["sequences"] for s in shards),
      "tokens": sum(s["tokens"] for s in shards),
      "shards": shards,
    }
    return {"train": train, "eval": {"documents": 0, "sequences": 0, "tokens": 0, "shards": []}}

  def shard(lang, source, tokens):
    return {
      "path": f"{lang}/train/{source}-0.array_record",
      "sequences": int(tokens // 900),
      "tokens": int(tokens),
      "source": source,
    }

  languages = {
    f"{l}_Latn": entry([shard(f"{l}_Latn", "fineweb2", t)])
    for l, t in zip(codes, np.exp(rng.uniform(np.log(3e9), np.log(4e11), len(codes))))
    if l != "eng"
  }
  languages["eng"] = entry([shard("eng", "dclm", 4e12), shard("eng", "arxiv", 3e11), shard("eng", "books", 2e11)])
  languages["code"] = entry([shard("code", "starcoder", 2.5e11)])
  stats = {"languages": languages, "sources": {s: {} for s in ("fineweb2", "dclm", "arxiv", "books", "starcoder")}}
  cfg = train.pipeline_config(c, c.micro_batch_size)
  comps = mixture.components(stats, list(cfg.budgets))
  assert {s["source"] for s in comps["dclm"]} == {"dclm"} and {s["source"] for s in comps["eng"]} == {"arxiv", "books"}
  m = mixture.compute_mixture(mixture.counts_of(comps), cfg.phase)
  w = dict(zip(m.languages, m.weights))
  english, code = {"pretrain": (0.3451, 0.0513), "midtrain": (0.1214, 0.0333)}[phase]  # mmBERT's token counts
  assert w["dclm"] + w["eng"] == pytest.approx(english, abs=1e-4) and w["code"] == pytest.approx(code)
  assert w["dclm"] == pytest.approx({"pretrain": 600.0 / 1989.0, "midtrain": 40.0 / 600.8}[phase], abs=1e-4)
  assert len(m.languages) == len(codes) + 2 and m.passes.max() <= 5.0 * (1 + 1e-9)
  free = [l for l in m.languages if l not in ("dclm", "eng", "code")]
  n = np.array([languages[l]["train"]["tokens"] for l in free], float) ** cfg.tau
  np.testing.assert_allclose([w[l] for l in free], (1 - sum(cfg.budgets.values())) * n / n.sum(), rtol=1e-9)
