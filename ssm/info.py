"""`ssm-info NAME`: a model's size without training it (or allocating it).

  ssm-info mamba-130m
  ssm-info --list
"""

import argparse
import sys

from ssm.flops import param_count
from ssm.models import PRESETS, LMConfig, ViTConfig, get_preset


def architecture(config):
  if isinstance(config, LMConfig):
    mixers = config.layer_mixers
    kind = {"M": "Mamba LM", "A": "Transformer LM"}.get("".join(sorted(set(mixers))),
                                                          f"hybrid LM ({mixers})")
    parts = [f"d_model {config.d_model}", f"n_layer {config.n_layer}"]
    if "M" in mixers:
      m = config.mamba
      parts.append(f"d_state {m.d_state}, expand {m.expand}, d_conv {m.d_conv}")
    if "A" in mixers:
      a = config.attention
      parts.append(f"heads {a.n_heads}" + (f" (kv {a.n_kv_heads})" if a.n_kv_heads else "")
                   + (", RoPE" if a.rope else ""))
    if config.mlp != "none":
      parts.append(f"{config.mlp} MLP {config.d_intermediate}")
    return f"{kind}: " + ", ".join(parts)
  if isinstance(config, ViTConfig):
    return (f"ViT: d_model {config.d_model}, n_layer {config.n_layer}, heads {config.n_heads}, "
            f"patch {config.patch_size} at {config.image_size}px, registers "
            f"{config.num_registers}, classes {config.num_classes}")
  return (f"Vision Mamba: d_model {config.d_model}, n_layer {config.n_layer}, patch "
          f"{config.patch_size} at {config.image_size}px, registers {config.num_registers}, "
          f"classes {config.num_classes}")


def describe(name):
  config = get_preset(name)
  rows = [("model", name), ("architecture", architecture(config))]
  if isinstance(config, LMConfig):
    vocab, padded = config.vocab_size, config.padded_vocab_size
    rows.append(("vocabulary", f"{vocab}" + (f" (padded to {padded})" if padded != vocab else "")))
  rows += [("parameters", f"{param_count(config):,}"),
           ("non-embedding", f"{param_count(config, embeddings=False):,}")]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="ssm-info", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", nargs="?", help="a preset name (ssm-info --list shows them)")
  parser.add_argument("--list", action="store_true", help="list the presets")
  args = parser.parse_args(argv)
  if args.list or args.name is None:
    print("\n".join(PRESETS))
    return 0
  try:
    print(describe(args.name))
  except KeyError as e:
    print(f"ssm-info: {e.args[0]}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
