"""Logical axes and the mesh axes they are sharded over; what layers need of the mesh.

The mesh has axes data (pure data parallel), fsdp (data parallel with parameters
sharded over it) and tensor (Megatron-style: inner, head and MLP dimensions split).

Every parameter is made with its role (`param`, `linear`): the logical axes of its
dimensions, from which the loop derives its sharding, and whether weight decay
applies, from which the optimizer derives its mask. A parameter made without one is
an error (`roles`), so a new parameter cannot silently get the wrong sharding or decay.

Activations: a layer names the logical axes of its tensors ("batch", "inner", ...);
the mesh is the one in context (`jax.sharding.use_abstract_mesh`, as the train step
sets it). Without a mesh, or on one device, `constrain` and `shard_map` are the
identity.
"""

import math

import jax
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")
# logical axis -> mesh axes; a logical axis not named here is never sharded
LOGICAL_AXES = {"batch": BATCH, "embed": "fsdp", "vocab": "tensor", "inner": "tensor",
                "heads": "tensor", "groups": "tensor", "mlp": "tensor"}


def spec(logical, shape, mesh):
  """The PartitionSpec of a tensor of `shape` whose dimensions have the `logical`
  axes: each over its mesh axes where they divide it, whole where they do not."""
  out = []
  for name, size in zip(logical, shape):
    n = _shards(name, mesh)
    out.append(LOGICAL_AXES[name] if n > 1 and size % n == 0 else None)
  return P(*out)


def _shards(name, mesh):
  """How many shards the mesh axes of logical axis `name` make (1 if none)."""
  axes = LOGICAL_AXES.get(name)
  if not axes:
    return 1
  return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))


def mesh_size(name):
  """How many shards logical axis `name` is split into where the mesh in context
  divides it: 1 off a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else _shards(name, mesh)


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


# --- parameter roles ---------------------------------------------------------------

DECAY = (True, False, "embedding")  # "embedding": decays only with train.decay_embeddings


def role(axes, decay=True):
  """A parameter's metadata: the logical axes of its dimensions (None: never split)
  and its weight-decay role (DECAY)."""
  if decay not in DECAY:
    raise ValueError(f"decay {decay!r}: expected one of {DECAY}")
  return dict(out_sharding=tuple(axes), eager_sharding=False, decay=decay)


def param(value, axes, decay=True):
  """An nnx.Param holding `value`, with its role."""
  return nnx.Param(value, **role(axes, decay))


def linear(d_in, d_out, axes, *, use_bias, bias_axes=(None,), **kwargs):
  """nnx.Linear whose kernel has logical `axes` (in, out) and decays; its bias has
  `bias_axes` (replicated unless given) and does not decay."""
  return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_metadata=role(axes),
                    bias_metadata=role(bias_axes, decay=False), **kwargs)


def roles(state):
  """(logical axes as PartitionSpecs of logical names, decay roles): two pure dicts
  shaped as `nnx.to_pure_dict(state)`, from the metadata of every parameter of an
  nnx State (abstract or not)."""
  axes, decays = {}, {}
  for path, variable in nnx.to_flat_state(state):
    meta = variable.get_metadata()
    name = "/".join(map(str, path))
    if "decay" not in meta or "out_sharding" not in meta:
      raise ValueError(f"parameter {name!r} was made without a role: make it with "
                       "ssm.layers.partitioning.param or .linear (its logical axes and "
                       "whether it decays)")
    if len(meta["out_sharding"]) != len(variable.shape):
      raise ValueError(f"parameter {name!r} has shape {variable.shape} but logical axes "
                       f"{meta['out_sharding']}")
    axes[path], decays[path] = P(*meta["out_sharding"]), meta["decay"]
  return traverse_util.unflatten_dict(axes), traverse_util.unflatten_dict(decays)
