"""Generation speed and memory: Mamba vs Transformer++ at matched parameters, prefill
and decode tokens/s and the cache's bytes against context length and batch.

  python scripts/bench_generate.py --write           # CPU: a small model, contexts to 4k
  python scripts/bench_generate.py --gpu --write     # GPU: mamba-130m vs Transformer++,
                                                     # contexts 1k-32k, batch 1-64, bf16

Models. Mamba (CPU: d_model 128, 4 layers; GPU: the mamba-130m preset) and the
Transformer++ (SwiGLU, RoPE) at Mamba's width whose parameter count `ssm.flops.match`
finds closest. Random weights: speed does not depend on them.

Measured through the library's own path, the two compiled calls `ssm.generate.generate`
makes (greedy, no stop tokens), timed apart: `prefill` of a prompt of `context`
random tokens per row, and `decode` of `steps` new tokens (one `while_loop`), each
the median of `--repeats` calls after a warm-up (compile) call. prefill tokens/s =
batch x context / t(prefill); decode tokens/s = batch x steps / t(decode).
cache bytes / row: the LMCache after the prompt
(Mamba: conv and SSM states, fixed; attention: K and V for every position, so
linear in context). The decode loop's attention reads its whole cache (masked) at
every step, as the cache's length is fixed when decoding starts.
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
from flax import nnx

from ssm import flops
from ssm.generate import Sampling
from ssm.generate.decode import decode, prefill, prepare, row_keys
from ssm.models import LMConfig, build, get_preset
from ssm.report import attempt, describe_device, write_section

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
CPU_MAMBA = LMConfig(d_model=128, n_layer=4, vocab_size=256)
GREEDY = Sampling(temperature=0)


def configs(gpu, dtype):
  mamba = get_preset("mamba-130m") if gpu else CPU_MAMBA
  mamba = mamba.replace(dtype=dtype)
  target = flops.lm_params(mamba)
  # At Mamba's width; on CPU at half its depth (two Mamba layers per Transformer++
  # block, as in the papers), the MLP's width free, so that the counts come closer.
  tpp, _, mismatch = flops.match("transformer++", target, vocab_size=mamba.vocab_size,
                                 like=mamba, width=mamba.d_model,
                                 depth=None if gpu else mamba.n_layer // 2)
  return {"mamba": (mamba, 0.0), "transformer++": (tpp.replace(dtype=dtype), mismatch)}


def median_seconds(run, repeats):
  jax.block_until_ready(run())  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(model, batch, context, steps, repeats, seed=0):
  """The library's two compiled calls, timed apart: ssm.generate.decode.prefill and
  .decode (what `generate` runs)."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, model.config.vocab_size, (batch, context)).tolist()
  ids, reset, stops, max_length = prepare(model, prompts, steps, ())
  graphdef, state = nnx.split(model)
  start = lambda: prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(reset),
                          with_seen=False, max_length=max_length)
  t_prefill = median_seconds(start, repeats)
  started, keys = start(), row_keys(seed, batch)
  t_decode = median_seconds(lambda: decode(graphdef, state, *started, jnp.asarray(stops), keys,
                                           sampling=GREEDY, max_new_tokens=steps), repeats)
  row = dict(prefill_tokens_s=batch * context / t_prefill, decode_tokens_s=batch * steps / t_decode,
             ms_per_step=1e3 * t_decode / steps,
             cache_bytes_row=sum(x.nbytes for x in jax.tree.leaves(started[1].layers)) / batch)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    row["peak_bytes"] = stats["peak_bytes_in_use"]
  return row


def table(rows):
  head = ("| model | params | context | batch | prefill tokens/s | decode tokens/s | ms / step "
          "| cache bytes / row | decode / Transformer++'s |\n|" + "---|" * 9 + "\n")
  tpp = {(r["context"], r["batch"]): r.get("decode_tokens_s") for r in rows
         if r["family"] == "transformer++"}
  lines = []
  for r in rows:
    cells = [r["family"], f"{r['params'] / 1e6:.2f}M ({r['mismatch']:+.1%})", r["context"],
             r["batch"]]
    if "error" in r:
      cells += [r["error"]] + ["—"] * 4
    else:
      ratio = tpp.get((r["context"], r["batch"]))
      cells += [f"{r['prefill_tokens_s']:,.0f}", f"{r['decode_tokens_s']:,.0f}",
                f"{r['ms_per_step']:.2f}", f"{r['cache_bytes_row']:,.0f}",
                f"{r['decode_tokens_s'] / ratio:.2f}" if ratio else "—"]
    lines.append("| " + " | ".join(map(str, cells)) + " |\n")
  return head + "".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--gpu", action="store_true", help="mamba-130m size, contexts 1k-32k, "
                 "batch 1-64, bfloat16")
  p.add_argument("--contexts", default=None, help="comma-separated, at batch 1")
  p.add_argument("--batches", default=None, help="comma-separated, at --batch-context")
  p.add_argument("--batch-context", type=int, default=None)
  p.add_argument("--steps", type=int, default=None, help="decode steps timed")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default=None)
  p.add_argument("--write", action="store_true", help=f"write the table to {DOC}")
  args = p.parse_args(argv)
  ints = lambda text, default: tuple(int(v) for v in text.split(",")) if text else default
  gpu = args.gpu
  contexts = ints(args.contexts, (1024, 2048, 4096, 8192, 16384, 32768) if gpu
                  else (256, 1024, 4096))
  batches = ints(args.batches, (1, 4, 16, 64) if gpu else (1, 4, 16))
  batch_context = args.batch_context or (4096 if gpu else 1024)
  steps = args.steps or (128 if gpu else 64)
  dtype = args.dtype or ("bfloat16" if gpu else "float32")
  points = sorted({(c, 1) for c in contexts} | {(batch_context, b) for b in batches})
  rows = []
  for family, (config, mismatch) in configs(gpu, dtype).items():
    model = build(config, rngs=nnx.Rngs(0))
    params = flops.lm_params(config)
    for context, batch in points:
      row = dict(family=family, params=params, mismatch=mismatch, context=context, batch=batch)
      row.update(attempt(measure, model, batch, context, steps, args.repeats))
      print(row, flush=True)
      rows.append(row)
  body = table(rows)
  print(body)
  long = max(c for c, _ in points)
  pair = {r["family"]: r for r in rows if (r["context"], r["batch"]) == (long, 1)}
  summary = ""
  if all("decode_tokens_s" in pair.get(f, {}) for f in ("mamba", "transformer++")):
    summary = (f"At context {long}, batch 1: Mamba decodes "
               f"{pair['mamba']['decode_tokens_s'] / pair['transformer++']['decode_tokens_s']:.2f}x "
               "Transformer++'s tokens/s (one run); its cache is "
               f"{pair['transformer++']['cache_bytes_row'] / pair['mamba']['cache_bytes_row']:.0f}x "
               "smaller.\n")
  print(summary)
  if args.write:
    command = "python scripts/bench_generate.py " + " ".join(argv or sys.argv[1:])
    text = (f"## Generation: prefill, decode and cache memory\n\n`{command.strip()}` on "
            f"{describe_device()}, {datetime.date.today()}; greedy, {steps} decode steps, "
            f"median of {args.repeats} calls, {dtype}.\n\n{body}\n{summary}")
    write_section(DOC, "bench_generate" + ("_gpu" if gpu else ""), text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
