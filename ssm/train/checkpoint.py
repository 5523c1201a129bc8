"""Checkpoints with orbax: the train state (model, optimizer state, step, first bad step)
and the input pipeline's position, saved asynchronously every N steps and at the
end; the last K are kept, and the best by an eval metric. Restore goes onto the
current mesh, whatever mesh wrote the checkpoint.

Once a save has completed (written by every process, before orbax commits it), the
CRC-32 of each of its files goes into ssm_checksums.json beside them; a restore checks
them first, so that a flipped bit inside an array chunk, which would decode, is caught.

A checkpoint that shows a positive sign of corruption (a checksum that differs, a file
missing, JSON that does not parse, array data that cannot be decoded) is set aside,
with a warning, for the one before it: renamed <step>.unreadable (-2, -3, ... if taken),
not deleted. A checkpoint whose arrays do not have the names and shapes of the run's
state (another model or optimizer) is a configuration error, raised at once as a
ValueError naming them. Any other read error may be passing (a flaky filesystem): it
is retried a few times, and if it persists the run stops with an error, the
checkpoint left where it is. With several processes, each reads on its own and then
all agree on the worst verdict before anything is renamed, so that all take the same
branch."""

import concurrent.futures
import json
import logging
import re
import time
import zlib
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
# a read's verdict; the processes agree on the worst
OK, TRANSIENT, MISMATCH, CORRUPT = 0, 1, 2, 3
CHECKSUMS = "ssm_checksums.json"  # in each step directory: {relative path: CRC-32}
# written after the checksums, when orbax commits (its commit time, and marker)
UNCHECKED = (CHECKSUMS, "_CHECKPOINT_METADATA", "commit_success.txt")
# The JSON files orbax's manager reads when it opens a directory (the metrics for
# best_fn): one that does not parse would stop it before any checkpoint is tried.
MANAGER_READS = ("_CHECKPOINT_METADATA", "metrics/metrics")
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
    # one is still known after a restart. Saves are always asynchronous, since only
    # then does orbax call back once a save is complete and before it is committed
    # (where the checksums are written); async_save=False waits for each.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums),
        preservation_policy=pp.AnyPreservationPolicy(policies), best_fn=best,
        best_mode=cfg.best_mode)
    self.best_metric, self.wait_always, self.saving = cfg.best_metric, not cfg.async_save, None
    self.directory = Path(directory)
    self._set_aside_unparsable()
    self.manager = ocp.CheckpointManager(directory, options=options)
    # Reads on this process alone: the manager's restore ends at a barrier that a
    # process whose read failed never reaches; `agree` takes its place.
    alone = ocp.options.MultiprocessingOptions(active_processes={jax.process_index()})
    self.reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                                   multiprocessing_options=alone)

  def save(self, step, state, data_position, metrics=None, wait=False):
    metrics = {k: float(v) for k, v in (metrics or {}).items() if k == self.best_metric} or None
    self.manager.wait_until_finished()  # the previous save's callback has run: `saving` is free
    self.saving = step
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
        metrics=metrics, force=True)
    if wait or self.wait_always:
      self.manager.wait_until_finished()

  def _write_checksums(self):
    """orbax's callback once every process has written the save of step `saving`, in
    the save's thread, before the directory is renamed to its step (when it commits)."""
    if jax.process_index() != 0:
      return
    final = self._path(self.saving)
    pending = final.with_name(final.name + ".orbax-checkpoint-tmp")
    where = pending if pending.is_dir() else final  # filesystems that commit in place
    (where / CHECKSUMS).write_text(json.dumps(checksums(where), indent=0))

  def restore_latest(self, abstract_state):
    """(step, state, data position) from the newest readable checkpoint, or None."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      mine, out = self._read(step, abstract_state)
      verdict = agree(mine)
      why = describe(out) if mine != OK else "a read error on another process"
      if verdict == OK:
        return step, out["state"], out["data"]
      if verdict == MISMATCH:
        raise ValueError(f"the checkpoint at step {step} in {self.directory} is not this "
                         f"run's state: {out if mine == MISMATCH else why}") from None
      if verdict == TRANSIENT:
        raise RuntimeError(
            f"checkpoint at step {step} could not be read ({why}; {RESTORE_TRIES} tries); "
            "it was NOT set aside, since this need not be corruption. Check the "
            "filesystem and rerun; or, to start from the checkpoint before it, move "
            f"{self._path(step)} away by hand.") from (out if mine != OK else None)
      aside = self._set_aside(step)
      self.manager.reload()
      log.warning("checkpoint at step %d cannot be restored (%s); moved to %s, trying "
                  "the one before it", step, why, aside)
    return None

  def _read(self, step, abstract_state):
    """(OK, restored items) or (CORRUPT, MISMATCH or TRANSIENT, the error), this
    process's own verdict; errors that may be transient are retried."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    for i in range(RESTORE_TRIES):
      if i:
        time.sleep(RESTORE_BACKOFF_S * 2 ** (i - 1))
      try:
        if jax.process_index() == 0:  # one reader suffices: the verdicts are agreed on
          verify_checksums(self._path(step))
        saved = ocp.StandardCheckpointHandler().metadata(self._path(step) / "state")
        wrong = differences(saved, abstract_state, "the run has")
        if wrong:
          return MISMATCH, (f"{len(wrong)} arrays differ, e.g. {'; '.join(wrong[:3])}. "
                            "checkpoint.resume_changed=True resumes only across changes "
                            "that keep every array's name and shape (e.g. train.lr, "
                            "model.dtype, the scan; not the model's sizes, nor "
                            "train.clip_norm to or from 0); for this one give the run a "
                            "new --workdir")
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
    return self.directory / str(step)

  def _set_aside_unparsable(self):
    """Sets aside the checkpoints whose files that orbax's manager reads on opening the
    directory do not parse (before it opens it)."""
    steps = sorted(int(p.name) for p in self.directory.glob("*") if p.name.isdigit()
                   and p.is_dir()) if self.directory.is_dir() else []
    for step in steps:
      mine, error = OK, None
      for name in MANAGER_READS:
        try:
          if (self._path(step) / name).exists():
            json.loads((self._path(step) / name).read_bytes())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
          mine, error = CORRUPT, e
      if agree(mine) == CORRUPT:
        aside = self._set_aside(step)
        log.warning("checkpoint at step %d cannot be restored (%s); moved to %s", step,
                    describe(error) if error else "a read error on another process", aside)

  def _set_aside(self, step):
    """Renames an unreadable checkpoint (kept for inspection, out of the way) to a name
    not yet taken; every process calls this, after `agree`."""
    path = self._path(step)
    multihost_utils.sync_global_devices(f"name {step}")  # all see the same names taken
    aside = path.with_name(f"{step}.unreadable")
    for n in range(2, 10_000):
      if not aside.exists():
        break
      aside = path.with_name(f"{step}.unreadable-{n}")
    if jax.process_index() == 0 and path.exists():
      path.rename(aside)
    multihost_utils.sync_global_devices(f"set aside {step}")
    return aside

  def latest_step(self):
    return self.manager.latest_step()

  def best(self):
    """(step, value) of the best checkpoint by checkpoint.best_metric, or None (no
    metric, or no checkpoint with an eval of its own step)."""
    step = self.manager.best_step() if self.best_metric else None
    return None if step is None else (step, self.manager.metrics(step)[self.best_metric])

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
    self.reader.close()


def _no_metrics_warning(record):
  """orbax warns at every save without metrics; between evals that is by design."""
  return "did not provide metrics" not in record.getMessage()


class ChecksumError(Exception):
  pass


def checksums(directory):
  """{path relative to `directory`: CRC-32} of every file under it but UNCHECKED;
  files are read in parallel (zlib releases the GIL)."""
  files = sorted(f for f in Path(directory).rglob("*")
                 if f.is_file() and str(f.relative_to(directory)) not in UNCHECKED)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    sums = pool.map(_crc32, files)
  return {str(f.relative_to(directory)): crc for f, crc in zip(files, sums)}


def _crc32(path):
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc


def verify_checksums(directory):
  """Raises ChecksumError if a file of the checkpoint differs from its checksum, and
  FileNotFoundError if one is missing. A checkpoint saved by an older ssm (or in the
  moment between its commit and its checksums, on filesystems that commit in place)
  has none: it is read unchecked."""
  if not (Path(directory) / CHECKSUMS).exists():
    log.warning("%s has no %s: restored without checking its files", directory, CHECKSUMS)
    return
  want = json.loads((Path(directory) / CHECKSUMS).read_bytes())
  for f in want:
    if not (Path(directory) / f).is_file():
      raise FileNotFoundError(f"{Path(directory) / f} is missing")
  got = checksums(directory)
  wrong = [f for f in want if got[f] != want[f]]
  if wrong:
    raise ChecksumError(f"{len(wrong)} files differ from their checksums ({CHECKSUMS}), "
                        f"e.g. {wrong[0]}")


def corrupt(error):
  """Whether a restore error is a positive sign of a damaged checkpoint. What orbax
  raises (tests/test_checkpoint.py damages each file): JSON that does not parse
  (JSONDecodeError, UnicodeDecodeError), a missing metadata file (FileNotFoundError) or
  item directory (KeyError), array data missing or not decoding (tensorstore's
  DATA_LOSS and the like, often as the cause of orbax's own Exception); and a file
  that differs from its checksum."""
  while error is not None:
    text = str(error)
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError,
                          ChecksumError)):
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
  metric = config.checkpoint.best_metric
  if best and not metric:
    raise ValueError(f"{workdir} was trained without checkpoint.best_metric: no checkpoint "
                     "is ranked best; load the newest (best=False) or a given step")
  options = ocp.CheckpointManagerOptions(best_fn=(lambda m: m[metric]) if best else None,
                                         best_mode=config.checkpoint.get("best_mode", "max"))
  with ocp.CheckpointManager(workdir / "checkpoints", options=options) as manager:
    steps = manager.all_steps()
    if step is None and best and steps:
      step = manager.best_step()
      if step is None:
        raise FileNotFoundError(
            f"{workdir / 'checkpoints'}: no checkpoint is ranked by {metric}, which only an "
            f"eval at a checkpoint's own step gives (saved steps: {sorted(steps)}); load the "
            "newest (best=False) or a given step")
    if step is None:
      step = manager.latest_step()
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


def differences(saved, wanted, has="the model has"):
  """'name: saved (shape), <has> (shape)' for every array whose name or shape differs
  between a checkpoint's tree and the one wanted (None: no such array)."""
  def shapes(tree):  # orbax gives list indices and tuple fields back as dict keys
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                     for k in path): tuple(x.shape)
            for path, x in jax.tree.leaves_with_path(tree)}
  saved, wanted = shapes(saved), shapes(wanted)
  return [f"{k}: saved {saved.get(k)}, {has} {wanted.get(k)}"
          for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]


def _check_fits(params, abstract_params, workdir):
  """The checkpoint's parameters have the names and shapes the config's model has."""
  wrong = differences(params, abstract_params)
  if wrong:
    raise ValueError(f"{workdir}: the checkpoint is not the model its config.json builds "
                     f"({len(wrong)} parameters differ, e.g. {wrong[0]}); was config.json "
                     "edited, or the checkpoints copied from another run?")
