"""ssm.train.sharding: every preset's parameters have a rule; meshes from configs."""

import jax
import pytest
from flax import nnx

from ssm.flops import abstract_model
from ssm.models import PRESETS
from ssm.train.optim import path_str
from ssm.train.sharding import LOGICAL_AXES, logical_axes, make_mesh


@pytest.mark.parametrize("name", ["mamba-130m", "transformer++-130m", "gpt2-small",
                                  "vit-s16-reg4", "vim-tiny"])
def test_every_parameter_of_every_model_has_logical_axes(name):
  params = nnx.to_pure_dict(nnx.state(abstract_model(PRESETS[name])))
  sharded = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    axes = logical_axes(path_str(path), len(x.shape))
    sharded += any(a in LOGICAL_AXES for a in axes)
  assert sharded > 0


def test_mesh_sizes():
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="needs 2 devices but 1 are present"):
    make_mesh({"data": 2, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match="unknown axes"):
    make_mesh({"data": -1, "pipe": 1})
  with pytest.raises(ValueError, match="at most one -1"):
    make_mesh({"data": -1, "fsdp": -1})
