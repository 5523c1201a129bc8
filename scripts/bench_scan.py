"""Benchmark of the selective-scan backends: time and compiled memory.

  python scripts/bench_scan.py                 # CPU sizes; prints the table
  python scripts/bench_scan.py --write         # ... and writes it to docs/benchmarks.md
  python scripts/bench_scan.py --quick         # one small size, seconds (the README's demo)
  python scripts/bench_scan.py --paper --write # GPU/TPU: the Mamba paper's sizes, roofline
  python scripts/bench_scan.py --paper --small # the same sweep at tiny sizes (CPU smoke run)

Default and --quick: for each backend and size, median wall time of the jitted
forward and forward+backward (after warm-up), and the temporary memory XLA
allocates for forward+backward (`compile().memory_analysis().temp_size_in_bytes`),
next to the size of one (batch, length, channels, state) float32 tensor.

--paper: batch 8, length 512 to 16384, channels 1536, N 16 and 64, bf16 (the
Mamba paper's scan benchmark), every backend (`--impls` to choose). Device-side
time: after warm-up, `--inner` calls are dispatched back to back and the device
is waited on once, so host dispatch overlaps device work; the median of `--reps`
such groups, per call. Beside each time: the bytes a fused kernel must move (read
u, delta, z, B, C once, write y once; the backward reads those and dy and writes
their gradients) over the time, and the fraction of the roofline reached, where
the roofline time is the larger of bytes / memory bandwidth and exponentials /
exponential rate (B*L*D*N exp(delta A) forward, twice that forward+backward, as a
kernel that recomputes the states). Memory: XLA's compiled peak for
forward+backward (arguments + outputs + temporaries), no timing involved. Sizes
that fail (out of memory) are reported as such and the sweep goes on.
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ssm.report import describe_device, write_section
from ssm.scan import selective_scan

IMPLS = ("reference", "associative", "chunked")  # the CPU table's; --paper adds "pallas"
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

# The Mamba paper's scan benchmark (Gu & Dao 2023, fig. 8): batch 8, d_inner 1536.
PAPER = dict(batch=8, lengths=(512, 1024, 2048, 4096, 8192, 16384), channels=1536,
             states=(16, 64))
SMALL = dict(batch=2, lengths=(64, 256), channels=32, states=(16, 64))  # a CPU smoke run
# (memory bandwidth bytes/s, exponentials/s) by device kind. Bandwidths are the
# data-sheet figures; exponentials: 132 SMs x 16 MUFU ex2 per clock x ~1.9 GHz
# (H100 and H200 share the GH100 compute die).
PEAKS = {"H100 PCIe": (2.0e12, 3.4e12), "H100": (3.35e12, 4.0e12), "H200": (4.8e12, 4.0e12)}


def inputs(batch, length, channels, state, dtype, seed=0):
  rng = np.random.default_rng(seed)
  arr = lambda shape, dt=dtype, **kw: jnp.asarray(rng.normal(size=shape, **kw), dt)
  return dict(
      u=arr((batch, length, channels)), delta=arr((batch, length, channels), loc=-2.0),
      A=-jnp.tile(jnp.arange(1, state + 1, dtype=jnp.float32), (channels, 1)),
      B=arr((batch, length, state)), C=arr((batch, length, state)),
      D=arr((channels,), jnp.float32), z=arr((batch, length, channels)),
      delta_bias=arr((channels,), jnp.float32))


def peaks(device):
  """(bytes/s, exp/s) of a device, or None where unknown (CPUs)."""
  for kind, value in PEAKS.items():
    if kind in device.device_kind:
      return value
  return None


def min_traffic(batch, length, channels, state, itemsize):
  """What any scan must move and compute: (bytes, exponentials), forward and
  forward+backward. Forward reads u, delta, z (B, L, D) and B, C (B, L, N) once
  and writes y; the backward reads them and dy and writes du, ddelta, dz, dB, dC."""
  bld, bln = batch * length * channels, batch * length * state
  fwd_bytes = itemsize * (4 * bld + 2 * bln)
  bwd_bytes = itemsize * (7 * bld + 4 * bln)
  exps = batch * length * channels * state
  return dict(fwd_bytes=fwd_bytes, fwd_exps=exps, fwd_bwd_bytes=fwd_bytes + bwd_bytes,
              fwd_bwd_exps=2 * exps)


def device_time(fn, args, reps, inner):
  """Median over `reps` groups of the time per call of `inner` back-to-back calls."""
  for _ in range(2):  # compile and warm up
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


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


def measure_paper(impl, batch, length, channels, state, dtype, reps, inner, device_peaks):
  """One row of the --paper table; `error` is set (and the rest missing) if it fails."""
  row = dict(impl=impl, batch=batch, length=length, channels=channels, state=state,
             dtype=jnp.dtype(dtype).name)
  try:
    x = inputs(batch, length, channels, state, dtype)
    fwd = jax.jit(lambda x: selective_scan(**x, impl=impl))
    loss = lambda x: jnp.sum(selective_scan(**x, impl=impl).astype(jnp.float32))
    grad = jax.jit(jax.grad(loss))
    mem = grad.lower(x).compile().memory_analysis()
    row["peak_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
    row["temp_mb"] = mem.temp_size_in_bytes / 2**20
    row["fwd_ms"] = 1e3 * device_time(fwd, (x,), reps, inner)
    row["fwd_bwd_ms"] = 1e3 * device_time(grad, (x,), reps, inner)
  except Exception as e:  # out of memory at the largest sizes: report it, go on
    row["error"] = "out of memory" if "RESOURCE_EXHAUSTED" in str(e) else type(e).__name__
    print(f"{impl} {length} {state}: {str(e)[:300]}", file=sys.stderr)
  finally:
    jax.clear_caches()  # compiled executables hold device memory
  traffic = min_traffic(batch, length, channels, state, jnp.dtype(dtype).itemsize)
  row.update(traffic)
  if "fwd_ms" in row:
    row["fwd_gbs"] = traffic["fwd_bytes"] / row["fwd_ms"] / 1e6
    row["fwd_bwd_gbs"] = traffic["fwd_bwd_bytes"] / row["fwd_bwd_ms"] / 1e6
  if device_peaks is not None:
    bw, exp_rate = device_peaks
    for pass_ in ("fwd", "fwd_bwd"):
      row[f"{pass_}_roof_ms"] = 1e3 * max(traffic[f"{pass_}_bytes"] / bw,
                                          traffic[f"{pass_}_exps"] / exp_rate)
      if f"{pass_}_ms" in row:
        row[f"{pass_}_roof"] = row[f"{pass_}_roof_ms"] / row[f"{pass_}_ms"]
  return row


def paper_table(rows):
  fmt = lambda r, k, spec: format(r[k], spec) if k in r else "—"
  head = ("| backend | B | L | D | N | dtype | fwd ms | fwd GB/s | fwd roofline ms | fwd of roofline "
          "| fwd+bwd ms | fwd+bwd GB/s | fwd+bwd roofline ms | fwd+bwd of roofline "
          "| fwd+bwd peak MiB | fwd+bwd temp MiB |\n|" + "---|" * 16 + "\n")
  lines = []
  for r in rows:
    cells = [r["impl"], r["batch"], r["length"], r["channels"], r["state"], r["dtype"]]
    if "error" in r:
      cells += [r["error"]] + ["—"] * 9
    else:
      cells += [fmt(r, "fwd_ms", ".3f"), fmt(r, "fwd_gbs", ".3g"), fmt(r, "fwd_roof_ms", ".3f"),
                fmt(r, "fwd_roof", ".0%"), fmt(r, "fwd_bwd_ms", ".3f"), fmt(r, "fwd_bwd_gbs", ".3g"),
                fmt(r, "fwd_bwd_roof_ms", ".3f"), fmt(r, "fwd_bwd_roof", ".0%"),
                fmt(r, "peak_mb", ".4g"), fmt(r, "temp_mb", ".4g")]
    lines.append("| " + " | ".join(map(str, cells)) + " |\n")
  return head + "".join(lines)


def paper_targets(rows):
  """The issue's targets, where the rows to judge them are present."""
  key = lambda impl, L, N: next((r for r in rows if (r["impl"], r["batch"], r["length"],
                                                      r["channels"], r["state"]) ==
                                 (impl, 8, L, 1536, N) and "fwd_ms" in r), None)
  pallas, assoc = key("pallas", 2048, 16), key("associative", 2048, 16)
  lines = []
  if pallas and "fwd_roof_ms" in pallas:
    lines.append(f"- pallas forward, B=8 L=2048 D=1536 N=16: {pallas['fwd_ms']:.3f} ms, "
                 f"{pallas['fwd_ms'] / pallas['fwd_roof_ms']:.1f}x the roofline time "
                 f"(target <= 2x).")
  if pallas and assoc:
    lines.append(f"- pallas vs associative forward at that size: "
                 f"{assoc['fwd_ms'] / pallas['fwd_ms']:.1f}x faster (target >= 10x).")
  p16, p64 = key("pallas", 2048, 16), key("pallas", 2048, 64)
  if p16 and p64:
    lines.append(f"- pallas forward+backward peak memory N=64 / N=16 at L=2048: "
                 f"{p64['peak_mb'] / p16['peak_mb']:.2f} (target: flat; the inputs B, C "
                 f"and their gradients grow with N).")
  return "".join(line + "\n" for line in lines)


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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="one small size")
  p.add_argument("--paper", action="store_true", help="the Mamba paper's sizes, with roofline")
  p.add_argument("--small", action="store_true", help="with --paper: tiny sizes (CPU smoke run)")
  p.add_argument("--impls", default=None, help="comma-separated backends (--paper: all)")
  p.add_argument("--lengths", default=None, help="comma-separated lengths (--paper)")
  p.add_argument("--states", default=None, help="comma-separated state sizes (--paper)")
  p.add_argument("--dtype", default="bfloat16", help="input dtype (--paper)")
  p.add_argument("--write", action="store_true", help=f"write the table to {DOC}")
  p.add_argument("--tag", default="", help="--paper --write: a section of its own for a part "
                 "of the sweep (e.g. --states 64 --tag n64)")
  p.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
  p.add_argument("--inner", type=int, default=None, help="--paper: calls per timed group")
  p.add_argument("--peak-bw", type=float, default=None,
                 help="--paper: memory bandwidth in bytes/s, for devices not in PEAKS")
  p.add_argument("--peak-exp", type=float, default=None,
                 help="--paper: exponentials per second, for devices not in PEAKS")
  args = p.parse_args(argv)
  cmd = "python scripts/bench_scan.py " + " ".join(sys.argv[1:] if argv is None else argv)
  if args.paper:
    return run_paper(args, cmd.strip())
  args.reps = args.reps or 5
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
    body = (f"## Selective scan backends\n\n`{cmd.strip()}` on {describe_device()}, "
            f"JAX {jax.__version__}, {datetime.date.today()}. Times are medians of {args.reps} "
            f"runs after warm-up; memory is XLA's compiled temporary allocation for "
            f"forward+backward.\n\n" + out)
    write_section(DOC, "bench_scan", body)
    print(f"wrote {DOC}")


def run_paper(args, cmd):
  sizes = SMALL if args.small else PAPER
  ints = lambda text, default: tuple(int(v) for v in text.split(",")) if text else default
  impls = tuple(args.impls.split(",")) if args.impls else IMPLS + ("pallas",)
  lengths, states = ints(args.lengths, sizes["lengths"]), ints(args.states, sizes["states"])
  reps, inner = args.reps or (3 if args.small else 10), args.inner or (1 if args.small else 5)
  device = jax.devices()[0]
  device_peaks = peaks(device)
  if args.peak_bw or args.peak_exp:
    if not (args.peak_bw and args.peak_exp) and device_peaks is None:
      raise SystemExit("--peak-bw and --peak-exp: give both for a device not in PEAKS")
    device_peaks = (args.peak_bw or device_peaks[0], args.peak_exp or device_peaks[1])
  rows = []
  for state in states:
    for length in lengths:
      for impl in impls:
        rows.append(measure_paper(impl, sizes["batch"], length, sizes["channels"], state,
                                  jnp.dtype(args.dtype), reps, inner, device_peaks))
        print(paper_table(rows[-1:]).splitlines()[-1], flush=True)
  out = paper_table(rows) + "\n" + paper_targets(rows)
  print("\n" + out)
  if args.write:
    roof = (f"Roofline at {device_peaks[0] / 1e12:.2f} TB/s and {device_peaks[1]:.1e} exp/s"
            if device_peaks else "No roofline: no peak figures for this device")
    name = ("bench_scan_smoke" if args.small else "bench_scan_paper") + (
        f"_{args.tag}" if args.tag else "")
    title = ("Selective scan at tiny sizes (CPU smoke run: checks the script, says nothing "
             "about speed)" if args.small else "Selective scan at the Mamba paper's sizes")
    body = (f"## {title}\n\n`{cmd}` on {describe_device()}, JAX {jax.__version__}, "
            f"{datetime.date.today()}. Per-call times: median of {reps} groups of {inner} "
            f"back-to-back calls after warm-up. {roof}. Memory: XLA's compiled peak "
            f"(arguments + outputs + temporaries) for forward+backward.\n\n" + out)
    write_section(DOC, name, body)
    print(f"wrote {DOC}")


if __name__ == "__main__":
  main()
