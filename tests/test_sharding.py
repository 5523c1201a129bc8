"""ssm.train.sharding and ssm.layers.partitioning: the exact PartitionSpec of every
parameter kind on a 2x2x2 mesh; meshes from configs; and, on 8 fake devices, a
sharded Mamba layer and train step that move no activations between devices.

The 8-device checks run this file as a script in a subprocess (the number of fake
CPU devices is fixed when JAX starts) and read back what it prints."""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ssm.flops import abstract_model
from ssm.layers import Mamba2Config, partitioning
from ssm.models import PRESETS, LMConfig
from ssm.train.sharding import make_mesh, param_shardings

ROOT = Path(__file__).resolve().parents[1]
L = 40  # the sequence length of the 8-device checks: no parameter has a dimension of 40

# Every parameter kind of the presets (layer indices as *) -> its spec on data=fsdp=tensor=2.
EXPECTED = {
    "embedding/embedding": P("tensor", "fsdp"),
    "position_embedding/embedding": P(None, "fsdp"),
    "norm_f/weight": P(None), "norm_f/bias": P(None),
    "layers/*/norm/weight": P(None), "layers/*/norm/bias": P(None),
    "layers/*/norm2/weight": P(None), "layers/*/norm2/bias": P(None),
    # Mamba: the channels E over tensor everywhere, x and z alike
    "layers/*/mixer/in_proj/kernel": P("fsdp", None, "tensor"),
    "layers/*/mixer/conv_weight": P(None, "tensor"), "layers/*/mixer/conv_bias": P("tensor"),
    "layers/*/mixer/x_proj/kernel": P("tensor", None),
    "layers/*/mixer/dt_proj/kernel": P(None, "tensor"),
    "layers/*/mixer/dt_proj/bias": P("tensor"),
    "layers/*/mixer/A_log": P("tensor", None), "layers/*/mixer/D": P("tensor"),
    "layers/*/mixer/out_proj/kernel": P("tensor", "fsdp"),
    # Vision Mamba's backward direction
    "layers/*/mixer/conv_weight_b": P(None, "tensor"), "layers/*/mixer/conv_bias_b": P("tensor"),
    "layers/*/mixer/x_proj_b/kernel": P("tensor", None),
    "layers/*/mixer/dt_proj_b/kernel": P(None, "tensor"),
    "layers/*/mixer/dt_proj_b/bias": P("tensor"),
    "layers/*/mixer/A_b_log": P("tensor", None), "layers/*/mixer/D_b": P("tensor"),
    # attention: heads over tensor
    "layers/*/mixer/q_proj/kernel": P("fsdp", "tensor"),
    "layers/*/mixer/k_proj/kernel": P("fsdp", "tensor"),
    "layers/*/mixer/v_proj/kernel": P("fsdp", "tensor"),
    "layers/*/mixer/q_proj/bias": P("tensor"), "layers/*/mixer/k_proj/bias": P("tensor"),
    "layers/*/mixer/v_proj/bias": P("tensor"),
    "layers/*/mixer/o_proj/kernel": P("tensor", "fsdp"), "layers/*/mixer/o_proj/bias": P(None),
    # MLPs: the hidden width over tensor
    "layers/*/mlp/gate_proj/kernel": P("fsdp", "tensor"),
    "layers/*/mlp/up_proj/kernel": P("fsdp", "tensor"),
    "layers/*/mlp/down_proj/kernel": P("tensor", "fsdp"),
    "layers/*/mlp/fc1/kernel": P("fsdp", "tensor"), "layers/*/mlp/fc1/bias": P("tensor"),
    "layers/*/mlp/fc2/kernel": P("tensor", "fsdp"), "layers/*/mlp/fc2/bias": P(None),
    # vision
    "patch_embedding/proj/kernel": P(None, "fsdp"), "patch_embedding/proj/bias": P(None),
    "position_embedding": P(None, "fsdp"), "cls_token": P(None, None, None),
    "register_tokens": P(None, None, None), "norm/weight": P(None), "norm/bias": P(None),
    "head/kernel": P("fsdp", None), "head/bias": P(None),
}
# Mamba-2's own: heads, and groups with them, over tensor; its conv over (x, B, C) whole
MAMBA2 = {
    "layers/*/mixer/in_proj/kernel_bc": P("fsdp", None, "tensor", None),
    "layers/*/mixer/in_proj/kernel_dt": P("fsdp", "tensor"),
    "layers/*/mixer/in_proj/bias": P(None, "tensor"),
    "layers/*/mixer/in_proj/bias_bc": P(None, "tensor", None),
    "layers/*/mixer/in_proj/bias_dt": P("tensor"),
    "layers/*/mixer/conv_weight": P(None, None), "layers/*/mixer/conv_bias": P(None),
    "layers/*/mixer/dt_bias": P("tensor"), "layers/*/mixer/A_log": P("tensor"),
    "layers/*/mixer/norm/weight": P("tensor"), "layers/*/mixer/out_proj/bias": P(None),
}
# where the mesh does not divide a dimension it stays whole: GPT-2's vocabulary is odd,
# the released Mamba-2s have one group
UNDIVIDED = {("gpt2-small", "embedding/embedding"): P(None, "fsdp"),
             ("mamba2-130m", "layers/*/mixer/in_proj/kernel_bc"): P("fsdp", None, None, None)}
# a Mamba-2 of several groups (2 over tensor=2), biases everywhere
MAMBA2_GROUPS = LMConfig(d_model=32, n_layer=2, vocab_size=64, pattern="S",
                         mamba2=Mamba2Config(d_state=8, headdim=16, ngroups=2, bias=True))


def path_str(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def test_every_parameter_kind_has_its_exact_spec_on_a_2x2x2_mesh():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
  seen = set()
  models = {name: PRESETS[name] for name in ["mamba-130m", "transformer++-130m", "gpt2-small",
                                             "vit-s16-reg4", "vim-tiny", "mamba2-130m"]}
  for name, config in {**models, "mamba2-groups": MAMBA2_GROUPS}.items():
    shardings = param_shardings(nnx.state(abstract_model(config)), mesh)
    expected = {**EXPECTED, **MAMBA2} if name.startswith("mamba2") else EXPECTED
    for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]:
      kind = re.sub(r"(^|/)\d+/", r"\1*/", path_str(path))
      assert kind in expected, f"{name}: {kind} has no expected spec in this test"
      want = UNDIVIDED.get((name, kind), expected[kind])
      assert sharding.spec == want, (name, kind, sharding.spec)
      seen.add((name.startswith("mamba2"), kind))
  assert {k for _, k in seen} == set(EXPECTED) | set(MAMBA2)
  assert {k for m2, k in seen if m2} >= set(MAMBA2)


def test_a_dimension_the_mesh_does_not_divide_stays_whole():
  mesh = jax.sharding.AbstractMesh((1, 3, 2), ("data", "fsdp", "tensor"))
  axes = ("embed", None, "inner")
  assert partitioning.spec(axes, (64, 2, 96), mesh) == P(None, None, "tensor")
  assert partitioning.spec(axes, (96, 2, 63), mesh) == P("fsdp", None, None)


def test_a_parameter_made_without_a_role_is_an_error_naming_it():
  class Probe(nnx.Module):
    def __init__(self):
      self.kernel = partitioning.param(jnp.zeros((4, 8)), ("embed", "mlp"))
      self.gain = nnx.Param(jnp.ones((8,)))  # no role

  with pytest.raises(ValueError, match="parameter 'gain' was made without a role"):
    param_shardings(nnx.state(Probe()), jax.sharding.AbstractMesh((1, 1, 1), partitioning.MESH_AXES))
  with pytest.raises(ValueError, match="shape \\(4, 8\\) but logical axes"):
    partitioning.roles(nnx.state(nnx.Linear(4, 8, use_bias=False,
                                            kernel_metadata=partitioning.role(("embed",)),
                                            rngs=nnx.Rngs(0))))


def test_mesh_sizes():
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="needs 2 devices but 1 are present"):
    make_mesh({"data": 2, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match="unknown axes"):
    make_mesh({"data": -1, "pipe": 1})
  with pytest.raises(ValueError, match="at most one -1"):
    make_mesh({"data": -1, "fsdp": -1})


# --- on 8 fake devices ------------------------------------------------------------

def test_on_eight_devices_a_sharded_mamba_moves_no_activations():
  """One subprocess with 8 fake devices (data=fsdp=tensor=2), three checks:
  - a Mamba layer's compiled forward+backward, for each scan backend, and a Mamba-2
    layer's, with 2 groups (one per tensor shard), 3 (the shards split a group) and
    1, moves no (batch, length, ...) tensor between devices and equals one device's;
  - the whole train step of a Mamba LM (grad accumulation, embedding, tied head, loss)
    moves nothing inside the Mamba layers (their ops are named "mamba"): what moves at
    all are the loss's per-shard maxima over the vocabulary, (B, L, tensor=2); and XLA
    never falls back to replicating a tensor to reshard it (what the old x | z split of
    in_proj made it do);
  - every microbatch of the accumulation is split over all data devices, so splitting
    the batch into microbatches moves nothing."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  checks = json.loads(out.stdout.strip().splitlines()[-1])
  assert {f"mamba2 G={G} chunked" for G in (1, 2, 3)} <= set(checks["layer"])
  for impl, check in checks["layer"].items():
    assert check["moved"] == [], (impl, check["moved"])
    assert check["error"] < 1e-5, impl  # output and gradients, relative to one device's
  assert [line for line in checks["step"] if "mamba" in line] == []
  assert all(re.search(rf"\[\d+,{L},2\]", line) for line in checks["step"]), checks["step"]
  assert "Involuntary full rematerialization" not in out.stderr
  assert checks["microbatches"] == []


def moved(hlo, length):
  """The collectives of compiled HLO text that move a tensor with a `length` dimension
  (all-gather, all-to-all, collective-permute; all-reduces of partial sums are fine)."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r"= (.*?) (all-gather|all-to-all|collective-permute)(-start)?\(", line)
    shapes = re.findall(r"\[([\d,]*)\]", m.group(1)) if m else []  # one, or a tuple
    if any(length in [int(d) for d in shape.split(",") if d] for shape in shapes):
      found.append(line.strip())
  return found


def _eight_device_checks():

  from ssm.layers import Mamba, Mamba2, Mamba2Config, MambaConfig
  from ssm.train import sharding
  from ssm.config import load_config_file
  from ssm.train.loop import Trainer
  from ssm.train.step import microbatches

  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  batch_sharding = sharding.batch_sharding(mesh)
  out = {"layer": {}}
  # Mamba-2: 4 heads in 2 groups (a group per tensor shard), 6 heads in 3 groups (the
  # shards split a group), 4 heads in 1 group
  mamba2 = lambda d, G, impl: Mamba2(d, Mamba2Config(d_state=8, headdim=16, ngroups=G,
                                                     chunk_size=16, scan_impl=impl),
                                     rngs=nnx.Rngs(0))
  layers = {**{impl: lambda impl=impl: Mamba(32, MambaConfig(d_state=8, scan_impl=impl),
                                              rngs=nnx.Rngs(0))
               for impl in ["reference", "chunked", "pallas"]},
            "mamba2 G=2 chunked": lambda: mamba2(32, 2, "chunked"),
            "mamba2 G=3 chunked": lambda: mamba2(48, 3, "chunked"),
            "mamba2 G=1 chunked": lambda: mamba2(32, 1, "chunked")}
  for impl, make in layers.items():
    layer = make()
    x = jax.random.normal(jax.random.key(1), (8, L, layer.out_proj.out_features))
    graphdef, params = nnx.split(layer)
    params = nnx.to_pure_dict(params)

    def loss(p, x, on_mesh):
      if not on_mesh:
        return (nnx.merge(graphdef, p)(x) ** 2).sum()
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return (nnx.merge(graphdef, p)(x) ** 2).sum()

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    ref = jax.jit(grad, static_argnums=2)(params, x, False)
    shardings = sharding.param_shardings(nnx.state(layer), mesh)
    sharded = jax.jit(grad, static_argnums=2, in_shardings=(shardings, batch_sharding))
    got = sharded(params, x, True)
    errors = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max()), got, ref)
    hlo = sharded.lower(params, x, True).compile().as_text()
    out["layer"][impl] = dict(error=max(jax.tree.leaves(errors)), moved=moved(hlo, L))

  c = load_config_file(str(ROOT / "configs" / "mqar.py") + ":mamba")
  c.task.update(dict(seq_len=L, num_kv_pairs=4))
  c.model.d_model = 48  # E = 96: no activation dimension equals the vocabulary (64)
  c.train.update(dict(batch_size=16, grad_accum=2))
  c.mesh.update(dict(data=2, fsdp=2, tensor=2))
  trainer = Trainer(c, tempfile.mkdtemp())
  state, batch = trainer.init_state(), next(trainer.batches())
  out["step"] = moved(trainer.compile_step(state, batch).as_text(), L)

  split = jax.jit(lambda b: microbatches(b, 4), in_shardings=batch_sharding,
                  out_shardings=jax.sharding.NamedSharding(mesh, P(None, sharding.BATCH)))
  out["microbatches"] = moved(split.lower(jnp.zeros((16, L))).compile().as_text(), L)
  print(json.dumps(out))


if __name__ == "__main__":
  _eight_device_checks()
