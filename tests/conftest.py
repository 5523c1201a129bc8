import importlib
import os

import pytest


def require(module):
  """Imports an optional test dependency; in CI a missing one fails instead of skipping."""
  if os.environ.get("CI"):
    return importlib.import_module(module)
  return pytest.importorskip(module)


def fit(model, loss_fn, batches, lr=3e-3):
  """A few AdamW steps (until the shared training loop exists); returns the losses."""
  import optax
  from flax import nnx

  optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss

  return [float(step(model, optimizer, batch)) for batch in batches]
