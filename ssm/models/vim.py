"""Vision Mamba (Vim, Zhu et al. 2024): patch tokens through bidirectional Mamba
blocks, the class token in the middle of the sequence, learned position
embeddings over the whole sequence; optional register tokens, spread evenly
through the patches (as "Vision Mamba needs registers" does) without position
embeddings, returned apart and left out of pooling. Images are NHWC.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm.layers import BiMamba, MambaConfig
from ssm.layers.block import DTYPES, Block
from ssm.layers.norms import make_norm
from ssm.models.vit import ImageConfig, ImageModel, resize_positions


@dataclasses.dataclass(frozen=True)
class VimConfig(ImageConfig):
  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  d_model: int = 192
  n_layer: int = 24
  num_registers: int = 0
  num_classes: int = 1000  # 0: no head; the model returns the class token's features
  norm_eps: float = 1e-5
  mamba: MambaConfig = MambaConfig()
  initializer_range: float = 0.02
  dtype: str = "float32"



def layout(num_patches, num_registers):
  """The sequence order as indices into [class, registers..., patches...]: the
  class token in the middle of the patches, the registers evenly spaced."""
  base = list(range(1 + num_registers, 1 + num_registers + num_patches))
  base.insert(num_patches // 2, 0)
  slots = [round((r + 1) * len(base) / (num_registers + 1)) for r in range(num_registers)]
  order = []
  for i in range(len(base) + 1):
    order += [1 + r for r, slot in enumerate(slots) if slot == i]
    order += base[i:i + 1]
  return np.array(order)


class VisionMamba(ImageModel):
  """NHWC images -> logits (B, num_classes); `features` gives every output. The
  position table covers the class token and the patches in sequence order."""

  def __init__(self, config: VimConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    dtype = DTYPES[c.dtype]
    self._init_tokens(c, dtype, rngs)
    self.layers = nnx.List([
        Block(BiMamba(c.d_model, c.mamba, n_residuals=c.n_layer, dtype=dtype, rngs=rngs),
              c.d_model, norm="rms", norm_eps=c.norm_eps, dtype=dtype)
        for _ in range(c.n_layer)])
    self.norm_f = make_norm("rms", c.d_model, c.norm_eps)

  def positions(self, grid):
    """(class position (1, D), patch positions (P, D)) at a `grid` of patches: the
    table holds the native grid's patches with the class token in their middle, and
    the patches' part is interpolated to `grid` (the class token keeps its own)."""
    pos, mid = self.position_embedding[...], self.config.grid**2 // 2
    patches = jnp.concatenate([pos[:mid], pos[mid + 1:]])
    return pos[mid:mid + 1], resize_positions(patches, self.config.grid, grid)

  def features(self, images_BHWC):
    """A dict: tokens (B, T, D) after the final norm, in sequence order; order (T,),
    each position's index into [class, registers, patches]; cls (B, D), registers
    (B, R, D), patches (B, P, D), pooled (B, D), and token_norms (n_layer, B, T) of
    the residual stream after each block, in sequence order."""
    patches_BPD, grid = self.patch_embedding(images_BHWC)
    B, P, D = patches_BPD.shape
    pos_cls, pos_patches = self.positions(grid)
    cls_B1D = jnp.broadcast_to(self.cls_token[...] + pos_cls, (B, 1, D))
    patches_BPD = patches_BPD + pos_patches
    R = self.config.num_registers
    parts = [cls_B1D]
    if self.register_tokens is not None:  # no position embedding on registers
      parts.append(self._registers(B, patches_BPD.dtype))
    canonical = jnp.concatenate([x.astype(patches_BPD.dtype) for x in parts + [patches_BPD]], 1)
    order = layout(P, R)
    h = canonical[:, order]
    residual, norms = None, []
    for layer in self.layers:
      h, residual, _ = layer(h, residual)
      norms.append(jnp.linalg.norm((h + residual).astype(jnp.float32), axis=-1))
    tokens = self.norm_f(h + residual)
    canonical = tokens[:, np.argsort(order)]  # back to [class, registers, patches]
    out = dict(tokens=tokens, order=order, cls=canonical[:, 0], registers=canonical[:, 1:1 + R],
               patches=canonical[:, 1 + R:])
    out["pooled"] = out["cls"]
    out["token_norms"] = jnp.stack(norms)
    return out
