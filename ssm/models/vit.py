"""Vision Transformer with register tokens (Darcet et al., ICLR 2024).

Tokens are [CLS, registers, patches], as DINOv2 places them. Position embeddings
cover CLS and the patches (interpolated to other image sizes) and never touch the
registers, which are discarded at the output: they are returned apart and left
out of pooling. Images are NHWC.

Shapes: B batch, H/W image height/width, C channels, P patches, R registers,
T = 1 + R + P tokens, D d_model.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ssm.layers import partitioning
from ssm.layers.attention import Attention, AttentionConfig
from ssm.layers.block import DTYPES, Block
from ssm.layers.init import torch_linear_init
from ssm.layers.mlp import MLP
from ssm.layers.norms import make_norm


class ImageConfig:
  """What ViTConfig and VimConfig share: the image / patch check and the grid."""

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size "
                       f"{self.patch_size}")

  @property
  def grid(self):
    return self.image_size // self.patch_size

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class ViTConfig(ImageConfig):
  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  d_model: int = 768
  n_layer: int = 12
  n_heads: int = 12
  d_intermediate: int = 3072
  num_registers: int = 0
  num_classes: int = 1000  # 0: no head; the model returns the pooled features
  pool: str = "cls"  # "cls" or "gap" (mean of the patch tokens)
  layer_scale: float | None = None  # LayerScale's initial value (DINOv2: 1.0)
  norm_eps: float = 1e-6
  qkv_bias: bool = True
  mlp: str = "gelu"
  initializer_range: float = 0.02
  dtype: str = "float32"

  def __post_init__(self):
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"pool {self.pool!r}: expected 'cls' or 'gap'")
    super().__post_init__()


class PatchEmbedding(nnx.Module):
  """Non-overlapping p x p patches of an NHWC image, linearly embedded: (B, P, D),
  row-major over the patch grid. The kernel is (p * p * C, D), (p, p, C) order."""

  def __init__(self, patch_size, channels, d_model, *, dtype, rngs):
    self.patch_size = p = patch_size
    self.proj = partitioning.linear(p * p * channels, d_model, (None, "embed"), use_bias=True,
                                    dtype=dtype, kernel_init=torch_linear_init(), rngs=rngs)

  def __call__(self, images_BHWC):
    B, H, W, C = images_BHWC.shape
    p = self.patch_size
    if H % p or W % p:
      raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}: resize or "
                       f"crop the images to a multiple of {p}")
    x = images_BHWC.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return self.proj(x.reshape(B, (H // p) * (W // p), p * p * C)), (H // p, W // p)


def resize_positions(pos_PD, grid, new_grid):
  """Bicubic interpolation of a (grid x grid) table of patch position embeddings."""
  if tuple(new_grid) == (grid, grid):
    return pos_PD
  D = pos_PD.shape[-1]
  table = pos_PD.reshape(grid, grid, D).astype(jnp.float32)
  resized = jax.image.resize(table, (*new_grid, D), method="bicubic", antialias=True)
  return resized.reshape(-1, D).astype(pos_PD.dtype)


class ImageModel(nnx.Module):
  """What ViT and Vision Mamba share: patch embedding, class token, registers, a
  position table for the class token and the patches, and the classifier head
  (zero-initialised, as big_vision) on the pooled features."""

  def _init_tokens(self, c, dtype, rngs):
    normal = nnx.initializers.normal(c.initializer_range)
    self.patch_embedding = PatchEmbedding(c.patch_size, c.channels, c.d_model, dtype=dtype,
                                          rngs=rngs)
    token = lambda n: partitioning.param(normal(rngs.params(), (1, n, c.d_model)),
                                         (None, None, None), decay="embedding")
    self.cls_token = token(1)
    self.register_tokens = token(c.num_registers) if c.num_registers else None
    self.position_embedding = partitioning.param(
        normal(rngs.params(), (1 + c.grid**2, c.d_model)), (None, "embed"), decay="embedding")
    self.head = (partitioning.linear(c.d_model, c.num_classes, ("embed", None), use_bias=True,
                                     dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs)
                 if c.num_classes else None)

  def _registers(self, batch, dtype):
    R, D = self.config.num_registers, self.config.d_model
    return jnp.broadcast_to(self.register_tokens[...], (batch, R, D)).astype(dtype)

  def __call__(self, images_BHWC):
    """Logits (B, num_classes), or the pooled features when num_classes is 0."""
    pooled = self.features(images_BHWC)["pooled"]
    return pooled if self.head is None else self.head(pooled).astype(jnp.float32)


class ViT(ImageModel):
  """NHWC images -> logits (B, num_classes). `features` gives every output: tokens,
  CLS, registers, patches, attention maps, token norms."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    dtype = DTYPES[c.dtype]
    self._init_tokens(c, dtype, rngs)
    attention = AttentionConfig(n_heads=c.n_heads, bias=c.qkv_bias, rope=False)
    init = nnx.initializers.xavier_uniform()  # as the original JAX ViT and big_vision
    self.layers = nnx.List([
        Block(Attention(c.d_model, attention, causal=False, kernel_init=init, out_init=init,
                        dtype=dtype, rngs=rngs), c.d_model, norm="layer", norm_eps=c.norm_eps,
              mlp=MLP(c.d_model, c.d_intermediate, c.mlp, kernel_init=init, out_init=init,
                      dtype=dtype, rngs=rngs),
              layer_scale=c.layer_scale, dtype=dtype)
        for _ in range(c.n_layer)])
    self.norm = make_norm("layer", c.d_model, c.norm_eps)

  def _tokens(self, images):
    patches_BPD, grid = self.patch_embedding(images)
    pos = self.position_embedding[...]
    patches_BPD = patches_BPD + resize_positions(pos[1:], self.config.grid, grid)
    B, _, D = patches_BPD.shape
    cls_B1D = jnp.broadcast_to(self.cls_token[...] + pos[:1], (B, 1, D))
    parts = [cls_B1D.astype(patches_BPD.dtype)]
    if self.register_tokens is not None:  # no position embedding on registers
      parts.append(self._registers(B, patches_BPD.dtype))
    return jnp.concatenate(parts + [patches_BPD], axis=1)

  def features(self, images_BHWC, *, return_attention=False):
    """A dict: tokens (B, T, D) after the final norm, cls (B, D), registers
    (B, R, D), patches (B, P, D), pooled (B, D), token_norms (n_layer, B, T) of the
    residual stream after each block, and with `return_attention` the attention
    probabilities (n_layer, B, heads, T, T)."""
    h, residual = self._tokens(images_BHWC), None
    norms, maps = [], []
    for layer in self.layers:
      h, residual, extras = layer(h, residual, return_weights=return_attention)
      norms.append(jnp.linalg.norm((h + residual).astype(jnp.float32), axis=-1))
      maps.extend(extras)
    tokens = self.norm(h + residual)
    R = self.config.num_registers
    out = dict(tokens=tokens, cls=tokens[:, 0], registers=tokens[:, 1:1 + R],
               patches=tokens[:, 1 + R:], token_norms=jnp.stack(norms))
    out["pooled"] = out["cls"] if self.config.pool == "cls" else out["patches"].mean(axis=1)
    if return_attention:
      out["attention"] = jnp.stack(maps)
    return out
