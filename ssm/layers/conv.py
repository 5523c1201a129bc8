"""The short causal depthwise convolution of the recurrent mixers (Mamba's x, Mamba-2's
x, B and C): over a whole sequence, its decoding state (the last K-1 inputs, oldest
first) and one step from that state. Any number of channels, bias optional.

Shapes: B batch, L length, E channels, K kernel width (the state holds K-1 steps).
"""

import math

import jax.numpy as jnp

from ssm.layers import partitioning
from ssm.layers.init import uniform


def conv_params(kernel_size, channels, axis, *, use_bias, param_dtype, rngs):
  """(weight (K, E), bias (E,) or None), initialised as PyTorch's depthwise nn.Conv1d
  (fan-in K: U(+-1/sqrt(K))); `axis` is the channels' logical axis."""
  init = uniform(1 / math.sqrt(kernel_size))
  weight = partitioning.param(init(rngs.params(), (kernel_size, channels), param_dtype),
                              (None, axis))
  bias = (partitioning.param(init(rngs.params(), (channels,), param_dtype), (axis,), decay=False)
          if use_bias else None)
  return weight, bias


def causal_conv1d(x_BLE, weight_KE, bias_E=None, reset_BL=None):
  """Depthwise causal convolution: y_t = sum_k w_k x_{t-K+1+k} (+ bias).

  Where `reset` marks a document start, taps never reach into the previous
  document. Accumulates in float32; returns x's dtype."""
  K = weight_KE.shape[0]
  L = x_BLE.shape[1]
  x_pad = jnp.pad(x_BLE.astype(jnp.float32), ((0, 0), (K - 1, 0), (0, 0)))
  w = weight_KE.astype(jnp.float32)
  if reset_BL is not None:
    doc_BL = jnp.cumsum(reset_BL, axis=1)
    doc_pad = jnp.pad(doc_BL, ((0, 0), (K - 1, 0)), constant_values=-1)
  y = jnp.zeros(x_BLE.shape, jnp.float32)
  for k in range(K):
    tap = x_pad[:, k:k + L] * w[k]
    if reset_BL is not None:
      tap = jnp.where((doc_pad[:, k:k + L] == doc_BL)[..., None], tap, 0.0)
    y = y + tap
  if bias_E is not None:
    y = y + bias_E.astype(jnp.float32)
  return y.astype(x_BLE.dtype)


def init_conv_state(batch, kernel_size, channels, dtype):
  """The state before any input: K-1 zeros."""
  return jnp.zeros((batch, kernel_size - 1, channels), dtype)


def conv_final_state(x_BLE, kernel_size, reset_BL=None):
  """The state after x (B, K-1, E): its last K-1 inputs, zeros where x is shorter and
  where they precede the last document's start (they never reach later tokens)."""
  K, L = kernel_size, x_BLE.shape[1]
  start, pad = max(L - K + 1, 0), max(K - 1 - L, 0)
  state_BKE = jnp.pad(x_BLE[:, start:], ((0, 0), (pad, 0), (0, 0)))
  if reset_BL is not None:
    doc_BL = jnp.cumsum(reset_BL, axis=1)
    in_last_BK = jnp.pad((doc_BL == doc_BL[:, -1:])[:, start:], ((0, 0), (pad, 0)))
    state_BKE = jnp.where(in_last_BK[..., None], state_BKE, 0)
  return state_BKE


def conv_step(conv_state_BKE, x_BE, weight_KE, bias_E=None):
  """One token of `causal_conv1d`: y (B, E) in float32 (an activation can follow before
  rounding) and the state with x appended, the oldest input dropped."""
  window_BKE = jnp.concatenate([conv_state_BKE, x_BE[:, None].astype(conv_state_BKE.dtype)],
                               axis=1)
  y_BE = jnp.sum(window_BKE.astype(jnp.float32) * weight_KE.astype(jnp.float32), axis=1)
  if bias_E is not None:
    y_BE = y_BE + bias_E.astype(jnp.float32)
  return y_BE, window_BKE[:, 1:]
