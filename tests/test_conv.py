"""ssm.layers.conv: the short causal conv against a float64 NumPy convolution, its
document boundaries, its decoding state and one step of it."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssm.layers.conv import (causal_conv1d, conv_final_state, conv_params, conv_step,
                             init_conv_state)


def np_conv(x, w, b=None, reset=None):
  """y_t = sum_k w_k x_{t-K+1+k} over the taps in t's document, float64."""
  B, L, E = x.shape
  K = w.shape[0]
  doc = np.zeros((B, L), int) if reset is None else np.cumsum(reset, axis=1)
  y = np.zeros((B, L, E)) + (0 if b is None else b)
  for t in range(L):
    for k in range(K):
      s = t - K + 1 + k
      if s >= 0:
        y[:, t] += (doc[:, s] == doc[:, t])[:, None] * w[k] * x[:, s]
  return y


def draw(seed, B=3, L=13, E=7, K=4):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, L, E)), rng.normal(size=(K, E)), rng.normal(size=(E,))


def f32(*arrays):
  return [None if a is None else jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_is_a_direct_convolution(K, bias):
  x, w, b = draw(K, K=K)
  b = b if bias else None
  np.testing.assert_allclose(causal_conv1d(*f32(x, w, b)), np_conv(x, w, b), rtol=1e-5, atol=1e-5)


def test_a_reset_cuts_the_history():
  x, w, b = draw(1)
  reset = np.zeros(x.shape[:2], bool)
  reset[0, 5] = reset[0, 7] = reset[1, 1] = reset[2, 0] = True  # a document of 2 < K-1 steps
  y = causal_conv1d(*f32(x, w, b), jnp.asarray(reset))
  np.testing.assert_allclose(y, np_conv(x, w, b, reset), rtol=1e-5, atol=1e-5)
  # each document alone, as if it were its own sequence
  for lo, hi in ((0, 5), (5, 7), (7, 13)):
    np.testing.assert_allclose(y[0, lo:hi], np_conv(x[:1, lo:hi], w, b)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [1, 4])
def test_steps_from_the_empty_state_are_the_full_conv(K):
  x, w, b = draw(2, K=K)
  state = init_conv_state(x.shape[0], K, x.shape[2], jnp.float32)
  assert state.shape == (x.shape[0], K - 1, x.shape[2])
  ys = []
  for t in range(x.shape[1]):
    y, state = conv_step(state, *f32(x[:, t], w, b))
    assert y.dtype == jnp.float32
    ys.append(y)
  np.testing.assert_allclose(jnp.stack(ys, 1), np_conv(x, w, b), rtol=1e-5, atol=1e-5)
  # the state after the steps is the one a whole-sequence pass leaves
  np.testing.assert_array_equal(state, conv_final_state(jnp.asarray(x, jnp.float32), K))


@pytest.mark.parametrize("prefix", [2, 9])  # shorter and longer than K-1 = 3
def test_final_state_continues_the_conv(prefix):
  """A prefix's final state, stepped through the rest, gives the full conv, with a
  document starting in the prefix (its earlier inputs must not reach later steps)."""
  x, w, b = draw(3)
  reset = np.zeros(x.shape[:2], bool)
  reset[0, 1] = reset[1, prefix - 1] = True
  state = conv_final_state(jnp.asarray(x[:, :prefix], jnp.float32), 4,
                           jnp.asarray(reset[:, :prefix]))
  assert state.shape == (x.shape[0], 3, x.shape[2])
  ys = []
  for t in range(prefix, x.shape[1]):
    y, state = conv_step(state, *f32(x[:, t], w, b))
    ys.append(y)
  np.testing.assert_allclose(jnp.stack(ys, 1), np_conv(x, w, b, reset)[:, prefix:],
                             rtol=1e-5, atol=1e-5)


def test_dtypes():
  x, w, b = draw(4)
  x16 = jnp.asarray(x, jnp.bfloat16)
  assert causal_conv1d(x16, *f32(w, b)).dtype == jnp.bfloat16
  y, state = conv_step(init_conv_state(3, 4, 7, jnp.bfloat16), x16[:, 0], *f32(w, b))
  assert y.dtype == jnp.float32 and state.dtype == jnp.bfloat16


def test_params_are_pytorchs_depthwise_conv_init():
  w, b = conv_params(4, 300, "inner", use_bias=True, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert w.shape == (4, 300) and b.shape == (300,)
  for p in (w[...], b[...]):  # U(+-1/sqrt(K)), K the fan-in of a depthwise conv
    assert 0.45 < float(jnp.abs(p).max()) <= 0.5
  assert conv_params(4, 8, None, use_bias=False, param_dtype=jnp.float32,
                     rngs=nnx.Rngs(0))[1] is None
  # roles: the weight decays and is split as its channels are, the bias does not decay
  assert w.get_metadata()["out_sharding"] == (None, "inner") and w.get_metadata()["decay"]
  assert b.get_metadata()["out_sharding"] == ("inner",) and not b.get_metadata()["decay"]
