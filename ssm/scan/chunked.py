"""Chunked scan: associative inside chunks of length T, state carried across chunks.

Memory is what this backend is for. The forward pass keeps one chunk's
(batch, T, channels, state) working set alive at a time. The backward pass (a
custom VJP) keeps nothing from the forward pass but its inputs: it recomputes the
chunk-boundary states, (batch, L/T, channels, state), and walks the chunks in
reverse, recomputing each chunk's states as the official CUDA kernel does.
Channels are independent, so both passes run over blocks of channels in turn to
bound the working set; with the default block size memory hardly grows with N.
"""

import functools

import jax
import jax.numpy as jnp

from ssm.scan import associative

DEFAULT_CHUNK_SIZE = 64
# Elements of one (batch, T, channel_block, state) float32 tensor (4 MiB).
WORKING_SET = 1 << 20


def default_channel_block(batch, chunk, channels, state):
  return max(1, min(channels, WORKING_SET // (batch * chunk * state)))


def scan(u_BLD, delta_BLD, A_DN, B_BLN, C_BLN, keep_BL, h0_BDN, *,
         chunk_size=None, channel_block=None):
  """Returns (y (B, L, D), h_L (B, D, N)); same core as `reference.scan`."""
  b, L, D = u_BLD.shape
  N = A_DN.shape[1]
  T = min(chunk_size or DEFAULT_CHUNK_SIZE, L)
  K = min(channel_block or default_channel_block(b, T, D, N), D)
  nc, nk = -(-L // T), -(-D // K)
  Lp, Dp = nc * T, nk * K

  # Padded steps have delta = 0 and keep = 1: the identity map on the state.
  # Padded channels have u = delta = A = 0 and are sliced off.
  def blocks(x_BLD):  # -> (nk, nc, b, T, K)
    x = _pad(_pad(x_BLD, 1, Lp), 2, Dp)
    return x.reshape(b, nc, T, nk, K).transpose(3, 1, 0, 2, 4)

  def chunks(x_BL, value=0.0):  # (b, L, ...) -> (nc, b, T, ...)
    x = _pad(x_BL, 1, Lp, value)
    return x.reshape(b, nc, T, *x.shape[2:]).swapaxes(0, 1)

  u, delta = blocks(u_BLD), blocks(delta_BLD)
  B, C, keep = chunks(B_BLN), chunks(C_BLN), chunks(keep_BL, 1.0)
  A = _pad(A_DN, 0, Dp).reshape(nk, K, N)
  h0 = _pad(h0_BDN, 1, Dp).reshape(b, nk, K, N).swapaxes(0, 1)

  def one_block(xs):
    u_k, delta_k, A_k, h0_k = xs
    return _scan_block(u_k, delta_k, A_k, B, C, keep, h0_k)

  y, hT = jax.lax.map(one_block, (u, delta, A, h0))
  y_BLD = y.transpose(2, 1, 3, 0, 4).reshape(b, Lp, Dp)[:, :L, :D]
  hT_BDN = hT.swapaxes(0, 1).reshape(b, Dp, N)[:, :D]
  return y_BLD, hT_BDN


def _pad(x, axis, size, value=0.0):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _chunk(h_BKN, u_BTK, delta_BTK, A_KN, B_BTN, C_BTN, keep_BT):
  y_BTK, h_BKN = associative.scan(u_BTK, delta_BTK, A_KN, B_BTN, C_BTN, keep_BT, h_BKN)
  return h_BKN, y_BTK


def _forward(u, delta, A, B, C, keep, h0):
  def body(h, xs):
    u_c, delta_c, B_c, C_c, keep_c = xs
    return _chunk(h, u_c, delta_c, A, B_c, C_c, keep_c)
  return jax.lax.scan(body, h0, (u, delta, B, C, keep))


def _chunk_starts(u, delta, A, B, C, keep, h0):
  """The state entering each chunk, (nc, b, K, N): the only N-sized residual."""
  def body(h, xs):
    u_c, delta_c, B_c, C_c, keep_c = xs
    return _chunk(h, u_c, delta_c, A, B_c, C_c, keep_c)[0], h
  return jax.lax.scan(body, h0, (u, delta, B, C, keep))[1]


@jax.custom_vjp
def _scan_block(u, delta, A, B, C, keep, h0):
  """One block of K channels over all chunks. Chunk-major inputs:
  u, delta (nc, b, T, K); A (K, N); B, C (nc, b, T, N); keep (nc, b, T); h0 (b, K, N).
  Returns y (nc, b, T, K) and the final state (b, K, N)."""
  hT, y = _forward(u, delta, A, B, C, keep, h0)
  return y, hT


def _scan_block_fwd(u, delta, A, B, C, keep, h0):
  return _scan_block(u, delta, A, B, C, keep, h0), (u, delta, A, B, C, keep, h0)


def _scan_block_bwd(residuals, cotangents):
  u, delta, A, B, C, keep, h0 = residuals
  dy, dhT = cotangents
  h_starts = _chunk_starts(*residuals)

  def body(carry, xs):
    dh, dA = carry
    h, u_c, delta_c, B_c, C_c, keep_c, dy_c = xs
    chunk = functools.partial(_chunk, keep_BT=keep_c)
    _, vjp = jax.vjp(chunk, h, u_c, delta_c, A, B_c, C_c)
    dh, du, ddelta, dA_c, dB, dC = vjp((dh, dy_c))
    return (dh, dA + dA_c), (du, ddelta, dB, dC)

  xs = (h_starts, u, delta, B, C, keep, dy)
  (dh0, dA), (du, ddelta, dB, dC) = jax.lax.scan(
      body, (dhT, jnp.zeros_like(A)), xs, reverse=True)
  return du, ddelta, dA, dB, dC, jnp.zeros_like(keep), dh0


_scan_block.defvjp(_scan_block_fwd, _scan_block_bwd)
