"""What the checkpoints' checksums cost: a save (until committed) and a restore, with
and without them, and the checksum pass alone.

  python scripts/bench_checkpoint.py            # prints the table
  python scripts/bench_checkpoint.py --write    # ... and writes it to docs/benchmarks.md

The state is float32 arrays of 4 MiB each (a model's parameters and moments come as
many arrays). With checksums, orbax's callback reads every file of the completed save
back (in its background thread: the training loop waits for it only when the next save
starts, or at the end); a restore reads them once more before orbax reads them.
Without: the callback and the check replaced by nothing. Medians of --reps.
"""

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from ssm.config import base
from ssm.report import describe_device, write_section
from ssm.train import checkpoint as C

ROOT = Path(__file__).resolve().parents[1]


def state(mib):
  n = max(1, mib // 4)
  keys = jax.random.split(jax.random.key(0), n)
  return {f"w{i}": jax.random.normal(k, (1024, 1024)) for i, k in enumerate(keys)}


def timings(tree, reps, checked):
  cfg = base().checkpoint
  cfg.update(dict(keep=reps + 1, best_metric=""))
  directory = Path(tempfile.mkdtemp())
  write, verify = C.Checkpointer._write_checksums, C.verify_checksums
  if not checked:  # before the manager is made: it keeps the callback
    C.Checkpointer._write_checksums = lambda self: None
    C.verify_checksums = lambda directory: None
  try:
    ck = C.Checkpointer(directory, cfg)
    saves, restores = [], []
    for step in range(1, reps + 1):
      t0 = time.perf_counter()
      ck.save(step, tree, {"step": step}, wait=True)
      saves.append(time.perf_counter() - t0)
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(ck.restore_latest(C.abstract(tree))[1])
      restores.append(time.perf_counter() - t0)
    ck.close()
  finally:
    C.Checkpointer._write_checksums, C.verify_checksums = write, verify
  sums = []
  for _ in range(reps):
    t0 = time.perf_counter()
    C.checksums(directory / str(reps))
    sums.append(time.perf_counter() - t0)
  shutil.rmtree(directory)
  return statistics.median(saves), statistics.median(restores), statistics.median(sums)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--write", action="store_true")
  p.add_argument("--sizes", default="64,512", help="MiB of state, comma-separated")
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args(argv)
  rows = []
  for mib in map(int, args.sizes.split(",")):
    tree = state(mib)
    jax.block_until_ready(tree)
    plain = timings(tree, args.reps, checked=False)
    checked = timings(tree, args.reps, checked=True)
    rows.append((mib, plain[0], checked[0], plain[1], checked[1], checked[2]))
    print(f"{mib} MiB: save {plain[0]:.3f} -> {checked[0]:.3f} s, restore {plain[1]:.3f} -> "
          f"{checked[1]:.3f} s, checksums alone {checked[2]:.3f} s", flush=True)
  table = ("| state | save s | save with checksums s | restore s | restore with checks s | "
           "checksum pass s (GB/s) |\n|---|---|---|---|---|---|\n" + "".join(
               f"| {m} MiB | {s:.3f} | {sc:.3f} ({(sc - s) / s:+.0%}) | {r:.3f} | {rc:.3f} "
               f"({(rc - r) / r:+.0%}) | {c:.3f} ({m * 2**20 / c / 1e9:.2f}) |\n"
               for m, s, sc, r, rc, c in rows))
  print("\n" + table)
  if args.write:
    body = (f"## Checkpoint checksums\n\n`python scripts/bench_checkpoint.py --write` on "
            f"{describe_device()}, JAX {jax.__version__}, {datetime.date.today()}. A state of "
            f"4 MiB float32 arrays saved (async, waited for until committed) and restored by "
            f"ssm.train.checkpoint; medians of {args.reps}. The checksum pass is CRC-32 over "
            "every file of the checkpoint, in 8 threads (zlib releases the GIL).\n\n" + table)
    write_section(ROOT / "docs" / "benchmarks.md", "bench_checkpoint", body)
  return 0


if __name__ == "__main__":
  sys.exit(main())
