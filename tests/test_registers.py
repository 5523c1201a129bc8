"""ssm.registers and scripts/registers.py: the outlier detector finds planted high-norm
tokens and no others; the attention maps equal a direct computation; the linear probe;
the whole analysis on transformers checkpoints (DINOv2 with registers, ViT) built here
and loaded through load_hf, with no network."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require
from ssm import registers
from ssm.models import ViT, ViTConfig

ROOT = Path(__file__).resolve().parents[1]
FASHION = "/usr/share/datasets/fashion-mnist"


def vit(num_registers=4, **kw):
  c = dict(image_size=28, patch_size=4, channels=1, d_model=32, n_layer=2, n_heads=4,
           d_intermediate=64, num_registers=num_registers, num_classes=10)
  # initialised under jit: one compilation rather than one per initialiser
  return nnx.jit(lambda: ViT(ViTConfig(**{**c, **kw}), rngs=nnx.Rngs(0)))()


@pytest.fixture(scope="module")
def model():
  return vit()


def images(n=6, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 28, 28, 1)).astype(np.float32)


def test_outlier_detector_finds_planted_high_norm_tokens_and_no_others(model):
  """Patches of 50x the pixel scale make tokens of far higher norm, which the residual
  stream carries through every block: exactly those are found, at every layer, and
  none in the same images unplanted."""
  x = images()
  planted = np.zeros((6, 49), bool)
  for i, (row, col) in enumerate([(0, 0), (3, 4), (6, 6), (2, 1), (5, 0), (1, 5)]):
    x[i, row * 4:row * 4 + 4, col * 4:col * 4 + 4] *= 50
    planted[i, row * 7 + col] = True
  planted[0, 10] = True  # two in one image
  x[0, 4:8, 12:16] *= 50
  clean = registers.forward(model, images())["norms"]
  norms = registers.forward(model, x)["norms"]
  assert norms.shape == (2, 6, 1 + 4 + 49)
  for layer in range(2):
    _, _, patches = registers.split_tokens(norms[layer], 4)
    mask, threshold = registers.find_outliers(patches)
    np.testing.assert_array_equal(mask, planted)
    assert patches[planted].min() > threshold > patches[~planted].max()
    _, _, patches = registers.split_tokens(clean[layer], 4)
    assert not registers.find_outliers(patches)[0].any()
  # where they sit: on a black surround (background) or on the object
  display = np.zeros((2, 28, 28, 1))
  display[0, 8:20, 8:24] = 0.8  # patches (2..4, 2..5) of the 7x7 grid
  display[1, :, :4] = 0.5  # the first column
  background = registers.background_patches(display, 7)
  expected = np.ones((2, 7, 7), bool)
  expected[0, 2:5, 2:6] = False
  expected[1, :, 0] = False
  np.testing.assert_array_equal(background, expected.reshape(2, 49))
  # a fixed threshold, as Darcet et al.'s 150 for DINOv2 ViT-g
  mask, t = registers.find_outliers(np.array([[1.0, 200.0, 3.0]]), threshold=150)
  assert t == 150 and mask.tolist() == [[False, True, False]]
  with pytest.raises(ValueError, match="min_ratio"):
    registers.find_outliers(patches, min_ratio=0.5)


def test_vision_mamba_norms_come_back_in_token_order():
  """Vision Mamba's norms are taken in its sequence order (CLS mid-sequence, registers
  spread): put back in [CLS, registers, patches] order, a planted patch is found where
  it is in the image."""
  from ssm.layers import MambaConfig
  from ssm.models import VimConfig, VisionMamba
  vim = nnx.jit(lambda: VisionMamba(VimConfig(
      image_size=28, patch_size=4, channels=1, d_model=32, n_layer=1, num_registers=2,
      num_classes=10, mamba=MambaConfig(d_state=4)), rngs=nnx.Rngs(0)))()
  x = images(2)
  x[0, 12:16, 20:24] *= 50  # patch (3, 5): index 26
  x[1, 0:4, 0:4] *= 50  # patch (0, 0): index 0
  norms = registers.forward(vim, x, batch_size=2)["norms"]
  assert norms.shape == (1, 2, 1 + 2 + 49)
  _, _, patches = registers.split_tokens(norms[-1], 2)
  mask, _ = registers.find_outliers(patches)
  assert [list(np.flatnonzero(m)) for m in mask] == [[26], [0]]


def test_attention_maps_equal_a_direct_computation(model):
  """The last layer's softmax(q k^T / sqrt(d_head)) from the block's own parameters,
  computed here from its input; the CLS row over the patches on the 7x7 grid, and
  the registers' rows."""
  x, H = jnp.asarray(images(3, seed=1)), 4

  @nnx.jit
  def direct(model, x):
    h, residual = model._tokens(x), None
    for layer in model.layers[:-1]:
      h, residual, _ = layer(h, residual)
    last = model.layers[-1]
    u = last.norm(h + residual)
    attn = last.mixer
    q = (u @ attn.q_proj.kernel[...] + attn.q_proj.bias[...]).reshape(3, 54, H, 8)
    k = (u @ attn.k_proj.kernel[...] + attn.k_proj.bias[...]).reshape(3, 54, H, 8)
    return jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8), -1)

  direct = np.asarray(direct(model, x))
  f = registers.forward(model, np.asarray(x))
  maps = registers.cls_attention(f["attention"], 4)
  assert maps.shape == (3, H, 7, 7)
  np.testing.assert_allclose(maps, direct[:, :, 0, 5:].reshape(3, H, 7, 7), atol=1e-6)
  to_patches, to_special = registers.register_attention(f["attention"], 4)
  assert to_patches.shape == (3, 4, H, 7, 7) and to_special.shape == (3, 4, H, 5)
  np.testing.assert_allclose(to_patches[:, 2], direct[:, :, 3, 5:].reshape(3, H, 7, 7), atol=1e-6)
  np.testing.assert_allclose(to_special[:, 2], direct[:, :, 3, :5], atol=1e-6)
  with pytest.raises(ValueError, match="square grid"):
    registers.cls_attention(np.zeros((1, 1, 8, 8)), 1)


def test_linear_probe():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 16)) * 3
  y = rng.integers(0, 3, 400)
  X = centres[y] + rng.normal(size=(400, 16))
  acc, ridge = registers.linear_probe(X[:300], y[:300], X[300:], y[300:])
  assert acc > 0.95 and ridge > 0
  shuffled, _ = registers.linear_probe(X[:300], rng.permutation(y[:300]), X[300:], y[300:])
  assert shuffled < 0.6  # labels the features do not predict: near chance (1/3)
  with pytest.raises(ValueError, match="matching"):
    registers.linear_probe(X[:300], y[:200], X[300:], y[300:])


def _script():
  spec = importlib.util.spec_from_file_location("registers_script",
                                                ROOT / "scripts" / "registers.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(not Path(FASHION).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_a_run_s_images_come_from_its_own_split():
  import ml_collections as mlc
  task = mlc.ConfigDict(dict(name="images", dataset="fashion_mnist", path=FASHION,
                             train_split="train[:30]", crop_padding=0, flip=False))
  images, labels, display = registers.task_images(task, "train", 30)
  assert images.shape == (30, 28, 28, 1) and labels.shape == (30,) and display.max() <= 1
  with pytest.raises(ValueError, match="has 30 images"):
    registers.task_images(task, "train", 31)


@pytest.mark.skipif(not Path(FASHION).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_analysis_of_transformers_checkpoints_through_load_hf(tmp_path, capsys):
  """A Dinov2WithRegistersModel and a ViTModel with random weights, saved with
  save_pretrained, analysed by the script with no network: every figure, a summary
  with the registers' and probes' entries; bad input is one line."""
  torch = require("torch")
  transformers = require("transformers")
  torch.manual_seed(0)
  small = dict(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=64)
  dino = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      **{k: v for k, v in small.items() if k != "intermediate_size"}, mlp_ratio=2,
      num_register_tokens=4))
  dino_plain = transformers.Dinov2Model(transformers.Dinov2Config(
      **{k: v for k, v in small.items() if k != "intermediate_size"}, mlp_ratio=2))
  plain = transformers.ViTModel(transformers.ViTConfig(**small))
  for name, m in (("dino", dino), ("dino-noreg", dino_plain), ("vit", plain)):
    m.save_pretrained(tmp_path / name)
  # DINOv2 without registers (facebook/dinov2-small's model type) imports exactly
  from ssm.convert import load_hf
  x = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    expected = dino_plain.eval()(torch.tensor(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  np.testing.assert_allclose(load_hf(tmp_path / "dino-noreg").features(x)["tokens"], expected,
                             atol=1e-4)
  out = tmp_path / "analysis"
  script = _script()
  assert script.main(["--model", str(tmp_path / "dino"), "--model", str(tmp_path / "vit"),
                      "--out", str(out), "--n", "4", "--probe-train", "40", "--probe-test",
                      "20", "--batch-size", "20", "--show", "1"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["dino"]["registers"] == 4 and summary["vit"]["registers"] == 0
  # the script's summary is the library's analysis of the same images, probes apart
  x, _, display = registers.dataset_images("fashion_mnist", "eval", 4, size=28, path=FASHION)
  for name in ("dino", "vit"):
    expected = registers.analyse_model(load_hf(tmp_path / name), x, display=display)["summary"]
    got = {k: v for k, v in summary[name].items() if not k.startswith("probe")}
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():  # None: no registers, no outliers to locate
      assert got[k] is None if v is None else got[k] == pytest.approx(v, rel=1e-5), k
  assert set(summary["dino"]) - set(summary["vit"]) == {"register_attention_to_special"}
  assert summary["dino"]["registers"] == 4 and summary["dino"]["layers"] == 2
  for s in summary.values():
    assert (s["probe_train_images"], s["probe_test_images"]) == (40, 20)
    assert s["probe_cls_ridge"] in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, 10, 100)
    assert s["probe_cls"] in [i / 20 for i in range(21)]  # a share of the 20 test images
  for png in ("norms", "outlier_fraction", "outliers", "cls_attention", "register_attention"):
    assert (out / f"{png}.png").stat().st_size > 1000
  capsys.readouterr()
  assert script.main(["--model", str(tmp_path / "vit"), "--out", str(out), "--image-size",
                      "30", "--probe-train", "0"]) == 2
  assert "not a multiple of the patch size 7" in capsys.readouterr().err


@pytest.fixture
def figures(monkeypatch):
  """{file name: Figure} of every figure ssm.registers saves (still written to disk)."""
  caught, save = {}, registers._save

  def keep(fig, path):
    caught[Path(path).name] = fig
    return save(fig, path)

  monkeypatch.setattr(registers, "_save", keep)
  return caught


def fake_results(outlier_layers=()):
  """Two models' results as analyse_model returns them (3 layers, 5 images, 4x4
  patches, the second with 2 registers); outliers planted in images 0 and 3 at the
  given layers."""
  rng = np.random.default_rng(0)
  results = {}
  for name, R in (("vit", 0), ("vit+reg", 2)):
    norms = rng.uniform(10, 20, (3, 5, 1 + R + 16))
    outliers = np.zeros((3, 5, 16), bool)
    for layer in outlier_layers:
      outliers[layer, 0, 5] = outliers[layer, 3, [1, 2]] = True
    results[name] = dict(registers=R, norms=norms, outliers=outliers, thresholds=[40.0] * 3,
                         outlier_fraction=[float(m.mean()) for m in outliers])
  return results


def test_register_figures_say_what_they_show(tmp_path, figures):
  """outlier_fraction.png: a tick per layer, a 0% floor, each model visible where the
  lines coincide, "none found" where there are none; outliers.png: a red box per
  outlier in the images shown, or "none found"; norms.png: the threshold in the legend."""
  display = np.random.default_rng(1).uniform(size=(5, 28, 28, 1))
  none = fake_results()
  registers.plot_outlier_fraction(none, tmp_path / "outlier_fraction.png")
  ax = figures["outlier_fraction.png"].axes[0]
  assert list(ax.get_xticks()) == [1, 2, 3] and ax.get_ylim() == (0, 1)
  assert [t.get_text() for t in ax.texts] == ["none found: no high-norm patch token\n"
                                              "in any model at any layer"]
  vit, reg = ax.get_lines()
  assert vit.get_marker() != reg.get_marker()
  assert list(vit.get_ydata()) == list(reg.get_ydata()) == [0, 0, 0]
  assert list(reg.get_xdata() - vit.get_xdata()) == pytest.approx([0.08] * 3)

  registers.plot_outliers(display, none, tmp_path / "outliers.png", n=4)
  fig = figures["outliers.png"]
  assert fig._suptitle.get_text() == "high-norm patch tokens\nat the last layer: none found"
  assert [fig.axes[i].get_ylabel() for i in (0, 4)] == ["vit\nnone found", "vit+reg\nnone found"]
  assert not any(ax.patches for ax in fig.axes)

  planted = fake_results(outlier_layers=(1, 2))
  registers.plot_outlier_fraction(planted, tmp_path / "outlier_fraction.png")
  ax = figures["outlier_fraction.png"].axes[0]
  assert not ax.texts and list(ax.get_lines()[0].get_ydata()) == [0, 3 / 80 * 100, 3 / 80 * 100]
  assert ax.get_ylim() == (0, pytest.approx(1.15 * 3.75))  # above 1%: the axis holds it
  registers.plot_outliers(display, planted, tmp_path / "outliers.png", n=2)
  fig = figures["outliers.png"]
  assert fig._suptitle.get_text() == "high-norm patch tokens\nat the last layer (boxed in red)"
  assert [len(ax.patches) for ax in fig.axes] == [1, 0, 1, 0]  # image 3 is not shown
  assert fig.axes[0].get_ylabel() == "vit\n1 boxed"
  assert {p.get_edgecolor() for ax in fig.axes for p in ax.patches} == {(1.0, 0.0, 0.0, 1.0)}

  registers.plot_norms(planted, tmp_path / "norms.png")
  legend = figures["norms.png"].axes[0].get_legend()
  assert [t.get_text() for t in legend.get_texts()] == ["patches", "CLS", "outlier threshold"]
