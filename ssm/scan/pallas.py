"""Fused selective scan in Pallas: the state stays on chip, inputs are read once.

The grid runs over (batch, blocks of K channels); each program keeps its state
(N, K) in float32 on chip and walks the sequence in unrolled chunks of T steps.
The backward is a custom VJP that recomputes states from checkpoints every ~sqrt(L/T)
chunks. One `pl.pallas_call` body serves CPU (interpret mode), GPU (Triton) and TPU
(Mosaic). The design, in full: docs/pallas.md.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Steps per chunk. Interpret mode (CPU) compiles every unrolled step: short chunks.
DEFAULT_CHUNK_SIZE = {"cpu": 4, "gpu": 16, "tpu": 16}
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Config:
  """Static settings of one kernel call.

  The sequence is `full` chunks of T steps, then a `rest` chunk of L mod T steps
  (if any). Full chunks are grouped into segments of `segment` chunks; the
  forward pass run for the VJP saves the state entering each segment, and the
  one entering the rest chunk."""
  length: int  # L
  chunk: int  # T, steps unrolled per chunk
  block: int  # K, channels per program
  delta_softplus: bool
  has_z: bool
  platform: str  # "cpu" (interpret mode), "gpu" or "tpu"

  @property
  def full(self):
    return self.length // self.chunk

  @property
  def rest(self):
    return self.length % self.chunk

  @property
  def segment(self):
    # sqrt(L / T) chunks per segment: the saved states (L / (T m) per channel) and
    # the backward's per-program workspace (m per channel) are then equally small.
    return max(1, math.isqrt(self.full - 1) + 1) if self.full else 1

  @property
  def num_segments(self):
    return -(-self.full // self.segment)

  @property
  def num_states(self):  # saved: one per segment, one for the rest chunk
    return self.num_segments + (self.rest > 0)


def default_channel_block(platform, channels, state):
  """K, a power of two. TPU: one vreg's 128 lanes. GPU: about 1024 state elements
  per program, 8 per thread at 4 warps (an untuned choice: GPU timings are owed).
  CPU (interpret mode): all channels at once, since every program is a loop trip."""
  if platform == "tpu":
    return 128
  if platform == "gpu":
    return max(16, min(128, 1024 // state))
  return min(pl.next_power_of_2(channels), 128)


def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, keep, h0, *,
         chunk_size=None, channel_block=None, platform=None):
  """A backend (see `ssm.scan.common`): returns (y in u's dtype, h_L in float32).

  `platform` ("cpu", "gpu", "tpu"; default: JAX's default backend) picks the
  lowering; "cpu" runs the kernel in interpret mode."""
  platform = platform or jax.default_backend()
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  b, L, Dch = u.shape
  N = A.shape[1]
  Np = pl.next_power_of_2(N)
  K = channel_block or default_channel_block(platform, Dch, Np)
  if platform != "cpu" and K & (K - 1):
    raise ValueError(f"channel_block={K}: the GPU and TPU kernels need a power of two")
  Dp = -(-Dch // K) * K
  cfg = Config(length=L, chunk=min(chunk_size or DEFAULT_CHUNK_SIZE[platform], L), block=K,
               delta_softplus=delta_softplus, has_z=z is not None, platform=platform)

  # Padded channels have u = delta = A = 0 and padded state components B = C = 0:
  # both stay zero and are sliced off. Padding copies only at odd sizes.
  pad = lambda x, axis, size: x if x.shape[axis] == size else jnp.pad(
      x, [(0, size - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])
  zeros = jnp.zeros((Dch,), jnp.float32)
  D = zeros if D is None else D
  delta_bias = zeros if delta_bias is None else delta_bias
  # Per-channel arrays go in as (1, Dp) rows and the state as (B, N, D): channels last.
  row = lambda x: pad(x, 0, Dp)[None]
  y, hT_BND = _scan(
      cfg, pad(u, 2, Dp), pad(delta, 2, Dp), None if z is None else pad(z, 2, Dp),
      pad(pad(A, 0, Dp), 1, Np).T, pad(B, 2, Np), pad(C, 2, Np), row(D), row(delta_bias),
      keep[..., None], pad(pad(jnp.swapaxes(h0, 1, 2), 1, Np), 2, Dp))
  return y[..., :Dch], jnp.swapaxes(hT_BND[:, :N, :Dch], 1, 2)


# --- the kernels -------------------------------------------------------------------

def _softplus(x):
  # log1p(exp(x)) overflows above ~88; past 20 softplus(x) = x in float32 (the CUDA
  # kernel's threshold).
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


class _Step:
  """One time step's inputs, read from the refs and made float32."""

  def __init__(self, cfg, refs, t, bias_1K):
    row = lambda name: refs[name][pl.ds(t, 1), :].astype(jnp.float32)
    self.u_1K = row("u")
    self.x_1K = row("delta") + bias_1K  # softplus's argument
    self.dt_1K = _softplus(self.x_1K) if cfg.delta_softplus else self.x_1K
    self.z_1K = row("z") if cfg.has_z else None
    n = refs["B"].shape[-1]
    self.B_N1 = row("B").reshape(n, 1)
    self.C_N1 = row("C").reshape(n, 1)
    self.keep_11 = refs["keep"][pl.ds(t, 1), :]

  def decay(self, A2_NK):
    """exp(delta A) as exp2(delta A log2 e), A2 = A log2 e: on GPUs exp2 is one
    special-function instruction (the CUDA kernel's choice too)."""
    return jnp.exp2(self.dt_1K * A2_NK) * self.keep_11

  def advance(self, h_NK, A2_NK):
    return self.decay(A2_NK) * h_NK + self.B_N1 * (self.dt_1K * self.u_1K)

  def output(self, h_NK, D_1K):
    """y before the gate: <h_t, C_t> + D u_t, (1, K)."""
    return jnp.sum(h_NK * self.C_N1, axis=0, keepdims=True) + D_1K * self.u_1K


def _silu_parts(z_1K):
  sig = jax.nn.sigmoid(z_1K)
  return z_1K * sig, sig


def _forward_kernel(cfg, names, *refs):
  refs = dict(zip(names, refs))
  A2_NK = refs["A"][...] * LOG2E
  D_1K, bias_1K = refs["D"][...], refs["bias"][...]
  save = "states" in refs  # the VJP's forward pass saves states for the backward

  def steps(t0, size, h_NK):
    for i in range(size):  # unrolled: the loads do not wait on the state
      s = _Step(cfg, refs, t0 + i, bias_1K)
      h_NK = s.advance(h_NK, A2_NK)
      y_1K = s.output(h_NK, D_1K)
      if cfg.has_z:
        y_1K = y_1K * _silu_parts(s.z_1K)[0]
      refs["y"][pl.ds(t0 + i, 1), :] = y_1K.astype(refs["y"].dtype)
    return h_NK

  def chunk(c, h_NK):
    if save:
      # lax's rem and div: c >= 0, and jnp's floor-division fix-ups do not lower to Triton.
      @pl.when(jax.lax.rem(c, cfg.segment) == 0)
      def _():
        refs["states"][jax.lax.div(c, cfg.segment)] = h_NK
    return steps(c * cfg.chunk, cfg.chunk, h_NK)

  h_NK = jax.lax.fori_loop(0, cfg.full, chunk, refs["h0"][...])
  if cfg.rest:
    if save:
      refs["states"][cfg.num_segments] = h_NK
    h_NK = steps(cfg.full * cfg.chunk, cfg.rest, h_NK)
  refs["hT"][...] = h_NK


def _backward_kernel(cfg, names, *refs):
  refs = dict(zip(names, refs))
  A_NK, D_1K, bias_1K = refs["A"][...], refs["D"][...], refs["bias"][...]
  A2_NK = A_NK * LOG2E
  if cfg.platform == "tpu":  # dB and dC accumulate over the sequential channel axis
    @pl.when(pl.program_id(1) == 0)
    def _():
      refs["dB"][...] = jnp.zeros_like(refs["dB"])
      refs["dC"][...] = jnp.zeros_like(refs["dC"])

  def advance(t0, size, h_NK):
    for i in range(size):
      h_NK = _Step(cfg, refs, t0 + i, bias_1K).advance(h_NK, A2_NK)
    return h_NK

  def chunk_backward(t0, size, h_NK, carry):
    """The adjoint recurrence back through one chunk entered with state h."""
    # The chunk's states, recomputed: hs[i] enters step i. They and the steps'
    # rows stay on chip (unrolled) for the way back.
    steps = [_Step(cfg, refs, t0 + i, bias_1K) for i in range(size)]
    hs = [h_NK]
    for s in steps:
      hs.append(s.advance(hs[-1], A2_NK))
    dh_NK, dA_NK, dD_1K, dbias_1K = carry
    for i in reversed(range(size)):
      t, s = t0 + i, steps[i]
      dy_1K = refs["dy"][pl.ds(t, 1), :].astype(jnp.float32)
      if cfg.has_z:
        silu, sig = _silu_parts(s.z_1K)
        y_1K = s.output(hs[i + 1], D_1K)
        refs["dz"][pl.ds(t, 1), :] = (
            dy_1K * y_1K * sig * (1.0 + s.z_1K * (1.0 - sig))).astype(refs["dz"].dtype)
        dy_1K = dy_1K * silu
      dD_1K = dD_1K + dy_1K * s.u_1K
      dh_NK = dh_NK + s.C_N1 * dy_1K
      dC_N1 = jnp.sum(hs[i + 1] * dy_1K, axis=1, keepdims=True)
      decay_NK = s.decay(A2_NK)
      ddecay_NK = dh_NK * hs[i] * decay_NK  # d/d(delta A) of exp(delta A)
      dA_NK = dA_NK + ddecay_NK * s.dt_1K
      dBu_1K = jnp.sum(dh_NK * s.B_N1, axis=0, keepdims=True)  # d(delta u)
      ddt_1K = jnp.sum(ddecay_NK * A_NK, axis=0, keepdims=True) + dBu_1K * s.u_1K
      dB_N1 = jnp.sum(dh_NK * (s.dt_1K * s.u_1K), axis=1, keepdims=True)
      dh_NK = dh_NK * decay_NK
      if cfg.delta_softplus:
        ddt_1K = ddt_1K * jax.nn.sigmoid(s.x_1K)
      dbias_1K = dbias_1K + ddt_1K
      refs["du"][pl.ds(t, 1), :] = (dy_1K * D_1K + dBu_1K * s.dt_1K).astype(refs["du"].dtype)
      refs["ddelta"][pl.ds(t, 1), :] = ddt_1K.astype(refs["ddelta"].dtype)
      _accumulate(cfg, refs["dB"], t, dB_N1.reshape(1, -1))
      _accumulate(cfg, refs["dC"], t, dC_N1.reshape(1, -1))
    return dh_NK, dA_NK, dD_1K, dbias_1K

  def segment(i, carry):
    s = cfg.num_segments - 1 - i
    first = s * cfg.segment
    count = jnp.minimum(cfg.segment, cfg.full - first)
    ws = refs["work"]  # (m, N, K): the states entering the segment's chunks

    def forward(j, h_NK):
      h_NK = advance((first + j) * cfg.chunk, cfg.chunk, h_NK)
      ws[j + 1] = h_NK
      return h_NK

    ws[0] = refs["states"][s]
    jax.lax.fori_loop(0, count - 1, forward, refs["states"][s])
    _barrier(cfg)

    def backward(jj, carry):
      j = count - 1 - jj
      return chunk_backward((first + j) * cfg.chunk, cfg.chunk, ws[j], carry)

    carry = jax.lax.fori_loop(0, count, backward, carry)
    _barrier(cfg)  # before the next segment overwrites the workspace
    return carry

  carry = (refs["dhT"][...], jnp.zeros_like(A_NK), jnp.zeros_like(D_1K), jnp.zeros_like(D_1K))
  if cfg.rest:  # the short last chunk first
    carry = chunk_backward(cfg.full * cfg.chunk, cfg.rest, refs["states"][cfg.num_segments],
                           carry)
  carry = jax.lax.fori_loop(0, cfg.num_segments, segment, carry)
  dh_NK, dA_NK, dD_1K, dbias_1K = carry
  refs["dh0"][...], refs["dA"][...], refs["dD"][...], refs["dbias"][...] = (
      dh_NK, dA_NK, dD_1K, dbias_1K)


def _barrier(cfg):
  """Orders a program's workspace writes and reads on a GPU, where the threads
  that store a state tile need not be those that load it back."""
  if cfg.platform == "gpu":
    from jax.experimental.pallas import triton as pltriton
    pltriton.debug_barrier()


def _accumulate(cfg, ref, t, row):
  """ref[t] += row, summing over the channel blocks that write the same row:
  atomically where programs run in parallel (GPU; interpret mode runs them in
  turn), in place on TPU, whose grid runs the channel axis in order."""
  if cfg.platform == "tpu":
    ref[pl.ds(t, 1), :] += row
  else:
    from jax.experimental.pallas import triton as pltriton
    pltriton.atomic_add(ref, (pl.ds(t, 1), slice(None)), row)


# --- pallas_call plumbing ------------------------------------------------------------

def _specs(cfg, shapes):
  """BlockSpecs for the grid (batch, channel blocks) from a dict name -> (kind, shape).

  Kinds: "BLK" a (B, L, D) sequence, "BLN" (B, L, N), "BL1" (B, L, 1),
  "param" a (rows, D) per-channel array, "state" (B, N, D), "states" (B, S, N, D),
  "work" (B, D / K, m, N, K): a program's own scratch."""
  K = cfg.block
  maps = {
      "BLK": lambda s: pl.BlockSpec((None, s[1], K), lambda b, k: (b, 0, k)),
      "BLN": lambda s: pl.BlockSpec((None, s[1], s[2]), lambda b, k: (b, 0, 0)),
      "BL1": lambda s: pl.BlockSpec((None, s[1], 1), lambda b, k: (b, 0, 0)),
      "param": lambda s: pl.BlockSpec((s[0], K), lambda b, k: (0, k)),
      "state": lambda s: pl.BlockSpec((None, s[1], K), lambda b, k: (b, 0, k)),
      "states": lambda s: pl.BlockSpec((None, s[1], s[2], K), lambda b, k: (b, 0, 0, k)),
      "work": lambda s: pl.BlockSpec((None, None, *s[2:]), lambda b, k: (b, k, 0, 0, 0)),
  }
  return [maps[kind](shape) for kind, shape in shapes.values()]


def _call(cfg, kernel, inputs, outputs, aliases=(), sequential_channels=False):
  """pallas_call over (batch, channel blocks); `inputs` name -> (kind, array),
  `outputs` name -> (kind, ShapeDtypeStruct); `aliases` (input, output) names
  whose buffers are shared. Returns the outputs by name."""
  batch, channels = inputs["u"][1].shape[0], inputs["u"][1].shape[2]
  names = tuple(inputs) + tuple(outputs)
  shapes = lambda d: {k: (kind, x.shape) for k, (kind, x) in d.items()}
  if cfg.platform == "gpu":
    from jax.experimental.pallas import triton as pltriton
    params = pltriton.CompilerParams(num_warps=4, num_stages=1)
  elif cfg.platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    params = pltpu.CompilerParams(dimension_semantics=(
        "parallel", "arbitrary" if sequential_channels else "parallel"))
  else:
    params = None
  out = pl.pallas_call(
      functools.partial(kernel, cfg, names),
      grid=(batch, channels // cfg.block),
      in_specs=_specs(cfg, shapes(inputs)),
      out_specs=_specs(cfg, shapes(outputs)),
      out_shape=[x for _, x in outputs.values()],
      input_output_aliases={list(inputs).index(i): list(outputs).index(o) for i, o in aliases},
      compiler_params=params,
      interpret=cfg.platform == "cpu",
      name=kernel.__name__.strip("_"),
  )(*(x for _, x in inputs.values()))
  return dict(zip(outputs, out))


def _inputs(u, delta, z, A, B, C, D, bias, keep):
  x = dict(u=("BLK", u), delta=("BLK", delta), z=("BLK", z), B=("BLN", B), C=("BLN", C),
           keep=("BL1", keep), A=("param", A), D=("param", D), bias=("param", bias))
  return {k: v for k, v in x.items() if v[1] is not None}


def _forward(cfg, u, delta, z, A, B, C, D, bias, keep, h0, save_states):
  b, _, Dp = u.shape
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  outputs = dict(y=("BLK", jax.ShapeDtypeStruct(u.shape, u.dtype)),
                 hT=("state", f32(*h0.shape)))
  if save_states:
    outputs["states"] = ("states", f32(b, cfg.num_states, A.shape[0], Dp))
  inputs = dict(_inputs(u, delta, z, A, B, C, D, bias, keep), h0=("state", h0))
  return _call(cfg, _forward_kernel, inputs, outputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, u, delta, z, A, B, C, D, bias, keep, h0):
  out = _forward(cfg, u, delta, z, A, B, C, D, bias, keep, h0, save_states=False)
  return out["y"], out["hT"]


def _scan_fwd(cfg, u, delta, z, A, B, C, D, bias, keep, h0):
  out = _forward(cfg, u, delta, z, A, B, C, D, bias, keep, h0, save_states=True)
  return (out["y"], out["hT"]), (u, delta, z, A, B, C, D, bias, keep, out["states"])


def _scan_bwd(cfg, residuals, cotangents):
  u, delta, z, A, B, C, D, bias, keep, states = residuals
  dy, dhT = cotangents
  b, L, Dp = u.shape
  Np, K = A.shape[0], cfg.block
  like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  # dB and dC are summed into float32 buffers that start at zero.
  outputs = dict(du=("BLK", like(u)), ddelta=("BLK", like(delta)),
                 dB=("BLN", f32(b, L, Np)), dC=("BLN", f32(b, L, Np)),
                 dA=("state", f32(b, Np, Dp)), dD=("state", f32(b, 1, Dp)),
                 dbias=("state", f32(b, 1, Dp)), dh0=("state", f32(b, Np, Dp)),
                 work=("work", f32(b, Dp // K, cfg.segment, Np, K)))
  if z is not None:
    outputs["dz"] = ("BLK", like(z))
  zeros = jnp.zeros((b, L, Np), jnp.float32)
  inputs = dict(_inputs(u, delta, z, A, B, C, D, bias, keep), states=("states", states),
                dy=("BLK", dy.astype(u.dtype)), dhT=("state", dhT), dB0=("BLN", zeros),
                dC0=("BLN", zeros))
  g = _call(cfg, _backward_kernel, inputs, outputs, aliases=(("dB0", "dB"), ("dC0", "dC")),
            sequential_channels=True)
  # dA, dD and d(delta_bias) per batch row: (batch, D) partial sums, small.
  return (g["du"], g["ddelta"], g.get("dz"), g["dA"].sum(0), g["dB"].astype(B.dtype),
          g["dC"].astype(C.dtype), g["dD"].sum(0), g["dbias"].sum(0), jnp.zeros_like(keep),
          g["dh0"])


_scan.defvjp(_scan_fwd, _scan_bwd)
