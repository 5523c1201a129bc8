"""ssm.layers.mamba: official initialisation, the causal conv, packed sequences, decoding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssm.layers import Mamba, MambaConfig, causal_conv1d


def make(d_model=24, n_layer=3, seed=0, **kw):
  # built under jit: eager initialisation compiles op by op, slowly
  return nnx.jit(lambda: Mamba(d_model, MambaConfig(**kw), n_residuals=n_layer,
                               rngs=nnx.Rngs(seed)))()


def test_official_initialisation():
  d_model, n_layer = 64, 6
  m = make(d_model, n_layer, d_state=16)
  E, R, N, K = 128, 4, 16, 4
  assert (m.d_inner, m.dt_rank) == (E, R)
  np.testing.assert_allclose(m.A_log[...], np.log(np.tile(np.arange(1, N + 1), (E, 1))),
                             rtol=1e-6)
  np.testing.assert_array_equal(m.D[...], np.ones(E))
  assert m.A_log[...].dtype == m.D[...].dtype == jnp.float32
  dt = jax.nn.softplus(m.dt_proj.bias[...])  # the inverse-softplus init gives dt back
  assert 1e-3 * (1 - 1e-4) <= dt.min() and dt.max() <= 0.1 * (1 + 1e-4)
  # log-uniform: log dt spreads over the whole range, its mean in the middle
  log_dt = np.log(np.asarray(dt))
  assert abs(log_dt.mean() - (np.log(1e-3) + np.log(0.1)) / 2) < 0.5
  bounds = {"in_proj": 1 / math.sqrt(d_model), "x_proj": 1 / math.sqrt(E),
            "dt_proj": R**-0.5, "out_proj": 1 / math.sqrt(E * n_layer)}
  for name, bound in bounds.items():
    w = np.asarray(getattr(m, name).kernel[...])
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound, name
  assert m.in_proj.bias is None and m.out_proj.bias is None and m.x_proj.bias is None
  assert np.abs(m.conv_weight[...]).max() <= 0.5 and np.abs(m.conv_bias[...]).max() <= 0.5
  assert m.conv_weight.shape == (K, E)


def np_causal_conv(x, w, b):
  B, L, E = x.shape
  K = w.shape[0]
  y = np.zeros((B, L, E)) + b
  for t in range(L):
    for k in range(K):
      s = t - K + 1 + k
      if s >= 0:
        y[:, t] += w[k] * x[:, s]
  return y


def test_causal_conv_matches_numpy_and_respects_documents():
  rng = np.random.default_rng(0)
  x, w, b = rng.normal(size=(2, 11, 5)), rng.normal(size=(4, 5)), rng.normal(size=(5,))
  y = causal_conv1d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                    jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(y, np_causal_conv(x, w, b), rtol=1e-5, atol=1e-5)
  reset = np.zeros((2, 11), bool)
  reset[0, 6] = True
  y = causal_conv1d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                    jnp.asarray(b, jnp.float32), jnp.asarray(reset))
  expected = np.concatenate([np_causal_conv(x[:1, :6], w, b), np_causal_conv(x[:1, 6:], w, b)], 1)
  np.testing.assert_allclose(y[:1], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[1:], np_causal_conv(x[1:], w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_packed_row_equals_separate_documents(impl):
  m = make(scan_impl=impl)
  x = jax.random.normal(jax.random.key(1), (1, 20, 24))
  reset = jnp.zeros((1, 20), bool).at[0, 9].set(True)
  packed = m(x, reset)
  np.testing.assert_allclose(packed[:, :9], m(x[:, :9]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[:, 9:], m(x[:, 9:]), rtol=1e-5, atol=1e-5)


def test_step_by_step_equals_full_pass():
  m = make(d_state=5)
  x = jax.random.normal(jax.random.key(2), (2, 13, 24))
  full = m(x)
  cache, outs = m.init_cache(2), []
  for t in range(13):
    y, cache = m.step(x[:, t], cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.stack(outs, 1), full, rtol=2e-5, atol=2e-5)
  # the cache from a prefill continues exactly where the full pass would
  _, prefill_cache = m(x[:, :7], return_cache=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               prefill_cache, _prefix_cache(m, x[:, :7]))


def _prefix_cache(m, x):
  cache = m.init_cache(x.shape[0])
  for t in range(x.shape[1]):
    _, cache = m.step(x[:, t], cache)
  return cache


def test_bfloat16_compute_is_close_to_float32():
  m32 = make(seed=3)
  m16 = Mamba(24, MambaConfig(), n_residuals=3, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (2, 17, 24))
  y16 = m16(x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  y32 = m32(x)
  err = float(jnp.abs(y16.astype(jnp.float32) - y32).max() / jnp.abs(y32).max())
  assert err < 3e-2, err
