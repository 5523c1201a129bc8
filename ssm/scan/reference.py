"""The specification backend: one recurrence step at a time with `lax.scan`.

Every backend computes the same core on float32 inputs whose delta is already
softplus'd (see `ssm.scan.core`):

    h_t = keep_t * exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t
    y_t = sum_n h_t[:, n] * C_t[n]

`keep_t` is 0 where a new document starts (the scan's `reset`), else 1.

`recurrence` is the specification, differentiated by JAX. `scan` computes the same
forward and carries its hand-derived backward: a reverse `lax.scan` over the saved
states, about twice as fast as XLA's transpose of the forward loop on CPU, where
this backend is the default. tests/test_scan.py holds the two to each other.
`step` is one step in the public (B, D, N) state layout, for decoding.
"""

import jax
import jax.numpy as jnp


def step(h_BDN, u_BD, delta_BD, A_DN, B_BN, C_BN, keep_B):
  """One step of the recurrence; also the decode update. Returns (h, y)."""
  dA_BDN = jnp.exp(delta_BD[..., None] * A_DN) * keep_B[:, None, None]
  h_BDN = dA_BDN * h_BDN + (delta_BD * u_BD)[..., None] * B_BN[:, None, :]
  # Multiply-and-sum rather than einsum: a dot could run in TF32 on GPUs.
  y_BD = jnp.sum(h_BDN * C_BN[:, None, :], axis=-1)
  return h_BDN, y_BD


def _time_major(*xs):
  return tuple(jnp.moveaxis(x, 1, 0) for x in xs)


# Inside the scan the state is laid out (B, N, D): channels are the minor axis, so the
# per-step sums over N add whole vectors rather than reduce rows of 16; about 3x
# faster forward and 2.6x forward+backward on CPU than (B, D, N) (one step as `step`).


def _forward(u_BLD, delta_BLD, A_DN, B_BLN, C_BLN, keep_BL, h0_BDN, keep_states):
  """(y (L, B, D), h_L (B, N, D), every h_t (L, B, N, D) if keep_states else None)."""
  A_ND = A_DN.T

  def body(h_BND, xs):
    u_BD, delta_BD, B_BN, C_BN, keep_B = xs
    dA_BND = jnp.exp(delta_BD[:, None, :] * A_ND) * keep_B[:, None, None]
    h_BND = dA_BND * h_BND + B_BN[:, :, None] * (delta_BD * u_BD)[:, None, :]
    y_BD = jnp.sum(h_BND * C_BN[:, :, None], axis=1)  # multiply-and-sum: no TF32 dot
    return h_BND, (y_BD, h_BND if keep_states else None)

  xs = _time_major(u_BLD, delta_BLD, B_BLN, C_BLN, keep_BL)
  hT_BND, (y_LBD, h_LBND) = jax.lax.scan(body, jnp.swapaxes(h0_BDN, 1, 2), xs)
  return y_LBD, hT_BND, h_LBND


def recurrence(u_BLD, delta_BLD, A_DN, B_BLN, C_BLN, keep_BL, h0_BDN):
  """Sequential scan over the length axis. Returns (y (B, L, D), h_L (B, D, N))."""
  y_LBD, hT_BND, _ = _forward(u_BLD, delta_BLD, A_DN, B_BLN, C_BLN, keep_BL, h0_BDN, False)
  return jnp.moveaxis(y_LBD, 0, 1), jnp.swapaxes(hT_BND, 1, 2)


@jax.custom_vjp
def scan(u_BLD, delta_BLD, A_DN, B_BLN, C_BLN, keep_BL, h0_BDN):
  """`recurrence`, with the hand-derived backward below."""
  return recurrence(u_BLD, delta_BLD, A_DN, B_BLN, C_BLN, keep_BL, h0_BDN)


def _scan_fwd(u_BLD, delta_BLD, A_DN, B_BLN, C_BLN, keep_BL, h0_BDN):
  y_LBD, hT_BND, h_LBND = _forward(u_BLD, delta_BLD, A_DN, B_BLN, C_BLN, keep_BL, h0_BDN, True)
  residuals = (u_BLD, delta_BLD, A_DN, B_BLN, C_BLN, keep_BL, h0_BDN, h_LBND)
  return (jnp.moveaxis(y_LBD, 0, 1), jnp.swapaxes(hT_BND, 1, 2)), residuals


def _scan_bwd(residuals, cotangents):
  """Backwards in time: dh_t = dy_t C_t + a_{t+1} dh_{t+1}, with a_t = keep_t
  exp(delta_t A); each step's input gradients follow from dh_t and h_{t-1}."""
  u_BLD, delta_BLD, A_DN, B_BLN, C_BLN, keep_BL, h0_BDN, h_LBND = residuals
  dy_BLD, dhT_BDN = cotangents
  A_ND = A_DN.T
  hprev_LBND = jnp.concatenate([jnp.swapaxes(h0_BDN, 1, 2)[None], h_LBND[:-1]], 0)

  def body(carry, xs):
    dh_BND, dA_ND = carry
    u_BD, delta_BD, B_BN, C_BN, keep_B, dy_BD, hprev_BND, h_BND = xs
    dh_BND = dh_BND + C_BN[:, :, None] * dy_BD[:, None, :]
    dC_BN = jnp.sum(h_BND * dy_BD[:, None, :], -1)
    a_BND = jnp.exp(delta_BD[:, None, :] * A_ND) * keep_B[:, None, None]
    dlog_a_BND = dh_BND * hprev_BND * a_BND  # the gradient of delta * A
    dA_ND = dA_ND + jnp.sum(dlog_a_BND * delta_BD[:, None, :], 0)
    dinput_BD = jnp.sum(dh_BND * B_BN[:, :, None], 1)  # the gradient of delta * u
    ddelta_BD = jnp.sum(dlog_a_BND * A_ND, 1) + dinput_BD * u_BD
    dB_BN = jnp.sum(dh_BND * (delta_BD * u_BD)[:, None, :], -1)
    return (dh_BND * a_BND, dA_ND), (dinput_BD * delta_BD, ddelta_BD, dB_BN, dC_BN)

  xs = (*_time_major(u_BLD, delta_BLD, B_BLN, C_BLN, keep_BL, dy_BLD), hprev_LBND, h_LBND)
  init = (jnp.swapaxes(dhT_BDN, 1, 2), jnp.zeros_like(A_ND))
  (dh0_BND, dA_ND), grads_L = jax.lax.scan(body, init, xs, reverse=True)
  du, ddelta, dB, dC = (jnp.moveaxis(g, 0, 1) for g in grads_L)
  return du, ddelta, dA_ND.T, dB, dC, jnp.zeros_like(keep_BL), jnp.swapaxes(dh0_BND, 1, 2)


scan.defvjp(_scan_fwd, _scan_bwd)
