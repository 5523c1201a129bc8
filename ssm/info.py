"""`ssm-info NAME`: a model's size without training it (or allocating it).

  ssm-info mamba-130m
  ssm-info --list
"""

import argparse
import sys

from ssm.models import PRESETS, get_preset, param_count


def describe(name):
  config = get_preset(name)
  m = config.mamba
  total = param_count(config)
  non_embedding = param_count(config, embeddings=False)
  vocab = config.vocab_size
  padded = config.padded_vocab_size
  rows = [
      ("model", name),
      ("architecture", f"Mamba LM: d_model {config.d_model}, n_layer {config.n_layer}, "
                       f"d_state {m.d_state}, expand {m.expand}, d_conv {m.d_conv}"),
      ("vocabulary", f"{vocab}" + (f" (padded to {padded})" if padded != vocab else "")),
      ("parameters", f"{total:,}"),
      ("non-embedding", f"{non_embedding:,}"),
  ]
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
