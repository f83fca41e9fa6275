"""Where training metrics go: TensorBoard event files, a JSONL file and a console line, from process 0 only.

Every write happens in the caller's thread and is flushed at once, so a full or read-only disk raises
`storage.WriteError` at the step that failed (a background writer thread would die and leave the loop waiting).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter   # TensorBoard event files without TensorFlow
from tensorboardX.proto import event_pb2

from mmbert_jax import storage


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else float(v.mean())


class MetricWriter:
  """`write(step, {"train/loss": ..., ...})` to `<workdir>/metrics.jsonl` and TensorBoard in `<workdir>/tb`."""

  CONSOLE_KEYS = ("train/loss", "train/accuracy", "train/lr", "train/tokens_per_s", "train/mfu", "eval/loss")

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tb")
    self._tb = None
    self._jsonl = None
    if self.enabled:
      try:
        os.makedirs(self.tb_dir, exist_ok=True)
        self._tb = EventsWriter(os.path.join(self.tb_dir, "events"))
        self._jsonl = open(self.jsonl_path, "a")
      except OSError as e:
        raise storage.write_error("opening the metric files", workdir, e) from e
    self._start = time.time()

  def forget_after(self, step: int) -> None:
    """Drops JSONL records of steps after `step` (a resumed run writes those steps again)."""
    if not self.enabled:
      return
    self._jsonl.close()
    try:
      with open(self.jsonl_path) as f:
        lines = f.readlines()
      kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
      if len(kept) != len(lines):
        tmp = f"{self.jsonl_path}.tmp"
        with open(tmp, "w") as f:
          f.writelines(kept)
        os.replace(tmp, self.jsonl_path)
      self._jsonl = open(self.jsonl_path, "a")
    except OSError as e:
      raise storage.write_error("rewriting metrics", self.jsonl_path, e) from e

  def _event(self, step: int, summary) -> None:
    try:
      self._tb.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
      self._tb.flush()
    except OSError as e:
      raise storage.write_error("writing TensorBoard events", self.tb_dir, e) from e

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items() if v is not None}
    for k, v in values.items():
      self._event(step, tb_summary.scalar(k, v))
    try:
      self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
      self._jsonl.flush()
    except OSError as e:
      raise storage.write_error("writing metrics", self.jsonl_path, e) from e
    shown = " ".join(f"{k.split('/', 1)[1]}={values[k]:.4g}" for k in self.CONSOLE_KEYS if k in values)
    if shown:
      print(f"[{time.time() - self._start:7.1f}s] step {step:6d} {shown}", file=sys.stderr, flush=True)

  def text(self, tag: str, text: str, step: int = 0) -> None:
    if self.enabled:
      self._event(step, tb_summary.text(tag, text))
      print(text, flush=True)

  def close(self) -> None:
    """Closes the files; a failure to flush them is not raised again (the run has already stopped or ended)."""
    if self.enabled:
      for f in (self._tb, self._jsonl):
        try:
          f.close()
        except (OSError, ValueError):
          pass
