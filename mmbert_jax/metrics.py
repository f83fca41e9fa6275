"""Where training metrics go: TensorBoard event files, a JSONL file, optionally W&B, and a console line, from
process 0 only. Also the run's record in the workdir: `config.json` (the resolved config, also shown in
TensorBoard as text and hparams), `mixture.json` (the phase's p_l and n_l) and `eval.jsonl` (every held-out
evaluation, all languages).

Every write happens in the caller's thread and is flushed at once, so a full or read-only disk raises
`storage.WriteError` at the step that failed (a background writer thread would die and leave the loop waiting).

Beside the log-step records, `steps.jsonl` holds one short record per training step (loss, accuracy, LR, tokens),
so the loss curve has every step at any log cadence.

A `gs://` workdir has no append: `metrics.jsonl`, `steps.jsonl` and the TensorBoard event file are kept in a local
staging folder and uploaded whole at flush points (a log step at most every `UPLOAD_EVERY_S`, every checkpoint
save, the end); `config.json`, `mixture.json` and `eval.jsonl` are replaced whole when they change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from data_pipeline import filesystem as fs
from mmbert_jax import storage

UPLOAD_EVERY_S = 30.0  # a remote workdir's metrics.jsonl and events lag the run by at most this (and a log step)


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else float(v.mean())


@dataclasses.dataclass(frozen=True)
class LanguageTags:
  """Which languages get a metric tag of their own, so that a phase over ~1,800 languages logs a bounded set.

  All languages when there are at most 2·n; otherwise the n with the most and the n with the fewest training
  tokens n_l. Every language also counts in its resource group: the thirds of the languages ranked by n_l
  (`high`, `mid`, `low`), whose loss is the token-weighted mean over the group.
  """

  shown: tuple[str, ...]
  groups: Mapping[str, tuple[str, ...]]

  @classmethod
  def from_tokens(cls, tokens: Mapping[str, float], n: int) -> LanguageTags:
    order = sorted(tokens, key=lambda lang: (-tokens[lang], lang))
    shown = order if len(order) <= 2 * n else order[:n] + order[len(order) - n :]
    thirds = np.array_split(np.array(order, dtype=object), 3)
    groups = {name: tuple(part) for name, part in zip(("high", "mid", "low"), thirds) if len(part)}
    return cls(tuple(shown), groups)

  def losses(
    self, loss_sum: Mapping[str, float], count: Mapping[str, float], *, prefix: str, group_prefix: str
  ) -> dict[str, float]:
    """{f"{prefix}/{lang}/loss"} for the shown languages and {f"{group_prefix}/{group}/loss"} per group, from
    summed losses and masked-token counts per language."""
    out = {f"{prefix}/{lang}/loss": loss_sum[lang] / count[lang] for lang in self.shown if count.get(lang, 0) > 0}
    for group, langs in self.groups.items():
      total = sum(count.get(lang, 0) for lang in langs)
      if total > 0:
        out[f"{group_prefix}/{group}/loss"] = sum(loss_sum.get(lang, 0.0) for lang in langs) / total
    return out


def flat_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
  """A nested config as {"a.b": value}; values that are not scalars become their JSON text."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(flat_hparams(value, name + "."))
    elif isinstance(value, (bool, int, float, str)):
      out[name] = value
    else:
      out[name] = json.dumps(value, default=str)
  return out


class WandbWriter:
  """Weights & Biases, when `config.wandb.project` is set: one W&B run per workdir (re-running resumes it)."""

  def __init__(
    self,
    workdir: str | epath.Path,
    *,
    project: str,
    entity: str = "",
    name: str = "",
    group: str = "",
    mode: str = "",
    config: Mapping[str, Any] | None = None,
    local_dir: str | None = None,
  ):
    try:
      import wandb
    except ImportError:
      raise ImportError(
        "config.wandb.project is set but wandb is not installed: `pip install wandb`, or drop --config.wandb.project"
      ) from None
    run_id = hashlib.sha1(os.fspath(fs.path(workdir, "workdir")).encode()).hexdigest()[:16]
    self._run = wandb.init(
      project=project,
      entity=entity or None,
      name=name or None,
      group=group or None,
      mode=mode or None,
      dir=local_dir or os.fspath(workdir),
      id=run_id,
      resume="allow",
      config=dict(config) if config else None,
    )

  def log(self, step: int, values: Mapping[str, float]) -> None:
    self._run.log(dict(values), step=step)

  def close(self) -> None:
    self._run.finish()


def save_config(workdir: str | epath.Path, config) -> str:
  """`<workdir>/config.json`: the resolved config as JSON (returned). A different config.json already there (an
  earlier start with other flags) is kept as config.<n>.json."""
  text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
  workdir = fs.path(workdir, "workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "config.json"
  if path.exists():
    old = path.read_text()
    if old != text:
      n = 1
      while (workdir / f"config.{n}.json").exists():
        n += 1
      fs.write_text(workdir / f"config.{n}.json", old)  # kept before config.json is replaced
  fs.write_text(path, text)
  return text


def record_eval(workdir: str | epath.Path, step: int, results: Mapping[str, Mapping[str, float]], **info: Any) -> None:
  """One held-out evaluation with every language, appended to `<workdir>/eval.jsonl` (in a bucket, which has no
  append, the file is replaced by its old content and the new line)."""
  workdir = fs.path(workdir, "workdir")
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "eval.jsonl"
  line = json.dumps({"step": step, **info, "results": results}, default=float) + "\n"
  if fs.is_remote(path):
    fs.write_text(path, (path.read_text() if path.exists() else "") + line)
  else:
    with path.open("a") as f:
      f.write(line)


_WRITER_COUNT = itertools.count()


class MetricWriter:
  """`write(step, {"train/loss": ..., ...})` to `<workdir>/metrics.jsonl`, TensorBoard in `<workdir>/tb` and W&B;
  `write_step(step, {...})` to `<workdir>/steps.jsonl` only (every step, no console line).

  `console`: print a line of `console_keys` per write (and every `text`), or hand them to a callable (a progress
  console), or stay quiet (False). In a `gs://` workdir the appended files live in a local staging folder
  until `flush` uploads them (see the module docstring); a failed upload is a `storage.WriteError`.
  """

  CONSOLE_KEYS = ("train/loss", "train/accuracy", "train/lr", "train/tokens_per_s", "train/mfu", "eval/loss")

  def __init__(
    self,
    workdir: str | epath.Path,
    *,
    enabled: bool | None = None,
    console: bool | Callable[[str], None] = True,
    console_keys: tuple[str, ...] | None = None,
    wandb: Mapping[str, Any] | None = None,
  ):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = fs.path(workdir, "workdir")
    self.remote = fs.is_remote(self.workdir)
    self.jsonl_path = self.workdir / "metrics.jsonl"
    self.steps_path = self.workdir / "steps.jsonl"
    self.tb_dir = self.workdir / "tb"
    self._console = console
    self._console_keys = self.CONSOLE_KEYS if console_keys is None else console_keys
    self._tb = None
    self._jsonl = None
    self._steps = None
    self._wandb = None
    self._wandb_settings = dict(wandb) if wandb and wandb.get("project") else None
    self._stage: str | None = None  # the local folder of a remote workdir's appended files
    self._uploaded_at = 0.0
    self._dirty = False
    if self.enabled:
      # tensorboardX imports torch when installed: only the writing process pays.
      from tensorboardX.event_file_writer import EventsWriter  # TensorBoard event files without TensorFlow

      with self._writes("opening the metric files", self.workdir):
        local = self.workdir
        if self.remote:
          self._stage = tempfile.mkdtemp(prefix="mmbert_jax-metrics-")
          local = epath.Path(self._stage)
          for path in (self.jsonl_path, self.steps_path):
            if path.exists():  # a restart appends to the run's records, as on local disk
              path.copy(local / path.name)
        (local / "tb").mkdir(parents=True, exist_ok=True)
        self._local_jsonl = local / "metrics.jsonl"
        self._local_steps = local / "steps.jsonl"
        # The name holds the time in seconds and the host: a restart within the same second would reuse it and,
        # in a bucket, replace the earlier file. Process id and writer count keep each writer's file its own.
        self._tb = EventsWriter(
          os.fspath(local / "tb" / "events"), filename_suffix=f".{os.getpid()}.{next(_WRITER_COUNT)}"
        )
        self._jsonl = self._local_jsonl.open("a")
        self._steps = self._local_steps.open("a")
    self._start = time.time()

  @contextlib.contextmanager
  def _writes(self, what: str, path) -> Iterator[None]:
    """A failed write to `path` as one `storage.WriteError`: an OSError on local disk; in a bucket, whatever the
    GCS client raises (HTTP errors, timeouts). Any other error on local disk is a bug and propagates."""
    try:
      yield
    except Exception as e:
      if not (isinstance(e, OSError) or self.remote):
        raise
      raise storage.write_error(what, str(path), e) from e

  def forget_after(self, step: int) -> None:
    """Drops JSONL records (metrics.jsonl, steps.jsonl) of steps after `step` (a resumed run writes those steps
    again)."""
    if not self.enabled:
      return
    self._jsonl.close()
    self._steps.close()
    for local in (self._local_jsonl, self._local_steps):
      try:
        lines = local.read_text().splitlines(keepends=True)
        whole = [line for line in lines if line.endswith("\n")]  # a crash can cut the last line short
        kept = [line for line in whole if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
          fs.write_text(local, "".join(kept))
          self._dirty = True
      except OSError as e:
        raise storage.write_error("rewriting metrics", str(local), e) from e
    self._jsonl = self._local_jsonl.open("a")
    self._steps = self._local_steps.open("a")

  def flush(self, force: bool = True) -> None:
    """Uploads a remote workdir's metrics.jsonl and event file (without `force`: only when the last upload is
    `UPLOAD_EVERY_S` old); nothing to do for a local workdir, whose files are flushed at every write."""
    if not (self.enabled and self.remote and self._dirty):
      return
    if not force and time.time() - self._uploaded_at < UPLOAD_EVERY_S:
      return
    self._tb.flush()
    self._jsonl.flush()
    self._steps.flush()
    events = sorted((epath.Path(self._stage) / "tb").iterdir())  # this process's one event file
    files = [(self._local_jsonl, self.jsonl_path), (self._local_steps, self.steps_path)]
    for local, dest in files + [(e, self.tb_dir / e.name) for e in events]:
      with self._writes("uploading metrics", dest):
        fs.upload(local, dest)
    self._uploaded_at = time.time()
    self._dirty = False

  def _event(self, step: int, summary) -> None:
    from tensorboardX.proto import event_pb2

    try:
      self._tb.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
      self._tb.flush()
    except OSError as e:
      raise storage.write_error("writing TensorBoard events", str(self.tb_dir), e) from e
    self._dirty = True

  def _print(self, text: str, stream=None) -> None:
    if callable(self._console):
      self._console(text)
    elif self._console:
      print(text, file=stream or sys.stdout, flush=True)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    from tensorboardX import summary as tb_summary

    values = {k: _scalar(v) for k, v in metrics.items() if v is not None}
    for k, v in values.items():
      self._event(step, tb_summary.scalar(k, v))
    try:
      self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
      self._jsonl.flush()
    except OSError as e:
      raise storage.write_error("writing metrics", str(self.jsonl_path), e) from e
    self._dirty = True
    self.flush(force=False)
    if self._wandb is not None:
      self._wandb.log(step, values)
    shown = " ".join(f"{k.removeprefix('train/')}={values[k]:.4g}" for k in self._console_keys if k in values)
    if shown:
      self._print(f"[{time.time() - self._start:7.1f}s] step {step:6d} {shown}", sys.stderr)

  def write_step(self, step: int, values: Mapping[str, Any]) -> None:
    """One training step's record in steps.jsonl (no TensorBoard, W&B or console: those get the log steps)."""
    if not self.enabled:
      return
    record = {"step": step, **{k: _scalar(v) for k, v in values.items() if v is not None}}
    try:
      self._steps.write(json.dumps(record) + "\n")
      self._steps.flush()
    except OSError as e:
      raise storage.write_error("writing metrics", str(self.steps_path), e) from e
    self._dirty = True  # uploaded with the next log step's records

  def text(self, tag: str, text: str, step: int = 0) -> None:
    if self.enabled:
      from tensorboardX import summary as tb_summary

      self._event(step, tb_summary.text(tag, text))
      self._print(text)

  def write_config(self, config) -> None:
    """The resolved run config (an ml_collections ConfigDict): `save_config`, TensorBoard text and hparams, and
    the W&B run's config (the W&B run starts here)."""
    if not self.enabled:
      return
    from tensorboardX import summary as tb_summary

    with self._writes("writing config.json", self.workdir / "config.json"):
      text = save_config(self.workdir, config)
    self._event(0, tb_summary.text("config", "    " + text.replace("\n", "\n    ")))  # markdown code block
    hparams = flat_hparams(json.loads(text))
    experiment, start, _ = tb_summary.hparams(hparams, {"eval/loss": 0.0})
    for summary in (experiment, start):
      self._event(0, summary)
    if self._wandb_settings and self._wandb is None:
      settings = dict(self._wandb_settings)
      settings["name"] = settings.get("name") or config.get("phase", "")
      self._wandb = WandbWriter(self.workdir, config=hparams, local_dir=self._stage, **settings)

  def write_json(self, name: str, record: Any) -> None:
    """`<workdir>/<name>.json` (replaced whole)."""
    if self.enabled:
      path = self.workdir / f"{name}.json"
      with self._writes(f"writing {name}.json", path):
        fs.write_text(path, json.dumps(record, indent=1, default=float))

  def write_eval(self, step: int, results: Mapping[str, Mapping[str, float]], **info: Any) -> None:
    if self.enabled:
      with self._writes("writing eval.jsonl", self.workdir / "eval.jsonl"):
        record_eval(self.workdir, step, results, **info)

  def close(self) -> None:
    """Closes the files (a remote workdir's are uploaded a last time); a failure to flush or upload them is not
    raised again (the run has already stopped or ended: a run that ends well calls `flush` first)."""
    if self.enabled:
      try:
        self.flush()
      except storage.WriteError as e:
        print(f"warning: {e}", file=sys.stderr, flush=True)
      for f in (self._tb, self._jsonl, self._steps):
        try:
          f.close()
        except (OSError, ValueError, AttributeError):
          pass
      if self._wandb is not None:
        self._wandb.close()
        self._wandb = None
      if self._stage is not None:
        epath.Path(self._stage).rmtree(missing_ok=True)
        self._stage = None
