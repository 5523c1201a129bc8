"""The train step and the eval step, pure functions of (state or params, batch) for
`jax.jit`; the loop (ssm.train.loop) compiles them with its shardings.

Losses are sums with their count (`forward_loss`), so that microbatches and eval
batches add up to exactly the mean over all their scored tokens.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


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


def forward_loss(model, batch, kind):
  """The model on a batch of the pipeline's `kind` ("lm" or "image", see
  ssm.data.pipeline): its loss sums."""
  if kind == "image":
    return classification_loss(model(batch["images"]).astype(jnp.float32), batch)
  return lm_loss(model(batch["inputs"], batch.get("reset")).astype(jnp.float32), batch)


def scored(batch, kind):
  """How many predictions a batch scores (the count of `forward_loss`)."""
  if kind == "image":
    return jnp.float32(batch["labels"].shape[0])
  return batch["loss_mask"].sum()


def means(sums, bits_per_byte=0.0):
  """Loss sums -> the metrics: every sum divided by the count of scored predictions.
  `bits_per_byte`: scored tokens per byte of text (True: 1, bytes), or 0: no such metric."""
  count = jnp.maximum(sums["count"], 1.0)
  out = {k: v / count for k, v in sums.items() if k != "count"}
  if bits_per_byte:
    out["bits_per_byte"] = out["loss"] * float(bits_per_byte) / jnp.log(2.0)
  return out


def microbatches(batch, accum):
  """(B, ...) -> (accum, B / accum, ...), row r in microbatch r % accum: each device's
  block of rows gives a block to every microbatch, so every microbatch is split over
  all data devices and the split moves no data (a reshape to (accum, -1) would give
  each microbatch the rows of a few devices only)."""
  return jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def new_state(params, opt_state, put=lambda x: x):
  """The state `train_step` steps (a dict): step, params, opt_state and first_bad_step
  (-1 while every loss has been finite). `put` places the scalars (the loop
  replicates them over its mesh)."""
  return dict(step=put(jnp.zeros((), jnp.int32)), params=params, opt_state=opt_state,
              first_bad_step=put(jnp.full((), -1, jnp.int32)))


def train_step(graphdef, tx, lr, accum, batch_sharding, kind="lm", bits_per_byte=False):
  """step(state, batch) -> (state, metrics): the gradient of the batch's mean loss over
  `accum` microbatches, an optimizer update, and where the loss first went non-finite.
  The state is `new_state`'s dict."""
  mesh = batch_sharding.mesh.abstract_mesh

  def loss_fn(params, batch, count):
    with jax.sharding.use_abstract_mesh(mesh):  # the mesh the layers' shard_maps use
      sums = forward_loss(nnx.merge(graphdef, params), batch, kind)
    return sums["loss"] / count, sums

  def step_fn(state, batch):
    # Each microbatch's loss sum is divided by the whole batch's count, so the
    # microbatches' gradients add up to the gradient of the batch's mean exactly.
    params, count = state["params"], jnp.maximum(scored(batch, kind), 1.0)

    def accumulate(carry, mb):
      mb = jax.lax.with_sharding_constraint(mb, batch_sharding)  # each microbatch split
      (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, count)
      return jax.tree.map(jnp.add, carry, (sums, grads)), None

    zeros = (dict.fromkeys(("loss", "accuracy", "count"), jnp.zeros(())),
             jax.tree.map(jnp.zeros_like, params))
    (sums, grads), _ = jax.lax.scan(accumulate, zeros, microbatches(batch, accum))
    metrics = means(sums, bits_per_byte)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    step = state["step"]
    bad = ~jnp.isfinite(metrics["loss"])
    first_bad = jnp.where((state["first_bad_step"] < 0) & bad, step, state["first_bad_step"])
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   lr=lr(step))
    return dict(state, step=step + 1, params=params, opt_state=opt_state,
                first_bad_step=first_bad), metrics

  return step_fn


def eval_step(graphdef, mesh, kind="lm"):
  """eval(params, batch) -> the loss sums (the loop adds them over batches)."""
  def eval_fn(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return forward_loss(nnx.merge(graphdef, params), batch, kind)
  return eval_fn
