"""The shared training loop: every architecture and task trains through `train`.

The model is split into a graph definition and a pure dict of parameters; the
train step (ssm.train.step) is a pure function of (state, batch) under `jax.jit`,
with the state sharded over the mesh and donated. Batches come from the task's input
pipeline (ssm.data.pipeline), whose position is saved with every checkpoint. A run:
`_restore`, then `_train` (compile, the step loop, evaluation, checkpoints).
"""

import json
import logging
import time
from pathlib import Path

import jax
import optax
from flax import nnx

from ssm.config import check as check_config
from ssm.data import make_pipeline
from ssm.data.pipeline import task_vocab_size
from ssm.flops import compiled_flops, flops, param_count
from ssm.info import architecture
from ssm.models import LMConfig, build, config_from_dict
from ssm.train import sharding
from ssm.train.checkpoint import Checkpointer, abstract
from ssm.train.metrics import MetricsWriter, peak_flops
from ssm.train.optim import make_optimizer
from ssm.train.step import eval_step, means, new_state, train_step
from ssm.train.stopping import EarlyStop, SignalFlag

log = logging.getLogger("ssm.train")


class NonFiniteLoss(RuntimeError):
  pass


class Stopped(RuntimeError):
  """SIGTERM or Ctrl-C stopped the run after it saved a checkpoint: rerunning resumes it."""


def setup_distributed(cfg):
  """jax.distributed from explicit options, or auto-detected where a cluster
  environment (SLURM, TPU pods, ...) is present."""
  if cfg.coordinator_address:
    if cfg.cpu_collectives:  # collectives between CPU devices of several processes
      jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  elif cfg.auto:
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      log.info("no cluster detected (%s); running as one process", e)


# train keys that change what the steps already taken mean
OPTIMIZER_KEYS = ("lr", "b1", "b2", "eps", "weight_decay", "decay_embeddings", "clip_norm",
                  "schedule", "warmup_steps", "min_lr_ratio")


class Trainer:
  """Builds everything a run needs from its config; `run()` trains."""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, Path(workdir).absolute()  # orbax wants absolute paths
    if config.model.get("kind") == "lm" and config.model.get("vocab_size") == 0:
      config.model.vocab_size = task_vocab_size(config.task)  # 0: the task's (its tokenizer's)
    check_config(config)
    t = config.train
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(t.batch_size, self.mesh, t.grad_accum)
    self.pipeline = make_pipeline(config.task, t.batch_size, config.seed)
    self.model_config = config_from_dict(config.model)
    check_model_fits_task(self.model_config, self.pipeline)
    abstract_model = nnx.eval_shape(lambda: build(self.model_config, rngs=nnx.Rngs(config.seed)))
    self.graphdef, self.abstract_state = nnx.split(abstract_model)
    self.schedule_steps = t.schedule_steps or t.steps
    self.tx, self.lr = make_optimizer(t, self.abstract_state, self.schedule_steps)
    self.param_shardings = sharding.param_shardings(self.abstract_state, self.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.n_params = param_count(self.model_config)

  # --- state ---------------------------------------------------------------
  def init_state(self):
    seed, model_config = self.config.seed, self.model_config

    def init_params():
      return nnx.to_pure_dict(nnx.state(build(model_config, rngs=nnx.Rngs(seed))))

    params = jax.jit(init_params, out_shardings=self.param_shardings)()
    # Optimizer moments are sharded as their parameters; counters are replicated.
    opt_shardings = optax.tree_utils.tree_map_params(
        self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, params), self.param_shardings,
        transform_non_params=lambda _: self.replicated)
    opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(params)
    return new_state(params, opt_state, lambda x: jax.device_put(x, self.replicated))

  # --- the step ------------------------------------------------------------
  def make_step(self, state_shardings):
    step_fn = train_step(self.graphdef, self.tx, self.lr, self.config.train.grad_accum,
                         self.batch_sharding, self.pipeline.kind, self.pipeline.bits_per_byte)
    return jax.jit(step_fn, in_shardings=(state_shardings, self.batch_sharding),
                   out_shardings=(state_shardings, self.replicated), donate_argnums=0)

  def compile_step(self, state, batch):
    """The train step compiled ahead of time for this state and batch (once: the
    compiled step both runs and gives XLA's FLOP count)."""
    step = self.make_step(jax.tree.map(lambda x: x.sharding, state))
    return step.lower(abstract(state), abstract(batch)).compile()

  def make_eval(self):
    return jax.jit(eval_step(self.graphdef, self.mesh, self.pipeline.kind))

  def _keep_schedule(self, started_with):
    """On resume the learning-rate schedule keeps the length the run started with, so
    the steps already taken keep their rates: a longer train.steps continues at the
    schedule's final rate, unless train.schedule_steps asks for another length."""
    t = self.config.train
    if started_with is None or started_with == self.schedule_steps:
      return
    if t.schedule_steps:
      log.warning("train.schedule_steps=%d: the schedule is recomputed; the %d steps already "
                  "taken followed a %d-step schedule", t.schedule_steps, started_with,
                  started_with)
      return
    log.warning("train.steps is %d but the run started with a %d-step learning-rate schedule, "
                "which it keeps (past its end the rate stays at its final value); set "
                "train.schedule_steps=%d to recompute it", t.steps, started_with, t.steps)
    self.schedule_steps = started_with
    self.tx, self.lr = make_optimizer(t, self.abstract_state, started_with)

  def flops_per_step(self, batch):
    """Training FLOPs of one step by ssm.flops: 3x the forward (the backward is 2x)."""
    if self.pipeline.kind == "image":
      return 3 * flops(self.model_config)["total"] * batch["images"].shape[0]
    B, L = batch["inputs"].shape
    return 3 * flops(self.model_config, L)["total"] * B * L

  # --- data ----------------------------------------------------------------
  def batches(self, split="train", pipeline=None):
    """An iterator over the pipeline's batches, as global arrays. This process
    makes only its own rows; together they form the global batch. Its state
    (`.get_state()`) is the pipeline position."""
    return _GlobalBatches((pipeline or self.pipeline).batches(split, self.process_rows()),
                          self.batch_sharding, self.config.train.batch_size)

  def process_rows(self):
    B = self.config.train.batch_size
    index_map = self.batch_sharding.addressable_devices_indices_map((B,))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [B if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    return slice(min(starts), max(stops))

  # --- the run -------------------------------------------------------------
  def run(self):
    """Trains from the newest checkpoint (or from the start) to train.steps, or until
    an early stop; returns the last metrics. SIGTERM or Ctrl-C saves a checkpoint and
    raises Stopped."""
    cfg = self.config
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._check_same_run()
    checkpointer = Checkpointer(self.workdir / "checkpoints", cfg.checkpoint)
    try:
      start, state, data, position = self._restore(checkpointer)
      # Only once the restore succeeded: a rerun that cannot resume (another model
      # under resume_changed, a read error) leaves the run's own config behind.
      if jax.process_index() == 0:
        (self.workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
      if start >= cfg.train.steps or position.get("stopped"):
        log.info("the run is complete (step %d of %d%s)", start, cfg.train.steps,
                 f"; stopped early: {position['stopped']}" if start < cfg.train.steps else "")
        path = self.workdir / "metrics.jsonl"
        rows = path.read_text().splitlines() if path.exists() else []  # train.steps=0
        final = {k: v for k, v in json.loads(rows[-1]).items() if k != "step"} if rows else {}
        self._report_end(start, final, checkpointer)
        return final
      return self._train(start, state, data, checkpointer)
    finally:
      checkpointer.close()

  def _check_same_run(self):
    """A workdir with checkpoints holds one run: another model, task, seed or optimizer
    there is an error (its checkpoints would not fit, or would mean something else)
    unless checkpoint.resume_changed; other changed keys (train.steps, the mesh, ...)
    are a warning: they apply from the resumed step on. With resume_changed the run
    resumes if the checkpoint's arrays still have this run's names and shapes (another
    learning rate, task data, scan, ...); another shape is an error (Checkpointer)."""
    old_path, steps = self.workdir / "config.json", self.workdir / "checkpoints"
    if not old_path.exists() or not any(p.name.isdigit() for p in
                                        (steps.iterdir() if steps.exists() else ())):
      return  # nothing saved yet (a first start, or one that failed): nothing to keep
    old, new = json.loads(old_path.read_text()), json.loads(self.config.to_json_best_effort())
    changed = [k for k in _differences(old, new) if k != "checkpoint.resume_changed"]
    # keys its config.json lacks were added to ssm since the run started: a warning
    fatal = [k for k in changed if (k.split(".")[0] in ("model", "task", "seed")
                                    or k in {f"train.{o}" for o in OPTIMIZER_KEYS})
             and not _lacks(old, k)]
    if fatal and not self.config.checkpoint.resume_changed:
      raise ValueError(f"{self.workdir} holds a run of another model, task or optimizer: "
                       f"{', '.join(fatal)} differ from its config.json; give this run a new "
                       "--workdir, or set checkpoint.resume_changed=True to resume it anyway "
                       "(possible while every parameter keeps its shape)")
    if changed:
      log.warning("resuming %s with changed %s (from the resumed step on)", self.workdir,
                  ", ".join(changed))

  def _restore(self, checkpointer):
    """(first step, state, batch iterator, saved position): from the newest readable
    checkpoint, or a fresh state at step 0."""
    state, data = self.init_state(), self.batches()
    restored = checkpointer.restore_latest(abstract(state))
    if restored is None:
      return 0, state, data, {}
    start, state, position = restored
    if position.get("next_batch") != start or "pipeline" not in position:
      raise RuntimeError(f"the checkpoint at step {start} in {self.workdir / 'checkpoints'} has "
                         f"no input-pipeline position ({position}); it was written by an older "
                         "ssm: start a new workdir")
    data.set_state(position["pipeline"])
    log.info("resumed from step %d", start)
    self._keep_schedule(position.get("schedule_steps"))
    return start, state, data, position

  def _train(self, start, state, data, checkpointer):
    """The step loop: log every log_every steps, evaluate every eval_every, save every
    checkpoint.every and at the end."""
    cfg, t = self.config, self.config.train
    if t.eval_every:  # a bad eval split or file is an error now, not at the first eval
      next(self.batches("eval"))
    batch = next(data)
    step_fn, eval_fn = self.compile_step(state, batch), self.make_eval()
    run_config = self._run_config(step_fn, batch)
    self._report_start(batch)
    writer = MetricsWriter(self.workdir, cfg.wandb, run_config, start, t.steps)
    stop, early = SignalFlag(), EarlyStop(t, cfg.checkpoint)
    metrics, last_eval, eval_step, tick, waited = {}, {}, None, time.perf_counter(), 0.0
    stopping = False
    try:
      for step in range(start, t.steps):
        if step > start:
          t0 = time.perf_counter()
          batch = next(data)
          waited += time.perf_counter() - t0
        state, metrics = step_fn(state, batch)
        done = step + 1
        writer.advance()
        if done % t.log_every == 0 or done == t.steps:
          self._check_finite(state, done, checkpointer)
          row = self._speed(batch, t.log_every if done % t.log_every == 0 else
                            done % t.log_every, time.perf_counter() - tick, waited)
          row.update({k: float(v) for k, v in metrics.items()})
          waited = 0.0
          if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            last_eval, eval_step = self.evaluate(eval_fn, state["params"]), done
            row.update(last_eval)
            early.update(last_eval)
          writer.write(done, row)
          tick = time.perf_counter()  # step times leave out evaluation
        # Every process looks for a signal at the same steps; one all-gather per log_every.
        finished = done == t.steps or early.reason
        stopping = done % t.log_every == 0 and not finished and stop.any()  # else: done
        if done % cfg.checkpoint.every == 0 or finished or stopping:
          self._check_finite(state, done, checkpointer)
          position = {"next_batch": done, "pipeline": data.get_state(),
                      "schedule_steps": self.schedule_steps}
          if early.reason:  # a rerun finds the run complete
            position["stopped"] = early.reason
          # Only an eval of this very step ranks the checkpoint for checkpoint.best_metric.
          fresh = last_eval if eval_step == done else None
          checkpointer.save(done, state, position, fresh, wait=stopping or finished)
        if early.reason:
          log.info("stopped at step %d: %s", done, early.reason)
          break
        if stopping:
          break
      writer.summary({**metrics, **last_eval})
    finally:
      stop.restore()
      writer.close()
    if stopping:
      raise Stopped(f"stopped by {stop.name or 'a signal to another process'} at step {done} "
                    f"of {t.steps}, with a checkpoint "
                    f"in {self.workdir / 'checkpoints'}: rerun the same command to resume")
    final = {k: float(v) for k, v in {**metrics, **last_eval}.items()}
    self._report_end(done, final, checkpointer)
    return final

  def _report_start(self, batch):
    """The model's size, in run.json beside config.json and on the console."""
    per_token = self.step_flops / 3 / (batch["inputs"].size if "inputs" in batch
                                      else batch["images"].shape[0])
    unit = "token" if self.pipeline.kind == "lm" else "image"
    info = {"params": self.n_params, f"forward_flops_per_{unit}": per_token,
            "train_flops_per_step": self.step_flops}
    if self.pipeline.kind == "lm":
      info["seq_len"] = batch["inputs"].shape[1]
    if jax.process_index() == 0:
      (self.workdir / "run.json").write_text(json.dumps(info, indent=1))
      at = f" at length {info['seq_len']}" if "seq_len" in info else ""
      print(f"{architecture(self.model_config)}\n{self.n_params:,} parameters; "
            f"{per_token:.3e} FLOPs per {unit} forward{at}, {self.step_flops:.3e} per "
            "training step (3x forward)", flush=True)

  def _report_end(self, step, final, checkpointer):
    """The final metrics, the best checkpoint and what the workdir holds."""
    if jax.process_index() != 0:
      return
    shown = {k: v for k, v in final.items() if k.split("/")[-1].split("@")[0] in
             ("loss", "accuracy", "bits_per_byte")}
    print(f"step {step} of {self.config.train.steps}: "
          + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()), flush=True)
    checkpointer.manager.wait_until_finished()
    steps, best = checkpointer.manager.all_steps(), checkpointer.best()
    metric = self.config.checkpoint.best_metric
    print(f"checkpoints: steps {', '.join(map(str, sorted(steps))) or 'none'}; "
          + (f"best by {metric}: step {best[0]} ({metric} {best[1]:.4g})" if best else
             f"none ranked by {metric or 'checkpoint.best_metric (empty)'}"), flush=True)
    print(f"in {self.workdir}: " + ", ".join(
        p.name + "/" * p.is_dir() for p in sorted(self.workdir.iterdir())), flush=True)

  def _run_config(self, step_fn, batch):
    """The config logged with the run: the resolved config, parameters and FLOPs.
    MFU counts the model's FLOPs (ssm.flops: forward + backward, 3x the forward);
    XLA's count is kept beside it as a check: it counts a loop body once (the
    accumulation and scan loops) and a Pallas kernel as nothing."""
    self.step_flops = self.flops_per_step(batch)
    xla = compiled_flops(step_fn) * jax.device_count()  # per device -> all
    return dict(self.config.to_dict(), params=self.n_params, flops_per_step=self.step_flops,
                xla_flops_per_step=xla, schedule_steps=self.schedule_steps)

  def _speed(self, batch, steps, elapsed, waited):
    """Step time, throughput, the fraction of time spent waiting on data, and MFU."""
    lm = self.pipeline.kind == "lm"
    inputs = batch["inputs"] if lm else batch["images"]
    per_step = inputs.shape[0] * (inputs.shape[1] if lm else 1)
    row = {"step_time": elapsed / steps, "data_wait": waited / elapsed,
           "tokens_per_sec" if lm else "images_per_sec": per_step * steps / elapsed}
    peak = peak_flops(self.config.train.peak_flops_per_device) * jax.device_count()
    if peak:
      row["mfu"] = self.step_flops * steps / elapsed / peak
    return row

  def evaluate(self, eval_fn, params):
    """The first eval_steps batches of the eval split, at the training length and
    at the task's other evaluation settings (e.g. longer sequences)."""
    out, bits_per_byte = {}, self.pipeline.bits_per_byte
    for suffix, pipeline in [("", self.pipeline), *self.pipeline.eval_variants()]:
      data = self.batches("eval", pipeline)
      sums = [eval_fn(params, next(data)) for _ in range(self.config.train.eval_steps)]
      metrics = means(jax.tree.map(lambda *x: sum(x), *sums), bits_per_byte)
      out.update({f"eval/{k}{suffix}": float(v) for k, v in metrics.items()})
    return out

  def _check_finite(self, state, step, checkpointer):
    bad = int(state["first_bad_step"])
    if bad >= 0:
      # Every checkpoint was checked before it was saved: all are from before the bad
      # loss, though the updates just before it may already have sent the parameters off.
      t, steps = self.config.train, sorted(checkpointer.manager.all_steps())
      fix = "a lower train.lr or more train.warmup_steps" + (
          " or a lower train.clip_norm" if t.clip_norm else "")
      if steps:
        where = (f"Checkpoints from before it: step {', '.join(map(str, steps))} in "
                 f"{self.workdir / 'checkpoints'}; the newest, {bad + 1 - steps[-1]} step(s) "
                 "before it, may already hold diverging parameters. Rerun with "
                 f"{fix}{'' if t.clip_norm else ' (or train.clip_norm set)'} in a new "
                 f"--workdir; or, going on from a checkpoint here (the newest, unless "
                 f"you move it out of checkpoints/), with {fix} and "
                 "--config.checkpoint.resume_changed=True.")
      else:
        where = (f"No checkpoint was saved before it (checkpoint.every="
                 f"{self.config.checkpoint.every}): rerun with {fix}"
                 f"{'' if t.clip_norm else ' (or train.clip_norm set)'}, from the start.")
      raise NonFiniteLoss(f"the loss became NaN or inf at step {bad + 1} (found at step "
                          f"{step}); stopped. {where}")


class _GlobalBatches:
  """A pipeline iterator whose batches are global jax.Arrays made from each
  process's rows."""

  def __init__(self, dataset, sharding, batch_size):
    self.iterator, self.sharding, self.batch_size = iter(dataset), sharding, batch_size

  def __next__(self):
    return {k: jax.make_array_from_process_local_data(self.sharding, v,
                                                      (self.batch_size, *v.shape[1:]))
            for k, v in next(self.iterator).items()}

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


def _differences(old, new, prefix=""):
  """The dotted keys whose values differ between two nested dicts."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}")
  return out


def _lacks(tree, dotted):
  """Whether a nested dict has no value at a dotted key."""
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return True
    tree = tree[part]
  return False


def check_model_fits_task(model_config, pipeline):
  """The model can read the task's batches and predict its labels."""
  is_lm = isinstance(model_config, LMConfig)
  if is_lm != (pipeline.kind == "lm"):
    hint = ("set task.as_sequence=True to feed images to a language model as pixel "
            "sequences" if is_lm else "use a language model (model.kind='lm')")
    raise ValueError(f"a {type(model_config).__name__} model cannot train on this "
                     f"{pipeline.kind} task: {hint}")
  if is_lm and model_config.vocab_size < pipeline.vocab_size:
    raise ValueError(f"model.vocab_size {model_config.vocab_size} is smaller than the "
                     f"task's vocabulary ({pipeline.vocab_size}); set "
                     f"model.vocab_size={pipeline.vocab_size}")
  if not is_lm:
    want = dict(num_classes=pipeline.num_classes, image_size=pipeline.size,
                channels=pipeline.info["channels"])
    wrong = {k: v for k, v in want.items() if getattr(model_config, k) != v}
    if wrong:
      raise ValueError(f"the model does not fit task.dataset={pipeline.dataset!r}: set "
                       + " ".join(f"model.{k}={v}" for k, v in wrong.items()))


def train(config, workdir):
  """Trains (or resumes) the run in `workdir`; returns the final metrics."""
  setup_distributed(config.distributed)
  return Trainer(config, workdir).run()
