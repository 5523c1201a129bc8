"""ssm.layers.init: the dt bias (inverse softplus of a log-uniform dt, floored) and
PyTorch's default bounds."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from ssm.layers.init import dt_bias_init, torch_linear_init, uniform


def softplus64(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def test_dt_bias_is_softplus_inverse_of_a_log_uniform_dt():
  bias = dt_bias_init(1e-3, 0.1, 1e-4)(jax.random.key(0), (4096,))
  assert bias.dtype == jnp.float32
  log_dt = np.log(softplus64(bias))
  assert np.log(1e-3) - 1e-4 <= log_dt.min() and log_dt.max() <= np.log(0.1) + 1e-4
  # log-uniform: each fifth of [log dt_min, log dt_max] holds a fifth of the draws
  counts, _ = np.histogram(log_dt, bins=5, range=(np.log(1e-3), np.log(0.1)))
  np.testing.assert_allclose(counts / len(log_dt), 0.2, atol=0.03)


def test_dt_below_the_floor_is_raised_to_it():
  init = dt_bias_init(1e-5, 1e-1, 1e-3)
  dt = softplus64(init(jax.random.key(1), (4096,)))
  np.testing.assert_allclose(dt.min(), 1e-3, rtol=1e-4)
  # log-uniform over 4 decades, of which the lowest 2 fall below the floor
  np.testing.assert_allclose(np.mean(dt < 1e-3 * (1 + 1e-4)), 0.5, atol=0.03)
  assert init(jax.random.key(1), (8,), jnp.bfloat16).dtype == jnp.bfloat16


def test_torch_bounds():
  w = uniform(0.3)(jax.random.key(2), (64, 64))
  assert 0.29 < float(jnp.abs(w).max()) <= 0.3
  k = torch_linear_init()(jax.random.key(3), (100, 64))  # (fan_in, fan_out)
  assert 0.95 / math.sqrt(100) < float(jnp.abs(k).max()) <= 1 / math.sqrt(100)
