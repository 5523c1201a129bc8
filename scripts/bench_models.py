"""Whole-model speed: training tokens/s and MFU, decoding tokens/s, for Mamba,
Transformer++ and hybrid language models at matched parameters.

  python scripts/bench_models.py --write          # GPU: ~125M and ~350M, lengths 2k 8k 32k
  python scripts/bench_models.py --small          # tiny models and lengths (CPU smoke run)
  python scripts/bench_models.py --sizes 125m --lengths 2048 --no-decode   # a part of it

Models. Mamba is the released size (mamba-130m, mamba-370m). Transformer++ (SwiGLU,
RoPE, RMSNorm; cuDNN flash attention on GPUs) and the hybrid ("MMA": one attention
layer in three) are at Mamba's width, so heads stay 64 wide, with the depth that
`ssm.flops.match` (ssm-compare's matcher) finds; the table gives each count and its
mismatch. Compute in
bf16, parameters float32.

Training: the library's train step (ssm.train.step) on random tokens, `--tokens` per step (batch =
tokens / length, at least 1); after warm-up, `--steps` steps dispatched back to
back and waited on once. MFU = model FLOPs/s over the device's dense bf16 peak,
model FLOPs = 3 x the forward FLOPs of `ssm.flops.flops` (attention scores and
values counted in full, as XLA computes them, and as PaLM's MFU does).

Decoding: greedy, one token per row per step through `model.step` with the cache
of `model.init_cache(batch, --context)`, `--decode-steps` steps inside one jit.
Attention attends over its whole `--context` cache (masked) at every step: the
cost of a full context window; Mamba's cache has a fixed size.
"""

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm import flops
from ssm.models import LMConfig, build, get_preset
from ssm.report import attempt, describe_device, write_section
from ssm.config import base
from ssm.train.metrics import peak_flops
from ssm.train.optim import make_optimizer
from ssm.train.sharding import batch_sharding, make_mesh
from ssm.train.step import new_state, train_step

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SIZES = {"125m": get_preset("mamba-130m"), "350m": get_preset("mamba-370m")}
SMALL_SIZES = {"tiny": LMConfig(d_model=64, n_layer=2, vocab_size=256)}
FAMILIES = ("mamba", "transformer++", "hybrid")


def models(sizes, dtype, scan_impl, attention_impl):
  """(size, family, config, parameters, mismatch) for every size and family."""
  out = []
  for size, mamba in sizes.items():
    target = flops.lm_params(mamba)
    for family in FAMILIES:
      c, err = (mamba, 0.0) if family == "mamba" else _matched(family, mamba, target)
      c = dataclasses.replace(
          c, dtype=dtype, mamba=dataclasses.replace(c.mamba, scan_impl=scan_impl),
          attention=dataclasses.replace(c.attention, implementation=attention_impl))
      out.append((size, family, c, flops.lm_params(c), err))
  return out


def _matched(family, mamba, target):
  """`family` at Mamba's width (attention heads 64 wide), its depth matched to Mamba's
  parameter count by ssm-compare's matcher."""
  c, _, mismatch = flops.match(family, target, vocab_size=mamba.vocab_size, like=mamba,
                               width=mamba.d_model)
  return c, mismatch


def timed(run, steps):
  """Seconds per step of `steps` back-to-back calls of run() (it returns the new
  carry), after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(run())
  t0 = time.perf_counter()
  for _ in range(steps):
    out = run()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def measure_train(config, length, tokens, steps, seed=0):
  """The library's train step (ssm.train.step: AdamW with the run defaults) on one
  device."""
  batch = max(1, tokens // length)
  graphdef, state = nnx.split(build(config, rngs=nnx.Rngs(seed)))
  params = nnx.to_pure_dict(state)
  tx, lr = make_optimizer(base().train, state)
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  step = jax.jit(train_step(graphdef, tx, lr, 1, batch_sharding(mesh)), donate_argnums=0)
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, config.vocab_size, (batch, length + 1)), jnp.int32)
  data = dict(inputs=ids[:, :-1], labels=ids[:, 1:], loss_mask=jnp.ones((batch, length)))
  carry = [new_state(params, tx.init(params))]

  def run():
    carry[0], metrics = step(carry[0], data)
    return metrics["loss"]

  seconds = timed(run, steps)
  return dict(batch=batch, step_ms=1e3 * seconds, tokens_s=batch * length / seconds)


def measure_decode(config, batch, context, decode_steps, seed=0):
  model = build(config, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  cache = model.init_cache(batch, context)

  @jax.jit
  def decode(state, ids_B, cache):
    model = nnx.merge(graphdef, state)

    def body(_, carry):
      ids_B, cache = carry
      logits, cache = model.step(ids_B, cache)
      return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, decode_steps, body, (ids_B, cache))

  ids = jnp.zeros((batch,), jnp.int32)
  seconds = timed(lambda: decode(state, ids, cache), 3) / decode_steps
  return dict(batch=batch, ms_per_token=1e3 * seconds, tokens_s=batch / seconds)


def describe(config):
  return f"d {config.d_model}, {config.n_layer} layers" + (
      f", {config.pattern}" if config.pattern not in ("M", "A") else "")


def train_table(rows):
  head = ("| size | model | shape | params | vs Mamba | L | batch | step ms | tokens/s "
          "| model TFLOP/s | MFU | tokens/s / Transformer++'s |\n|" + "---|" * 12 + "\n")
  tf = {(r["size"], r["length"]): r.get("tokens_s") for r in rows
        if r["family"] == "transformer++"}
  lines = []
  for r in rows:
    cells = [r["size"], r["family"], r["shape"], f"{r['params'] / 1e6:.1f}M",
             f"{r['mismatch']:+.1%}", r["length"]]
    if "error" in r:
      cells += ["—", r["error"], "—", "—", "—", "—"]
    else:
      ratio = tf.get((r["size"], r["length"]))
      cells += [r["batch"], f"{r['step_ms']:.1f}", f"{r['tokens_s']:,.0f}",
                f"{r['tflops']:.3g}", f"{r['mfu']:.1%}" if "mfu" in r else "—",
                f"{r['tokens_s'] / ratio:.2f}" if ratio else "—"]
    lines.append("| " + " | ".join(map(str, cells)) + " |\n")
  return head + "".join(lines)


def decode_table(rows):
  head = "| size | model | params | batch | ms / step | tokens/s |\n|" + "---|" * 6 + "\n"
  lines = []
  for r in rows:
    cells = [r["size"], r["family"], f"{r['params'] / 1e6:.1f}M", r["batch"]]
    cells += ([r["error"], "—"] if "error" in r
              else [f"{r['ms_per_token']:.2f}", f"{r['tokens_s']:,.0f}"])
    lines.append("| " + " | ".join(map(str, cells)) + " |\n")
  return head + "".join(lines)


def targets(rows):
  """The issue's: Mamba within 1.5x of Transformer++ at 2k, faster from 8k on."""
  lines = []
  for r in rows:
    if r["family"] != "mamba" or "error" in r or r["length"] < 2048:
      continue  # the targets are set from 2k on
    tf = next((t for t in rows if t["family"] == "transformer++" and "tokens_s" in t
               and (t["size"], t["length"]) == (r["size"], r["length"])), None)
    if tf:
      want = "within 1.5x" if r["length"] <= 2048 else "faster"
      lines.append(f"- {r['size']}, L={r['length']}: Mamba / Transformer++ training tokens/s = "
                   f"{r['tokens_s'] / tf['tokens_s']:.2f} (target: {want}).")
  return "".join(line + "\n" for line in lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--small", action="store_true", help="tiny models and lengths (CPU smoke run)")
  p.add_argument("--sizes", default=None, help="comma-separated: 125m,350m")
  p.add_argument("--lengths", default=None, help="comma-separated training lengths")
  p.add_argument("--tokens", type=int, default=None, help="tokens per training step")
  p.add_argument("--steps", type=int, default=None, help="timed training steps")
  p.add_argument("--batches", default=None, help="comma-separated decoding batch sizes")
  p.add_argument("--context", type=int, default=None, help="decoding cache length")
  p.add_argument("--decode-steps", type=int, default=None)
  p.add_argument("--no-train", action="store_true")
  p.add_argument("--no-decode", action="store_true")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--scan-impl", default="auto", help="the Mamba layers' selective_scan impl")
  p.add_argument("--attention", default=None,
                 help="jax.nn.dot_product_attention implementation (default: cudnn on GPUs)")
  p.add_argument("--write", action="store_true", help=f"write the tables to {DOC}")
  p.add_argument("--tag", default="", help="--write: a section of its own for a part of the "
                 "runs (e.g. --sizes 350m --tag 350m)")
  args = p.parse_args(argv)
  ints = lambda text, default: tuple(int(v) for v in text.split(",")) if text else default
  small = args.small
  sizes = SMALL_SIZES if small else SIZES
  if args.sizes:
    sizes = {k: sizes[k] for k in args.sizes.split(",")}
  lengths = ints(args.lengths, (32, 128) if small else (2048, 8192, 32768))
  tokens = args.tokens or (256 if small else 16384)
  steps = args.steps or (2 if small else 10)
  batches = ints(args.batches, (1, 4) if small else (1, 4, 16, 64, 128))
  context = args.context or (64 if small else 2048)
  decode_steps = args.decode_steps or (8 if small else 64)
  device = jax.devices()[0]
  attention = args.attention or ("cudnn" if device.platform == "gpu" else None)
  peak = peak_flops()

  train_rows, decode_rows = [], []
  for size, family, config, params, mismatch in models(sizes, args.dtype, args.scan_impl,
                                                       attention):
    base = dict(size=size, family=family, shape=describe(config), params=params,
                mismatch=mismatch)
    for length in () if args.no_train else lengths:
      row = dict(base, length=length, **attempt(measure_train, config, length, tokens, steps))
      if "tokens_s" in row:
        row["tflops"] = row["tokens_s"] * 3 * flops.flops(config, length)["total"] / 1e12
        if peak:
          row["mfu"] = row["tflops"] * 1e12 / peak
      train_rows.append(row)
      print(train_table([row]).splitlines()[-1], flush=True)
    for batch in () if args.no_decode else batches:
      row = dict(base, **attempt(measure_decode, config, batch, context, decode_steps))
      row.setdefault("batch", batch)
      decode_rows.append(row)
      print(decode_table([row]).splitlines()[-1], flush=True)

  out = ""
  if train_rows:
    out += (f"Training, {tokens} tokens per step, {args.dtype}, scan impl {args.scan_impl!r}, "
            f"attention {attention or 'default'}; time per step of {steps} steps dispatched "
            f"back to back after two warm-up steps.\n\n" + train_table(train_rows) + "\n"
            + targets(train_rows) + "\n")
  if decode_rows:
    out += (f"Decoding, {args.dtype}, cache length {context}, {decode_steps} steps per "
            f"jitted loop.\n\n" + decode_table(decode_rows))
  print("\n" + out)
  if args.write:
    cmd = "python scripts/bench_models.py " + " ".join(sys.argv[1:] if argv is None else argv)
    title = ("Whole models at tiny sizes (CPU smoke run: checks the script, says nothing "
             "about speed)" if small else "Whole models: training and decoding speed")
    mfu = (f"MFU against {peak / 1e12:.0f} TFLOP/s dense bf16" if peak
           else "No MFU: no peak figure for this device")
    body = (f"## {title}\n\n`{cmd.strip()}` on {describe_device()}, JAX {jax.__version__}, "
            f"{datetime.date.today()}. {mfu}.\n\n" + out)
    name = ("bench_models_smoke" if small else "bench_models") + (f"_{args.tag}" if args.tag
                                                                  else "")
    write_section(DOC, name, body)
    print(f"wrote {DOC}")


if __name__ == "__main__":
  main()
