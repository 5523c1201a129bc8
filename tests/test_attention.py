"""ssm.layers.attention: the explicit path equals jax.nn.dot_product_attention,
GQA, RoPE, packed documents, KV-cache steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssm.layers.attention import Attention, AttentionConfig, rope


def make(causal=True, **kw):
  init = nnx.initializers.normal(0.2)
  return Attention(32, AttentionConfig(**kw), causal=causal, kernel_init=init, out_init=init,
                   rngs=nnx.Rngs(0))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_explicit_weights_path_equals_fused_path(causal, kv_heads):
  attn = make(causal, n_heads=4, n_kv_heads=kv_heads)
  x = jax.random.normal(jax.random.key(0), (2, 9, 32))
  out, weights = attn(x, return_weights=True)
  np.testing.assert_allclose(out, attn(x), rtol=1e-5, atol=1e-5)
  assert weights.shape == (2, 4, 9, 9)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  if causal:
    assert float(jnp.abs(jnp.triu(weights, 1)).max()) == 0.0


def test_rope_is_relative():
  """<rope(q, m), rope(k, n)> depends on m - n only."""
  q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, 16))
  dot = lambda m, n: jnp.sum(rope(q, jnp.array([[m]]), 1e4) * rope(k, jnp.array([[n]]), 1e4))
  np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-5)
  assert abs(float(dot(5, 2) - dot(5, 3))) > 1e-3


def test_packed_documents_do_not_attend_across():
  attn = make(n_heads=4)
  x = jax.random.normal(jax.random.key(2), (1, 12, 32))
  reset = jnp.zeros((1, 12), bool).at[0, 5].set(True)
  positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
  packed = attn(x, reset, positions_BL=positions)
  np.testing.assert_allclose(packed[:, :5], attn(x[:, :5]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[:, 5:], attn(x[:, 5:]), rtol=1e-5, atol=1e-5)


def test_kv_cache_steps_equal_full_pass():
  attn = make(n_heads=4, n_kv_heads=2)
  x = jax.random.normal(jax.random.key(3), (2, 10, 32))
  full = attn(x)
  _, cache = attn(x[:, :4], return_cache=True, max_length=10)
  for t in range(4, 10):
    y, cache = attn.step(x[:, t], cache, t)
    np.testing.assert_allclose(y, full[:, t], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="max_length"):
    attn(x, return_cache=True, max_length=4)


def test_bad_head_counts():
  with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
    make(n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="not divisible by n_heads"):
    make(n_heads=5)
