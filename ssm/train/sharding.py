"""Meshes and shardings, all jax.sharding. Axes: data (pure data parallel), fsdp
(data parallel with parameters and optimizer state sharded over it) and tensor
(Megatron-style: the inner, head and MLP dimensions split).

Every parameter has logical axes, given where it is made (ssm.layers.partitioning);
they map to mesh axes there. A dimension that the mesh axis does not divide stays whole.
"""

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ssm.fields import require
from ssm.layers.partitioning import BATCH, MESH_AXES as AXES, roles, spec


_FAKE_DEVICES = ("; to try a mesh on a CPU, start with fake devices: "
                 "XLA_FLAGS=--xla_force_host_platform_device_count=8")


def make_mesh(mesh_cfg, devices=None):
  """A Mesh with axes (data, fsdp, tensor) from {axis: size}, one size -1 for the rest."""
  devices = jax.devices() if devices is None else devices
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in AXES}
  unknown = set(mesh_cfg) - set(AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are {AXES}")
  rest = [a for a, s in sizes.items() if s == -1]
  known = math.prod(s for s in sizes.values() if s != -1)
  if len(rest) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"mesh {sizes}: sizes must be positive, with at most one -1")
  if rest:
    if len(devices) % known:
      raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by {known}"
                       f"{_FAKE_DEVICES}")
    sizes[rest[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but "
                     f"{len(devices)} are present; set mesh sizes whose product is "
                     f"{len(devices)} (one of them may be -1){_FAKE_DEVICES}")
  return jax.sharding.Mesh(np.asarray(devices).reshape([sizes[a] for a in AXES]), AXES)


def param_shardings(model_state, mesh):
  """The NamedSharding of every parameter of `model_state` (an nnx State, abstract or
  not), as a pure dict: its logical axes (its role) over the mesh."""
  axes, _ = roles(model_state)
  shapes = nnx.to_pure_dict(model_state)
  return jax.tree.map(lambda a, x: NamedSharding(mesh, spec(a, x.shape, mesh)), axes, shapes)


def batch_sharding(mesh):
  return NamedSharding(mesh, P(BATCH))


def check_batch(global_batch, mesh, grad_accum=1):
  """Errors before any compilation when the batch cannot be split."""
  require("train", batch_size=(global_batch, global_batch > 0),
          grad_accum=(grad_accum, grad_accum > 0))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % grad_accum:
    raise ValueError(f"train.batch_size {global_batch} is not divisible by train.grad_accum "
                     f"{grad_accum}")
  micro = global_batch // grad_accum
  if micro % shards:
    raise ValueError(f"the batch of {micro} examples (train.batch_size {global_batch} / "
                     f"grad_accum {grad_accum}) is not divisible by the data-parallel size "
                     f"{shards} (mesh data x fsdp); change the batch size or the mesh")
  if global_batch % jax.process_count():
    raise ValueError(f"train.batch_size {global_batch} is not divisible by the "
                     f"{jax.process_count()} processes")
