"""`ssm-info NAME`: a model's size and cost without training it (or allocating it). NAME is
a preset, a config file (configs/<task>.py:<arch>) or an ssm-train workdir (its config.json).

  ssm-info mamba-130m
  ssm-info mamba-370m --seq-len 8192 --match transformer++,hybrid
  ssm-info configs/mqar.py:hybrid
  ssm-info runs/mqar-mamba
  ssm-info vit-s16-reg4 --match vit,vim,vim+reg
  ssm-info --list
"""

import argparse
import difflib
import json
import sys
from pathlib import Path

import ml_collections as mlc

from ssm.flops import FAMILIES, VISION_FAMILIES, flops, match, match_vision, param_count
from ssm.models import PRESETS, LMConfig, ViTConfig, config_from_dict


def architecture(config):
  if isinstance(config, LMConfig):
    mixers = config.layer_mixers
    kind = {"M": "Mamba LM", "S": "Mamba-2 LM", "A": "Transformer LM"}.get(
        "".join(sorted(set(mixers))), f"hybrid LM ({mixers})")
    parts = [f"d_model {config.d_model}", f"n_layer {config.n_layer}"]
    if "M" in mixers:
      m = config.mamba
      parts.append(f"d_state {m.d_state}, expand {m.expand}, d_conv {m.d_conv}")
    if "S" in mixers:
      m = config.mamba2
      parts.append(f"Mamba-2 d_state {m.d_state}, headdim {m.headdim}, {m.ngroups} group(s), "
                   f"expand {m.expand}, chunk {m.chunk_size}")
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


def resolve(name):
  """(model config, the run's sequence length or None) of a preset name, a config file
  'path.py[:arg]' or a workdir."""
  path = Path(name.partition(":")[0])
  if path.suffix == ".py":
    from ssm.config import load_config_file
    if not path.is_file():
      raise ValueError(f"no config file {str(path)!r}; the config files are under configs/ "
                       "(e.g. configs/mqar.py:mamba)")
    c = load_config_file(name)
  elif path.is_dir():
    if not (path / "config.json").is_file():
      raise ValueError(f"{name} has no config.json: give the --workdir of an ssm-train run")
    c = mlc.ConfigDict(json.loads((path / "config.json").read_text()))
  elif name in PRESETS:
    return PRESETS[name], None
  else:
    close = difflib.get_close_matches(name, PRESETS, n=2)
    raise ValueError(f"unknown preset {name!r}" + (f" (did you mean {' or '.join(close)}?)"
                     if close else "") + f"; known presets: {', '.join(PRESETS)}; or give a "
                     "config file (configs/<task>.py:<arch>) or a workdir")
  return config_from_dict(c.model), c.task.get("seq_len")


def _check_families(families, vision):
  known = VISION_FAMILIES if vision else FAMILIES
  for family in families:
    if family in (FAMILIES if vision else VISION_FAMILIES):
      raise ValueError(f"--match {family}: a {'vision' if vision else 'language'} model matches "
                       f"{', '.join(VISION_FAMILIES) if vision else 'language-model'} families")
    if family not in known:
      close = difflib.get_close_matches(family, known, n=1, cutoff=0.5)
      raise ValueError(f"--match {family}: unknown family" + (f" (did you mean {close[0]}?)"
                       if close else "") + f"; {'vision' if vision else 'language'} model "
                       f"families: {', '.join(known)}")


def describe(name, seq_len=None, match_families=()):
  config, config_len = resolve(name)
  is_lm = isinstance(config, LMConfig)
  _check_families(match_families, vision=not is_lm)
  # Learned positions (GPT-2) bound the length: the default is at most theirs.
  max_len = (config.max_position_embeddings if is_lm and config.positions == "learned"
             else None)
  seq_len = seq_len or config_len or min(2048, max_len or 2048)
  if max_len and seq_len > max_len:
    raise ValueError(f"length {seq_len}: {name} has {max_len} learned positions; give "
                     f"--seq-len at most {max_len}")
  rows = [("model", name), ("architecture", architecture(config))]
  if is_lm:
    vocab, padded = config.vocab_size, config.padded_vocab_size
    rows.append(("vocabulary", f"{vocab}" + (f" (padded to {padded})" if padded != vocab else "")))
  params = param_count(config)
  rows += [("parameters", f"{params:,}"),
           ("non-embedding", f"{param_count(config, embeddings=False):,}")]
  terms = flops(config, seq_len)
  unit = f"per token at length {seq_len}" if is_lm else "per image"
  rows.append(("forward FLOPs", f"{terms['total']:.4g} {unit} (" + ", ".join(
      f"{k} {v:.3g}" for k, v in terms.items() if k != "total" and v) + ")"))
  rows.append(("training FLOPs", f"{3 * terms['total']:.4g} {unit} (3x forward; attention "
                                 "counted in full, not the causal half)"))
  for family in match_families:
    for criterion, target in (("params", params), ("flops", 3 * terms["total"])):
      m, value, mismatch = (
          match(family, target, criterion=criterion, seq_len=seq_len,
                vocab_size=config.vocab_size) if is_lm else
          match_vision(family, target, criterion=criterion, like=config))
      rows.append((f"{family} @ {criterion}",
                   f"d_model {m.d_model}, n_layer {m.n_layer}: {value:,.4g} ({mismatch:+.2%})"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="ssm-info", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", nargs="?",
                      help="a preset (ssm-info --list shows them), configs/<task>.py:<arch> "
                      "or an ssm-train workdir")
  parser.add_argument("--list", action="store_true", help="list the presets")
  parser.add_argument("--seq-len", type=int, help="sequence length for LM FLOPs (default: "
                      "the config's, else 2048 or the model's learned positions if fewer)")
  parser.add_argument("--match", default="", help="families to match, e.g. transformer++,hybrid "
                      "(vision models: vit, vit+reg, vim, vim+reg)")
  def error(message):  # one line, not argparse's usage and message
    print(f"ssm-info: {message}; ssm-info --help says more", file=sys.stderr)
    sys.exit(2)
  parser.error = error
  args = parser.parse_args(argv)
  if args.list or args.name is None:
    print("\n".join(PRESETS))
    return 0
  families = [f for f in args.match.split(",") if f]
  if args.seq_len is not None and args.seq_len < 1:
    print(f"ssm-info: --seq-len {args.seq_len}: give a length of at least 1 token",
          file=sys.stderr)
    return 2
  try:
    print(describe(args.name, args.seq_len, families))
  except (KeyError, ValueError) as e:
    print(f"ssm-info: {e.args[0]}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
