"""Analytic FLOPs against XLA's count, and matched sizes, written to docs/flops.md.

  python scripts/flops_report.py            # prints the tables
  python scripts/flops_report.py --write    # ... and writes docs/flops.md
"""

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import jax

from ssm.flops import (FAMILIES, family_config, flops, lm_flops, lm_params, match,
                       xla_forward_flops, xla_scan_flops)
from ssm.layers import MambaConfig
from ssm.layers.attention import AttentionConfig
from ssm.models import PRESETS, VimConfig, ViTConfig, get_preset

ROOT = Path(__file__).resolve().parents[1]
ASSOC = MambaConfig(scan_impl="associative")  # no while loop, so XLA counts every step
L = 256


def agreement():
  models = {
      "transformer++ (d 256, 2 layers)": (family_config("transformer++", 256, 2, 1000), L),
      "gpt2 (d 256, 2 layers)": (dataclasses.replace(
          get_preset("gpt2-small"), d_model=256, n_layer=2, d_intermediate=1024,
          max_position_embeddings=L, attention=AttentionConfig(n_heads=4, bias=True,
                                                               rope=False)), L),
      "mamba (d 256, 3 layers)": (dataclasses.replace(family_config("mamba", 256, 3, 1000),
                                                      mamba=ASSOC), L),
      "hybrid MMA (d 256, 3 layers)": (dataclasses.replace(
          family_config("hybrid", 256, 3, 1000), mamba=ASSOC), L),
      "vit (d 128, 2 layers, 64px/8, 4 registers)": (ViTConfig(
          image_size=64, patch_size=8, d_model=128, n_layer=2, n_heads=4, d_intermediate=512,
          num_registers=4, num_classes=10), None),
      "vim (d 128, 2 layers, 64px/8, 2 registers)": (VimConfig(
          image_size=64, patch_size=8, d_model=128, n_layer=2, num_registers=2,
          num_classes=10, mamba=ASSOC), None),
  }
  lines = ["| model | analytic | XLA | XLA / analytic | XLA's scan | analytic, scan excluded "
           "| XLA, scan excluded | ratio |", "|" + "---|" * 8]
  for name, (c, seq_len) in models.items():
    a, x = flops(c, seq_len), xla_forward_flops(c, seq_len)
    scan_x = 0.0
    if a["scan"]:
      if isinstance(c, VimConfig):
        T = 1 + c.num_registers + c.grid**2
        scan_x = 2 * xla_scan_flops(T, 2 * c.d_model, c.mamba.d_state) * T * c.n_layer
      else:
        scan_x = xla_scan_flops(seq_len, 2 * c.d_model, c.mamba.d_state) * \
            c.layer_mixers.count("M")
    rest_a, rest_x = a["total"] - a["scan"], x - scan_x
    lines.append(f"| {name} | {a['total']:.4g} | {x:.4g} | {x / a['total']:.3f} | "
                 f"{scan_x:.3g} | {rest_a:.4g} | {rest_x:.4g} | {rest_x / rest_a:.3f} |")
  return "\n".join(lines) + "\n"


def matches():
  lines = ["| reference | criterion | family | d_model | n_layer | value | mismatch |",
           "|" + "---|" * 7]
  for ref_name in ("mamba-130m", "mamba-370m", "mamba-1.4b"):
    ref = PRESETS[ref_name]
    for criterion in ("params", "flops"):
      target = lm_params(ref) if criterion == "params" else 3 * lm_flops(ref, 2048)["total"]
      for family in FAMILIES:
        c, value, mismatch = match(family, target, criterion=criterion, seq_len=2048,
                                   vocab_size=ref.vocab_size)
        lines.append(f"| {ref_name} | {criterion} | {family} | {c.d_model} | {c.n_layer} | "
                     f"{value:,.4g} | {mismatch:+.2%} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--write", action="store_true")
  args = p.parse_args(argv)
  a, m = agreement(), matches()
  print(a + "\n" + m)
  if args.write:
    cmd = "python scripts/flops_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (ROOT / "docs" / "flops.md").write_text(f"""# FLOPs and matched sizes

`{cmd.strip()}`, JAX {jax.__version__}, {datetime.date.today()}. FLOPs are forward FLOPs
per token at length {L} (language models) or per image (vision models), from
`ssm.flops.flops`, against XLA's `compiled.cost_analysis()["flops"]` of the jitted
forward pass (Mamba layers with the associative scan, so that XLA counts every step
rather than one trip of a while loop).

{a}
Where they differ, and why:
- Attention models agree within 2% (ViT: 8%): XLA also counts the softmax over the
  scores (about 5 FLOPs per score, large next to a 128-wide ViT's matmuls) and the
  activations, which the analytic count leaves out.
- Mamba models: the difference is the scan. The analytic count is the sequential
  recurrence's 9 FLOPs per (token, channel, state); XLA counts the associative scan it
  compiled, whose log-depth composition of affine maps does several times that work.
  With XLA's own count of the scan set apart, the rest agrees within 5%
  (`tests/test_flops.py` asserts both).

## Matched sizes (within 2%)

Each family matched to the Mamba presets on parameters and on training FLOPs per
token at length 2048 (`ssm.flops.match`; Transformer++ with SwiGLU width ~8/3 d_model,
hybrid "MMA"); among sizes within 2%, the family's usual width / depth.

{m}""")
    print("wrote docs/flops.md")


if __name__ == "__main__":
  main()
