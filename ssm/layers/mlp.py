"""Feed-forward blocks: SwiGLU (Llama, Transformer++) and GELU (GPT-2, ViT)."""

import jax
from flax import nnx

from ssm.layers import partitioning

KINDS = ("swiglu", "gelu", "gelu_tanh")


class MLP(nnx.Module):
  """swiglu: down(silu(gate(x)) * up(x)), no biases (Llama's names).
  gelu / gelu_tanh: fc2(gelu(fc1(x))) with biases; gelu_tanh is GPT-2's "gelu_new"."""

  def __init__(self, d_model, d_intermediate, kind="swiglu", *, kernel_init, out_init,
               dtype, rngs):
    if kind not in KINDS:
      raise ValueError(f"mlp {kind!r}: expected one of {KINDS}")
    self.kind = kind
    linear = lambda i, o, init, axes, bias, bias_axes=(None,): partitioning.linear(
        i, o, axes, use_bias=bias, bias_axes=bias_axes, kernel_init=init, dtype=dtype,
        rngs=rngs)
    up, down = ("embed", "mlp"), ("mlp", "embed")
    if kind == "swiglu":
      self.gate_proj = linear(d_model, d_intermediate, kernel_init, up, False)
      self.up_proj = linear(d_model, d_intermediate, kernel_init, up, False)
      self.down_proj = linear(d_intermediate, d_model, out_init, down, False)
    else:
      self.fc1 = linear(d_model, d_intermediate, kernel_init, up, True, ("mlp",))
      self.fc2 = linear(d_intermediate, d_model, out_init, down, True)

  def __call__(self, x):
    if self.kind == "swiglu":
      return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.kind == "gelu_tanh"))
