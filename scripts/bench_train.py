"""Overhead of the training loop: its step time against the bare jitted step.

  python scripts/bench_train.py            # prints the table
  python scripts/bench_train.py --write    # ... and writes it to docs/benchmarks.md

Same model, same batch size: "bare" calls the jitted train step on one batch that is
already on the device; "loop" is `ssm.train.train` end to end (data generated per
step, metrics, progress bar; checkpoints and eval off), timed from its own
metrics.jsonl after the first, compiling interval.
"""

import argparse
import datetime
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

from ssm.report import write_section

from ssm.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]


def config(arch, steps, log_every):
  spec = importlib.util.spec_from_file_location("mqar", ROOT / "configs" / "mqar.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arch)
  c.train.update(dict(steps=steps, log_every=log_every, eval_every=0))
  c.checkpoint.every = 10**9
  c.wandb.mode = "disabled"
  return c


def bare_step_time(c, reps):
  trainer = Trainer(c, tempfile.mkdtemp())
  state = trainer.init_state()
  step = trainer.make_step(jax.tree.map(lambda x: x.sharding, state))
  batch = next(trainer.batches())
  state, _ = step(state, batch)  # compile
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(reps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - t0) / reps


def loop_step_time(c):
  workdir = Path(tempfile.mkdtemp())
  train(c, workdir)
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return statistics.median(r["step_time"] for r in rows[1:])  # the first interval compiles


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--write", action="store_true")
  p.add_argument("--steps", type=int, default=200)
  args = p.parse_args(argv)
  rows = []
  for arch in ("mamba", "transformer", "hybrid"):
    c = config(arch, args.steps, log_every=args.steps // 10)
    bare = bare_step_time(c, reps=args.steps // 2)
    loop = loop_step_time(c)
    rows.append((arch, bare * 1e3, loop * 1e3, loop / bare))
    print(f"{arch}: bare {bare * 1e3:.2f} ms, loop {loop * 1e3:.2f} ms, ratio {loop / bare:.2f}",
          flush=True)
  table = ("| configs/mqar.py: | bare jitted step ms | loop step ms | loop / bare |\n"
           "|---|---|---|---|\n" + "".join(f"| {a} | {b:.2f} | {l:.2f} | {r:.2f} |\n"
                                           for a, b, l, r in rows))
  print("\n" + table)
  if args.write:
    device = jax.devices()[0]
    cmd = "python scripts/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = (f"## Training-loop overhead\n\n`{cmd.strip()}` on {device.platform} "
            f"({jax.device_count()} device(s)), JAX {jax.__version__}, {datetime.date.today()}. "
            f"MQAR defaults (batch 32, length 64, d_model 64, 2 layers); medians over "
            f"{args.steps} steps.\n\n" + table)
    write_section(ROOT / "docs" / "benchmarks.md", "bench_train", body)


if __name__ == "__main__":
  main()
