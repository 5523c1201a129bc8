"""ssm.data pipelines: byte-level text and images from local files and (mocked)
tfds datasets, their defining properties, exact resume from a saved position,
disjoint process slices that make the global batch, errors, and real training
steps through the loop. The generated tasks are in test_tasks.py."""

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from ssm.data import make_pipeline
from ssm.data.images import Images
from ssm.data.text import BOS, SHAKESPEARE, ByteText
from ssm.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
# Debian's dataset-fashion-mnist (DESIGN.md); the Shakespeare corpus ships in ssm/data.
FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(
    not os.path.isdir(FASHION) and not os.environ.get("CI"),
    reason="apt-get install dataset-fashion-mnist")


def take(pipeline, n, split="train", rows=None, state=None):
  it = iter(pipeline.batches(split, rows or slice(0, pipeline.batch_size)))
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)], it


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def pipelines(tmp_path):
  """One pipeline of each kind, small."""
  text = tmp_path / "docs.txt"
  text.write_text("\n\n".join(f"document {i}: " + "abc" * i for i in range(1, 40)))
  out = dict(
      synthetic=make_pipeline(dict(name="mqar", vocab_size=64, seq_len=32, num_kv_pairs=4), 4, 0),
      text=ByteText(seq_len=24, batch_size=4, path=str(text), doc_separator="\n\n"))
  if os.path.isdir(FASHION):
    out["images"] = Images(batch_size=4, path=FASHION, threads=2)
  return out


# --- byte-level text ------------------------------------------------------------
def test_text_rows_are_the_file_bytes_in_order_with_resets_at_document_starts():
  corpus = SHAKESPEARE.read_bytes()
  t = ByteText(seq_len=200, batch_size=4, path=str(SHAKESPEARE), doc_separator="\n\n")
  docs = set(corpus[:int(len(corpus) * 0.9)].split(b"\n\n"))
  (batch, *_), _ = take(t, 3)
  inputs, labels = batch["inputs"], batch["labels"]
  assert inputs.shape == (4, 200) and inputs.dtype == np.int32
  np.testing.assert_array_equal(inputs[:, 1:], labels[:, :-1])  # next-byte labels
  np.testing.assert_array_equal(batch["reset"], inputs == BOS)
  np.testing.assert_array_equal(batch["loss_mask"], labels != BOS)  # bytes only: bits/byte
  for row in np.concatenate([inputs, labels[:, -1:]], 1):
    # Split at BOS: whole documents inside the row, part of one at either edge.
    pieces = bytes(np.where(row == BOS, 0, row).astype(np.uint8)).split(b"\0")
    if len(pieces) == 1:  # inside one long document
      assert any(pieces[0] in d for d in docs)
      continue
    first, *whole, last = pieces
    assert all(piece in docs for piece in whole)
    assert any(d.endswith(first) for d in docs) and any(d.startswith(last) for d in docs)
  assert batch["reset"].any()


def test_text_train_and_eval_are_the_two_parts_of_the_file():
  corpus = SHAKESPEARE.read_bytes()
  cut = int(len(corpus) * 0.9)
  t = ByteText(seq_len=512, batch_size=2, path=str(SHAKESPEARE), shuffle=False)
  ((train,), _), ((eval_,), _) = take(t, 1), take(t, 1, "eval")
  as_bytes = lambda row: bytes(row[row != BOS].astype(np.uint8))
  assert as_bytes(train["inputs"][0]) == corpus[:511]
  assert as_bytes(eval_["inputs"][0]) == corpus[cut:cut + 511]


def test_text_epochs_are_reshuffled_and_cover_every_document(tmp_path):
  docs = [f"<{i:03d}>".encode() for i in range(50)]
  path = tmp_path / "d.txt"
  path.write_bytes(b"|".join(docs))
  t = ByteText(seq_len=59, batch_size=1, path=str(path), doc_separator="|", eval_fraction=0)
  batches, _ = take(t, 10)  # 10 rows of 60 tokens = two epochs of 50 six-token documents
  stream = np.concatenate([np.append(b["inputs"][0], b["labels"][0, -1]) for b in batches])
  seen = bytes(np.where(stream == BOS, ord("|"), stream).astype(np.uint8)).split(b"|")[1:]
  first, second = seen[:50], seen[50:]
  assert sorted(first) == sorted(second) == sorted(docs)  # every document once an epoch
  assert first != docs and first != second  # shuffled, differently each epoch


# --- images -----------------------------------------------------------------------
@needs_fashion
def test_fashion_mnist_local_files_are_the_dataset():
  train, test = (Images(batch_size=1, path=FASHION).records(s) for s in ("train", "eval"))
  assert (len(train), len(test)) == (60000, 10000)
  record = train[0]
  assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
  labels = np.array([test[i]["label"] for i in range(len(test))])
  assert np.bincount(labels).tolist() == [1000] * 10  # Fashion-MNIST's balanced test set


@needs_fashion
def test_local_splits_take_tfds_slices():
  full = Images(batch_size=1, path=FASHION).records("train")
  part = Images(batch_size=1, path=FASHION, train_split="train[10%:-7]").records("train")
  assert len(part) == 60000 - 6000 - 7
  for i in (0, len(part) - 1):
    assert np.array_equal(part[i]["image"], full[6000 + i]["image"])
  with pytest.raises(ValueError, match="as tfds takes them"):
    Images(batch_size=1, path=FASHION, train_split="train[:ten]").records("train")


def test_split_slices_read_as_tfds_does():
  from ssm.data.images import _bound, _parse_split
  assert _parse_split("train") == ("train", None)
  for split, want in [("train[:1000]", slice(0, 1000)), ("test[-500:]", slice(9500, 10000)),
                      ("train[10%:20%]", slice(1000, 2000)), ("train[:]", slice(0, 10000))]:
    name, bounds = _parse_split(split)
    got = range(10000)[slice(*(_bound(b, 10000) for b in bounds))]
    assert got == range(10000)[want], split
  for bad in ("train[-%:]", "train[1:2:3]", "train[", ""):
    with pytest.raises(ValueError, match="as tfds takes them"):
      _parse_split(bad)


@needs_fashion
def test_images_eval_is_normalised_and_train_is_augmented():
  p = Images(batch_size=16, path=FASHION, threads=1)
  raw = p.records("eval")
  (batch,), _ = take(p, 1, "eval")
  want = (np.stack([raw[i]["image"] for i in range(16)]) / 255 - 0.2860) / 0.3530
  np.testing.assert_allclose(batch["images"], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(batch["labels"], [raw[i]["label"] for i in range(16)])
  # Training examples: crops shift the image, flips mirror it; never other pixels.
  rng = np.random.default_rng(0)
  image = raw[0]["image"]
  outs = [p.example(raw[0], rng)["images"] for _ in range(20)]
  normal = lambda x: (x / 255 - 0.2860) / 0.3530
  candidates = []
  for dy in range(-2, 3):
    for dx in range(-2, 3):
      shifted = np.roll(np.pad(image, ((2, 2), (2, 2), (0, 0))), (dy, dx), (0, 1))[2:-2, 2:-2]
      candidates += [normal(shifted.astype(np.float32)), normal(shifted[:, ::-1].astype(np.float32))]
  for out in outs:
    assert any(np.allclose(out, c, atol=1e-5) for c in candidates)
  assert len({o.tobytes() for o in outs}) > 5


@needs_fashion
def test_pixel_sequences_classify_at_the_last_pixel():
  p = Images(batch_size=4, path=FASHION, as_sequence=True, permute=True, augment=False)
  (batch,), _ = take(p, 1, "eval")
  test = p.records("eval")
  assert batch["inputs"].shape == (4, 784)
  np.testing.assert_array_equal(batch["labels"][:, -1], [test[i]["label"] for i in range(4)])
  assert batch["loss_mask"].sum() == 4 and (batch["loss_mask"][:, -1] == 1).all()
  # One fixed pixel order for every example.
  order = np.random.default_rng(0).permutation(784)
  np.testing.assert_array_equal(batch["inputs"][0], test[0]["image"].reshape(-1)[order])


def test_resized_crops_for_imagenet_sized_images():
  from ssm.data.images import random_resized_crop, resize_centre_crop
  image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
  assert resize_centre_crop(image, 224).shape == (224, 224, 3)
  assert random_resized_crop(image, 224, 0.35, np.random.default_rng(1)).shape == (224, 224, 3)


# --- tfds datasets (mocked) ----------------------------------------------------------
@pytest.mark.parametrize("dataset,size", [("mnist", 28), ("fashion_mnist", 28),
                                          ("cifar10", 32), ("imagenet2012", 64)])
def test_tfds_image_datasets(dataset, size):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    p = Images(batch_size=4, dataset=dataset, image_size=64 if size == 64 else 0, threads=1)
    (a, b), _ = take(p, 2)
    (e,), _ = take(p, 1, "eval")
  channels = 1 if "mnist" in dataset else 3
  assert a["images"].shape == e["images"].shape == (4, size, size, channels)
  assert a["images"].dtype == np.float32 and a["labels"].dtype == np.int32
  assert (a["labels"] < p.num_classes).all()
  assert not np.array_equal(a["images"], b["images"])


@pytest.mark.parametrize("dataset", ["tiny_shakespeare", "pg19", "lm1b"])
def test_tfds_text_datasets(dataset):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    t = ByteText(seq_len=32, batch_size=2, dataset=dataset,
                 eval_split="test" if dataset == "lm1b" else "validation")
    (a,), _ = take(t, 1)
    (e,), _ = take(t, 1, "eval")
  for batch in (a, e):  # the text feature was found and read as bytes
    assert batch["inputs"].shape == (2, 32) and batch["inputs"][0, 0] == BOS
    assert (batch["inputs"] < BOS).sum() > 32 and batch["inputs"].max() <= BOS


# --- resume and processes -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["synthetic", "text", "images"])
def test_resume_from_a_saved_position_gives_the_same_batches(kind, tmp_path):
  p = pipelines(tmp_path).get(kind)
  if p is None:
    pytest.skip("apt-get install dataset-fashion-mnist")
  straight, _ = take(p, 7)
  _, it = take(p, 3)
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
  resumed, _ = take(p, 4, state=state)
  assert_batches_equal(resumed, straight[3:])


@pytest.mark.parametrize("kind", ["synthetic", "text", "images"])
def test_two_processes_get_disjoint_rows_that_make_the_global_batch(kind, tmp_path):
  p = pipelines(tmp_path).get(kind)
  if p is None:
    pytest.skip("apt-get install dataset-fashion-mnist")
  whole, _ = take(p, 3)
  first, _ = take(p, 3, rows=slice(0, 2))
  second, _ = take(p, 3, rows=slice(2, 4))
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(first, second)]
  assert_batches_equal(joined, whole)
  assert not np.array_equal(first[0][next(iter(first[0]))], second[0][next(iter(second[0]))])


# --- errors ----------------------------------------------------------------------------
def test_missing_inputs_say_where_we_looked_and_how_to_get_them(tmp_path):
  with pytest.raises(ValueError, match="no text file.*nothing.txt"):
    take(ByteText(seq_len=8, batch_size=1, path=str(tmp_path / "nothing.txt")), 1)
  with pytest.raises(ValueError, match="tfds build tiny_shakespeare"):
    take(ByteText(seq_len=8, batch_size=1, dataset="tiny_shakespeare",
                  data_dir=str(tmp_path)), 1)
  with pytest.raises(ValueError, match="tfds has no dataset"):
    take(ByteText(seq_len=8, batch_size=1, dataset="no_such_dataset"), 1)
  with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
    take(Images(batch_size=1, path=str(tmp_path / "fm")), 1)
  with pytest.raises(ValueError, match="exactly one of"):
    ByteText(seq_len=8, batch_size=1)
  with pytest.raises(ValueError, match="too short"):
    ByteText(seq_len=1, batch_size=1, path=str(tmp_path))
  with pytest.raises(ValueError, match="image_size"):
    Images(batch_size=1, dataset="imagenet2012")
  with pytest.raises(ValueError, match="unknown keys.*seq_length"):
    make_pipeline(dict(name="bytes", seq_length=8, path="x"), 1, 0)


# --- through the training loop -----------------------------------------------------------
def load_config(name, arch, **overrides):
  c = load_config_file(f"{ROOT / 'configs' / name}.py:{arch}")
  c.wandb.mode = "disabled"
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def metrics(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_bytes_train_and_resume_exactly_through_the_loop(tmp_path):
  """Shakespeare through grain to train steps; stopping at step 3 and resuming from
  the checkpointed pipeline position gives the losses of an unbroken run."""
  from ssm.train.loop import train
  tiny = dict(model__d_model=16, model__n_layer=2, model__pattern="MA", task__seq_len=16,
              task__path=str(SHAKESPEARE), task__doc_separator="\n\n",
              train__batch_size=4, train__log_every=1, train__eval_every=6,
              train__eval_steps=1, checkpoint__every=3)
  train(load_config("bytes", "mamba", train__steps=6, **tiny), tmp_path / "straight")
  tiny["train__eval_every"] = 0  # evaluation does not touch training; compile it once
  train(load_config("bytes", "mamba", train__steps=3, **tiny), tmp_path / "resumed")
  train(load_config("bytes", "mamba", train__steps=6, **tiny), tmp_path / "resumed")
  a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
  assert [r["loss"] for r in a] == [r["loss"] for r in b][:6]  # bitwise
  assert math.isclose(a[-1]["eval/bits_per_byte"], a[-1]["eval/loss"] / math.log(2),
                      rel_tol=1e-6)


@needs_fashion
def test_fashion_mnist_trains_through_the_loop(tmp_path):
  """ViT with registers on the local files. (Vision Mamba and pixel sequences share
  this path: the pipeline tests cover their batches, test_vision their models.)"""
  from ssm.train.loop import train
  out = train(load_config("images", "vit_reg4", train__steps=2, train__batch_size=8,
                          train__log_every=1, train__eval_every=2, train__eval_steps=1,
                          model__n_layer=1), tmp_path)
  # Two steps from the start: the loss of a guess among 10 classes; accuracy counts
  # images of one batch of 8.
  assert abs(out["loss"] - math.log(10)) < 0.1 and abs(out["eval/loss"] - math.log(10)) < 0.1
  assert out["eval/accuracy"] * 8 == round(out["eval/accuracy"] * 8)
  row = metrics(tmp_path)[-1]
  assert row["step"] == 2 and {k: row[k] for k in out} == out


def test_a_model_that_cannot_read_the_task_is_an_error(tmp_path):
  from ssm.train.loop import Trainer
  c = load_config("images", "vit_reg4", task__dataset="cifar10")
  with pytest.raises(ValueError, match="model.image_size=32 model.channels=3"):
    Trainer(c, tmp_path)
  c = load_config("images", "mamba_seq", task__as_sequence=False)
  with pytest.raises(ValueError, match="as_sequence=True"):
    Trainer(c, tmp_path)


ROWS_SCRIPT = """
import json, sys, numpy as np, jax
from jax.experimental import multihost_utils
from ssm.config import load_config_file
from ssm.train.loop import Trainer, setup_distributed
spec, port, pid, out, text = sys.argv[1:]
c = load_config_file(spec)
c.wandb.mode = "disabled"
c.train.batch_size = 8
if "seq_len" in c.task:
  c.task.seq_len, c.task.path = 32, text
c.distributed.update(coordinator_address=f"localhost:{port}", num_processes=2, process_id=int(pid))
setup_distributed(c.distributed)
trainer = Trainer(c, out)
local = next(iter(trainer.pipeline.batches("train", trainer.process_rows())))
data = trainer.batches()
glob = next(data)  # the global arrays the step reads
state = json.dumps(data.get_state())  # what the checkpoint stores
key = "inputs" if "inputs" in local else "images"
whole = multihost_utils.process_allgather(glob[key], tiled=True)
np.savez(f"{out}/rows{pid}.npz", rows=np.array([trainer.process_rows().start,
                                                 trainer.process_rows().stop]),
         local=local[key], whole=whole, state=state)
"""


@needs_fashion
def test_two_jax_processes_read_disjoint_rows_of_the_same_global_batch(tmp_path):
  """Two processes through jax.distributed (gloo): each makes only its rows; the
  global batch they form is the single-process one."""
  import socket
  import subprocess
  import sys
  for spec in ("bytes.py:mamba", "images.py:vit_reg4"):
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", ROWS_SCRIPT, str(ROOT / "configs" / spec),
                               str(port), str(i), str(tmp_path), str(SHAKESPEARE)],
                              env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
      out, _ = p.communicate(timeout=300)
      assert p.returncode == 0, out[-3000:]
    a, b = (np.load(tmp_path / f"rows{i}.npz") for i in range(2))
    assert a["rows"].tolist() == [0, 4] and b["rows"].tolist() == [4, 8]
    name, arch = spec.split(":")
    c = load_config(name.removesuffix(".py"), arch)
    if "seq_len" in c.task:
      c.task.seq_len, c.task.path = 32, str(SHAKESPEARE)
    p = make_pipeline(c.task, 8, c.seed)
    (single,), _ = take(p, 1)
    key = "inputs" if "inputs" in single else "images"
    np.testing.assert_array_equal(np.concatenate([a["local"], b["local"]]), single[key])
    np.testing.assert_array_equal(a["whole"], single[key])
    np.testing.assert_array_equal(b["whole"], single[key])
    assert str(a["state"]) == str(b["state"])  # one pipeline position for all processes


def test_shakespeare_and_fashion_mnist_through_real_tfds_array_record_files(tmp_path,
                                                                           monkeypatch):
  """Local files written as tfds datasets (ArrayRecord, no TensorFlow), then read
  back through tfds.data_source: the same batches as the local-file readers."""
  import tensorflow_datasets as tfds
  text = SHAKESPEARE.read_bytes()
  cut = int(len(text) * 0.9)
  fashion = {s: Images(batch_size=1, path=FASHION).records(s) for s in ("train", "eval")}

  class SsmTestShakespeare(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(text[:cut]),
              "validation": self._generate_examples(text[cut:])}

    def _generate_examples(self, part):
      yield 0, {"text": part.decode()}

  class SsmTestFashionMnist(tfds.core.GeneratorBasedBuilder):
    """(tfds' Image feature needs TensorFlow to encode PNGs; a Tensor does not.)"""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(fashion["train"], 256),
              "test": self._generate_examples(fashion["eval"], 64)}

    def _generate_examples(self, records, n):
      for i in range(n):
        yield i, {"image": records[i]["image"], "label": records[i]["label"]}

  for cls in (SsmTestShakespeare, SsmTestFashionMnist):
    cls(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()

  from_tfds = ByteText(seq_len=64, batch_size=4, dataset="ssm_test_shakespeare",
                       data_dir=str(tmp_path))
  local = ByteText(seq_len=64, batch_size=4, path=str(SHAKESPEARE))
  for split in ("train", "eval"):
    assert_batches_equal(take(from_tfds, 3, split)[0], take(local, 3, split)[0])

  from ssm.data.images import DATASETS
  monkeypatch.setitem(DATASETS, "ssm_test_fashion_mnist", DATASETS["fashion_mnist"])
  images = Images(batch_size=8, dataset="fashion_mnist", data_dir=str(tmp_path), threads=1)
  from_tfds = dataclasses.replace(images, dataset="ssm_test_fashion_mnist")
  (got,), _ = take(from_tfds, 1, "eval")
  # tfds stores examples in an order of its own (shuffled by key): match by content.
  want = {images.example(fashion["eval"][i], None)["images"].tobytes():
          int(fashion["eval"][i]["label"]) for i in range(64)}
  assert [want[x.tobytes()] for x in got["images"]] == got["labels"].tolist()


def test_the_loop_evaluates_a_task_at_its_other_lengths(tmp_path):
  from ssm.train.loop import Trainer
  c = load_config("induction_heads", "mamba", task__eval_seq_lens=(64, 256, 1024),
                  train__eval_steps=1)
  trainer = Trainer(c, tmp_path)
  params = trainer.init_state()["params"]
  out = trainer.evaluate(trainer.make_eval(), params)
  assert sorted(k for k in out if k.startswith("eval/accuracy")) == [
      "eval/accuracy", "eval/accuracy@1024", "eval/accuracy@256"]  # 64 is the training length
  # Each length's metrics are those of the model on that length's first eval batch,
  # computed here from the logits.
  import jax
  from flax import nnx
  forward = jax.jit(lambda ids: nnx.merge(trainer.graphdef, params)(ids))
  for suffix, pipeline in [("", trainer.pipeline), *trainer.pipeline.eval_variants()]:
    batch = pipeline.task.batch(0, split="eval")
    logits = np.asarray(forward(batch["inputs"]), np.float64)
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(log_p, batch["labels"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    assert math.isclose(out[f"eval/loss{suffix}"], (ce * mask).sum() / mask.sum(), rel_tol=1e-5)
    right = (logits.argmax(-1) == batch["labels"]) * mask
    assert math.isclose(out[f"eval/accuracy{suffix}"], right.sum() / mask.sum(), rel_tol=1e-6)
