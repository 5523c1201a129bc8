"""How fast are the synthetic tasks generated? Batches/s of each task's `batch(i)`
(numpy, one thread, no grain) at its config's defaults and at the paper's setting.

  python scripts/bench_tasks.py            # prints the table
  python scripts/bench_tasks.py --write    # ... and writes it to docs/benchmarks.md

Each case makes one batch to warm up, then batches until --seconds have passed.
The loop makes batches in background threads while the device computes, so a task
keeps up when its batches/s is above the model's steps/s (scripts/bench_data.py).
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

from ssm.report import write_section

from ssm.data.tasks import make_task
from ssm.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
# (config, task overrides, batch size; None: the config's). The paper settings are the
# ones the config files' docstrings give; induction heads at 2^20 is the paper's
# longest evaluation, one row.
CASES = [
    ("mqar.py", {}, None),
    ("mqar.py", dict(vocab_size=8192, seq_len=512, num_kv_pairs=0), 512),
    ("selective_copy.py", {}, None),
    ("selective_copy.py", dict(seq_len=4096, num_tokens_to_copy=16), 64),
    ("induction_heads.py", {}, None),
    ("induction_heads.py", dict(seq_len=2**20, eval_seq_lens=()), 1),
    ("listops.py", {}, None),
    ("listops.py", dict(min_length=500, max_length=2000, seq_len=2000), 32),
]


def rate(task, seconds):
  task.batch(0)
  times, i = [], 1
  while sum(times) < seconds:
    t0 = time.perf_counter()
    task.batch(i)
    times.append(time.perf_counter() - t0)
    i += 1
  return 1 / np.median(times), len(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--write", action="store_true")
  p.add_argument("--seconds", type=float, default=2.0, help="timed per case")
  args = p.parse_args(argv)
  rows = []
  for spec, overrides, batch_size in CASES:
    c = load_config_file(str(ROOT / "configs" / spec))
    c.task.update(overrides)
    task = make_task(c.task, batch_size or c.train.batch_size, c.seed)
    per_s, n = rate(task, args.seconds)
    setting = " ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
    rows.append((spec, setting, task.batch_size, task.seq_len, per_s, n))
    print(f"{spec} {setting}: {per_s:.1f} batches/s, {per_s * task.batch_size:,.0f} rows/s",
          flush=True)
  table = ("| config | task | batch | seq_len | batches/s | rows/s | ms/batch |\n"
           "|---|---|---|---|---|---|---|\n"
           + "".join(f"| {s} | {t} | {b} | {L} | {r:,.1f} | {r * b:,.0f} | {1e3 / r:,.2f} |\n"
                     for s, t, b, L, r, _ in rows))
  print("\n" + table)
  if args.write:
    cmd = "python scripts/bench_tasks.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = (f"## Synthetic task generation\n\n`{cmd.strip()}` on a {os.cpu_count()}-core "
            f"CPU, {datetime.date.today()}. `task.batch(i)` alone (one thread); the median "
            f"batch time over {args.seconds:g} s after one warm-up batch.\n\n" + table)
    write_section(ROOT / "docs" / "benchmarks.md", "bench_tasks", body)


if __name__ == "__main__":
  main()
