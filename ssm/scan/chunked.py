"""Chunked scan: associative inside tiles of T steps x K channels, state carried
from tile to tile along the sequence.

Memory is what this backend is for. It is the fused kernel's algorithm written
in XLA: everything, from softplus to the z gate, happens one tile at a time, so
no (batch, length, channels, state) tensor and no float32 copy of a
(batch, length, channels) input is ever made. The forward pass writes y tile by
tile. The backward pass (a custom VJP) keeps nothing but the inputs: per block of
channels it recomputes the chunk-boundary states, (L/T, batch, K, state), then
walks the chunks in reverse, recomputing each tile's states as the official CUDA
kernel does. K is chosen so that a tile's (batch, T, K, state) working set stays
within `WORKING_SET` elements: once a tile reaches that budget, memory no
longer grows with N.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ssm.scan import associative, common

DEFAULT_CHUNK_SIZE = 16
# Elements of one (batch, T, K, state) tile: 256 KiB in float32 on CPU, where it
# keeps memory low; 16 MiB on accelerators, where fewer, larger tiles run faster.
WORKING_SET = {"cpu": 1 << 16, "other": 1 << 22}


class Tiling(NamedTuple):
  chunk: int  # T
  block: int  # K
  delta_softplus: bool


def default_channel_block(batch, chunk, channels, state):
  """The largest K within the working set, preferring a divisor of `channels`."""
  budget = WORKING_SET["cpu" if jax.default_backend() == "cpu" else "other"]
  target = max(1, min(channels, budget // (batch * chunk * state)))
  divisor = max(k for k in range(1, target + 1) if channels % k == 0)
  return divisor if 2 * divisor > target else target


def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, keep, h0, *,
         chunk_size=None, channel_block=None):
  """A backend (see `ssm.scan.common`): returns (y in u's dtype, h_L in float32)."""
  b, L, Dch = u.shape
  N = A.shape[1]
  T = min(chunk_size or DEFAULT_CHUNK_SIZE, L)
  K = min(channel_block or default_channel_block(b, T, Dch, N), Dch)
  Lp, Dp = -(-L // T) * T, -(-Dch // K) * K
  D = jnp.zeros((Dch,), jnp.float32) if D is None else D
  delta_bias = jnp.zeros((Dch,), jnp.float32) if delta_bias is None else delta_bias

  # Padded steps have delta = 0 (no softplus) and keep = 1: the identity on the
  # state. Padded channels have u = delta = A = 0 and are sliced off.
  pad_l = lambda x, value=0.0: _pad(x, 1, Lp, value)
  pad_d = lambda x, axis: _pad(x, axis, Dp)
  if delta_softplus and Lp > L:
    delta = jnp.where(jnp.arange(Lp)[:, None] < L, pad_l(delta), -jnp.inf).astype(delta.dtype)
  else:
    delta = pad_l(delta)
  padded = dict(
      u=pad_d(pad_l(u), 2), delta=pad_d(delta, 2), z=None if z is None else pad_d(pad_l(z), 2),
      A=pad_d(A, 0), B=pad_l(B), C=pad_l(C), D=pad_d(D, 0), delta_bias=pad_d(delta_bias, 0),
      keep=pad_l(keep, 1.0), h0=pad_d(h0, 1))
  y, hT = _scan(Tiling(T, K, delta_softplus), **padded)
  return y[:, :L, :Dch], hT[:, :Dch]


def _pad(x, axis, size, value=0.0):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def doubling_scan(u, delta, A, B, C, keep, h0):
  """The recurrence over one tile by recursive doubling (Hillis-Steele): log2(T)
  steps, each composing every step's map with the one `shift` steps before it.

  Shifts only, no strided slices: `lax.associative_scan` inside the dynamically
  sliced tile loop gave wrong gradients under XLA:CPU (jax 0.10.2; the same
  scan outside the loop, as the associative backend runs it, is right)."""
  a, b = associative.discretize(u, delta, A, B, keep)
  T, shift = a.shape[1], 1
  while shift < T:
    b = a * _shift(b, shift, 0.0) + b
    a = a * _shift(a, shift, 1.0)
    shift *= 2
  h = b + a * h0[:, None]
  return jnp.sum(h * C[:, :, None, :], axis=-1), h[:, -1]


def _shift(x, n, fill):
  """x moved n steps later along axis 1, the first n steps filled with `fill`. One
  lax.pad (low n, high -n): built from a concatenate instead, XLA:CPU (jax 0.10.2)
  gave wrong values inside the tile loop for some shapes (batch 2, T 6, K 1, N 2:
  tests/test_scan.py::test_chunked_shift_shapes)."""
  widths = [(0, 0, 0)] * x.ndim
  widths[1] = (n, -n, 0)
  return jax.lax.pad(x, jnp.asarray(fill, x.dtype), widths)


def _tile(h, u, delta, z, A, B, C, D, delta_bias, keep, delta_softplus):
  """One tile, h (b, K, N) -> (h (b, K, N), y (b, T, K) in u's dtype)."""
  run = common.backend(doubling_scan)
  y, h = run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, keep, h)
  return h, y


class _Slicer:
  """Reads and writes the tile (chunk c, channel block k) of the padded arrays."""

  def __init__(self, tiling, k):
    self.T, self.K, self.k = tiling.chunk, tiling.block, k

  def channels(self, x, axis):  # a (..., Dp, ...) parameter -> its block
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, self.k * self.K, self.K, axis)

  def steps(self, x, c):  # (b, Lp, ...) -> (b, T, ...)
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, c * self.T, self.T, 1)

  def tile(self, x, c):  # (b, Lp, Dp) -> (b, T, K)
    return None if x is None else self.channels(self.steps(x, c), 2)

  def put(self, x, tile, c):
    return jax.lax.dynamic_update_slice(x, tile.astype(x.dtype), (0, c * self.T, self.k * self.K))

  def block_args(self, A, D, delta_bias, h0):
    return (self.channels(A, 0), self.channels(D, 0), self.channels(delta_bias, 0),
            self.channels(h0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(tiling, u, delta, z, A, B, C, D, delta_bias, keep, h0):
  b, Lp, Dp = u.shape
  nc, nk = Lp // tiling.chunk, Dp // tiling.block

  def block(k, carry):
    y, hT = carry
    s = _Slicer(tiling, k)
    A_k, D_k, bias_k, h = s.block_args(A, D, delta_bias, h0)

    def chunk(c, carry):
      h, y = carry
      h, y_c = _tile(h, s.tile(u, c), s.tile(delta, c), s.tile(z, c), A_k, s.steps(B, c),
                     s.steps(C, c), D_k, bias_k, s.steps(keep, c), tiling.delta_softplus)
      return h, s.put(y, y_c, c)

    h, y = jax.lax.fori_loop(0, nc, chunk, (h, y))
    return y, jax.lax.dynamic_update_slice_in_dim(hT, h, k * tiling.block, 1)

  return jax.lax.fori_loop(0, nk, block, (jnp.zeros_like(u), jnp.zeros_like(h0)))


def _scan_fwd(tiling, u, delta, z, A, B, C, D, delta_bias, keep, h0):
  out = _scan(tiling, u, delta, z, A, B, C, D, delta_bias, keep, h0)
  return out, (u, delta, z, A, B, C, D, delta_bias, keep, h0)


def _scan_bwd(tiling, residuals, cotangents):
  u, delta, z, A, B, C, D, delta_bias, keep, h0 = residuals
  dy, dhT = cotangents
  nc, nk = u.shape[1] // tiling.chunk, u.shape[2] // tiling.block
  zeros32 = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)
  # Gradients of B and C sum over channel blocks: accumulate them in float32.
  grads = dict(u=jnp.zeros_like(u), delta=jnp.zeros_like(delta),
               z=None if z is None else jnp.zeros_like(z), A=zeros32(A), B=zeros32(B),
               C=zeros32(C), D=zeros32(D), delta_bias=zeros32(delta_bias), h0=zeros32(h0))

  def block(k, grads):
    s = _Slicer(tiling, k)
    A_k, D_k, bias_k, h0_k = s.block_args(A, D, delta_bias, h0)

    def tile_fn(c):
      return functools.partial(_tile, keep=s.steps(keep, c), delta_softplus=tiling.delta_softplus)

    def tile_args(c):
      return (s.tile(u, c), s.tile(delta, c), s.tile(z, c), A_k, s.steps(B, c), s.steps(C, c),
              D_k, bias_k)

    def chunk_start(h, c):  # recompute the state entering each chunk
      return tile_fn(c)(h, *tile_args(c))[0], h

    starts = jax.lax.scan(chunk_start, h0_k, jnp.arange(nc))[1]

    def chunk(i, carry):
      c = nc - 1 - i
      dh, g, dA, dD, dbias = carry
      _, vjp = jax.vjp(tile_fn(c), starts[c], *tile_args(c))
      dh, du, ddelta, dz, dA_c, dB, dC, dD_c, dbias_c = vjp((dh, s.tile(dy, c)))
      g = dict(g, u=s.put(g["u"], du, c), delta=s.put(g["delta"], ddelta, c))
      if dz is not None:
        g["z"] = s.put(g["z"], dz, c)
      for name, d in (("B", dB), ("C", dC)):
        g[name] = jax.lax.dynamic_update_slice_in_dim(
            g[name], s.steps(g[name], c) + d, c * tiling.chunk, 1)
      return dh, g, dA + dA_c, dD + dD_c, dbias + dbias_c

    zero_k = lambda x: jnp.zeros_like(x)
    carry = (s.channels(dhT, 1), grads, zero_k(A_k), zero_k(D_k), zero_k(bias_k))
    dh0, grads, dA, dD, dbias = jax.lax.fori_loop(0, nc, chunk, carry)
    start = k * tiling.block
    put = lambda x, v, axis: jax.lax.dynamic_update_slice_in_dim(x, v, start, axis)
    return dict(grads, A=put(grads["A"], dA, 0), D=put(grads["D"], dD, 0),
                delta_bias=put(grads["delta_bias"], dbias, 0), h0=put(grads["h0"], dh0, 1))

  g = jax.lax.fori_loop(0, nk, block, grads)
  return (g["u"], g["delta"], g["z"], g["A"], g["B"].astype(B.dtype), g["C"].astype(C.dtype),
          g["D"], g["delta_bias"], jnp.zeros_like(keep), g["h0"])


_scan.defvjp(_scan_fwd, _scan_bwd)
