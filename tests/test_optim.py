"""ssm.train.optim: which parameters decay (the roles they were made with), the
schedule."""

import re

import numpy as np
import pytest

from ssm.config import base
from ssm.train.optim import decays, schedule


def _decay_roles():
  """path (layer indices as *) -> the weight-decay role its parameter was made with,
  over models that hold every kind of parameter."""
  import re

  import jax
  from flax import nnx

  from ssm.flops import abstract_model
  from ssm.layers.partitioning import roles
  from ssm.models import PRESETS, ViTConfig
  out = {}
  for config in [PRESETS["mamba-130m"], PRESETS["gpt2-small"], PRESETS["vit-s16-reg4"],
                 PRESETS["vim-tiny"], ViTConfig(n_layer=3, layer_scale=1.0)]:
    decay = roles(nnx.state(abstract_model(config)))[1]
    for path, role in jax.tree_util.tree_flatten_with_path(decay)[0]:
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      out[re.sub(r"(^|/)\d+/", r"\1*/", name)] = role
  return out


ROLES = _decay_roles()


@pytest.mark.parametrize("path,expected", [
    ("layers/0/mixer/in_proj/kernel", True),
    ("layers/0/mixer/x_proj/kernel", True),
    ("layers/0/mixer/dt_proj/kernel", True),
    ("layers/0/mixer/out_proj/kernel", True),
    ("layers/3/mlp/fc1/kernel", True),
    ("head/kernel", True),
    ("layers/0/mixer/A_log", False),
    ("layers/0/mixer/D", False),
    ("layers/0/mixer/A_b_log", False),
    ("layers/0/mixer/D_b", False),
    ("layers/0/mixer/dt_proj/bias", False),
    ("layers/0/mixer/conv_bias", False),
    ("layers/0/mixer/conv_weight", True),
    ("layers/0/norm/weight", False),
    ("layers/0/norm2/bias", False),
    ("norm_f/weight", False),
    ("layers/2/layer_scale1", False),
    ("embedding/embedding", False),
    ("position_embedding/embedding", False),
    ("cls_token", False),
    ("register_tokens", False),
])
def test_weight_decay_mask(path, expected):
  kind = re.sub(r"(^|/)\d+/", r"\1*/", path)
  assert decays(ROLES[kind]) is expected


def test_embeddings_decay_when_asked():
  assert decays(ROLES["embedding/embedding"], decay_embeddings=True)
  assert decays(ROLES["cls_token"], decay_embeddings=True)
  assert not decays(ROLES["layers/*/mixer/A_log"], decay_embeddings=True)


def test_warmup_then_cosine():
  cfg = base().train
  cfg.update(dict(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1))
  lr = schedule(cfg)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-5, atol=1e-6)
  cfg.schedule = "constant"
  assert float(schedule(cfg)(50)) == 1.0
  cfg.schedule = "linear"
  with pytest.raises(ValueError, match="expected 'cosine' or 'constant'"):
    schedule(cfg)
