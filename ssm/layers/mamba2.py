"""The Mamba-2 mixer, as the official `Mamba2` (mamba_ssm/modules/mamba2.py; its
`mamba2_simple.py` with grouped normalisation): one in_proj to (z, x, B, C, dt),
causal depthwise conv1d with bias over (x, B, C), SiLU, the SSD scan (ssm.scan.ssd)
with a scalar A per head, softplus(dt + dt_bias) and the D skip; a gated RMSNorm,
norm(y * silu(z)) per group of channels, before out_proj. With the official
initialisation and the same cache / `step` interface as the Mamba mixer.

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
from ssm.layers.mamba import causal_conv1d, uniform
from ssm.scan import ssd, ssd_state_update
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
  conv_bias: bool = True
  bias: bool = False  # in_proj and out_proj
  norm_eps: float = 1e-5  # the gated RMSNorm's
  chunk_size: int = 256
  scan_impl: str = "auto"  # see ssm.scan.ssd

  def __post_init__(self):
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
    g = h.reshape(*h.shape[:-1], -1, self.group_size)
    g = g * jax.lax.rsqrt(jnp.mean(jnp.square(g), axis=-1, keepdims=True) + self.eps)
    return (g.reshape(h.shape) * self.weight[...]).astype(y.dtype)


class Mamba2(nnx.Module):
  """The Mamba-2 mixer, (B, L, D) -> (B, L, D)."""

  def __init__(self, d_model, config: Mamba2Config = Mamba2Config(), *, n_residuals=1,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config, self.dtype = c, dtype
    self.d_inner, self.nheads, self.conv_dim = E, H, X = c.dims(d_model)
    G, N, K = c.ngroups, c.d_state, c.d_conv
    # in_proj's output, in the official order: z (E), x (E), B (G N), C (G N), dt (H).
    self.d_in_proj = 2 * E + 2 * G * N + H
    torch_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    self.in_proj = partitioning.linear(d_model, self.d_in_proj, ("embed", None), use_bias=c.bias,
                                       dtype=dtype, param_dtype=param_dtype,
                                       kernel_init=torch_init, rngs=rngs)
    conv_init = uniform(1 / math.sqrt(K))  # PyTorch's depthwise Conv1d init (fan-in K)
    self.conv_weight = partitioning.param(conv_init(rngs.params(), (K, X), param_dtype),
                                          (None, None))
    self.conv_bias = (partitioning.param(conv_init(rngs.params(), (X,), param_dtype), (None,),
                                         decay=False) if c.conv_bias else None)
    self.dt_bias = partitioning.param(self._dt_bias_init(rngs.params(), (H,)), ("heads",),
                                      decay=False)
    A = jax.random.uniform(rngs.params(), (H,), jnp.float32, c.A_init_min, c.A_init_max)
    self.A_log = partitioning.param(jnp.log(A), ("heads",), decay=False)
    self.D = partitioning.param(jnp.ones((H,), jnp.float32), ("heads",), decay=False)
    self.norm = GatedRMSNorm(E, E // G, eps=c.norm_eps)
    # GPT-2 style: out_proj scaled by 1/sqrt(n_residuals), as mamba_ssm's _init_weights.
    out_init = nnx.initializers.variance_scaling(1 / (3 * n_residuals), "fan_in", "uniform")
    self.out_proj = partitioning.linear(E, d_model, ("inner", "embed"), use_bias=c.bias,
                                        dtype=dtype, param_dtype=param_dtype,
                                        kernel_init=out_init, rngs=rngs)

  def _dt_bias_init(self, key, shape):
    """softplus^-1 of dt ~ log-uniform in [dt_min, dt_max], clamped at the floor."""
    c = self.config
    log_min, log_max = math.log(c.dt_min), math.log(c.dt_max)
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (log_max - log_min) + log_min)
    dt = jnp.maximum(dt, c.dt_init_floor)
    return dt + jnp.log(-jnp.expm1(-dt))

  def _split(self, zxbcdt):
    """in_proj's output -> (z (..., E), xBC (..., X), dt (..., H))."""
    E, X = self.d_inner, self.conv_dim
    return zxbcdt[..., :E], zxbcdt[..., E:E + X], zxbcdt[..., E + X:]

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

  def __call__(self, x_BLD, reset_BL=None, *, positions_BL=None, return_cache=False,
               max_length=None):
    """With `return_cache`, also the Mamba2Cache after the last position.
    (`positions_BL` and `max_length` are the mixer interface's; Mamba-2 needs neither.)"""
    c, K = self.config, self.config.d_conv
    B_, L = x_BLD.shape[:2]
    with jax.named_scope("mamba2"):
      z_BLE, xBC_BLX, dt_BLH = self._split(self.in_proj(x_BLD))
      bias = None if self.conv_bias is None else self.conv_bias[...]
      conv_BLX = jax.nn.silu(causal_conv1d(xBC_BLX, self.conv_weight[...], bias, reset_BL))
      x_BLHP, B_BLGN, C_BLGN = self._heads(conv_BLX)
      A_H, D_H, dt_bias_H = self._params32()

      def scan(x, dt, A, B, C, D, dt_bias, reset):
        return ssd(x, dt, A, B, C, D, dt_bias, dt_softplus=True, return_final_state=True,
                   impl=c.scan_impl, reset=reset,
                   chunk_size=None if c.scan_impl == "reference" else c.chunk_size)

      # Independent per batch row and head: on a mesh each device scans its block.
      BLHP, BLGN, H = ("batch", None, "heads", None), ("batch", None, None, None), ("heads",)
      y_BLHP, h_BHPN = partitioning.shard_map(
          scan, (x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H, reset_BL),
          in_axes=(BLHP, ("batch", None, "heads"), H, BLGN, BLGN, H, H, ("batch", None)),
          out_axes=(BLHP, ("batch", "heads", None, None)))
      y_BLE = self.norm(y_BLHP.reshape(B_, L, self.d_inner), z_BLE)
      out_BLD = self.out_proj(y_BLE)
    if not return_cache:
      return out_BLD
    conv_BKX = jnp.pad(xBC_BLX, ((0, 0), (K - 1, 0), (0, 0)))[:, -(K - 1):]
    if reset_BL is not None:  # only the last document's inputs reach later tokens
      doc_BL = jnp.cumsum(reset_BL, axis=1)
      in_last = jnp.pad(doc_BL == doc_BL[:, -1:], ((0, 0), (K - 1, 0)))[:, -(K - 1):]
      conv_BKX = jnp.where(in_last[..., None], conv_BKX, 0)
    return out_BLD, Mamba2Cache(conv_BKX, h_BHPN)

  def init_cache(self, batch, max_length=None):
    c = self.config
    return Mamba2Cache(jnp.zeros((batch, c.d_conv - 1, self.conv_dim), self.dtype),
                       jnp.zeros((batch, self.nheads, c.headdim, c.d_state), jnp.float32))

  def step(self, x_BD, cache: Mamba2Cache, position=None):
    """One token: (B, D) -> (B, D), and the updated cache. (`position` is the mixer
    interface's: a recurrent mixer ignores it.)"""
    z_BE, xBC_BX, dt_BH = self._split(self.in_proj(x_BD))
    window_BKX = jnp.concatenate([cache.conv, xBC_BX[:, None].astype(cache.conv.dtype)], axis=1)
    conv_BX = jnp.sum(window_BKX.astype(jnp.float32) * self.conv_weight[...].astype(jnp.float32),
                      axis=1)
    if self.conv_bias is not None:
      conv_BX = conv_BX + self.conv_bias[...].astype(jnp.float32)
    x_BHP, B_BGN, C_BGN = self._heads(jax.nn.silu(conv_BX).astype(xBC_BX.dtype))
    A_H, D_H, dt_bias_H = self._params32()
    y_BHP, ssm_BHPN = ssd_state_update(cache.ssm, x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H,
                                       dt_bias_H)
    y_BE = self.norm(y_BHP.reshape(y_BHP.shape[0], self.d_inner), z_BE)
    return self.out_proj(y_BE), Mamba2Cache(window_BKX[:, 1:], ssm_BHPN)
