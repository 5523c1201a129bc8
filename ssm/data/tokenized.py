"""Tokenized text: documents from local files, tfds or Hugging Face `datasets`,
tokenized once into ArrayRecord shards, packed into rows of fixed length.

Corpora (exactly one of `path`, `dataset`, `hf_dataset`):
  path        a text file, a glob or a directory; *.jsonl files hold one document per
              line in their `text_key` field ("text" by default). Text files are split
              into train and eval by characters (the last `eval_fraction` is eval), jsonl
              documents by index (every k-th is eval, k = 1 / eval_fraction).
  dataset     a tfds text dataset (lm1b, pg19, wiki40b/en, c4/en, ...), read without
              TensorFlow; its `train_split` and `eval_split`.
  hf_dataset  a Hugging Face datasets name ("HuggingFaceFW/fineweb-edu"), streamed;
              `hf_config` its subset; `max_documents` caps a split (0: all). An empty
              `eval_split` holds every k-th training document out for evaluation.

The cache: each split is tokenized once into `cache_dir/<corpus>-<split>-<key>/`
(ArrayRecord shards of uint32 token ids, one record a document, and meta.json),
where the key hashes the corpus (files with their sizes and times, the dataset and
split) and the tokenizer's fingerprint. A cache is written under a temporary name and
renamed when complete, so an interrupted tokenization is never read as a finished one.

Packing, as for bytes (ssm.data.text): each document is BOS + ids (+ EOS where the
tokenizer has one apart from BOS); documents are shuffled, concatenated and cut into
windows of seq_len + 1 tokens; `reset` is True where the input is BOS, so no state
or attention crosses a document start. Labels equal to BOS are not scored (a
document start is unpredictable) unless BOS is also the EOS, which is then the
prediction that the document has ended. Bits per byte: the mean loss per scored
token times the eval split's scored tokens per UTF-8 byte, over ln 2 (exact for the
whole split, an estimate on a sample of it), comparable across tokenizers.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

import grain
import numpy as np
from grain import experimental as gx
from tqdm import tqdm

from ssm.data.base import Pipeline
from ssm.data.text import SHAKESPEARE, TEXT_KEYS, _only_text_key, local_files
from ssm.data.tokenizer import load_tokenizer

log = logging.getLogger("ssm.data")

# The tokenizer shipped for Tiny Shakespeare (byte-level BPE, 1024 ids, trained by
# `ssm-tokenizer ssm/data/corpora/tinyshakespeare.txt --vocab-size 1024
# --out ssm/data/corpora/shakespeare-bpe1024.json`).
SHAKESPEARE_BPE = SHAKESPEARE.parent / "shakespeare-bpe1024.json"
FORMAT = 2  # the cache layout; a change makes new keys
SHARD_TOKENS = 1 << 24  # tokens per ArrayRecord shard (64 MiB)
ENCODE_BATCH = 512  # documents per call of the tokenizer (Rust, parallel)


def default_cache_dir():
  return Path(os.environ.get("SSM_CACHE", Path.home() / ".cache" / "ssm")) / "tokenized"


@dataclasses.dataclass(frozen=True)
class TokenizedText(Pipeline):
  """Fields: see the module docstring."""
  seq_len: int
  batch_size: int
  seed: int = 0
  tokenizer: str = "bytes"
  path: str = ""
  dataset: str = ""
  hf_dataset: str = ""
  hf_config: str = ""
  text_key: str = ""
  data_dir: str = ""  # tfds data_dir ("" = tfds' default)
  download: bool = False  # let tfds download and prepare the dataset
  train_split: str = "train"
  eval_split: str = "validation"
  eval_fraction: float = 0.1
  doc_separator: str = ""
  max_documents: int = 0
  cache_dir: str = ""  # "" = $SSM_CACHE/tokenized or ~/.cache/ssm/tokenized
  shuffle: bool = True
  eval_seq_lens: tuple = ()

  kind = "lm"

  def __post_init__(self):
    given = [k for k in ("path", "dataset", "hf_dataset") if getattr(self, k)]
    if len(given) != 1:
      raise ValueError("task (text): set exactly one of task.path (local files), "
                       "task.dataset (a tfds name) and task.hf_dataset (a Hugging Face "
                       f"datasets name); given: {given or 'none'}")
    if self.seq_len < 2:
      raise ValueError(f"task (text): seq_len {self.seq_len} is too short (at least 2)")
    if not 0 < self.eval_fraction < 1:
      raise ValueError(f"task (text): eval_fraction {self.eval_fraction} must be in (0, 1)")
    object.__setattr__(self, "eval_seq_lens", tuple(int(n) for n in self.eval_seq_lens))

  # --- the tokenizer and the tokenized splits ---------------------------------
  @functools.cached_property
  def tok(self):
    return load_tokenizer(self.tokenizer)

  @property
  def vocab_size(self):
    return self.tok.vocab_size

  @property
  def bits_per_byte(self):
    """The loss's factor to bits per byte (ln 2 aside): the eval split's tokens per byte."""
    return self.tokens_per_byte("eval")

  def tokens_per_byte(self, split):
    """Scored tokens (the ids and each document's EOS) per UTF-8 byte of the split."""
    meta = self.split(split).meta
    return (meta["tokens"] + meta["documents"] * (self.tok.eos_id is not None)) / meta["bytes"]

  def packed_tokens(self, split):
    """Tokens in one pass over the split, as packed (BOS, ids, EOS per document)."""
    meta = self.split(split).meta
    specials = 1 + (self.tok.eos_id is not None and self.tok.eos_id != self.tok.bos_id)
    return meta["tokens"] + meta["documents"] * specials

  @functools.lru_cache(maxsize=2)  # noqa: B019  (the pipeline lives as long as the run)
  def split(self, split):
    """The tokenized split ("train" or "eval"), tokenized now unless cached."""
    return tokenize(self, split)

  # --- batches ---------------------------------------------------------------
  def batches(self, split, rows):
    tokenized = self.split(split)
    source, n = tokenized.source(), tokenized.meta["documents"]
    shuffle = split == "train" and self.shuffle

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch):  # a new order each epoch (one uint32 per document)
      rng = np.random.default_rng([self.seed, epoch])
      return rng.permutation(n).astype(np.uint32) if shuffle else np.arange(n, dtype=np.uint32)

    bos, eos = self.tok.bos_id, self.tok.eos_id
    with_end = eos is not None and eos != bos
    start, end = np.asarray([bos], np.uint32), np.asarray([eos if with_end else 0], np.uint32)
    # Documents reach the packer in groups of ~64k tokens, each group one batched read:
    # packing and reading cost per call, and short documents one at a time would starve
    # a GPU (scripts/bench_data.py --tokenized).
    group = max(1, min(4096, n, round(65536 * n / tokenized.meta["tokens"])))

    def tokens(g):
      epoch, first = divmod(g * group, n)
      ids = [*epoch_order(epoch)[first:first + group]]
      if len(ids) < group:  # the group runs into the next epoch
        ids += [*epoch_order(epoch + 1)[:group - len(ids)]]
      records = source.__getitems__([int(i) for i in ids])
      parts = []
      for record in records:
        parts += [start, np.frombuffer(record, np.uint32)] + ([end] if with_end else [])
      return {"tokens": np.concatenate(parts).astype(np.int32)}

    groups = grain.MapDataset.range(sys.maxsize // group).map(tokens).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    windows = gx.ConcatThenSplitIterDataset(groups, length_struct={"tokens": self.seq_len + 1})
    score_bos = bos == eos
    batches = windows.batch(self.batch_size).map(
        lambda b: _rows(b["tokens"][rows], bos, score_bos))
    return gx.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=2)

  def eval_variants(self):
    return [(f"@{n}", dataclasses.replace(self, seq_len=n, eval_seq_lens=()))
            for n in self.eval_seq_lens if n != self.seq_len]


def _rows(windows, bos, score_bos):
  inputs, labels = windows[:, :-1], windows[:, 1:]
  mask = np.ones(labels.shape, np.float32) if score_bos else (labels != bos).astype(np.float32)
  return dict(inputs=inputs, labels=labels, loss_mask=mask, reset=inputs == bos)


# --- documents -----------------------------------------------------------------
def _holdout(index, split, fraction):
  """Whether document `index` belongs to `split` when eval is held out of one stream."""
  k = max(2, round(1 / fraction))
  return (index % k == k - 1) == (split == "eval")


def _jsonl_texts(file, key):
  with open(file, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      record = json.loads(line)
      if key not in record:
        raise ValueError(f"task (text): {file} line {n} has no field {key!r} (it has "
                         f"{sorted(record)}); set task.text_key")
      yield record[key]


def _local_texts(task, split):
  index = 0
  for file in local_files(task.path, "text"):
    if file.endswith(".jsonl"):
      for text in _jsonl_texts(file, task.text_key or "text"):
        if _holdout(index, split, task.eval_fraction):
          yield text
        index += 1
      continue
    text = Path(file).read_text(encoding="utf-8", errors="replace")
    cut = int(len(text) * (1 - task.eval_fraction))
    part = text[:cut] if split == "train" else text[cut:]
    yield from (d for d in (part.split(task.doc_separator) if task.doc_separator else [part])
                if d)


def _tfds_texts(task, split):
  from ssm.data import tfds_source  # noqa: PLC0415
  name = {"train": task.train_split, "eval": task.eval_split or task.train_split}[split]
  source = tfds_source.data_source(task.dataset, name, task.data_dir, task.download)
  key = task.text_key or TEXT_KEYS.get(task.dataset.split("/")[0]) or _only_text_key(source)
  for i in range(len(source)):
    if task.eval_split or _holdout(i, split, task.eval_fraction):
      text = source[i][key]
      yield text.decode() if isinstance(text, bytes) else str(text)


def _hf_texts(task, split):
  try:
    import datasets  # noqa: PLC0415
  except ImportError:
    raise ValueError("task.hf_dataset needs Hugging Face datasets: pip install datasets "
                     "(or ssm-jax[lm])") from None
  name = {"train": task.train_split, "eval": task.eval_split or task.train_split}[split]
  stream = datasets.load_dataset(task.hf_dataset, task.hf_config or None, split=name,
                                 streaming=True)
  key = task.text_key or "text"
  for i, record in enumerate(stream):
    if key not in record:
      raise ValueError(f"task (text): {task.hf_dataset} has no field {key!r} (it has "
                       f"{sorted(record)}); set task.text_key")
    if task.eval_split or _holdout(i, split, task.eval_fraction):
      yield record[key]


def texts(task, split):
  """The documents (str) of a split, in the corpus's order."""
  source = _local_texts if task.path else _tfds_texts if task.dataset else _hf_texts
  n = 0
  for text in source(task, split):
    if task.max_documents and n >= task.max_documents:
      return
    n += 1
    yield text


def _corpus_id(task, split):
  """What the tokenized split depends on besides the tokenizer."""
  common = dict(split=split, eval_fraction=task.eval_fraction, max_documents=task.max_documents,
                text_key=task.text_key, format=FORMAT)
  if task.path:
    files = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns)
             for f in local_files(task.path, "text")]
    return dict(common, files=files, doc_separator=task.doc_separator)
  if task.dataset:
    return dict(common, tfds=task.dataset, data_dir=task.data_dir,
                splits=[task.train_split, task.eval_split])
  return dict(common, hf=task.hf_dataset, config=task.hf_config,
              splits=[task.train_split, task.eval_split])


def _label(task):
  name = task.path or task.dataset or task.hf_dataset
  return "".join(c if c.isalnum() else "_" for c in Path(name.rstrip("/")).stem)[:40] or "corpus"


# --- the cache -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tokenized:
  """A tokenized split on disk: its directory and meta.json."""
  directory: Path
  meta: dict

  def source(self):
    """The ArrayRecord shards as one random-access source of records (bytes)."""
    return grain.sources.ArrayRecordDataSource([str(self.directory / s)
                                                for s in self.meta["shards"]])

  def documents(self):
    """The documents (uint32 token ids), random access."""
    return grain.MapDataset.source(self.source()).map(lambda r: np.frombuffer(r, np.uint32))


def tokenize(task, split):
  """The split `split` of the task's corpus, tokenized by its tokenizer: read from the
  cache, or tokenized into it now."""
  tok = task.tok
  corpus = _corpus_id(task, split)
  key = hashlib.sha256(json.dumps(dict(corpus, tokenizer=tok.fingerprint),
                                  sort_keys=True).encode()).hexdigest()[:16]
  root = Path(task.cache_dir).expanduser() if task.cache_dir else default_cache_dir()
  directory = root / f"{_label(task)}-{split}-{key}"
  if not (directory / "meta.json").exists():
    _write(task, split, corpus, directory)
  meta = json.loads((directory / "meta.json").read_text())
  if meta["tokenizer"] != tok.fingerprint:
    raise ValueError(f"the tokenized cache {directory} was written by another tokenizer "
                     f"({meta['tokenizer_name']}, not {tok.name}); delete it")
  return Tokenized(directory, meta)


def _write(task, split, corpus, directory):
  from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415
  tok = task.tok
  tmp = directory.with_name(f"{directory.name}.partial-{uuid.uuid4().hex[:8]}")
  tmp.mkdir(parents=True)
  shards, writer, in_shard = [], None, SHARD_TOKENS
  docs = tokens = nbytes = 0
  try:
    bar = tqdm(desc=f"tokenizing {_label(task)} ({split})", unit=" docs", disable=None)
    for batch in _batched(texts(task, split), ENCODE_BATCH):
      for text, ids in zip(batch, tok.encode_batch(batch), strict=True):
        if not ids:
          continue
        if in_shard >= SHARD_TOKENS:
          if writer:
            writer.close()
          shards.append(f"tokens-{len(shards):05d}.array_record")
          writer, in_shard = ArrayRecordWriter(str(tmp / shards[-1]),
                                                 "group_size:1,uncompressed"), 0
        writer.write(np.asarray(ids, np.uint32).tobytes())
        docs, tokens, nbytes = docs + 1, tokens + len(ids), nbytes + len(text.encode())
        in_shard += len(ids)
      bar.update(len(batch))
    bar.close()
    if writer:
      writer.close()
    if not docs or not tokens:
      raise ValueError(f"task (text): the {split} split of {_label(task)} is empty "
                       "(no documents, or no text in them); check task.path / the dataset, "
                       "task.text_key and task.eval_fraction")
    meta = dict(corpus=corpus, tokenizer=tok.fingerprint, tokenizer_name=tok.name,
                vocab_size=tok.vocab_size, documents=docs, tokens=tokens, bytes=nbytes,
                shards=shards)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
      tmp.rename(directory)
    except OSError:  # another process finished the same split first: theirs is the same
      shutil.rmtree(tmp)
    log.info("tokenized %s (%s): %d documents, %d tokens, %d bytes -> %s", _label(task), split,
             docs, tokens, nbytes, directory)
  except BaseException:
    if writer:
      writer.close()
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _batched(iterable, n):
  batch = []
  for x in iterable:
    batch.append(x)
    if len(batch) == n:
      yield batch
      batch = []
  if batch:
    yield batch
