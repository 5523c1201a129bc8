"""Meshes and shardings, all jax.sharding. Axes: data (pure data parallel), fsdp
(data parallel with parameters and optimizer state sharded over it) and tensor
(Megatron-style: the inner, head and MLP dimensions split).

Every parameter gets logical axes from its path (RULES); ssm.layers.partitioning
maps those to mesh axes. A dimension that the mesh axis does not divide stays whole.
"""

import math
import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ssm.layers.partitioning import BATCH, MESH_AXES as AXES, spec

# (regex on the parameter path, logical axes of its dimensions); first match wins.
RULES = [
    (r"(^|/)embedding/embedding$", ("vocab", "embed")),
    (r"(^|/)position_embedding/embedding$", (None, "embed")),
    (r"(^|/)position_embedding$", (None, "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)in_proj/kernel$", ("embed", None, "inner")),  # Mamba's (D, x|z, E)
    (r"(^|/)in_proj/bias$", (None, "inner")),
    (r"(^|/)out_proj/kernel$", ("inner", "embed")),
    (r"(^|/)(conv_bias|conv_bias_b|D|D_b)$", ("inner",)),
    (r"(^|/)dt_proj(_b)?/bias$", ("inner",)),
    (r"(^|/)conv_weight(_b)?$", (None, "inner")),
    (r"(^|/)x_proj(_b)?/kernel$", ("inner", None)),
    (r"(^|/)dt_proj(_b)?/kernel$", (None, "inner")),
    (r"(^|/)(A_log|A_b_log)$", ("inner", None)),
    (r"(^|/)[qkv]_proj/kernel$", ("embed", "heads")),
    (r"(^|/)[qkv]_proj/bias$", ("heads",)),
    (r"(^|/)o_proj/kernel$", ("heads", "embed")),
    (r"(^|/)(gate_proj|up_proj|fc1)/kernel$", ("embed", "mlp")),
    (r"(^|/)fc1/bias$", ("mlp",)),
    (r"(^|/)(down_proj|fc2)/kernel$", ("mlp", "embed")),
    (r"(^|/)patch_embedding/proj/kernel$", (None, "embed")),
    (r"(^|/)head/kernel$", ("embed", None)),
    # replicated: norms, output biases, LayerScale, class and register tokens
    (r"(^|/)(norm\w*/(weight|bias)|(out_proj|o_proj|fc2|down_proj|head|patch_embedding/proj)"
     r"/bias|layer_scale\d|cls_token|register_tokens)$", None),
]


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
      raise ValueError(f"mesh {sizes}: {len(devices)} devices are not divisible by {known}")
    sizes[rest[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but "
                     f"{len(devices)} are present; set mesh sizes whose product is "
                     f"{len(devices)} (one of them may be -1)")
  return jax.sharding.Mesh(np.asarray(devices).reshape([sizes[a] for a in AXES]), AXES)


def logical_axes(path, ndim):
  for pattern, axes in RULES:
    if re.search(pattern, path):
      axes = axes or (None,) * ndim
      if len(axes) != ndim:
        raise ValueError(f"sharding rule {pattern!r} gives {len(axes)} axes for {path}, "
                         f"which has {ndim}")
      return axes
  raise ValueError(f"no sharding rule for parameter {path!r}: add one to "
                   "ssm.train.sharding.RULES")


def param_spec(path, shape, mesh):
  return spec(logical_axes(path, len(shape)), shape, mesh)


def param_shardings(params, mesh):
  from ssm.train.optim import path_str
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, param_spec(path_str(p), x.shape, mesh)), params)


def batch_sharding(mesh):
  return NamedSharding(mesh, P(BATCH))


def check_batch(global_batch, mesh, grad_accum=1):
  """Errors before any compilation when the batch cannot be split."""
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
