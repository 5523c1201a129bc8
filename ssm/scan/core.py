"""The public selective scan: argument checks and the choice of backend. What the
backends share (softplus, D skip, z gate, float32 arithmetic) is in `common.py`."""

import functools

import jax
import jax.numpy as jnp

from ssm.scan import associative, chunked, common, pallas, reference

BACKENDS = {
    "reference": common.backend(reference.scan),
    "associative": common.backend(associative.scan),
    "chunked": chunked.scan,
    "pallas": pallas.scan,
}
TILED = ("chunked", "pallas")  # the backends that take chunk_size and channel_block
IMPLS = ("auto", *BACKENDS)


def default_impl(platform):
  """The backend `impl="auto"` runs on a platform ("cpu", "gpu", "tpu").

  CPU: the sequential reference scan is the fastest there (the Pallas kernel
  only runs interpreted). Accelerators: the chunked backend, whose memory does
  not grow with N (docs/benchmarks.md). The fused Pallas kernel becomes the
  choice on GPU/TPU once it has been measured faster there: its GPU and TPU
  timings are still owed (docs/benchmarks.md)."""
  return "reference" if platform == "cpu" else "chunked"


@functools.partial(jax.jit, static_argnames=(
    "delta_softplus", "return_final_state", "impl", "chunk_size", "channel_block"))
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=True, initial_state=None, return_final_state=False,
                   impl="auto", *, reset=None, chunk_size=None, channel_block=None):
  """Selective scan with the semantics of mamba_ssm's `selective_scan_ref`.

  Layout is (batch, length, channels):
    u, delta, z: (batch, length, channels)   A: (channels, state)
    B, C: (batch, length, state)              D, delta_bias: (channels,)
    initial_state: (batch, channels, state)   reset: (batch, length) bool

  delta = softplus(delta + delta_bias); h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;
  y_t = <h_t, C_t> + D u_t; y = y * silu(z). Where `reset[b, t]` is true a new
  document starts at t: the state carried into step t is zeroed (packed sequences).
  Arithmetic is float32 whatever the input dtype.

  Returns y (batch, length, channels) in u's dtype; with `return_final_state`
  also the final state (batch, channels, state) in float32.

  `impl` picks the backend: "reference" (sequential `lax.scan`, the
  specification), "associative" (`lax.associative_scan`), "chunked" (memory-light),
  "pallas" (the fused kernel: `ssm.scan.pallas`; interpreted on CPU) or "auto".
  `chunk_size` and `channel_block` tune the tiles of "chunked" and "pallas".
  """
  batch, length, channels = _check_scan_args(
      u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
  if impl == "auto":
    impl = default_impl(jax.default_backend())
  backend = BACKENDS[impl]
  if impl in TILED:
    backend = functools.partial(backend, chunk_size=chunk_size, channel_block=channel_block)
  elif chunk_size is not None or channel_block is not None:
    raise ValueError(f"chunk_size and channel_block apply to impl in {TILED}, not {impl!r}")

  f32 = common.f32
  keep = (jnp.ones((batch, length), jnp.float32) if reset is None
          else 1.0 - reset.astype(bool).astype(jnp.float32))
  h0 = (jnp.zeros((batch, channels, A.shape[1]), jnp.float32)
        if initial_state is None else f32(initial_state))
  y, final_state = backend(u, delta, f32(A), B, C, f32(D), z, f32(delta_bias), delta_softplus,
                           keep, h0)
  return (y, final_state) if return_final_state else y


@functools.partial(jax.jit, static_argnames=("delta_softplus",))
def selective_state_update(state, x, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=True):
  """One step of the scan, for decoding: mamba_ssm's `selective_state_update`.

    state: (batch, channels, state) float32   x, delta, z: (batch, channels)
    A: (channels, state)   B, C: (batch, state)   D, delta_bias: (channels,)

  Returns (y (batch, channels) in x's dtype, the new state in float32).
  """
  if jnp.ndim(state) != 3:
    raise ValueError(f"state: expected (batch, channels, state), got shape {jnp.shape(state)}")
  batch, channels, n = state.shape
  common.check("x", x, (batch, channels), "(batch, channels)")
  common.check("delta", delta, (batch, channels), "(batch, channels)", like=("x", x))
  common.check("A", A, (channels, n), "(channels, state)")
  common.check("B", B, (batch, n), "(batch, state)", like=("x", x))
  common.check("C", C, (batch, n), "(batch, state)", like=("x", x))
  common.check("z", z, (batch, channels), "(batch, channels)", like=("x", x))
  common.check("D", D, (channels,), "(channels,)")
  common.check("delta_bias", delta_bias, (channels,), "(channels,)")

  f32 = common.f32
  delta_f = common.discretize(f32(delta), f32(delta_bias), delta_softplus)
  keep = jnp.ones((batch,), jnp.float32)
  new_state, y = reference.step(f32(state), f32(x), delta_f, f32(A), f32(B), f32(C), keep)
  return common.gate(y, f32(x), f32(D), f32(z)).astype(x.dtype), new_state


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, reset):
  if jnp.ndim(u) != 3:
    raise ValueError(f"u: expected (batch, length, channels), got shape {jnp.shape(u)}")
  batch, length, channels = u.shape
  if jnp.ndim(A) != 2 or A.shape[0] != channels:
    raise ValueError(f"A: expected (channels, state) = ({channels}, N), got shape {jnp.shape(A)}")
  n = A.shape[1]
  common.check("u", u, u.shape, "(batch, length, channels)")
  common.check("delta", delta, (batch, length, channels), "(batch, length, channels)", like=("u", u))
  common.check("A", A, (channels, n), "(channels, state)")
  common.check("B", B, (batch, length, n), "(batch, length, state)", like=("u", u))
  common.check("C", C, (batch, length, n), "(batch, length, state)", like=("u", u))
  common.check("z", z, (batch, length, channels), "(batch, length, channels)", like=("u", u))
  common.check("D", D, (channels,), "(channels,)")
  common.check("delta_bias", delta_bias, (channels,), "(channels,)")
  common.check("initial_state", initial_state, (batch, channels, n), "(batch, channels, state)")
  common.check_reset(reset, batch, length)
  return batch, length, channels
