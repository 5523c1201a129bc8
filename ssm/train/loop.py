"""The shared training loop: every architecture and task trains through `train`.

The model is split into a graph definition and a pure dict of parameters; the
train step is a pure function of (state, batch) under `jax.jit`, with the state
sharded over the mesh and donated. The state is a dict: step, params, opt_state,
rng. Batches come from the task's input pipeline (ssm.data.pipeline), whose
position is saved with every checkpoint.
"""

import json
import logging
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from ssm.data import make_pipeline
from ssm.flops import compiled_flops, flops, param_count
from ssm.models import LMConfig, build, config_from_dict
from ssm.train import sharding
from ssm.train.checkpoint import Checkpointer, abstract
from ssm.train.metrics import MetricsWriter, peak_flops
from ssm.train.optim import make_optimizer

log = logging.getLogger("ssm.train")


class NonFiniteLoss(RuntimeError):
  pass


def lm_loss(logits, batch):
  """Sums over the scored tokens of the next-token cross-entropy and of correct
  predictions, and their count, in float32: a batch's mean is sum / count, so
  microbatches and eval batches add up to exactly the mean over all their tokens."""
  mask = batch["loss_mask"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  correct = jnp.argmax(logits, -1) == batch["labels"]
  return dict(loss=(ce * mask).sum(), accuracy=(correct * mask).sum(), count=mask.sum())


def classification_loss(logits, batch):
  """As `lm_loss`, for one label per example."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  correct = jnp.argmax(logits, -1) == batch["labels"]
  return dict(loss=ce.sum(), accuracy=correct.sum(), count=jnp.float32(ce.shape[0]))


def forward_loss(model, batch):
  """The model on a batch of either kind (see ssm.data.pipeline): its loss sums."""
  if "images" in batch:
    return classification_loss(model(batch["images"]).astype(jnp.float32), batch)
  return lm_loss(model(batch["inputs"], batch.get("reset")).astype(jnp.float32), batch)


def scored(batch):
  """How many predictions a batch scores (the count of `forward_loss`)."""
  if "images" in batch:
    return jnp.float32(batch["labels"].shape[0])
  return batch["loss_mask"].sum()


def means(sums, bits_per_byte=False):
  """Loss sums -> the metrics: every sum divided by the count of scored predictions."""
  count = jnp.maximum(sums["count"], 1.0)
  out = {k: v / count for k, v in sums.items() if k != "count"}
  if bits_per_byte:
    out["bits_per_byte"] = out["loss"] / jnp.log(2.0)
  return out


def microbatches(batch, accum):
  """(B, ...) -> (accum, B / accum, ...), row r in microbatch r % accum: each device's
  block of rows gives a block to every microbatch, so every microbatch is split over
  all data devices and the split moves no data (a reshape to (accum, -1) would give
  each microbatch the rows of a few devices only)."""
  return jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)


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


class Trainer:
  """Builds everything a run needs from its config; `run()` trains."""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, Path(workdir).absolute()  # orbax wants absolute paths
    t = config.train
    self.mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(t.batch_size, self.mesh, t.grad_accum)
    self.pipeline = make_pipeline(config.task, t.batch_size, config.seed)
    self.model_config = config_from_dict(config.model)
    check_model_fits_task(self.model_config, self.pipeline)
    abstract_model = nnx.eval_shape(lambda: build(self.model_config, rngs=nnx.Rngs(config.seed)))
    self.graphdef, abstract_params = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_params)
    self.abstract_params = abstract_params
    self.schedule_steps = t.schedule_steps or t.steps
    self.tx, self.lr = make_optimizer(t, abstract_params, self.schedule_steps)
    self.param_shardings = sharding.param_shardings(abstract_params, self.mesh)
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
    put = lambda x: jax.device_put(x, self.replicated)
    return dict(step=put(jnp.zeros((), jnp.int32)), params=params, opt_state=opt_state,
                rng=put(jax.random.key_data(jax.random.key(seed))),
                first_bad_step=put(jnp.full((), -1, jnp.int32)))

  # --- the step ------------------------------------------------------------
  def make_step(self, state_shardings):
    graphdef, tx, lr, accum = self.graphdef, self.tx, self.lr, self.config.train.grad_accum
    bits_per_byte = self.pipeline.bits_per_byte
    batch_sharding, mesh = self.batch_sharding, self.mesh.abstract_mesh

    def loss_fn(params, batch, count):
      with jax.sharding.use_abstract_mesh(mesh):  # the mesh the layers' shard_maps use
        sums = forward_loss(nnx.merge(graphdef, params), batch)
      return sums["loss"] / count, sums

    def step_fn(state, batch):
      # The gradient of the batch's mean loss: each microbatch's loss sum is divided by
      # the whole batch's count, so the microbatches' gradients add up to it exactly.
      params, count = state["params"], jnp.maximum(scored(batch), 1.0)

      def accumulate(carry, mb):
        mb = jax.lax.with_sharding_constraint(mb, batch_sharding)  # each microbatch split
        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, count)
        return jax.tree.map(jnp.add, carry, (sums, grads)), None

      zeros = (dict.fromkeys(("loss", "accuracy", "count"), jnp.zeros(())),
               jax.tree.map(jnp.zeros_like, params))
      (sums, grads), _ = jax.lax.scan(accumulate, zeros, microbatches(batch, accum))
      metrics = means(sums, bits_per_byte)
      loss = metrics["loss"]
      updates, opt_state = tx.update(grads, state["opt_state"], params)
      params = optax.apply_updates(params, updates)
      step = state["step"]
      bad = ~jnp.isfinite(loss)
      first_bad = jnp.where((state["first_bad_step"] < 0) & bad, step, state["first_bad_step"])
      metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                     param_norm=optax.tree.norm(params), lr=lr(step))
      new_state = dict(step=step + 1, params=params, opt_state=opt_state, rng=state["rng"],
                       first_bad_step=first_bad)
      return new_state, metrics

    return jax.jit(step_fn, in_shardings=(state_shardings, self.batch_sharding),
                   out_shardings=(state_shardings, self.replicated), donate_argnums=0)

  def compile_step(self, state, batch):
    """The train step compiled ahead of time for this state and batch (once: the
    compiled step both runs and gives XLA's FLOP count)."""
    step = self.make_step(jax.tree.map(lambda x: x.sharding, state))
    return step.lower(abstract(state), abstract(batch)).compile()

  def make_eval(self):
    graphdef, mesh = self.graphdef, self.mesh.abstract_mesh

    @jax.jit
    def eval_fn(params, batch):  # loss sums: `evaluate` adds them over batches
      with jax.sharding.use_abstract_mesh(mesh):
        return forward_loss(nnx.merge(graphdef, params), batch)

    return eval_fn

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
    self.tx, self.lr = make_optimizer(t, self.abstract_params, started_with)

  def flops_per_step(self, batch):
    """Training FLOPs of one step by ssm.flops: 3x the forward (the backward is 2x)."""
    if "images" in batch:
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
    cfg, t = self.config, self.config.train
    self.workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
      (self.workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    state = self.init_state()
    checkpointer = Checkpointer(self.workdir / "checkpoints", cfg.checkpoint)
    restored = checkpointer.restore_latest(abstract(state))
    start, data = 0, self.batches()
    if restored is not None:
      start, state, position = restored
      if position.get("next_batch") != start or "pipeline" not in position:
        raise RuntimeError(f"the checkpoint at step {start} in {self.workdir / 'checkpoints'} has no "
                           f"input-pipeline position ({position}); it was written by an older "
                           "ssm: start a new workdir")
      data.set_state(position["pipeline"])
      log.info("resumed from step %d", start)
      self._keep_schedule(position.get("schedule_steps"))
    if start >= t.steps or (restored is not None and position.get("stopped")):
      log.info("the run is complete (step %d of %d%s)", start, t.steps,
               f"; stopped early: {position['stopped']}" if start < t.steps else "")
      checkpointer.close()
      path = self.workdir / "metrics.jsonl"
      rows = path.read_text().splitlines() if path.exists() else []  # train.steps=0
      return {k: v for k, v in json.loads(rows[-1]).items() if k != "step"} if rows else {}
    if t.eval_every:  # a bad eval split or file is an error now, not at the first eval
      next(self.batches("eval"))
    batch = next(data)
    step_fn, eval_fn = self.compile_step(state, batch), self.make_eval()
    inputs = batch.get("inputs", batch.get("images"))
    tokens_per_step = inputs.shape[0] * (inputs.shape[1] if "inputs" in batch else 1)
    # MFU counts the model's FLOPs (ssm.flops: forward + backward, 3x the forward);
    # XLA's count is kept beside it as a check: it counts a loop body once (the
    # accumulation and scan loops) and a Pallas kernel as nothing.
    flops_per_step = self.flops_per_step(batch)
    xla_flops_per_step = compiled_flops(step_fn) * jax.device_count()  # per device -> all
    peak = peak_flops(t.peak_flops_per_device) * jax.device_count()
    run_config = dict(cfg.to_dict(), params=self.n_params, flops_per_step=flops_per_step,
                      xla_flops_per_step=xla_flops_per_step, schedule_steps=self.schedule_steps)
    writer = MetricsWriter(self.workdir, cfg.wandb, run_config, start, t.steps)
    stop, early = _SignalFlag(), EarlyStop(t, cfg.checkpoint)
    metrics, last_eval, eval_step, tick, waited = {}, {}, None, time.perf_counter(), 0.0
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
          elapsed = time.perf_counter() - tick
          steps = t.log_every if done % t.log_every == 0 else done % t.log_every
          row = {k: float(v) for k, v in metrics.items()}
          per_sec = "tokens_per_sec" if "inputs" in batch else "images_per_sec"
          row.update(step_time=elapsed / steps, **{per_sec: tokens_per_step * steps / elapsed},
                     data_wait=waited / elapsed)  # the fraction of time spent waiting on data
          waited = 0.0
          if peak and flops_per_step:
            row["mfu"] = flops_per_step * steps / elapsed / peak
          if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            last_eval, eval_step = self.evaluate(eval_fn, state["params"]), done
            row.update(last_eval)
            early.update(last_eval)
          writer.write(done, row)
          tick = time.perf_counter()  # step times leave out evaluation
        # Every process looks for SIGTERM at the same steps; one all-gather per log_every.
        stopping = done % t.log_every == 0 and stop.any()
        finished = done == t.steps or early.reason
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
          log.warning("SIGTERM: saved the checkpoint at step %d; run the same command to "
                      "resume", done)
          print(f"stopped by SIGTERM at step {done}; checkpoint saved, rerun to resume",
                flush=True)
          break
      writer.summary({**metrics, **last_eval})
    finally:
      stop.restore()
      checkpointer.close()
      writer.close()
    return {k: float(v) for k, v in {**metrics, **last_eval}.items()}

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
      last = checkpointer.latest_step()
      raise NonFiniteLoss(
          f"the loss became NaN or inf at step {bad + 1} (found at step {step}); stopped. "
          f"The last good checkpoint is step {last} in {self.workdir / 'checkpoints'}. "
          "Lower train.lr, raise train.warmup_steps or set train.clip_norm, then rerun.")


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


class _SignalFlag:
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


def train(config, workdir):
  """Trains (or resumes) the run in `workdir`; returns the final metrics."""
  setup_distributed(config.distributed)
  return Trainer(config, workdir).run()
