"""Language models: Mamba, Transformer (Transformer++ / GPT-2) and hybrids share one
skeleton, so that the mixer is the only difference.

As mamba_ssm's MixerModel: embedding (plus learned positions for GPT-2), blocks of
Add -> Norm -> mixer (-> Add -> Norm -> MLP), the residual stream kept in float32,
a final norm and the head, tied to the embedding by default. The vocabulary is
padded to a multiple of 8; logits cover the padded vocabulary, as in the official
code. `pattern` names each layer's mixer: "M" Mamba, "S" Mamba-2 (SSD), "A"
attention, tiled over the layers ("MMA" with 6 layers is MMAMMA; "SSA" a Mamba-2 /
attention hybrid).
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ssm.fields import require
from ssm.layers import Mamba, Mamba2, Mamba2Config, MambaConfig, partitioning
from ssm.layers.attention import Attention, AttentionConfig
from ssm.layers.block import DTYPES, Block
from ssm.layers.init import torch_linear_init
from ssm.layers.mlp import MLP
from ssm.layers.norms import make_norm

MIXERS = {"M": "Mamba", "S": "Mamba-2", "A": "attention"}


@dataclasses.dataclass(frozen=True)
class LMConfig:
  d_model: int
  n_layer: int
  vocab_size: int
  pattern: str = "M"  # one letter per layer, tiled: "M" Mamba, "S" Mamba-2, "A" attention
  mlp: str = "none"  # "none", "swiglu", "gelu", "gelu_tanh"
  d_intermediate: int = 0
  norm: str = "rms"  # "rms" or "layer"
  norm_eps: float = 1e-5
  positions: str = "none"  # "none" or "learned" (GPT-2)
  max_position_embeddings: int = 0
  tie_embeddings: bool = True
  pad_vocab_size_multiple: int = 8
  residual_in_fp32: bool = True
  linear_init: str = "torch"  # "torch": U(+-1/sqrt(fan_in)) as mamba_ssm; "normal": N(0, 0.02)
  initializer_range: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters are float32
  mamba: MambaConfig = MambaConfig()
  mamba2: Mamba2Config = Mamba2Config()
  attention: AttentionConfig = AttentionConfig()

  def __post_init__(self):
    require("model", d_model=(self.d_model, self.d_model > 0),
            n_layer=(self.n_layer, self.n_layer > 0),
            vocab_size=(self.vocab_size, self.vocab_size > 0))
    if not self.pattern or set(self.pattern) - set(MIXERS):
      raise ValueError(f"pattern {self.pattern!r}: use the letters {dict(MIXERS)}")
    if "S" in self.pattern:
      self.mamba2.dims(self.d_model)  # headdim and ngroups must divide: a ValueError if not
    if self.mlp != "none" and self.d_intermediate <= 0:
      raise ValueError(f"mlp {self.mlp!r} needs d_intermediate > 0")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype {self.dtype!r}: expected one of {list(DTYPES)}")
    if self.positions not in ("none", "learned"):
      raise ValueError(f"positions {self.positions!r}: expected 'none' or 'learned'")

  @property
  def padded_vocab_size(self):
    m = self.pad_vocab_size_multiple
    return math.ceil(self.vocab_size / m) * m

  @property
  def layer_mixers(self):
    return "".join(self.pattern[i % len(self.pattern)] for i in range(self.n_layer))

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


class LMCache(NamedTuple):
  """A decoding state. Rows advance apart (ragged prompts, speculative decoding):
  each has its own position, and its KV slots are indexed by it."""
  layers: list  # one cache per layer (MambaCache, KVCache, ...)
  position: jax.Array  # (B,) int32: each row's position of its next token


def document_positions(reset_BL, length):
  """Positions that restart at 0 where a packed document starts."""
  t = jnp.arange(length)
  if reset_BL is None:
    return t[None]
  start = jax.lax.cummax(jnp.where(reset_BL, t, 0), axis=1)
  return t - start


def linear_inits(config: LMConfig, n_residuals):
  """(kernel init, residual-branch output init): the output projections of every
  residual branch scaled by 1/sqrt(n_residuals), as mamba_ssm and GPT-2 do."""
  if config.linear_init == "torch":
    out = nnx.initializers.variance_scaling(1 / (3 * n_residuals), "fan_in", "uniform")
    return torch_linear_init(), out
  if config.linear_init == "normal":
    std = config.initializer_range
    return nnx.initializers.normal(std), nnx.initializers.normal(std / math.sqrt(n_residuals))
  raise ValueError(f"linear_init {config.linear_init!r}: expected 'torch' or 'normal'")


def make_block(config: LMConfig, kind, *, rngs):
  dtype = DTYPES[config.dtype]
  n_residuals = config.n_layer * (2 if config.mlp != "none" else 1)
  kernel_init, out_init = linear_inits(config, n_residuals)
  if kind == "M":
    mixer = Mamba(config.d_model, config.mamba, n_residuals=n_residuals, dtype=dtype, rngs=rngs)
  elif kind == "S":
    mixer = Mamba2(config.d_model, config.mamba2, n_residuals=n_residuals, dtype=dtype,
                   rngs=rngs)
  else:
    mixer = Attention(config.d_model, config.attention, causal=True, kernel_init=kernel_init,
                      out_init=out_init, dtype=dtype, rngs=rngs)
  mlp = None
  if config.mlp != "none":
    mlp = MLP(config.d_model, config.d_intermediate, config.mlp, kernel_init=kernel_init,
              out_init=out_init, dtype=dtype, rngs=rngs)
  return Block(mixer, config.d_model, norm=config.norm, norm_eps=config.norm_eps, mlp=mlp,
               residual_in_fp32=config.residual_in_fp32, dtype=dtype)


class LanguageModel(nnx.Module):
  """token ids (B, L) -> logits (B, L, padded vocab), float32."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = DTYPES[config.dtype]
    emb_init = nnx.initializers.normal(config.initializer_range)
    V, D = config.padded_vocab_size, config.d_model
    table = lambda n, axes: nnx.Embed(n, D, dtype=self.dtype, embedding_init=emb_init,
                                      embedding_metadata=partitioning.role(axes, "embedding"),
                                      rngs=rngs)
    self.embedding = table(V, ("vocab", "embed"))
    self.position_embedding = (table(config.max_position_embeddings, (None, "embed"))
                               if config.positions == "learned" else None)
    self.layers = nnx.List([make_block(config, kind, rngs=rngs) for kind in config.layer_mixers])
    self.norm_f = make_norm(config.norm, D, config.norm_eps)
    self.lm_head = (None if config.tie_embeddings else
                    partitioning.linear(D, V, ("embed", "vocab"), use_bias=False,
                                        dtype=self.dtype, kernel_init=linear_inits(config, 1)[0],
                                        rngs=rngs))

  def _embed(self, ids, positions):
    # The table gathered whole in d_model first (FSDP's parameter gather), so that the
    # lookup's output is split over the batch and nothing else.
    table = partitioning.constrain(self.embedding.embedding[...], ("vocab", None))
    h = jnp.take(table.astype(self.dtype), ids, axis=0)
    if self.position_embedding is not None:
      # Beyond max_position_embeddings the lookup gives NaN (jnp.take's fill), never a clip.
      h = h + self.position_embedding(positions)
    return partitioning.constrain(h, ("batch",) + (None,) * (h.ndim - 1))

  def _logits(self, h, residual):
    h = self.norm_f(h + residual, self.dtype)
    logits = self.embedding.attend(h) if self.lm_head is None else self.lm_head(h)
    return logits.astype(jnp.float32)

  def __call__(self, ids_BL, reset_BL=None, *, return_cache=False, max_length=None):
    """`reset` (B, L) bool marks document starts in packed rows (positions and
    state restart there). With `return_cache`, also the LMCache after the last
    position; attention layers keep `max_length` positions in it."""
    if ids_BL.ndim != 2:
      raise ValueError(f"ids: expected (batch, length) token ids, got shape {ids_BL.shape}")
    B, L = ids_BL.shape
    self._check_length(L)
    positions = jnp.broadcast_to(document_positions(reset_BL, L), (B, L))
    h, residual, caches = self._embed(ids_BL, positions), None, []
    for layer in self.layers:
      h, residual, extras = layer(h, residual, reset_BL, positions_BL=positions,
                                  return_cache=return_cache, max_length=max_length)
      caches.extend(extras)
    logits = self._logits(h, residual)
    if return_cache:
      # The cache continues each row's last document (a left-padded prompt's, when
      # `reset` marks its first token): its position is that document's length.
      return logits, LMCache(caches, (positions[:, -1] + 1).astype(jnp.int32))
    return logits

  def _check_length(self, length):
    max_pos = self.config.max_position_embeddings
    if self.position_embedding is not None and length > max_pos:
      raise ValueError(f"length {length} exceeds max_position_embeddings {max_pos}")

  def init_cache(self, batch, max_length=None):
    layers = [layer.mixer.init_cache(batch, max_length) for layer in self.layers]
    return LMCache(layers, jnp.zeros((batch,), jnp.int32))

  def step(self, ids_B, cache: LMCache):
    """One token per row: ids (B,) or (B, 1) -> logits (B, padded vocab) and the new
    cache."""
    if ids_B.ndim == 2 and ids_B.shape[1] == 1:
      ids_B = ids_B[:, 0]
    if ids_B.ndim != 1:
      raise ValueError(f"step: expected one token id per row, (batch,) or (batch, 1), got "
                       f"shape {ids_B.shape}")
    position = jnp.broadcast_to(cache.position, ids_B.shape)  # (B,): one per row
    h, residual, new = self._embed(ids_B, position), None, []
    for layer, c in zip(self.layers, cache.layers):
      h, residual, c = layer.step(h, residual, c, position)
      new.append(c)
    return self._logits(h, residual), LMCache(new, position + 1)

  def extend(self, ids_BT, cache: LMCache):
    """T tokens per row from a cache in one call (speculative decoding's scoring):
    logits (B, T, padded vocab), the cache after all T, and per layer its `trail` (see
    Block.extend): None for attention, whose slots past a row's position are ignored,
    else the layer's cache after each token, for `rewind`."""
    B, T = ids_BT.shape
    position = jnp.broadcast_to(cache.position, (B,))
    h = self._embed(ids_BT, position[:, None] + jnp.arange(T, dtype=jnp.int32))
    residual, new, trails = None, [], []
    for layer, c in zip(self.layers, cache.layers):
      h, residual, c, trail = layer.extend(h, residual, c, position)
      new.append(c)
      trails.append(trail)
    return self._logits(h, residual), LMCache(new, position + T), trails

  @staticmethod
  def rewind(cache: LMCache, trails, consumed_B, taken):
    """The cache after only the first `consumed_B` (B,), 1 <= consumed <= taken, of the
    `taken` tokens `extend` (or as many steps, with their trails) took: recurrent layers
    take their state after that token; attention layers only need the smaller position."""
    rows = jnp.arange(consumed_B.shape[0])
    pick = lambda x_TB: x_TB[consumed_B - 1, rows]
    layers = [c if t is None else jax.tree.map(pick, t) for c, t in zip(cache.layers, trails)]
    return LMCache(layers, cache.position - taken + consumed_B)
