"""Logical axes and the mesh axes they are sharded over; what layers need of the mesh.

The mesh has axes data (pure data parallel), fsdp (data parallel with parameters
sharded over it) and tensor (Megatron-style: inner, head and MLP dimensions split).
A layer names the logical axes of its tensors ("batch", "inner", ...); the mesh is
the one in context (`jax.set_mesh`, as the training loop sets it). Without a mesh,
or on one device, everything here is the identity.
"""

import math

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")
# logical axis -> mesh axes; a logical axis not named here is never sharded
LOGICAL_AXES = {"batch": BATCH, "embed": "fsdp", "vocab": "tensor", "inner": "tensor",
                "heads": "tensor", "mlp": "tensor"}


def spec(logical, shape, mesh):
  """The PartitionSpec of a tensor of `shape` whose dimensions have the `logical`
  axes: each over its mesh axes where they divide it, whole where they do not."""
  out = []
  for name, size in zip(logical, shape):
    axes = LOGICAL_AXES.get(name)
    n = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))
                  if a) if axes else 1
    out.append(axes if n > 1 and size % n == 0 else None)
  return P(*out)


def shard_map(fn, args, in_axes, out_axes):
  """`fn(*args)` run per shard of the mesh in context (jax.shard_map), every argument
  split along its logical axes (`in_axes`: one tuple per argument, None for an
  argument that is None), the outputs along `out_axes`. For computations that are
  independent along those axes (a scan per batch row and channel): each device
  computes its block, with no communication. A logical axis the mesh does not divide
  in every argument stays whole."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  # One decision per logical axis, so that every tensor holding it agrees.
  sizes = {}
  for a, axes in zip(args, in_axes):
    if a is not None:
      for name, size in zip(axes, a.shape):
        sizes.setdefault(name, set()).add(size)
  keep = {name for name, s in sizes.items()
          if all(spec((name,), (n,), mesh)[0] is not None for n in s)}
  as_spec = lambda axes: P(*(LOGICAL_AXES[n] if n in keep else None for n in axes))
  in_specs = tuple(P() if a is None else as_spec(axes) for a, axes in zip(args, in_axes))
  out_specs = jax.tree.map(as_spec, out_axes, is_leaf=lambda x: isinstance(x, tuple)
                           and all(isinstance(n, (str, type(None))) for n in x))
  # check_vma=False: the backends (a Pallas kernel among them) make their own
  # per-shard zeros and loops; the specs above are the promise that fn is blockwise.
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


def constrain(x, logical):
  """`x` laid out along its logical axes on the mesh in context: a sharding constraint
  at a layer boundary, so that XLA keeps activations where the layer computes them
  rather than moving them to suit a parameter's layout. Off a mesh, `x` itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(
      mesh, spec(logical, x.shape, mesh)))
