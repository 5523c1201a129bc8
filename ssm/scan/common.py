"""What every backend shares: the discretisation step, the D skip and z gate, the
wrapper that turns a bare recurrence into a backend, and the argument checks.

A recurrence takes float32 (u, delta, A, B, C, keep, h0), delta already
softplus'd, and returns (y = <h_t, C_t> (B, L, D), h_L (B, D, N)). A backend takes
the scan's own arguments (inputs in their dtype, A, D and delta_bias in float32,
`keep` = 1 - reset, h0 never None) and returns (y in u's dtype, h_L in float32).
"""

import jax
import jax.numpy as jnp


def discretize(delta, delta_bias, delta_softplus):
  if delta_bias is not None:
    delta = delta + delta_bias
  return jax.nn.softplus(delta) if delta_softplus else delta


def gate(y, u, D, z):
  if D is not None:
    y = y + D * u
  if z is not None:
    y = y * jax.nn.silu(z)
  return y


def f32(x):
  return None if x is None else x.astype(jnp.float32)


def backend(recurrence):
  """The backend that runs `recurrence` over the whole sequence at once."""

  def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, keep, h0):
    u32 = f32(u)
    y, hT = recurrence(u32, discretize(f32(delta), delta_bias, delta_softplus), A,
                       f32(B), f32(C), keep, h0)
    return gate(y, u32, D, f32(z)).astype(u.dtype), hT

  return scan


def check(name, x, shape, names, like=None):
  """An optional float argument of a public scan: its shape, and its dtype against
  `like` (a (name, array) pair)."""
  if x is None:
    return
  if jnp.shape(x) != tuple(shape):
    raise ValueError(f"{name}: expected shape {names} = {tuple(shape)}, got {jnp.shape(x)}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"{name}: expected a floating dtype, got {jnp.result_type(x)}")
  if like is not None and jnp.result_type(x) != jnp.result_type(like[1]):
    raise TypeError(f"{name}: dtype {jnp.result_type(x)} differs from {like[0]}'s "
                    f"{jnp.result_type(like[1])}; pass both in one dtype")


def check_reset(reset, batch, length):
  """An optional `reset` mask: (batch, length), bool (or integer)."""
  if reset is None:
    return
  if jnp.shape(reset) != (batch, length):
    raise ValueError(f"reset: expected shape (batch, length) = {(batch, length)}, "
                     f"got {jnp.shape(reset)}")
  if not (jnp.issubdtype(reset.dtype, jnp.bool_) or jnp.issubdtype(reset.dtype, jnp.integer)):
    raise TypeError(f"reset: expected a bool mask, got dtype {reset.dtype}")
