"""ssm.scan.ssd (Mamba-2's scan) against a float64 NumPy implementation written from
the formulas, forward and backward (the backward is the hand-derived adjoint
recurrence, itself checked against finite differences, so the check does not lean on
JAX's autodiff)."""

import dataclasses
import zlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm.scan import ssd, ssd_state_update
from test_scan import assert_close

BACKENDS = ["reference", "chunked"]
# Tolerances, relative to the largest magnitude of the float64 result.
F32_TOL = 1e-4
BF16_TOL = 2e-2  # bf16 keeps 8 bits: inputs, output, gradients and matmul operands are rounded


def np_ssd(x, dt, A, B, C, D=None, dt_bias=None, h0=None, reset=None):
  """float64 forward from the formulas; returns (y, h_L, intermediates)."""
  b, L, H, P = x.shape
  N = B.shape[-1]
  Bh, Ch = (np.repeat(t, H // t.shape[2], axis=2) for t in (B, C))  # (b, L, H, N)
  dr = dt + (0.0 if dt_bias is None else dt_bias)
  d = np.logaddexp(0.0, dr)  # softplus
  keep = np.ones((b, L)) if reset is None else 1.0 - reset
  a = np.exp(d * A) * keep[:, :, None]  # (b, L, H)
  h = np.zeros((b, H, P, N)) if h0 is None else h0
  hs = []
  for t in range(L):
    h = a[:, t, :, None, None] * h + (d[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
    hs.append(h)
  Hs = np.stack(hs, 1)  # (b, L, H, P, N)
  y = np.einsum("blhpn,blhn->blhp", Hs, Ch)
  if D is not None:
    y = y + (D[:, None] if D.ndim == 1 else D) * x
  return y, h, dict(dr=dr, d=d, a=a, Hs=Hs, Bh=Bh, Ch=Ch)


def np_ssd_grad(g_y, g_hT, x, dt, A, B, C, D=None, dt_bias=None, h0=None, reset=None):
  """float64 reverse-mode gradients of <g_y, y> + <g_hT, h_L> w.r.t. every input."""
  _, _, c = np_ssd(x, dt, A, B, C, D, dt_bias, h0, reset)
  d, a, Hs, Bh, Ch = c["d"], c["a"], c["Hs"], c["Bh"], c["Ch"]
  b, L, H, P = x.shape
  G = B.shape[2]
  grads, dx = {}, np.zeros_like(x)
  if D is not None:
    grads["D"] = (np.sum(g_y * x, axis=(0, 1, 3)) if D.ndim == 1
                  else np.sum(g_y * x, axis=(0, 1)))
    dx += g_y * (D[:, None] if D.ndim == 1 else D)
  dCh = np.einsum("blhp,blhpn->blhn", g_y, Hs)
  dd, dA, dBh = np.zeros_like(d), np.zeros_like(A), np.zeros_like(Bh)
  dh = g_hT.copy()
  for t in reversed(range(L)):
    dh = dh + g_y[:, t, :, :, None] * Ch[:, t, :, None, :]
    h_prev = Hs[:, t - 1] if t > 0 else (np.zeros_like(dh) if h0 is None else h0)
    g_log_a = np.sum(dh * h_prev, axis=(2, 3)) * a[:, t]  # d/d(d_t A) of a_t = a_t
    dBx = np.sum(dh * Bh[:, t, :, None, :], -1)  # (b, H, P): the gradient of d_t x_t
    dd[:, t] = g_log_a * A + np.sum(dBx * x[:, t], -1)
    dA += np.sum(g_log_a * d[:, t], 0)
    dx[:, t] += dBx * d[:, t, :, None]
    dBh[:, t] = np.sum(dh * (d[:, t, :, None] * x[:, t])[..., None], 2)
    dh = dh * a[:, t, :, None, None]
  group = lambda g: g.reshape(b, L, G, H // G, -1).sum(3)  # heads of a group share B, C
  ddr = dd / (1 + np.exp(-c["dr"]))
  grads.update(x=dx, dt=ddr, A=dA, B=group(dBh), C=group(dCh))
  if dt_bias is not None:
    grads["dt_bias"] = np.sum(ddr, axis=(0, 1))
  if h0 is not None:
    grads["initial_state"] = dh
  return grads


@dataclasses.dataclass
class Case:
  batch: int
  length: int
  heads: int
  head_dim: int
  groups: int
  state: int
  D: str = "heads"  # "heads", "head_dim" (one per channel) or "none"
  dt_bias: bool = True
  initial_state: bool = False
  reset: bool = False


def make_inputs(case, rng, dtype=np.float32):
  b, L, H, P, G, N = (case.batch, case.length, case.heads, case.head_dim, case.groups,
                      case.state)
  x = dict(
      x=rng.normal(size=(b, L, H, P)),
      dt=rng.normal(-1.0, 1.0, size=(b, L, H)),
      A=-np.exp(rng.uniform(np.log(0.5), np.log(16), size=(H,))),
      B=rng.normal(size=(b, L, G, N)),
      C=rng.normal(size=(b, L, G, N)),
      D={"heads": rng.normal(size=(H,)), "head_dim": rng.normal(size=(H, P)),
         "none": None}[case.D],
      dt_bias=rng.normal(-1.0, 0.5, size=(H,)) if case.dt_bias else None,
      initial_state=rng.normal(size=(b, H, P, N)) if case.initial_state else None,
  )
  # Round through the input dtype so that NumPy sees exactly what JAX sees.
  if dtype != np.float64:
    x = {k: None if v is None else np.asarray(jnp.asarray(v, dtype), np.float64)
         for k, v in x.items()}
  x["reset"] = (rng.uniform(size=(b, L)) < 0.15) if case.reset else None
  return x


def np_args(x):
  return dict(x=x["x"], dt=x["dt"], A=x["A"], B=x["B"], C=x["C"], D=x["D"],
              dt_bias=x["dt_bias"], h0=x["initial_state"],
              reset=None if x["reset"] is None else x["reset"].astype(np.float64))


def check_backend(impl, case, seed, dtype=np.float32, tol=F32_TOL, **kwargs):
  rng = np.random.default_rng(seed)
  x = make_inputs(case, rng, dtype)
  g_y = rng.normal(size=(case.batch, case.length, case.heads, case.head_dim))
  g_hT = rng.normal(size=(case.batch, case.heads, case.head_dim, case.state))
  names = [k for k, v in x.items() if v is not None and k != "reset"]
  param = {"A", "D", "dt_bias", "initial_state"}  # parameters and state: float32 in models
  jx = {k: jnp.asarray(x[k], jnp.float32 if k in param else dtype) for k in names}
  reset = None if x["reset"] is None else jnp.asarray(x["reset"])

  def loss(args):
    y, hT = ssd(**args, reset=reset, return_final_state=True, impl=impl, **kwargs)
    return jnp.sum(y.astype(jnp.float32) * g_y) + jnp.sum(hT * g_hT), (y, hT)

  grads, (y, hT) = jax.jit(jax.grad(loss, has_aux=True))(jx)
  y_ref, hT_ref, _ = np_ssd(**np_args(x))
  assert y.dtype == dtype and y.shape == y_ref.shape and hT.dtype == jnp.float32
  assert_close(y, y_ref, tol, f"{impl} y")
  assert_close(hT, hT_ref, tol, f"{impl} final state")
  grads_ref = np_ssd_grad(g_y, g_hT, **np_args(x))
  assert set(grads) == set(grads_ref) == set(names)
  for k in names:
    assert_close(grads[k], grads_ref[k], tol, f"{impl} d{k}")


def test_numpy_backward_matches_finite_differences():
  """The hand-written float64 adjoint is itself right: central differences of the
  float64 forward along a random direction, for every input."""
  rng = np.random.default_rng(0)
  case = Case(2, 9, 4, 3, 2, 5, D="head_dim", initial_state=True, reset=True)
  x = np_args(make_inputs(case, rng, np.float64))
  g_y, g_hT = rng.normal(size=x["x"].shape), rng.normal(size=x["h0"].shape)
  grads = np_ssd_grad(g_y, g_hT, **x)
  names = {"initial_state": "h0"}

  def objective(args):
    y, hT, _ = np_ssd(**args)
    return np.sum(y * g_y) + np.sum(hT * g_hT)

  for k, g in grads.items():
    v = rng.normal(size=g.shape)
    eps = 1e-6
    plus = {**x, names.get(k, k): x[names.get(k, k)] + eps * v}
    minus = {**x, names.get(k, k): x[names.get(k, k)] - eps * v}
    fd = (objective(plus) - objective(minus)) / (2 * eps)
    assert abs(fd - np.sum(g * v)) <= 1e-6 * max(1.0, abs(fd)), k


CASES = [
    Case(2, 37, 3, 5, 1, 7, initial_state=True),  # prime length, one group
    Case(2, 70, 6, 3, 3, 16, D="head_dim", reset=True, initial_state=True),  # groups, chunks
    Case(1, 23, 4, 2, 4, 1, D="none", dt_bias=False, reset=True),  # a group per head, N = 1
]


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_numpy(impl, case):
  kwargs = dict(chunk_size=16) if impl == "chunked" else {}
  check_backend(impl, case, seed=zlib.crc32(f"{impl}{case}".encode()), **kwargs)


@pytest.mark.parametrize("impl", BACKENDS)
def test_bfloat16_inputs(impl):
  kwargs = dict(chunk_size=16) if impl == "chunked" else {}
  check_backend(impl, Case(2, 41, 4, 8, 2, 8, initial_state=True, reset=True), seed=7,
                dtype=jnp.bfloat16, tol=BF16_TOL, **kwargs)


@hypothesis.settings(max_examples=2, deadline=None)
@hypothesis.example(batch=1, length=1, heads_groups=(2, 1), head_dim=3, state=4,
                    flags=[True, False, False], chunk=16, seed=0)  # length 1
@hypothesis.given(
    batch=st.integers(1, 2), length=st.integers(1, 40), heads_groups=st.sampled_from(
        [(1, 1), (2, 1), (4, 2), (3, 3)]), head_dim=st.integers(1, 5),
    state=st.sampled_from([1, 3, 8]), flags=st.lists(st.booleans(), min_size=3, max_size=3),
    chunk=st.integers(1, 45), seed=st.integers(0, 2**31))
def test_property_chunked_any_chunk_size(batch, length, heads_groups, head_dim, state, flags,
                                         chunk, seed):
  """Any chunk size, dividing the length or not, longer than it or not."""
  case = Case(batch, length, *heads_groups[:1], head_dim, heads_groups[1], state,
              dt_bias=flags[0], initial_state=flags[1], reset=flags[2])
  check_backend("chunked", case, seed, chunk_size=chunk)


def test_small_decays_after_a_large_one_keep_their_precision():
  """A = -16 with dt 100 then 0.003 (softplus'd) in one chunk of 128: the decays after
  the first step are sums of -0.048 that a running sum near -1600 rounds (ulp 1.2e-4).
  The difference of running sums was off by 2.2e-4 (y) and 8.1e-4 (final state); the
  compensated segment sums are at float32 rounding, as the reference backend."""
  rng = np.random.default_rng(3)
  b, L, H, P, G, N = 1, 128, 2, 4, 1, 4
  dt = np.full((b, L, H), 0.003)
  dt[:, 0] = 100.0
  x = dict(x=rng.normal(size=(b, L, H, P)), dt=np.log(np.expm1(dt)), A=np.array([-16.0, -16.0]),
           B=rng.normal(size=(b, L, G, N)), C=rng.normal(size=(b, L, G, N)))
  y_ref, hT_ref, _ = np_ssd(**x)
  j = {k: jnp.asarray(v, jnp.float32) for k, v in x.items()}
  for impl, kw in (("chunked", dict(chunk_size=128)), ("reference", {})):
    y, hT = ssd(**j, impl=impl, return_final_state=True, **kw)
    assert_close(y, y_ref, 1e-5, f"{impl} y")
    assert_close(hT, hT_ref, 1e-5, f"{impl} final state")


@pytest.mark.parametrize("impl", BACKENDS)
def test_dt_limit_clamps_the_discretized_dt(impl):
  """dt_limit=(lo, hi) is the scan of clip(softplus(dt + dt_bias), lo, hi), as the
  official kernels: the same as giving that dt without softplus, and no gradient
  reaches a clamped dt. One step of decoding clamps alike."""
  x = make_inputs(Case(2, 21, 4, 3, 2, 5, initial_state=True), np.random.default_rng(8))
  j = {k: jnp.asarray(v, jnp.float32) for k, v in x.items() if v is not None}
  lo, hi = 0.2, 0.5
  kw = dict(impl=impl, return_final_state=True, **(dict(chunk_size=8) if impl == "chunked"
                                                    else {}))
  clamped = np.clip(np.logaddexp(0.0, x["dt"] + x["dt_bias"]), lo, hi)
  assert 0.2 < np.mean((clamped == lo) | (clamped == hi)) < 0.8  # both sides clamp
  y, hT = ssd(**j, dt_limit=(lo, hi), **kw)
  plain = {**j, "dt": jnp.asarray(clamped, jnp.float32), "dt_bias": None}
  y_ref, hT_ref, _ = np_ssd(**{**np_args(x), "dt": np.log(np.expm1(clamped)), "dt_bias": None})
  assert_close(y, y_ref, F32_TOL, "y")
  assert_close(hT, hT_ref, F32_TOL, "final state")
  np.testing.assert_allclose(y, ssd(**plain, dt_softplus=False, **kw)[0], rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda dt: ssd(**{**j, "dt": dt}, dt_limit=(lo, hi), **kw)[0].sum())(j["dt"])
  assert np.all(np.asarray(g)[(clamped == lo) | (clamped == hi)] == 0)
  assert np.all(np.asarray(g)[(clamped > lo) & (clamped < hi)] != 0)
  y1, h1 = ssd_state_update(j["initial_state"], j["x"][:, 0], j["dt"][:, 0], j["A"],
                            j["B"][:, 0], j["C"][:, 0], j["D"], j["dt_bias"], dt_limit=(lo, hi))
  y_first, h_first = ssd(**{k: v[:, :1] if k in ("x", "dt", "B", "C") else v
                            for k, v in j.items()}, dt_limit=(lo, hi), **kw)
  np.testing.assert_allclose(y1, y_first[:, 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h1, h_first, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"dt_limit=\(0.5, 0.2\): expected a pair \(lo, hi\) "
                                       r"with 0 <= lo <= hi"):
    ssd(**j, dt_limit=(0.5, 0.2), **kw)


def test_reset_equals_separate_documents():
  """A packed row with a reset equals its two documents scanned one by one; the state
  carried in (initial_state) reaches only the first."""
  x = make_inputs(Case(1, 30, 4, 3, 2, 6, initial_state=True), np.random.default_rng(11))
  j = {k: jnp.asarray(v, jnp.float32) for k, v in x.items() if v is not None}
  reset = jnp.zeros((1, 30), bool).at[0, 12].set(True)
  cut = lambda sl: {k: v[:, sl] if k in ("x", "dt", "B", "C") else v for k, v in j.items()}
  packed, hT = ssd(**j, reset=reset, impl="chunked", chunk_size=8, return_final_state=True)
  first = ssd(**cut(slice(0, 12)), impl="chunked", chunk_size=8)
  second = {k: v for k, v in cut(slice(12, None)).items() if k != "initial_state"}
  second, h2 = ssd(**second, impl="chunked", chunk_size=8, return_final_state=True)
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hT, h2, rtol=1e-5, atol=1e-5)


def test_state_update_is_one_scan_step():
  """Stepping the state through the sequence reproduces the scan and its final state."""
  x = make_inputs(Case(2, 9, 4, 3, 2, 5, D="head_dim", initial_state=True),
                  np.random.default_rng(5))
  j = {k: jnp.asarray(v, jnp.float32) for k, v in x.items() if v is not None}
  y_scan, h_scan = ssd(**j, return_final_state=True, impl="chunked", chunk_size=4)
  state, ys = j["initial_state"], []
  for t in range(9):
    y, state = ssd_state_update(state, j["x"][:, t], j["dt"][:, t], j["A"], j["B"][:, t],
                                j["C"][:, t], j["D"], j["dt_bias"])
    ys.append(y)
  np.testing.assert_allclose(jnp.stack(ys, 1), y_scan, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state, h_scan, rtol=1e-5, atol=1e-5)
  _, h_ref, _ = np_ssd(**np_args(x))
  assert_close(state, h_ref, F32_TOL, "state")


def test_bad_input_names_the_argument():
  b, L, H, P, G, N = 2, 5, 4, 3, 2, 6
  ok = dict(x=jnp.ones((b, L, H, P)), dt=jnp.ones((b, L, H)), A=-jnp.ones((H,)),
            B=jnp.ones((b, L, G, N)), C=jnp.ones((b, L, G, N)))
  ssd(**ok)
  with pytest.raises(ValueError, match=r"B: expected \(batch, length, groups, state\) = "
                                       r"\(2, 5, G, N\) with G dividing heads=4"):
    ssd(**{**ok, "B": jnp.ones((b, L, 3, N))})
  with pytest.raises(ValueError, match=r"C: expected shape .* = \(2, 5, 2, 6\)"):
    ssd(**{**ok, "C": jnp.ones((b, L, G, N + 1))})
  with pytest.raises(ValueError, match=r"A: expected shape \(heads,\): one scalar per head"):
    ssd(**{**ok, "A": -jnp.ones((H, N))})
  with pytest.raises(ValueError, match=r"D: expected shape \(heads,\) = \(4,\) or"):
    ssd(**ok, D=jnp.ones((P,)))
  with pytest.raises(TypeError, match=r"dt: dtype bfloat16 differs from x's float32"):
    ssd(**{**ok, "dt": ok["dt"].astype(jnp.bfloat16)})
  with pytest.raises(ValueError, match=r"initial_state: expected shape"):
    ssd(**ok, initial_state=jnp.zeros((b, H, N, P)))
  with pytest.raises(ValueError, match=r"reset: expected shape \(batch, length\)"):
    ssd(**ok, reset=jnp.ones((b, L + 1), bool))
  with pytest.raises(ValueError, match=r"impl='fast'"):
    ssd(**ok, impl="fast")
  with pytest.raises(ValueError, match=r"chunk_size applies to impl='chunked'"):
    ssd(**ok, impl="reference", chunk_size=8)
  with pytest.raises(ValueError, match=r"chunk_size=0"):
    ssd(**ok, impl="chunked", chunk_size=0)
  with pytest.raises(ValueError, match=r"x: expected shape \(batch, heads, head_dim\)"):
    ssd_state_update(jnp.zeros((b, H, P, N)), jnp.ones((b, H, P + 1)), jnp.ones((b, H)),
                     ok["A"], jnp.ones((b, G, N)), jnp.ones((b, G, N)))


def grad_temp_bytes(impl, batch, length, heads, head_dim, state, chunk_size=None):
  """XLA's compiled temporary memory of forward + backward (all inputs differentiated)."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = dict(x=s(batch, length, heads, head_dim), dt=s(batch, length, heads), A=s(heads),
              B=s(batch, length, 1, state), C=s(batch, length, 1, state))
  kw = dict(chunk_size=chunk_size) if impl == "chunked" else {}
  grad = jax.jit(jax.grad(lambda a: jnp.sum(ssd(**a, impl=impl, **kw))))
  return grad.lower(args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_is_below_one_state_per_step():
  """XLA's compiled temporary memory of forward + backward (deterministic, not a
  timing): the chunked backend's stays below one (B, L, H, P, N) float32 tensor and
  nearly flat from N = 64 to 128 (only its chunk-start states, L / T of them, grow
  with N). docs/benchmarks.md has the figures (scripts/bench_ssd.py --memory)."""
  size = (1, 512, 4, 64)  # batch, length, heads, head_dim
  blhpn64 = 512 * 4 * 64 * 64 * 4
  c64, c128 = (grad_temp_bytes("chunked", *size, n, chunk_size=128) for n in (64, 128))
  assert c128 < blhpn64 and c128 <= 1.2 * c64, (c64, c128, blhpn64)
