"""Can the input pipelines keep up? Examples/s of each default config's pipeline
against the train steps/s of its model, on this machine.

  python scripts/bench_data.py            # prints the table
  python scripts/bench_data.py --write    # ... and writes it to docs/benchmarks.md
  python scripts/bench_data.py --tokenized --write   # tokenized text at the 125M preset

--tokenized: tokenization (once, into the cache) and the packing pipeline of tokenized
text (ssm.data.tokenized) at the Mamba-125M preset's rows (2048 tokens), against the
tokens/s one GPU consumes training that model: its analytic training FLOPs per token
(ssm.flops, 3x forward) at 50% MFU of an H100's 989 dense bf16 TFLOP/s (an upper
bound on what one step takes; GPU figures themselves are owed).

"pipeline" iterates the config's training batches (as the loop does: grain with
its background threads) after a warm-up; "step" is the jitted train step alone
on one batch already on the device. headroom = pipeline batches/s ÷ steps/s: above 1
the loop need not wait for data. (On a CPU the two compete for the same cores;
the loop's own `data_wait` metric measures what it actually waits.)
"""

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import jax

from ssm.report import describe_device, write_section

from ssm.train import Trainer
from ssm.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["mqar.py:mamba", "selective_copy.py:mamba", "induction_heads.py:mamba",
           "listops.py:mamba", "bytes.py:mamba", "images.py:vit_reg4", "images.py:vim",
           "images.py:mamba_seq"]


def pipeline_rate(pipeline, rows, batches):
  """Training batches/s of a pipeline making `rows` of each batch, after 3 warm-up ones."""
  it = iter(pipeline.batches("train", rows))
  for _ in range(3):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches / (time.perf_counter() - t0)


def step_rate(trainer, reps):
  state = trainer.init_state()
  batch = next(trainer.batches())
  step = trainer.compile_step(state, batch)
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(reps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return reps / (time.perf_counter() - t0)


def tokenized_rows(batches, rows=32, seq_len=2048):
  """(corpus, documents, tokenize MB/s, pipeline tokens/s) for Shakespeare cut into
  speeches (short documents: the worst case for packing) and into ~1,000-token
  documents (web-text-like), with the shipped BPE."""
  from ssm.data.text import SHAKESPEARE
  from ssm.data.tokenized import SHAKESPEARE_BPE, TokenizedText
  text = SHAKESPEARE.read_text()
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    corpora = {"speeches (~60 tokens)": text.split("\n\n"),
               "~1,000-token documents": [text[i:i + 4000] for i in range(0, len(text), 4000)]}
    for name, docs in corpora.items():
      path = Path(tmp) / f"{len(out)}.jsonl"
      path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
      task = TokenizedText(seq_len=seq_len, batch_size=rows, path=str(path),
                           tokenizer=str(SHAKESPEARE_BPE), cache_dir=str(Path(tmp) / "cache"))
      t0 = time.perf_counter()
      task.split("train")
      mb_s = task.split("train").meta["bytes"] / (time.perf_counter() - t0) / 1e6
      rate = pipeline_rate(task, slice(0, rows), batches) * rows * seq_len
      out.append((name, len(docs), mb_s, rate))
      print(f"{name}: tokenized at {mb_s:.2f} MB/s, packed {out[-1][-1]:,.0f} tokens/s",
            flush=True)
  return out


def gpu_tokens_per_sec(preset="mamba-130m", mfu=0.5, peak=989e12, seq_len=2048):
  from ssm.flops import flops
  from ssm.models.presets import PRESETS
  return mfu * peak / (3 * flops(PRESETS[preset], seq_len)["total"])


def tokenized_main(args, argv):
  rows = tokenized_rows(args.batches)
  need = gpu_tokens_per_sec()
  table = ("| corpus | documents | tokenize MB/s (once) | pipeline tokens/s | ÷ one H100's "
           "consumption |\n|---|---|---|---|---|\n" + "".join(
               f"| {n} | {d:,} | {m:.2f} | {t:,.0f} | {t / need:.1f} |\n" for n, d, m, t in rows))
  print("\n" + table + f"\none H100 training mamba-130m at 50% MFU: {need:,.0f} tokens/s")
  if args.write:
    cmd = "python scripts/bench_data.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = (f"## Tokenized text\n\n`{cmd.strip()}` on {describe_device()}, JAX {jax.__version__}, "
            f"{datetime.date.today()}. Shakespeare as jsonl documents, the shipped 1024-id BPE, "
            f"rows of 32 x 2048 tokens (one GPU's share of Mamba-125M's 0.5M-token batch); "
            f"pipeline rate over {args.batches} batches after 3 warm-up ones, on one process. "
            f"One H100 training the mamba-130m preset consumes at most {need:,.0f} tokens/s "
            "(its analytic training FLOPs per token at 50% MFU of 989 TFLOP/s).\n\n" + table)
    write_section(ROOT / "docs" / "benchmarks.md", "bench_data_tokenized", body)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--write", action="store_true")
  p.add_argument("--batches", type=int, default=50)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--tokenized", action="store_true", help="tokenized text (see above)")
  args = p.parse_args(argv)
  if args.tokenized:
    return tokenized_main(args, argv)
  rows = []
  for spec in args.configs.split(","):
    c = load_config_file(str(ROOT / "configs" / spec))
    c.wandb.mode = "disabled"
    trainer = Trainer(c, tempfile.mkdtemp())
    B = c.train.batch_size
    data, steps = pipeline_rate(trainer.pipeline, trainer.process_rows(), args.batches), step_rate(trainer, args.reps)
    rows.append((spec, B, data * B, steps, data / steps))
    print(f"{spec}: {data * B:.0f} examples/s, {steps:.2f} steps/s, headroom {data / steps:.1f}",
          flush=True)
  table = ("| config | batch | pipeline examples/s | train steps/s | headroom |\n"
           "|---|---|---|---|---|\n" + "".join(f"| {s} | {b} | {e:,.0f} | {r:.2f} | {h:.1f} |\n"
                                               for s, b, e, r, h in rows))
  print("\n" + table)
  if args.write:
    cmd = "python scripts/bench_data.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = (f"## Input pipelines\n\n`{cmd.strip()}` on {jax.devices()[0].platform} "
            f"({jax.device_count()} device(s)), JAX {jax.__version__}, "
            f"{datetime.date.today()}. Each config's defaults; pipeline rate over "
            f"{args.batches} batches after 3 warm-up ones, step rate over {args.reps} steps.\n\n"
            + table)
    write_section(ROOT / "docs" / "benchmarks.md", "bench_data", body)


if __name__ == "__main__":
  main()
