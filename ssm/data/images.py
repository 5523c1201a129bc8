"""Image classification data for ViT and Vision Mamba, and the same images as
pixel sequences for language models (sequential / permuted MNIST and CIFAR).

Examples come from a tfds dataset (read as ArrayRecord without TensorFlow) or
from local copies of the dataset's files (`path`: MNIST-format IDX files, e.g.
Debian's dataset-fashion-mnist, or CIFAR-10's binary batches). Either way a
record is {"image": uint8 (H, W, C), "label": int}, as tfds gives it.

Example i of the training stream is the i-th of a seeded shuffle, epoch after
epoch, augmented with a generator seeded by i: any process can make any row, and
the pipeline position is the batch index. Augmentation is the usual light one:
pad-and-crop + horizontal flip at native size; random-resized crop + flip when
`image_size` asks for resizing (ImageNet), with resize + centre crop for eval.
"""

import dataclasses
import functools
import gzip
import os
import re
import sys

import grain
import numpy as np

from ssm.data.base import Pipeline

# Native size, classes, per-channel mean/std (of the training set, in [0, 1]), and
# whether a horizontal flip keeps the class (it does not for digits).
# The split evaluated on: tfds' imagenet2012 test split has no labels (all -1).
DATASETS = {
    "mnist": dict(size=28, channels=1, classes=10, mean=(0.1307,), std=(0.3081,), flip=False,
                  files="idx", eval_split="test"),
    "fashion_mnist": dict(size=28, channels=1, classes=10, mean=(0.2860,), std=(0.3530,),
                          flip=True, files="idx", eval_split="test"),
    "cifar10": dict(size=32, channels=3, classes=10, mean=(0.4914, 0.4822, 0.4465),
                    std=(0.2470, 0.2435, 0.2616), flip=True, files="cifar", eval_split="test"),
    "imagenet2012": dict(size=0, channels=3, classes=1000, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225), flip=True, files="",
                         eval_split="validation"),
}
DEBIAN_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}


@dataclasses.dataclass(frozen=True)
class Images(Pipeline):
  batch_size: int
  seed: int = 0
  dataset: str = "fashion_mnist"
  path: str = ""  # local files instead of tfds (mnist, fashion_mnist, cifar10)
  data_dir: str = ""
  download: bool = False
  train_split: str = "train"  # tfds' syntax, slices too: "train[:10000]" (local files as well)
  eval_split: str = ""  # "": the dataset's (DATASETS)
  image_size: int = 0  # 0: the native size; else resize (required for imagenet2012)
  crop_padding: int = 2  # pad-and-crop at native size (0: off); CIFAR recipes use 4
  crop_scale: float = 0.35  # smallest area fraction of random-resized crops
  flip: bool | None = None  # None: the dataset's default (not for digits)
  augment: bool = True
  as_sequence: bool = False  # pixels in raster order as tokens 0..255, for LMs
  permute: bool = False  # with as_sequence: one fixed random pixel order (pMNIST)
  threads: int = 2

  bits_per_byte = False


  def __post_init__(self):
    if self.dataset not in DATASETS:
      raise ValueError(f"task (images): unknown dataset {self.dataset!r}; known: "
                       f"{sorted(DATASETS)}")
    if not self.size:
      raise ValueError(f"task (images): {self.dataset} images vary in size; set "
                       "task.image_size (e.g. 224)")
    if self.permute and not self.as_sequence:
      raise ValueError("task (images): permute=True needs as_sequence=True")

  # --- what the models need -------------------------------------------------
  @property
  def info(self):
    return DATASETS[self.dataset]

  @property
  def size(self):
    return self.image_size or self.info["size"]

  @property
  def num_classes(self):
    return self.info["classes"]

  @property
  def kind(self):
    return "lm" if self.as_sequence else "image"

  @property
  def seq_len(self):
    return self.size * self.size * self.info["channels"]

  vocab_size = 256  # pixel values as tokens (classes are predicted as tokens 0..C-1)

  # --- the stream -------------------------------------------------------------
  def records(self, split):
    """A random-access source of {"image", "label"} records."""
    name = {"train": self.train_split,
            "eval": self.eval_split or self.info["eval_split"]}[split]
    if self.path:
      return local_records(self.dataset, self.path, name)
    from ssm.data import tfds_source  # noqa: PLC0415
    return grain.MapDataset.source(
        tfds_source.data_source(self.dataset, name, self.data_dir, self.download))

  def batches(self, split, rows):
    examples = self.records(split)
    if split == "train":
      examples = examples.shuffle(seed=self.seed).repeat()
      examples = examples.random_map(lambda r, rng: self.example(r, rng), seed=self.seed)
    else:
      examples = examples.repeat().map(lambda r: self.example(r, None))
    B, b = self.batch_size, rows.stop - rows.start
    # Row r of global batch i is example i * B + r, whichever process makes it.
    local = grain.MapDataset.range(sys.maxsize // B).map(
        lambda j: examples[(j // b) * B + rows.start + j % b])
    # Threads make examples (decode, augment) up to two batches ahead.
    return local.to_iter_dataset(
        grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=2 * b)).batch(b)

  def example(self, record, rng):
    """Augments (rng given) or resizes for eval; then normalises, or makes a pixel
    sequence."""
    image, label = np.asarray(record["image"]), int(record["label"])
    if not 0 <= label < self.num_classes:
      raise ValueError(f"task (images): a {self.dataset} record has label {label}, outside "
                       f"[0, {self.num_classes}); is the split labelled?")
    if image.ndim == 2:
      image = image[..., None]
    augment = rng is not None and self.augment
    if self.image_size and (augment or image.shape[:2] != (self.size, self.size)):
      image = (random_resized_crop(image, self.size, self.crop_scale, rng) if augment
               else resize_centre_crop(image, self.size))
    elif augment and self.crop_padding:
      image = pad_and_crop(image, self.crop_padding, rng)
    if augment and (self.info["flip"] if self.flip is None else self.flip) and rng.random() < .5:
      image = image[:, ::-1]
    if self.as_sequence:
      return self._sequence(image, label)
    mean, std = (np.asarray(x, np.float32) for x in (self.info["mean"], self.info["std"]))
    return dict(images=(image.astype(np.float32) / 255 - mean) / std,
                labels=np.int32(label))

  def _sequence(self, image, label):
    pixels = image.reshape(-1).astype(np.int32)
    if self.permute:  # one fixed order (seed 0), whatever the run's seed, as pMNIST
      pixels = pixels[_permutation(pixels.size)]
    labels = np.zeros_like(pixels)
    labels[-1] = label  # classify at the last pixel
    mask = np.zeros(pixels.shape, np.float32)
    mask[-1] = 1
    return dict(inputs=pixels, labels=labels, loss_mask=mask)


@functools.cache
def _permutation(n):
  return np.random.default_rng(0).permutation(n)


# --- augmentation ---------------------------------------------------------------
def pad_and_crop(image, pad, rng):
  H, W, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  y, x = rng.integers(0, 2 * pad + 1, 2)
  return padded[y:y + H, x:x + W]


def random_resized_crop(image, size, min_scale, rng, ratio=(3 / 4, 4 / 3)):
  """Inception-style crop: a random area fraction in [min_scale, 1] and aspect
  ratio in `ratio`, resized to size × size."""
  H, W, _ = image.shape
  for _ in range(10):
    area = H * W * rng.uniform(min_scale, 1)
    aspect = np.exp(rng.uniform(*np.log(ratio)))
    h, w = round(np.sqrt(area / aspect)), round(np.sqrt(area * aspect))
    if 0 < h <= H and 0 < w <= W:
      y, x = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
      return _resize(image[y:y + h, x:x + w], size, size)
  return resize_centre_crop(image, size)


def resize_centre_crop(image, size, crop_fraction=0.875):
  """Shorter side to size / crop_fraction, then the centre size × size."""
  H, W, _ = image.shape
  scale = size / crop_fraction / min(H, W)
  h, w = max(size, round(H * scale)), max(size, round(W * scale))
  image = _resize(image, h, w)
  y, x = (h - size) // 2, (w - size) // 2
  return image[y:y + size, x:x + size]


def _resize(image, h, w):
  from PIL import Image  # noqa: PLC0415
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = np.asarray(pil.resize((w, h), Image.BICUBIC))
  return out.reshape(h, w, image.shape[-1])


# --- local files ------------------------------------------------------------------
def local_records(dataset, path, split):
  fmt = DATASETS[dataset]["files"]
  if not fmt:
    raise ValueError(f"task (images): {dataset} has no local-file reader; prepare it "
                     f"with tfds (`tfds build {dataset} --file_format=array_record`, with "
                     "its files in the manual dir) and set task.data_dir")
  if not os.path.isdir(path):
    package = DEBIAN_PACKAGES.get(dataset)
    hint = f" (Debian: `apt-get install {package}` puts them in /usr/share/datasets/)" \
        if package else ""
    raise ValueError(f"task (images): no directory {os.path.abspath(path)} with the "
                            f"{dataset} files{hint}; or unset task.path to use tfds")
  name, bounds = _parse_split(split)
  images, labels = (_idx if fmt == "idx" else _cifar)(path, name)
  part = slice(*(_bound(b, len(labels)) for b in bounds)) if bounds else slice(None)
  return grain.MapDataset.source([dict(image=i, label=l)
                                  for i, l in zip(images[part], labels[part])])


def _parse_split(split):
  """tfds' split syntax, which the local readers share: "train", "train[:10000]",
  "train[10%:]", "test[-500:]" -> (name, (start, stop) or None)."""
  match = re.fullmatch(r"(\w+)(?:\[((?:-?\d+%?)?):((?:-?\d+%?)?)\])?", split)
  if match is None:
    raise ValueError(f"task (images): split {split!r}: expected a name with an optional "
                     "slice, as tfds takes them: 'train', 'train[:10000]', 'train[:20%]'")
  name, start, stop = match.groups()
  return name, None if start is None else (start, stop)


def _bound(text, n):
  if not text:
    return None
  return round(int(text[:-1]) * n / 100) if text.endswith("%") else int(text)


def _idx(path, split):
  """MNIST-format files: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise ValueError(f"task (images): local IDX files have splits train and test, not {split!r}")
  arrays = []
  for kind in ("images-idx3", "labels-idx1"):
    name = os.path.join(path, f"{prefix}-{kind}-ubyte")
    name = name if os.path.exists(name) else name + ".gz"
    if not os.path.exists(name):
      raise ValueError(f"task (images): {name} not found")
    with (gzip.open if name.endswith(".gz") else open)(name, "rb") as f:
      data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, ">u4", ndim, 4)
    arrays.append(np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape))
  images, labels = arrays
  return images[..., None], labels


def _cifar(path, split):
  """CIFAR-10's binary version: data_batch_{1..5}.bin and test_batch.bin, each row a
  label byte then 3072 bytes of CHW pixels."""
  names = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)],
           "test": ["test_batch.bin"]}.get(split)
  if names is None:
    raise ValueError(f"task (images): local CIFAR-10 files have splits train and test, "
                     f"not {split!r}")
  rows = []
  for n in names:
    file = os.path.join(path, n)
    if not os.path.exists(file):
      raise ValueError(f"task (images): {file} not found (CIFAR-10 binary version)")
    rows.append(np.fromfile(file, np.uint8).reshape(-1, 3073))
  rows = np.concatenate(rows)
  return rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rows[:, 0]
