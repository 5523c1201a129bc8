"""When a run stops before train.steps: a metric crossing a threshold or a plateau
(`EarlyStop`, checked at evals), and SIGTERM or Ctrl-C (`SignalFlag`)."""

import logging
import os
import signal
import sys

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
  """SIGTERM (a preemption) or SIGINT (Ctrl-C) sets a flag, `name` the signal's name;
  `any()` is true once any process has one (an all-gather across processes, so the
  loop calls it at the same steps everywhere), and the loop then saves and stops. A
  second Ctrl-C ends the process at once, without saving (exit status 130)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.name = ""
    self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.name:
      # at once: cleaning up could wait on (or deadlock with) the save just interrupted
      sys.stdout.flush()
      print("\nCtrl-C again: stopped at once, without saving; rerunning the same command "
            "resumes from the newest checkpoint", file=sys.stderr, flush=True)
      os._exit(130)
    self.name = self.name or ("Ctrl-C (SIGINT)" if signum == signal.SIGINT else
                              signal.Signals(signum).name)
    if signum == signal.SIGINT:
      print("\nCtrl-C: the run saves a checkpoint at its next logged step and stops; "
            "Ctrl-C again stops at once, without saving", file=sys.stderr, flush=True)

  def any(self):
    if jax.process_count() == 1:
      return bool(self.name)
    return bool(multihost_utils.process_allgather(np.array(bool(self.name))).any())

  def restore(self):
    for s, previous in self.previous.items():
      signal.signal(s, previous)
