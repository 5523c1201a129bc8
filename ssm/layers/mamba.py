"""The Mamba mixer, as the official `mamba_simple.py`: in_proj to x and z, causal
depthwise conv1d with bias, SiLU, x_proj to (dt, B, C), dt_proj, softplus inside
the scan, D skip and z gate, out_proj. With its official initialisation, and a
one-token `step` for decoding from a cache (conv state + SSM state).

Shapes: B batch, L length, D d_model, E d_inner = expand * d_model, N d_state,
R dt_rank, K d_conv.
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
from ssm.layers.init import dt_bias_init, torch_linear_init, uniform
from ssm.scan import selective_scan, selective_state_update


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """Mixer hyperparameters; the defaults are the official ones."""
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | str = "auto"  # "auto": ceil(d_model / 16)
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init: str = "random"  # or "constant"
  dt_scale: float = 1.0
  dt_init_floor: float = 1e-4
  conv_bias: bool = True
  bias: bool = False  # in_proj and out_proj
  scan_impl: str = "auto"  # see ssm.scan.selective_scan

  def __post_init__(self):
    require("model.mamba", d_state=(self.d_state, self.d_state > 0),
            d_conv=(self.d_conv, self.d_conv > 0), expand=(self.expand, self.expand > 0),
            dt_min=(self.dt_min, 0 < self.dt_min <= self.dt_max, "needs 0 < dt_min <= dt_max"))


class MambaCache(NamedTuple):
  conv: jax.Array  # (B, K-1, E): the last K-1 conv inputs, oldest first
  ssm: jax.Array  # (B, E, N) float32


class InProj(nnx.Module):
  """in_proj: (..., D) -> x and z, each (..., E). The official (D, 2E) matrix, held as
  (D, 2, E) so that sharding the channels E (tensor parallelism) splits x and z
  alike: x, z and everything after them stay on the same shard."""

  def __init__(self, d_model, d_inner, *, use_bias, dtype, param_dtype, rngs):
    self.dtype = dtype
    # PyTorch's nn.Linear init, fan-in d_model: U(+-1/sqrt(d_model))
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0,
                                             out_axis=(1, 2))
    self.kernel = partitioning.param(init(rngs.params(), (d_model, 2, d_inner), param_dtype),
                                     ("embed", None, "inner"))
    self.bias = (partitioning.param(jnp.zeros((2, d_inner), param_dtype), (None, "inner"),
                                    decay=False) if use_bias else None)

  def __call__(self, x_D):
    xz = jnp.einsum("...d,dke->...ke", x_D.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      xz = xz + self.bias[...].astype(self.dtype)
    return xz[..., 0, :], xz[..., 1, :]


class Mamba(nnx.Module):
  """The Mamba mixer, (B, L, D) -> (B, L, D)."""

  def __init__(self, d_model, config: MambaConfig = MambaConfig(), *, n_residuals=1,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config, self.dtype = c, dtype
    self.d_inner = E = c.expand * d_model
    self.dt_rank = R = math.ceil(d_model / 16) if c.dt_rank == "auto" else c.dt_rank
    N, K = c.d_state, c.d_conv
    linear = lambda i, o, axes, **kw: partitioning.linear(i, o, axes, dtype=dtype,
                                                          param_dtype=param_dtype, rngs=rngs, **kw)
    self.in_proj = InProj(d_model, E, use_bias=c.bias, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
    self.conv_weight, self.conv_bias = conv_params(K, E, "inner", use_bias=c.conv_bias,
                                                   param_dtype=param_dtype, rngs=rngs)
    self.x_proj = linear(E, R + 2 * N, ("inner", None), use_bias=False,
                         kernel_init=torch_linear_init())
    dt_std = R**-0.5 * c.dt_scale
    dt_kernel_init = (nnx.initializers.constant(dt_std) if c.dt_init == "constant"
                      else uniform(dt_std))
    self.dt_proj = linear(R, E, (None, "inner"), use_bias=True, bias_axes=("inner",),
                          kernel_init=dt_kernel_init,
                          bias_init=dt_bias_init(c.dt_min, c.dt_max, c.dt_init_floor))
    # S4D-real: A = -(1, 2, ..., N) in every channel. A_log and D stay float32.
    self.A_log = partitioning.param(
        jnp.log(jnp.tile(jnp.arange(1, N + 1, dtype=jnp.float32), (E, 1))), ("inner", None),
        decay=False)
    self.D = partitioning.param(jnp.ones((E,), jnp.float32), ("inner",), decay=False)
    # GPT-2 style: the residual branch's last projection scaled by 1/sqrt(n_residuals),
    # the number of residual branches in the model (n_layer for a pure Mamba LM).
    out_init = nnx.initializers.variance_scaling(1 / (3 * n_residuals), "fan_in", "uniform")
    self.out_proj = linear(E, d_model, ("inner", "embed"), use_bias=c.bias, kernel_init=out_init)

  def _in_proj(self, x_BLD):
    """x and z, kept where in_proj computes them: batch and channels sharded."""
    x_BLE, z_BLE = self.in_proj(x_BLD)
    BLE = ("batch", None, "inner")
    return partitioning.constrain(x_BLE, BLE), partitioning.constrain(z_BLE, BLE)

  def _ssm(self, x_BLE, z_BLE, reset_BL, conv_weight, conv_bias, x_proj, dt_proj, A_log, D):
    """conv -> SiLU -> x_proj -> dt_proj -> selective scan with D skip and z gate.
    Returns y (B, L, E) and the final SSM state (B, E, N)."""
    bias = None if conv_bias is None else conv_bias[...]
    xc_BLE = jax.nn.silu(causal_conv1d(x_BLE, conv_weight[...], bias, reset_BL))
    R, N = self.dt_rank, self.config.d_state
    dt_BLR, B_BLN, C_BLN = jnp.split(x_proj(xc_BLE), [R, R + N], axis=-1)
    # dt_proj's bias is added inside the scan, in float32, as delta_bias.
    dt_BLE = dt_BLR @ dt_proj.kernel[...].astype(self.dtype)
    impl = self.config.scan_impl

    def scan(u, dt, A, B, C, D, z, bias, reset):
      return selective_scan(u, dt, A, B, C, D, z, delta_bias=bias, delta_softplus=True,
                            return_final_state=True, impl=impl, reset=reset)

    # The scan is independent per batch row and channel: on a mesh each device scans
    # its block (shard_map), so no backend needs to know about sharding.
    BLE, BLN, E = ("batch", None, "inner"), ("batch", None, None), ("inner",)
    return partitioning.shard_map(
        scan, (xc_BLE, dt_BLE, -jnp.exp(A_log[...].astype(jnp.float32)), B_BLN, C_BLN,
               D[...].astype(jnp.float32), z_BLE, dt_proj.bias[...].astype(jnp.float32),
               reset_BL),
        in_axes=(BLE, BLE, ("inner", None), BLN, BLN, E, BLE, E, ("batch", None)),
        out_axes=(BLE, ("batch", "inner", None)))

  def __call__(self, x_BLD, reset_BL=None, *, positions_BL=None, return_cache=False,
               max_length=None):
    """With `return_cache`, also the MambaCache after the last position.
    (`positions_BL` and `max_length` are the mixer interface's; Mamba needs neither.)"""
    K = self.config.d_conv
    with jax.named_scope("mamba"):  # names the layer's ops in HLO and profiles
      x_BLE, z_BLE = self._in_proj(x_BLD)
      y_BLE, h_BEN = self._ssm(x_BLE, z_BLE, reset_BL, self.conv_weight, self.conv_bias,
                               self.x_proj, self.dt_proj, self.A_log, self.D)
      out_BLD = self.out_proj(y_BLE)
    if not return_cache:
      return out_BLD
    return out_BLD, MambaCache(conv_final_state(x_BLE, K, reset_BL), h_BEN)

  def init_cache(self, batch, max_length=None):
    E, K, N = self.d_inner, self.config.d_conv, self.config.d_state
    return MambaCache(init_conv_state(batch, K, E, self.dtype), jnp.zeros((batch, E, N)))

  def step(self, x_BD, cache: MambaCache, position=None):
    """One token: (B, D) -> (B, D), and the updated cache."""
    x_BE, z_BE = self.in_proj(x_BD)
    bias = None if self.conv_bias is None else self.conv_bias[...]
    xc_BE, conv_BKE = conv_step(cache.conv, x_BE, self.conv_weight[...], bias)
    xc_BE = jax.nn.silu(xc_BE).astype(x_BE.dtype)
    R, N = self.dt_rank, self.config.d_state
    dt_BR, B_BN, C_BN = jnp.split(self.x_proj(xc_BE), [R, R + N], axis=-1)
    y_BE, ssm_BEN = selective_state_update(
        cache.ssm, xc_BE, dt_BR @ self.dt_proj.kernel[...].astype(self.dtype),
        -jnp.exp(self.A_log[...].astype(jnp.float32)), B_BN, C_BN,
        self.D[...].astype(jnp.float32), z_BE, delta_bias=self.dt_proj.bias[...].astype(jnp.float32))
    return self.out_proj(y_BE), MambaCache(conv_BKE, ssm_BEN)


class BiMamba(Mamba):
  """Vision Mamba's bidirectional mixer (Vim, "bimamba v2"): in_proj and out_proj
  shared; a second conv, x_proj, dt_proj, A and D (the `_b` parameters, Vim's names)
  scan the reversed sequence; out = out_proj((y_forward + flip(y_backward)) / 2)."""

  def __init__(self, d_model, config: MambaConfig = MambaConfig(), *, n_residuals=1,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(d_model, config, n_residuals=n_residuals, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    # The backward parameters, initialised as the forward ones (twin's projections are dropped).
    twin = Mamba(d_model, config, n_residuals=n_residuals, dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs)
    self.conv_weight_b, self.conv_bias_b = twin.conv_weight, twin.conv_bias
    self.x_proj_b, self.dt_proj_b = twin.x_proj, twin.dt_proj
    self.A_b_log, self.D_b = twin.A_log, twin.D

  def __call__(self, x_BLD, reset_BL=None, *, positions_BL=None, return_cache=False,
               max_length=None):
    if reset_BL is not None or return_cache:
      raise NotImplementedError("BiMamba sees the whole sequence: no packing, no decoding")
    x_BLE, z_BLE = self._in_proj(x_BLD)
    y_fwd, _ = self._ssm(x_BLE, z_BLE, None, self.conv_weight, self.conv_bias, self.x_proj,
                         self.dt_proj, self.A_log, self.D)
    flip = lambda t: jnp.flip(t, axis=1)
    y_bwd, _ = self._ssm(flip(x_BLE), flip(z_BLE), None, self.conv_weight_b, self.conv_bias_b,
                         self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
    return self.out_proj((y_fwd + flip(y_bwd)) / 2)
