"""Normalisation layers. Statistics in float32 whatever the input dtype."""

import jax
import jax.numpy as jnp
from flax import nnx

from ssm.layers import partitioning


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * weight, as mamba_ssm's and Llama's RMSNorm."""

  def __init__(self, dim, *, eps=1e-5, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = partitioning.param(jnp.ones((dim,), param_dtype), (None,), decay=False)

  def __call__(self, x, dtype=None):
    """Normalises the last axis; returns `dtype` (default: x's dtype)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...].astype(jnp.float32)).astype(dtype or x.dtype)


class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * weight + bias, statistics in float32."""

  def __init__(self, dim, *, eps=1e-5, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = partitioning.param(jnp.ones((dim,), param_dtype), (None,), decay=False)
    self.bias = partitioning.param(jnp.zeros((dim,), param_dtype), (None,), decay=False)

  def __call__(self, x, dtype=None):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...] + self.bias[...]).astype(dtype or x.dtype)


def make_norm(kind, dim, eps):
  """"rms" or "layer"."""
  if kind == "rms":
    return RMSNorm(dim, eps=eps)
  if kind == "layer":
    return LayerNorm(dim, eps=eps)
  raise ValueError(f"norm {kind!r}: expected 'rms' or 'layer'")
