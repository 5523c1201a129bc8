"""Multi-head attention (grouped-query optional) through `jax.nn.dot_product_attention`:
cuDNN flash attention on GPUs for bf16/fp16 where it applies, XLA otherwise.

Shapes: B batch, L query length, S key length, D d_model, H heads, G kv heads, K head dim.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ssm.fields import require
from ssm.layers import partitioning


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  n_heads: int = 12
  n_kv_heads: int | None = None  # grouped-query attention; None: n_heads
  head_dim: int | None = None  # None: d_model // n_heads
  bias: bool = False  # q, k, v and output projections
  rope: bool = True
  rope_theta: float = 10000.0
  implementation: str | None = None  # jax.nn.dot_product_attention's: None picks the best

  def __post_init__(self):
    require("model.attention", n_heads=(self.n_heads, self.n_heads > 0))


class KVCache(NamedTuple):
  """Slot s of row b holds the token at position s of that row (its last document's,
  after a packed or left-padded prompt)."""
  k: jax.Array  # (B, S, G, K), after RoPE
  v: jax.Array  # (B, S, G, K)


def rope(x_BLHK, positions_BL, theta):
  """Rotary embedding, Llama's convention (rotate_half over the two halves)."""
  K = x_BLHK.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K)
  angles = positions_BL[..., None].astype(jnp.float32) * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x = x_BLHK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_BLHK.dtype)


class Attention(nnx.Module):
  """Self-attention, (B, L, D) -> (B, L, D); causal for language models."""

  def __init__(self, d_model, config: AttentionConfig, *, causal=True, kernel_init, out_init,
               dtype=jnp.float32, rngs: nnx.Rngs):
    c = config
    self.config, self.causal, self.dtype = c, causal, dtype
    self.n_heads = c.n_heads
    self.n_kv_heads = c.n_kv_heads or c.n_heads
    self.head_dim = c.head_dim or d_model // c.n_heads
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
    if c.head_dim is None and d_model % c.n_heads:
      raise ValueError(f"d_model {d_model} is not divisible by n_heads {c.n_heads}")
    H, G, K = self.n_heads, self.n_kv_heads, self.head_dim
    linear = lambda i, o, init, axes, bias_axes=(None,): partitioning.linear(
        i, o, axes, use_bias=c.bias, bias_axes=bias_axes, kernel_init=init, dtype=dtype,
        rngs=rngs)
    self.q_proj = linear(d_model, H * K, kernel_init, ("embed", "heads"), ("heads",))
    self.k_proj = linear(d_model, G * K, kernel_init, ("embed", "heads"), ("heads",))
    self.v_proj = linear(d_model, G * K, kernel_init, ("embed", "heads"), ("heads",))
    self.o_proj = linear(H * K, d_model, out_init, ("heads", "embed"))

  def _qkv(self, x, positions):
    B, L = x.shape[:2]
    q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
    k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
    if self.config.rope:
      q, k = rope(q, positions, self.config.rope_theta), rope(k, positions, self.config.rope_theta)
    return q, k, v

  def __call__(self, x_BLD, reset_BL=None, *, positions_BL=None, return_cache=False,
               max_length=None, return_weights=False):
    """`reset` keeps packed documents apart; `return_weights` also returns the
    attention probabilities (B, H, L, S), computed explicitly (for analysis)."""
    B, L, _ = x_BLD.shape
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
    q, k, v = self._qkv(x_BLD, positions_BL)
    mask = None
    if reset_BL is not None:
      doc = jnp.cumsum(reset_BL, axis=1)
      mask = (doc[:, :, None] == doc[:, None, :])[:, None]  # (B, 1, L, S)
    if return_weights:
      out, weights = self._explicit(q, k, v, mask)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal,
                                         implementation=self.config.implementation)
    out = self.o_proj(out.reshape(B, L, -1))
    extras = []
    if return_cache:
      if max_length is None or max_length < L:
        raise ValueError(f"attention caches need max_length >= the prompt length {L}, "
                         f"got {max_length}")
      if reset_BL is not None:  # the cache continues each row's last document, moved to slot 0
        k, v = (_last_document_first(x, reset_BL) for x in (k, v))
      pad = ((0, 0), (0, max_length - L), (0, 0), (0, 0))
      extras.append(KVCache(jnp.pad(k, pad), jnp.pad(v, pad)))
    if return_weights:
      extras.append(weights)
    return (out, *extras) if extras else out

  def _explicit(self, q, k, v, mask):
    """softmax(q k^T / sqrt(K)) v in float32, returning the probabilities too."""
    B, L, H, K = q.shape
    S, G = k.shape[1], self.n_kv_heads
    q = q.reshape(B, L, G, H // G, K).astype(jnp.float32)
    logits = jnp.einsum("blgrk,bsgk->bgrls", q, k.astype(jnp.float32)) / jnp.sqrt(K)
    allowed = jnp.ones((L, S), bool)
    if self.causal:
      allowed = jnp.tril(allowed)
    allowed = jnp.broadcast_to(allowed, (B, 1, L, S))
    if mask is not None:
      allowed = allowed & mask
    logits = jnp.where(allowed[:, :, None], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrls,bsgk->blgrk", weights, v.astype(jnp.float32))
    return out.reshape(B, L, H, K).astype(v.dtype), weights.reshape(B, H, L, S)

  def init_cache(self, batch, max_length):
    shape = (batch, max_length, self.n_kv_heads, self.head_dim)
    return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

  def step(self, x_BD, cache: KVCache, position):
    """One token per row at `position` (a scalar, or (B,): one per row): (B, D) -> (B, D),
    and the updated cache."""
    out, cache = self.extend(x_BD[:, None], cache, position)
    return out[:, 0], cache

  def extend(self, x_BTD, cache: KVCache, position):
    """T tokens per row from a cache, in one parallel pass: row b's tokens sit at
    positions position_b + (0..T-1), written to those slots of the cache, and each
    attends to the slots up to its own. Slots past a row's last token are masked, so
    rewinding a row (speculative decoding) is only a smaller position next time."""
    B, T, _ = x_BTD.shape
    S = cache.k.shape[1]
    positions_BT = (jnp.broadcast_to(jnp.asarray(position, jnp.int32), (B,))[:, None]
                    + jnp.arange(T, dtype=jnp.int32))
    q, k, v = self._qkv(x_BTD, positions_BT)
    rows = jnp.arange(B)[:, None]
    # Beyond the cache (a finished row kept stepping) the write is dropped.
    k_cache = cache.k.at[rows, positions_BT].set(k.astype(cache.k.dtype), mode="drop")
    v_cache = cache.v.at[rows, positions_BT].set(v.astype(cache.v.dtype), mode="drop")
    mask = (jnp.arange(S)[None, None, :] <= positions_BT[:, :, None])[:, None]  # (B, 1, T, S)
    out = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask,
                                       implementation=self.config.implementation)
    return self.o_proj(out.reshape(B, T, -1)), KVCache(k_cache, v_cache)


def _last_document_first(x_BLGK, reset_BL):
  """Each row's last document (from its last reset) moved to slot 0, zeros after it."""
  L = x_BLGK.shape[1]
  t = jnp.arange(L)
  start_B1 = jnp.max(jnp.where(reset_BL, t, 0), axis=1, keepdims=True)
  src_BL = jnp.minimum(start_B1 + t, L - 1)
  keep_BL = t < L - start_B1
  moved = jnp.take_along_axis(x_BLGK, src_BL[:, :, None, None], axis=1)
  return jnp.where(keep_BL[:, :, None, None], moved, 0)
