"""When a run stops before train.steps: a metric crossing a threshold or a plateau
(`EarlyStop`, checked at evals), and SIGTERM (`SignalFlag`, a preemption)."""

import logging
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("ssm.train")


class EarlyStop:
  """`train.stop_when` ("eval/accuracy>=0.99": a metric, >= or <=, a threshold) and
  `train.patience` (evals without improvement of checkpoint.best_metric) as one
  check after each eval; `reason` says why the run stops, empty while it goes on."""

  def __init__(self, t, checkpoint):
    self.reason, self.threshold = "", None
    if t.stop_when:
      for op in (">=", "<="):
        name, found, value = t.stop_when.partition(op)
        if found:
          try:
            self.threshold = (name.strip(), op, float(value))
          except ValueError:
            break
      if self.threshold is None:
        raise ValueError(f"train.stop_when={t.stop_when!r}: expected METRIC>=VALUE or "
                         "METRIC<=VALUE, e.g. 'eval/accuracy>=0.99'")
    if t.patience and not checkpoint.best_metric:
      raise ValueError("train.patience counts evals without improvement of "
                       "checkpoint.best_metric, which is empty: set it (e.g. 'eval/loss')")
    if (t.stop_when or t.patience) and not t.eval_every:
      log.warning("train.stop_when and train.patience are checked at evals, and "
                  "train.eval_every is 0: the run goes to train.steps")
      self.threshold, t_patience = None, 0
    else:
      t_patience = t.patience
    self.patience, self.metric = t_patience, checkpoint.best_metric
    self.sign = -1 if checkpoint.best_mode == "max" else 1
    self.best, self.waited = float("inf"), 0

  def update(self, evals):
    if self.threshold:
      name, op, value = self.threshold
      if name not in evals:
        raise ValueError(f"train.stop_when names {name!r}; the evals give {sorted(evals)}")
      x = evals[name]
      if (x >= value) if op == ">=" else (x <= value):
        self.reason = f"{name} = {x:.4g} {op} {value:g}"
    if self.patience:
      x = self.sign * evals[self.metric]
      self.best, self.waited = (x, 0) if x < self.best else (self.best, self.waited + 1)
      if self.waited >= self.patience and not self.reason:
        self.reason = f"{self.metric} has not improved for {self.patience} evals"


class SignalFlag:
  """SIGTERM (preemption) sets a flag; `any()` is true once any process has one (an
  all-gather across processes, so the loop calls it at the same steps everywhere)."""

  def __init__(self):
    self.flag = False
    self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.flag = True

  def any(self):
    if jax.process_count() == 1:
      return self.flag
    return bool(multihost_utils.process_allgather(np.array(self.flag)).any())

  def restore(self):
    signal.signal(signal.SIGTERM, self.previous)
