"""ssm.scan.delta (the gated delta rule) against transformers' torch paths of Qwen3-Next
(`torch_recurrent_gated_delta_rule`, `torch_chunk_gated_delta_rule`), forward and
gradients (torch autograd against jax.grad), and against itself: the chunked backend
against the reference, resets against separate documents, and decoding steps against
the full pass. Sizes are odd on purpose: lengths that are not multiples of the chunk,
grouped heads (more value heads than key heads), d_k != d_v."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm.scan.delta import gated_delta_rule, gated_delta_state_update

BACKENDS = ["reference", "chunked"]
TOL = 1e-4  # float32, relative to the largest magnitude of the compared result
# batch, length, key heads, value heads, d_k, d_v
SHAPE = (2, 11, 2, 4, 5, 3)


def make_inputs(seed, shape=SHAPE, initial_state=True, g_scale=1.0):
  b, L, G, H, K, V = shape
  rng = np.random.default_rng(seed)
  x = dict(
      q=rng.normal(size=(b, L, G, K)),
      k=rng.normal(size=(b, L, G, K)),
      v=rng.normal(size=(b, L, H, V)),
      # As the layer makes it: -exp(A_log) * softplus(a + dt_bias).
      g=-rng.uniform(0.01, 4.0, size=(H,)) * np.logaddexp(0.0, rng.normal(size=(b, L, H))),
      beta=1.0 / (1.0 + np.exp(-rng.normal(size=(b, L, H)))),
      initial_state=rng.normal(size=(b, H, K, V)) if initial_state else None,
  )
  x["g"] = g_scale * x["g"]
  return {k: None if v is None else v.astype(np.float32) for k, v in x.items()}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_close(a, b, tol=TOL, what=""):
  assert np.all(np.isfinite(np.asarray(a))), f"{what}: not finite"
  err = rel_err(a, b)
  assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def cotangents(seed, x):
  """Random weights for the loss <w_o, o> + <w_S, S_L>."""
  rng = np.random.default_rng(seed + 1000)
  b, L, _, _ = x["q"].shape
  H, V = x["v"].shape[2:]
  K = x["q"].shape[3]
  return (rng.normal(size=(b, L, H, V)).astype(np.float32),
          rng.normal(size=(b, H, K, V)).astype(np.float32))


NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def jax_run(x, w, impl, chunk_size=4, use_qk_l2norm=True, reset=None):
  """(o, S_L, the gradients of <w_o, o> + <w_S, S_L> w.r.t. NAMES)."""

  def loss(args):
    o, S = gated_delta_rule(*[args[n] for n in NAMES[:5]], initial_state=args["initial_state"],
                            return_final_state=True, reset=reset, impl=impl,
                            chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm)
    return jnp.sum(o * w[0]) + jnp.sum(S * w[1]), (o, S)

  grads, (o, S) = jax.grad(loss, has_aux=True)({n: jnp.asarray(x[n]) for n in NAMES})
  return o, S, grads


def torch_run(x, w, path, chunk_size=4, use_qk_l2norm=True):
  torch = pytest.importorskip("torch")
  hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
  args = {n: torch.tensor(x[n], requires_grad=True) for n in NAMES}
  kwargs = dict(initial_state=args["initial_state"], output_final_state=True,
                use_qk_l2norm_in_kernel=use_qk_l2norm)
  if path == "chunk":
    fn = functools.partial(hf.torch_chunk_gated_delta_rule, chunk_size=chunk_size)
  else:
    fn = hf.torch_recurrent_gated_delta_rule
  o, S = fn(args["q"], args["k"], args["v"], g=args["g"], beta=args["beta"], **kwargs)
  (o * torch.tensor(w[0])).sum().add((S * torch.tensor(w[1])).sum()).backward()
  to_np = lambda t: t.detach().numpy()
  return to_np(o), to_np(S), {n: to_np(args[n].grad) for n in NAMES}


@pytest.mark.parametrize("path", ["recurrent", "chunk"])
@pytest.mark.parametrize("impl", BACKENDS)
def test_matches_transformers(impl, path):
  x = make_inputs(0)
  w = cotangents(0, x)
  o, S, grads = jax_run(x, w, impl)
  o_t, S_t, grads_t = torch_run(x, w, path)
  assert_close(o, o_t, what="o")
  assert_close(S, S_t, what="final state")
  for n in NAMES:
    assert_close(grads[n], grads_t[n], what=f"d{n}")


def test_matches_transformers_without_l2norm_default_chunk():
  # Keys of norm about 1, as the delta rule needs; transformers pads to its chunk of 64.
  x = make_inputs(1)
  x["k"] = x["k"] / np.sqrt(x["k"].shape[-1])
  w = cotangents(1, x)
  o, S, grads = jax_run(x, w, "chunked", chunk_size=64, use_qk_l2norm=False)
  o_t, S_t, grads_t = torch_run(x, w, "chunk", chunk_size=64, use_qk_l2norm=False)
  assert_close(o, o_t, what="o")
  assert_close(S, S_t, what="final state")
  for n in NAMES:
    assert_close(grads[n], grads_t[n], what=f"d{n}")


@pytest.mark.parametrize("chunk_size,with_reset", [(1, False), (3, True)])
def test_chunked_matches_reference(chunk_size, with_reset):
  # Strong decays too: cumulative log decays far below exp's range within a chunk; resets
  # (a decay of exp(-inf)) leave no NaN in the gradients.
  x = make_inputs(2, g_scale=8.0)
  w = cotangents(2, x)
  b, L = x["q"].shape[:2]
  # Seed 5: a reset at the first step of one sequence, and a few steps later in the other.
  reset = (jnp.asarray(np.random.default_rng(5).uniform(size=(b, L)) < 0.3) if with_reset
           else None)
  o_r, S_r, grads_r = jax_run(x, w, "reference", reset=reset)
  o_c, S_c, grads_c = jax_run(x, w, "chunked", chunk_size=chunk_size, reset=reset)
  assert_close(o_c, o_r, what="o")
  assert_close(S_c, S_r, what="final state")
  for n in NAMES:
    assert_close(grads_c[n], grads_r[n], what=f"d{n}")


def _run(x, impl, reset=None, initial_state="x"):
  h0 = x["initial_state"] if initial_state == "x" else initial_state
  return gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=h0,
                          return_final_state=True, reset=reset, impl=impl, chunk_size=4)


def _slice(x, lo, hi):
  return {n: (v if n == "initial_state" else v[:, lo:hi]) for n, v in x.items()}


@pytest.mark.parametrize("impl", BACKENDS)
def test_reset_splits_documents(impl):
  x = make_inputs(3)
  b, L = x["q"].shape[:2]
  t = 6  # inside the second chunk of 4
  reset = np.zeros((b, L), bool)
  reset[:, t] = True
  reset[1, 0] = True  # a reset at the first step discards the initial state
  o, S = _run(x, impl, jnp.asarray(reset))
  o1, _ = _run(_slice(x, 0, t), impl)
  o2, S2 = _run(_slice(x, t, L), impl, initial_state=None)
  o1_fresh, _ = _run(_slice(x, 0, t), impl, initial_state=None)
  assert_close(o[0, :t], o1[0], what="first document")
  assert_close(o[1, :t], o1_fresh[1], what="first document after a reset at 0")
  assert_close(o[:, t:], o2, what="second document")
  assert_close(S, S2, what="final state")


@pytest.mark.parametrize("impl", BACKENDS)
def test_decode_steps_continue_the_prefix(impl):
  x = make_inputs(5)
  L, P = x["q"].shape[1], 7
  o_full, S_full = _run(x, impl)
  _, S = _run(_slice(x, 0, P), impl)
  outs = []
  for t in range(P, L):
    o_t, S = gated_delta_state_update(S, *[x[n][:, t] for n in NAMES[:5]])
    outs.append(o_t)
  assert_close(jnp.stack(outs, axis=1), o_full[:, P:], what="decoded outputs")
  assert_close(S, S_full, what="final state")


def test_dtype_and_shape_checks():
  x = make_inputs(6, initial_state=False)
  bf = {n: jnp.asarray(x[n], jnp.bfloat16) for n in ("q", "k", "v")}
  o, S = gated_delta_rule(bf["q"], bf["k"], bf["v"], x["g"], x["beta"], return_final_state=True)
  assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
  with pytest.raises(ValueError, match="key_heads"):
    gated_delta_rule(x["q"][:, :, :1].repeat(3, 2), x["k"][:, :, :1].repeat(3, 2), x["v"],
                     x["g"], x["beta"])
  with pytest.raises(TypeError, match="dtype"):
    gated_delta_rule(bf["q"], x["k"], x["v"], x["g"], x["beta"])
  with pytest.raises(ValueError, match="impl"):
    gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], impl="fused")
