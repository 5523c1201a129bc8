"""Benchmark of Mamba-2's SSD scan (ssm.scan.ssd) against the Mamba-1 selective-scan
backends at matched width and state: compiled memory and time.

  python scripts/bench_ssd.py                  # CPU sizes: memory, then time
  python scripts/bench_ssd.py --memory         # memory only (no timing: deterministic)
  python scripts/bench_ssd.py --gpu            # accelerator sizes, bf16 (the H100 tables)

Matched: the SSD scans H heads of P channels (E = H P) with one group of B and C,
the selective scan E channels, both with state size N. Memory: the temporary memory
XLA allocates for the jitted forward+backward (`compile().memory_analysis()`), next
to one (batch, length, E, N) float32 tensor, the state per step. Time: median wall
time of the jitted forward and forward+backward over --reps calls after warm-up,
all backends in one run (ratios between them are what the run supports on a
shared machine).
"""

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssm.report import describe_device
from ssm.scan import selective_scan, ssd

MAMBA1 = ("reference", "associative", "chunked")


def ssd_inputs(batch, length, heads, head_dim, state, dtype, seed=0):
  rng = np.random.default_rng(seed)
  arr = lambda shape, dt=dtype, **kw: jnp.asarray(rng.normal(size=shape, **kw), dt)
  return dict(x=arr((batch, length, heads, head_dim)), dt=arr((batch, length, heads), loc=-2.0),
              A=-jnp.asarray(rng.uniform(1, 16, size=(heads,)), jnp.float32),
              B=arr((batch, length, 1, state)), C=arr((batch, length, 1, state)),
              D=arr((heads,), jnp.float32), dt_bias=arr((heads,), jnp.float32))


def scan_inputs(batch, length, channels, state, dtype, seed=0):
  rng = np.random.default_rng(seed)
  arr = lambda shape, dt=dtype, **kw: jnp.asarray(rng.normal(size=shape, **kw), dt)
  return dict(u=arr((batch, length, channels)), delta=arr((batch, length, channels), loc=-2.0),
              A=-jnp.tile(jnp.arange(1, state + 1, dtype=jnp.float32), (channels, 1)),
              B=arr((batch, length, state)), C=arr((batch, length, state)),
              D=arr((channels,), jnp.float32), delta_bias=arr((channels,), jnp.float32))


def functions(name, size, dtype, chunk_size):
  """(label, inputs, forward, forward+backward) of one backend at one size."""
  batch, length, heads, head_dim, state = size
  if name.startswith("ssd"):
    impl = name.split("-")[1]
    kw = dict(chunk_size=chunk_size) if impl == "chunked" else {}
    x = ssd_inputs(batch, length, heads, head_dim, state, dtype)
    run = lambda x: ssd(**x, impl=impl, **kw)
    label = f"SSD {impl}" + (f" (T={chunk_size})" if kw else "")
  else:
    x = scan_inputs(batch, length, heads * head_dim, state, dtype)
    run = lambda x: selective_scan(**x, impl=name)
    label = f"Mamba-1 {name}"
  loss = lambda x: jnp.sum(run(x).astype(jnp.float32))
  return label, x, jax.jit(run), jax.jit(jax.grad(loss))


def median_ms(fn, x, reps):
  jax.block_until_ready(fn(x))  # compile and warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def run(names, sizes, dtype, chunk_size, reps, timing):
  rows = []
  for size in sizes:
    batch, length, heads, head_dim, state = size
    for name in names:
      label, x, fwd, grad = functions(name, size, dtype, chunk_size)
      temp = grad.lower(x).compile().memory_analysis().temp_size_in_bytes
      row = dict(backend=label, size=size, temp_mib=temp / 2**20,
                 blen_mib=batch * length * heads * head_dim * state * 4 / 2**20)
      if timing:
        row["fwd_ms"], row["fwd_bwd_ms"] = median_ms(fwd, x, reps), median_ms(grad, x, reps)
      rows.append(row)
      jax.clear_caches()
      print(_line(row, timing), flush=True)
  return rows


def _line(r, timing):
  b, L, H, P, N = r["size"]
  cells = [r["backend"], b, L, f"{H * P} ({H}x{P})", N, f"{r['temp_mib']:.1f}",
           f"{r['blen_mib']:.0f}"]
  if timing:
    cells += [f"{r['fwd_ms']:.1f}", f"{r['fwd_bwd_ms']:.1f}"]
  return "| " + " | ".join(map(str, cells)) + " |"


def header(timing):
  cols = ["backend", "B", "L", "E (H x P)", "N", "fwd+bwd temp MiB", "one (B, L, E, N) f32 MiB"]
  if timing:
    cols += ["fwd ms", "fwd+bwd ms"]
  return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--memory", action="store_true", help="memory only, no timing")
  p.add_argument("--gpu", action="store_true", help="accelerator sizes in bfloat16")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--chunk-size", type=int, default=None,
                 help="the SSD's chunk (default: 64 on CPU, 256 with --gpu)")
  args = p.parse_args()
  print(f"# {describe_device()}, {datetime.date.today()}, jax {jax.__version__}")
  if args.gpu:  # Mamba-2's sizes: batch 8, width 1536 (24 heads of 64), bf16
    sizes = [(8, L, 24, 64, N) for L in (2048, 8192) for N in (64, 128)]
    dtype, chunk = jnp.bfloat16, args.chunk_size or 256
    names = ("ssd-chunked", "chunked", "associative")
  else:
    sizes = [(1, 1024, 4, 64, N) for N in (64, 128)]
    dtype, chunk = jnp.float32, args.chunk_size or 64
    names = ("ssd-chunked", "ssd-reference", *MAMBA1)
  print(header(not args.memory))
  run(names, sizes, dtype, chunk, args.reps, not args.memory)
  if args.memory:  # flatness in N of the chunked SSD, at two chunk sizes
    print("\n" + header(False))
    for T in (64, 256):
      run(("ssd-chunked",), [(1, 2048, 4, 64, N) for N in (32, 64, 128, 256)], dtype, T,
          args.reps, False)


if __name__ == "__main__":
  main()
