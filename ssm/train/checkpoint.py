"""Checkpoints with orbax: the train state (model, optimizer state, step, first bad step)
and the input pipeline's position, saved asynchronously every N steps and at the
end; the last K are kept, and the best by an eval metric. Restore goes onto the
current mesh, whatever mesh wrote the checkpoint.

A checkpoint that shows a positive sign of corruption (an item or metadata file
missing, JSON that does not parse, array data that cannot be decoded) is set aside,
with a warning, for the one before it: renamed <step>.unreadable, not deleted. Any
other read error may be passing (a flaky filesystem): it is retried a few times, and
if it persists the run stops with an error, the checkpoint left where it is. With
several processes, each reads on its own and then all agree on the worst verdict
before anything is renamed, so that all take the same branch."""

import json
import logging
import re
import time
from pathlib import Path

from flax import nnx
import jax
from jax.experimental import multihost_utils
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from ssm.models import build, config_from_dict

log = logging.getLogger("ssm.train")

RESTORE_TRIES = 3  # reads of a checkpoint before an error that may be transient is fatal
RESTORE_BACKOFF_S = 1.0  # wait before the second read; doubled before each further one
OK, TRANSIENT, CORRUPT = 0, 1, 2  # a read's verdict; the processes agree on the worst
# tensorstore's codes for array data that is missing or does not decode (truncated or
# garbled files); "[OS error ...]" in the message is an I/O error instead.
_TS_CORRUPT = re.compile(r"(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE|FAILED_PRECONDITION): ")


class Checkpointer:

  def __init__(self, directory, cfg):
    # The last `keep`, and the best by an eval of its own step: a checkpoint saved
    # without one (between evals, at SIGTERM) is kept only while among the last `keep`.
    policies, best = [pp.LatestN(cfg.keep)], None
    if cfg.best_metric:
      best = lambda m: m[cfg.best_metric]
      policies.append(pp.BestN(get_metric_fn=best, reverse=cfg.best_mode == "min", n=1,
                               keep_checkpoints_without_metrics=False))
      logging.getLogger("absl").addFilter(_no_metrics_warning)
    # best_fn makes orbax write the metrics beside each checkpoint, so that the best
    # one is still known after a restart.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, enable_async_checkpointing=cfg.async_save,
        preservation_policy=pp.AnyPreservationPolicy(policies), best_fn=best,
        best_mode=cfg.best_mode)
    self.best_metric = cfg.best_metric
    self.manager = ocp.CheckpointManager(directory, options=options)
    # Reads on this process alone: the manager's restore ends at a barrier that a
    # process whose read failed never reaches; `agree` takes its place.
    alone = ocp.options.MultiprocessingOptions(active_processes={jax.process_index()})
    self.reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                                   multiprocessing_options=alone)

  def save(self, step, state, data_position, metrics=None, wait=False):
    metrics = {k: float(v) for k, v in (metrics or {}).items() if k == self.best_metric} or None
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
        metrics=metrics, force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore_latest(self, abstract_state):
    """(step, state, data position) from the newest readable checkpoint, or None."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      mine, out = self._read(step, abstract_state)
      verdict = agree(mine)
      why = describe(out) if mine != OK else "a read error on another process"
      if verdict == OK:
        return step, out["state"], out["data"]
      if verdict == TRANSIENT:
        raise RuntimeError(
            f"checkpoint at step {step} could not be read ({why}; {RESTORE_TRIES} tries); "
            "it was NOT set aside, since this need not be corruption. Check the "
            "filesystem (and that the model config is the run's) and rerun; or, to start "
            "from the checkpoint before it, move "
            f"{self._path(step)} away by hand.") from (out if mine != OK else None)
      aside = self._set_aside(step)
      log.warning("checkpoint at step %d cannot be restored (%s); moved to %s, trying "
                  "the one before it", step, why, aside)
    return None

  def _read(self, step, abstract_state):
    """(OK, restored items) or (CORRUPT or TRANSIENT, the error), this process's own
    verdict; errors that may be transient are retried."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    for i in range(RESTORE_TRIES):
      if i:
        time.sleep(RESTORE_BACKOFF_S * 2 ** (i - 1))
      try:
        return OK, self.reader.restore(self._path(step), args=args)
      except Exception as e:  # noqa: BLE001 - sorted into corrupt or maybe transient
        error = e
      # A step directory gone since it was listed is the filesystem's doing, not rot.
      if corrupt(error) and self._path(step).is_dir():
        return CORRUPT, error
      log.warning("checkpoint at step %d: read %d of %d failed (%s)", step, i + 1,
                  RESTORE_TRIES, describe(error))
    return TRANSIENT, error

  def _path(self, step):
    return Path(self.manager.directory) / str(step)

  def _set_aside(self, step):
    """Renames an unreadable checkpoint (kept for inspection, out of the way); every
    process calls this, after `agree`."""
    path = self._path(step)
    aside = path.with_name(f"{step}.unreadable")
    if jax.process_index() == 0 and path.exists():
      path.rename(aside)
    multihost_utils.sync_global_devices(f"set aside {step}")
    self.manager.reload()
    return aside

  def latest_step(self):
    return self.manager.latest_step()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
    self.reader.close()


def _no_metrics_warning(record):
  """orbax warns at every save without metrics; between evals that is by design."""
  return "did not provide metrics" not in record.getMessage()


def corrupt(error):
  """Whether a restore error is a positive sign of a damaged checkpoint. What orbax
  raises (tests/test_checkpoint.py damages each file): JSON that does not parse
  (JSONDecodeError, UnicodeDecodeError), a missing metadata file (FileNotFoundError) or
  item directory (KeyError), array data missing or not decoding (tensorstore's
  DATA_LOSS and the like, often as the cause of orbax's own Exception)."""
  while error is not None:
    text = str(error)
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)):
      return True
    if isinstance(error, KeyError) and "was not found in the checkpoint" in text:
      return True
    if _TS_CORRUPT.match(text) and "[OS error" not in text:
      return True
    error = error.__cause__
  return False


def agree(verdict):
  """The worst verdict over all processes, the same on each (no communication with one process)."""
  if jax.process_count() == 1:
    return verdict
  return int(np.max(multihost_utils.process_allgather(np.int32(verdict))))


def describe(error):
  lines = str(error).splitlines()
  return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def abstract(tree):
  """ShapeDtypeStructs with the arrays' shardings: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def load_model(workdir, step=None, best=False):
  """(model, run config, step) of a finished or running ssm-train run: the model its
  config.json builds, with the parameters of checkpoint `step` (default the newest;
  `best`: the best by checkpoint.best_metric), on this process's default device. For
  generation and analysis; training resumes through the loop instead."""
  workdir = Path(workdir).absolute()
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{workdir} has no config.json: give the --workdir of an "
                            "ssm-train run")
  config = mlc.ConfigDict(json.loads((workdir / "config.json").read_text()))
  model_config = config_from_dict(config.model)
  options = ocp.CheckpointManagerOptions(best_fn=(lambda m: m[config.checkpoint.best_metric])
                                         if best else None,
                                         best_mode=config.checkpoint.get("best_mode", "max"))
  with ocp.CheckpointManager(workdir / "checkpoints", options=options) as manager:
    steps = manager.all_steps()
    if step is None:
      step = manager.best_step() if best else manager.latest_step()
    if step is None or step not in steps:
      raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint "
                              f"{'of step ' + str(step) if step is not None else 'saved yet'}"
                              f" (saved steps: {sorted(steps) or 'none'})")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: build(model_config,
                                                                    rngs=nnx.Rngs(0))))
  params = jax.tree.map(jax.numpy.asarray, restored["state"]["params"])
  _check_fits(params, nnx.to_pure_dict(abstract_state), workdir)
  nnx.replace_by_pure_dict(abstract_state, params)
  return nnx.merge(graphdef, abstract_state), config, step


def _check_fits(params, abstract_params, workdir):
  """The checkpoint's parameters have the names and shapes the config's model has."""
  def shapes(tree):  # orbax gives list indices back as strings: compare names as text
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): x.shape
            for path, x in jax.tree.leaves_with_path(tree)}
  saved, wanted = shapes(params), shapes(abstract_params)
  wrong = [f"{k}: saved {saved.get(k)}, the model has {wanted.get(k)}"
           for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
  if wrong:
    raise ValueError(f"{workdir}: the checkpoint is not the model its config.json builds "
                     f"({len(wrong)} parameters differ, e.g. {wrong[0]}); was config.json "
                     "edited, or the checkpoints copied from another run?")
