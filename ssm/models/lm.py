"""Language models: embedding, pre-norm residual blocks, final norm, tied head.

As mamba_ssm's MixerModel: each block is Add -> RMSNorm -> mixer, the residual
stream kept in float32, the vocabulary padded to a multiple of 8 (logits cover
the padded vocabulary, as in the official code).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ssm.layers import Mamba, MambaConfig, RMSNorm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LMConfig:
  d_model: int
  n_layer: int
  vocab_size: int
  pad_vocab_size_multiple: int = 8
  norm_eps: float = 1e-5
  residual_in_fp32: bool = True
  tie_embeddings: bool = True
  initializer_range: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters are float32
  mamba: MambaConfig = MambaConfig()

  @property
  def padded_vocab_size(self):
    m = self.pad_vocab_size_multiple
    return math.ceil(self.vocab_size / m) * m

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


class Block(nnx.Module):
  """Add -> RMSNorm -> mixer; returns (mixer output, residual)."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.residual_in_fp32 = config.residual_in_fp32
    self.dtype = DTYPES[config.dtype]
    self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
    self.mixer = Mamba(config.d_model, config.mamba, n_layer=config.n_layer, dtype=self.dtype,
                       rngs=rngs)

  def _residual(self, h, residual):
    residual = h if residual is None else h + residual
    return residual.astype(jnp.float32) if self.residual_in_fp32 else residual

  def __call__(self, h_BLD, residual_BLD, reset_BL=None, return_cache=False):
    residual_BLD = self._residual(h_BLD, residual_BLD)
    out = self.mixer(self.norm(residual_BLD, self.dtype), reset_BL, return_cache=return_cache)
    return (*out, residual_BLD) if return_cache else (out, residual_BLD)

  def step(self, h_BD, residual_BD, cache):
    residual_BD = self._residual(h_BD, residual_BD)
    h_BD, cache = self.mixer.step(self.norm(residual_BD, self.dtype), cache)
    return h_BD, residual_BD, cache


class LanguageModel(nnx.Module):
  """token ids (B, L) -> logits (B, L, padded vocab), float32."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    if not config.tie_embeddings:
      raise NotImplementedError("untied embeddings: set tie_embeddings=True")
    self.config = config
    self.dtype = DTYPES[config.dtype]
    self.embedding = nnx.Embed(
        config.padded_vocab_size, config.d_model, dtype=self.dtype,
        embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
    self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
    self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)

  def _logits(self, h, residual):
    h = self.norm_f(h + residual, self.dtype)
    return self.embedding.attend(h).astype(jnp.float32)

  def __call__(self, ids_BL, reset_BL=None, *, return_cache=False):
    """`reset` (B, L) bool marks document starts in packed rows. With
    `return_cache`, also the decoding cache after the last position."""
    if ids_BL.ndim != 2:
      raise ValueError(f"ids: expected (batch, length) token ids, got shape {ids_BL.shape}")
    h, residual, caches = self.embedding(ids_BL), None, []
    for layer in self.layers:
      out = layer(h, residual, reset_BL, return_cache=return_cache)
      if return_cache:
        h, cache, residual = out
        caches.append(cache)
      else:
        h, residual = out
    logits = self._logits(h, residual)
    return (logits, caches) if return_cache else logits

  def init_cache(self, batch):
    return [layer.mixer.init_cache(batch) for layer in self.layers]

  def step(self, ids_B, cache):
    """One token per row: ids (B,) -> logits (B, padded vocab) and the new cache."""
    h, residual, new_cache = self.embedding(ids_B), None, []
    for layer, c in zip(self.layers, cache):
      h, residual, c = layer.step(h, residual, c)
      new_cache.append(c)
    return self._logits(h, residual), new_cache


def param_count(config: LMConfig, embeddings=True):
  """Exact parameter count from the model's abstract shapes (nothing allocated)."""
  model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if not embeddings:
    total -= math.prod(model.embedding.embedding.shape)
  return total
