"""Parameter (and, later, FLOP) accounting, from the models' abstract shapes."""

import math

import jax
from flax import nnx

from ssm.models import build


def abstract_model(config):
  """The model a config builds, with shapes and dtypes only: nothing allocated."""
  return nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0)))


def param_count(config, embeddings=True):
  """Exact parameter count. Without `embeddings`, token and position embeddings
  (the lookup tables; a tied head is the token embedding) are left out."""
  model = abstract_model(config)
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if not embeddings:
    for name in ("embedding", "position_embedding"):
      table = getattr(model, name, None)
      if isinstance(table, nnx.Embed):
        table = table.embedding
      if isinstance(table, nnx.Param):
        total -= math.prod(table.shape)
  return total
