"""Can the input pipelines keep up? Examples/s of each default config's pipeline
against the train steps/s of its model, on this machine.

  python scripts/bench_data.py            # prints the table
  python scripts/bench_data.py --write    # ... and writes it to docs/benchmarks.md

"pipeline" iterates the config's training batches (as the loop does: grain with
its background threads) after a warm-up; "step" is the jitted train step alone
on one batch already on the device. headroom = pipeline batches/s ÷ steps/s: above 1
the loop need not wait for data. (On a CPU the two compete for the same cores;
the loop's own `data_wait` metric measures what it actually waits.)
"""

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import jax

from ssm.report import write_section

from ssm.train import Trainer
from ssm.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["mqar.py:mamba", "selective_copy.py:mamba", "induction_heads.py:mamba",
           "listops.py:mamba", "bytes.py:mamba", "images.py:vit_reg4", "images.py:vim",
           "images.py:mamba_seq"]


def pipeline_rate(trainer, batches):
  data = trainer.pipeline.batches("train", trainer.process_rows())
  it = iter(data)
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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--write", action="store_true")
  p.add_argument("--batches", type=int, default=50)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--configs", default=",".join(CONFIGS))
  args = p.parse_args(argv)
  rows = []
  for spec in args.configs.split(","):
    c = load_config_file(str(ROOT / "configs" / spec))
    c.wandb.mode = "disabled"
    trainer = Trainer(c, tempfile.mkdtemp())
    B = c.train.batch_size
    data, steps = pipeline_rate(trainer, args.batches), step_rate(trainer, args.reps)
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
