"""Initialisers the mixers share: PyTorch's defaults (which the official checkpoints
were trained from) and the dt bias of the selective SSMs."""

import math

import jax
import jax.numpy as jnp
from flax import nnx


def torch_linear_init():
  """PyTorch's default nn.Linear / nn.Conv1d weight init: U(+-1/sqrt(fan_in))."""
  return nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def uniform(bound):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def dt_bias_init(dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
  """softplus^-1 of dt ~ log-uniform in [dt_min, dt_max], floored at dt_init_floor:
  the scan's softplus(0 + bias) then starts at that dt."""
  log_min, log_max = math.log(dt_min), math.log(dt_max)

  def init(key, shape, dtype=jnp.float32):
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (log_max - log_min) + log_min)
    dt = jnp.maximum(dt, dt_init_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init
