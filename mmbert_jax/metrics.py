"""Where training metrics go: TensorBoard event files, a JSONL file and a console line, from process 0 only."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter  # TensorBoard event files without TensorFlow


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else float(v.mean())


class MetricWriter:
  """`write(step, {"train/loss": ..., ...})` to `<workdir>/metrics.jsonl` and TensorBoard in `<workdir>/tb`."""

  CONSOLE_KEYS = ("train/loss", "train/accuracy", "train/lr", "train/tokens_per_s", "train/mfu", "eval/loss")

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=30)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._start = time.time()

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items() if v is not None}
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    shown = " ".join(f"{k.split('/', 1)[1]}={values[k]:.4g}" for k in self.CONSOLE_KEYS if k in values)
    if shown:
      print(f"[{time.time() - self._start:7.1f}s] step {step:6d} {shown}", file=sys.stderr, flush=True)

  def text(self, tag: str, text: str, step: int = 0) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, step)
      print(text, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
