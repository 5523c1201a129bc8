"""ssm.models: exact parameter counts, logits shapes, decoding equals the full pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssm.layers import MambaConfig
from ssm.flops import param_count
from ssm.models import LanguageModel, LMConfig, get_preset


@pytest.mark.parametrize("name,count", [("mamba-130m", 129_135_360), ("mamba-370m", 371_516_416)])
def test_preset_parameter_counts_are_exact(name, count):
  assert param_count(get_preset(name)) == count


def test_unknown_preset_names_the_known_ones():
  with pytest.raises(KeyError, match="mamba-130m"):
    get_preset("mamba-100m")


def tiny(**kw):
  cfg = LMConfig(d_model=32, n_layer=3, vocab_size=61, mamba=MambaConfig(d_state=6), **kw)
  return LanguageModel(cfg, rngs=nnx.Rngs(0))


def test_vocabulary_padding_and_embedding_init():
  model = tiny()
  assert model.embedding.embedding.shape == (64, 32)
  ids = jnp.array([[1, 2, 60]])
  assert model(ids).shape == (1, 3, 64) and model(ids).dtype == jnp.float32
  big = LanguageModel(LMConfig(d_model=256, n_layer=1, vocab_size=4096), rngs=nnx.Rngs(0))
  assert abs(float(jnp.std(big.embedding.embedding[...])) - 0.02) < 1e-3


def test_decode_equals_full_pass():
  model = tiny()
  ids = jax.random.randint(jax.random.key(0), (2, 12), 0, 61)
  full = model(ids)
  logits, cache = model(ids[:, :5], return_cache=True)
  np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
  step = nnx.jit(lambda m, i, c: m.step(i, c))
  for t in range(5, 12):
    out, cache = step(model, ids[:, t], cache)
    np.testing.assert_allclose(out, full[:, t], rtol=2e-5, atol=2e-5)


def test_bad_ids_shape():
  with pytest.raises(ValueError, match=r"\(batch, length\)"):
    tiny()(jnp.zeros((4,), jnp.int32))
