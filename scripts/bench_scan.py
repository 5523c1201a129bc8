"""Benchmark of the selective-scan backends: time and compiled memory.

  python scripts/bench_scan.py                 # CPU sizes; prints the table
  python scripts/bench_scan.py --write         # ... and writes it to docs/benchmarks.md
  python scripts/bench_scan.py --quick         # one small size, seconds (the README's demo)

For each backend and size: median wall time of the jitted forward and
forward+backward (after warm-up), and the temporary memory XLA allocates for
forward+backward (`compile().memory_analysis().temp_size_in_bytes`), next to the
size of one (batch, length, channels, state) float32 tensor.
"""

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ssm.scan import selective_scan

IMPLS = ("reference", "associative", "chunked")
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def inputs(batch, length, channels, state, dtype, seed=0):
  rng = np.random.default_rng(seed)
  arr = lambda shape, dt=dtype, **kw: jnp.asarray(rng.normal(size=shape, **kw), dt)
  return dict(
      u=arr((batch, length, channels)), delta=arr((batch, length, channels), loc=-2.0),
      A=-jnp.tile(jnp.arange(1, state + 1, dtype=jnp.float32), (channels, 1)),
      B=arr((batch, length, state)), C=arr((batch, length, state)),
      D=arr((channels,), jnp.float32), z=arr((batch, length, channels)),
      delta_bias=arr((channels,), jnp.float32))


def median_time(fn, args, reps):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(impl, batch, length, channels, state, dtype=jnp.float32, reps=5):
  x = inputs(batch, length, channels, state, dtype)
  fwd = jax.jit(lambda x: selective_scan(**x, impl=impl))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(selective_scan(**x, impl=impl).astype(jnp.float32))))
  memory = grad.lower(x).compile().memory_analysis()
  return dict(
      impl=impl, batch=batch, length=length, channels=channels, state=state,
      dtype=jnp.dtype(dtype).name,
      fwd_ms=1e3 * median_time(fwd, (x,), reps),
      fwd_bwd_ms=1e3 * median_time(grad, (x,), reps),
      temp_mb=memory.temp_size_in_bytes / 2**20,
      bldn_mb=batch * length * channels * state * 4 / 2**20)


def table(rows):
  head = ("| backend | B | L | D | N | dtype | fwd ms | fwd+bwd ms | fwd+bwd temp MiB "
          "| one (B,L,D,N) f32 MiB |\n|---|---|---|---|---|---|---|---|---|---|\n")
  return head + "".join(
      f"| {r['impl']} | {r['batch']} | {r['length']} | {r['channels']} | {r['state']} "
      f"| {r['dtype']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['temp_mb']:.1f} "
      f"| {r['bldn_mb']:.1f} |\n" for r in rows)


def chunked_memory_check(rows):
  """The issue's targets at batch 2, length 2048, channels 256 (CPU)."""
  mem = {r["state"]: r for r in rows if r["impl"] == "chunked" and
         (r["batch"], r["length"], r["channels"]) == (2, 2048, 256)}
  if not {16, 64} <= set(mem):
    return ""
  growth = mem[64]["temp_mb"] / mem[16]["temp_mb"]
  share = mem[16]["temp_mb"] / mem[16]["bldn_mb"]
  return (f"chunked, B=2 L=2048 D=256: fwd+bwd temp memory N=64 / N=16 = {growth:.2f} "
          f"(target <= 1.5); at N=16 it is {share:.2f} of one (B,L,D,N) float32 tensor "
          f"(target < 0.25).\n")


def write_section(path, name, body):
  """Replaces (or appends) the section between this benchmark's markers."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  block = f"{begin}\n{body}{end}"
  if begin in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  path.write_text(text)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="one small size")
  p.add_argument("--write", action="store_true", help=f"write the table to {DOC}")
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args(argv)
  if args.quick:
    sizes = [(2, 512, 128, 16)]
  else:
    sizes = [(2, 2048, 256, 16), (2, 2048, 256, 64), (8, 1024, 512, 16)]
  rows = []
  for size in sizes:
    for impl in IMPLS:
      rows.append(measure(impl, *size, reps=args.reps))
      print(table(rows[-1:]).splitlines()[-1], flush=True)
  out = table(rows) + "\n" + chunked_memory_check(rows)
  print("\n" + out)
  if args.write:
    device = jax.devices()[0]
    cmd = "python scripts/bench_scan.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = (f"## Selective scan backends\n\n`{cmd.strip()}` on {device.platform} "
            f"({device.device_kind}, {platform.processor() or platform.machine()}, "
            f"{jax.local_device_count()} device(s)), JAX {jax.__version__}, "
            f"{datetime.date.today()}. Times are medians of {args.reps} runs after warm-up; "
            f"memory is XLA's compiled temporary allocation for forward+backward.\n\n"
            + out)
    write_section(DOC, "bench_scan", body)
    print(f"wrote {DOC}")


if __name__ == "__main__":
  main()
