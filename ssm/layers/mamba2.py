"""The Mamba-2 mixer, as the official `Mamba2` (mamba_ssm/modules/mamba2.py; its
`mamba2_simple.py` with grouped normalisation): one in_proj to (z, x, B, C, dt),
causal depthwise conv1d with bias over (x, B, C), SiLU, the SSD scan (ssm.scan.ssd)
with a scalar A per head, softplus(dt + dt_bias) clamped to dt_limit and the D skip;
a gated RMSNorm, norm(y * silu(z)) per group of channels, before out_proj. With the
official initialisation and the same cache / `step` interface as the Mamba mixer.

Tensor parallelism splits the heads, and the groups with them: each shard projects,
convolves and scans its own heads' z, x and dt and its groups' B and C (`InProj`).
Where the mesh's t tensor shards do not divide the G groups, B and C are projected as
lcm(G, t) groups, each group repeated, so that each shard still holds the groups of
its own heads (`Mamba2._groups`).

Shapes: B batch, L length, D d_model, E d_inner = expand * d_model, H heads = E /
headdim, P headdim, G ngroups, N d_state, K d_conv, X = E + 2 G N (conv channels).
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ssm.fields import require
from ssm.layers import partitioning
from ssm.layers.conv import (causal_conv1d, conv_final_state, conv_params, conv_step,
                             init_conv_state)
from ssm.layers.init import dt_bias_init
from ssm.scan import ssd, ssd_state_update
from ssm.scan.ssd import DEFAULT_CHUNK_SIZE, NO_DT_LIMIT, check_dt_limit
from ssm.scan.ssd import IMPLS as SSD_IMPLS


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  """Mixer hyperparameters; the defaults are the official `Mamba2`'s."""
  d_state: int = 128
  d_conv: int = 4
  expand: int = 2
  headdim: int = 64
  ngroups: int = 1
  A_init_min: float = 1.0  # A = -U(A_init_min, A_init_max) per head
  A_init_max: float = 16.0
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  dt_limit: tuple = NO_DT_LIMIT  # (lo, hi): softplus(dt + dt_bias) clamped to it
  conv_bias: bool = True
  bias: bool = False  # in_proj and out_proj
  norm_eps: float = 1e-5  # the gated RMSNorm's
  chunk_size: int = DEFAULT_CHUNK_SIZE  # the SSD's (the official 256)
  scan_impl: str = "auto"  # see ssm.scan.ssd

  def __post_init__(self):
    # a tuple however given (a list from config.json), so that the config hashes
    object.__setattr__(self, "dt_limit",
                       check_dt_limit(self.dt_limit, "model.mamba2.dt_limit"))
    require("model.mamba2", d_state=(self.d_state, self.d_state > 0),
            d_conv=(self.d_conv, self.d_conv > 0), expand=(self.expand, self.expand > 0),
            headdim=(self.headdim, self.headdim > 0), ngroups=(self.ngroups, self.ngroups > 0),
            chunk_size=(self.chunk_size, self.chunk_size > 0),
            A_init_min=(self.A_init_min, 0 < self.A_init_min <= self.A_init_max,
                        "needs 0 < A_init_min <= A_init_max"),
            dt_min=(self.dt_min, 0 < self.dt_min <= self.dt_max, "needs 0 < dt_min <= dt_max"),
            scan_impl=(self.scan_impl, self.scan_impl in SSD_IMPLS,
                       f"expected one of {SSD_IMPLS} (the SSD's backends)"))

  def dims(self, d_model):
    """(E, H, X): d_inner, heads and conv channels at `d_model`; a ValueError that says
    what to change where headdim or ngroups do not divide."""
    E = self.expand * d_model
    if E % self.headdim:
      raise ValueError(f"model.mamba2.headdim={self.headdim} must divide d_inner = expand * "
                       f"d_model = {E}: pick a headdim dividing {E}")
    H = E // self.headdim
    if H % self.ngroups:
      raise ValueError(f"model.mamba2.ngroups={self.ngroups} must divide the {H} heads "
                       f"(d_inner {E} / headdim {self.headdim})")
    return E, H, E + 2 * self.ngroups * self.d_state


class Mamba2Cache(NamedTuple):
  conv: jax.Array  # (B, K-1, X): the last K-1 conv inputs (x, B, C), oldest first
  ssm: jax.Array  # (B, H, P, N) float32


class GatedRMSNorm(nnx.Module):
  """norm(y * silu(z)) * weight, the RMS taken over groups of `group_size` channels
  (mamba_ssm's RMSNormGated with norm_before_gate=False). float32 inside."""

  def __init__(self, dim, group_size, *, eps):
    self.group_size, self.eps = group_size, eps
    self.weight = partitioning.param(jnp.ones((dim,), jnp.float32), ("inner",), decay=False)

  def __call__(self, y, z):
    h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    # The groups' mean squares as products with the (channels, groups) membership
    # matrix, not a reshape into groups: channels split over a mesh where its shards do
    # not split the groups alike then need only the sum of partial means (all-reduce).
    dim = h.shape[-1]
    member = jnp.arange(dim)[:, None] // self.group_size == jnp.arange(dim // self.group_size)
    dot = lambda a, b: jnp.matmul(a, b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    rms = jax.lax.rsqrt(dot(jnp.square(h), member) / self.group_size + self.eps)
    return (h * dot(rms, member.T) * self.weight[...]).astype(y.dtype)


def in_proj_parts(w, d_inner, ngroups, d_state):
  """The official in_proj's (..., 2E + 2GN + H) outputs (a bias, or a kernel's
  transpose), in its order z, x, B, C, dt, as `InProj`'s three parameters: z and x
  (..., 2, E), B and C (..., 2, G, N), dt (..., H)."""
  E, GN = d_inner, ngroups * d_state
  lead = w.shape[:-1]
  return (w[..., :2 * E].reshape(*lead, 2, E),
          w[..., 2 * E:2 * E + 2 * GN].reshape(*lead, 2, ngroups, d_state),
          w[..., 2 * E + 2 * GN:])


class InProj(nnx.Module):
  """in_proj: (..., D) -> z, x (..., E), B, C (..., G, N) and dt (..., H). The official
  (D, 2E + 2GN + H) matrix (`in_proj_parts`) held in three parts, each split over
  `tensor` along what indexes it: z and x along the channels (as Mamba's in_proj), B
  and C along the groups (whole where the mesh does not divide them), dt along the
  heads. A shard then computes its own heads' z, x, dt and its groups' B, C."""

  def __init__(self, d_model, d_inner, nheads, ngroups, d_state, *, use_bias, dtype,
               param_dtype, rngs):
    self.dtype = dtype
    E, H, G, N = d_inner, nheads, ngroups, d_state
    # PyTorch's nn.Linear init, fan-in d_model: U(+-1/sqrt(d_model)), in every part
    init = lambda shape: nnx.initializers.variance_scaling(
        1 / 3, "fan_in", "uniform", in_axis=0, out_axis=tuple(range(1, len(shape))))(
            rngs.params(), shape, param_dtype)
    zeros = lambda shape: jnp.zeros(shape, param_dtype)
    self.kernel = partitioning.param(init((d_model, 2, E)), ("embed", None, "inner"))
    self.kernel_bc = partitioning.param(init((d_model, 2, G, N)), ("embed", None, "groups", None))
    self.kernel_dt = partitioning.param(init((d_model, H)), ("embed", "heads"))
    bias = lambda shape, axes: partitioning.param(zeros(shape), axes, decay=False)
    self.bias, self.bias_bc, self.bias_dt = ((
        bias((2, E), (None, "inner")), bias((2, G, N), (None, "groups", None)),
        bias((H,), ("heads",))) if use_bias else (None, None, None))

  def __call__(self, x_D, groups=None):
    """z, x, B, C, dt; with `groups` (a multiple of G), B and C as that many groups,
    each of the G repeated, laid out over the mesh as groups are."""
    x_D = x_D.astype(self.dtype)
    value = lambda t: None if t is None else t[...]
    kernel_bc, bias_bc = value(self.kernel_bc), value(self.bias_bc)
    if groups is not None and groups != kernel_bc.shape[2]:
      r = groups // kernel_bc.shape[2]
      kernel_bc = partitioning.constrain(jnp.repeat(kernel_bc, r, axis=2),
                                         ("embed", None, "groups", None))
      bias_bc = None if bias_bc is None else jnp.repeat(bias_bc, r, axis=1)

    def proj(spec, w, b):
      y = jnp.einsum(spec, x_D, w.astype(self.dtype))
      return y if b is None else y + b.astype(self.dtype)

    zx = proj("...d,dke->...ke", self.kernel[...], value(self.bias))
    BC = proj("...d,dkgn->...kgn", kernel_bc, bias_bc)
    dt = proj("...d,dh->...h", self.kernel_dt[...], value(self.bias_dt))
    return zx[..., 0, :], zx[..., 1, :], BC[..., 0, :, :], BC[..., 1, :, :], dt


class Mamba2(nnx.Module):
  """The Mamba-2 mixer, (B, L, D) -> (B, L, D)."""

  def __init__(self, d_model, config: Mamba2Config = Mamba2Config(), *, n_residuals=1,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config, self.dtype = c, dtype
    self.d_inner, self.nheads, self.conv_dim = E, H, X = c.dims(d_model)
    G, N, K = c.ngroups, c.d_state, c.d_conv
    # in_proj's outputs, in the official order: z (E), x (E), B (G N), C (G N), dt (H).
    self.d_in_proj = 2 * E + 2 * G * N + H
    self.in_proj = InProj(d_model, E, H, G, N, use_bias=c.bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    # replicated: x's channels and B's and C's shard differently (`_conv_parts` cuts it)
    self.conv_weight, self.conv_bias = conv_params(K, X, None, use_bias=c.conv_bias,
                                                   param_dtype=param_dtype, rngs=rngs)
    dt_init = dt_bias_init(c.dt_min, c.dt_max, c.dt_init_floor)
    self.dt_bias = partitioning.param(dt_init(rngs.params(), (H,)), ("heads",), decay=False)
    A = jax.random.uniform(rngs.params(), (H,), jnp.float32, c.A_init_min, c.A_init_max)
    self.A_log = partitioning.param(jnp.log(A), ("heads",), decay=False)
    self.D = partitioning.param(jnp.ones((H,), jnp.float32), ("heads",), decay=False)
    self.norm = GatedRMSNorm(E, E // G, eps=c.norm_eps)
    # GPT-2 style: out_proj scaled by 1/sqrt(n_residuals), as mamba_ssm's _init_weights.
    out_init = nnx.initializers.variance_scaling(1 / (3 * n_residuals), "fan_in", "uniform")
    self.out_proj = partitioning.linear(E, d_model, ("inner", "embed"), use_bias=c.bias,
                                        dtype=dtype, param_dtype=param_dtype,
                                        kernel_init=out_init, rngs=rngs)

  def _groups(self):
    """How many groups B and C are computed as: G, or on a mesh whose t tensor shards
    split the heads but not the groups, lcm(G, t), each group repeated (lcm(G, t)
    divides H, as G and t do). Head h then reads group h // (H / groups) either way,
    and the heads of each shard have their groups on that shard."""
    t = partitioning.mesh_size("heads")
    G = self.config.ngroups
    return math.lcm(G, t) if self.nheads % t == 0 else G

  def _in_proj(self, x_BLD, groups):
    """z, x, B, C, dt, kept where in_proj computes them (batch, heads and groups sharded)."""
    z_BLE, x_BLE, B_BLGN, C_BLGN, dt_BLH = self.in_proj(x_BLD, groups)
    BLE, BLGN = ("batch", None, "inner"), ("batch", None, "groups", None)
    return (partitioning.constrain(z_BLE, BLE), partitioning.constrain(x_BLE, BLE),
            partitioning.constrain(B_BLGN, BLGN), partitioning.constrain(C_BLGN, BLGN),
            partitioning.constrain(dt_BLH, ("batch", None, "heads")))

  def _conv_parts(self, groups):
    """The conv's (weight (K, .), bias (.)) for x, B and C (as `groups` groups): it is
    depthwise, so each part convolves on the shards that hold it."""
    E, G, N = self.d_inner, self.config.ngroups, self.config.d_state

    def cut(t, start, grouped):  # t[..., start:...], B's or C's repeated as groups
      if t is None or not grouped:
        return None if t is None else t[..., start:start + E]
      t = t[..., start:start + G * N].reshape(*t.shape[:-1], G, N)
      return jnp.repeat(t, groups // G, axis=-2).reshape(*t.shape[:-2], groups * N)

    w, b = self.conv_weight[...], None if self.conv_bias is None else self.conv_bias[...]
    return [(cut(w, start, grouped), cut(b, start, grouped))
            for start, grouped in ((0, False), (E, True), (E + G * N, True))]

  def _heads(self, xBC):
    """conv output -> x (..., H, P), B and C (..., G, N)."""
    c, E = self.config, self.d_inner
    GN = c.ngroups * c.d_state
    lead = xBC.shape[:-1]
    return (xBC[..., :E].reshape(*lead, self.nheads, c.headdim),
            xBC[..., E:E + GN].reshape(*lead, c.ngroups, c.d_state),
            xBC[..., E + GN:].reshape(*lead, c.ngroups, c.d_state))

  def _params32(self):
    return (-jnp.exp(self.A_log[...].astype(jnp.float32)), self.D[...].astype(jnp.float32),
            self.dt_bias[...].astype(jnp.float32))

  def _scan(self, x_BLHP, dt_BLH, B_BLGN, C_BLGN, reset_BL):
    """The SSD scan with D. Independent per batch row and head: on a mesh each device
    scans its block of rows and heads (shard_map) with its heads' groups of B and C,
    which `_groups` put on the same shard."""
    c = self.config
    A_H, D_H, dt_bias_H = self._params32()

    def scan(x, dt, A, B, C, D, dt_bias, reset):
      return ssd(x, dt, A, B, C, D, dt_bias, dt_softplus=True, return_final_state=True,
                 impl=c.scan_impl, reset=reset, dt_limit=c.dt_limit,
                 chunk_size=None if c.scan_impl == "reference" else c.chunk_size)

    BLHP, H = ("batch", None, "heads", None), ("heads",)
    return partitioning.shard_map(
        scan, (x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H, reset_BL),
        in_axes=(BLHP, ("batch", None, "heads"), H, BLHP, BLHP, H, H, ("batch", None)),
        out_axes=(BLHP, ("batch", "heads", None, None)))

  def __call__(self, x_BLD, reset_BL=None, *, positions_BL=None, return_cache=False,
               max_length=None):
    """With `return_cache`, also the Mamba2Cache after the last position.
    (`positions_BL` and `max_length` are the mixer interface's; Mamba-2 needs neither.)"""
    c, K = self.config, self.config.d_conv
    B_, L = x_BLD.shape[:2]
    G, N = self._groups(), c.d_state  # G: as many groups as `_groups` says
    with jax.named_scope("mamba2"):
      z_BLE, x_BLE, B_BLGN, C_BLGN, dt_BLH = self._in_proj(x_BLD, G)
      # x, B and C, each (B, L, channels), through the conv and SiLU
      parts = (x_BLE, B_BLGN.reshape(B_, L, G * N), C_BLGN.reshape(B_, L, G * N))
      xc_BLE, Bc_BLX, Cc_BLX = (
          jax.nn.silu(causal_conv1d(u, w, b, reset_BL)) for u, (w, b) in
          zip(parts, self._conv_parts(G)))
      Bc_BLGN, Cc_BLGN = Bc_BLX.reshape(B_, L, G, N), Cc_BLX.reshape(B_, L, G, N)
      y_BLHP, h_BHPN = self._scan(xc_BLE.reshape(B_, L, self.nheads, c.headdim), dt_BLH,
                                  Bc_BLGN, Cc_BLGN, reset_BL)
      y_BLE = self.norm(y_BLHP.reshape(B_, L, self.d_inner), z_BLE)
      out_BLD = self.out_proj(y_BLE)
    if not return_cache:
      return out_BLD
    # the conv state of x, B and C, each group once
    r = G // c.ngroups
    last = [conv_final_state(p, K, reset_BL) for p in parts]
    last[1:] = [t.reshape(*t.shape[:2], G, N)[:, :, ::r].reshape(*t.shape[:2], -1)
                for t in last[1:]]
    return out_BLD, Mamba2Cache(jnp.concatenate(last, axis=-1), h_BHPN)

  def init_cache(self, batch, max_length=None):
    c = self.config
    return Mamba2Cache(init_conv_state(batch, c.d_conv, self.conv_dim, self.dtype),
                       jnp.zeros((batch, self.nheads, c.headdim, c.d_state), jnp.float32))

  def step(self, x_BD, cache: Mamba2Cache, position=None):
    """One token: (B, D) -> (B, D), and the updated cache. (`position` is the mixer
    interface's: a recurrent mixer ignores it.)"""
    z_BE, x_BE, B_BGN, C_BGN, dt_BH = self.in_proj(x_BD)
    xBC_BX = jnp.concatenate([x_BE, B_BGN.reshape(x_BE.shape[0], -1),
                              C_BGN.reshape(x_BE.shape[0], -1)], axis=-1)
    bias = None if self.conv_bias is None else self.conv_bias[...]
    conv_BX, conv_BKX = conv_step(cache.conv, xBC_BX, self.conv_weight[...], bias)
    x_BHP, B_BGN, C_BGN = self._heads(jax.nn.silu(conv_BX).astype(xBC_BX.dtype))
    A_H, D_H, dt_bias_H = self._params32()
    y_BHP, ssm_BHPN = ssd_state_update(cache.ssm, x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H,
                                       dt_bias_H, dt_limit=self.config.dt_limit)
    y_BE = self.norm(y_BHP.reshape(y_BHP.shape[0], self.d_inner), z_BE)
    return self.out_proj(y_BE), Mamba2Cache(conv_BKX, ssm_BHPN)
