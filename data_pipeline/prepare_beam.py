"""`data_pipeline.prepare` as an Apache Beam pipeline: the same inputs, flags and output, run by any Beam runner.

Needs the `beam` extra (`pip install -e ".[beam]"`); the in-process `python -m data_pipeline.prepare` needs
nothing of it. Every flag of `prepare` except --num_workers is taken, plus --runner; any other flag is a pipeline
option, passed to Beam as it is (--project, --region, --temp_location, --setup_file, --max_num_workers,
--direct_running_mode, ...; Dataflow's --num_workers among them).

The units of work are those of `prepare` (parquet row groups and byte ranges of JSONL / text files of about
--unit_mb, see `prepare.list_units`), so a unit is small and a runner retries it alone; the launching process lists
them into `<output_dir>/_beam/<source>.units.jsonl` (removed at the end), which the workers read and share out (a
Reshuffle). A worker tokenizes a unit exactly as `prepare`
does, into the same shards under the same names, and writes the unit's record; the records of this run and those
already in --output_dir (units finished by earlier runs, other sources) are summed in the pipeline by a CombineFn
into stats.json, written last. The output is therefore the one `prepare` writes from the same input and flags,
file for file. A unit whose record exists is skipped, so a run that was killed is completed by running it again;
a unit that was retried or redone rewrites the same shards (each written under a temporary name and renamed).

  # Dataflow: workers install this package from setup.py; the tokenizer and the inputs in a bucket.
  python -m data_pipeline.prepare_beam --runner DataflowRunner --project P --region us-central1 \\
      --temp_location gs://B/tmp --setup_file ./setup.py --max_num_workers 200 \\
      --tokenizer gs://B/spm.model --output_dir gs://B/data --source fineweb2 --parquet_dir gs://B/fineweb2/data
  # One machine, several processes:
  python -m data_pipeline.prepare_beam --runner DirectRunner --direct_running_mode multi_processing \\
      --direct_num_workers 2 --tokenizer spm.model --output_dir data --source web --jsonl web/*.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from data_pipeline import cli, prepare
from data_pipeline import filesystem as fs

try:
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
except ImportError as e:  # the optional `beam` extra
  if __name__ == "__main__":
    cli.fail(f"python -m data_pipeline.prepare_beam needs Apache Beam: {e} (install the `beam` extra, README)")
  raise


class _Stats(beam.CombineFn):
  """Units' records → stats.json content (`prepare.StatsAccumulator`, the in-process path's sum)."""

  def __init__(self, tokenizer_info: dict, settings: prepare.Settings):
    self.tokenizer_info, self.settings = tokenizer_info, settings

  def create_accumulator(self):
    return prepare.StatsAccumulator()

  def add_input(self, acc, record):
    return acc.add(record)

  def merge_accumulators(self, accs):
    accs = iter(accs)
    first = next(accs)
    for acc in accs:
      first.merge(acc)
    return first

  def extract_output(self, acc):
    return acc.result(self.tokenizer_info, self.settings)


def _process(line: str, source, settings, output_dir, languages) -> dict:
  return prepare.process_unit(prepare.Unit(**json.loads(line)), source, settings, output_dir, languages)


def _read_record(name: str, output_dir: str) -> dict:
  return json.loads((fs.path(output_dir, "--output_dir") / "_units" / name).read_text())


def _write_stats(stats: dict, output_dir: str) -> None:
  prepare._atomic_write_json(fs.path(output_dir, "--output_dir") / "stats.json", stats)


def run(
  source: prepare.Source,
  output_dir: str,
  settings: prepare.Settings,
  *,
  languages: Sequence[str] | None = None,
  shard_index: int = 0,
  num_shards: int = 1,
  pipeline_args: Sequence[str] = ("--runner=DirectRunner",),
) -> dict:
  """Runs (or resumes) `prepare`'s work on Beam, waits for it, and returns the stats.json it wrote."""
  out, tok, settings, units = prepare.plan(source, output_dir, settings, languages, shard_index, num_shards)
  done = set(prepare._unit_names(out))
  todo = [u for u in units if u.name + ".json" not in done]
  mine = {u.name + ".json" for u in todo}
  finished = sorted(done - mine)  # records already written: earlier runs, other sources
  # The lists go to the workers as files, not inside the job: a job graph holds ~10 MB (Dataflow), and 20 TB in
  # units of 256 MB makes ~10⁵ of them.
  lists = out / "_beam"
  lists.mkdir(parents=True, exist_ok=True)
  todo_file, finished_file = lists / f"{source.name}.units.jsonl", lists / f"{source.name}.finished.txt"
  fs.write_text(todo_file, "".join(json.dumps(dataclasses.asdict(u)) + "\n" for u in todo))
  fs.write_text(finished_file, "".join(n + "\n" for n in finished))
  options = PipelineOptions(list(pipeline_args))
  with beam.Pipeline(options=options) as p:
    new = (
      p
      | "Units" >> beam.io.ReadFromText(str(todo_file))
      | "SpreadUnits" >> beam.Reshuffle()
      | "Tokenize" >> beam.Map(_process, source, settings, str(out), languages)
    )
    old = (
      p
      | "Finished" >> beam.io.ReadFromText(str(finished_file))
      | "SpreadRecords" >> beam.Reshuffle()
      | "ReadRecords" >> beam.Map(_read_record, str(out))
    )
    _ = (
      (new, old)
      | beam.Flatten()
      | "Stats" >> beam.CombineGlobally(_Stats(tok.describe(), settings))
      | "WriteStats" >> beam.Map(_write_stats, str(out))
    )
  todo_file.unlink()
  finished_file.unlink()
  stats = json.loads((out / "stats.json").read_text())
  if num_shards == 1:  # as prepare: this run's units must hold documents (of every requested language)
    names = {u.name + ".array_record" for u in units}
    found: dict[str, int] = {}
    for lang, entry in stats["languages"].items():
      for e in entry.values():
        for shard in e["shards"]:
          if shard["path"].rsplit("/", 1)[-1] in names:
            found[lang] = found.get(lang, 0) + shard["sequences"]
    prepare.check_found(source, languages, units, found)
  return stats


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(
    prog="python -m data_pipeline.prepare_beam",
    description=__doc__.split("\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,  # a pipeline option must not be taken for a prefix of one of these flags
  )
  prepare.add_flags(parser)
  parser.add_argument("--runner", default="DirectRunner", help="a Beam runner (DataflowRunner, FlinkRunner, ...)")
  args, pipeline_args = argparse.ArgumentParser.parse_known_args(parser, argv)  # the rest: pipeline options
  prepare.run_command(
    args,
    lambda source, settings, **kw: run(source, args.output_dir, settings, **kw),
    pipeline_args=[f"--runner={args.runner}", *pipeline_args],
  )


if __name__ == "__main__":
  main()
