"""The gated delta rule: Gated DeltaNet's scan (Yang, Kautz & Hatamizadeh, ICLR 2025),
the linear-attention mixer of Qwen3-Next, with the semantics of transformers'
`torch_recurrent_gated_delta_rule` / `torch_chunk_gated_delta_rule`
(models/qwen3_next) and flash-linear-attention's `chunk_gated_delta_rule`.

Per value head h, reading key head h // (value heads / key heads) (transformers'
`repeat_interleave` of q and k), with a state S (d_k, d_v):

    q_t <- scale * l2norm(q_t)    k_t <- l2norm(k_t)    (l2norm(x) = x / sqrt(|x|^2 + 1e-6))
    S'_t = keep_t exp(g_t) S_{t-1}                        (g_t <= 0: the log decay)
    S_t = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T          (the delta rule: a step of
                                                           regression of v on k)
    o_t = S_t^T q_t

`scale` defaults to d_k^-1/2; `keep_t` is 0 where a new document starts (`reset`), else
1. The l2norm is optional (`use_qk_l2norm`; Qwen3-Next's layer turns it on). All
arithmetic is float32 whatever the inputs' dtype, as transformers'.

Backends:
  "reference": one step at a time with `lax.scan`: the specification. Its backward
    keeps the state of every step, (batch, length, heads, d_k, d_v).
  "chunked": the WY (UT-transform) chunked algorithm of DeltaNet (Yang et al. 2024)
    with gates, as transformers' `torch_chunk_gated_delta_rule`. In a chunk of T steps
    starting from the state S_0, with gamma_l the log decay from the chunk start to step
    l (inclusive) and D_ls = exp(gamma_l - gamma_s) for s <= l (0 across a reset), the
    state is S_l = exp(gamma_l) S_0 + sum_{s<=l} D_ls k_s u_s^T, where the writes
    u_l = beta_l (v_l - S'_l^T k_l) solve the unit lower triangular system
        u_l + beta_l sum_{s<l} D_ls (k_l . k_s) u_s = beta_l v_l - beta_l exp(gamma_l) S_0^T k_l,
    so U = W_v - W_k S_0 with (W_v, W_k) from one triangular solve per chunk. A scan
    over the chunks carries S_0 (two (T, d_k) x (d_k, d_v)-sized matmuls a chunk), and
    the outputs o_l = exp(gamma_l) S_0^T q_l + sum_{s<=l} D_ls (q_l . k_s) u_s follow
    for all chunks at once. gamma is a compensated running sum (as ssm.scan.ssd's), so
    each D_ls is exact to the rounding of its own terms; every exponent is <= 0 and
    masked before the exp, so nothing overflows and a reset (a decay of exp(-inf) = 0)
    is a mask, never an inf.
`gated_delta_state_update` is one step, for decoding.
"""

import functools

import jax
import jax.numpy as jnp

from ssm.scan import common
from ssm.scan.ssd import _running_sum

IMPLS = ("auto", "reference", "chunked")
DEFAULT_CHUNK_SIZE = 64  # transformers' and flash-linear-attention's
L2NORM_EPS = 1e-6  # transformers' `l2norm`, aligned with flash-linear-attention


def default_impl(platform):
  """The backend `impl="auto"` runs: the chunked algorithm everywhere. The reference's
  backward keeps a (d_k, d_v) state per step and head; the chunked one keeps one per
  chunk, and its work is matmuls."""
  del platform
  return "chunked"


@functools.partial(jax.jit, static_argnames=("return_final_state", "impl", "chunk_size",
                                             "use_qk_l2norm"))
def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, return_final_state=False,
                     reset=None, impl="auto", chunk_size=DEFAULT_CHUNK_SIZE,
                     use_qk_l2norm=True, scale=None):
  """The gated delta rule over a sequence.

    q, k: (batch, length, key_heads, d_k)    v: (batch, length, heads, d_v)
    g, beta: (batch, length, heads): the log decay (<= 0) and the write strength
    initial_state: (batch, heads, d_k, d_v)  reset: (batch, length) bool
  key_heads divides heads; value head h reads key head h // (heads / key_heads).

  Returns o (batch, length, heads, d_v) in q's dtype; with `return_final_state` also
  the final state (batch, heads, d_k, d_v) in float32. `impl`: "reference", "chunked"
  or "auto" (`default_impl`); `chunk_size` is the chunked backend's T. `scale` (default
  d_k^-1/2) multiplies the queries after their l2norm (`use_qk_l2norm`).
  """
  batch, length, heads, d_k, d_v = _check_args(q, k, v, g, beta, initial_state, reset)
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  if impl == "auto":
    impl = default_impl(jax.default_backend())
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: expected a positive chunk length")
  backend = (functools.partial(chunked, chunk_size=chunk_size) if impl == "chunked"
             else reference)
  q32, k32 = _normalize(q, k, use_qk_l2norm, scale)
  keep = (jnp.ones((batch, length), jnp.float32) if reset is None
          else 1.0 - reset.astype(bool).astype(jnp.float32))
  h0 = (jnp.zeros((batch, heads, d_k, d_v), jnp.float32) if initial_state is None
        else common.f32(initial_state))
  o, hT = backend(q32, k32, common.f32(v), common.f32(g), common.f32(beta), keep, h0)
  o = o.astype(q.dtype)
  return (o, hT) if return_final_state else o


@functools.partial(jax.jit, static_argnames=("use_qk_l2norm",))
def gated_delta_state_update(state, q, k, v, g, beta, *, use_qk_l2norm=True, scale=None):
  """One step of the gated delta rule, for decoding.

    state: (batch, heads, d_k, d_v) float32   q, k: (batch, key_heads, d_k)
    v: (batch, heads, d_v)   g, beta: (batch, heads)

  Returns (o (batch, heads, d_v) in q's dtype, the new state in float32).
  """
  if jnp.ndim(state) != 4:
    raise ValueError(f"state: expected (batch, heads, d_k, d_v), got shape {jnp.shape(state)}")
  batch, heads, d_k, d_v = state.shape
  if jnp.ndim(q) != 3 or q.shape[0] != batch or q.shape[2] != d_k or heads % q.shape[1]:
    raise ValueError(f"q: expected (batch, key_heads, d_k) = ({batch}, G, {d_k}) with G "
                     f"dividing heads={heads}, got shape {jnp.shape(q)}")
  common.check("state", state, state.shape, "(batch, heads, d_k, d_v)")
  common.check("q", q, q.shape, "(batch, key_heads, d_k)")
  common.check("k", k, q.shape, "(batch, key_heads, d_k) as q", like=("q", q))
  common.check("v", v, (batch, heads, d_v), "(batch, heads, d_v)", like=("q", q))
  common.check("g", g, (batch, heads), "(batch, heads)")
  common.check("beta", beta, (batch, heads), "(batch, heads)")
  q32, k32 = _normalize(q, k, use_qk_l2norm, scale)
  R = heads // q.shape[1]
  new_state, o = _step(common.f32(state), jnp.repeat(q32, R, axis=1),
                       jnp.repeat(k32, R, axis=1), common.f32(v), common.f32(g),
                       common.f32(beta), jnp.ones((batch,), jnp.float32))
  return o.astype(q.dtype), new_state


def _normalize(q, k, use_qk_l2norm, scale):
  """float32 (scale * l2norm(q), l2norm(k)) over the last axis, d_k."""
  q, k = common.f32(q), common.f32(k)
  if use_qk_l2norm:
    l2norm = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)
    q, k = l2norm(q), l2norm(k)
  return q * (q.shape[-1] ** -0.5 if scale is None else scale), k


def _step(S_BHKV, q_BHK, k_BHK, v_BHV, g_BH, beta_BH, keep_B):
  """One step of the recurrence; returns (S, o = S^T q)."""
  S_BHKV = (jnp.exp(g_BH) * keep_B[:, None])[..., None, None] * S_BHKV
  # Multiply-and-sum rather than einsum: a dot could run in TF32 on GPUs.
  read_BHV = jnp.sum(S_BHKV * k_BHK[..., None], axis=-2)
  write_BHV = beta_BH[..., None] * (v_BHV - read_BHV)
  S_BHKV = S_BHKV + k_BHK[..., None] * write_BHV[..., None, :]
  return S_BHKV, jnp.sum(S_BHKV * q_BHK[..., None], axis=-2)


def reference(q, k, v, g, beta, keep, h0):
  """The specification: `_step` over the length axis, on float32 inputs (q and k
  normalized). Returns (o (B, L, H, V), S_L (B, H, K, V))."""
  R = v.shape[2] // q.shape[2]
  move = lambda t: jnp.moveaxis(t, 1, 0)
  xs = (move(jnp.repeat(q, R, axis=2)), move(jnp.repeat(k, R, axis=2)), move(v), move(g),
        move(beta), move(keep))
  hT, o_LBHV = jax.lax.scan(lambda S, x: _step(S, *x), h0, xs)
  return jnp.moveaxis(o_LBHV, 0, 1), hT


def chunked(q, k, v, g, beta, keep, h0, *, chunk_size):
  """The chunked algorithm, on float32 inputs (q and k normalized). Returns
  (o (B, L, H, V), S_L (B, H, K, V))."""
  L = q.shape[1]
  T = min(chunk_size, L)
  Lp = -(-L // T) * T
  # Padded steps: g = 0, keep = 1, beta = 0 and q = k = v = 0: the identity on the state.
  pad = lambda t, value=0.0: jnp.pad(t, [(0, 0), (0, Lp - L)] + [(0, 0)] * (t.ndim - 2),
                                     constant_values=value)
  o, hT = _chunked(pad(q), pad(k), pad(v), pad(g), pad(beta), pad(keep, 1.0), h0, T)
  return o[:, :L], hT


def _dot(spec, a, b):
  """A float32 einsum at full precision (no TF32)."""
  return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def _chunked(q, k, v, g, beta, keep, h0, T):
  """On lengths that are multiples of T. Shapes: b batch, c chunk, l and s steps in a
  chunk (target, source), g key head, r value head in the group, k d_k, v d_v."""
  b, Lp, G, K = k.shape
  H, V = v.shape[2:]
  R, nc = H // G, Lp // T
  # Heads before steps, so that the steps are the matrix axes of the solve and matmuls.
  q, k = (jnp.moveaxis(t.reshape(b, nc, T, G, K), 2, 3) for t in (q, k))  # (b, c, g, l, k)
  v = jnp.moveaxis(v.reshape(b, nc, T, G, R, V), 2, 4)  # (b, c, g, r, l, v)
  g, beta = (jnp.moveaxis(t.reshape(b, nc, T, G, R), 2, 4) for t in (g, beta))  # (b, c, g, r, l)
  cum, lost = _running_sum(g, axis=-1)  # the log decay from the chunk start, compensated
  # Document index within the chunk: s reaches l only if no reset lies in s+1..l.
  doc = jnp.cumsum(1.0 - keep.reshape(b, nc, 1, 1, T), axis=-1)

  def decay(log, same):  # exp(log) where `same`, else 0; no inf reaches a gradient
    return jnp.where(same, jnp.exp(jnp.where(same, log, 0.0)), 0.0)

  outer = lambda t: t[..., :, None] - t[..., None, :]  # (..., l, s)
  D = decay(outer(cum) + outer(lost),
            (outer(doc) == 0) & jnp.tril(jnp.ones((T, T), bool)))  # (b, c, g, r, l, s)
  from_start = decay(cum, doc == 0)  # (b, c, g, r, l)
  to_end = decay((cum[..., -1:] - cum) + (lost[..., -1:] - lost), doc == doc[..., -1:])

  # 1. The UT transform: (I + strictly_lower(beta_l (k_l . k_s) D_ls)) [W_v W_k] =
  # [beta v, beta exp(gamma) k]; the solve reads the strictly lower triangle only.
  KK = _dot("bcglk,bcgsk->bcgls", k, k)[:, :, :, None]
  rhs = jnp.concatenate([v, (from_start[..., None] * k[:, :, :, None])], axis=-1)
  W = jax.lax.linalg.triangular_solve(beta[..., None] * KK * D, beta[..., None] * rhs,
                                      left_side=True, lower=True, unit_diagonal=True)
  W_v, W_k = W[..., :V], W[..., V:]

  # 2. Across chunks: U = W_v - W_k S_0, S_T = exp(gamma_T) S_0 + sum_s D_Ts k_s u_s^T.
  k_end = to_end[..., None] * k[:, :, :, None]  # (b, c, g, r, s, k)
  chunk_decay = from_start[..., -1]  # (b, c, g, r)

  def carry(S, inputs):
    W_v, W_k, k_end, chunk_decay = inputs
    U = W_v - _dot("bgrlk,bgrkv->bgrlv", W_k, S)
    return chunk_decay[..., None, None] * S + _dot("bgrsk,bgrsv->bgrkv", k_end, U), (S, U)

  move = lambda t: jnp.moveaxis(t, 1, 0)
  hT, (starts, U) = jax.lax.scan(carry, h0.reshape(b, G, R, K, V),
                                 (move(W_v), move(W_k), move(k_end), move(chunk_decay)))
  starts, U = move(starts), move(U)  # (b, c, g, r, k, v), (b, c, g, r, s, v)

  # 3. The outputs: the chunk's start state read out, and the writes within the chunk.
  QK = _dot("bcglk,bcgsk->bcgls", q, k)[:, :, :, None] * D
  o = (from_start[..., None] * _dot("bcglk,bcgrkv->bcgrlv", q, starts)
       + _dot("bcgrls,bcgrsv->bcgrlv", QK, U))
  return jnp.moveaxis(o, 4, 2).reshape(b, Lp, H, V), hT.reshape(b, H, K, V)


def _check_args(q, k, v, g, beta, initial_state, reset):
  if jnp.ndim(v) != 4:
    raise ValueError(f"v: expected (batch, length, heads, d_v), got shape {jnp.shape(v)}")
  batch, length, heads, d_v = v.shape
  if (jnp.ndim(q) != 4 or q.shape[:2] != (batch, length) or q.shape[2] < 1
      or heads % q.shape[2]):
    raise ValueError(f"q: expected (batch, length, key_heads, d_k) = ({batch}, {length}, G, "
                     f"d_k) with G dividing heads={heads}, got shape {jnp.shape(q)}")
  d_k = q.shape[3]
  common.check("q", q, q.shape, "(batch, length, key_heads, d_k)")
  common.check("k", k, q.shape, "(batch, length, key_heads, d_k) as q", like=("q", q))
  common.check("v", v, v.shape, "(batch, length, heads, d_v)", like=("q", q))
  common.check("g", g, (batch, length, heads), "(batch, length, heads)")
  common.check("beta", beta, (batch, length, heads), "(batch, length, heads)")
  common.check("initial_state", initial_state, (batch, heads, d_k, d_v),
               "(batch, heads, d_k, d_v)")
  common.check_reset(reset, batch, length)
  return batch, length, heads, d_k, d_v
