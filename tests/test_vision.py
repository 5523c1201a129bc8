"""ssm.models.vit and ssm.models.vim: registers, positions, pooling, bidirectionality,
training on a small image task, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fit
from ssm.layers import BiMamba, MambaConfig
from ssm.models import VimConfig, VisionMamba, ViT, ViTConfig, get_preset
from ssm.models.vit import resize_positions


def vit(**kw):
  cfg = dict(image_size=16, patch_size=4, d_model=32, n_layer=2, n_heads=4, d_intermediate=64,
             num_registers=4, num_classes=4)
  return ViT(ViTConfig(**{**cfg, **kw}), rngs=nnx.Rngs(0))


def vim(**kw):
  cfg = dict(image_size=16, patch_size=4, d_model=32, n_layer=2, num_registers=2, num_classes=4,
             mamba=MambaConfig(d_state=8))
  return VisionMamba(VimConfig(**{**cfg, **kw}), rngs=nnx.Rngs(0))


def images(n=2, size=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def test_vit_token_layout_and_pooling():
  for pool in ("cls", "gap"):
    model = vit(pool=pool)
    f = model.features(images())
    assert f["tokens"].shape == (2, 1 + 4 + 16, 32)
    np.testing.assert_array_equal(f["registers"], f["tokens"][:, 1:5])
    np.testing.assert_array_equal(f["patches"], f["tokens"][:, 5:])
    expected = f["cls"] if pool == "cls" else f["patches"].mean(1)  # registers left out
    np.testing.assert_allclose(f["pooled"], expected, rtol=1e-6)
    assert f["token_norms"].shape == (2, 2, 21)


def test_position_embeddings_never_touch_registers():
  model = vit()
  x = images()
  before = model._tokens(x)
  model.position_embedding[...] = model.position_embedding[...] + 5.0
  after = model._tokens(x)
  regs = jnp.broadcast_to(model.register_tokens[...], (2, 4, 32))
  np.testing.assert_array_equal(before[:, 1:5], regs)
  np.testing.assert_array_equal(after[:, 1:5], regs)
  np.testing.assert_allclose(after[:, :1], before[:, :1] + 5.0, rtol=1e-6)
  np.testing.assert_allclose(after[:, 5:], before[:, 5:] + 5.0, rtol=1e-6)
  # other image sizes interpolate the patch positions; registers still untouched
  f = model.features(images(size=24))
  assert f["patches"].shape == (2, 36, 32) and model._tokens(images(size=24)).shape[1] == 41
  np.testing.assert_array_equal(model._tokens(images(size=24))[:, 1:5], regs)


def test_vit_attention_maps():
  f = vit().features(images(), return_attention=True)
  assert f["attention"].shape == (2, 2, 4, 21, 21)
  np.testing.assert_allclose(f["attention"].sum(-1), 1.0, rtol=1e-5)


def test_bimamba_sees_both_directions():
  """The output at the first position depends on the last input (backward scan),
  and the output at the last position on the first input (forward scan); a
  causal Mamba sees only the second."""
  mixer = BiMamba(16, MambaConfig(d_state=4), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 9, 16))
  jac = jax.jacobian(lambda x: mixer(x)[0, :, 0])(x)[:, 0, :, :]  # (out pos, in pos, ch)
  assert float(jnp.abs(jac[0, -1]).max()) > 1e-6 and float(jnp.abs(jac[-1, 0]).max()) > 1e-6
  # the two directions have their own parameters: flipping the input does not
  # simply flip the output
  flipped = jnp.flip(mixer(jnp.flip(x, 1)), 1)
  assert float(jnp.abs(flipped - mixer(x)).max()) > 1e-3


def test_vim_token_layout():
  f = vim().features(images())
  assert f["tokens"].shape == (2, 16 + 1 + 2, 32)
  order = f["order"]  # indices into [class, registers, patches]
  assert sorted(order) == list(range(19))
  cls_at = int(np.flatnonzero(order == 0)[0])
  assert 7 <= cls_at <= 11  # the class token sits mid-sequence
  np.testing.assert_array_equal(f["cls"], f["tokens"][:, cls_at])
  np.testing.assert_array_equal(f["pooled"], f["cls"])
  assert f["registers"].shape == (2, 2, 32) and f["patches"].shape == (2, 16, 32)


def test_vim_positions_at_another_resolution_interpolate_the_native_table():
  m = vim(num_registers=0)  # native grid 4: the table is 8 patches, the class, 8 patches
  pos = np.asarray(m.position_embedding[...])
  native = np.concatenate([pos[:8], pos[9:]])
  for grid, want in [(4, native), (8, resize_positions(native, 4, (8, 8)))]:
    cls, patches = m.positions((grid, grid))
    np.testing.assert_array_equal(cls, pos[8:9])
    np.testing.assert_allclose(patches, want, rtol=1e-6)
  f = m.features(images(size=32))
  assert f["patches"].shape == (2, 64, 32) and bool(jnp.isfinite(f["tokens"]).all())


def bright_quadrant_batches(n, size=16, seed=0):
  """Class = the quadrant that holds a bright square."""
  rng = np.random.default_rng(seed)
  for _ in range(n):
    labels = rng.integers(0, 4, size=32)
    x = rng.normal(0, 0.5, size=(32, size, size, 3)).astype(np.float32)
    for i, c in enumerate(labels):
      r, col = (c // 2) * size // 2, (c % 2) * size // 2
      x[i, r + 2:r + 6, col + 2:col + 6] += 2.0
    yield dict(images=jnp.asarray(x), labels=jnp.asarray(labels, jnp.int32))


@pytest.mark.parametrize("make", [vit, vim], ids=["vit", "vim"])
def test_trains_on_a_small_image_task(make):
  losses = fit(make(), bright_quadrant_batches(80), kind="image", lr=1e-2)
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_bad_input():
  with pytest.raises(ValueError, match="not divisible by the patch size 4"):
    vit()(images(size=18))
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    ViTConfig(image_size=30, patch_size=16)
  with pytest.raises(KeyError, match="known presets"):
    get_preset("vit-h14")
