"""Mamba-3's scan (Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using State
Space Principles", arXiv 2603.15569), with the semantics of the official ops
`mamba3_siso_combined` (SISO) and `mamba3_mimo` (MIMO of rank R) in mamba_ssm.

Per head h (heads share B and C within a group, as Mamba-2's), rank r = 1..R (SISO: R = 1):

    theta_t = keep_t theta_{t-1} + pi tanh(angles_t) dt_t  (mod 2 pi)    (n_angles,)
    k_tr = rot(theta_t) (B_tr + B_bias_r)    q_tr = rot(theta_t) (C_tr + C_bias_r)   (state,)
    v_tr = mimo_x_r * x_t                    (SISO: v_t = x_t)                       (head_dim,)
    lam_t = sigmoid(trap_t)    alpha_t = keep_t exp(adt_t)
    h_t = alpha_t h_{t-1} + alpha_t (1 - lam_t) dt_t sum_r v_{t-1,r} k_{t-1,r}^T
                          + lam_t dt_t sum_r v_tr k_tr^T                 (head_dim, state)
    y_tr = h_t q_tr + D v_tr
    out_t = sum_r mimo_o_r * y_tr * silu(mimo_z_r * z_t)    (SISO: y_t silu(z_t))

The input term is the paper's exponential-trapezoidal rule: the integral of the input
over a step mixes its two ends, the previous step's (decayed by alpha_t) with weight
1 - lam_t and the current one's with weight lam_t (lam = 1 is Mamba-2's Euler step).
The state is complex in the paper; here, as in the official code, it is real and the
complex rotations by the cumulated angles theta are applied to B and C (a data-dependent
RoPE: q_t . k_s then depends on theta_t - theta_s). `rot` rotates the pairs of state
coordinates (2j, 2j+1) ("pairwise", the SISO Triton kernels) or (j, j + state/2) (the
MIMO TileLang kernels), for j < n_angles; the other coordinates are not rotated.
`keep_t` is 0 where a new document starts (`reset`): the state, the previous step's
(k, x) and the angles all restart from zero there, as the official ops with cu_seqlens.

The state carried from step to step, `Mamba3State(angle, ssm, k, v)` (the official
Input_States / Final_States tuple): the angles theta_t, h_t, and what the next step's
trapezoid needs, k_t (rotated, with bias) and v = x_t (before mimo_x, as the official
module's decoding cache). All float32.

What the scan takes and what the module does (the split of the official code): the
module projects x, z, B, C, dd_dt, dd_A, trap and the angles; RMS-normalises B and C;
computes dt = softplus(dd_dt + dt_bias) and adt = A dt with A = min(-heavy_tail(dd_A),
-A_floor); and broadcasts the angles (one set per layer) to heads. The ops (and this
scan) add the biases, cumulate and apply the rotations, apply sigmoid to trap, run the
recurrence and apply D, the gate and MIMO's projections.

Arithmetic is float32: the decays and angles always; the matmuls of the chunked backend
take x's dtype and accumulate in float32.

Backends:
  "reference": `_step` one step at a time with `lax.scan`: the specification.
  "chunked": the SSD-style chunked algorithm (ssm.scan.ssd) with the trapezoid folded
    in: the input entering at step s reaches step l > s with weight (lam_s dt_s +
    (1 - lam_{s+1}) dt_{s+1}) exp(sum_{s<k<=l} adt_k) and step s itself with lam_s dt_s
    (the official `mamba3_siso_fwd_ref`'s `scale` and `gamma`), so that a chunk is a
    masked attention-like form over its T steps (T R rows and columns with ranks) and
    the chunk-start states carry the rest. The segment sums of adt are compensated as
    ssd's. The angles are sums within each chunk plus a carry, taken mod 2 pi, across
    chunks (as the official `angle_dt` kernel). The backward keeps tensors of the inputs'
    sizes (the rotated B and C among them) and the chunk-start states, and recomputes
    the rest (jax.checkpoint).
`mamba3_state_update` is one step, for decoding.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ssm.scan import common

IMPLS = ("auto", "reference", "chunked")
DEFAULT_CHUNK_SIZE = 64  # the official module's; its recommendation for MIMO is 64 / R
TWO_PI = 2 * math.pi


class Mamba3State(NamedTuple):
  """The recurrent state, float32 (SISO: no rank axis in `k`)."""
  angle: jax.Array  # (batch, heads, n_angles), the cumulated angles theta mod 2 pi
  ssm: jax.Array  # (batch, heads, head_dim, state)
  k: jax.Array  # (batch, heads, state) or (batch, rank, heads, state): the last rot(B + B_bias)
  v: jax.Array  # (batch, heads, head_dim): the last x


def default_impl(platform):
  """The backend `impl="auto"` runs: the chunked algorithm everywhere, as ssd's."""
  del platform
  return "chunked"


@functools.partial(jax.jit, static_argnames=("return_final_state", "impl", "chunk_size",
                                             "rotate_pairwise"))
def mamba3_scan(x, dt, adt, trap, B, C, angles, B_bias=None, C_bias=None, D=None, z=None,
                mimo_x=None, mimo_z=None, mimo_o=None, initial_state=None,
                return_final_state=False, impl="auto", *, reset=None, chunk_size=None,
                rotate_pairwise=None):
  """The Mamba-3 scan (official `mamba3_siso_combined` / `mamba3_mimo`, without cu_seqlens:
  `reset` marks document starts instead).

    x, z: (batch, length, heads, head_dim)           (official V, Z)
    dt, adt, trap: (batch, length, heads)            (DT, ADT = A dt, Trap before sigmoid)
    B, C: SISO (batch, length, groups, state), MIMO (batch, length, rank, groups, state),
      groups dividing heads                          (K, Q)
    angles: (batch, length, heads, n_angles), 2 n_angles <= state, before tanh (Angles)
    B_bias, C_bias: SISO (heads, state), MIMO (heads, rank, state)   D: (heads,)
    mimo_x, mimo_z, mimo_o: (heads, rank, head_dim), MIMO only (MIMO_V, MIMO_Z, MIMO_Out);
      mimo_x is required, mimo_z too if z is given; without mimo_o the ranks are not
      summed and the output is (batch, length, rank, heads, head_dim)
    initial_state: a `Mamba3State` (or 4-tuple) for the batch   reset: (batch, length) bool

  Returns y (batch, length, heads, head_dim) in x's dtype; with `return_final_state`
  also the final `Mamba3State` (float32). `impl`: "reference", "chunked" or "auto";
  `chunk_size` (T) is the chunked backend's (default 64 // rank). `rotate_pairwise`:
  the pairs rotated, (2j, 2j+1) or (j, j + state/2); by default the official kernels'
  (pairwise for SISO, halves for MIMO).
  """
  siso, rank = _check_args((x.shape[0], x.shape[1]), x, dt, adt, trap, B, C, angles, B_bias,
                           C_bias, D, z, mimo_x, mimo_z, mimo_o)
  batch, length, heads, head_dim = x.shape
  n, n_angles = B.shape[-1], angles.shape[-1]
  common.check_reset(reset, batch, length)
  _check_state(initial_state, batch, heads, head_dim, n, n_angles, None if siso else rank)
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  if impl == "auto":
    impl = default_impl(jax.default_backend())
  if impl == "chunked":
    T = max(1, DEFAULT_CHUNK_SIZE // rank) if chunk_size is None else chunk_size
    if T < 1:
      raise ValueError(f"chunk_size={chunk_size}: expected a positive chunk length")
    backend = functools.partial(chunked, chunk_size=T)
  elif chunk_size is not None:
    raise ValueError(f"chunk_size applies to impl='chunked', not {impl!r}")
  else:
    backend = reference

  f32 = common.f32
  if siso:
    B, C, B_bias, C_bias = _with_rank(B, C, B_bias, C_bias)
  pairwise = siso if rotate_pairwise is None else rotate_pairwise
  dt32 = f32(dt)
  keep = (jnp.ones((batch, length), jnp.float32) if reset is None
          else 1.0 - reset.astype(bool).astype(jnp.float32))
  state0 = (_zero_state(batch, heads, head_dim, n, n_angles, rank) if initial_state is None
            else _internal(initial_state, siso))
  y, state = backend(x, dt32, f32(adt), jax.nn.sigmoid(f32(trap)), _heads(B, B_bias, heads),
                     _heads(C, C_bias, heads), _increment(f32(angles), dt32), keep, state0,
                     f32(mimo_x), pairwise)
  y = _output(y, f32(x), f32(D), f32(z), f32(mimo_x), f32(mimo_z), f32(mimo_o))
  y = (y[:, :, 0] if siso else y).astype(x.dtype)
  return (y, _public(state, siso)) if return_final_state else y


@functools.partial(jax.jit, static_argnames=("rotate_pairwise",))
def mamba3_state_update(state, x, dt, adt, trap, B, C, angles, B_bias=None, C_bias=None,
                        D=None, z=None, mimo_x=None, mimo_z=None, mimo_o=None,
                        rotate_pairwise=None):
  """One step of the scan, for decoding: `mamba3_scan`'s arguments without the length
  axis (x, z: (batch, heads, head_dim); dt, adt, trap: (batch, heads); B, C: (batch,
  [rank,] groups, state); angles: (batch, heads, n_angles)) and its state.

  Returns (y (batch, heads, head_dim) in x's dtype, or (batch, rank, heads, head_dim)
  for MIMO without mimo_o; the new `Mamba3State`).
  """
  siso, rank = _check_args((x.shape[0],), x, dt, adt, trap, B, C, angles, B_bias, C_bias, D,
                           z, mimo_x, mimo_z, mimo_o)
  batch, heads, head_dim = x.shape
  _check_state(state, batch, heads, head_dim, B.shape[-1], angles.shape[-1],
               None if siso else rank, required=True)
  f32 = common.f32
  if siso:
    B, C, B_bias, C_bias = _with_rank(B, C, B_bias, C_bias)
  pairwise = siso if rotate_pairwise is None else rotate_pairwise
  dt32 = f32(dt)
  new_state, y = _step(_internal(state, siso), f32(x), dt32, f32(adt), jax.nn.sigmoid(f32(trap)),
                       _heads(B, B_bias, heads), _heads(C, C_bias, heads),
                       _increment(f32(angles), dt32), jnp.ones((batch,), jnp.float32),
                       f32(mimo_x), pairwise)
  y = _output(y, f32(x), f32(D), f32(z), f32(mimo_x), f32(mimo_z), f32(mimo_o))
  y = (y[:, 0] if siso else y).astype(x.dtype)
  return y, _public(new_state, siso)


def _with_rank(B, C, B_bias, C_bias):
  """SISO's B, C (..., groups, state) and biases (heads, state) with MIMO's rank axis (of 1)."""
  add = lambda t, axis: None if t is None else jnp.expand_dims(t, axis)
  return add(B, -3), add(C, -3), add(B_bias, 1), add(C_bias, 1)


def _heads(B, bias, heads):
  """(..., rank, groups, state) -> (..., rank, heads, state) float32 with the per-head
  bias (heads, rank, state) added: head h reads group h // (heads / groups)."""
  B = jnp.repeat(B.astype(jnp.float32), heads // B.shape[-2], axis=-2)
  return B if bias is None else B + jnp.swapaxes(bias.astype(jnp.float32), 0, 1)


def _increment(angles, dt):
  """The angle step pi tanh(angles) dt, (..., heads, n_angles)."""
  return jnp.tanh(angles) * math.pi * dt[..., None]


def _wrap(theta):
  """theta mod 2 pi, as the official ops keep the cumulated angles (exact in gradient:
  floor's derivative is zero)."""
  return theta - TWO_PI * jnp.floor(theta / TWO_PI)


def _rotate(u, theta, pairwise):
  """u (..., state) with its coordinate pairs rotated by theta (..., n_angles), broadcast;
  the pairs past n_angles are left as they are (cos 1, sin 0, as the official code)."""
  half = u.shape[-1] // 2
  pad = [(0, 0)] * (theta.ndim - 1) + [(0, half - theta.shape[-1])]
  cos = jnp.pad(jnp.cos(theta), pad, constant_values=1.0)
  sin = jnp.pad(jnp.sin(theta), pad)
  axis = -1 if pairwise else -2
  pairs = u.reshape(u.shape[:-1] + ((half, 2) if pairwise else (2, half)))
  u0, u1 = jnp.take(pairs, 0, axis=axis), jnp.take(pairs, 1, axis=axis)
  return jnp.stack([u0 * cos - u1 * sin, u0 * sin + u1 * cos], axis=axis).reshape(u.shape)


def _values(x, mimo):
  """(..., heads, head_dim) -> (..., rank, heads, head_dim): x times mimo (heads, rank,
  head_dim) per rank, or x itself as the one rank of SISO."""
  x = x[..., None, :, :]
  return x if mimo is None else x * jnp.swapaxes(mimo, 0, 1)


def _output(y, x, D, z, mimo_x, mimo_z, mimo_o):
  """The official ops' epilogue on y = h q (..., rank, heads, head_dim): + D v, times
  silu of the gate, then the ranks summed with weights mimo_o (if given)."""
  if D is not None:
    y = y + D[:, None] * _values(x, mimo_x)
  if z is not None:
    y = y * jax.nn.silu(_values(z, mimo_z))
  if mimo_o is not None:
    y = jnp.sum(y * jnp.swapaxes(mimo_o, 0, 1), axis=-3)
  return y


def _step(state, x, dt, adt, lam, k, q, inc, keep, mimo_x, pairwise):
  """One step of the recurrence. x (b, H, P); dt, adt, lam (b, H); k, q (b, R, H, N) with
  bias, not rotated; inc (b, H, A); keep (b,). Returns (the new state, h q (b, R, H, P))."""
  angle = _wrap(keep[:, None, None] * state.angle + inc)
  k = _rotate(k, angle[:, None], pairwise)
  q = _rotate(q, angle[:, None], pairwise)
  alpha = keep[:, None] * jnp.exp(adt)
  # Multiply-and-sum rather than einsum: a dot could run in TF32 on GPUs.
  outer = lambda v, k: jnp.sum(v[..., :, None] * k[..., None, :], axis=1)  # sum over ranks
  h = (alpha[..., None, None] * state.ssm
       + (alpha * (1.0 - lam) * dt)[..., None, None] * outer(_values(state.v, mimo_x), state.k)
       + (lam * dt)[..., None, None] * outer(_values(x, mimo_x), k))
  return Mamba3State(angle, h, k, x), jnp.sum(h[:, None] * q[..., None, :], axis=-1)


def reference(x, dt, adt, lam, k, q, inc, keep, state0, mimo_x, pairwise):
  """The specification: `_step` over the length axis. Returns (h q (b, L, R, H, P) float32,
  the final state)."""
  move = lambda t: jnp.moveaxis(t, 1, 0)
  xs = tuple(map(move, (x.astype(jnp.float32), dt, adt, lam, k, q, inc, keep)))
  body = lambda state, xs: _step(state, *xs, mimo_x, pairwise)
  state, y = jax.lax.scan(body, state0, xs)
  return jnp.moveaxis(y, 0, 1), state


def chunked(x, dt, adt, lam, k, q, inc, keep, state0, mimo_x, pairwise, *, chunk_size):
  """The chunked algorithm. Returns (h q (b, L, R, H, P) float32, the final state)."""
  L = x.shape[1]
  T = min(chunk_size, L)
  Lp = -(-L // T) * T
  # Padded steps: dt = adt = 0, keep = 1 (the identity on the state), x = B = C = 0.
  pad = lambda t, value=0.0: jnp.pad(t, [(0, 0), (0, Lp - L)] + [(0, 0)] * (t.ndim - 2),
                                     constant_values=value)
  theta, angle_T = _angles(pad(inc), pad(keep, 1.0), state0.angle, T)
  theta = theta[:, :L, None]  # (b, L, 1, H, A): one rotation for all ranks
  k, q = _rotate(k, theta, pairwise), _rotate(q, theta, pairwise)
  x32 = x.astype(jnp.float32)
  v = _values(x32, mimo_x)  # (b, L, R, H, P)
  gamma = lam * dt  # the current step's weight in its own update
  sigma = (1.0 - lam) * dt  # the previous step's (its decay is in the segment sums)
  scale = gamma + jnp.pad(sigma[:, 1:], [(0, 0), (0, 1), (0, 0)])
  # The initial state's pending (k, x) enters at step 0, as in the official kernels.
  h0 = state0.ssm + sigma[:, 0, :, None, None] * jnp.sum(
      _values(state0.v, mimo_x)[..., :, None] * state0.k[..., None, :], axis=1)
  dtype = x.dtype
  y, h_T = _chunked(pad(q).astype(dtype), pad(k).astype(dtype), pad(v).astype(dtype), pad(adt),
                    pad(gamma), pad(scale), pad(keep, 1.0), h0, T)
  return y[:, :L], Mamba3State(angle_T, h_T, k[:, -1], x32[:, -1])


def _angles(inc, keep, theta0, T):
  """theta_t = keep_t theta_{t-1} + inc_t mod 2 pi over (b, Lp, H, A), Lp a multiple of T:
  within a chunk the sum of the increments of the step's document so far, plus the angle
  carried into the chunk (mod 2 pi) where no reset precedes. Returns (theta, the last)."""
  b, Lp, H, A = inc.shape
  nc = Lp // T
  inc = inc.reshape(b, nc, T, H, A)
  doc = jnp.cumsum(1.0 - keep.reshape(b, nc, T), axis=2)  # document index within the chunk
  same = (doc[..., :, None] == doc[..., None, :]) & jnp.tril(jnp.ones((T, T), bool))
  within = jnp.einsum("bcls,bcshA->bclhA", same.astype(jnp.float32), inc,
                      precision=jax.lax.Precision.HIGHEST)
  reach = (doc == 0).astype(jnp.float32)[..., None, None]  # no reset from the chunk start

  def carry(theta, ends):
    reach_c, within_c = ends
    return _wrap(within_c + reach_c * theta), theta

  move = lambda t: jnp.moveaxis(t, 1, 0)
  theta_T, starts = jax.lax.scan(carry, theta0, (move(reach[:, :, -1]), move(within[:, :, -1])))
  theta = _wrap(within + reach * jnp.moveaxis(starts, 0, 1)[:, :, None])
  return theta.reshape(b, Lp, H, A), theta_T


def _dot(spec, a, b, dtype):
  """einsum of operands in `dtype`, accumulated in float32 (float32 operands at full
  precision: no TF32), as ssd's."""
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision,
                    preferred_element_type=jnp.float32)


def _running_sum(a, axis):
  """(cum, lost): the running sum of `a` and the running sum of what its rounding dropped,
  so that (cum_l - cum_s) + (lost_l - lost_s) is the sum over s+1..l exact to the
  rounding of its own terms (ssd's `_running_sum`, which says why)."""
  cum = jnp.cumsum(a, axis=axis)
  return cum, jnp.cumsum(a - jnp.diff(cum, axis=axis, prepend=0.0), axis=axis)


@functools.partial(jax.checkpoint, static_argnums=(8,),
                   policy=jax.checkpoint_policies.save_only_these_names("mamba3_chunk_states"))
def _chunked(q, k, v, adt, gamma, scale, keep, h0, T):
  """On lengths that are multiples of T, q and k rotated. Shapes: b batch, c chunk, l and s
  steps in a chunk (target, source), R and r ranks (target, source), h head, p head_dim,
  n state."""
  b, Lp, R, H, N = q.shape
  P = v.shape[-1]
  nc = Lp // T
  dtype = v.dtype
  q, k = q.reshape(b, nc, T, R, H, N), k.reshape(b, nc, T, R, H, N)
  v = v.reshape(b, nc, T, R, H, P)
  adt, gamma, scale = (t.reshape(b, nc, T, H) for t in (adt, gamma, scale))
  # (b, c, T, h): the log decay from the chunk start, compensated (`_running_sum`)
  cum, lost = _running_sum(adt, axis=2)
  # Document index within the chunk: s reaches l only if no reset lies in s+1..l.
  doc = jnp.cumsum(1.0 - keep.reshape(b, nc, T), axis=2)  # (b, c, T)

  def decay(log, same):  # exp(log) where `same`, else 0; no inf reaches a gradient
    return jnp.where(same, jnp.exp(jnp.where(same, log, 0.0)), 0.0)

  # 1. Within the chunk: y_l = sum_{s<l} (q_l . k_s) scale_s exp(seg_ls) v_s + gamma_l
  # (q_l . k_l) v_l over the ranks, seg_ls the sum of adt over s+1..l.
  before = (doc[:, :, :, None] == doc[:, :, None, :]) & jnp.tril(jnp.ones((T, T), bool), -1)
  outer = lambda t: t[..., :, None] - t[..., None, :]  # (b, c, h, l, s)
  hi, lo = jnp.moveaxis(cum, 2, -1), jnp.moveaxis(lost, 2, -1)
  W = (decay(outer(hi) + outer(lo), before[:, :, None]) * jnp.moveaxis(scale, 2, -1)[..., None, :]
       + jnp.eye(T) * jnp.moveaxis(gamma, 2, -1)[..., None])
  QK = _dot("bclRhn,bcsrhn->bchlRsr", q, k, dtype)
  y = _dot("bchlRsr,bcsrhp->bclRhp", QK * W[:, :, :, :, None, :, None], v, dtype)

  # 2. Each chunk's own contribution to its end state (with the next step's trapezoid
  # term of its last step, which the next chunk's decays then carry).
  to_end = decay((cum[:, :, -1:] - cum) + (lost[:, :, -1:] - lost),
                 (doc[:, :, -1:] == doc)[..., None]) * scale  # (b, c, s, h)
  states = _dot("bcsrhn,bcsrhp->bchpn", k,
                v.astype(jnp.float32) * to_end[:, :, :, None, :, None], dtype)

  # 3. Across chunks: h_c = decay_c h_{c-1} + states_c (the chunk-start states saved).
  chunk_decay = decay(cum[:, :, -1], (doc[:, :, -1] == 0)[..., None])  # (b, c, h)

  def carry(h, inputs):
    decay_c, states_c = inputs
    return decay_c[..., None, None] * h + states_c, h

  h_T, starts = jax.lax.scan(carry, h0, (jnp.moveaxis(chunk_decay, 1, 0),
                                         jnp.moveaxis(states, 1, 0)))
  starts = checkpoint_name(jnp.moveaxis(starts, 0, 1), "mamba3_chunk_states")  # (b, c, h, p, n)

  # 4. The state entering the chunk, read out at each step: exp(cum_l) q_l h_start.
  from_start = decay(cum, (doc == 0)[..., None])  # (b, c, l, h)
  y = y + _dot("bclRhn,bchpn->bclRhp", q, starts, dtype) * from_start[:, :, :, None, :, None]
  return y.reshape(b, Lp, R, H, P), h_T


def _zero_state(batch, heads, head_dim, n, n_angles, rank):
  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
  return Mamba3State(zeros(batch, heads, n_angles), zeros(batch, heads, head_dim, n),
                     zeros(batch, rank, heads, n), zeros(batch, heads, head_dim))


def _internal(state, siso):
  """A public state as the backends take it: float32, k with a rank axis."""
  angle, ssm, k, v = (jnp.asarray(t, jnp.float32) for t in state)
  return Mamba3State(angle, ssm, k[:, None] if siso else k, v)


def _public(state, siso):
  return state._replace(k=state.k[:, 0]) if siso else state


def _check_args(lead, x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, z, mimo_x, mimo_z,
                mimo_o):
  """Shapes and dtypes of the scan's (lead = (batch, length)) or the step's (lead =
  (batch,)) arguments. Returns (siso, rank)."""
  k = len(lead)
  where = "(batch, length, " if k == 2 else "(batch, "
  if jnp.ndim(x) != k + 2:
    raise ValueError(f"x: expected {where}heads, head_dim), got shape {jnp.shape(x)}")
  heads, head_dim = x.shape[k:]
  common.check("x", x, x.shape, f"{where}heads, head_dim)")
  for name, t in (("dt", dt), ("adt", adt), ("trap", trap)):
    if t is None:
      raise ValueError(f"{name} is required: {where}heads)")
    common.check(name, t, lead + (heads,), f"{where}heads)")
  if jnp.ndim(B) not in (k + 2, k + 3):
    raise ValueError(f"B: expected {where}groups, state) (SISO) or {where}rank, groups, "
                     f"state) (MIMO), got shape {jnp.shape(B)}")
  siso = jnp.ndim(B) == k + 2
  rank = 1 if siso else B.shape[k]
  groups, n = B.shape[-2:]
  if (B.shape[:k] != lead or groups < 1 or heads % groups or n % 2 or rank < 1):
    raise ValueError(f"B: expected {where}[rank,] groups, state) with groups dividing "
                     f"heads={heads} and an even state, got shape {B.shape}")
  common.check("B", B, B.shape, f"{where}[rank,] groups, state)")
  common.check("C", C, B.shape, f"{where}[rank,] groups, state) as B")
  if jnp.ndim(angles) != k + 2 or angles.shape[:k + 1] != lead + (heads,) or not (
      1 <= angles.shape[-1] <= n // 2):
    raise ValueError(f"angles: expected {where}heads, n_angles) with 1 <= n_angles <= "
                     f"state / 2 = {n // 2}, got shape {jnp.shape(angles)}")
  common.check("angles", angles, angles.shape, f"{where}heads, n_angles)")
  bias_shape = (heads, n) if siso else (heads, rank, n)
  common.check("B_bias", B_bias, bias_shape, "(heads, state)" if siso else "(heads, rank, state)")
  common.check("C_bias", C_bias, bias_shape, "(heads, state)" if siso else "(heads, rank, state)")
  common.check("D", D, (heads,), "(heads,)")
  common.check("z", z, x.shape, "x's shape")
  if siso and any(t is not None for t in (mimo_x, mimo_z, mimo_o)):
    raise ValueError("mimo_x, mimo_z, mimo_o apply to MIMO (B and C with a rank axis)")
  if not siso:
    if mimo_x is None:
      raise ValueError("MIMO (B and C with a rank axis) needs mimo_x (heads, rank, head_dim)")
    if (z is None) != (mimo_z is None):
      raise ValueError("MIMO: z and mimo_z go together")
    for name, t in (("mimo_x", mimo_x), ("mimo_z", mimo_z), ("mimo_o", mimo_o)):
      common.check(name, t, (heads, rank, head_dim), "(heads, rank, head_dim)")
  return siso, rank


def _check_state(state, batch, heads, head_dim, n, n_angles, rank, required=False):
  """A `Mamba3State` (or a 4-tuple) of the right shapes; rank None for SISO."""
  if state is None and not required:
    return
  k_shape = (batch, heads, n) if rank is None else (batch, rank, heads, n)
  shapes = dict(angle=(batch, heads, n_angles), ssm=(batch, heads, head_dim, n), k=k_shape,
                v=(batch, heads, head_dim))
  if not isinstance(state, tuple) or len(state) != 4:
    raise ValueError(f"state: expected a Mamba3State (angle, ssm, k, v) of shapes "
                     f"{tuple(shapes.values())}, got {type(state).__name__}")
  for (name, shape), t in zip(shapes.items(), state):
    common.check(f"state.{name}", t, shape, str(shape))
