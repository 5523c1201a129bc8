"""Mamba-2's scan: the state-space duality (SSD) of Dao & Gu 2024 ("Transformers are
SSMs", section 6). A is one scalar per head, so the scan is structured matmuls.

Per head h (group g(h): heads share B and C within a group of H / G heads):

    dt_t = clip(softplus(dt_t + dt_bias), *dt_limit)   a_t = keep_t * exp(dt_t * A_h)
    h_t = a_t * h_{t-1} + dt_t * x_t B_t^T    (head_dim, state)
    y_t = h_t C_t + D_h * x_t

`keep_t` is 0 where a new document starts (`reset`), else 1. Arithmetic is float32
(the decays always; the matmuls take the inputs' dtype and accumulate in float32).

Backends:
  "reference": one step at a time with `lax.scan`: the specification.
  "chunked": the SSD algorithm of section 6 of the paper (its Listing 1, the official
    `ssd_minimal_discrete`) in einsums, with groups, resets and a sequential carry
    across chunks added. The sequence is cut into chunks of T steps; within a chunk the
    output is a masked, attention-like quadratic form, y_l = sum_{s<=l} (C_l . B_s)
    exp(seg_ls) dt_s x_s, with seg_ls = sum_{s<k<=l} dt_k A exact to the rounding of
    its own terms, as the official stable `segsum` (a plain difference of running sums
    loses the small decays that follow a large one; `_running_sum` says how); each
    chunk's own contribution to the state is one matmul, and a short recurrence over
    the (length / T) chunk states (where the official multiplies by a (chunks x chunks)
    matrix of decays) carries the state across chunks. No (batch, length, heads,
    head_dim, state) tensor is ever made, forward or backward: the backward
    (jax.checkpoint) keeps the inputs and the chunk-start states, (batch, length / T,
    heads, head_dim, state), and recomputes the rest.
`ssd_state_update` is one step, for decoding.
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ssm.scan import common

IMPLS = ("auto", "reference", "chunked")
DEFAULT_CHUNK_SIZE = 256  # the official Mamba2's, and Mamba2Config's default
NO_DT_LIMIT = (0.0, float("inf"))  # the official default: softplus's range, no clamp


def default_impl(platform):
  """The backend `impl="auto"` runs: the chunked algorithm everywhere. On CPU too it
  is faster than the sequential reference at Mamba-2's state sizes, and its memory
  does not hold a state per step (docs/benchmarks.md)."""
  del platform
  return "chunked"


@functools.partial(jax.jit, static_argnames=("dt_softplus", "return_final_state", "impl",
                                             "chunk_size", "dt_limit"))
def ssd(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, initial_state=None,
        return_final_state=False, impl="auto", *, reset=None, chunk_size=None,
        dt_limit=NO_DT_LIMIT):
  """The SSD scan with the semantics of mamba_ssm's `mamba_chunk_scan_combined` (z=None).

    x: (batch, length, heads, head_dim)      dt: (batch, length, heads)
    A, dt_bias: (heads,)                     D: (heads,) or (heads, head_dim)
    B, C: (batch, length, groups, state), groups dividing heads
    initial_state: (batch, heads, head_dim, state)   reset: (batch, length) bool

  Returns y (batch, length, heads, head_dim) in x's dtype; with `return_final_state`
  also the final state (batch, heads, head_dim, state) in float32. `impl`: "reference",
  "chunked" or "auto" (`default_impl`); `chunk_size` (T) is the chunked backend's.
  `dt_limit` (lo, hi) clamps the discretized dt, as the official kernels do.
  """
  batch, length, heads, head_dim, n = _check_ssd_args(x, dt, A, B, C, D, dt_bias,
                                                      initial_state, reset)
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  if impl == "auto":
    impl = default_impl(jax.default_backend())
  if impl == "chunked":
    T = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if T < 1:
      raise ValueError(f"chunk_size={chunk_size}: expected a positive chunk length")
    backend = functools.partial(chunked, chunk_size=T)
  elif chunk_size is not None:
    raise ValueError(f"chunk_size applies to impl='chunked', not {impl!r}")
  else:
    backend = reference

  f32 = common.f32
  dt32 = _discretize(f32(dt), f32(dt_bias), dt_softplus, dt_limit)
  keep = (jnp.ones((batch, length), jnp.float32) if reset is None
          else 1.0 - reset.astype(bool).astype(jnp.float32))
  h0 = (jnp.zeros((batch, heads, head_dim, n), jnp.float32) if initial_state is None
        else f32(initial_state))
  y, hT = backend(x, dt32, f32(A), B, C, keep, h0)
  if D is not None:
    D32 = f32(D)
    y = y + (D32[:, None] if D32.ndim == 1 else D32) * f32(x)
  y = y.astype(x.dtype)
  return (y, hT) if return_final_state else y


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit"))
def ssd_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True,
                     dt_limit=NO_DT_LIMIT):
  """One step of the SSD scan, for decoding (mamba_ssm's `selective_state_update` with
  a scalar A per head).

    state: (batch, heads, head_dim, state) float32   x: (batch, heads, head_dim)
    dt: (batch, heads)   A, dt_bias: (heads,)   B, C: (batch, groups, state)
    D: (heads,) or (heads, head_dim)

  Returns (y (batch, heads, head_dim) in x's dtype, the new state in float32).
  """
  if jnp.ndim(state) != 4:
    raise ValueError(f"state: expected (batch, heads, head_dim, state), got shape "
                     f"{jnp.shape(state)}")
  batch, heads, head_dim, n = state.shape
  common.check("x", x, (batch, heads, head_dim), "(batch, heads, head_dim)")
  common.check("dt", dt, (batch, heads), "(batch, heads)", like=("x", x))
  common.check("A", A, (heads,), "(heads,)")
  if jnp.ndim(B) != 3 or B.shape[0] != batch or B.shape[2] != n or heads % B.shape[1]:
    raise ValueError(f"B: expected (batch, groups, state) = ({batch}, G, {n}) with G "
                     f"dividing heads={heads}, got shape {jnp.shape(B)}")
  common.check("B", B, B.shape, "(batch, groups, state)", like=("x", x))
  common.check("C", C, B.shape, "(batch, groups, state)", like=("x", x))
  _check_D(D, heads, head_dim)
  common.check("dt_bias", dt_bias, (heads,), "(heads,)")
  f32 = common.f32
  dt32 = _discretize(f32(dt), f32(dt_bias), dt_softplus, dt_limit)
  new_state, y = _step(f32(state), f32(x), dt32, f32(A), _heads(f32(B), heads, 1),
                       _heads(f32(C), heads, 1), jnp.ones((batch,), jnp.float32))
  if D is not None:
    D32 = f32(D)
    y = y + (D32[:, None] if D32.ndim == 1 else D32) * f32(x)
  return y.astype(x.dtype), new_state


def _discretize(dt, dt_bias, dt_softplus, dt_limit):
  """softplus(dt + dt_bias) clamped to `dt_limit`; the default clamp, at 0, changes
  only a negative dt given without softplus (as the official kernels)."""
  lo, hi = check_dt_limit(dt_limit)
  return jnp.clip(common.discretize(dt, dt_bias, dt_softplus), lo, hi)


def check_dt_limit(dt_limit, where="dt_limit"):
  """(lo, hi) as floats, 0 <= lo <= hi; a ValueError naming `where` otherwise."""
  try:
    lo, hi = map(float, dt_limit)
  except (TypeError, ValueError):
    lo = hi = None
  if lo is None or not 0 <= lo <= hi:
    raise ValueError(f"{where}={dt_limit!r}: expected a pair (lo, hi) with 0 <= lo <= hi, "
                     f"e.g. {NO_DT_LIMIT} (no clamp)")
  return lo, hi


def _heads(B, heads, axis):
  """(..., groups, state) -> (..., heads, state): head h reads group h // (heads / groups)."""
  return jnp.repeat(B, heads // B.shape[axis], axis=axis)


def _step(h_BHPN, x_BHP, dt_BH, A_H, B_BHN, C_BHN, keep_B):
  """One step of the recurrence; returns (h, y = h C)."""
  a_BH = jnp.exp(dt_BH * A_H) * keep_B[:, None]
  h_BHPN = (a_BH[..., None, None] * h_BHPN
            + (dt_BH[..., None] * x_BHP)[..., None] * B_BHN[:, :, None, :])
  # Multiply-and-sum rather than einsum: a dot could run in TF32 on GPUs.
  return h_BHPN, jnp.sum(h_BHPN * C_BHN[:, :, None, :], axis=-1)


def reference(x, dt, A, B, C, keep, h0):
  """The specification: `_step` over the length axis. Returns (h C (B, L, H, P) float32,
  h_L (B, H, P, N))."""
  H = x.shape[2]
  move = lambda t: jnp.moveaxis(t, 1, 0)
  xs = (move(x.astype(jnp.float32)), move(dt), move(_heads(B.astype(jnp.float32), H, 2)),
        move(_heads(C.astype(jnp.float32), H, 2)), move(keep))
  body = lambda h, xs: _step(h, xs[0], xs[1], A, xs[2], xs[3], xs[4])
  hT, y_LBHP = jax.lax.scan(body, h0, xs)
  return jnp.moveaxis(y_LBHP, 0, 1), hT


def chunked(x, dt, A, B, C, keep, h0, *, chunk_size):
  """The SSD chunked algorithm. Returns (h C (B, L, H, P) float32, h_L (B, H, P, N))."""
  L = x.shape[1]
  T = min(chunk_size, L)
  Lp = -(-L // T) * T
  # Padded steps: dt = 0, keep = 1 (the identity on the state), x = B = C = 0.
  pad = lambda t, value=0.0: jnp.pad(t, [(0, 0), (0, Lp - L)] + [(0, 0)] * (t.ndim - 2),
                                     constant_values=value)
  y, hT = _chunked(pad(x), pad(dt), A, pad(B), pad(C), pad(keep, 1.0), h0, T)
  return y[:, :L], hT


def _dot(spec, a, b, dtype):
  """einsum of operands in `dtype`, accumulated in float32 (float32 operands at full
  precision: no TF32)."""
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision,
                    preferred_element_type=jnp.float32)


def _running_sum(a, axis):
  """(cum, lost): the running sum of `a` along `axis` and the running sum of what its
  rounding dropped at each step, so that a sum over s+1..l, (cum_l - cum_s) + (lost_l -
  lost_s), is exact to the rounding of its own terms however large the terms before s
  (as the official stable `segsum`, without its running sum over a (T, T) matrix, which
  made the chunked SSD about a third slower on CPU, forward and backward, at batch 2,
  length 2048, 8 heads of 64, N 128, T 256). A step's cum_k - cum_{k-1} is exact where
  it is smaller than the sum before it (Sterbenz); a larger one lies inside the
  segments it reaches."""
  cum = jnp.cumsum(a, axis=axis)
  return cum, jnp.cumsum(a - jnp.diff(cum, axis=axis, prepend=0.0), axis=axis)


@functools.partial(jax.checkpoint, static_argnums=(7,),
                   policy=jax.checkpoint_policies.save_only_these_names("ssd_chunk_states"))
def _chunked(x, dt, A, B, C, keep, h0, T):
  """On lengths that are multiples of T. Shapes: b batch, c chunk, l and s steps in a
  chunk (target, source), g group, r head in the group, p head_dim, n state."""
  b, Lp, H, P = x.shape
  G, N = B.shape[2], B.shape[3]
  R, nc = H // G, Lp // T
  dtype = x.dtype
  x = x.reshape(b, nc, T, G, R, P)
  B, C = B.reshape(b, nc, T, G, N), C.reshape(b, nc, T, G, N)
  dt = dt.reshape(b, nc, T, G, R)
  # (b, c, T, g, r): the log decay from the chunk start, compensated (`_running_sum`)
  cum, lost = _running_sum(dt * A.reshape(G, R), axis=2)
  # Document index within the chunk: s reaches l only if no reset lies in s+1..l.
  doc = jnp.cumsum(1.0 - keep.reshape(b, nc, T), axis=2)  # (b, c, T)
  tril = jnp.tril(jnp.ones((T, T), bool))

  def decay(log, same):  # exp(log) where `same`, else 0; no inf reaches a gradient
    return jnp.where(same, jnp.exp(jnp.where(same, log, 0.0)), 0.0)

  # 1. Within the chunk: y_l = sum_s (C_l . B_s) exp(seg_ls) dt_s x_s, seg_ls the sum of
  # dt A over s+1..l: cum_l - cum_s alone would lose the small decays after a large one.
  same_ls = (doc[:, :, :, None] == doc[:, :, None, :]) & tril  # (b, c, l, s)
  outer = lambda t: t[..., :, None] - t[..., None, :]  # (b, c, g, r, l, s)
  hi, lo = jnp.moveaxis(cum, 2, -1), jnp.moveaxis(lost, 2, -1)
  L_mask = decay(outer(hi) + outer(lo), same_ls[:, :, None, None])
  CB = _dot("bclgn,bcsgn->bcgls", C, B, dtype)
  M = CB[:, :, :, None] * L_mask * jnp.moveaxis(dt, 2, -1)[..., None, :]  # (b, c, g, r, l, s)
  y = _dot("bcgrls,bcsgrp->bclgrp", M, x, dtype)

  # 2. Each chunk's own contribution to its end state.
  to_end = decay((cum[:, :, -1:] - cum) + (lost[:, :, -1:] - lost),
                 (doc[:, :, -1:] == doc)[..., None, None]) * dt
  states = _dot("bcsgn,bcsgrp->bcgrpn", B, x.astype(jnp.float32) * to_end[..., None], dtype)

  # 3. Across chunks: h_c = decay_c h_{c-1} + states_c (the chunk-start states saved).
  chunk_decay = decay(cum[:, :, -1], (doc[:, :, -1] == 0)[..., None, None])  # (b, c, g, r)

  def carry(h, inputs):
    decay_c, states_c = inputs
    return decay_c[..., None, None] * h + states_c, h

  hT, starts = jax.lax.scan(carry, h0.reshape(b, G, R, P, N),
                            (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(states, 1, 0)))
  starts = checkpoint_name(jnp.moveaxis(starts, 0, 1), "ssd_chunk_states")  # (b, c, g, r, p, n)

  # 4. The state entering the chunk, read out at each step: exp(cum_l) C_l h_start.
  from_start = decay(cum, (doc == 0)[..., None, None])  # (b, c, l, g, r)
  y = y + _dot("bclgn,bcgrpn->bclgrp", C, starts, dtype) * from_start[..., None]
  return y.reshape(b, Lp, H, P), hT.reshape(b, H, P, N)


def _check_ssd_args(x, dt, A, B, C, D, dt_bias, initial_state, reset):
  if jnp.ndim(x) != 4:
    raise ValueError(f"x: expected (batch, length, heads, head_dim), got shape {jnp.shape(x)}")
  batch, length, heads, head_dim = x.shape
  common.check("x", x, x.shape, "(batch, length, heads, head_dim)")
  common.check("dt", dt, (batch, length, heads), "(batch, length, heads)", like=("x", x))
  common.check("A", A, (heads,), "(heads,): one scalar per head")
  if (jnp.ndim(B) != 4 or B.shape[:2] != (batch, length) or B.shape[2] < 1
      or heads % B.shape[2]):
    raise ValueError(f"B: expected (batch, length, groups, state) = ({batch}, {length}, G, N) "
                     f"with G dividing heads={heads}, got shape {jnp.shape(B)}")
  n = B.shape[3]
  common.check("B", B, B.shape, "(batch, length, groups, state)", like=("x", x))
  common.check("C", C, B.shape, "(batch, length, groups, state) as B", like=("x", x))
  _check_D(D, heads, head_dim)
  common.check("dt_bias", dt_bias, (heads,), "(heads,)")
  common.check("initial_state", initial_state, (batch, heads, head_dim, n),
               "(batch, heads, head_dim, state)")
  common.check_reset(reset, batch, length)
  return batch, length, heads, head_dim, n


def _check_D(D, heads, head_dim):
  if D is not None and jnp.shape(D) not in ((heads,), (heads, head_dim)):
    raise ValueError(f"D: expected shape (heads,) = ({heads},) or (heads, head_dim) = "
                     f"({heads}, {head_dim}), got {jnp.shape(D)}")
  if D is not None:
    common.check("D", D, jnp.shape(D), "(heads,)")
