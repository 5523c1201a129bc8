"""Checkpoints with orbax: the train state (model, optimizer state, step, PRNG key)
and the input pipeline's position, saved asynchronously every N steps and at the
end; the last K are kept, and the best by an eval metric. Restore goes onto the
current mesh, whatever mesh wrote the checkpoint, and skips a checkpoint that
cannot be read, with a warning, for the one before it (the unreadable one is
renamed <step>.unreadable, not deleted)."""

import logging
from pathlib import Path

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger("ssm.train")


class Checkpointer:

  def __init__(self, directory, cfg):
    policies = [pp.LatestN(cfg.keep)]
    if cfg.best_metric:
      policies.append(pp.BestN(get_metric_fn=lambda m: m[cfg.best_metric],
                               reverse=cfg.best_mode == "min", n=1,
                               keep_checkpoints_without_metrics=True))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, enable_async_checkpointing=cfg.async_save,
        preservation_policy=pp.AnyPreservationPolicy(policies))
    self.best_metric = cfg.best_metric
    self.manager = ocp.CheckpointManager(directory, options=options)

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
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, out["state"], out["data"]
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
        aside = self._set_aside(step)
        log.warning("checkpoint at step %d cannot be restored (%s: %s); moved to %s, trying "
                    "the one before it", step, type(e).__name__,
                    str(e).splitlines()[0][:200], aside)
    return None

  def _set_aside(self, step):
    """Renames an unreadable checkpoint (kept for inspection, out of the way)."""
    path = Path(self.manager.directory) / str(step)
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


def abstract(tree):
  """ShapeDtypeStructs with the arrays' shardings: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)
