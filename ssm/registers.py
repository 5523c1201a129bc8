"""The register analysis of "Vision Transformers Need Registers" (Darcet et al., ICLR 2024)
on any ViT ssm can load: a trained ssm-train workdir, or an imported DINOv2 /
DINOv2-with-registers / ViT checkpoint (ssm.convert.load_hf).

Darcet et al.'s finding: large, long-trained ViTs write a few high-norm tokens into
low-information (background) patches, about 10x the norm of the others and a few
percent of the tokens, that hold global information and show as artifacts in the CLS
attention maps; a few register tokens take that role and the artifacts go. Here:

  forward         token norms of the residual stream after every block (L, N, T), the
                  last layer's attention (N, heads, T, T), CLS and mean-patch features
  find_outliers   the high-norm tokens among the patches: norm both above
                  `min_ratio` x the median patch norm and a robust z-score above `k` in
                  log norm (median + k * 1.4826 * MAD), or above a fixed `threshold`
                  (Darcet et al. use 150 on DINOv2 ViT-g's output)
  cls_attention   the CLS token's attention to the patches, per head, on the grid
  register_attention  each register's attention to the patches, per head, on the grid
  background_patches  where the outliers and CLS attention sit: background or object
  linear_probe    ridge-regression classifier on frozen features (the paper evaluates
                  registers by linear probing), the ridge chosen on a held-out fifth
  plot_*          the PNG figures; `analyse` runs it all for several models at once

Tokens are in ViT's order [CLS, registers, patches]; Vision Mamba models give norms
and probes (no attention maps). Shapes: N images, L layers, T = 1 + R + P tokens,
R registers, P = g * g patches, H heads.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ImageNet's channel statistics: the inputs DINOv2 and hub ViTs expect.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _is_vit(model):
  from ssm.models.vit import ViT
  return isinstance(model, ViT)


def forward(model, images_NHWC, batch_size=32):
  """The model's features, batch by batch, as numpy: norms (L, N, T) of the residual
  stream after each block (tokens in [CLS, registers, patches] order), attention (N,
  H, T, T) of the last layer (ViTs only), cls (N, D) and patches (N, D, the mean patch
  token) after the final norm."""
  graphdef, state = nnx.split(model)
  vit = _is_vit(model)

  @jax.jit
  def run(state, x):
    m = nnx.merge(graphdef, state)
    f = m.features(x, return_attention=True) if vit else m.features(x)
    out = dict(norms=f["token_norms"], cls=f["cls"], patches=f["patches"].mean(1))
    if vit:
      out["attention"] = f["attention"][-1]
    return out

  parts, n = [], len(images_NHWC)
  for i in range(0, n, batch_size):  # every batch padded to batch_size: one compilation
    x = np.asarray(images_NHWC[i:i + batch_size])
    pad = batch_size - len(x)
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    f = jax.tree.map(np.asarray, run(state, jnp.asarray(x)))
    parts.append({k: v[:, :len(x) - pad] if k == "norms" else v[:len(x) - pad]
                  for k, v in f.items()})
  out = {k: np.concatenate([p[k] for p in parts], axis=1 if k == "norms" else 0)
         for k in parts[0]}
  if not vit:  # Vision Mamba's norms are in sequence order: back to [CLS, registers, patches]
    from ssm.models.vim import layout
    R = model.config.num_registers
    order = layout(out["norms"].shape[-1] - 1 - R, R)
    out["norms"] = out["norms"][:, :, np.argsort(order)]
  return out


def split_tokens(x_NT, num_registers):
  """(cls (N,), registers (N, R), patches (N, P)) of per-token values."""
  return x_NT[..., 0], x_NT[..., 1:1 + num_registers], x_NT[..., 1 + num_registers:]


def find_outliers(norms_NP, *, k=5.0, min_ratio=2.0, threshold=None):
  """High-norm tokens among patch tokens' norms (N, P): a boolean mask and the
  threshold used. By default a token is an outlier when its norm is above both
  `min_ratio` times the median norm and exp(median + k * 1.4826 * MAD) of the log
  norms (a robust z-score: the bulk's own spread, whatever its scale); `threshold`
  fixes the norm instead."""
  norms = np.asarray(norms_NP, np.float64)
  if threshold is None:
    if k <= 0 or min_ratio < 1:
      raise ValueError(f"find_outliers: k {k} must be > 0 and min_ratio {min_ratio} >= 1")
    logs = np.log(np.maximum(norms, 1e-30))
    median = np.median(logs)
    mad = 1.4826 * np.median(np.abs(logs - median))
    threshold = float(np.exp(max(median + k * mad, median + np.log(min_ratio))))
  return norms > threshold, float(threshold)


def grid_of(num_patches):
  g = int(round(num_patches**0.5))
  if g * g != num_patches:
    raise ValueError(f"{num_patches} patches are not a square grid: pass square images")
  return g


def cls_attention(attention_NHTT, num_registers):
  """The CLS token's attention to the patches, (N, H, g, g): rows of the softmax, so a
  map sums with its attention to CLS and the registers to 1."""
  a = np.asarray(attention_NHTT)[:, :, 0, 1 + num_registers:]
  g = grid_of(a.shape[-1])
  return a.reshape(*a.shape[:2], g, g)


def register_attention(attention_NHTT, num_registers):
  """Each register's attention: to the patches (N, R, H, g, g) and to [CLS,
  registers] (N, R, H, 1 + R)."""
  a = np.asarray(attention_NHTT)[:, :, 1:1 + num_registers]  # (N, H, R, T)
  a = a.transpose(0, 2, 1, 3)
  g = grid_of(a.shape[-1] - 1 - num_registers)
  return (a[..., 1 + num_registers:].reshape(*a.shape[:3], g, g), a[..., :1 + num_registers])


def background_patches(display_NhwC, grid, level=0.05):
  """(N, grid * grid) True where a patch is background: its mean pixel (in [0, 1])
  within `level` of the image's darkest patch (Fashion-MNIST's black surround)."""
  x = np.asarray(display_NhwC, np.float64).mean(-1)
  N, h, w = x.shape
  if h % grid or w % grid:
    raise ValueError(f"{h}x{w} display images do not divide into a {grid}x{grid} grid")
  means = x.reshape(N, grid, h // grid, grid, w // grid).mean((2, 4)).reshape(N, -1)
  return means <= means.min(1, keepdims=True) + level


def linear_probe(train_X, train_y, test_X, test_y, *,
                 ridges=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, 10, 100),
                 seed=0):
  """Test accuracy of a linear classifier on frozen features: ridge regression of
  one-hot labels on standardised features (with a bias), argmax; the ridge (times the
  number of examples) chosen by accuracy on a held-out fifth of the training set, then
  refit on all of it. Returns (accuracy, ridge)."""
  train_X, test_X = np.asarray(train_X, np.float64), np.asarray(test_X, np.float64)
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  if len(train_X) < 10 or len(train_X) != len(train_y) or len(test_X) != len(test_y):
    raise ValueError(f"linear_probe: {len(train_X)} training features for {len(train_y)} labels "
                     f"and {len(test_X)} test features for {len(test_y)}: give matching "
                     "arrays, at least 10 training examples")
  classes = int(max(train_y.max(), test_y.max())) + 1
  mean, std = train_X.mean(0), train_X.std(0) + 1e-6

  def fit(X, y, ridge):
    X = np.concatenate([(X - mean) / std, np.ones((len(X), 1))], 1)
    Y = np.eye(classes)[y]
    reg = ridge * len(X) * np.eye(X.shape[1])
    reg[-1, -1] = 0  # no penalty on the bias
    return np.linalg.solve(X.T @ X + reg, X.T @ Y)

  def accuracy(W, X, y):
    X = np.concatenate([(X - mean) / std, np.ones((len(X), 1))], 1)
    return float(np.mean((X @ W).argmax(1) == y))

  idx = np.random.default_rng(seed).permutation(len(train_X))
  held, fit_on = idx[:len(idx) // 5], idx[len(idx) // 5:]
  ridge = max(ridges, key=lambda r: (accuracy(fit(train_X[fit_on], train_y[fit_on], r),
                                              train_X[held], train_y[held]), r))
  return accuracy(fit(train_X, train_y, ridge), test_X, test_y), float(ridge)


# --- figures --------------------------------------------------------------------

def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path):
  plt = _plt()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _show(ax, image):
  image = np.asarray(image)
  ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
  ax.set_xticks([])
  ax.set_yticks([])


def _overlay(ax, image, amap, alpha=0.6):
  """An attention map (g, g) upsampled over the image, per map min-max scaled."""
  _show(ax, image)
  h, w = np.asarray(image).shape[:2]
  amap = np.asarray(amap, np.float64)
  amap = (amap - amap.min()) / (np.ptp(amap) + 1e-12)
  ax.imshow(amap, cmap="inferno", alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
            interpolation="nearest")


def plot_norms(results, path, layers=None):
  """Per layer: histograms of the token norms (patches, CLS, registers apart), one
  row per model, the outlier threshold dashed."""
  plt = _plt()
  names = list(results)
  n_layer = max(r["norms"].shape[0] for r in results.values())
  layers = layers or sorted({round(x) for x in np.linspace(0, n_layer - 1, min(n_layer, 6))})
  fig, axes = plt.subplots(len(names), len(layers), figsize=(2.6 * len(layers), 2.3 * len(names)),
                           squeeze=False)
  for row, name in zip(axes, names):
    r = results[name]
    for ax, layer in zip(row, layers):
      if layer >= r["norms"].shape[0]:
        ax.axis("off")
        continue
      cls, regs, patches = split_tokens(r["norms"][layer], r["registers"])
      bins = np.linspace(0, r["norms"][layer].max() * 1.02, 40)
      ax.hist(patches.ravel(), bins, color="tab:blue", label="patches")
      ax.hist(cls.ravel(), bins, color="tab:green", alpha=0.8, label="CLS")
      if regs.size:
        ax.hist(regs.ravel(), bins, color="tab:red", alpha=0.8, label="registers")
      ax.axvline(r["thresholds"][layer], color="k", ls="--", lw=1, label="outlier threshold")
      ax.set_yscale("log")
      ax.set_title(f"{name}\nlayer {layer + 1}" if layer == layers[0] else f"layer {layer + 1}",
                   fontsize=8)
      ax.tick_params(labelsize=7)
    row[0].legend(fontsize=6)
  fig.supxlabel("token norm (residual stream after the block)", fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_outlier_fraction(results, path):
  """The fraction of patch tokens that are outliers, per layer, one line per model:
  each model with its own marker and nudged sideways, so that equal lines (all at 0%
  where there are none) stay visible; "none found" written on it then."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.4))
  n_layer = max(len(r["outlier_fraction"]) for r in results.values())
  percent = {name: 100 * np.asarray(r["outlier_fraction"]) for name, r in results.items()}
  for i, (name, y) in enumerate(percent.items()):
    nudge = 0.08 * (i - (len(percent) - 1) / 2)
    ax.plot(np.arange(1, len(y) + 1) + nudge, y, "osD^v<>p"[i % 8] + "-", ms=6, mfc="none",
            label=name, clip_on=False)  # markers at 0% whole
  top = max(float(y.max()) for y in percent.values())
  if top == 0:
    ax.text(0.5, 0.5, "none found: no high-norm patch token\nin any model at any layer",
            transform=ax.transAxes, ha="center", va="center", fontsize=9)
  ax.set_xticks(range(1, n_layer + 1))
  ax.set_ylim(0, max(1.0, 1.15 * top))  # a fraction: never below 0%
  ax.set_xlabel("layer")
  ax.set_ylabel("high-norm patch tokens (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  return _save(fig, path)


def plot_outliers(display, results, path, n=6):
  """The first `n` images per model with their high-norm patches (last layer) boxed."""
  plt = _plt()
  names = list(results)
  fig, axes = plt.subplots(len(names), n, figsize=(1.6 * n, 1.8 * len(names)), squeeze=False)
  found = 0
  for row, name in zip(axes, names):
    r = results[name]
    mask = r["outliers"][-1]
    g = grid_of(mask.shape[-1])
    for i, ax in enumerate(row):
      _show(ax, display[i])
      h = np.asarray(display[i]).shape[0] / g
      for p in np.flatnonzero(mask[i]):
        y, x = divmod(int(p), g)
        ax.add_patch(plt.Rectangle((x * h - 0.5, y * h - 0.5), h, h, fill=False, color="red",
                                   lw=1.5))
    shown = int(mask[:n].sum())
    found += shown
    note = (f"{shown} boxed" if shown else
            f"none here ({int(mask.sum())} in all)" if mask.any() else "none found")
    row[0].set_ylabel(f"{name}\n{note}", fontsize=7)
  fig.suptitle("high-norm patch tokens\nat the last layer" +
               (" (boxed in red)" if found else ": none found"), fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_cls_attention(display, results, path, n=4):
  """Per model and image: the image, then the last layer's CLS attention per head and
  their mean, over the image (each map scaled to its own range)."""
  plt = _plt()
  rows = [(name, i) for name, r in results.items() if "cls_attention" in r for i in range(n)]
  if not rows:
    return None
  H = max(results[name]["cls_attention"].shape[1] for name, _ in rows)
  fig, axes = plt.subplots(len(rows), H + 2, figsize=(1.5 * (H + 2), 1.6 * len(rows)),
                           squeeze=False)
  for ax_row, (name, i) in zip(axes, rows):
    maps = results[name]["cls_attention"][i]
    _show(ax_row[0], display[i])
    ax_row[0].set_ylabel(name if i == 0 else "", fontsize=7)
    for h, ax in enumerate(ax_row[1:]):
      if h < len(maps):
        _overlay(ax, display[i], maps[h])
      elif h == H:
        _overlay(ax, display[i], maps.mean(0))
      else:
        ax.axis("off")
      if i == 0 and name == rows[0][0]:
        ax.set_title("mean" if h == H else f"head {h + 1}", fontsize=7)
  fig.suptitle("CLS attention of the last layer", fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_register_attention(display, results, path, n=4):
  """Per model with registers: each register's last-layer attention (mean over
  heads) over the image, and in the title how much of it goes to CLS and registers."""
  plt = _plt()
  names = [name for name, r in results.items() if r.get("register_attention") is not None]
  if not names:
    return None
  R = max(results[name]["registers"] for name in names)
  fig, axes = plt.subplots(n * len(names), R + 1, figsize=(1.6 * (R + 1), 1.7 * n * len(names)),
                           squeeze=False)
  for k, name in enumerate(names):
    patches, special = results[name]["register_attention"]
    for i in range(n):
      row = axes[k * n + i]
      _show(row[0], display[i])
      row[0].set_ylabel(name if i == 0 else "", fontsize=7)
      for j, ax in enumerate(row[1:]):
        if j >= patches.shape[1]:
          ax.axis("off")
          continue
        _overlay(ax, display[i], patches[i, j].mean(0))
        ax.set_title(f"reg {j + 1}: {100 * special[i, j].mean(0).sum():.0f}% to CLS+reg",
                     fontsize=6)
  fig.suptitle("what the registers attend to (last layer, mean over heads)", fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


# --- the whole analysis -------------------------------------------------------------

def analyse_model(model, images, *, k=5.0, min_ratio=2.0, threshold=None, batch_size=32,
                  display=None):
  """Norms, outliers per layer, attention maps (ViTs) of one model on `images`; with
  `display` (the same images in [0, 1]) also where they sit: the share on background
  patches of the outliers, of each image's highest-norm patch and of CLS attention,
  beside the share of background patches itself."""
  f = forward(model, images, batch_size)
  R = model.config.num_registers
  r = dict(registers=R, norms=f["norms"], outliers=[], thresholds=[], outlier_fraction=[],
           cls=f["cls"], patches=f["patches"])
  for layer in f["norms"]:
    cls, regs, patches = split_tokens(layer, R)
    mask, t = find_outliers(patches, k=k, min_ratio=min_ratio, threshold=threshold)
    r["outliers"].append(mask)
    r["thresholds"].append(t)
    r["outlier_fraction"].append(float(mask.mean()))
  r["outliers"] = np.stack(r["outliers"])
  last_cls, last_regs, last_patches = split_tokens(f["norms"][-1], R)
  r["summary"] = dict(
      registers=R, layers=int(f["norms"].shape[0]),
      outlier_fraction_last=r["outlier_fraction"][-1],
      outlier_fraction_max=max(r["outlier_fraction"]),
      outlier_layer_max=int(np.argmax(r["outlier_fraction"])) + 1,
      norm_patch_median_last=float(np.median(last_patches)),
      norm_patch_max_last=float(last_patches.max()),
      norm_cls_median_last=float(np.median(last_cls)),
      norm_register_median_last=float(np.median(last_regs)) if R else None)
  background = None
  if display is not None:
    background = background_patches(display, grid_of(last_patches.shape[-1]))
    top_patch = last_patches.argmax(-1)
    mask = r["outliers"][-1]
    r["summary"].update(
        background_patch_share=float(background.mean()),
        background_share_of_top_norm_patch=float(
            background[np.arange(len(top_patch)), top_patch].mean()),
        background_share_of_outliers=float(background[mask].mean()) if mask.any() else None)
  if "attention" in f:
    r["cls_attention"] = cls_attention(f["attention"], R)
    r["register_attention"] = register_attention(f["attention"], R) if R else None
    # how peaked CLS attention is: the share of its patch attention on the top 5% of patches
    a = r["cls_attention"].reshape(*r["cls_attention"].shape[:2], -1)
    a = a / a.sum(-1, keepdims=True)
    top = max(1, a.shape[-1] // 20)
    r["summary"]["cls_attention_top5pct"] = float(np.sort(a, -1)[..., -top:].sum(-1).mean())
    if background is not None:
      r["summary"]["cls_attention_on_background"] = float(
          (a * background[:, None]).sum(-1).mean())
    if R:
      r["summary"]["register_attention_to_special"] = float(
          r["register_attention"][1].sum(-1).mean())
  return r


def analyse(models, images, display, out_dir, *, probe=None, k=5.0, min_ratio=2.0,
            threshold=None, batch_size=32, n_show=4):
  """The analysis of several models ({name: (model, images)} or {name: model} with
  shared `images`) on the same pictures `display` (N, h, w, C in [0, 1]): the PNGs in
  `out_dir` (norms.png, outlier_fraction.png, outliers.png, cls_attention.png,
  register_attention.png) and summary.json. `probe` ({name: (train images, train
  labels, test images, test labels)}, or one tuple for all) adds linear-probe accuracy
  on the CLS token and on CLS + mean patch. Returns (summary, paths, per-model results:
  norms, outlier masks, attention maps)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  results = {}
  for name, entry in models.items():
    model, x = entry if isinstance(entry, tuple) else (entry, images)
    results[name] = analyse_model(model, x, k=k, min_ratio=min_ratio, threshold=threshold,
                                  batch_size=batch_size, display=display)
    if probe is not None:
      data = probe[name] if isinstance(probe, dict) else probe
      train_x, train_y, test_x, test_y = data
      tr, te = forward(model, train_x, batch_size), forward(model, test_x, batch_size)
      s = results[name]["summary"]
      s["probe_cls"], s["probe_cls_ridge"] = linear_probe(tr["cls"], train_y, te["cls"], test_y)
      s["probe_cls_patch"], _ = linear_probe(np.concatenate([tr["cls"], tr["patches"]], 1),
                                             train_y,
                                             np.concatenate([te["cls"], te["patches"]], 1), test_y)
      s["probe_train_images"], s["probe_test_images"] = len(train_y), len(test_y)
  n_show = min(n_show, len(display))
  paths = [plot_norms(results, out_dir / "norms.png"),
           plot_outlier_fraction(results, out_dir / "outlier_fraction.png"),
           plot_outliers(display, results, out_dir / "outliers.png", n=min(6, len(display),
                                                                           max(n_show, 1))),
           plot_cls_attention(display, results, out_dir / "cls_attention.png", n=n_show),
           plot_register_attention(display, results, out_dir / "register_attention.png",
                                   n=n_show)]
  summary = {name: r["summary"] for name, r in results.items()}
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
  return summary, [p for p in paths if p is not None], results


# --- models and images by name ------------------------------------------------------

def load(spec, *, best=True):
  """A model from an ssm-train workdir (its best checkpoint, or the newest) or a Hugging
  Face checkpoint (a save_pretrained directory or a hub name). Returns (model, run
  config or None)."""
  path = Path(spec)
  if (path / "checkpoints").is_dir():
    from ssm.train.checkpoint import load_model
    try:
      model, config, _ = load_model(path, best=best)
    except (FileNotFoundError, KeyError, ValueError):
      model, config, _ = load_model(path)  # no best checkpoint recorded: the newest
    return model, config
  from ssm.convert import load_hf
  return load_hf(spec), None


def task_images(task, split, n, offset=0):
  """`n` images of a run's task (its config.task) preprocessed as its evaluation is,
  their labels, and the same images in [0, 1] for display."""
  from ssm.data.images import Images
  fields = {k: v for k, v in task.to_dict().items() if k != "name"}
  pipeline = Images.from_config(fields, batch_size=n, seed=0)
  return _take(pipeline, split, n, offset)


def dataset_images(dataset, split, n, *, size, channels=3, path="", offset=0,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """`n` images of a dataset (fashion_mnist from `path` = Debian's files, or tfds)
  resized to `size`, grey made `channels`-channel, normalised by `mean` / `std`
  (ImageNet's: what hub ViTs and DINOv2 expect); labels; display images in [0, 1]."""
  from ssm.data.images import Images
  pipeline = Images(batch_size=n, dataset=dataset, path=path, image_size=0, augment=False)
  records = pipeline.records(split)
  raw, labels = [], []
  for i in range(offset, offset + n):
    r = records[i]
    image = np.asarray(r["image"])
    image = image[..., None] if image.ndim == 2 else image
    raw.append(_resize(image, size))
    labels.append(int(r["label"]))
  display = np.stack(raw).astype(np.float32) / 255
  if display.shape[-1] != channels:
    display = np.repeat(display[..., :1], channels, axis=-1)
  m, s = np.asarray(mean[:channels], np.float32), np.asarray(std[:channels], np.float32)
  return (display - m) / s, np.asarray(labels), display


def _resize(image, size):
  if image.shape[0] == size and image.shape[1] == size:
    return image
  from PIL import Image
  mode = image[..., 0] if image.shape[-1] == 1 else image
  out = np.asarray(Image.fromarray(mode).resize((size, size), Image.BICUBIC))
  return out[..., None] if out.ndim == 2 else out


def _take(pipeline, split, n, offset):
  records = pipeline.records(split)
  if offset + n > len(records):
    raise ValueError(f"the {split} split has {len(records)} images; asked for images "
                     f"{offset} to {offset + n}: ask for fewer")
  examples = [pipeline.example(records[i], None) for i in range(offset, offset + n)]
  images = np.stack([e["images"] for e in examples])
  labels = np.asarray([int(e["labels"]) for e in examples])
  mean = np.asarray(pipeline.info["mean"], np.float32)
  std = np.asarray(pipeline.info["std"], np.float32)
  return images, labels, np.clip(images * std + mean, 0, 1)
