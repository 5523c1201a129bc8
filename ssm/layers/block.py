"""The residual block every model stacks, and the compute dtypes by name."""

import jax
import jax.numpy as jnp
from flax import nnx

from ssm.layers import partitioning
from ssm.layers.norms import make_norm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Block(nnx.Module):
  """Add -> Norm -> mixer (-> Add -> Norm -> MLP); returns (branch output, residual).

  Carrying the residual apart from the branch output is mamba_ssm's form of a
  pre-norm block; it is the same function as x + mixer(norm(x)). `layer_scale`
  (ViTs) multiplies each branch's output by a learned per-channel vector."""

  def __init__(self, mixer, d_model, *, norm, norm_eps, mlp=None, layer_scale=None,
               residual_in_fp32=True, dtype=jnp.float32):
    self.residual_in_fp32, self.dtype = residual_in_fp32, dtype
    self.norm = make_norm(norm, d_model, norm_eps)
    self.mixer = mixer
    self.norm2 = make_norm(norm, d_model, norm_eps) if mlp is not None else None
    self.mlp = mlp
    scale = lambda: partitioning.param(jnp.full((d_model,), layer_scale, jnp.float32), (None,),
                                       decay=False)
    self.layer_scale1 = scale() if layer_scale is not None else None
    self.layer_scale2 = scale() if layer_scale is not None and mlp is not None else None

  def _add(self, h, residual):
    residual = h if residual is None else h + residual
    return residual.astype(jnp.float32) if self.residual_in_fp32 else residual

  @staticmethod
  def _scale(h, scale):
    return h if scale is None else (h * scale[...]).astype(h.dtype)

  def __call__(self, h, residual, reset_BL=None, **mixer_kw):
    """Returns (h, residual, extras): extras are what the mixer returns besides its
    output (a cache, attention weights: whatever `mixer_kw` asks of it)."""
    residual = self._add(h, residual)
    out = self.mixer(self.norm(residual, self.dtype), reset_BL, **mixer_kw)
    h, extras = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    h = self._scale(h, self.layer_scale1)
    if self.mlp is not None:
      residual = self._add(h, residual)
      h = self._scale(self.mlp(self.norm2(residual, self.dtype)), self.layer_scale2)
    # The residual stream between blocks: split over the batch, whole in d_model.
    stream = lambda x: partitioning.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
    return stream(h), stream(residual), extras

  def step(self, h, residual, cache, position):
    residual = self._add(h, residual)
    h, cache = self.mixer.step(self.norm(residual, self.dtype), cache, position)
    h = self._scale(h, self.layer_scale1)
    if self.mlp is not None:
      residual = self._add(h, residual)
      h = self._scale(self.mlp(self.norm2(residual, self.dtype)), self.layer_scale2)
    return h, residual, cache

  def extend(self, h, residual, cache, position):
    """T tokens per row from a cache, (B, T, D): returns (h, residual, cache, trail).
    A mixer with `extend` (attention) takes them in one parallel pass, and `trail` is
    None; any other (a recurrent mixer) steps through them, and `trail` is its cache
    after each token, stacked on a leading T axis, so that a row can be rewound to
    any of them (speculative decoding's rollback)."""
    residual = self._add(h, residual)
    x_BTD = self.norm(residual, self.dtype)
    if hasattr(self.mixer, "extend"):
      h, cache = self.mixer.extend(x_BTD, cache, position)
      trail = None
    else:
      def one(c, x_t):
        x_BD, t = x_t
        y_BD, c = self.mixer.step(x_BD, c, position + t)
        return c, (y_BD, c)
      T = x_BTD.shape[1]
      cache, (h_TBD, trail) = jax.lax.scan(one, cache, (jnp.swapaxes(x_BTD, 0, 1),
                                                        jnp.arange(T, dtype=jnp.int32)))
      h = jnp.swapaxes(h_TBD, 0, 1)
    h = self._scale(h, self.layer_scale1)
    if self.mlp is not None:
      residual = self._add(h, residual)
      h = self._scale(self.mlp(self.norm2(residual, self.dtype)), self.layer_scale2)
    return h, residual, cache, trail
