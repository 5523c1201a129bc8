"""The shared training loop: every architecture and task trains through `train`.

The model is split into a graph definition and a pure dict of parameters; the
train step is a pure function of (state, batch) under `jax.jit`, with the state
sharded over the mesh and donated. The state is a dict: step, params, opt_state,
rng. Batches are functions of (seed, index), so the data position is the step.
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

from ssm.data import make_task
from ssm.flops import compiled_flops, param_count
from ssm.models import build, config_from_dict
from ssm.train import sharding
from ssm.train.checkpoint import Checkpointer, abstract
from ssm.train.metrics import MetricsWriter, peak_flops
from ssm.train.optim import make_optimizer

log = logging.getLogger("ssm.train")


class NonFiniteLoss(RuntimeError):
  pass


def lm_loss(logits, batch):
  """Masked next-token cross-entropy and accuracy, in float32."""
  mask = batch["loss_mask"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  correct = jnp.argmax(logits, -1) == batch["labels"]
  total = jnp.maximum(mask.sum(), 1.0)
  return (ce * mask).sum() / total, dict(accuracy=(correct * mask).sum() / total)


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
    self.task = make_task(config.task, t.batch_size, config.seed)
    self.model_config = config_from_dict(config.model)
    abstract_model = nnx.eval_shape(lambda: build(self.model_config, rngs=nnx.Rngs(config.seed)))
    self.graphdef, abstract_params = nnx.split(abstract_model)
    abstract_params = nnx.to_pure_dict(abstract_params)
    self.tx, self.lr = make_optimizer(t, abstract_params)
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
    batch_sharding = self.batch_sharding

    def loss_fn(params, batch):
      logits = nnx.merge(graphdef, params)(batch["inputs"])
      loss, metrics = lm_loss(logits, batch)
      return loss, metrics

    def step_fn(state, batch):
      params = state["params"]
      micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

      def accumulate(carry, mb):
        mb = jax.lax.with_sharding_constraint(mb, batch_sharding)  # each microbatch split
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      init = (jnp.zeros(()), {"accuracy": jnp.zeros(())}, zeros)
      (loss, metrics, grads), _ = jax.lax.scan(accumulate, init, micro)
      loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))
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

  def compile_step(self, state):
    """The train step compiled ahead of time for this state and batch (once: the
    compiled step both runs and gives XLA's FLOP count)."""
    B = self.config.train.batch_size
    batch = {k: jax.ShapeDtypeStruct((B, *v.shape[1:]), v.dtype, sharding=self.batch_sharding)
             for k, v in self.task.batch(0, slice(0, 1)).items()}
    step = self.make_step(jax.tree.map(lambda x: x.sharding, state))
    return step.lower(abstract(state), batch).compile()

  def make_eval(self):
    graphdef = self.graphdef

    @jax.jit
    def eval_fn(params, batch):
      loss, metrics = lm_loss(nnx.merge(graphdef, params)(batch["inputs"]), batch)
      return dict(metrics, loss=loss)

    return eval_fn

  # --- data ----------------------------------------------------------------
  def global_batch(self, index, split="train"):
    """This process makes only its own rows; together they form the global batch."""
    B = self.config.train.batch_size
    rows = self._process_rows(B)
    local = self.task.batch(index, rows, split)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v,
                                                      (B, *v.shape[1:]))
            for k, v in local.items()}

  def _process_rows(self, B):
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
    start = 0
    if restored is not None:
      start, state, data = restored
      assert data["next_batch"] == start, data
      log.info("resumed from step %d", start)
    step_fn, eval_fn = self.compile_step(state), self.make_eval()
    tokens_per_step = t.batch_size * self.task.seq_len
    flops_per_step = compiled_flops(step_fn) * jax.device_count()  # per device -> all
    peak = peak_flops(t.peak_flops_per_device) * jax.device_count()
    run_config = dict(cfg.to_dict(), params=self.n_params, flops_per_step=flops_per_step)
    writer = MetricsWriter(self.workdir, cfg.wandb, run_config, start, t.steps)
    stop = _SignalFlag()
    metrics, last_eval, tick = {}, {}, time.perf_counter()
    try:
      for step in range(start, t.steps):
        state, metrics = step_fn(state, self.global_batch(step))
        done = step + 1
        writer.advance()
        if done % t.log_every == 0 or done == t.steps:
          self._check_finite(state, done, checkpointer)
          elapsed, tick = time.perf_counter() - tick, time.perf_counter()
          steps = t.log_every if done % t.log_every == 0 else done % t.log_every
          row = {k: float(v) for k, v in metrics.items()}
          row.update(step_time=elapsed / steps, tokens_per_sec=tokens_per_step * steps / elapsed)
          if peak and flops_per_step:
            row["mfu"] = flops_per_step * steps / elapsed / peak
          if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            last_eval = self.evaluate(eval_fn, state["params"])
            row.update(last_eval)
          writer.write(done, row)
        stopping = stop.any()
        if done % cfg.checkpoint.every == 0 or done == t.steps or stopping:
          self._check_finite(state, done, checkpointer)
          checkpointer.save(done, state, {"next_batch": done}, last_eval,
                            wait=stopping or done == t.steps)
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
    rows = [eval_fn(params, self.global_batch(i, "eval"))
            for i in range(self.config.train.eval_steps)]
    return {f"eval/{k}": float(np.mean([float(r[k]) for r in rows])) for k in rows[0]}

  def _check_finite(self, state, step, checkpointer):
    bad = int(state["first_bad_step"])
    if bad >= 0:
      last = checkpointer.latest_step()
      raise NonFiniteLoss(
          f"the loss became NaN or inf at step {bad + 1} (found at step {step}); stopped. "
          f"The last good checkpoint is step {last} in {self.workdir / 'checkpoints'}. "
          "Lower train.lr, raise train.warmup_steps or set train.clip_norm, then rerun.")


class _SignalFlag:
  """SIGTERM (preemption) sets a flag; every process agrees on it each step."""

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
