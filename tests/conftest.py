import importlib
import os

import pytest


def require(module):
  """Imports an optional test dependency; in CI a missing one fails instead of skipping."""
  if os.environ.get("CI"):
    return importlib.import_module(module)
  return pytest.importorskip(module)


def fit(model, batches, kind="lm", lr=3e-3):
  """Steps of the library's train step (ssm.train.step) on `batches`, dicts as the
  pipelines make them; AdamW at a constant `lr`. Returns the losses."""
  import jax
  from flax import nnx

  from ssm.config import base
  from ssm.train.optim import make_optimizer
  from ssm.train.sharding import batch_sharding, make_mesh
  from ssm.train.step import new_state, train_step

  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  t = base().train
  t.update(dict(lr=lr, schedule="constant", warmup_steps=0, weight_decay=1e-4, b2=0.999,
                clip_norm=0.0))
  tx, schedule = make_optimizer(t, state)
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  step = jax.jit(train_step(graphdef, tx, schedule, 1, batch_sharding(mesh), kind))
  state, losses = new_state(params, tx.init(params)), []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses
